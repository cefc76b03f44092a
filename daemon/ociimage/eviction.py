"""Removing entries from the cache: remove, prune (quota/LRU), sweeping tmp/. Part of cache.py.

A cache hit takes no cross-node lock (readers never queue behind each other),
so leasing and removal are ordered instead: Cache.add_lease writes its lease,
then checks the entry; remove and prune put the metadata aside (the entry is
invalid from that instant), then list the leases, and put it back if one
appeared. Whichever comes second sees the other: a lease is never granted on
an entry that then disappears. Removal itself still holds the digest's lock,
so it never races a conversion or another removal.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

from .cachefiles import fsync_dir
from .digests import validate_digest
from .errors import InUse, NotFound

if TYPE_CHECKING:
    from .cache import Cache, CacheEntry

log = logging.getLogger("ociimage.cache")


def _hide(cache: "Cache", digest: str) -> Optional[Path]:
    """Under the digest lock: rename the metadata aside; None if there is none."""
    aside = cache._hidden_path(digest)
    cache.forget(digest)
    try:
        os.rename(cache.meta_path(digest), aside)
    except FileNotFoundError:
        return None
    return aside


def _unhide(cache: "Cache", digest: str, aside: Optional[Path]) -> None:
    if aside is not None:
        os.rename(aside, cache.meta_path(digest))


def _unpublish(cache: "Cache", digest: str, aside: Optional[Path]) -> None:
    # Metadata first (hidden already, or now): from then on the entry is invalid.
    cache.forget(digest)
    for p in (aside or cache.meta_path(digest), cache.sqfs_path(digest),
              cache._used_path(digest)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    fsync_dir(cache.images)


def _in_use(cache: "Cache", digest: str, paths: List[Path]) -> InUse:
    first = next((le for le in map(cache._book.read, paths) if le), None)
    who = f"{first.holder} on {first.node}" if first else "a step"
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    return InUse(f"image {digest} is in use by {who}{more}")


def remove(cache: "Cache", digest: str) -> None:
    """Remove one entry. Refuses (InUse) while a live lease holds it."""
    lk = cache.acquire(digest)
    try:
        if not cache.meta_path(digest).exists() and not cache.sqfs_path(digest).exists():
            raise NotFound(f"image {digest} is not in the cache")
        aside = _hide(cache, digest)
        snap = cache._book.snapshot()
        holders = snap.live.get(digest)
        if holders:
            _unhide(cache, digest, aside)
            raise _in_use(cache, digest, holders)
        _unpublish(cache, digest, aside)
        cache._book.delete_dead(snap)
    finally:
        lk.release()


def prune(cache: "Cache", *, quota: Optional[int] = None,
          keep: Callable[[str], bool] = lambda d: False) -> List["CacheEntry"]:
    """Evict unleased entries, least recently used first.

    With a quota, stop once the cache is at or under it; without, evict every
    unleased entry. keep(digest) lets callers spare more images (e.g. ones
    that pending Slurm jobs need). O(entries + leases): the leases are listed
    twice in all (before choosing, and after hiding the chosen entries), by
    name, whatever the number of entries; the lease files of nodes whose
    heartbeat has passed are deleted.
    """
    sweep_tmp(cache)
    removed: List["CacheEntry"] = []
    entries = sorted(cache.list(), key=lambda e: e.last_used)
    total = sum(e.size for e in entries)
    snap = cache._book.snapshot()
    chosen = []  # (entry, its lock, its hidden metadata)
    try:
        for e in entries:
            if quota is not None and total <= quota:
                break
            if keep(e.digest) or e.digest in snap.live:
                continue
            lk = cache.lock(e.digest)
            if not lk.try_acquire():
                continue  # being converted or removed by someone else right now
            aside = _hide(cache, e.digest) if cache.get(e.digest) else None
            if aside is None:
                lk.release()
                continue
            chosen.append((e, lk, aside))
            total -= e.size
        after = cache._book.snapshot() if chosen else snap
        while chosen:
            e, lk, aside = chosen[0]
            try:
                if e.digest in after.live:  # leased meanwhile: put it back
                    _unhide(cache, e.digest, aside)
                else:
                    _unpublish(cache, e.digest, aside)
                    removed.append(e)
                    log.info("evicted image", extra={"digest": e.digest, "size": e.size})
            finally:
                chosen.pop(0)
                lk.release()
    finally:
        for e, lk, aside in chosen:  # an error above: leave the rest as they were
            try:
                _unhide(cache, e.digest, aside)
            finally:
                lk.release()
    cache._book.delete_dead(snap)
    return removed


def sweep_tmp(cache: "Cache", min_age: float = 3600.0) -> List[Path]:
    """Remove what crashed writers left in tmp/ for digests nobody is building now.

    A conversion's files (and metadata a crashed remove put aside) belong to the
    holder of its digest's lock, so they are garbage whenever that lock can be
    taken; other temp files (lease, claim and record updates, renamed within
    milliseconds) once older than min_age.
    """
    removed: List[Path] = []
    now = time.time()
    for p in cache.tmp.iterdir():
        name = p.name
        try:
            if name.startswith(("sha256-", "sha512-")):
                algo, _, rest = name.partition("-")
                digest = f"{algo}:{rest.split('.', 1)[0]}"
                validate_digest(digest)
                lk = cache.lock(digest)
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
        except Exception as e:  # noqa: BLE001 - a sweep never fails prune
            log.warning("cannot remove a leftover temp file", extra={"path": str(p),
                                                                     "error": str(e)})
            continue
        removed.append(p)
        log.info("removed a leftover temp file", extra={"path": str(p)})
    return removed
