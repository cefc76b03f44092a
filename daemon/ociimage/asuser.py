"""Open and read what a user names, with that user's own credentials.

The daemon is root; a path a user hands it (a bind source, their home, a
`.sqfs` file, a credentials file, the job's working directory) must be
resolved and opened the way the user's own process would, or root's
privileges leak: root follows a symlink into another user's 0700 directory,
ignores ACLs, blocks on a FIFO, and a check-then-use by path races a user
swapping a directory for a symlink in between.

So the lookups happen in a one-shot thread that first becomes the user for
good. Linux credentials belong to threads; glibc's setresuid() changes every
thread of the process, but the raw system calls (setgroups, setresgid,
setresuid, made here with syscall(2)) change only the calling one. That
thread drops every capability with its uid (all three uids non-zero), so the
kernel checks every permission, ACLs included, as for the user's own
process; it opens what it was asked for and exits, never to run anything
else. The descriptors it opened belong to the process (threads share the
descriptor table):

  - `open_paths`: O_PATH descriptors, which the caller mounts from (a
    descriptor cannot be swapped afterwards);
  - `read_files`: the bytes of regular files, size-capped, opened O_NONBLOCK
    (a FIFO or a device is refused, never waited on).

Magic links (/proc/PID/root, /proc/PID/fd/N, ...) are never followed
(openat2 RESOLVE_NO_MAGICLINKS): they would jump into another process's
namespace or file table. The whole lookup has a deadline; a thread stuck on a
hung filesystem is abandoned (and closes what it opens if it ever returns),
and the caller gets a one-line error.

Why a thread and not a forked child: it costs about 0.1 ms, and fork() from a
gRPC handler thread hangs with Debian 13's grpcio (its fork handler waits for
the thread pool to go idle).
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import stat
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from .errors import AccessDenied, NotFound, OciImageError

DEFAULT_TIMEOUT = 10.0
_OK_FD, _OK_DATA = 1, 2  # what a lookup hands back: a descriptor, or a file's bytes

from .runtime.syscalls import (O_PATH, RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS,  # noqa: F401
                               RESOLVE_NO_SYMLINKS, RESOLVE_NO_XDEV, _libc, openat2)


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


# raw syscall numbers (glibc's wrappers would change every thread of the daemon)
_SYS_CREDS = {  # machine: (setgroups, setresuid, setresgid)
    "x86_64": (116, 117, 119), "aarch64": (159, 147, 149), "riscv64": (159, 147, 149),
    "ppc64le": (81, 164, 169), "ppc64": (81, 164, 169), "s390x": (206, 208, 210),
}


def _become_thread(ident: Identity) -> None:
    """This thread only, for good: the user's groups, gid and uid; no capability left."""
    import platform
    nrs = _SYS_CREDS.get(platform.machine())
    if nrs is None:
        raise UserAccessError(f"acting as a user is not implemented on {platform.machine()}")
    setgroups, setresuid, setresgid = nrs
    groups = list(ident.groups) or [ident.gid]
    arr = (ctypes.c_uint * len(groups))(*groups)
    for nr, args in ((setgroups, (ctypes.c_size_t(len(groups)), arr)),
                     (setresgid, tuple(ctypes.c_uint(ident.gid) for _ in range(3))),
                     (setresuid, tuple(ctypes.c_uint(ident.uid) for _ in range(3)))):
        if _libc.syscall(ctypes.c_long(nr), *args) != 0:
            err = ctypes.get_errno()
            raise UserAccessError(f"cannot act as uid {ident.uid}: {os.strerror(err)}")
    if os.geteuid() != ident.uid or os.getegid() != ident.gid:  # this thread's, from the kernel
        raise UserAccessError(f"cannot act as uid {ident.uid}")


def _lookup(kind: int, path: str, limit: int, flags: int) -> Result:
    """One path, in the thread that is the user; errors are results."""
    fd = -1
    try:
        if kind == _OK_FD:
            # openat2 refuses any other flag beside O_PATH (EINVAL)
            fd = openat2(path, flags if flags & O_PATH else flags | os.O_NOCTTY,
                         RESOLVE_NO_MAGICLINKS)
            opened = Opened(fd, os.fstat(fd).st_mode, path)
            fd = -1
            return opened
        fd = openat2(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, RESOLVE_NO_MAGICLINKS)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return AccessDenied(f"{path} is not a regular file")
        data = os.read(fd, limit + 1) if st.st_size <= limit else b""
        if st.st_size > limit or len(data) > limit:
            return AccessDenied(f"{path} is larger than {limit} bytes")
        return data
    except OSError as e:
        return _user_error(e.errno or errno.EIO, path)
    finally:
        if fd >= 0:
            os.close(fd)


def _close_all(results) -> None:
    for r in results:
        if isinstance(r, Opened):
            r.close()


def _run(ident: Identity, kind: int, paths: Sequence[str], limit: int,
         timeout: float, flags: int = O_PATH) -> List[Result]:
    if not paths:
        return []
    lock = threading.Lock()
    box: dict = {"results": [], "abandoned": False}

    def work() -> None:
        try:
            _become_thread(ident)
            for path in paths:
                box["results"].append(_lookup(kind, path, limit, flags))
        except BaseException as e:  # noqa: B902 - reported to the caller
            box["error"] = e
        with lock:
            if box["abandoned"]:  # the caller gave up on us: keep nothing open
                _close_all(box["results"])

    t = threading.Thread(target=work, daemon=True, name=f"as-uid-{ident.uid}")
    t.start()
    t.join(timeout)
    with lock:
        if t.is_alive():
            box["abandoned"] = True
            _close_all(box["results"])
            raise UserAccessError(f"looking up {', '.join(paths)[:200]} as {ident.describe()} "
                                  f"did not finish in {timeout:g} s (a hung filesystem?)")
    if "error" in box:
        _close_all(box["results"])
        err = box["error"]
        raise err if isinstance(err, OciImageError) else UserAccessError(
            f"cannot act as {ident.describe()}: {err}")
    results = box["results"]
    for r in results:
        if isinstance(r, Opened):  # canonical path, read by root (the user may not see /proc/self/fd)
            try:
                r.path = os.readlink(f"/proc/self/fd/{r.fd}")
            except OSError:
                pass
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
