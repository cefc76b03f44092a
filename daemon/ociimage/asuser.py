"""Open and read what a user names, with that user's own credentials.

The daemon is root; a path a user hands it (a bind source, their home, a
`.sqfs` file, a credentials file, the job's working directory) must be
resolved and opened the way the user's own process would, or root's
privileges leak: root follows a symlink into another user's 0700 directory,
ignores ACLs, blocks on a FIFO, and a check-then-use by path races a user
swapping a directory for a symlink in between.

So the lookups happen in a short-lived forked child that first becomes the
user for good (supplementary groups, gid, uid: setgroups + setresgid +
setresuid, so no capability survives), and the kernel enforces every
permission. The child hands back

  - for `open_paths`: O_PATH descriptors (SCM_RIGHTS over a socketpair), which
    the caller mounts from (a descriptor cannot be swapped afterwards);
  - for `read_files`: the bytes of regular files, size-capped, opened
    O_NONBLOCK (a FIFO or a device is refused, never waited on).

Magic links (/proc/PID/root, /proc/PID/fd/N, ...) are never followed
(openat2 RESOLVE_NO_MAGICLINKS): they would jump into another process's
namespace or file table. The whole exchange has a deadline; a child stuck
on a hung filesystem is killed and the caller gets a one-line error.

A fork of the (multi-threaded) daemon is cheap (about a millisecond) and is
the only way to get a process with another user's credentials without exec:
the child runs nothing but system calls and exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import os
import pwd
import select
import signal
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from .errors import AccessDenied, NotFound, OciImageError

DEFAULT_TIMEOUT = 10.0
_HDR = struct.Struct("=BiiI")  # kind, errno, st_mode, payload length
_OK_FD, _OK_DATA, _ERR = 1, 2, 3
_NOT_REGULAR, _TOO_LARGE = -1, -2  # our own reasons, beside errno values

# <linux/openat2.h>
_SYS_OPENAT2 = 437  # the same number on every architecture (a post-5.x syscall)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(path: Union[str, bytes], flags: int, resolve: int, dirfd: int = -100) -> int:
    """openat2(2); raises OSError. dirfd -100 is AT_FDCWD."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    return int(fd)


class UserAccessError(OciImageError):
    """The helper acting as the user failed as a whole (not one path: those are per result)."""

    grpc_code = "UNAVAILABLE"


