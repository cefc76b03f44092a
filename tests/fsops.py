"""Count the filesystem calls a running process makes on files under one directory (strace).

    with FsTrace(daemon.proc.pid, cache_dir, tmp_path / "n2.strace") as t:
        ...                       # the process works
    ops = t.result()              # FsOps: total, lock, by_call, by_area

strace -f -y attaches to every thread of the process (and follows the children it
starts); -y prints each descriptor with the path it names, so calls on a descriptor
(flock, read, fsync, close) are counted as well as calls that name a path (openat,
stat, rename). A call counts when its line names a path under the directory; calls
split by another thread (`<unfinished ...>` / `<... resumed>`) count once, on the
line that starts them. "lock" is the subset on files under DIR/locks/ (the cache's
cross-node lock files): on Lustre or GPFS every one of these open/flock/close calls is
a request to the metadata server or the lock manager.

Only %file and %desc system calls are traced (what touches files), which keeps the
overhead on a busy gRPC daemon small.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Counter, Optional

STRACE = "strace"
#: calls whose quoted string arguments are paths (a quoted string of any other call, a
#: write()'s data or an execve()'s argv, may name the directory without touching it)
PATH_CALLS = frozenset("""open openat openat2 creat stat lstat newfstatat fstatat64 statx access
faccessat faccessat2 readlink readlinkat rename renameat renameat2 unlink unlinkat mkdir mkdirat
rmdir link linkat symlink symlinkat chmod fchmodat chown lchown fchownat utime utimes utimensat
futimesat truncate mknod mknodat getxattr lgetxattr setxattr lsetxattr listxattr llistxattr
removexattr lremovexattr statfs chdir chroot mount umount2 name_to_handle_at inotify_add_watch
fanotify_mark""".split())
_CALL = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(?:\d+\.\d+\s+)?([a-z_0-9]+)\(")


@dataclass
class FsOps:
    """Filesystem calls on files under `root` while traced."""

    root: str
    seconds: float
    total: int = 0
    lock: int = 0
    by_call: Counter = field(default_factory=collections.Counter)
    #: the first path component under root: "locks", "images", "leases", "records", ...
    by_area: Counter = field(default_factory=collections.Counter)
    lock_by_call: Counter = field(default_factory=collections.Counter)

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 2), "total": self.total, "lock": self.lock,
                "by_call": dict(self.by_call.most_common()),
                "by_area": dict(self.by_area.most_common()),
                "lock_by_call": dict(self.lock_by_call.most_common())}


def parse(text: str, root: Path, seconds: float = 0.0) -> FsOps:
    root_s = os.path.realpath(root).rstrip("/") + "/"
    ops = FsOps(str(root), seconds)
    fd_arg = re.compile("<" + re.escape(root_s) + r"([^/>]+)")     # -y: 7</cache/locks/x>
    path_arg = re.compile('"' + re.escape(root_s) + r'([^/"]+)')   # "/cache/images/x"
    for line in text.splitlines():
        if root_s not in line or "resumed>" in line.split("(", 1)[0]:
            continue
        m = _CALL.match(line)
        if not m:
            continue
        call = m.group(2)
        a = fd_arg.search(line) or (path_arg.search(line) if call in PATH_CALLS else None)
        if a is None:
            continue
        ops.total += 1
        ops.by_call[call] += 1
        where = a.group(1)
        ops.by_area[where] += 1
        if where == "locks":
            ops.lock += 1
            ops.lock_by_call[call] += 1
    return ops


def _tasks(pid: int):
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _traced(tid: int) -> bool:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1]) != 0
    except OSError:
        return True  # gone: nothing left to wait for
    return False


class FsTrace:
    """strace -f -y -p PID for the length of a with-block (or start() ... stop())."""

    def __init__(self, pid: int, root: Path, out: Path):
        self.pid, self.root, self.out = pid, Path(root), Path(out)
        self.proc: Optional[subprocess.Popen] = None
        self.started = self.stopped = 0.0

    def start(self, timeout: float = 20) -> "FsTrace":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([STRACE, "-f", "-y", "-qq", "-e", "trace=%file,%desc",
                                      "-o", str(self.out), "-p", str(self.pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"strace exited {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode(errors='replace')}")
            tasks = _tasks(self.pid)
            if tasks and all(_traced(t) for t in tasks):
                self.started = time.monotonic()
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"strace did not attach to {self.pid} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.stopped = time.monotonic()
            self.proc.send_signal(signal.SIGINT)  # detaches, flushes -o
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def result(self) -> FsOps:
        text = self.out.read_text(errors="replace") if self.out.exists() else ""
        return parse(text, self.root, (self.stopped or time.monotonic()) - self.started)

    def __enter__(self) -> "FsTrace":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
