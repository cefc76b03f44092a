"""The cache's cross-node digest locks: flock(2) where it is coherent, claim files where not.

Part of cache.py, which owns the paths and decides which kind a digest gets.

FlockLock waits in the kernel, not by polling: the lock file is opened once
and the util-linux `flock` program, started with os.posix_spawn on an
inherited copy of that descriptor, blocks in flock(2). An flock belongs to the
open file description, so when the child gets it and exits the lock is ours.
A waiting node thus makes a handful of calls on the lock file per conversion,
whatever its duration (polling cost ~35/s on Lustre's metadata server). Never
fork(): grpcio's fork handlers hang in a threaded daemon; posix_spawn is safe.

ClaimLock is for shared filesystems whose flock is node-local (Lustre
`localflock`, NFS `nolock`/`local_lock=flock|all`): a claim file made with an
atomic link(2), a heartbeat (its mtime) while the claimer works, and takeover
once a waiter saw no change for `stale` seconds on its own monotonic clock
(no clock is compared across nodes). The claimer checks at every heartbeat and
before publishing that the claim is still its own, and abandons otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import select
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

from .cachefiles import FILE_MODE, open_private, read_small, write_new
from .errors import CacheError, ConfigError, LockTimeout

log = logging.getLogger("ociimage.cache")

MODES = ("auto", "flock", "claim")
DEFAULT_CLAIM_STALE = 60.0
_CONFLICT = 75  # flock(1)'s exit status on timeout (--conflict-exit-code)

OnWait = Optional[Callable[[float], None]]
Ready = Optional[Callable[[], bool]]


class ClaimLost(CacheError):
    """This process's claim was taken over (it looked dead to another node)."""


def _timeout(waited: float, what: str, setting: str, holder: str = "") -> LockTimeout:
    who = f"{holder} holds it" if holder else "another node's oci-imaged holds it"
    return LockTimeout(f"timed out after {waited:.0f} s waiting for the cache lock of {what} "
                       f"({who}; {setting})")


# ---- flock ----------------------------------------------------------------------------------

