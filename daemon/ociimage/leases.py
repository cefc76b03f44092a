"""Leases: which node's steps need which image. Part of cache.py, which owns the paths.

    leases/<node>/alive                     the node's heartbeat: its mtime is when the
                                            node's leases expire (pushed to now + lease_ttl
                                            by housekeeping), one utime per node per interval
    leases/<node>/<entry>.<16 hex>.json     one lease, written once (aside, then renamed)

The image a lease holds is in its file name, so prune and remove learn every
lease in the cluster from one directory listing per node, opening no lease
file; the contents (holder, for `ls` and error messages) are read only to show
them. A node writes and deletes only under its own directory; others delete a
node's lease files only once its heartbeat is past (a dead node). No lease is
fsynced: it only matters while its node is alive, and a node that crashed
starts by dropping what it no longer needs (StepManager.recover).

No node's clock is compared with another's: heartbeats are set, and compared,
in the file server's time, read as the mtime of leases/<node>/now after a
utime(NULL), which NFS sets to the server's time (NFS only: Lustre, GPFS, CephFS and
BeeGFS stamp the client's clock, so there nodes' clocks must agree within lease_ttl). A node whose clock is off
keeps its leases, and does not expire others'. Where that file cannot be
touched, the local clock is used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

from .cachefiles import DIR_MODE, entry_name, read_small, write_aside, write_new
from .digests import validate_digest
from .errors import CacheError, NotFound

log = logging.getLogger("ociimage.cache")

DEFAULT_LEASE_TTL = 600.0
ALIVE = "alive"
NOW = "now"  # touched to learn the file server's time
_NOW_EVERY = 30.0  # seconds the server's offset to our clock is trusted for (add, own)
_NAME = re.compile(r"^(sha256|sha512)-([0-9a-f]{64}|[0-9a-f]{128})\.[0-9a-f]{16}$")
_OLD_ID = re.compile(r"^[0-9a-f]{1,64}$")  # ids before the digest was in the name


@dataclass
class Lease:
    id: str
    digest: str
    node: str
    holder: str
    expires: float
    path: Path = field(repr=False, default=Path())

    def to_json(self) -> dict:
        return {"id": self.id, "digest": self.digest, "node": self.node, "holder": self.holder}


@dataclass
class Snapshot:
    """Every lease in the cluster as names: live ones by digest, and the files of dead nodes."""
    live: Dict[str, List[Path]] = field(default_factory=dict)
    dead: List[Path] = field(default_factory=list)


def digest_of_name(stem: str) -> Optional[str]:
    m = _NAME.match(stem)
    return f"{m.group(1)}:{m.group(2)}" if m else None


class LeaseBook:
    def __init__(self, leases: Path, tmp: Path, node: str, ttl: float = DEFAULT_LEASE_TTL):
        self.root = Path(leases)
        self.tmp = Path(tmp)
        self.node = node
        self.ttl = ttl
        self.node_dir(node)  # validates the name early
        self._extended_to = 0.0
        self.clock = time.time  # this node's clock (an attribute so tests can skew it)
        self._offset: Optional[float] = None  # file server's time - ours
        self._offset_at = 0.0
        self._warned = False  # the local clock is used: said once

    def fs_now(self, fresh: bool = True) -> float:
        """The file server's current time: utime(NULL) of our own `now` file, then its
        mtime. fresh=False reuses the offset measured within _NOW_EVERY seconds."""
        mono = time.monotonic()
        if fresh or self._offset is None or mono - self._offset_at > _NOW_EVERY:
            path = self.node_dir(self.node) / NOW
            before = self.clock()
            try:
                try:
                    os.utime(path, None, follow_symlinks=False)
                except FileNotFoundError:
                    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                    try:
                        write_new(path, b"")
                    except FileExistsError:
                        os.utime(path, None, follow_symlinks=False)
                server = os.stat(path, follow_symlinks=False).st_mtime
            except OSError as e:  # a read-only cache (a CLI listing): our own clock then
                if not self._warned:
                    self._warned = True
                    log.warning("cannot touch leases/<node>/now: using this node's clock for "
                                "lease expiry", extra={"path": str(path), "error": str(e)})
                return self.clock()
            self._offset, self._offset_at = server - before, mono
        return self.clock() + self._offset

    def node_dir(self, node: str) -> Path:
        if not node or "/" in node or node.startswith(".") or node in (ALIVE, NOW):
            raise CacheError(f"invalid node name {node!r}")
        return self.root / node

    # ---- this node ----------------------------------------------------------------------

    def heartbeat(self, ttl: Optional[float] = None) -> None:
        """Keep this node's leases live for ttl more seconds: one utime, whatever their number."""
        self._set_alive(self.fs_now() + (ttl or self.ttl), only_later=False)

    def _set_alive(self, until: float, only_later: bool) -> None:
        d = self.node_dir(self.node)
        alive = d / ALIVE
        try:
            if only_later and os.stat(alive).st_mtime >= until:
                return
            os.utime(alive, (until, until), follow_symlinks=False)
        except FileNotFoundError:
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            try:
                write_new(alive, b"")
            except FileExistsError:
                pass
            os.utime(alive, (until, until), follow_symlinks=False)
        self._extended_to = until

    def add(self, digest: str, holder: str, ttl: Optional[float] = None,
            lease_id: Optional[str] = None) -> Lease:
        """Write a lease of this node (the caller re-checks the entry after: see Cache.add_lease)."""
        digest = validate_digest(digest)
        ttl = ttl or self.ttl
        until = self.fs_now(fresh=False) + ttl
        # the heartbeat covers the new lease; rewritten only when it would expire sooner
        if until > self._extended_to + min(1.0, ttl / 4):
            self._set_alive(until, only_later=True)
        lid = f"{entry_name(digest)}.{lease_id or secrets.token_hex(8)}"
        if not _NAME.match(lid):
            raise CacheError(f"invalid lease id {lease_id!r}")
        lease = Lease(lid, digest, self.node, holder, until, self.node_dir(self.node) / f"{lid}.json")
        # written once, aside then renamed: a lease only matters while its node is alive,
        # so no fsync
        write_aside(lease.path, self.tmp / f"lease.{self.node}.{lid}",
                    json.dumps(lease.to_json()).encode())
        return lease

    def drop(self, lease_id: str) -> None:
        if not (_NAME.match(lease_id) or _OLD_ID.match(lease_id)):
            raise CacheError(f"invalid lease id {lease_id!r}")
        try:
            (self.node_dir(self.node) / f"{lease_id}.json").unlink()
        except FileNotFoundError:
            pass

    def own_ids(self) -> Set[str]:
        """The ids of this node's leases: one directory listing, no file opened."""
        try:
            names = os.listdir(self.node_dir(self.node))
        except FileNotFoundError:
            return set()
        return {n[:-5] for n in names if n.endswith(".json")}

    def own(self, node: Optional[str] = None) -> Dict[str, Lease]:
        """This node's leases with their holders (reads only this node's directory)."""
        return {le.id: le for le in self._read_node(node or self.node, 0.0, True)}

    # ---- every node -----------------------------------------------------------------------

    def _nodes(self) -> List[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def _expiry(self, node: str) -> float:
        try:
            return os.stat(self.node_dir(node) / ALIVE, follow_symlinks=False).st_mtime
        except (FileNotFoundError, CacheError):
            return 0.0

    def snapshot(self) -> Snapshot:
        """One listing per node and one stat of its heartbeat; no lease file is opened
        (except ones an older version wrote, whose digest is only inside)."""
        now = self.fs_now()
        snap = Snapshot()
        for node in self._nodes():
            try:
                d = self.node_dir(node)
                names = os.listdir(d)
            except (OSError, CacheError):
                continue
            live = self._expiry(node) > now
            for name in names:
                if not name.endswith(".json"):
                    continue
                path = d / name
                digest = digest_of_name(name[:-5])
                if digest is None:  # an old lease: digest and expiry are in the file
                    old = self._read_old(path, node)
                    if old is None:
                        continue
                    digest, is_live = old.digest, old.expires > now
                else:
                    is_live = live
                if is_live:
                    snap.live.setdefault(digest, []).append(path)
                else:
                    snap.dead.append(path)
        return snap

    def delete_dead(self, snap: Snapshot) -> int:
        """Delete the lease files of dead nodes found by snapshot(), unless the node's
        heartbeat is live again now (the snapshot may be minutes old: a long prune, and
        a node whose heartbeat lapsed may be back): looked at again, per node, right
        before deleting."""
        n = 0
        now = self.fs_now() if snap.dead else 0.0
        back: Dict[str, bool] = {}
        for p in snap.dead:
            node = p.parent.name
            if node not in back:
                back[node] = self._expiry(node) > now
            if back[node] and digest_of_name(p.name[:-5]):
                continue  # alive again: its leases are live (an old-format one keeps its own expiry)
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
        if n:
            log.info("deleted the leases of nodes without a heartbeat", extra={"leases": n})
        return n

    def read(self, path: Path) -> Optional[Lease]:
        """The lease in one file (to name its holder), or None if gone or unreadable."""
        node = path.parent.name
        try:
            data = json.loads(read_small(path))
            return Lease(data.get("id") or path.stem, validate_digest(data["digest"]), node,
                         str(data.get("holder", "")), float(data.get("expires") or
                                                            self._expiry(node)), path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CacheError):
            return None
        except Exception:  # noqa: BLE001 - an invalid digest in a foreign file
            return None

    def _read_old(self, path: Path, node: str) -> Optional[Lease]:
        le = self.read(path)
        return le if le is not None and le.digest else None

    def _read_node(self, node: str, now: float, include_dead: bool) -> Iterator[Lease]:
        try:
            d = self.node_dir(node)
            names = sorted(os.listdir(d))
        except (OSError, CacheError):
            return
        expiry = self._expiry(node)
        for name in names:
            if not name.endswith(".json"):
                continue
            le = self.read(d / name)
            if le is None:
                continue
            if digest_of_name(name[:-5]):
                le.expires = expiry
            if include_dead or le.expires > now:
                yield le

    def read_all(self, include_dead: bool = False) -> Iterator[Lease]:
        """Every lease with its holder: opens every lease file (for showing them only)."""
        now = self.fs_now(fresh=False)
        for node in self._nodes():
            yield from self._read_node(node, now, include_dead)


class LeaseMethods:
    """Cache's lease API (a part of Cache: self._book is its LeaseBook, self.get its lookup)."""

    _book: LeaseBook

    def get(self, digest):  # Cache.get
        raise NotImplementedError

    def _await_removal(self, digest: str) -> bool:  # Cache._await_removal
        raise NotImplementedError


    def add_lease(self, digest: str, holder: str, *, ttl: Optional[float] = None,
                  lease_id: Optional[str] = None) -> Lease:
        """Record that holder needs digest; NotFound if the entry is not (or no longer) there.

        No lock: the lease is written first and the entry checked after (see
        remove), so a hit never waits for another node, nor for a conversion.
        """
        lease = self._book.add(digest, holder, ttl, lease_id)
        if self.get(digest) is None and not self._await_removal(digest):
            self._book.drop(lease.id)
            raise NotFound(f"image {digest} is not in the cache")
        return lease

    def restore_lease(self, lease_id: str, holder: str) -> Lease:
        """Write back a lease of this node under its own id (a step adopted after a restart
        whose lease file another node deleted while this node's heartbeat had passed).
        NotFound (and no lease) if the entry is gone meanwhile."""
        digest = digest_of_name(lease_id)
        if digest is None:
            raise CacheError(f"invalid lease id {lease_id!r}")
        return self.add_lease(digest, holder, lease_id=lease_id.rsplit(".", 1)[1])

    def reserve(self, digest: str, holder: str, *, ttl: Optional[float] = None) -> Lease:
        """A lease taken before the entry exists (or is known to): from now on no prune or
        remove evicts digest, so a step that then pulls it keeps what it pulled. The
        caller drops it if the pull fails."""
        return self._book.add(validate_digest(digest), holder, ttl, None)

    def heartbeat(self, ttl: Optional[float] = None) -> None:
        """Keep every lease of this node live for ttl (default lease_ttl) more seconds."""
        self._book.heartbeat(ttl)

    def renew_lease(self, lease: Lease, ttl: Optional[float] = None) -> None:
        """Leases are renewed per node (heartbeat); kept for callers of the old API. Never
        brings back a dropped lease: nothing is rewritten."""
        self._book.heartbeat(ttl)

    def drop_lease(self, lease_or_id) -> None:
        self._book.drop(lease_or_id.id if isinstance(lease_or_id, Lease) else lease_or_id)

    def own_lease_ids(self):
        """The ids of this node's leases, from one directory listing."""
        return self._book.own_ids()

    def node_leases(self, node: Optional[str] = None) -> Dict[str, Lease]:
        """One node's leases (this node's by default), reading only its directory."""
        return self._book.own(node)

    def iter_leases(self, *, include_expired: bool = False) -> Iterator[Lease]:
        """Every lease in the cluster with its holder (opens every lease file: for display)."""
        return self._book.read_all(include_expired)

    def leases_for(self, digest: str) -> List[Lease]:
        paths = self._book.snapshot().live.get(validate_digest(digest), [])
        return [le for le in map(self._book.read, paths) if le]

    def expire_leases(self) -> int:
        """Delete the lease files of nodes whose heartbeat has passed (dead nodes)."""
        return self._book.delete_dead(self._book.snapshot())
