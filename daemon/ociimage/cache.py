"""The shared image cache: the one authority on cache paths, locks, publish and eviction.

Layout under the cache root (a directory on the cluster's shared filesystem)::

    images/sha256-<hex>.sqfs    the flattened root filesystem
    images/sha256-<hex>.json    metadata; its presence is what makes an entry valid
    images/sha256-<hex>.used    empty file whose mtime is the last use (LRU)
    locks/sha256-<hex>.lock     flock per digest, serialises converters across nodes
    locks/sha256-<hex>.claim    the same where flock is node-local ([cache] locking = claim)
    locking.json                the cluster's lock kind, recorded on first use (cachemode.py)
    tmp/                        work in progress, never read by anyone but its writer
    leases/<node>/alive         the node's heartbeat: its mtime is when its leases expire
    leases/<node>/now           touched to read the file server's time (leases.py)
    leases/<node>/<entry>.<id>.json   who needs which image (leases.py)
    records/<kind>/<name>.json  small shared answers every node reuses (access verdicts,
                                what a tag or index resolved to, Slurm's job list,
                                a conversion's progress for the nodes waiting for it)

An entry is published by writing the SquashFS and the metadata under tmp/,
fsyncing both, renaming the SquashFS into images/ and the metadata last, then
fsyncing the directory. A reader only trusts an entry whose metadata exists
and whose SquashFS has the recorded size, so a crash at any point leaves
nothing that looks valid. Everything in tmp/ for a digest is garbage once its
lock is held, because only the lock holder writes there.

Lock files are never deleted: removing an flock file while another process
waits on it would let two holders in at once. Claim files are (that is how a
claim ends); cachelock.py says why that is safe.

Everything here is root's alone (issue 13): directories are 0700 and files 0600,
created so (mkdir/open modes, a writer's umask), never widened and narrowed
afterwards, so no user can read a private image, its metadata or the leases, or
open a lock file to hold it. `secure()` narrows a cache made by an older
version (0755/0644) once, at daemon start. Every lock wait has a deadline and
ends in LockTimeout, one line naming the lock and the setting.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import eviction
from .cachefiles import (DIR_MODE, FILE_MODE, UMASK, create_private_file, entry_name,  # noqa: F401
                         fsync_dir, fsync_file, narrow_tree, write_json_durably)
from .cachelock import DEFAULT_CLAIM_STALE, MODES, ClaimLock, FlockLock, LockLost
from .cachemode import (agree_mode, check_flock, check_lookupcache, detect_locking,
                        make_layout)
from .errors import CacheError, ConfigError, NoSpace
from .cacherecords import RecordMethods
from .leases import DEFAULT_LEASE_TTL, Lease, LeaseBook, LeaseMethods  # noqa: F401 - API

log = logging.getLogger("ociimage.cache")

LAYOUT_VERSION = 1
#: short critical sections (remove, prune): a wait this long means a stuck peer
DEFAULT_LOCK_TIMEOUT = 60.0
#: waiting for another node's conversion of the same image
DEFAULT_CONVERT_TIMEOUT = 3600.0
#: a builder's progress record is written at most this often, and read by waiters
PROGRESS_WRITE_EVERY = 3.0
PROGRESS_READ_EVERY = 5.0
_BUILD_ATTEMPTS = 3  # a claim taken over from a live-but-stalled claimer: wait, look again


@dataclass
class CacheEntry:
    digest: str
    path: Path
    meta: dict
    size: int
    last_used: float

    @property
    def reference(self) -> str:
        return self.meta.get("reference", "")


class Cache(LeaseMethods, RecordMethods):
    """A cache directory shared by every node's daemon (and standalone CLI runs).

    Its lease methods (add_lease, heartbeat, drop_lease, ...) are in leases.py, its
    shared records (write_record, read_record, ...) in cacherecords.py.
    """

    @classmethod
    def from_config(cls, cfg, root=None) -> "Cache":
        """The cache as [cache] configures it (root: another directory, e.g. --cache-dir)."""
        return cls(Path(root) if root else cfg.cache_dir, node=cfg.node, record_mode=False,
                   lock_timeout=cfg.lock_timeout, convert_timeout=cfg.convert_timeout,
                   locking=cfg.locking, claim_stale=cfg.claim_stale, lease_ttl=cfg.lease_ttl)

    def __init__(self, root, *, node: Optional[str] = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 convert_timeout: float = DEFAULT_CONVERT_TIMEOUT,
                 locking: str = "auto", claim_stale: float = DEFAULT_CLAIM_STALE,
                 claim_poll: float = 1.0, lease_ttl: float = DEFAULT_LEASE_TTL,
                 record_mode: bool = True):
        self.root = Path(root)
        self.lock_timeout = lock_timeout
        self.convert_timeout = convert_timeout
        self.claim_stale = claim_stale
        self._claim_poll = claim_poll
        self.node = node or socket.gethostname()
        self.images = self.root / "images"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"
        self.leases = self.root / "leases"
        self.records = self.root / "records"
        self._book = LeaseBook(self.leases, self.tmp, self.node, lease_ttl)
        # Parsed metadata by digest, keyed on the file's identity: a hit on a hot
        # image costs two stat() calls instead of a read and a JSON parse.
        self._meta_memo: Dict[str, tuple] = {}
        self._touched: Dict[str, float] = {}
        # digest -> progress state, for the conversions this process runs (note_progress)
        self._building: Dict[str, dict] = {}
        make_layout(self.root, self.tmp, LAYOUT_VERSION,
                    (self.root, self.images, self.locks, self.tmp, self.leases, self.records))
        if locking not in MODES:
            raise ConfigError(f"[cache] locking = {locking}: must be one of {', '.join(MODES)}")
        if locking == "auto":
            self.locking, self.locking_reason = detect_locking(self.root)
        else:
            self.locking, self.locking_reason = locking, "[cache] locking"
        # a recorded mode is always checked; from_config (daemon, CLI) records none here:
        # the daemon does after its mount checks (check_locking), a CLI run never does
        agree_mode(self.root, self.tmp, self.locking, self.locking_reason, self.node,
                   record=record_mode)
        #: claim path -> (signature, first seen): prune and sweep take over dead claims
        self._claims_seen: Dict[str, tuple] = {}

    def secure(self) -> int:
        """Narrow a cache made by an older version (0755 dirs, 0644 files) to root's alone
        (cachefiles.narrow_tree); how many entries were narrowed."""
        return narrow_tree(self.root)

    # ---- paths -----------------------------------------------------------

    def sqfs_path(self, digest: str) -> Path:
        return self.images / (entry_name(digest) + ".sqfs")

    def meta_path(self, digest: str) -> Path:
        return self.images / (entry_name(digest) + ".json")

    def _used_path(self, digest: str) -> Path:
        return self.images / (entry_name(digest) + ".used")

    def _lock_path(self, digest: str) -> Path:
        return self.locks / (entry_name(digest) + ".lock")

    # ---- locks -----------------------------------------------------------

    def _claim_path(self, digest: str) -> Path:
        return self.locks / (entry_name(digest) + ".claim")

    def lock(self, digest: str):
        """The cross-node lock for one digest, not yet taken: an flock on the shared
        filesystem, or a claim file where flock is not coherent ([cache] locking)."""
        if self.locking == "claim":
            return ClaimLock(self._claim_path(digest), digest, self.tmp, self.node,
                             stale=self.claim_stale, poll=self._claim_poll)
        return FlockLock(self._lock_path(digest), digest)

    def _limit(self, timeout: Optional[float], converting: bool):
        if timeout is not None:
            return timeout, "timeout"
        if converting:
            return self.convert_timeout, f"[cache] convert_timeout = {self.convert_timeout:g}"
        return self.lock_timeout, f"[cache] lock_timeout = {self.lock_timeout:g}"

    def acquire(self, digest: str, on_wait: Optional[Callable[[float], None]] = None,
                timeout: Optional[float] = None, *, converting: bool = False):
        """Acquire the digest's lock, calling on_wait(seconds_waited) about once a second.

        The deadline is timeout, else [cache] convert_timeout when the caller waits
        for another node's conversion (converting=True), else [cache] lock_timeout:
        a peer holds the lock only for a conversion or a short critical section,
        so a longer wait is a stuck node and must end in one line, not a hang.
        """
        lk = self.lock(digest)
        lk.acquire(*self._limit(timeout, converting), on_wait)
        return lk

    def check_locking(self, mountinfo=None) -> None:
        """At daemon start: refuse NFS without lookupcache=positive (cachemode.py), fail
        early where flock does not work (e.g. Lustre without -o flock; claim mode needs
        none), then record the mode if none is: never a mode this node cannot use."""
        check_lookupcache(self.root, mountinfo)
        if self.locking != "claim":
            check_flock(self.root, self.locks / f"probe.{self.node}.{os.getpid()}")
        agree_mode(self.root, self.tmp, self.locking, self.locking_reason, self.node)

    # ---- entries ---------------------------------------------------------

    def get(self, digest: str, *, known_only: bool = False) -> Optional[CacheEntry]:
        """The valid entry for digest, or None. Never returns a partial entry.

        known_only (the hot path): one stat of the metadata, the entry's commit point
        (published after its image, hidden before it is removed); an unchanged one
        answers with the entry this daemon last validated, else None without more I/O.
        """
        meta_path = self.meta_path(digest)
        try:
            mst = meta_path.stat()
            key = (mst.st_ino, mst.st_mtime_ns, mst.st_size)
            memo = self._meta_memo.get(digest)
            if memo and memo[0] == key:
                if known_only:
                    return memo[2]
                meta = memo[1]
            elif known_only:
                return None
            else:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self._meta_memo.pop(digest, None)
            return None
        except (OSError, ValueError) as e:
            log.warning("unreadable cache metadata", extra={"digest": digest, "error": str(e)})
            return None
        self._meta_memo[digest] = (key, meta, None)
        sqfs = self.sqfs_path(digest)
        try:
            st = sqfs.stat()
        except FileNotFoundError:
            return None
        if st.st_size != meta.get("size"):
            log.warning("cache entry size mismatch, ignoring it",
                        extra={"digest": digest, "size": st.st_size, "expected": meta.get("size")})
            return None
        try:
            last_used = self._used_path(digest).stat().st_mtime
        except FileNotFoundError:
            last_used = st.st_mtime
        entry = CacheEntry(digest, sqfs, meta, st.st_size, last_used)
        self._meta_memo[digest] = (key, meta, entry)
        return entry

    def touch(self, digest: str, resolution: float = 30.0) -> None:
        """Record a use, for least-recently-used eviction (at most every `resolution` seconds)."""
        if self.use_due(digest, resolution):
            self.record_use(digest)

    def use_due(self, digest: str, resolution: float = 30.0) -> bool:
        """Whether a use of digest is to be recorded now (memory only); marks it done."""
        now = time.monotonic()
        if now - self._touched.get(digest, -resolution) < resolution:
            return False
        self._touched[digest] = now
        return True

    def record_use(self, digest: str) -> None:
        """Mark the entry used now. Best effort: on a read-only or stale cache the use goes
        unrecorded (logged), and whatever the caller was answering stands."""
        p = self._used_path(digest)
        try:
            try:
                os.utime(p)
            except FileNotFoundError:
                try:
                    create_private_file(p)
                except FileExistsError:
                    pass
        except OSError as e:
            log.warning("cannot record an image's use", extra={"digest": digest,
                                                               "error": str(e)})

    def list(self) -> List[CacheEntry]:
        out = []
        for meta in sorted(self.images.glob("*.json")):
            algo, _, hexpart = meta.stem.partition("-")
            try:
                entry = self.get(f"{algo}:{hexpart}")
            except Exception:  # a foreign file in images/ must not break listing
                continue
            if entry:
                out.append(entry)
        return out

    def total_size(self) -> int:
        return sum(e.size for e in self.list())

    def build(self, digest: str, producer: Callable[[Path], dict], *,
              on_wait: Optional[Callable[[float, Optional[dict]], None]] = None) -> CacheEntry:
        """Return the entry for digest, producing it once per cluster if it is missing.

        producer(tmp_path) writes the SquashFS to tmp_path and returns the
        metadata to store. Concurrent callers on any node wait on the digest's
        lock or claim; all but one then find the entry already published. A
        waiter's on_wait(waited, builder) runs about once a second; builder is
        the converter's progress record (note_progress) or None, re-read at
        most every PROGRESS_READ_EVERY seconds. on_wait may raise to cancel.
        """
        entry = self.get(digest)
        if entry:
            self.touch(digest)
            return entry
        builder: Optional[dict] = None
        read_at = -PROGRESS_READ_EVERY

        def waiting(waited: float) -> None:
            nonlocal builder, read_at
            if on_wait is None:
                return
            if time.monotonic() - read_at >= PROGRESS_READ_EVERY:
                read_at = time.monotonic()
                builder = self.read_record("progress", entry_name(digest))
            on_wait(waited, builder)

        for _attempt in range(_BUILD_ATTEMPTS):
            lk = self.lock(digest)
            if not lk.acquire(*self._limit(None, True), waiting,
                              lambda: self.get(digest) is not None):
                entry = self.get(digest)  # a claim waiter saw it published
                if entry:
                    self.touch(digest)
                    return entry
                continue
            try:
                entry = self.get(digest)
                if entry:
                    self.touch(digest)
                    return entry
                lk.keep_alive()
                self._remove_leftovers(digest)
                entry = self.get(digest)  # a crashed remover's metadata went back
                if entry:
                    self.touch(digest)
                    return entry
                self._building[digest] = {"pid": os.getpid(), "written": -PROGRESS_WRITE_EVERY}
                self.note_progress(digest, "start", 0, 0)
                return self._publish(digest, producer, lk)
            except Exception as e:
                # the taker swept our temp files, so a lost claim shows as any failure
                if not isinstance(e, LockLost) and not lk.was_lost():
                    raise
                log.warning("abandoned a conversion: another node took it over",
                            extra={"digest": digest, "error": str(e)})
            finally:
                if self._building.pop(digest, None) is not None:
                    self.remove_record("progress", entry_name(digest))
                lk.release()
        raise CacheError(f"lost the claim on {digest} {_BUILD_ATTEMPTS} times; is [cache] "
                         f"claim_stale = {self.claim_stale:g} shorter than a node's stalls?")

    def note_progress(self, digest: str, phase: str, done: int, total: int) -> None:
        """Publish how far this process's conversion of digest is, for the nodes waiting for
        it. Cheap: a no-op unless this process builds digest, a write at most every
        PROGRESS_WRITE_EVERY seconds. Call it from the producer's progress reporter."""
        state = self._building.get(digest)
        if state is None or state["pid"] != os.getpid():
            return
        now = time.monotonic()
        if now - state["written"] < PROGRESS_WRITE_EVERY:
            return
        state["written"] = now
        try:
            self.write_record("progress", entry_name(digest), {
                "node": self.node, "pid": os.getpid(), "phase": str(phase), "done": int(done),
                "total": int(total), "updated": time.time()})
        except CacheError as e:  # progress is a courtesy; never fail a conversion over it
            log.debug("cannot write a progress record", extra={"error": str(e)})

    def _tmp_prefix(self, digest: str) -> str:
        return entry_name(digest) + "."

    def _remove_leftovers(self, digest: str) -> None:
        """Under the digest lock: anything in tmp/ for digest is a crashed writer's (a
        conversion's files; metadata a crashed remove had put aside goes back if its
        image is whole, eviction.put_back_hidden). A lone .sqfs in
        images/ is left alone: "no metadata" may be a stale negative lookup of an entry
        another node just published (on NFS deleting it would make it ESTALE for the
        nodes using it); our publish overwrites it, and prune removes old lone ones."""
        for p in self.tmp.glob(self._tmp_prefix(digest) + "*"):
            if p.name.endswith(".hidden"):  # a crashed remover's: put back if whole
                eviction.put_back_hidden(self, digest, p)
                continue
            log.info("removing leftover from an interrupted conversion", extra={"path": str(p)})
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _publish(self, digest: str, producer: Callable[[Path], dict], lk) -> CacheEntry:
        stem = f"{self._tmp_prefix(digest)}{self.node}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp_sqfs = self.tmp / (stem + ".sqfs")
        tmp_meta = self.tmp / (stem + ".json")
        try:
            # 0600 before the producer writes a byte: Python writers (open "wb"),
            # downloads and tar2sqfs --force truncate it and keep the mode; the
            # SquashFS writer also runs with UMASK (SquashOptions.umask).
            create_private_file(tmp_sqfs)
            meta = dict(producer(tmp_sqfs))
            fsync_file(tmp_sqfs)
            st = os.lstat(tmp_sqfs)
            if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
                # never chmod a file others may already have opened: refuse it
                raise CacheError(f"the image written for {digest} is mode "
                                 f"{stat.S_IMODE(st.st_mode):o}, not {FILE_MODE:o}: not publishing it")
            meta["digest"] = digest
            meta["size"] = st.st_size
            meta.setdefault("created", time.time())
            write_json_durably(tmp_meta, meta)
            lk.check_owned()  # a lock lost or claim taken over meanwhile: publish nothing
            os.replace(tmp_sqfs, self.sqfs_path(digest))
            os.replace(tmp_meta, self.meta_path(digest))
            fsync_dir(self.images)
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise NoSpace(f"the image cache {self.root} is full; free space or lower the quota") from None
            raise CacheError(f"cannot write to the image cache {self.root}: {e.strerror or e}") from None
        finally:
            for p in (tmp_sqfs, tmp_meta):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        self.touch(digest)
        entry = self.get(digest)
        if entry is None:
            raise CacheError(f"published {digest} but cannot read it back from {self.root}")
        return entry

    def import_file(self, digest: str, src: Path, meta: dict) -> CacheEntry:
        """Publish an existing SquashFS file (copied, never moved) under digest."""
        import shutil

        def producer(tmp: Path) -> dict:
            shutil.copyfile(src, tmp)
            return meta

        return self.build(digest, producer)

    # ---- removal and eviction (eviction.py) --------------------------------

    def _hidden_path(self, digest: str) -> Path:
        """Where remove/prune put the metadata aside: tmp/, so that a crash leaves it as the
        digest's leftover (swept under its lock like a conversion's files)."""
        return self.tmp / f"{self._tmp_prefix(digest)}{self.node}.{os.getpid()}." \
                          f"{secrets.token_hex(4)}.hidden"

    def _await_removal(self, digest: str) -> bool:
        """A lease was just written and the entry looked absent: if a remove or prune has its
        metadata aside right now, wait (at most lock_timeout) for its verdict, which sees
        the lease and puts the entry back, or was made before it. True: the entry is there.
        Only in that race: a tight prune loop must not starve a step's lease."""
        hidden = self._tmp_prefix(digest) + "*.hidden"
        deadline = time.monotonic() + self.lock_timeout
        while any(True for _ in self.tmp.glob(hidden)) and time.monotonic() < deadline:
            if self.get(digest) is not None:
                return True
            time.sleep(0.02)
        return self.get(digest) is not None

    def remove(self, digest: str) -> None:
        """Remove one entry. Refuses (InUse) while a live lease holds it."""
        eviction.remove(self, digest)

    def prune(self, *, quota: Optional[int] = None, keep: Callable[[str], bool] = lambda d: False,
              ) -> List[CacheEntry]:
        """Evict unleased entries, least recently used first (see eviction.prune)."""
        return eviction.prune(self, quota=quota, keep=keep)

    def sweep_tmp(self, min_age: float = 3600.0) -> List[Path]:
        """Remove what crashed writers left in tmp/ (see eviction.sweep_tmp)."""
        return eviction.sweep_tmp(self, min_age)

    def forget(self, digest: str) -> None:
        """Drop what this object remembers of an entry (it is being removed)."""
        self._meta_memo.pop(digest, None)
        self._touched.pop(digest, None)
