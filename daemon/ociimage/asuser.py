"""Open and read what a user names, with that user's own credentials.

The daemon is root; a path a user hands it (a bind source, their home, a
`.sqfs` file, a credentials file, the job's working directory) must be
resolved and opened the way the user's own process would, or root's
privileges leak: root follows a symlink into another user's 0700 directory,
ignores ACLs, blocks on a FIFO, and a check-then-use by path races a user
swapping a directory for a symlink in between.

So the lookups happen in a process that is the user: a child of the helper
process (asuser_helper.py), which becomes the user for good (supplementary
groups, gid, uid; no capability left; not dumpable) so that the kernel checks
every permission, ACLs included, as for the user's own process, and hands
back

  - for `open_paths`: descriptors (SCM_RIGHTS), which the caller mounts from
    (a descriptor cannot be swapped afterwards);
  - for `read_files`: the bytes of regular files, size-capped, opened
    O_NONBLOCK (a FIFO or a device is refused, never waited on).

Magic links (/proc/PID/root, /proc/PID/fd/N, ...) are never followed
(openat2 RESOLVE_NO_MAGICLINKS): they would jump into another process's
namespace or file table. Each request has a deadline; a lookup stuck on a hung
filesystem is killed and the caller gets a one-line error.

Why a helper process: no thread of the daemon may ever hold a user's uid
(that user could then signal or trace the daemon), and fork() from the
daemon's gRPC threads hangs with Debian 13's grpcio. The helper is a fresh
single-threaded Python started once with posix_spawn; forking there is cheap
(about a millisecond) and safe.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from . import asuser_helper as helper
from .errors import AccessDenied, InvalidArgument, NotFound, OciImageError
from .runtime.syscalls import (O_PATH, RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS,  # noqa: F401
                               RESOLVE_NO_SYMLINKS, RESOLVE_NO_XDEV, openat2)

DEFAULT_TIMEOUT = 10.0
_OK_FD, _OK_DATA = helper.OK_FD, helper.OK_DATA  # a lookup gives a descriptor, or bytes


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


class _Helper:
    """The daemon's end of the helper: started on first use, started again if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ctrl: Optional[socket.socket] = None
        self._pid = 0

    def start(self) -> None:
        with self._lock:
            if self._ctrl is None:
                self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._pid = helper.spawn(theirs.fileno())
        except OSError as e:
            ours.close()
            raise UserAccessError(f"cannot start the helper that acts as users: {e}") from None
        finally:
            theirs.close()
        self._ctrl = ours

    def send(self, request: bytes, reply_fd: int) -> None:
        self.send_fds(request, [reply_fd])

    def send_fds(self, request: bytes, fds: List[int]) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        with self._lock:
            for attempt in (1, 2):
                if self._ctrl is None:
                    self._start()
                try:
                    self._ctrl.sendmsg([request], anc)
                    return
                except OSError as e:
                    if e.errno not in _HELPER_GONE:
                        raise UserAccessError(f"cannot ask the helper that acts as users: "
                                              f"{e.strerror}") from None
                    self._ctrl.close()
                    self._ctrl = None
                    self._reap_later()
                    if attempt == 2:
                        raise UserAccessError(f"the helper that acts as users is gone: {e}") from None

    def _reap_later(self) -> None:
        """The helper exits on EOF of its control socket; reap it whenever it does."""
        pid, self._pid = self._pid, 0
        if pid:
            threading.Thread(target=_waitpid_quietly, args=(pid,), daemon=True,
                             name="asuser-reaper").start()


_HELPER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)
# What one request may carry: far beyond any real step (a path is at most PATH_MAX),
# well below the control socket's buffer, so a request is never refused by the kernel.
MAX_PATHS = 256
MAX_PATH_BYTES = 4096
MAX_REQUEST_BYTES = 64 << 10


