"""--oci-remap-root's user namespace: 0 inside is the user outside, and nobody else.

Made by a child with the user's own credentials, so that the kernel's limits that follow the
uid (user.max_user_namespaces, kernel.unprivileged_userns_clone) refuse it where they would
refuse the user, and owned by the user, so that the user's tasks may join it (setns as its
owner, plugin/task.c). The child has the daemon's LSM label and seccomp filter, not the
job's: so each task first checks, in its own context, that the user may have a user
namespace with capabilities in it (plugin/task.c), and refuses the step if not. Root writes its maps:
only the user's uid and primary gid, with setgroups denied (dropping a supplementary group
could bypass that group's negative permissions).

The child is a fresh Python started with posix_spawn (the daemon is a threaded gRPC server
and must not fork; the namespace builder calls this too), which escapes a chroot first: the
kernel refuses a new user namespace to a chrooted process (a daemon in a build or test
chroot), and root may leave one.
"""

from __future__ import annotations

import os
import select
import signal
import sys

from . import syscalls as sc

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
_ENTRY = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from ociimage.runtime.userns import child_main; child_main()")
_TIMEOUT = 20.0

#: what the kernel's refusals of a user's new user namespace mean
_REFUSED = {
    28: "user.max_user_namespaces is 0 or reached",  # ENOSPC
    1: "the kernel's policy refuses them to users: kernel.unprivileged_userns_clone, "
       "AppArmor, SELinux, seccomp",  # EPERM
    13: "an LSM refuses them to users, e.g. AppArmor's restrict_unprivileged_userns",  # EACCES
}


class UserNamespaceRefused(OSError):
    """The kernel refused the user a user namespace; str() is the user's one line."""

    def __str__(self) -> str:
        return self.strerror


def refused_message(err: int) -> str:
    why = _REFUSED.get(err) or os.strerror(err)
    return (f"--oci-remap-root: this node does not allow user namespaces ({why}): ask the "
            f"site's admins, or run without --oci-remap-root")


def create(uid: int, gid: int) -> int:
    """A new user namespace owned by uid, mapping 0 to uid/gid only; returns a descriptor of
    it (O_CLOEXEC). UserNamespaceRefused where the kernel refuses the user one."""
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    try:
        pid = os.posix_spawn(sys.executable,
                             [sys.executable, "-I", "-S", "-c", _ENTRY, _PACKAGE_PARENT,
                              str(uid), str(gid)],
                             {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"},
                             file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                                           (os.POSIX_SPAWN_DUP2, out_w, 1)])
    except BaseException:
        for fd in (out_r, out_w, in_r, in_w):
            os.close(fd)
        raise
    os.close(in_r)
    os.close(out_w)
    try:
        answer = b""
        if select.select([out_r], [], [], _TIMEOUT)[0]:
            answer = os.read(out_r, 32)
        if answer[:1] != b"K":
            if answer[:1] != b"E" or not answer[1:].isdigit():  # it never said
                raise UserNamespaceRefused(0, "--oci-remap-root: the process of yours that makes "
                                              "the user namespace was stopped or killed; start "
                                              "the step again")
            raise UserNamespaceRefused(int(answer[1:]), refused_message(int(answer[1:])))
        # Not reaped until below, the child keeps its pid: /proc/<pid> is it. (The user may
        # kill it, or write its maps first: then a write or the open fails, and so does only
        # their own step.)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n"),
                           ("gid_map", f"0 {gid} 1\n")):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(out_r)
        os.close(in_w)
        # the child is the user's: they may have stopped it (SIGSTOP), so it may never see
        # the EOF; root's SIGKILL ends it all the same, and nothing waits on the user
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def idmapped_copy(src: str, userns: int) -> int:
    """A detached copy of the mount at src whose files' owners are seen through userns (the
    image's root becomes the user, root in userns), nosuid,nodev; the caller attaches it
    (move_mount) and closes it."""
    tree = sc.open_tree(sc.AT_FDCWD, src, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC)
    try:
        sc.mount_setattr(tree, "", sc.AT_EMPTY_PATH, sc.MOUNT_ATTR_IDMAP | sc.MOUNT_ATTR_NOSUID
                         | sc.MOUNT_ATTR_NODEV, userns_fd=userns)
    except OSError as e:
        os.close(tree)
        raise UserNamespaceRefused(e.errno, (
            f"--oci-remap-root: this node's kernel cannot map the image's owners (idmapped "
            f"mounts: Linux >= 5.12, and its filesystem's support; {os.strerror(e.errno)}): "
            f"run without --oci-remap-root")) from None
    return tree


def _escape_chroot() -> None:
    """Put this process at its mount namespace's root (as root: a chroot below the cwd, then
    ".." past it; harmless when not chrooted)."""
    os.chdir("/")
    os.chroot("/proc")  # every system has it; the cwd stays outside the new root
    for _ in range(256):
        os.chdir("..")
    os.chroot(".")


def child_main() -> None:  # pragma: no cover - runs in the spawned child
    uid, gid = int(sys.argv[2]), int(sys.argv[3])
    try:
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        _escape_chroot()
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        try:
            sc.unshare(sc.CLONE_NEWUSER)
        except OSError as e:
            os.write(1, b"E%d" % (e.errno or 0))
            os._exit(1)
        os.write(1, b"K")
        while os.read(0, 64):
            pass
    except BaseException:  # noqa: B902 - the parent sees no "K" and says so
        os._exit(1)
    os._exit(0)
