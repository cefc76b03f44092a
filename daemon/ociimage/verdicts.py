"""What one node learned from the registry, kept for every node in the cache's shared records.

Two kinds of answers are worth sharing, because otherwise every node of a
job asks the registry the same question at the same moment (issue 15):

* what an image index resolved to for a platform (kind "resolved"): an
  index digest names immutable content, so `index digest + platform ->
  manifest digest` is true forever and needs no expiry;
* access verdicts (kinds "access" per uid and "access-public"): whether the
  registry let a uid (or anyone, anonymously) read a manifest by digest, with
  a wall-clock expiry (see access.py for who asks when).

Records live under <cache>/records/, root's alone (Cache.write_record), so
no user can forge one. Each record repeats its key in its contents and a
record whose contents do not match the key it was looked up by is ignored:
the file name is a hash, and a record copied or renamed into another key's
place must not answer for it. A record that cannot be written only costs a
later node one more question, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from .digests import is_valid_digest
from .errors import OciImageError
from .eviction import takeover_wait

log = logging.getLogger("ociimage.verdicts")

RESOLVED = "resolved"
ACCESS = "access"
PUBLIC = "access-public"

#: How far a verdict's expiry may lie beyond the TTL it was written with, as seen by
#: the reader's clock. Expiries are wall-clock times written by whichever node asked;
#: nodes' clocks differ (NTP keeps them within milliseconds; this tolerates seconds).
#: A reader whose clock is ahead of the writer's sees the verdict expire early (it
#: asks again: safe); one whose clock is behind keeps it at most CLOCK_SLACK longer
#: than the TTL. A record claiming to be valid for longer than TTL + CLOCK_SLACK comes
#: from a clock far off (or from a bug) and is ignored, so skew can never stretch a
#: verdict (a revoked grant) beyond TTL + CLOCK_SLACK.
CLOCK_SLACK = 30.0

#: how long a node waits for another node asking the registry the same question
ASK_LOCK_TIMEOUT = 30.0


def _name(*parts) -> str:
    """A record name for a key: a hash, so any registry/repository text is path-safe."""
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()


def lock_digest(*parts) -> str:
    """A digest-shaped key for Cache.acquire that no content digest can collide with."""
    return "sha256:" + _name("lock", *parts)


class SharedAnswers:
    """Read and write shared answers in a Cache's records (cache=None: share nothing)."""

    def __init__(self, cache, *, wall: Callable[[], float] = time.time):
        self.cache = cache
        self.wall = wall

    # ---- index digest + platform -> manifest digest --------------------

    def resolved(self, digest: str, platform: str) -> Optional[str]:
        if self.cache is None:
            return None
        rec = self._read(RESOLVED, _name(digest, platform))
        if not rec or rec.get("digest") != digest or rec.get("platform") != platform:
            return None
        manifest = rec.get("manifest_digest")
        return manifest if isinstance(manifest, str) and is_valid_digest(manifest) else None

    def record_resolved(self, digest: str, platform: str, manifest_digest: str) -> None:
        self._write(RESOLVED, _name(digest, platform),
                    {"digest": digest, "platform": platform, "manifest_digest": manifest_digest,
                     "recorded": self.wall()})

    # ---- access verdicts -------------------------------------------------

    def verdict(self, key: dict, *, ttl: float, negative_ttl: float) -> Optional[dict]:
        """The unexpired verdict recorded for key (uid/registry/repository/digest), or None.

        -> {"allowed": bool, "reason": str, "remaining": seconds left by this node's clock}
        """
        if self.cache is None:
            return None
        kind = ACCESS if "uid" in key else PUBLIC
        rec = self._read(kind, _name(*_key_parts(key)))
        if not rec or any(rec.get(k) != v for k, v in key.items()):
            return None  # absent, or not the answer to this question
        allowed, expires = rec.get("allowed"), rec.get("expires")
        if not isinstance(allowed, bool) or not isinstance(expires, (int, float)):
            return None
        remaining = expires - self.wall()
        if remaining <= 0 or remaining > (ttl if allowed else negative_ttl) + CLOCK_SLACK:
            return None
        reason = rec.get("reason") if isinstance(rec.get("reason"), str) else ""
        return {"allowed": allowed, "reason": reason, "remaining": remaining}

    def record_verdict(self, key: dict, allowed: bool, ttl: float, reason: str = "") -> None:
        kind = ACCESS if "uid" in key else PUBLIC
        now = self.wall()
        self._write(kind, _name(*_key_parts(key)),
                    dict(key, allowed=allowed, expires=now + ttl, checked=now, reason=reason))

    @contextmanager
    def asking(self, *parts) -> Iterator[None]:
        """Hold the cluster-wide right to ask the registry about parts (best effort).

        Nodes that come second wait here, then find the first one's answer in
        the records. A stuck peer only costs this node its own question: after
        ASK_LOCK_TIMEOUT it asks anyway (coordination, never the answer, gives way). In
        claim mode it waits at least claim_stale and a poll or two, so the claim of a node
        that died while asking is taken over, not waited on by every later question.
        """
        lk = None
        if self.cache is not None:
            try:
                # claim mode: long enough to take over the claim of a node that died asking
                lk = self.cache.acquire(lock_digest(*parts),
                                        timeout=takeover_wait(self.cache, ASK_LOCK_TIMEOUT))
                lk.keep_alive()  # claim mode: a slow registry must not look like a dead node
            except OciImageError as e:
                log.info("asking the registry without waiting for another node",
                         extra={"error": str(e)})
        try:
            yield
        finally:
            if lk is not None:
                lk.release()

    # ---- plumbing --------------------------------------------------------

    # ---- housekeeping ------------------------------------------------------

    #: how often the cluster sweeps the records (one node does it, see sweep_if_due)
    SWEEP_EVERY = 3600.0

    def sweep_if_due(self) -> int:
        """Remove records that can no longer answer anything, at most once per SWEEP_EVERY
        for the whole cluster: each node reads one small record per call, and the node
        that finds the sweep due and gets its lock does it (O(records), hourly).

        Without this, records would only ever accumulate: one per (uid, image) asked
        about, one per index resolved, and users choose the images.
        """
        if self.cache is None:
            return 0
        last = self._read("housekeeping", "records-swept") or {}
        when = last.get("at")
        now = self.wall()
        if isinstance(when, (int, float)) and 0 <= now - when < self.SWEEP_EVERY:
            return 0
        lk = self.cache.lock(lock_digest("sweep-records"))
        # a dead sweeper's claim is taken over once this memory saw it unchanged claim_stale
        if not lk.try_acquire_stale(getattr(self.cache, "_claims_seen", {})):
            return 0  # another node is at it
        lk.keep_alive()
        try:
            removed = self.sweep(now)
            self._write("housekeeping", "records-swept", {"at": now, "removed": removed,
                                                          "node": self.cache.node})
            return removed
        finally:
            lk.release()

    def sweep(self, now: Optional[float] = None) -> int:
        """Remove expired verdicts and index records whose entry is gone; returns how many."""
        now = self.wall() if now is None else now
        removed = 0
        for kind in (ACCESS, PUBLIC):
            for name in self.cache.record_names(kind):
                rec = self._read(kind, name)
                expires = rec.get("expires") if rec else None
                # unreadable, or past its expiry by more than any reader's clock may lag
                if not isinstance(expires, (int, float)) or expires + CLOCK_SLACK < now:
                    self.cache.remove_record(kind, name)
                    removed += 1
        for name in self.cache.record_names(RESOLVED):
            rec = self._read(RESOLVED, name) or {}
            manifest = rec.get("manifest_digest")
            if not (isinstance(manifest, str) and is_valid_digest(manifest)
                    and self.cache.get(manifest) is not None):
                self.cache.remove_record(RESOLVED, name)  # its image was evicted
                removed += 1
        if removed:
            log.info("removed shared records that answer nothing any more",
                     extra={"removed": removed})
        return removed

    def _read(self, kind: str, name: str) -> Optional[dict]:
        try:
            return self.cache.read_record(kind, name)
        except OciImageError:
            return None

    def _write(self, kind: str, name: str, data: dict) -> None:
        if self.cache is None:
            return
        try:
            self.cache.write_record(kind, name, data)
        except OciImageError as e:
            log.warning("cannot share an answer with the other nodes",
                        extra={"kind": kind, "error": str(e)})


def _key_parts(key: dict):
    return tuple(key.get(k) for k in ("uid", "registry", "repository", "digest"))
