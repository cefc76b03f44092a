"""Helpers for slurm-oci-image step hooks (see docs/hooks.md). Not a hook itself
(not executable): the shipped hooks import it from their own directory.

Binding a HOST path into the container: inside the step's mount namespace the
host's tree is gone (pivot_root + detach), and mount(MS_BIND) refuses a source
from another namespace. So the source is cloned first, on the host, as a
detached mount (open_tree(OPEN_TREE_CLONE)), then the process enters the
namespace (setns) and attaches the clone with move_mount(). Linux >= 5.2.

A mount target missing in the (read-only) image is made in a throw-away
overlay of its nearest existing parent directory, whose upper layer lives on
a tmpfs mounted over that very directory (so no path the user controls is
involved: not the container's /tmp, which a user may bind to a host
directory); never under /dev, /proc or /sys (the host's), never inside the
user's own mounts (OCI_HOOK_USER_MOUNTS), and never through a symbolic link:
hooks run as root, and writing through a path the user controls would let
them make root create files anywhere they can point a link.
"""

from __future__ import annotations

import ctypes
import json
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


def user_mounts() -> List[str]:
    """Container paths of the user's own mounts (home, --oci-mounts), from the daemon."""
    try:
        paths = json.loads(os.environ.get("OCI_HOOK_USER_MOUNTS", "[]"))
    except ValueError:
        raise HookError("OCI_HOOK_USER_MOUNTS is not a JSON list") from None
    return [p for p in paths if isinstance(p, str) and p.startswith("/")]


def _inside(path: str, roots) -> Optional[str]:
    for r in roots:
        if path == r or path.startswith(r.rstrip("/") + "/"):
            return r
    return None


def _overlay_over(parent: str) -> None:
    """Make parent writable for the step: an overlay with its upper layer on a tmpfs of ours.

    The image's directory is cloned first (a detached copy), a tmpfs is mounted
    over parent to hold upper/, work/ and lower/, the clone is attached at lower/,
    and the overlay is stacked on parent on top of all that.
    """
    lower = clone_tree(parent)
    try:
        mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
        for d in ("upper", "work", "lower"):
            os.mkdir(f"{parent}/{d}", 0o700)
        attach(lower, f"{parent}/lower")
    finally:
        os.close(lower)
    os.chmod(f"{parent}/upper", 0o755)
    mount("overlay", parent, "overlay", MS_NOSUID | MS_NODEV,
          f"lowerdir={parent}/lower,upperdir={parent}/upper,workdir={parent}/work")


def ensure_target(path: str, is_dir: bool) -> None:
    """Make path exist in the container (we are inside its namespace)."""
    path = os.path.normpath(path)
    mine = _inside(path, user_mounts())
    if mine is not None:  # existing or not: root must not mount or write in the user's tree
        raise HookError(f"{path}: inside your mount {mine}; the site's hook cannot mount "
                        f"there: mount it elsewhere")
    if os.path.realpath(path) != path and os.path.lexists(path):
        raise HookError(f"{path}: is or goes through a symbolic link in the container; "
                        f"refusing to mount there")
    if os.path.lexists(path):
        return
    parent = os.path.dirname(path.rstrip("/")) or "/"
    missing = [path]
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent) or "/"
    if os.path.islink(parent) or not os.path.isdir(parent) or os.path.realpath(parent) != parent:
        raise HookError(f"{path}: {parent} goes through a symbolic link in the container; "
                        f"refusing to create a mount point there")
    if any(parent == f or parent.startswith(f + "/") for f in FORBIDDEN):
        raise HookError(f"{path}: cannot create a mount point under {parent} (the host's)")
    mine = _inside(parent, user_mounts())
    if mine is not None:
        raise HookError(f"{path}: cannot create a mount point inside your mount {mine}; "
                        f"mount it elsewhere")
    if not _writable(parent):
        below = [m for m in _mount_points() if m.startswith(parent.rstrip("/") + "/")]
        if parent == "/" or below:
            raise HookError(f"{path}: cannot create it: {parent} is read-only and has mounts "
                            f"below it")
        _overlay_over(parent)
    for p in reversed(missing[1:]):
        os.mkdir(p, 0o755)
    if is_dir:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))


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
        link = os.path.normpath(link)
        parent = os.path.dirname(link)
        if _inside(link, user_mounts()) is not None:
            raise HookError(f"{link}: inside your mount; the site's hook cannot write there")
        if not os.path.lexists(link):
            ensure_target(parent, True)
            if os.path.realpath(parent) != parent:
                raise HookError(f"{link}: {parent} goes through a symbolic link")
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
