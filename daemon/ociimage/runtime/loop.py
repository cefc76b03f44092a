"""A read-only loop device on an open file, without ever naming the file by path.

mount(8) and losetup(8) take a path and open it again themselves, as root: a
user's own `.sqfs`, opened as the user and checked, could be swapped for a
symlink to another user's image (or a FIFO) in between. Here the loop device
is bound to the descriptor the user's open returned (LOOP_CONFIGURE, or
LOOP_SET_FD + LOOP_SET_STATUS64 before Linux 5.8), checked to be backed by
that very inode, and set to clear itself when its last user goes away
(LO_FLAGS_AUTOCLEAR): once the filesystem on it is unmounted, it is free again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

LOOP_SET_FD = 0x4C00
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), names and key, lo_init[2]
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
_CONFIG_HEAD = struct.Struct("=II")  # fd, block_size; then loop_info64, then u64 __reserved[8]
_ATTEMPTS = 16


@dataclass
class LoopDevice:
    path: str
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _info(flags: int, name: bytes = b"") -> bytes:
    return _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, name[:63], b"", b"", 0, 0)


def _decode_dev(dev: int):
    """The kernel's new_encode_dev() format in loop_info64 -> (major, minor)."""
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def attach(fd: int, ctl_path: str = "/dev/loop-control") -> LoopDevice:
    """A free loop device bound read-only to fd (the caller keeps it open until mounted)."""
    st = os.fstat(fd)
    name = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))[-63:]
    ctl = os.open(ctl_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(_ATTEMPTS):
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            path = f"/dev/loop{n}"
            lfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                config = bytearray(_CONFIG_HEAD.pack(fd, 0)
                                   + _info(LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, name)
                                   + bytes(64))
                try:
                    fcntl.ioctl(lfd, LOOP_CONFIGURE, config)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        os.close(lfd)
                        continue  # another process took it first
                    if e.errno not in (errno.EINVAL, errno.ENOTTY):
                        raise
                    try:  # before Linux 5.8: two steps (read-only follows fd's mode)
                        fcntl.ioctl(lfd, LOOP_SET_FD, fd)
                    except OSError as e2:
                        if e2.errno == errno.EBUSY:
                            os.close(lfd)
                            continue
                        raise
                    fcntl.ioctl(lfd, LOOP_SET_STATUS64,
                                bytearray(_info(LO_FLAGS_AUTOCLEAR, name)))
                got = bytearray(_INFO64.size)
                fcntl.ioctl(lfd, LOOP_GET_STATUS64, got)
                dev, ino = struct.unpack_from("=QQ", got)
                if (_decode_dev(dev), ino) != ((os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino):
                    raise OSError(errno.EIO, f"{path} is not backed by the file opened")
                return LoopDevice(path, lfd)
            except BaseException:
                if lfd >= 0:
                    try:
                        os.close(lfd)
                    except OSError:
                        pass
                raise
        raise OSError(errno.EBUSY, "no loop device could be had")
    finally:
        os.close(ctl)
