"""Helpers for slurm-oci-image step hooks (see docs/hooks.md). Not a hook itself
(not executable): the shipped hooks import it from their own directory.

Binding a HOST path into the container: inside the step's mount namespace the
host's tree is gone (pivot_root + detach), and mount(MS_BIND) refuses a source
from another namespace. So the source is cloned first, on the host, as a
detached mount (open_tree(OPEN_TREE_CLONE)), then the process enters the
namespace (setns) and attaches the clone with move_mount(). Linux >= 5.2.

A mount target missing in the (read-only) image is made in a throw-away
overlay of its nearest existing parent directory, whose upper layer lives on
a tmpfs private to the step; never under /dev, /proc or /sys (the host's).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Dict, List, Optional

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
FORBIDDEN = ("/dev", "/proc", "/sys")


class HookError(Exception):
    pass


def fail(msg: str, code: int = 1) -> None:
    """One line on stderr: the daemon shows the last line to the user."""
    sys.stderr.write(msg.replace("\n", " ") + "\n")
    sys.exit(code)


def _err(what: str) -> HookError:
    e = ctypes.get_errno()
    return HookError(f"{what}: {os.strerror(e)}")


def clone_tree(host_path: str) -> int:
    """A detached copy of the mount at host_path (file or directory): an fd."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, host_path.encode(),
                       OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    if fd < 0:
        raise _err(f"open_tree {host_path}")
    return fd


def attach(fd: int, target: str) -> None:
    if _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(),
                     MOVE_MOUNT_F_EMPTY_PATH) < 0:
        raise _err(f"move_mount onto {target}")


def mount(src: Optional[str], target: str, fstype: Optional[str], flags: int,
          data: Optional[str] = None) -> None:
    if _libc.mount(src.encode() if src else None, target.encode(),
                   fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) < 0:
        raise _err(f"mount {src or fstype or ''} on {target}")


def enter(ns_path: str) -> None:
    fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNS) < 0:
            raise _err(f"setns {ns_path}")
    finally:
        os.close(fd)
    os.chdir("/")


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK) and not (os.statvfs(path).f_flag & os.ST_RDONLY)


def _mount_points() -> List[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


_overlays = 0


def ensure_target(path: str, is_dir: bool) -> None:
    """Make path exist in the container (we are inside its namespace)."""
    global _overlays
    if os.path.lexists(path):
        return
    parent = os.path.dirname(path.rstrip("/")) or "/"
    missing = [path]
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent) or "/"
    if any(parent == f or parent.startswith(f + "/") for f in FORBIDDEN):
        raise HookError(f"{path}: cannot create a mount point under {parent} (the host's)")
    if not _writable(parent):
        below = [m for m in _mount_points() if m.startswith(parent.rstrip("/") + "/")]
        if parent == "/" or below:
            raise HookError(f"{path}: cannot create it: {parent} is read-only and has mounts "
                            f"below it")
        _overlays += 1
        base = f"/tmp/.oci-hook-{os.getpid()}-{_overlays}"
        os.makedirs(base + "/upper", mode=0o755)
        os.makedirs(base + "/work", mode=0o700)
        os.chmod(base, 0o700)
        mount("overlay", parent, "overlay", MS_NOSUID | MS_NODEV,
              f"lowerdir={parent},upperdir={base}/upper,workdir={base}/work")
    for p in reversed(missing[1:]):
        os.mkdir(p, 0o755)
    if is_dir:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def bind_into(ns_path: str, binds: List[tuple], symlinks: List[tuple] = ()) -> None:
    """[(host path, container path, read_only)] and [(link target, container path)]
    into the container: clone on the host, then enter and attach. Ends in the namespace."""
    fds = [(clone_tree(src), dst, ro, os.path.isdir(src)) for src, dst, ro in binds]
    enter(ns_path)
    for fd, dst, ro, is_dir in fds:
        ensure_target(dst, is_dir)
        attach(fd, dst)
        os.close(fd)
        if ro:
            mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for target, link in symlinks:
        if not os.path.lexists(link):
            ensure_target(os.path.dirname(link), True)
            os.symlink(target, link)


def job_env() -> Dict[str, str]:
    """The job's full environment (OCI_HOOK_JOB_ENV)."""
    path = os.environ.get("OCI_HOOK_JOB_ENV")
    if not path:
        return {}
    with open(path, "rb") as f:
        data = f.read()
    out = {}
    for rec in data.split(b"\0"):
        k, sep, v = rec.partition(b"=")
        if sep and k:
            out[k.decode(errors="surrogateescape")] = v.decode(errors="surrogateescape")
    return out
