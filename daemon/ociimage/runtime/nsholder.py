"""The process that holds a step's mount namespace: recorded, checked, killed.

The process that built a step's namespace stays asleep in it as its holder until the
step is released. Its pid alone does not name it for good (an earlier daemon's holder
may be gone and its pid reused), so the step directory's holder file records the pid,
the namespace's inode and the process's start time, and every look or kill checks all
three first.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..stepenv import process_start

HOLDER_FILE = "holder"


def record_holder(step_dir: Path, pid: int) -> None:
    """Write step_dir's holder file for the process pid, which holds its namespace."""
    inode = os.stat(f"/proc/{pid}/ns/mnt").st_ino
    (step_dir / HOLDER_FILE).write_text(f"{pid} {inode} {process_start(pid)}\n")


def kill_verified(ns_path: Path, holder: "Holder") -> None:
    """SIGKILL the holder through a pidfd taken while it is still the holder: a holder
    adopted from an earlier daemon is no child of ours, and its pid, once it is gone, may
    be another process's by the time a plain kill() would run."""
    try:
        pidfd = os.pidfd_open(holder.pid)
    except (AttributeError, OSError):  # Linux < 5.3, or already gone
        if holder_info(ns_path) == holder:
            kill_holder(holder.pid)
        return
    try:
        if holder_info(ns_path) != holder:
            return  # gone between the two looks: the pidfd may name someone else
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    finally:
        os.close(pidfd)
    try:
        os.waitpid(holder.pid, 0)
    except ChildProcessError:
        _wait_gone(holder.pid)  # the helper's child, or init's: they reap it


def _wait_gone(pid: int, timeout: float = 2.0) -> None:
    """Until the killed holder is reaped (by the helper whose child it is), briefly."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.002)


def kill_holder(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:  # the helper's child (or init's, for an earlier daemon's helper): it reaps it
        os.waitpid(pid, 0)
    except ChildProcessError:
        _wait_gone(pid)


@dataclass(frozen=True)
class Holder:
    pid: int
    ns_inode: int
    start: int


def holder_info(ns_path: Union[str, Path]) -> Optional[Holder]:
    """The process holding this step's namespace, if it still does (pid, ns inode, start)."""
    try:
        fields = (Path(ns_path).parent / HOLDER_FILE).read_text().split()
        pid, inode = int(fields[0]), int(fields[1])
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino != inode:
            return None
        start = process_start(pid)
        # a holder recorded by an older daemon has no start time: the inode must do
        if len(fields) > 2 and int(fields[2]) != start:
            return None
        return Holder(pid, inode, start)
    except (OSError, ValueError, IndexError):
        return None


def holder_of(ns_path: Union[str, Path]) -> Optional[int]:
    """The pid of the process holding this step's namespace, if it still does."""
    h = holder_info(ns_path)
    return h.pid if h else None
