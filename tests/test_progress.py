"""How progress is rendered for a user waiting on an image (the step client and the CLI)."""

from __future__ import annotations

import io
import time

from ociimage.progress import (DONE, DOWNLOAD, NOTE, WAIT, LiveProgress, ProgressEvent, Rate,
                               TextProgress)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _text(tty=False, interval=4.0):
    clock, out = Clock(), io.StringIO()
    return TextProgress(out, prefix="oci-image: n1: ", tty=tty, interval=interval,
                        clock=clock), clock, out


def test_lines_say_phase_bytes_percent_rate_and_time_left():
    tp, clock, out = _text()
    for i in range(11):  # 10 MB/s for 10 s, a line at most every 4 s
        clock.t = 100.0 + i
        tp(ProgressEvent(DOWNLOAD, current=i * 10_000_000, total=1_000_000_000, layer=2, layers=3))
    lines = out.getvalue().splitlines()
    assert lines[0] == "oci-image: n1: converting:   0% 0 B of 1.0 GB (layer 2 of 3)"
    assert lines[-1] == ("oci-image: n1: converting:   8% 80.0 MB of 1.0 GB, 10.0 MB/s, "
                         "1 min 32 s left (layer 2 of 3)")
    assert len(lines) == 3  # at 0, 4 and 8 s: not one per event


def test_a_wait_shows_the_builders_bytes_and_rate():
    tp, clock, out = _text(interval=0)
    msg = "waiting for node n3 converting this image"
    tp(ProgressEvent(WAIT, message=msg))
    clock.t += 5
    tp.write_line()  # the heartbeat: same state, the time it has taken
    tp(ProgressEvent(WAIT, message=msg, current=1_000_000, total=4_000_000))
    clock.t += 5
    tp(ProgressEvent(WAIT, message=msg, current=1_000_000, total=4_000_000))  # not read again yet
    clock.t += 5
    tp(ProgressEvent(WAIT, message=msg, current=3_000_000, total=4_000_000))
    assert out.getvalue().splitlines() == [
        f"oci-image: n1: {msg}",
        f"oci-image: n1: {msg} (5 s)",
        f"oci-image: n1: {msg}:  25% 1.0 MB of 4.0 MB",
        f"oci-image: n1: {msg}:  25% 1.0 MB of 4.0 MB",      # too early to call it stalled
        f"oci-image: n1: {msg}:  75% 3.0 MB of 4.0 MB, 200.0 KB/s, 5 s left"]


def test_rate_says_stalled_only_after_a_whole_window():
    r = Rate(window=10)
    r.add(0, 100)
    r.add(5, 100)
    assert r.per_second(5) is None
    r.add(11, 100)
    assert r.per_second(11) == 0
    r.add(12, 50)  # a new counter: starts over
    assert r.per_second(12) is None


def test_on_a_terminal_each_line_replaces_the_one_before():
    tp, clock, out = _text(tty=True)
    tp(ProgressEvent(DOWNLOAD, current=0, total=100))
    clock.t += 1
    tp(ProgressEvent(DOWNLOAD, current=50, total=100))
    tp(ProgressEvent(NOTE, message="something to keep"))
    clock.t += 1
    tp(ProgressEvent(DONE, message="image ready"))
    lines = out.getvalue().split("\n")
    assert lines[0].startswith("oci-image: n1: converting:   0%")
    assert lines[1].startswith("\x1b[1A\x1b[2Koci-image: n1: converting:  50%")
    assert lines[2] == "\x1b[1A\x1b[2Koci-image: note: something to keep"
    assert lines[3] == "oci-image: n1: image ready"  # below the note, which stays


def test_live_progress_is_silent_for_a_quick_answer():
    out = io.StringIO()
    live = LiveProgress(TextProgress(out, tty=False, interval=4.0), quiet=1.0, every=4.0)
    live(ProgressEvent("resolve", message="resolving x"))
    live(ProgressEvent(DONE, message="image ready"))
    live.stop()
    assert out.getvalue() == ""


def test_live_progress_repeats_the_line_when_no_event_comes():
    out = io.StringIO()
    live = LiveProgress(TextProgress(out, tty=False, interval=0.5), quiet=0.2, every=0.5)
    live(ProgressEvent("mount", message="mounting the image"))
    time.sleep(2.0)
    live.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(l.startswith("mounting the image") for l in lines), lines


def test_live_progress_shows_a_note_at_once():
    out = io.StringIO()
    live = LiveProgress(TextProgress(out, prefix="oci-image: n1: ", tty=False), quiet=5.0)
    live(ProgressEvent(NOTE, message="/x is not in the container"))
    live.stop()
    assert out.getvalue() == "oci-image: note: /x is not in the container\n"
