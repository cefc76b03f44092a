"""The shared image cache: the one authority on cache paths, locks, publish and eviction.

Layout under the cache root (a directory on the cluster's shared filesystem)::

    images/sha256-<hex>.sqfs    the flattened root filesystem
    images/sha256-<hex>.json    metadata; its presence is what makes an entry valid
    images/sha256-<hex>.used    empty file whose mtime is the last use (LRU)
    locks/sha256-<hex>.lock     flock per digest, serialises converters across nodes
    locks/cache.lock            short critical sections that span digests (prune)
    tmp/                        work in progress, never read by anyone but its writer
    leases/<node>/<id>.json     who needs which image, and until when

An entry is published by writing the SquashFS and the metadata under tmp/,
fsyncing both, renaming the SquashFS into images/ and the metadata last, then
fsyncing the directory. A reader only trusts an entry whose metadata exists
and whose SquashFS has the recorded size, so a crash at any point leaves
nothing that looks valid. Everything in tmp/ for a digest is garbage once its
lock is held, because only the lock holder writes there.

Lock files are never deleted: removing an flock file while another process
waits on it would let two holders in at once.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import filelock

from .digests import validate_digest
from .errors import CacheError, ConfigError, InUse, NoSpace, NotFound

log = logging.getLogger("ociimage.cache")

LAYOUT_VERSION = 1
DEFAULT_LEASE_TTL = 600.0


def entry_name(digest: str) -> str:
    """File name stem for a digest: 'sha256:ab..' -> 'sha256-ab..' (validated, so path-safe)."""
    algo, _, hexpart = validate_digest(digest).partition(":")
    return f"{algo}-{hexpart}"


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


@dataclass
class Lease:
    id: str
    digest: str
    node: str
    holder: str
    expires: float
    path: Path = field(repr=False, default=Path())

    def to_json(self) -> dict:
        return {"id": self.id, "digest": self.digest, "node": self.node,
                "holder": self.holder, "expires": self.expires}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durably(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


class Cache:
    """A cache directory shared by every node's daemon (and standalone CLI runs)."""

    def __init__(self, root, *, node: Optional[str] = None, lock_poll: float = 0.05):
        self.root = Path(root)
        self.node = node or socket.gethostname()
        self.images = self.root / "images"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"
        self.leases = self.root / "leases"
        self._lock_poll = lock_poll
        # Parsed metadata by digest, keyed on the file's identity: a hit on a hot
        # image costs two stat() calls instead of a read and a JSON parse.
        self._meta_memo: Dict[str, tuple] = {}
        self._touched: Dict[str, float] = {}
        self._lease_lock = threading.Lock()
        try:
            for d in (self.root, self.images, self.locks, self.tmp, self.leases):
                d.mkdir(mode=0o755, parents=True, exist_ok=True)
            marker = self.root / "layout.json"
            if not marker.exists():
                tmp = self.tmp / f"layout.{os.getpid()}.{secrets.token_hex(4)}"
                _write_json_durably(tmp, {"layout": LAYOUT_VERSION})
                os.replace(tmp, marker)
        except PermissionError as e:
            raise ConfigError(f"cache directory {self.root} is not writable: {e.strerror}") from None
        except OSError as e:
            raise ConfigError(f"cannot use cache directory {self.root}: {e.strerror or e}") from None
        layout = json.loads(marker.read_text()).get("layout")
        if layout != LAYOUT_VERSION:
            raise ConfigError(f"cache directory {self.root} has layout {layout}, "
                              f"this version understands {LAYOUT_VERSION}")

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

    def lock(self, digest: str) -> filelock.BaseFileLock:
        """The cross-node lock for one digest (flock on the shared filesystem)."""
        return filelock.FileLock(str(self._lock_path(digest)))

    def acquire(self, digest: str, on_wait: Optional[Callable[[float], None]] = None,
                timeout: Optional[float] = None) -> filelock.BaseFileLock:
        """Acquire the digest's lock, calling on_wait(seconds_waited) about once a second."""
        lk = self.lock(digest)
        start = time.monotonic()
        while True:
            try:
                lk.acquire(timeout=1.0, poll_interval=self._lock_poll)
                return lk
            except filelock.Timeout:
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise CacheError(f"timed out after {waited:.0f}s waiting for the cache lock of {digest}")
                if on_wait:
                    on_wait(waited)

    def check_locking(self) -> None:
        """Fail early on a filesystem where flock does not work (e.g. Lustre without -o flock)."""
        probe = self.locks / f"probe.{self.node}.{os.getpid()}"
        import fcntl
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot create files in {self.locks}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as e:
            raise ConfigError(
                f"file locks do not work in {self.root} ({e.strerror}); on Lustre mount with "
                f"'-o flock', on NFS make sure lockd/NFSv4 locking works") from None
        finally:
            os.close(fd)
            try:
                probe.unlink()
            except OSError:
                pass

    # ---- entries ---------------------------------------------------------

    def get(self, digest: str) -> Optional[CacheEntry]:
        """The valid entry for digest, or None. Never returns a partial entry."""
        meta_path = self.meta_path(digest)
        try:
            mst = meta_path.stat()
            key = (mst.st_ino, mst.st_mtime_ns, mst.st_size)
            memo = self._meta_memo.get(digest)
            if memo and memo[0] == key:
                meta = memo[1]
            else:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                self._meta_memo[digest] = (key, meta)
        except FileNotFoundError:
            self._meta_memo.pop(digest, None)
            return None
        except (OSError, ValueError) as e:
            log.warning("unreadable cache metadata", extra={"digest": digest, "error": str(e)})
            return None
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
        return CacheEntry(digest, sqfs, meta, st.st_size, last_used)

    def touch(self, digest: str, resolution: float = 30.0) -> None:
        """Record a use, for least-recently-used eviction (at most every `resolution` seconds)."""
        now = time.monotonic()
        if now - self._touched.get(digest, -resolution) < resolution:
            return
        self._touched[digest] = now
        p = self._used_path(digest)
        try:
            os.utime(p)
        except FileNotFoundError:
            p.touch()

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
              on_wait: Optional[Callable[[float], None]] = None) -> CacheEntry:
        """Return the entry for digest, producing it once if it is missing.

        producer(tmp_path) writes the SquashFS to tmp_path and returns the
        metadata to store. Concurrent callers on any node wait on the digest's
        lock; all but one then find the entry already published.
        """
        entry = self.get(digest)
        if entry:
            self.touch(digest)
            return entry
        lk = self.acquire(digest, on_wait=on_wait)
        try:
            entry = self.get(digest)
            if entry:
                self.touch(digest)
                return entry
            self._remove_leftovers(digest)
            return self._publish(digest, producer)
        finally:
            lk.release()

    def _tmp_prefix(self, digest: str) -> str:
        return entry_name(digest) + "."

    def _remove_leftovers(self, digest: str) -> None:
        """Under the digest lock: anything in tmp/ or a lone .sqfs is a crashed writer's."""
        for p in self.tmp.glob(self._tmp_prefix(digest) + "*"):
            log.info("removing leftover from an interrupted conversion", extra={"path": str(p)})
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        if not self.meta_path(digest).exists():
            try:
                self.sqfs_path(digest).unlink()
                log.info("removed unpublished image file", extra={"digest": digest})
            except FileNotFoundError:
                pass

    def _publish(self, digest: str, producer: Callable[[Path], dict]) -> CacheEntry:
        stem = f"{self._tmp_prefix(digest)}{self.node}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp_sqfs = self.tmp / (stem + ".sqfs")
        tmp_meta = self.tmp / (stem + ".json")
        try:
            meta = dict(producer(tmp_sqfs))
            _fsync_file(tmp_sqfs)
            os.chmod(tmp_sqfs, 0o644)
            meta["digest"] = digest
            meta["size"] = tmp_sqfs.stat().st_size
            meta.setdefault("created", time.time())
            _write_json_durably(tmp_meta, meta)
            os.chmod(tmp_meta, 0o644)
            os.replace(tmp_sqfs, self.sqfs_path(digest))
            os.replace(tmp_meta, self.meta_path(digest))
            _fsync_dir(self.images)
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

    # ---- removal and eviction -------------------------------------------

    def remove(self, digest: str) -> None:
        """Remove one entry. Refuses (InUse) while a live lease holds it."""
        lk = self.acquire(digest)
        try:
            if not self.meta_path(digest).exists() and not self.sqfs_path(digest).exists():
                raise NotFound(f"image {digest} is not in the cache")
            holders = self.leases_for(digest)
            if holders:
                raise InUse(f"image {digest} is in use by {holders[0].holder} on {holders[0].node}"
                            + (f" and {len(holders) - 1} more" if len(holders) > 1 else ""))
            self._unpublish(digest)
        finally:
            lk.release()

    def _unpublish(self, digest: str) -> None:
        # Metadata first: from that instant the entry is invalid for every reader.
        self._meta_memo.pop(digest, None)
        self._touched.pop(digest, None)
        for p in (self.meta_path(digest), self.sqfs_path(digest), self._used_path(digest)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        _fsync_dir(self.images)

    def prune(self, *, quota: Optional[int] = None, keep: Callable[[str], bool] = lambda d: False,
              ) -> List[CacheEntry]:
        """Evict unleased entries, least recently used first.

        With a quota, stop once the cache is at or under it; without, evict
        every unleased entry. keep(digest) lets callers spare more images
        (e.g. ones that pending Slurm jobs need).
        """
        self.sweep_tmp()
        removed: List[CacheEntry] = []
        entries = sorted(self.list(), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        for e in entries:
            if quota is not None and total <= quota:
                break
            if keep(e.digest):
                continue
            lk = self.lock(e.digest)
            try:
                lk.acquire(timeout=0)
            except filelock.Timeout:
                continue  # being converted or removed by someone else right now
            try:
                if self.leases_for(e.digest) or self.get(e.digest) is None:
                    continue
                self._unpublish(e.digest)
                removed.append(e)
                total -= e.size
                log.info("evicted image", extra={"digest": e.digest, "size": e.size})
            finally:
                lk.release()
        return removed

    def sweep_tmp(self, min_age: float = 3600.0) -> List[Path]:
        """Remove what crashed writers left in tmp/ for digests nobody is building now.

        A conversion's files belong to the holder of its digest's lock, so they
        are garbage whenever that lock can be taken; other temp files (lease and
        layout updates, renamed within milliseconds) once older than min_age.
        """
        removed: List[Path] = []
        now = time.time()
        for p in self.tmp.iterdir():
            name = p.name
            try:
                if name.startswith(("sha256-", "sha512-")):
                    algo, _, rest = name.partition("-")
                    digest = f"{algo}:{rest.split('.', 1)[0]}"
                    validate_digest(digest)
                    lk = self.lock(digest)
                    try:
                        lk.acquire(timeout=0)
                    except filelock.Timeout:
                        continue  # being written right now
                    try:
                        p.unlink()
                    finally:
                        lk.release()
                elif now - p.lstat().st_mtime > min_age:
                    p.unlink()
                else:
                    continue
            except FileNotFoundError:
                continue
            except (OSError, ValueError, Exception) as e:  # noqa: BLE001 - a sweep never fails prune
                log.warning("cannot remove a leftover temp file", extra={"path": str(p),
                                                                         "error": str(e)})
                continue
            removed.append(p)
            log.info("removed a leftover temp file", extra={"path": str(p)})
        return removed

    # ---- leases ----------------------------------------------------------

    def _node_lease_dir(self, node: str) -> Path:
        if not node or "/" in node or node.startswith("."):
            raise CacheError(f"invalid node name {node!r}")
        return self.leases / node

    def add_lease(self, digest: str, holder: str, *, ttl: float = DEFAULT_LEASE_TTL,
                  lease_id: Optional[str] = None) -> Lease:
        """Record that holder needs digest; the entry must exist (checked under its lock)."""
        lease = Lease(lease_id or secrets.token_hex(8), validate_digest(digest), self.node, holder,
                      time.time() + ttl)
        d = self._node_lease_dir(self.node)
        d.mkdir(exist_ok=True)
        lease.path = d / f"{lease.id}.json"
        lk = self.acquire(digest)
        try:
            if self.get(digest) is None:
                raise NotFound(f"image {digest} is not in the cache")
            tmp = self.tmp / f"lease.{self.node}.{lease.id}"
            _write_json_durably(tmp, lease.to_json())
            os.replace(tmp, lease.path)
        finally:
            lk.release()
        return lease

    def renew_lease(self, lease: Lease, ttl: float = DEFAULT_LEASE_TTL) -> None:
        """Extend a lease that still exists; never brings back one dropped meanwhile
        (housekeeping renews from a snapshot while steps are being released)."""
        with self._lease_lock:
            if not lease.path.exists():
                return
            lease.expires = time.time() + ttl
            tmp = self.tmp / f"lease.{self.node}.{lease.id}"
            _write_json_durably(tmp, lease.to_json())
            os.replace(tmp, lease.path)

    def drop_lease(self, lease_or_id) -> None:
        lease_id = lease_or_id.id if isinstance(lease_or_id, Lease) else lease_or_id
        with self._lease_lock:
            try:
                (self._node_lease_dir(self.node) / f"{lease_id}.json").unlink()
            except FileNotFoundError:
                pass

    def iter_leases(self, *, include_expired: bool = False) -> Iterator[Lease]:
        now = time.time()
        for p in self.leases.glob("*/*.json"):
            try:
                data = json.loads(p.read_text())
                lease = Lease(data["id"], data["digest"], data["node"], data["holder"],
                              float(data["expires"]), p)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if include_expired or lease.expires > now:
                yield lease

    def leases_for(self, digest: str) -> List[Lease]:
        return [le for le in self.iter_leases() if le.digest == digest]

    def node_leases(self, node: Optional[str] = None) -> Dict[str, Lease]:
        node = node or self.node
        return {le.id: le for le in self.iter_leases(include_expired=True) if le.node == node}

    def expire_leases(self) -> int:
        """Delete lease files past their expiry (left by dead nodes or steps)."""
        n = 0
        for le in self.iter_leases(include_expired=True):
            if le.expires <= time.time():
                try:
                    le.path.unlink()
                    n += 1
                except FileNotFoundError:
                    pass
        return n
