"""Progress events, shared by the CLI, the daemon's Pull stream and the step client.

Library code reports through a callable taking a ProgressEvent; it never
writes to a terminal itself.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque

# Phases, in the order an image goes through them.
RESOLVE = "resolve"
WAIT = "wait"          # another process or node is converting the same image
DOWNLOAD = "download"  # layers streaming through flatten into the SquashFS writer
SQUASH = "squash"      # writer finishing the image
FETCH = "fetch"        # downloading a ready-made SquashFS (monolithic image)
RETRY = "retry"        # a download was interrupted (stall, reset, short body) and resumes
DONE = "done"


class ProgressEvent:
    """One step of progress. A plain class, not a dataclass: the step client imports this
    module on every step's first node, and dataclasses (with inspect) and typing cost
    more than that step's whole request."""

    __slots__ = ("phase", "message", "current", "total", "layer", "layers")

    def __init__(self, phase: str, message: str = "", current: int = 0, total: int = 0,
                 layer: int = 0, layers: int = 0):
        self.phase, self.message, self.current, self.total = phase, message, current, total
        self.layer, self.layers = layer, layers

    def _key(self) -> tuple:
        return (self.phase, self.message, self.current, self.total, self.layer, self.layers)

    def __eq__(self, other) -> bool:
        return isinstance(other, ProgressEvent) and self._key() == other._key()

    __hash__ = None  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return ("ProgressEvent(phase={!r}, message={!r}, current={!r}, total={!r}, layer={!r}, "
                "layers={!r})".format(*self._key()))


#: a progress callback (an annotation only, so that typing need not be imported)
Reporter = "Callable[[ProgressEvent], None]"


def silent(_event: ProgressEvent) -> None:
    pass


MOUNT = "mount"        # the node mounting the image and building the step's namespace
NOTE = "note"          # something the user should know once (message only), not a phase

# Phases that carry bytes done of a total (current/total), and their verbs.
_VERBS = {DOWNLOAD: "converting", FETCH: "downloading", WAIT: ""}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


_CONTROL = {c: "?" for c in list(range(0x20)) + list(range(0x7f, 0xa0)) if c != 0x09}


def printable(text: str) -> str:
    """text with control characters shown as '?': a message may hold a path or name a
    user chose, and a newline or an escape sequence in it must not make a line of its own
    or reach a terminal (the plugin passes the step client's lines on as they are)."""
    return text.translate(_CONTROL)


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Rate:
    """Bytes per second over the last `window` seconds of a byte counter.

    A window, not the average since the start: a download that stalls for a
    minute must show it at once, and the ETA must follow the current speed.
    """

    def __init__(self, window: float = 10.0):
        self.window = window
        self._samples: Deque[Tuple[float, int]] = deque()

    def add(self, now: float, current: int) -> None:
        if self._samples and current < self._samples[-1][1]:
            self._samples.clear()  # a new counter (the next phase, a restarted download)
        if self._samples and current == self._samples[-1][1]:
            return  # kept at the time the counter got there: "no news" is not a new sample
        self._samples.append((now, current))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def per_second(self, now: float) -> Optional[float]:
        """None while it is too early to tell; 0 once nothing moved for a whole window.

        Counters that move in steps (another node's progress, read every few seconds)
        are measured between their steps, not diluted by the time since the last one,
        until that time reaches the window: then it is a slowdown or a stall.
        """
        if not self._samples:
            return None
        t0, c0 = self._samples[0]
        t1, c1 = self._samples[-1]
        if c1 > c0 and t1 - t0 >= 1.0 and now - t1 < self.window:
            return (c1 - c0) / (t1 - t0)
        span = now - t0
        if span < self.window:
            return None
        return (c1 - c0) / span


class _State:
    __slots__ = ("event", "since")

    def __init__(self, event: ProgressEvent, since: float):
        self.event, self.since = event, since  # since: when this phase began


