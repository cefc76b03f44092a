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
before publishing that the claim is still its own, and abandons otherwise. Only
a vanished claim or another token means lost (an EIO or ESTALE says nothing: look
again), and a claim is read before it is moved, so neither a release nor a
takeover ever moves another node's live claim.
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
from typing import Callable, Dict, Optional, Tuple

from .cachefiles import open_private, read_small, write_new
from .errors import CacheError, LockTimeout

log = logging.getLogger("ociimage.cache")

MODES = ("auto", "flock", "claim")
DEFAULT_CLAIM_STALE = 60.0
_CONFLICT = 75  # flock(1)'s exit status on timeout (--conflict-exit-code)

OnWait = Optional[Callable[[float], None]]
Ready = Optional[Callable[[], bool]]


class LockLost(CacheError):
    """This process no longer holds the digest's lock: publish or remove nothing."""


class ClaimLost(LockLost):
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
        self.lost = False

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

    def try_acquire_stale(self, seen: Dict[str, tuple]) -> bool:
        """try_acquire: a dead holder's flock is gone with its process, nothing is stale."""
        return self.try_acquire()

    def check_owned(self) -> None:
        """Raise LockLost unless the flock is still ours: NFSv4 drops it silently when the
        client's lease expired (a network partition), and another node may hold it now.
        Taking it again on the same descriptor succeeds at once while we hold it."""
        if self._fd is None:
            raise CacheError(f"{self.what}: lock not held by this object")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            why = e.strerror
        self.lost = True
        raise LockLost(f"the cache lock of {self.what} was lost ({why}): another node may "
                       f"hold it now (NFSv4 lease expired?)")

    def was_lost(self) -> bool:
        return self.lost

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
        p = select.poll()  # not select(): it fails for descriptors >= 1024 (FD_SETSIZE)
        p.register(pidfd, select.POLLIN)
        p.poll(wait * 1000)
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
            if not self._link(tmp, token):
                return False
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

    def _link(self, tmp: Path, token: str) -> bool:
        """link(tmp, claim): True if the claim is now ours. NFS may retransmit a LINK whose
        reply was lost: the retry then fails (EEXIST, or another error) although the
        first one made the claim, so a failure is checked against our file and token."""
        try:
            os.link(tmp, self.path)
            return True
        except OSError as e:
            try:
                if os.stat(tmp).st_nlink == 2 or self._token_at(self.path) == token:
                    return True
            except OSError:
                pass
            if isinstance(e, FileExistsError):
                return False
            raise

    @staticmethod
    def _token_at(path: Path) -> Optional[str]:
        """The token in a claim file; None if it has none (garbage); OSError if unreadable."""
        try:
            token = json.loads(read_small(path)).get("token")
        except (ValueError, AttributeError):
            return None
        return token if isinstance(token, str) else None

    def _ownership(self) -> Optional[bool]:
        """True: ours. False: gone or another's token (lost). None: could not tell (EIO,
        ESTALE, a timeout on NFS): look again later, a transient error loses nothing."""
        if self._token is None:
            return False
        try:
            return self._token_at(self.path) == self._token
        except FileNotFoundError:
            return False
        except OSError:
            return None

    def owned(self) -> bool:
        return self._ownership() is True

    def check_owned(self) -> None:
        """Raise ClaimLost unless the claim is still ours (before publishing or removing).
        Errors that say nothing (EIO, ESTALE) are retried for a few seconds."""
        deadline = time.monotonic() + min(5.0, self.stale / 4)
        state = None if self.lost else self._ownership()
        while state is None and not self.lost and time.monotonic() < deadline:
            time.sleep(0.2)
            state = self._ownership()
        if state is None and not self.lost:
            raise CacheError(f"cannot read the claim {self.path} to check it is still ours")
        if self.lost or not state:
            self.lost = True
            raise ClaimLost(f"another node took over the conversion of {self.what} "
                            f"([cache] claim_stale = {self.stale:g} s passed without a heartbeat)")

    def was_lost(self) -> bool:
        """Whether the claim was taken over (a failure then is the taker sweeping our files)."""
        if not self.lost and self._token is not None and self._ownership() is False:
            self.lost = True
        return self.lost

    def _remove_if(self, token: Optional[str], sig=None) -> bool:
        """Remove the claim only if it holds token (and, given sig, is unchanged since).

        Checked before touching it, so a live claim of another node is never moved;
        then renamed aside (atomic, unlike reading and unlinking), checked again
        there, and put back if it changed in between."""
        try:
            if self._token_at(self.path) != token or (sig and not self._same(self.path, sig)):
                return False
        except FileNotFoundError:
            return False
        aside = self.tmpdir / f"claim.{self.node}.{os.getpid()}.{secrets.token_hex(8)}.aside"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if self._token_at(aside) == token and (not sig or self._same(aside, sig)):
                return True
            try:
                os.link(aside, self.path)  # not ours to remove: put it back
            except FileExistsError:
                pass  # a new claim is there already; the one we moved is lost to its owner
            return False
        finally:
            os.unlink(aside)

    def _take_over(self, sig) -> bool:
        """Remove a claim that stayed at sig for `stale` seconds (its claimer is dead)."""
        holder = self.holder()
        try:
            token = self._token_at(self.path)
        except OSError:
            return False
        if not self._remove_if(token, sig):
            return False
        log.warning("took over a stale claim", extra={
            "digest": self.what, "holder": holder, "stale": self.stale})
        return True

    def try_acquire_stale(self, seen: Dict[str, tuple]) -> bool:
        """try_acquire, also taking over a claim that `seen` (the caller's memory, kept
        across calls: prune, sweep) saw unchanged for `stale` seconds on this node's
        monotonic clock: the rule waiters use, so a dead claimer blocks nothing forever."""
        key = str(self.path)
        if self.try_acquire():
            seen.pop(key, None)
            return True
        sig, now = self._signature(), time.monotonic()
        if sig is None:
            seen.pop(key, None)
            return self.try_acquire()
        first = seen.get(key)
        if first is None or first[0] != sig:
            seen[key] = (sig, now)
            return False
        if now - first[1] < self.stale or not self._take_over(sig):
            return False
        seen.pop(key, None)
        return self.try_acquire()

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
                if self._take_over(sig):
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
        return (st.st_ino, st.st_mtime_ns) == tuple(sig[:2])

    def keep_alive(self) -> None:
        """Heartbeat (the claim's mtime) every min(5 s, stale/4) until release."""
        interval = min(5.0, self.stale / 4)
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(interval):
                state = self._ownership()
                if state is None:
                    log.warning("cannot read the claim; retrying at the next heartbeat",
                                extra={"digest": self.what})
                    continue
                if not state:
                    self.lost = True
                    log.warning("lost the claim to another node",
                                extra={"digest": self.what, "claim_stale": self.stale})
                    return
                try:
                    os.utime(self.path, follow_symlinks=False)
                except OSError:
                    pass  # gone meanwhile, or a transient error: the next beat finds out

        self._beat = threading.Thread(target=beat, daemon=True, name=f"claim {self.what[:19]}")
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        token, self._token = self._token, None
        if token is None or self.lost:
            return  # taken over: the claim there is the taker's, not ours to remove
        try:
            self._remove_if(token)
        except OSError as e:
            log.warning("cannot remove a claim", extra={"path": str(self.path), "error": str(e)})
