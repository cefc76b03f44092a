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
    return flags_of_statvfs(os.statvfs(path))


def flags_of_statvfs(vfs: os.statvfs_result) -> int:
    """MS_* flags from a statvfs result (os.fstatvfs of a descriptor, too)."""
    return sum(ms for st, ms in _ST_TO_MS if vfs.f_flag & st)


# ---- the new mount API (Linux >= 5.2; mount_setattr >= 5.12) ------------------
# The same syscall numbers on every architecture (allocated after the tables merged).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08
MOUNT_ATTR_IDMAP = 0x00100000
CLONE_NEWUSER = 0x10000000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_tree(dirfd: int, path: PathLike, flags: int) -> int:
    """A detached copy of the mount tree at dirfd/path (OPEN_TREE_CLONE); returns its fd."""
    fd = _libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(dirfd),
                       ctypes.c_char_p(_b(path)), ctypes.c_uint(flags))
    if fd < 0:
        raise _fail(f"open_tree({dirfd}, {os.fsdecode(path)!r})")
    return int(fd)


def move_mount(from_fd: int, from_path: PathLike, to_fd: int, to_path: PathLike,
               flags: int) -> None:
    if _libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(from_fd),
                     ctypes.c_char_p(_b(from_path)), ctypes.c_int(to_fd),
                     ctypes.c_char_p(_b(to_path)), ctypes.c_uint(flags)) != 0:
        raise _fail(f"move_mount({from_fd} -> {to_fd} {os.fsdecode(to_path)!r})")


def mount_setattr(dirfd: int, path: PathLike, flags: int, attr_set: int,
                  propagation: int = 0, userns_fd: int = 0) -> None:
    """Set mount attributes (AT_RECURSIVE: on every mount of the tree, submounts included;
    MOUNT_ATTR_IDMAP: ids through userns_fd's mapping, on a detached tree only)."""
    attr = _MountAttr(attr_set, 0, propagation, userns_fd)
    if _libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(dirfd),
                     ctypes.c_char_p(_b(path)), ctypes.c_uint(flags), ctypes.byref(attr),
                     ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
        raise _fail(f"mount_setattr({dirfd}, {os.fsdecode(path)!r}, {attr_set:#x})")


def have_mount_api() -> bool:
    """Whether this kernel has open_tree/move_mount/mount_setattr (Linux >= 5.12)."""
    attr = _MountAttr(0, 0, 0, 0)
    # an invalid fd: EBADF means the call exists, ENOSYS that it does not
    rc = _libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(-1), ctypes.c_char_p(b""),
                       ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)))
    return not (rc < 0 and ctypes.get_errno() == 38)


# ---- openat2 (Linux >= 5.6) -----------------------------------------------------
_SYS_OPENAT2 = 437  # the same number on every architecture
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
O_PATH = getattr(os, "O_PATH", 0o10000000)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(path: PathLike, flags: int, resolve: int, dirfd: int = AT_FDCWD) -> int:
    """openat2(2) (always O_CLOEXEC); raises OSError with the path."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                       ctypes.c_char_p(_b(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    return int(fd)
