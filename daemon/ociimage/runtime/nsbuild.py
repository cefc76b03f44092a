"""The step namespace builder and holder: a process of its own, spawned by the daemon.

The daemon used to os.fork() it from the gRPC handler thread of PrepareStep. With
Debian 13's and unstable's grpcio (1.51.1-6) that never returns: gRPC's pthread_atfork
handler waits for its thread pool to idle ("Waiting for thread pool to idle before
forking"), which it cannot while the handler that forks is running, and every step hung
(slurmd: "timeout waiting for task launch"). GRPC_ENABLE_FORK_SUPPORT=0 does not change
it. posix_spawn() runs no fork handlers, so the builder is now a fresh Python started with
posix_spawn (python -I -S: no site, no user environment), importing only this module and
the syscall wrappers; the operations come on its stdin (marshal: the same interpreter),
and it reports on the same two pipes as before (``report_w``: "OK" or "ERR idx errno msg"; ``go_r``: the daemon's
go-ahead, or EOF if the daemon died before recording it).
"""

from __future__ import annotations

import marshal
import os
import signal
import sys

from . import syscalls as sc

# the directory holding ociimage/
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
_ENTRY = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from ociimage.runtime.nsbuild import main; main()")


def spawn(ops: list, report_w: int, go_r: int) -> int:
    """Start the builder for `ops` (no fork handlers run); returns its pid."""
    ops_r, ops_w = os.pipe()
    try:
        for fd in (report_w, go_r):
            os.set_inheritable(fd, True)
        argv = [sys.executable, "-I", "-S", "-c", _ENTRY, _PACKAGE_PARENT, str(report_w), str(go_r)]
        pid = os.posix_spawn(sys.executable, argv,
                             {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"},
                             file_actions=[(os.POSIX_SPAWN_DUP2, ops_r, 0)])
    except BaseException:
        os.close(ops_w)
        raise
    finally:
        os.close(ops_r)
        for fd in (report_w, go_r):
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
    with os.fdopen(ops_w, "wb") as f:
        try:
            f.write(marshal.dumps([tuple(op) for op in ops]))  # the same Python reads it
        except BrokenPipeError:
            pass  # it died at once; the report pipe says so
    return pid


def main() -> None:  # pragma: no cover - runs in the builder process
    report_w, go_r = int(sys.argv[2]), int(sys.argv[3])
    try:
        ops = marshal.loads(sys.stdin.buffer.read())
        # Hold nothing of the daemon's: another step's builder spawned at the same time
        # may have inherited some of its pipes.
        keep = sorted({report_w, go_r})
        lo, hi = keep[0], keep[-1]
        os.closerange(3, lo)
        os.closerange(lo + 1, hi)
        os.closerange(hi + 1, os.sysconf("SC_OPEN_MAX"))
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    except BaseException as e:  # noqa: B902
        try:
            os.write(report_w, f"ERR -1 0 the namespace builder could not start: {e}\n".encode())
        finally:
            os._exit(1)
    child(ops, report_w, go_r)


def take_namespace_root() -> None:
    """Make the namespace's root mount this process's root, keeping the cwd.

    setns(CLONE_NEWNS) puts a task at its namespace's root mount, and
    pivot_root() only replaces that mount when the caller's root is it. When
    the daemon runs chrooted (in a container, or a chroot like a build or test
    system) the two differ, and tasks would land outside the image. A root
    process can leave a chroot: chroot into a directory below the cwd, climb
    with "..", chroot there. Harmless when not chrooted.
    """
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chroot("proc")  # the new root always has /proc (a mountpoint we made)
        for _ in range(256):
            os.chdir("..")
        os.chroot(".")
        os.fchdir(here)
    finally:
        os.close(here)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def child(ops: list, report_w: int, go_r: int) -> None:
    """In the spawned builder: build the namespace, then hold it; never returns."""
    code = 1
    i = -1
    try:
        sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        for i, op in enumerate(ops):
            kind = op[0]
            if kind == "mount":
                sc.mount(op[1], op[2], op[3], op[4], op[5])
            elif kind == "mkdir":
                try:
                    os.mkdir(op[1], op[2])
                except FileExistsError:
                    pass
            elif kind == "mkfile":
                os.close(os.open(op[1], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
            elif kind == "pivot":
                # pivot_root(".", ".") stacks the old root on the new one, so no
                # put_old directory is needed in a read-only image
                os.chdir(op[1])
                take_namespace_root()
                sc.pivot_root(".", ".")
                sc.umount2(".", sc.MNT_DETACH)
                os.chdir("/")
        i = -1
        # Hold the namespace until the daemon (this one or its successor)
        # SIGKILLs us: a session of our own, deaf to the daemon's signals, and a
        # name of our own in ps/top (the command line is still the daemon's).
        os.setsid()
        try:
            with open("/proc/self/comm", "w") as f:
                f.write("oci-ns-holder")
        except OSError:
            pass
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        os.write(report_w, b"OK\n")
        os.close(report_w)
        if os.read(go_r, 1) != b"x":
            os._exit(1)  # the daemon died before recording us: hold nothing for nobody
        os.close(go_r)
        while True:
            signal.pause()
    except BaseException as e:  # noqa: B902 - everything must reach the parent
        err = getattr(e, "errno", 0) or 0
        msg = str(e).replace("\n", " ")[:800]
        try:
            os.write(report_w, f"ERR {i} {err} {msg}\n".encode("utf-8", "replace"))
        except BaseException:
            pass
    finally:
        os._exit(code)
