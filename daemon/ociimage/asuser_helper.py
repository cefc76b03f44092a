"""The process that looks paths up as users, on the daemon's behalf (see asuser.py).

The daemon starts it once, with posix_spawn (a fresh, single-threaded Python:
`python -I -S`, importing nothing but this module and the syscall wrappers),
and sends it one request per SOCK_SEQPACKET message: a small JSON object and,
as SCM_RIGHTS, the socket to answer on. For each request it forks a child —
cheap, and safe here, where no other thread exists (fork() from the daemon's
gRPC threads is not: it hangs with Debian 13's grpcio, and a thread of the
daemon holding a user's uid could be signalled or traced by that user) — that
becomes the user for good (setgroups, setresgid, setresuid; not dumpable, so
the user cannot trace it or read its memory), does the lookups and answers:

    header (kind, errno, st_mode, length) [+ the descriptor | + length bytes]

per path, in order. kind OK_FD carries an O_PATH (or read-only) descriptor,
OK_DATA a regular file's bytes, ERR an errno (or NOT_REGULAR / TOO_LARGE).
A child still running past the request's deadline is killed; this process
ends when the daemon closes its end of the control socket.

The same process forks the step namespace builders ("build" requests: the
operations, marshalled, and as SCM_RIGHTS the report and go-ahead pipes and
the user's bind sources): a fork here costs a millisecond, where spawning a
fresh Python for each step cost tens. The builder stays as the namespace's
holder (runtime/nsbuild.py), a child of this process, reaped when it ends.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import time

from .runtime import syscalls as sc

HDR = struct.Struct("=BiiI")
OK_FD, OK_DATA, ERR = 1, 2, 3
NOT_REGULAR, TOO_LARGE = -1, -2  # our own reasons, beside errno values
MAX_REQUEST = 256 << 10
MAX_FDS = 260  # report + go-ahead pipes and up to 256 bind sources + some
BUILD = b"B"  # first byte of a build request (a lookup request is JSON: "{")
_PR_SET_DUMPABLE = 4

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_ENTRY = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from ociimage.asuser_helper import main; main()")


def spawn(ctrl_fd: int) -> int:
    """Start the helper on ctrl_fd (its end of the control socket); returns its pid."""
    os.set_inheritable(ctrl_fd, True)
    try:
        argv = [sys.executable, "-I", "-S", "-c", _ENTRY, _PACKAGE_PARENT, str(ctrl_fd)]
        return os.posix_spawn(sys.executable, argv,
                              {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"})
    finally:
        os.set_inheritable(ctrl_fd, False)


def _become(uid: int, gid: int, groups) -> None:
    os.setgroups(list(groups) or [gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    sc._libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    if uid != 0 and 0 in os.getresuid():  # never go on as root
        os._exit(99)


def _answer(reply: socket.socket, req: dict) -> None:
    """In the child, as the user: one framed answer per path."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)  # not the daemon's log: nothing of root's stays open as the user
    os.close(devnull)
    _become(req["uid"], req["gid"], req["groups"])
    kind, limit, flags = req["kind"], req["limit"], req["flags"]
    for path in req["paths"]:
        fd = -1
        try:
            if kind == OK_FD:
                # openat2 refuses any other flag beside O_PATH (EINVAL)
                fd = sc.openat2(path, flags if flags & sc.O_PATH else flags | os.O_NOCTTY,
                                sc.RESOLVE_NO_MAGICLINKS)
                st = os.fstat(fd)
                reply.sendmsg([HDR.pack(OK_FD, 0, st.st_mode, 0)],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
                continue
            fd = sc.openat2(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY,
                            sc.RESOLVE_NO_MAGICLINKS)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                reply.sendall(HDR.pack(ERR, NOT_REGULAR, 0, 0))
                continue
            data = os.read(fd, limit + 1) if st.st_size <= limit else b""
            if st.st_size > limit or len(data) > limit:
                reply.sendall(HDR.pack(ERR, TOO_LARGE, 0, 0))
                continue
            reply.sendall(HDR.pack(OK_DATA, 0, st.st_mode, len(data)) + data)
        except OSError as e:
            reply.sendall(HDR.pack(ERR, e.errno or errno.EIO, 0, 0))
        finally:
            if fd >= 0:
                os.close(fd)


def serve(ctrl: socket.socket) -> None:
    children = {}  # pid -> deadline (monotonic): ours until reaped, so never a reused pid
    # a child's exit wakes the loop at once: a killed namespace holder is reaped (gone from
    # /proc) right away, not at the next tick
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        now = time.monotonic()
        wait = min([d - now for d in children.values()] + [1.0])
        readable = select.select([ctrl, wake_r], [], [], max(wait, 0.05))[0]
        if wake_r in readable:
            readable.remove(wake_r)
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
        while True:  # lookups and namespace holders alike
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.pop(pid, None)
        now = time.monotonic()
        for pid, deadline in list(children.items()):
            if now > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)  # stuck (a hung filesystem): the daemon gave up
                except ProcessLookupError:
                    pass
                children[pid] = now + 3600  # killed once; reaped when the kernel lets it go
        if not readable:
            continue
        msg, anc, _flags, _addr = ctrl.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * MAX_FDS))
        if not msg:
            return  # the daemon is gone
        fds = []
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds += list(struct.unpack(f"{usable // 4}i", data[:usable]))
        if msg[:1] == BUILD:
            _build(ctrl, msg[1:], fds)
            continue
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        try:
            req = json.loads(msg)
        except ValueError:
            os.close(fds[0])
            continue
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                ctrl.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _answer(socket.socket(fileno=fds[0]), req)
            except BaseException:  # noqa: B902 - the daemon sees EOF and says so
                code = 1
            finally:
                os._exit(code)
        os.close(fds[0])
        children[pid] = time.monotonic() + float(req.get("timeout", 10)) + 1


def _build(ctrl: socket.socket, payload: bytes, fds: list) -> None:
    """Fork the namespace builder: fds = [report_w, go_r, bind sources...]; the ops name
    bind sources by their index in fds, renumbered here to the descriptors received."""
    import marshal
    from .runtime import nsbuild
    try:
        ops = marshal.loads(payload)
        ops = [(op[0], fds[op[1]]) + tuple(op[2:]) if op[0] == "bindfd" else op for op in ops]
        report_w, go_r = fds[0], fds[1]
    except (ValueError, EOFError, TypeError, IndexError):
        for fd in fds:
            os.close(fd)
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the builder, then the holder
        try:
            ctrl.close()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            lo = 3
            for fd in sorted(set(fds)):
                os.closerange(lo, fd)
                lo = fd + 1
            os.closerange(lo, os.sysconf("SC_OPEN_MAX"))
        except BaseException:  # noqa: B902
            os._exit(1)
        nsbuild.child(ops, report_w, go_r)  # never returns
    for fd in fds:
        os.close(fd)


def main() -> None:  # pragma: no cover - runs in the helper process
    ctrl_fd = int(sys.argv[2])
    # nothing of the daemon's but the control socket (a builder spawned at the same
    # moment may have made some of its descriptors inheritable)
    os.closerange(3, ctrl_fd)
    os.closerange(ctrl_fd + 1, os.sysconf("SC_OPEN_MAX"))
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's terminal is not ours
    serve(socket.socket(fileno=ctrl_fd))
