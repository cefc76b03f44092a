"""The shared image cache: the one authority on cache paths, locks, publish and eviction.

Layout under the cache root (a directory on the cluster's shared filesystem)::

    images/sha256-<hex>.sqfs    the flattened root filesystem
    images/sha256-<hex>.json    metadata; its presence is what makes an entry valid
    images/sha256-<hex>.used    empty file whose mtime is the last use (LRU)
    locks/sha256-<hex>.lock     flock per digest, serialises converters across nodes
    locks/cache.lock            short critical sections that span digests (prune)
    tmp/                        work in progress, never read by anyone but its writer
    leases/<node>/<id>.json     who needs which image, and until when
    records/<kind>/<name>.json  small shared answers every node reuses (access verdicts,
                                what a tag or index resolved to, Slurm's job list)

An entry is published by writing the SquashFS and the metadata under tmp/,
fsyncing both, renaming the SquashFS into images/ and the metadata last, then
fsyncing the directory. A reader only trusts an entry whose metadata exists
and whose SquashFS has the recorded size, so a crash at any point leaves
nothing that looks valid. Everything in tmp/ for a digest is garbage once its
lock is held, because only the lock holder writes there.

Lock files are never deleted: removing an flock file while another process
waits on it would let two holders in at once.

Everything here is root's alone (issue 13): directories are 0700 and files 0600,
created so (mkdir/open modes, a writer's umask), never widened and narrowed
afterwards, so no user can read a private image, its metadata or the leases, or
open a lock file to hold it. `secure()` narrows a cache made by an older
version (0755/0644) once, at daemon start. Every lock wait has a deadline and
ends in LockTimeout, one line naming the lock and the setting.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import stat
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from .digests import validate_digest
from .errors import CacheError, ConfigError, InUse, LockTimeout, NoSpace, NotFound

log = logging.getLogger("ociimage.cache")

LAYOUT_VERSION = 1
DEFAULT_LEASE_TTL = 600.0
#: short critical sections (lease, remove): a wait this long means a stuck peer
DEFAULT_LOCK_TIMEOUT = 60.0
#: waiting for another node's conversion of the same image
DEFAULT_CONVERT_TIMEOUT = 3600.0

#: modes of everything the cache creates, and the umask its writers run with
DIR_MODE = 0o700
#: kinds and names of shared records (path-safe by construction)
_RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
FILE_MODE = 0o600
UMASK = 0o077


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


class FlockLock:
    """An exclusive flock(2) on one lock file, with a deadline.

    Replaces filelock (3.9 creates lock files 0777 less the umask, 0755 under the
    usual 022, so any user could open one and hold a shared lock forever). The file is opened
    once, 0600 with O_NOFOLLOW, and polled with a non-blocking flock on that one
    descriptor: on Lustre every open is a metadata-server request.
    """

    def __init__(self, path: Path, what: str, poll: float = 0.05):
        self.path = Path(path)
        self.what = what
        self.poll = poll
        self._fd: Optional[int] = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free now; False if someone holds it."""
        if self._fd is not None:
            raise CacheError(f"{self.what}: lock already held by this object")
        fd = _open_private(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise CacheError(f"cannot lock {self.path}: {e.strerror}") from None
        self._fd = fd
        return True

    def acquire(self, timeout: float, setting: str,
                on_wait: Optional[Callable[[float], None]] = None) -> "FlockLock":
        """Wait at most timeout seconds (LockTimeout after), on_wait(waited) about once a second."""
        if self._fd is not None:
            raise CacheError(f"{self.what}: lock already held by this object")
        fd = _open_private(self.path, os.O_RDWR | os.O_CREAT)
        start = time.monotonic()
        said = start
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._fd, fd = fd, None
                    return self
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise CacheError(f"cannot lock {self.path}: {e.strerror}") from None
                now = time.monotonic()
                if now - start >= timeout:
                    raise LockTimeout(f"timed out after {now - start:.0f} s waiting for the cache "
                                      f"lock of {self.what} (another node's oci-imaged holds it; "
                                      f"{setting})")
                if on_wait and now - said >= 1.0:
                    said = now
                    on_wait(now - start)
                time.sleep(min(self.poll, max(0.0, timeout - (now - start))))
        finally:
            if fd is not None:
                os.close(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock


def _open_private(path: Path, flags: int) -> int:
    """open(2) a cache file as root's alone: created 0600, never through a symlink."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        raise CacheError(f"cannot open {path}: {e.strerror}") from None


def create_private_file(path: Path) -> None:
    """Create an empty file 0600 (the producer then writes it, keeping the mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    os.close(fd)


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
    # 0600 from the start: O_TRUNC on an existing temp file keeps its (0600) mode.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


class Cache:
    """A cache directory shared by every node's daemon (and standalone CLI runs)."""

    def __init__(self, root, *, node: Optional[str] = None, lock_poll: float = 0.05,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 convert_timeout: float = DEFAULT_CONVERT_TIMEOUT):
        self.root = Path(root)
        self.lock_timeout = lock_timeout
        self.convert_timeout = convert_timeout
        self.node = node or socket.gethostname()
        self.images = self.root / "images"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"
        self.leases = self.root / "leases"
        self.records = self.root / "records"
        self._lock_poll = lock_poll
        # Parsed metadata by digest, keyed on the file's identity: a hit on a hot
        # image costs two stat() calls instead of a read and a JSON parse.
        self._meta_memo: Dict[str, tuple] = {}
        self._touched: Dict[str, float] = {}
        self._lease_lock = threading.Lock()
        try:
            for d in (self.root, self.images, self.locks, self.tmp, self.leases, self.records):
                d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
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

    def secure(self) -> int:
        """Narrow a cache made by an older version (0755 dirs, 0644 files) to root's alone.

        The root directory first: from that instant no user can open anything
        below it by path, whatever the modes further down. Then every directory
        and file below (symlinks are never followed). Returns how many entries
        were narrowed. A descriptor a user opened before this keeps working until
        closed: which is why every lock wait has a deadline.
        """
        changed = 0

        def narrow(path: str, st: os.stat_result, mode: int) -> None:
            nonlocal changed
            if stat.S_IMODE(st.st_mode) & ~mode:
                # path is no symlink (lstat said so) and no user could have replaced
                # it since: the directories above were root's (0755) all along
                os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
                changed += 1
            if st.st_uid != 0 and os.geteuid() == 0:
                log.warning("cache file not owned by root", extra={"path": path, "uid": st.st_uid})

        try:
            narrow(str(self.root), os.lstat(self.root), DIR_MODE)
            for top, dirs, files in os.walk(self.root, followlinks=False):
                for name in dirs + files:
                    path = os.path.join(top, name)
                    st = os.lstat(path)
                    if stat.S_ISDIR(st.st_mode):
                        narrow(path, st, DIR_MODE)
                    elif stat.S_ISREG(st.st_mode):
                        narrow(path, st, FILE_MODE)
        except OSError as e:
            raise ConfigError(f"cannot make the cache directory {self.root} root-only: "
                              f"{e.strerror or e}") from None
        if changed:
            log.warning("made the image cache root-only (left by an older version)",
                        extra={"cache": str(self.root), "narrowed": changed})
        return changed

    # ---- paths -----------------------------------------------------------

    def sqfs_path(self, digest: str) -> Path:
        return self.images / (entry_name(digest) + ".sqfs")

    def meta_path(self, digest: str) -> Path:
        return self.images / (entry_name(digest) + ".json")

    def _used_path(self, digest: str) -> Path:
        return self.images / (entry_name(digest) + ".used")

    def _lock_path(self, digest: str) -> Path:
        return self.locks / (entry_name(digest) + ".lock")

    # ---- shared records ---------------------------------------------------

    def _record_path(self, kind: str, name: str) -> Path:
        for part in (kind, name):
            if not _RECORD_NAME.fullmatch(part or ""):
                raise CacheError(f"invalid record name {kind!r}/{name!r}")
        return self.records / kind / f"{name}.json"

    def write_record(self, kind: str, name: str, data: dict) -> None:
        """Publish a small answer for every node: written aside, then renamed into place.

        Not fsynced: a record only saves asking again (the registry, Slurm), so a
        crash may lose one but never leaves half of one for a reader.
        """
        path = self._record_path(kind, name)
        path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        tmp = self.tmp / f"record.{kind}.{name}.{self.node}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         FILE_MODE)
            with open(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise CacheError(f"cannot write {path}: {e.strerror or e}") from None

    def read_record(self, kind: str, name: str) -> Optional[dict]:
        """The record, or None when there is none (or it cannot be read: ask again)."""
        path = self._record_path(kind, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            with open(fd, "r", encoding="utf-8") as f:
                data = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def remove_record(self, kind: str, name: str) -> None:
        try:
            self._record_path(kind, name).unlink()
        except FileNotFoundError:
            pass

    # ---- locks -----------------------------------------------------------

    def lock(self, digest: str) -> FlockLock:
        """The cross-node lock for one digest (flock on the shared filesystem), not yet taken."""
        return FlockLock(self._lock_path(digest), digest, poll=self._lock_poll)

    def acquire(self, digest: str, on_wait: Optional[Callable[[float], None]] = None,
                timeout: Optional[float] = None, *, converting: bool = False) -> FlockLock:
        """Acquire the digest's lock, calling on_wait(seconds_waited) about once a second.

        The deadline is timeout, else [cache] convert_timeout when the caller waits
        for another node's conversion (converting=True), else [cache] lock_timeout:
        a peer holds the lock only for a conversion or a short critical section,
        so a longer wait is a stuck node and must end in one line, not a hang.
        """
        if timeout is not None:
            limit, setting = timeout, "timeout"
        elif converting:
            limit, setting = self.convert_timeout, f"[cache] convert_timeout = {self.convert_timeout:g}"
        else:
            limit, setting = self.lock_timeout, f"[cache] lock_timeout = {self.lock_timeout:g}"
        return self.lock(digest).acquire(limit, setting, on_wait)

    def check_locking(self) -> None:
        """Fail early on a filesystem where flock does not work (e.g. Lustre without -o flock)."""
        probe = self.locks / f"probe.{self.node}.{os.getpid()}"
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
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
            try:
                create_private_file(p)
            except FileExistsError:
                pass

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
        lk = self.acquire(digest, on_wait=on_wait, converting=True)
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
            # 0600 before the producer writes a byte: Python writers (open "wb"),
            # downloads and tar2sqfs --force truncate it and keep the mode; the
            # SquashFS writer also runs with UMASK (SquashOptions.umask).
            create_private_file(tmp_sqfs)
            meta = dict(producer(tmp_sqfs))
            _fsync_file(tmp_sqfs)
            st = os.lstat(tmp_sqfs)
            if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
                # never chmod a file others may already have opened: refuse it
                raise CacheError(f"the image written for {digest} is mode "
                                 f"{stat.S_IMODE(st.st_mode):o}, not {FILE_MODE:o}: not publishing it")
            meta["digest"] = digest
            meta["size"] = st.st_size
            meta.setdefault("created", time.time())
            _write_json_durably(tmp_meta, meta)
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
            if not lk.try_acquire():
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
                    if not lk.try_acquire():
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
        d.mkdir(mode=DIR_MODE, exist_ok=True)
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
