"""Removing entries from the cache: remove, prune (quota/LRU), sweeping tmp/. Part of cache.py.

A cache hit takes no cross-node lock (readers never queue behind each other),
so leasing and removal are ordered instead: Cache.add_lease writes its lease,
then checks the entry; remove and prune put the metadata aside (the entry is
invalid from that instant), then list the leases, and put it back if one
appeared. Whichever comes second sees the other: a lease is never granted on
an entry that then disappears. Removal itself still holds the digest's lock,
so it never races a conversion or another removal.

In claim mode that lock is a claim another node takes over if it looks dead
(a stall past claim_stale): so removers keep it alive with a heartbeat, check
it is still theirs right before deleting anything, and put metadata back with
link(2), which never overwrites the entry a taker may have published meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

from .cachefiles import fsync_dir, read_small
from .digests import validate_digest
from .cachelock import LockLost
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
    """Put hidden metadata back, unless a newer entry is there (never overwrite it)."""
    if aside is None:
        return
    try:
        os.link(aside, cache.meta_path(digest))
    except FileExistsError:
        log.info("a newer entry was published meanwhile; dropping the old metadata",
                 extra={"digest": digest})
    except FileNotFoundError:
        return  # a taker of our lost claim swept it as a leftover
    os.unlink(aside)


def _settle(cache: "Cache", digest: str, lk, aside: Optional[Path], evict: bool) -> bool:
    """Evict (unpublish) or put back one hidden entry; True if evicted. Only while the
    lock is still ours: else put back what is ours to put back, and evict nothing."""
    if evict:
        try:
            lk.check_owned()
        except Exception:
            _unhide(cache, digest, aside)
            raise
        _unpublish(cache, digest, aside)
        return True
    _unhide(cache, digest, aside)
    return False


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


def put_back_hidden(cache: "Cache", digest: str, p: Path) -> bool:
    """Under digest's lock: metadata a crashed remover or pruner left aside in tmp/. The
    entry may still be leased (its steps run on), so it goes back (link, never over a newer
    entry) when the .sqfs is there with the recorded size; deleted only when there is no
    .sqfs or a newer entry is in place. True: p is gone (put back or deleted)."""
    try:
        size = json.loads(read_small(p)).get("size")
    except FileNotFoundError:
        return True
    except (ValueError, AttributeError):
        size = None
    try:
        st = os.stat(cache.sqfs_path(digest))
    except FileNotFoundError:
        _unlink(p)  # its image is gone: nothing to put back
        return True
    if not cache.meta_path(digest).exists() and size != st.st_size:
        log.warning("metadata aside does not match its image; leaving both",
                    extra={"path": str(p), "digest": digest})
        return False
    try:
        os.link(p, cache.meta_path(digest))
        log.info("put back metadata a remover left aside", extra={"digest": digest})
    except FileExistsError:
        pass  # a newer entry is there
    except FileNotFoundError:
        return True  # gone meanwhile
    _unlink(p)
    fsync_dir(cache.images)
    return True


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def _in_use(cache: "Cache", digest: str, paths: List[Path]) -> InUse:
    first = next((le for le in map(cache._book.read, paths) if le), None)
    who = f"{first.holder} on {first.node}" if first else "a step"
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    return InUse(f"image {digest} is in use by {who}{more}")


def remove(cache: "Cache", digest: str) -> None:
    """Remove one entry. Refuses (InUse) while a live lease holds it. In claim mode it
    waits at least claim_stale (and a poll or two), so a dead claimer's claim is taken
    over rather than timing out whenever claim_stale > lock_timeout."""
    wait = takeover_wait(cache, cache.lock_timeout)
    lk = cache.acquire(digest, timeout=wait if wait > cache.lock_timeout else None)
    try:
        lk.keep_alive()
        if not cache.meta_path(digest).exists() and not cache.sqfs_path(digest).exists():
            raise NotFound(f"image {digest} is not in the cache")
        aside = _hide(cache, digest)
        snap = cache._book.snapshot()
        holders = snap.live.get(digest)
        _settle(cache, digest, lk, aside, evict=not holders)
        if holders:
            raise _in_use(cache, digest, holders)
        cache._book.delete_dead(snap)
    finally:
        lk.release()


#: entries prune hides at once: each holds a lock (a descriptor, a heartbeat thread)
PRUNE_BATCH = 64
#: a lone image file (no metadata) older than this is a crashed writer's or remover's
LONE_IMAGE_AGE = 3600.0


def prune(cache: "Cache", *, quota: Optional[int] = None,
          keep: Callable[[str], bool] = lambda d: False) -> List["CacheEntry"]:
    """Evict unleased entries, least recently used first.

    With a quota, stop once the cache is at or under it; without, evict every
    unleased entry. keep(digest) lets callers spare more images (e.g. ones
    that pending Slurm jobs need). O(entries + leases): the leases are listed
    once before choosing and once per batch of PRUNE_BATCH hidden entries, by
    name, whatever the number of entries; the lease files of nodes whose
    heartbeat has passed are deleted.
    """
    sweep_tmp(cache)
    sweep_lone_images(cache)
    removed: List["CacheEntry"] = []
    entries = sorted(cache.list(), key=lambda e: e.last_used)
    total = sum(e.size for e in entries)
    snap = cache._book.snapshot()
    todo = iter(entries)
    while quota is None or total > quota:
        chosen = []  # (entry, its lock, its hidden metadata)
        try:
            for e in todo:
                if keep(e.digest) or e.digest in snap.live:
                    continue
                lk = cache.lock(e.digest)
                if not lk.try_acquire_stale(cache._claims_seen):
                    continue  # being converted or removed by someone else right now
                try:  # not in chosen yet: on any error the lock is released here
                    lk.keep_alive()
                    aside = _hide(cache, e.digest) if cache.get(e.digest) else None
                except BaseException:
                    lk.release()
                    raise
                if aside is None:
                    lk.release()
                    continue
                chosen.append((e, lk, aside))
                total -= e.size
                if len(chosen) >= PRUNE_BATCH or (quota is not None and total <= quota):
                    break
            if not chosen:
                break
            after = cache._book.snapshot()
            while chosen:
                e, lk, aside = chosen[0]
                try:
                    leased = e.digest in after.live  # leased meanwhile: put it back
                    if _settle(cache, e.digest, lk, aside, evict=not leased):
                        removed.append(e)
                        log.info("evicted image", extra={"digest": e.digest, "size": e.size})
                    else:
                        total += e.size
                except LockLost as err:
                    total += e.size
                    log.warning("not evicting: lost its lock", extra={"digest": e.digest,
                                                                      "error": str(err)})
                finally:
                    chosen.pop(0)
                    lk.release()
        finally:
            for e, lk, aside in chosen:  # an error above: leave the rest as they were
                try:  # each on its own: one that cannot be put back keeps no other locked
                    _unhide(cache, e.digest, aside)
                except Exception as err:  # noqa: BLE001 - the first error is raised
                    log.warning("cannot put an entry's metadata back", extra={
                        "digest": e.digest, "error": str(err)})
                finally:
                    lk.release()
    cache._book.delete_dead(snap)
    return removed


def sweep_tmp(cache: "Cache", min_age: float = 3600.0) -> List[Path]:
    """Remove what crashed writers left in tmp/ for digests nobody is building now.

    A conversion's files belong to the holder of its digest's lock, so they are
    garbage whenever that lock can be taken (metadata a crashed remover put aside
    goes back instead: put_back_hidden); other temp files (lease, claim and record updates, renamed within
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
                if not lk.try_acquire_stale(cache._claims_seen):
                    continue  # being written right now
                try:
                    if name.endswith(".hidden"):
                        if not put_back_hidden(cache, digest, p):
                            continue
                    else:
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
    sweep_claims(cache)
    return removed


def takeover_wait(cache: "Cache", timeout: float) -> float:
    """A wait for a digest's lock long enough to take a dead claimer's claim over (claim
    mode: a claim is taken over once unchanged for claim_stale), else timeout."""
    if getattr(cache, "locking", None) != "claim":
        return timeout
    return max(timeout, cache.claim_stale + 2 * cache._claim_poll)


def sweep_claims_if_due(cache: "Cache") -> None:
    """From the daemon's housekeeping: sweep the claims every claim_stale/2, with the
    daemon's memory (cache._claims_seen), so a dead claimer's claim (a conversion, a
    registry question, a sweep) is taken over within about 1.5 claim_stale even if no
    node waits for it. A CLI prune sees each claim once and never takes one over."""
    now = time.monotonic()
    if cache.locking != "claim" or now - getattr(cache, "_claims_swept", -1e9) < \
            cache.claim_stale / 2:
        return
    cache._claims_swept = now
    sweep_claims(cache)


def sweep_claims(cache: "Cache") -> None:
    """Claim mode: end the claims of dead claimers (crashed after publishing, or with
    nothing left in tmp/), once seen unchanged for claim_stale across sweeps."""
    if cache.locking != "claim":
        return
    found = set()
    for p in cache.locks.glob("*.claim"):
        algo, _, rest = p.name.partition("-")
        digest = f"{algo}:{rest[:-len('.claim')]}"
        try:
            validate_digest(digest)
            lk = cache.lock(digest)
            found.add(str(lk.path))
            if lk.try_acquire_stale(cache._claims_seen):
                lk.release()
        except Exception as e:  # noqa: BLE001 - a sweep never fails prune
            log.warning("cannot check a claim", extra={"path": str(p), "error": str(e)})
    for key in set(cache._claims_seen) - found:  # gone: forget them
        cache._claims_seen.pop(key, None)


def sweep_lone_images(cache: "Cache", min_age: float = LONE_IMAGE_AGE) -> List[Path]:
    """Remove images/*.sqfs without metadata, older than min_age, under the digest lock:
    a writer that crashed between its two renames, or a remover between its unlinks.
    Never a leased one, nor a younger one: "no metadata" may be this node's stale view of a new entry."""
    removed: List[Path] = []
    try:
        names = set(os.listdir(cache.images))
    except FileNotFoundError:
        return removed
    now = time.time()
    live = None  # the cluster's leases, listed once if there is a candidate
    for name in sorted(names):
        if not name.endswith(".sqfs") or name[:-5] + ".json" in names:
            continue
        p = cache.images / name
        algo, _, rest = name[:-5].partition("-")
        try:
            digest = validate_digest(f"{algo}:{rest}")
            if now - p.stat().st_mtime < min_age:
                continue
            if live is None:
                live = cache._book.snapshot().live
            if digest in live:  # a step still uses it (its metadata went missing)
                continue
            lk = cache.lock(digest)
            if not lk.try_acquire_stale(cache._claims_seen):
                continue
            try:
                # under the lock nobody publishes it; look again, the listing is old
                if cache.meta_path(digest).exists() or now - p.stat().st_mtime < min_age:
                    continue
                p.unlink()
            finally:
                lk.release()
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - a sweep never fails prune
            log.warning("cannot remove a lone image file", extra={"path": str(p),
                                                                  "error": str(e)})
            continue
        removed.append(p)
        log.info("removed an image file without metadata", extra={"path": str(p)})
    return removed
