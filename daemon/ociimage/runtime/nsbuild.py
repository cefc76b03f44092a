"""The step namespace builder and holder: a process of its own, spawned by the daemon.

The daemon used to os.fork() it from the gRPC handler thread of PrepareStep. With
Debian 13's and unstable's grpcio (1.51.1-6) that never returns: gRPC's pthread_atfork
handler waits for its thread pool to idle ("Waiting for thread pool to idle before
forking"), which it cannot while the handler that forks is running, and every step hung
(slurmd: "timeout waiting for task launch"). GRPC_ENABLE_FORK_SUPPORT=0 does not change
it. posix_spawn() runs no fork handlers, so the builder is now a fresh Python started with
posix_spawn (python -I -S: no site, no user environment), importing only this module and
the syscall wrappers; the operations come on its stdin (marshal: the same interpreter),
and it reports on the same two pipes as before (``report_w``: "OK pid userns-fd" or "ERR idx errno msg"; ``go_r``: the daemon's
go-ahead, or EOF if the daemon died before recording it).
"""

from __future__ import annotations

import marshal
import os
import signal
import sys

from . import syscalls as sc
from . import userns

# the directory holding ociimage/
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
_ENTRY = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from ociimage.runtime.nsbuild import main; main()")


def bind_fds(ops) -> set:
    """The descriptors of the user's bind sources, which the builder must inherit."""
    return {op[1] for op in ops if op[0] == "bindfd"}


def spawn(ops: list, report_w: int, go_r: int) -> int:
    """Start the builder for `ops` (no fork handlers run); returns its pid."""
    ops_r, ops_w = os.pipe()
    passed = (report_w, go_r, *sorted(bind_fds(ops)))
    try:
        for fd in passed:
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
        for fd in passed:
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
        # may have inherited some of its pipes (or bind sources). Ours stay until built.
        lo = 3
        for fd in sorted({report_w, go_r} | bind_fds(ops)):
            os.closerange(lo, fd)
            lo = fd + 1
        os.closerange(lo, os.sysconf("SC_OPEN_MAX"))
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


_NOFOLLOW = sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS


def _open_target(path: str) -> int:
    """A mount point planned as canonical: any symlink on the way now is a swap; refuse it."""
    return sc.openat2(path, sc.O_PATH, _NOFOLLOW)


def _detach_binds(ops: list) -> dict:
    """Before unshare: detached, recursively nosuid,nodev copies of the user's bind sources.

    open_tree() only clones mounts of the caller's own namespace, and the
    descriptors were opened in the daemon's; mount_setattr(AT_RECURSIVE) is the
    only way to reach every submount a recursive bind carries.
    """
    trees = {}
    for i, op in enumerate(ops):
        if op[0] != "bindfd" or op[5]:  # op[5]: legacy (no new mount API)
            continue
        tree = sc.open_tree(op[1], "", sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC |
                            sc.AT_EMPTY_PATH | sc.AT_RECURSIVE)
        attrs = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | (sc.MOUNT_ATTR_RDONLY if op[3] else 0)
        sc.mount_setattr(tree, "", sc.AT_EMPTY_PATH | sc.AT_RECURSIVE, attrs, sc.MS_PRIVATE)
        trees[i] = tree
    return trees