class FlockLock:
    """An exclusive flock(2) on one lock file, with a deadline; waits without polling."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: Optional[int] = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free now; False if someone holds it."""
        if self._fd is not None:
            raise CacheError(f"{self.what}: lock already held by this object")
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        try:
            if self._flock_nb(fd):
                self._fd, fd = fd, None
                return True
            return False
        finally:
            if fd is not None:
                os.close(fd)

    def _flock_nb(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise CacheError(f"cannot lock {self.path}: {e.strerror}") from None

    def acquire(self, timeout: float, setting: str, on_wait: OnWait = None,
                ready: Ready = None) -> bool:
        """Wait at most timeout seconds (LockTimeout after), on_wait(waited) about once a
        second; if on_wait raises, the wait ends at once with nothing held. True: held
        (ready is for claims; a blocking flock never needs to look)."""
        if self._fd is not None:
            raise CacheError(f"{self.what}: lock already held by this object")
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        try:
            if not self._flock_nb(fd):
                _wait_flock(fd, self.path, timeout, on_wait,
                            lambda waited: _timeout(waited, self.what, setting))
            self._fd, fd = fd, None
            return True
        finally:
            if fd is not None:
                os.close(fd)

    def keep_alive(self) -> None:
        """Nothing to do: the kernel keeps an flock for as long as the descriptor is open."""

    def check_owned(self) -> None:
        """An flock cannot be taken away."""

    def was_lost(self) -> bool:
        return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock


def _flock_program() -> Optional[str]:
    return shutil.which("flock", path="/usr/bin:/bin:/usr/sbin:/sbin")


def _wait_flock(fd: int, path: Path, timeout: float, on_wait: OnWait,
                timed_out: Callable[[float], LockTimeout]) -> None:
    """Block in flock(2) in a posix_spawn'ed flock(1) on our open file description."""
    program = _flock_program()
    start = time.monotonic()
    if program is None:  # no util-linux: poll, but once a second, not 20 times
        log.warning("flock(1) not found: polling the cache lock once a second")
        while True:
            time.sleep(1.0)
            if _try_flock(fd):
                return
            waited = time.monotonic() - start
            if waited >= timeout:
                raise timed_out(waited)
            if on_wait:
                on_wait(waited)
    target = 3 if fd != 3 else 4  # dup2(fd, fd) would leave close-on-exec set
    argv = [program, "--exclusive", "--timeout", f"{max(0.001, timeout):.3f}",
            "--conflict-exit-code", str(_CONFLICT), str(target)]
    pid = os.posix_spawn(program, argv, {"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                         file_actions=[(os.POSIX_SPAWN_DUP2, fd, target)], setsigmask=())
    status = None
    try:
        pidfd = _pidfd(pid)
        try:
            while status is None:
                status = _reap(pid, pidfd, 1.0)
                if status is None:
                    waited = time.monotonic() - start
                    if waited >= timeout + 5:  # flock(1) should have given up by itself
                        raise timed_out(waited)
                    if on_wait:
                        on_wait(waited)
        finally:
            if pidfd is not None:
                os.close(pidfd)
    finally:
        if status is None:  # cancelled or timed out: no child may outlive the wait
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else \
        (os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
    if code == 0:
        return
    if code == _CONFLICT:
        raise timed_out(time.monotonic() - start)
    raise CacheError(f"cannot lock {path}: flock(1) exited {code}")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _pidfd(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)  # Linux 5.3, Python 3.9
    except (AttributeError, OSError):
        return None


def _reap(pid: int, pidfd: Optional[int], wait: float) -> Optional[int]:
    """The child's wait status once it exited within `wait` seconds, else None."""
    if pidfd is not None:
        select.select([pidfd], [], [], wait)
    else:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.05)
    done, status = os.waitpid(pid, os.WNOHANG)
    return status if done else None


# ---- claims ---------------------------------------------------------------------------------

class ClaimLock:
    """A claim file per digest, for filesystems where flock is not coherent across nodes."""

    def __init__(self, path: Path, what: str, tmpdir: Path, node: str,
                 stale: float = DEFAULT_CLAIM_STALE, poll: float = 1.0):
        self.path = Path(path)
        self.what = what
        self.tmpdir = Path(tmpdir)
        self.node = node
        self.stale = stale
        self.poll = poll
        self._token: Optional[str] = None
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        self.lost = False

    def _signature(self) -> Optional[Tuple[int, int, int, int]]:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def holder(self) -> str:
        try:
            data = json.loads(read_small(self.path))
            return f"{data.get('node')} (pid {data.get('pid')})"
        except (OSError, ValueError, AttributeError):
            return ""

    def try_acquire(self) -> bool:
        """Create the claim if there is none (an atomic link(2)); never takes one over."""
        if self._token is not None:
            raise CacheError(f"{self.what}: claim already held by this object")
        token = secrets.token_hex(8)
        tmp = self.tmpdir / f"claim.{self.node}.{os.getpid()}.{token}"
        body = json.dumps({"node": self.node, "pid": os.getpid(), "token": token,
                           "since": time.time()}).encode()
        try:
            write_new(tmp, body)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:
                # NFS may lose the reply of a link that happened: the link count tells
                if os.stat(tmp).st_nlink != 2:
                    raise
        except OSError as e:
            raise CacheError(f"cannot create the claim {self.path}: {e.strerror or e}") from None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._token = token
        self.lost = False
        return True

    def owned(self) -> bool:
        if self._token is None:
            return False
        try:
            return json.loads(read_small(self.path)).get("token") == self._token
        except (OSError, ValueError, AttributeError):
            return False  # gone, replaced or unreadable (ESTALE on NFS): not ours

    def check_owned(self) -> None:
        """Raise ClaimLost unless the claim is still ours (before publishing)."""
        if self.lost or not self.owned():
            self.lost = True
            raise ClaimLost(f"another node took over the conversion of {self.what} "
                            f"([cache] claim_stale = {self.stale:g} s passed without a heartbeat)")

    def was_lost(self) -> bool:
        """Whether the claim was taken over (a failure then is the taker sweeping our files)."""
        if not self.lost and self._token is not None and not self.owned():
            self.lost = True
        return self.lost

    def _remove_if(self, expected: Callable[[Path], bool]) -> bool:
        """Remove the claim only if it is the expected one: renamed aside, checked there, and
        put back if it is not (a rename is atomic; reading first and unlinking is not)."""
        aside = self.tmpdir / f"claim.{self.node}.{os.getpid()}.{secrets.token_hex(8)}.aside"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if expected(aside):
                return True
            try:
                os.link(aside, self.path)  # not ours to remove: put it back
            except FileExistsError:
                pass  # a new claim is there already; the one we moved is lost to its owner
            return False
        finally:
            os.unlink(aside)

    def acquire(self, timeout: float, setting: str, on_wait: OnWait = None,
                ready: Ready = None) -> bool:
        """Take the claim, waiting at most timeout seconds; looks once per poll (<= 1 s).

        True: held. False: ready() said the wait is over (the entry is published).
        A claim unchanged for `stale` seconds, as seen on this node's monotonic
        clock, belonged to a dead claimer and is taken over.
        """
        start = time.monotonic()
        said = start
        seen, seen_at = None, start
        while True:
            if ready is not None and ready():
                return False
            sig = self._signature()
            if sig is None and self.try_acquire():
                return True
            now = time.monotonic()
            if sig is not None and sig != seen:
                seen, seen_at = sig, now
            elif sig is not None and now - seen_at >= self.stale:
                holder = self.holder()
                if self._remove_if(lambda p: self._same(p, sig)):
                    log.warning("took over a stale claim", extra={
                        "digest": self.what, "holder": holder, "stale": self.stale})
                    continue  # and race the others to create a new one
            waited = now - start
            if waited >= timeout:
                raise _timeout(waited, self.what, setting, self.holder())
            if on_wait and now - said >= 1.0:
                said = now
                on_wait(waited)
            time.sleep(min(self.poll, max(0.01, timeout - waited)))

    @staticmethod
    def _same(path: Path, sig) -> bool:
        st = os.stat(path, follow_symlinks=False)
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)[:2] == sig[:2]

    def keep_alive(self) -> None:
        """Heartbeat (the claim's mtime) every min(5 s, stale/4) until release."""
        interval = min(5.0, self.stale / 4)
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(interval):
                if not self.owned():
                    self.lost = True
                    log.warning("lost the claim to another node",
                                extra={"digest": self.what, "claim_stale": self.stale})
                    return
                try:
                    os.utime(self.path, follow_symlinks=False)
                except OSError:
                    pass  # gone meanwhile: the next beat finds out

        self._beat = threading.Thread(target=beat, daemon=True, name=f"claim {self.what[:19]}")
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        token, self._token = self._token, None
        if token is None:
            return

        def ours(p: Path) -> bool:
            try:
                return json.loads(read_small(p)).get("token") == token
            except (OSError, ValueError, AttributeError):
                return False

        try:
            self._remove_if(ours)
        except OSError as e:
            log.warning("cannot remove a claim", extra={"path": str(self.path), "error": str(e)})


# ---- which kind ------------------------------------------------------------------------------

def detect_locking(path, mountinfo=None) -> Tuple[str, str]:
    """("flock" | "claim", why) for the filesystem holding path, from its mount options."""
    from .runtime.mounts import mount_containing
    m = mount_containing(path, mountinfo)
    opts = set(m.options.split(",")) | set(m.super_options.split(","))
    where = f"{m.fstype} at {m.mount_point}"
    if m.fstype in ("nfs", "nfs4"):
        local = {o.split("=", 1)[1] for o in opts if o.startswith("local_lock=")}
        if "nolock" in opts:
            return "claim", f"{where} is mounted nolock: flock is node-local"
        if local & {"flock", "all"}:
            return "claim", f"{where} has local_lock={local.pop()}: flock is node-local"
        return "flock", f"{where} forwards flock to the server"
    if m.fstype == "lustre":
        if "localflock" in opts:
            return "claim", f"{where} is mounted localflock: flock is node-local"
        if "flock" not in opts:
            return "claim", f"{where} is mounted without -o flock"
        return "flock", f"{where} is mounted with -o flock"
    return "flock", f"{where}: flock assumed coherent"


def check_flock(root: Path, probe: Path) -> None:
    """Fail early where flock does not work at all (e.g. Lustre without -o flock)."""
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        raise ConfigError(f"cannot create files in {probe.parent}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as e:
        raise ConfigError(
            f"file locks do not work in {root} ({e.strerror}); set [cache] locking = claim, or "
            f"on Lustre mount with '-o flock', on NFS make sure lockd/NFSv4 locking works"
        ) from None
    finally:
        os.close(fd)
        try:
            probe.unlink()
        except OSError:
            pass
