"""Thin ctypes wrappers for the mount-namespace system calls Python <3.12 lacks.

Every wrapper raises OSError(errno, message-with-the-paths) on failure, so a
caller can match on errno and a log line says which path failed. They take no
locks and never log: the namespace code calls them in a freshly forked child
of a multi-threaded process, where only async-signal-safe work is sound.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional, Union

PathLike = Union[str, bytes, "os.PathLike[str]"]

# <linux/mount.h> / <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# umount2 flags
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# statvfs f_flag bits (ST_*) that a bind remount must carry over, or it would
# silently clear them (e.g. make a noexec host directory executable).
_ST_TO_MS = (
    (getattr(os, "ST_RDONLY", 1), MS_RDONLY),
    (getattr(os, "ST_NOSUID", 2), MS_NOSUID),
    (getattr(os, "ST_NODEV", 4), MS_NODEV),
    (getattr(os, "ST_NOEXEC", 8), MS_NOEXEC),
    (getattr(os, "ST_NOATIME", 1024), MS_NOATIME),
    (getattr(os, "ST_NODIRATIME", 2048), MS_NODIRATIME),
    (getattr(os, "ST_RELATIME", 4096), MS_RELATIME),
)

# glibc has no pivot_root() wrapper, so it goes through syscall(2).
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "ppc64": 203,
                   "s390x": 217, "riscv64": 41, "i686": 217, "i386": 217}

try:  # the usual name first: ctypes.util.find_library runs ldconfig (slow, on every step)
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    import ctypes.util
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def _b(value: Optional[PathLike]) -> Optional[bytes]:
    return None if value is None else os.fsencode(value)


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: Optional[PathLike], target: PathLike, fstype: Optional[str] = None,
          flags: int = 0, data: Optional[str] = None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        raise _fail(f"mount {os.fsdecode(source) if source is not None else 'none'} on "
                    f"{os.fsdecode(target)} (type {fstype or '-'}, flags {flags:#x})")


def umount2(target: PathLike, flags: int = 0) -> None:
    if _libc.umount2(_b(target), flags) != 0:
        raise _fail(f"umount {os.fsdecode(target)}")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        raise _fail(f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    if _libc.setns(fd, nstype) != 0:
        raise _fail(f"setns(fd {fd}, {nstype:#x})")


def pivot_root(new_root: PathLike, put_old: PathLike) -> None:
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(38, f"pivot_root: unknown syscall number on {os.uname().machine}")
    if _libc.syscall(ctypes.c_long(nr), ctypes.c_char_p(_b(new_root)),
                     ctypes.c_char_p(_b(put_old))) != 0:
        raise _fail(f"pivot_root({os.fsdecode(new_root)}, {os.fsdecode(put_old)})")


def mount_flags_of(path: PathLike) -> int:
    """The per-mount MS_* flags of the mount holding path (for bind remounts)."""
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS if f_flag & st)