def _bind_legacy(op: tuple) -> None:
    """Without the new mount API: a non-recursive bind of the same file, checked by identity.

    Everything after the reopen goes through descriptors, never the target's path
    again: the user may be swapping directories of theirs on the way to it.
    """
    fd, target, ro, canonical = op[1], op[2], op[3], op[4]
    want = os.fstat(fd)
    again = os.open(canonical, sc.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        got = os.fstat(again)
        if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
            raise OSError(16, f"{canonical} changed while the step started")
        tfd = _open_target(target)
        try:
            sc.mount(f"/proc/self/fd/{again}", f"/proc/self/fd/{tfd}", None, sc.MS_BIND, None)
        finally:
            os.close(tfd)
        top = _open_target(target)  # now the bind's root: the path walk enters the new mount
        try:
            st = os.fstat(top)
            if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                raise OSError(16, f"{target} changed while the step started")
            keep = sc.flags_of_statvfs(os.fstatvfs(top))
            flags = keep | sc.MS_NOSUID | sc.MS_NODEV | (sc.MS_RDONLY if ro else 0)
            sc.mount(None, f"/proc/self/fd/{top}", None, sc.MS_REMOUNT | sc.MS_BIND | flags, None)
            vfs = os.fstatvfs(top)
            if not vfs.f_flag & os.ST_NOSUID or not vfs.f_flag & os.ST_NODEV or \
                    (ro and not vfs.f_flag & os.ST_RDONLY):
                raise OSError(16, f"{target} changed while the step started")
        finally:
            os.close(top)
    finally:
        os.close(again)


def _setattr_legacy(target: str, flags: int) -> None:
    """Without mount_setattr: remount every mount at or below target, one by one."""
    prefix = target.rstrip("/") + "/"
    with open("/proc/self/mountinfo", "rb") as f:
        points = [os.fsdecode(line.split()[4]) for line in f]
    for mp in points:
        mp = mp.replace("\\040", " ")
        if mp == target or mp.startswith(prefix):
            sc.mount(None, mp, None, sc.MS_REMOUNT | sc.MS_BIND | sc.mount_flags_of(mp) | flags, None)


def _idmap(src: str, target: str, ns: int) -> None:
    """The image's mount, its owners seen through the user namespace, attached at target."""
    tree = userns.idmapped_copy(src, ns)
    try:
        tfd = _open_target(target)
        try:
            sc.move_mount(tree, "", tfd, "", sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)
        finally:
            os.close(tfd)
    finally:
        os.close(tree)


def child(ops: list, report_w: int, go_r: int) -> None:
    """In the spawned builder: build the namespace, then hold it; never returns."""
    code = 1
    i = -1
    user_ns = -1
    try:
        trees = _detach_binds(ops)
        sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        for i, op in enumerate(ops):
            kind = op[0]
            if kind == "mount":
                # every target through a descriptor opened without following a symlink:
                # the plan resolved them, and an image (a user's own .sqfs can change
                # under its mount) or a user's directory that changed since fails the step
                # instead of taking root's mount elsewhere
                tfd = _open_target(op[2])
                try:
                    sc.mount(op[1], f"/proc/self/fd/{tfd}", op[3], op[4], op[5])
                finally:
                    os.close(tfd)
            elif kind == "bindfd":
                if i in trees:
                    tfd = _open_target(op[2])
                    try:
                        sc.move_mount(trees[i], "", tfd, "",
                                      sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)
                    finally:
                        os.close(tfd)
                else:
                    _bind_legacy(op)
            elif kind == "setattr":  # ("setattr", target, attrs, legacy flags, name, legacy)
                if op[5]:
                    _setattr_legacy(op[1], op[3])
                else:
                    tfd = _open_target(op[1])
                    try:
                        sc.mount_setattr(tfd, "", sc.AT_EMPTY_PATH | sc.AT_RECURSIVE, op[2])
                    finally:
                        os.close(tfd)
            elif kind == "userns":  # ("userns", uid, gid)
                user_ns = userns.create(op[1], op[2])
            elif kind == "idmap":  # ("idmap", source mount, target)
                _idmap(op[1], op[2], user_ns)
            elif kind == "chown":  # ("chown", path, uid, gid): a directory we made
                pfd = _open_target(os.path.dirname(op[1]))
                try:
                    os.chown(os.path.basename(op[1]), op[2], op[3], dir_fd=pfd,
                             follow_symlinks=False)
                finally:
                    os.close(pfd)
            elif kind in ("mkdir", "mkfile"):
                pfd = _open_target(os.path.dirname(op[1]))
                try:
                    name = os.path.basename(op[1])
                    if kind == "mkdir":
                        try:
                            os.mkdir(name, op[2], dir_fd=pfd)
                        except FileExistsError:
                            pass
                    else:
                        # O_NONBLOCK: a FIFO a task left in a named container must not
                        # hang the builder
                        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW |
                                         os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=pfd))
                finally:
                    os.close(pfd)
            elif kind == "mknod":  # ("mknod", path, mode, rdev, uid, gid): a CDI node
                # in the step's own /dev (an overlay whose upper layer is its tmpfs)
                pfd = _open_target(os.path.dirname(op[1]))
                try:
                    name = os.path.basename(op[1])
                    try:
                        os.unlink(name, dir_fd=pfd)  # the host's node of another device
                    except FileNotFoundError:
                        pass
                    os.mknod(name, op[2], op[3], dir_fd=pfd)
                    os.chown(name, op[4], op[5], dir_fd=pfd, follow_symlinks=False)
                    os.chmod(name, op[2] & 0o7777, dir_fd=pfd)  # not the umask's
                finally:
                    os.close(pfd)
            elif kind == "pivot":
                # pivot_root(".", ".") stacks the old root on the new one, so no
                # put_old directory is needed in a read-only image
                os.chdir(op[1])
                take_namespace_root()
                sc.pivot_root(".", ".")
                sc.umount2(".", sc.MNT_DETACH)
                os.chdir("/")
        i = -1
        for fd in set(trees.values()) | bind_fds(ops):
            os.close(fd)  # the holder must not pin the user's directories
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
        # the user namespace stays open here (never joined: a root process in it could be
        # ptraced by its owner, the user) for the tasks to join: /proc/<pid>/fd/<userns>
        os.write(report_w, b"OK %d %d\n" % (os.getpid(), user_ns))
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
