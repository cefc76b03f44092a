"""Progress events, shared by the CLI, the daemon's Pull stream and the step client.

Library code reports through a callable taking a ProgressEvent; it never
writes to a terminal itself.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

# Phases, in the order an image goes through them.
RESOLVE = "resolve"
WAIT = "wait"          # another process or node is converting the same image
DOWNLOAD = "download"  # layers streaming through flatten into the SquashFS writer
SQUASH = "squash"      # writer finishing the image
FETCH = "fetch"        # downloading a ready-made SquashFS (monolithic image)
RETRY = "retry"        # a download was interrupted (stall, reset, short body) and resumes
DONE = "done"


@dataclass
class ProgressEvent:
    phase: str
    message: str = ""
    current: int = 0
    total: int = 0
    layer: int = 0
    layers: int = 0


Reporter = Callable[[ProgressEvent], None]


def silent(_event: ProgressEvent) -> None:
    pass


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


class TextProgress:
    """Renders events: a redrawn bar on a terminal, sparse log lines otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, prefix: str = "", tty: Optional[bool] = None,
                 interval: float = 2.0):
        self.stream = stream
        self.prefix = prefix
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval if not self.tty else 0.1
        self._last = 0.0
        self._last_phase = ""
        self._drawn = False

    def __call__(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        phase_changed = ev.phase != self._last_phase
        if (not phase_changed and now - self._last < self.interval
                and ev.phase not in (DONE, RETRY)):  # never drop news of trouble
            return
        self._last, self._last_phase = now, ev.phase
        line = self.format(ev)
        if self.tty:
            end = "\n" if ev.phase == DONE else ""
            self.stream.write("\r\x1b[K" + line + end)
            self._drawn = ev.phase != DONE
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def format(self, ev: ProgressEvent) -> str:
        p = self.prefix
        if ev.phase in (DOWNLOAD, FETCH) and ev.total:
            frac = min(1.0, ev.current / ev.total)
            bar = ""
            if self.tty:
                width = 24
                filled = int(frac * width)
                bar = "[" + "#" * filled + "." * (width - filled) + "] "
            layer = f" layer {ev.layer}/{ev.layers}" if ev.layers else ""
            verb = "converting" if ev.phase == DOWNLOAD else "fetching"
            return (f"{p}{verb} {bar}{frac * 100:3.0f}% "
                    f"{_human(ev.current)}/{_human(ev.total)}{layer}")
        if ev.phase == WAIT:
            return f"{p}{ev.message or 'waiting for a conversion in progress elsewhere'} ({ev.current}s)"
        return f"{p}{ev.message or ev.phase}"

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