@dataclass(frozen=True)
class Identity:
    """Who the child becomes: the job's user, as the kernel will see their tasks."""

    uid: int
    gid: int
    groups: Tuple[int, ...] = ()

    @classmethod
    def of_user(cls, uid: int, gid: Optional[int] = None) -> "Identity":
        """uid with its primary group (or gid, the job's) and supplementary groups from NSS."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            g = uid if gid is None else gid
            return cls(uid, g, (g,))
        g = pw.pw_gid if gid is None else gid
        try:
            groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, g))))
        except OSError:
            groups = (g,)
        return cls(uid, g, groups)

    def describe(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


@dataclass
class Opened:
    """An O_PATH descriptor the user could open, with what the kernel says it is."""

    fd: int
    mode: int
    path: str  # canonical path (from /proc/self/fd), for messages and planning

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _user_error(err: int, path: str) -> OciImageError:
    if err in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"{path} does not exist")
    if err in (errno.EACCES, errno.EPERM):
        return AccessDenied(f"{path}: permission denied")
    if err == errno.ELOOP:
        return AccessDenied(f"{path}: goes through a link that cannot be followed here "
                            f"(/proc/PID/... or too many symbolic links)")
    return OciImageError(f"{path}: {os.strerror(err)}")


Result = Union[Opened, bytes, OciImageError]


def _become(ident: Identity) -> None:
    os.setgroups(list(ident.groups) or [ident.gid])
    os.setresgid(ident.gid, ident.gid, ident.gid)
    os.setresuid(ident.uid, ident.uid, ident.uid)
    if ident.uid != 0 and os.geteuid() == 0:  # belt and braces: never go on as root
        os._exit(99)


def _serve(sock: socket.socket, ident: Identity, kind: int, paths: Sequence[str],
           limit: int, flags: int) -> None:
    """In the child: the user's lookups, one framed reply per path."""
    _become(ident)
    for path in paths:
        fd = -1
        try:
            if kind == _OK_FD:
                # openat2 refuses any other flag beside O_PATH (EINVAL)
                fd = openat2(path, flags if flags & O_PATH else flags | os.O_NOCTTY,
                             RESOLVE_NO_MAGICLINKS)
                st = os.fstat(fd)
                sock.sendmsg([_HDR.pack(_OK_FD, 0, st.st_mode, 0)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
            else:
                fd = openat2(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY,
                             RESOLVE_NO_MAGICLINKS)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    sock.sendall(_HDR.pack(_ERR, _NOT_REGULAR, 0, 0))
                    continue
                data = os.read(fd, limit + 1) if st.st_size <= limit else b""
                if st.st_size > limit or len(data) > limit:
                    sock.sendall(_HDR.pack(_ERR, _TOO_LARGE, 0, 0))
                    continue
                sock.sendall(_HDR.pack(_OK_DATA, 0, st.st_mode, len(data)) + data)
        except OSError as e:
            sock.sendall(_HDR.pack(_ERR, e.errno or errno.EIO, 0, 0))
        finally:
            if fd >= 0:
                os.close(fd)


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> Tuple[bytes, List[int]]:
    buf, fds = b"", []
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            raise TimeoutError
        data, anc, _flags, _addr = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * 4))
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += list(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if not data:
            raise EOFError
        buf += data
    return buf, fds


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return
    if not done:  # stuck in the kernel (a hung filesystem): reap it when it lets go
        threading.Thread(target=lambda: _waitpid_quietly(pid), daemon=True,
                         name="asuser-reaper").start()


def _waitpid_quietly(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _run(ident: Identity, kind: int, paths: Sequence[str], limit: int,
         timeout: float, flags: int = O_PATH) -> List[Result]:
    if not paths:
        return []
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            gc.disable()  # no finalizer of the parent's objects may run here
            parent.close()
            _serve(child, ident, kind, paths, limit, flags)
        except BaseException:  # noqa: B902 - the parent sees EOF and reports it
            code = 1
        finally:
            os._exit(code)
    child.close()
    results: List[Result] = []
    deadline = time.monotonic() + timeout
    try:
        for path in paths:
            try:
                hdr, fds = _recv_exact(parent, _HDR.size, deadline)
            except TimeoutError:
                raise UserAccessError(
                    f"looking up {path} as {ident.describe()} did not finish in {timeout:g} s "
                    f"(a hung filesystem?)") from None
            except EOFError:
                raise UserAccessError(f"the helper looking up {path} as {ident.describe()} "
                                      f"died") from None
            what, err, mode, length = _HDR.unpack(hdr)
            if what == _OK_FD and len(fds) == 1:
                fd = fds[0]
                try:
                    canonical = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    canonical = path
                results.append(Opened(fd, mode, canonical))
            elif what == _OK_DATA:
                for fd in fds:
                    os.close(fd)
                results.append(_recv_exact(parent, length, deadline)[0] if length else b"")
            else:
                for fd in fds:
                    os.close(fd)
                if err == _NOT_REGULAR:
                    results.append(AccessDenied(f"{path} is not a regular file"))
                elif err == _TOO_LARGE:
                    results.append(AccessDenied(f"{path} is larger than {limit} bytes"))
                else:
                    results.append(_user_error(err, path))
    except BaseException:
        for r in results:
            if isinstance(r, Opened):
                r.close()
        raise
    finally:
        parent.close()
        _reap(pid)
    return results


def open_paths(ident: Identity, paths: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
               flags: int = O_PATH) -> List[Union[Opened, OciImageError]]:
    """Descriptors for paths, opened as ident (one result per path, in order).

    flags: O_PATH (default: no read or write access, only a handle to mount
    or look at) or O_RDONLY|O_NONBLOCK for a file to read (a loop device's).

    A path the user cannot reach is an AccessDenied/NotFound *result*, not an
    exception, so the caller decides which failures matter (a missing home is
    a warning, a missing bind source an error). The caller owns the descriptors.
    """
    return _run(ident, _OK_FD, [os.fspath(p) for p in paths], 0, timeout,  # type: ignore[return-value]
                flags)


def read_files(ident: Identity, paths: Sequence[str], limit: int = 1 << 20,
               timeout: float = DEFAULT_TIMEOUT) -> List[Union[bytes, OciImageError]]:
    """The contents of regular files (at most limit bytes each), read as ident."""
    return _run(ident, _OK_DATA, [os.fspath(p) for p in paths], limit, timeout)  # type: ignore[return-value]


def read_file_safely(path: str, limit: int = 1 << 20) -> bytes:
    """A regular file read by this process itself, with the same refusals (no FIFO, cap)."""
    fd = openat2(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, RESOLVE_NO_MAGICLINKS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        data = os.read(fd, limit + 1)
        if len(data) > limit or st.st_size > limit:
            raise OSError(errno.EFBIG, "file too large", path)
        return data
    finally:
        os.close(fd)


__all__ = ["Identity", "Opened", "UserAccessError", "open_paths", "read_files",
           "read_file_safely", "openat2"]