def _waitpid_quietly(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


_helper = _Helper()


def spawn_builder(ops: list, report_w: int, go_r: int) -> None:
    """Have the helper fork a namespace builder for ops (see asuser_helper._build).

    The builder writes "OK <pid> <user namespace fd or -1>" (or "ERR ...") on report_w; bind sources go with the
    request as descriptors (the builder's numbers are not ours)."""
    import marshal
    fds = [report_w, go_r]
    mapped = []
    for op in ops:
        if op[0] == "bindfd":
            fds.append(op[1])
            mapped.append((op[0], len(fds) - 1) + tuple(op[2:]))
        else:
            mapped.append(tuple(op))
    if len(fds) > helper.MAX_FDS:
        raise InvalidArgument(f"too many mounts ({len(fds) - 2})")
    payload = helper.BUILD + marshal.dumps(mapped)
    if len(payload) > MAX_REQUEST_BYTES:
        raise InvalidArgument(f"the step's mounts are too long together ({len(payload)} bytes)")
    _helper.send_fds(payload, fds)


def start_helper() -> None:
    """Start the helper now (the daemon does, so its descriptors are there from the start)."""
    _helper.start()


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> Tuple[bytes, List[int]]:
    buf, fds = b"", []
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            raise TimeoutError
        data, anc, _flags, _addr = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * 4),
                                              socket.MSG_CMSG_CLOEXEC)
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += list(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError
        buf += data
    return buf, fds


def _close_all(results) -> None:
    for r in results:
        if isinstance(r, Opened):
            r.close()


def _result(what: int, err: int, mode: int, fds: List[int], path: str, limit: int) -> Result:
    if what == helper.OK_FD and len(fds) == 1:
        try:
            canonical = os.readlink(f"/proc/self/fd/{fds[0]}")
        except OSError:
            canonical = path
        return Opened(fds[0], mode, canonical)
    for fd in fds:
        os.close(fd)
    if err == helper.NOT_REGULAR:
        return AccessDenied(f"{path} is not a regular file")
    if err == helper.TOO_LARGE:
        return AccessDenied(f"{path} is larger than {limit} bytes")
    return _user_error(err or errno.EIO, path)


def _run(ident: Identity, kind: int, paths: Sequence[str], limit: int,
         timeout: float, flags: int = O_PATH) -> List[Result]:
    if not paths:
        return []
    if len(paths) > MAX_PATHS or any(len(os.fsencode(p)) > MAX_PATH_BYTES for p in paths):
        raise InvalidArgument(f"too many paths ({len(paths)}) or a path longer than "
                              f"{MAX_PATH_BYTES} bytes")
    request = json.dumps({"uid": ident.uid, "gid": ident.gid, "groups": list(ident.groups),
                          "kind": kind, "paths": list(paths), "limit": limit, "flags": flags,
                          "timeout": timeout}).encode("utf-8", "surrogateescape")
    if len(request) > MAX_REQUEST_BYTES:
        raise InvalidArgument(f"the paths to look up are too long together ({len(request)} bytes)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    results: List[Result] = []
    deadline = time.monotonic() + timeout
    try:
        try:
            _helper.send(request, theirs.fileno())
        finally:
            theirs.close()
        for path in paths:
            try:
                hdr, fds = _recv_exact(ours, helper.HDR.size, deadline)
            except TimeoutError:
                raise UserAccessError(
                    f"looking up {path} as {ident.describe()} did not finish in {timeout:g} s "
                    f"(a hung filesystem?)") from None
            except EOFError:
                raise UserAccessError(f"the lookup of {path} as {ident.describe()} "
                                      f"failed") from None
            what, err, mode, length = helper.HDR.unpack(hdr)
            if what == helper.OK_DATA:
                for fd in fds:
                    os.close(fd)
                results.append(_recv_exact(ours, length, deadline)[0] if length else b"")
            else:
                results.append(_result(what, err, mode, fds, path, limit))
    except BaseException:
        _close_all(results)
        raise
    finally:
        ours.close()
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