class TextProgress:
    """Renders events as one line each: phase, bytes done of total, %, rate and ETA.

    tty: a line replaces the one before it (cursor up, erase), each still ending in a
    newline, because srun passes task output on line by line; otherwise plain lines, at
    most one per `interval` for the same phase (a batch job's error file stays readable).
    """

    def __init__(self, stream: TextIO = sys.stderr, prefix: str = "", tty: Optional[bool] = None,
                 interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 columns: int = 0):
        self.stream = stream
        self.prefix = prefix
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval if not self.tty else 0.5
        # a redrawn line must fit on one row: cursor-up would leave a wrapped tail behind
        self.columns = columns if self.tty else 0
        self.clock = clock
        self.rate = Rate()
        self._state: Optional[_State] = None
        self._last = -1e9
        self._redraw = False  # the last line written may be replaced

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.phase == NOTE:
            self.note(ev.message)
            return
        now = self.clock()
        changed = self.update(ev, now)
        if changed or now - self._last >= self.interval or ev.phase in (DONE, RETRY):
            self.write_line(now, final=ev.phase in (DONE, RETRY))  # never drop news of trouble

    def update(self, ev: ProgressEvent, now: float) -> bool:
        """Take in an event; True if it starts a new phase (or a new message in one)."""
        old = self._state.event if self._state else None
        changed = old is None or ev.phase != old.phase or (
            ev.phase not in _VERBS and ev.message != old.message)
        if changed:
            self._state = _State(ev, now)
            self.rate = Rate()
        else:
            self._state.event = ev
        if ev.total:
            self.rate.add(now, ev.current)
        return changed

    def write_line(self, now: Optional[float] = None, final: bool = False) -> None:
        """Write the current state (again: a heartbeat, with the time it has taken)."""
        if self._state is None:
            return
        now = self.clock() if now is None else now
        line = printable(self.format(self._state.event, now))
        if self.columns > 1 and len(line) > self.columns - 1:
            line = line[:self.columns - 2] + "…"
        up = "\x1b[1A\x1b[2K" if self.tty and self._redraw else ""
        self.stream.write(up + line + "\n")
        self.stream.flush()
        self._last = now
        self._redraw = self.tty and not final

    def note(self, message: str) -> None:
        """A line of its own, never replaced by the next."""
        up = "\x1b[1A\x1b[2K" if self.tty and self._redraw else ""
        self.stream.write(f"{up}{self.prefix.split(': ')[0]}: note: {printable(message)}\n")
        self.stream.flush()
        self._redraw = False

    def format(self, ev: ProgressEvent, now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        since = self._state.since if self._state else now
        p = self.prefix
        if ev.phase in _VERBS and ev.total:
            head = ev.message if ev.phase == WAIT else _VERBS[ev.phase]
            frac = min(1.0, ev.current / ev.total)
            if ev.phase == DOWNLOAD and ev.current >= ev.total:
                return f"{p}writing the image ({_duration(now - since)})"
            text = (f"{p}{head}: {frac * 100:3.0f}% {_human(ev.current)} of "
                    f"{_human(ev.total)}")
            rate = self.rate.per_second(now)
            if rate is not None:
                text += f", {_human(rate)}/s"
                text += (f", {_duration((ev.total - ev.current) / rate)} left" if rate > 0
                         else ", stalled")
            if ev.layers and ev.phase == DOWNLOAD:
                text += f" (layer {ev.layer or 1} of {ev.layers})"
            return text
        text = f"{p}{ev.message or ev.phase}"
        if ev.phase not in (DONE, RETRY) and now - since >= 1.0:
            text += f" ({_duration(now - since)})"
        return text

    def close(self) -> None:
        self._redraw = False


class LiveProgress:
    """A TextProgress for someone waiting on a step: silent for `quiet` seconds (a cached
    image says nothing at all), then a line at least every `every` seconds. A timer
    writes the line again when no event comes (the image being written, a slow registry,
    the mount), so a long wait never looks like a hang.
    """

    def __init__(self, text: TextProgress, quiet: float = 1.0, every: float = 4.0):
        self.text, self.quiet, self.every = text, quiet, every
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = text.clock()
        self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._thread.start()

    def __call__(self, ev: ProgressEvent) -> None:
        with self._lock:
            now = self.text.clock()
            if ev.phase == NOTE:  # at once, even in the quiet start, and kept on screen
                self.text.note(ev.message)
                return
            changed = self.text.update(ev, now)
            if now - self._start < self.quiet:
                return
            final = ev.phase in (DONE, RETRY)
            if changed or final or now - self.text._last >= self.text.interval:
                self.text.write_line(now, final=final)

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                now = self.text.clock()
                # on a terminal the elapsed seconds tick in place; else a line per `every`
                if now - self._start >= self.quiet and now - self.text._last >= \
                        (min(self.every, 1.0) if self.text.tty else self.every):
                    self.text.write_line(now)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.text.close()
