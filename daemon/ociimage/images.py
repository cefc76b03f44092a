"""The daemon's image store: pull into the shared cache once, with metrics and single flight.

Independent of gRPC so it can be driven by tests and other front ends.
"""

from __future__ import annotations

import logging
import pwd
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from .access import AccessChecker
from .cache import Cache, CacheEntry
from .config import Config
from .errors import Cancelled, InvalidArgument, OciImageError
from .metrics import Metrics
from .progress import DOWNLOAD, ProgressEvent, Reporter, silent
from .pull import PullOptions, publish_conversion, pull_to_cache
from .reference import Reference, parse_reference
from .registry.client import RegistryClient
from .registry.credentials import CredentialStore
from .registry.platform import parse_platform
from .singleflight import SingleFlight
from .squash import SquashOptions

log = logging.getLogger("ociimage.images")


class ImageStore:
    def __init__(self, cache: Cache, config: Config, metrics: Optional[Metrics] = None):
        self.cache = cache
        self.config = config
        self.metrics = metrics or Metrics()
        self._flights = SingleFlight()
        self._stopping = threading.Event()
        self.slurm = None  # slurm.SlurmJobs, attached by the daemon
        # A cache hit is keyed by digest alone: before handing a private image to
        # a user, the registry must confirm that user may pull it.
        self.access = AccessChecker(self.client, anonymous_client=RegistryClient(
            credentials=None, insecure_registries=config.insecure_registries))

    def stop(self) -> None:
        """Make in-flight conversions abandon their work at their next progress event."""
        self._stopping.set()

    def credentials_for(self, uid: Optional[int]) -> CredentialStore:
        if uid is None:
            return CredentialStore()
        try:
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:
            return CredentialStore(home="/nonexistent", environ={})
        return CredentialStore(home=home, environ={"XDG_RUNTIME_DIR": f"/run/user/{uid}"})

    def client(self, uid: Optional[int] = None) -> RegistryClient:
        return RegistryClient(credentials=self.credentials_for(uid),
                              insecure_registries=self.config.insecure_registries)

    def site_client(self) -> RegistryClient:
        """The daemon's own registry identity (root's credentials), for publish_to."""
        return self.client(None)

    def options(self, platform: str = "") -> PullOptions:
        c = self.config
        return PullOptions(squash=SquashOptions(compression=c.compression, level=c.level,
                                                jobs=c.jobs or None),
                           platform=parse_platform(platform) if platform else None,
                           trusted_squashfs=tuple(c.trusted_squashfs),
                           publish_to=c.publish_to)

    def resolve(self, reference: str, platform: str = "", uid: Optional[int] = None):
        ref = parse_reference(reference)
        return self.client(uid).resolve(ref, platform=self.options(platform).platform)

    def lookup(self, reference: str, uid: Optional[int] = None) -> Optional[CacheEntry]:
        """A cache hit for a reference that already names a digest, if uid may use it.

        Raises AccessDenied for a private image the registry does not let uid pull.
        """
        ref = parse_reference(reference)
        entry = self.cache.get(ref.digest) if ref.digest else None
        if entry is not None:
            self.access.check(entry, uid)
        return entry

    def pull(self, reference: str, platform: str = "", uid: Optional[int] = None,
             report: Reporter = silent) -> CacheEntry:
        ref: Reference = parse_reference(reference)
        entry = self.lookup(reference, uid)
        if entry:
            self.metrics.cache_hits.inc()
            self.cache.touch(entry.digest)
            return entry
        key = f"{ref}|{platform}|{uid}"
        return self._flights.do(key, lambda rep: self._pull(ref, platform, uid, rep), report)

    def _pull(self, ref: Reference, platform: str, uid: Optional[int], report: Reporter) -> CacheEntry:
        started = time.monotonic()
        counted = {"bytes": 0}
        outcome: dict = {}

        def tracking(ev: ProgressEvent) -> None:
            if self._stopping.is_set():
                raise Cancelled("the daemon is shutting down; try again when it is back")
            if ev.phase == DOWNLOAD:
                delta = ev.current - counted["bytes"]
                if delta > 0:
                    self.metrics.registry_bytes.inc(delta)
                    counted["bytes"] = ev.current
            report(ev)

        options = self.options(platform)
        site = self.site_client() if options.publish_to else None
        try:
            entry = pull_to_cache(self.client(uid), self.cache, ref, options, tracking,
                                  site_client=site, outcome=outcome)
        except Exception:
            if outcome.get("produced") is None and counted["bytes"]:
                self.metrics.conversions.labels("error").inc()
            raise
        produced = outcome.get("produced")
        if produced == "converted":
            self.metrics.conversions.labels("ok").inc()
            self.metrics.conversion_seconds.observe(time.monotonic() - started)
        if produced:
            self.metrics.cache_misses.inc()
            self.enforce_quota()
        else:
            self.metrics.cache_hits.inc()
        if produced == "converted" and options.publish_to and site is not None:
            # Best effort and off the hot path: the step does not wait for the upload.
            resolved = outcome["resolved"]
            threading.Thread(target=publish_conversion,
                             args=(site, entry, resolved, options.publish_to),
                             daemon=True, name="publish").start()
        return entry

    # ---- eviction that spares what Slurm jobs need ----------------------

    def jobs_by_digest(self) -> Optional[Dict[str, list]]:
        """{digest: [slurm.Job]} for pending/running jobs; {} without Slurm; None if unknown."""
        if self.slurm is None or not self.slurm.enabled:
            return {}
        return self.slurm.needed(may_use=self.owner_may_use)

    def owner_may_use(self, digest: str, uid: int) -> Optional[bool]:
        """Whether the owner of a job whose comment names `digest` may use that cached
        image (the registry is asked with their credentials, as for a cache hit); None
        when it is not cached (nothing to spare). A comment is the user's to write: a
        marker naming an image its owner may not pull spares nothing."""
        entry = self.cache.get(digest)
        if entry is None:
            return None
        try:
            self.access.check(entry, uid)
        except OciImageError:
            return False
        return True

    def keep_for_jobs(self) -> Tuple[Callable[[str], bool], Dict[str, list]]:
        """keep(digest) for Cache.prune: images pending/running jobs need; all of them when
        Slurm cannot be asked (an eviction we cannot justify is never made)."""
        needed = self.jobs_by_digest()
        if needed is None:
            log.warning("Slurm cannot be asked which jobs need which image: evicting nothing",
                        extra={"error": getattr(self.slurm, "error", None)})
            return (lambda d: True), {}
        return (lambda d: d in needed), needed

    def prune(self, quota: Optional[int] = None) -> Tuple[List[CacheEntry], List[str]]:
        """Evict unleased images no pending/running job needs; returns (removed, kept_for_jobs)."""
        keep, needed = self.keep_for_jobs()
        kept: List[str] = []

        def keep_and_note(digest: str) -> bool:
            if keep(digest):
                kept.append(digest)
                return True
            return False

        removed = self.cache.prune(quota=quota, keep=keep_and_note)
        if kept:
            log.info("spared images that Slurm jobs need",
                     extra={"digests": kept, "jobs": {d: [j.job_id for j in needed.get(d, [])]
                                                      for d in kept}})
        return removed, kept

    def enforce_quota(self) -> None:
        if self.config.quota is not None:
            removed, _kept = self.prune(quota=self.config.quota)
            if removed:
                log.info("quota eviction", extra={"removed": [e.digest for e in removed],
                                                  "quota": self.config.quota})


class Prefetcher:
    """Background pulls asked for by unprivileged submitters (the prefetch socket).

    Bounded work: only digest-pinned references (the content is fixed by the
    digest, whoever asks), pulled with the daemon's own credentials, one pull
    per digest at a time (and the cache's single flight and per-digest lock
    besides), at most `rate` new pulls a minute and `max_running` at once,
    and a digest that failed is not retried for `retry_after` seconds.
    """

    def __init__(self, store: ImageStore, rate: int = 30, max_running: int = 4,
                 retry_after: float = 300.0):
        self.store = store
        self.rate = rate
        self.max_running = max_running
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._running: Dict[str, str] = {}
        self._failed: Dict[str, float] = {}
        self._started: List[float] = []

    def request(self, reference: str) -> Tuple[str, str]:
        """-> (state, digest); state is cached, started, running or skipped."""
        ref = parse_reference(reference)
        if not ref.digest or not ref.digest.startswith("sha256:"):
            raise InvalidArgument("prefetch needs a digest-pinned reference (NAME@sha256:...)")
        digest = ref.digest
        if self.store.cache.get(digest) is not None:
            return "cached", digest
        now = time.monotonic()
        with self._lock:
            if digest in self._running:
                return "running", digest
            failed = self._failed.get(digest)
            if failed is not None and now - failed < self.retry_after:
                return "skipped", digest
            self._started = [t for t in self._started if now - t < 60.0]
            if len(self._started) >= self.rate or len(self._running) >= self.max_running:
                log.info("prefetch skipped: rate limit", extra={"digest": digest})
                return "skipped", digest
            self._started.append(now)
            self._running[digest] = str(ref)
        threading.Thread(target=self._run, args=(str(ref), digest), daemon=True,
                         name="prefetch").start()
        return "started", digest

    def _run(self, reference: str, digest: str) -> None:
        log.info("prefetch started", extra={"reference": reference})
        t0 = time.monotonic()
        try:
            self.store.pull(reference, uid=None)
            log.info("prefetch done", extra={"reference": reference,
                                             "seconds": round(time.monotonic() - t0, 2)})
        except Exception as e:  # noqa: BLE001 - a failed prefetch only costs the nodes a pull
            with self._lock:
                self._failed[digest] = time.monotonic()
            log.warning("prefetch failed (the nodes will pull at step start)",
                        extra={"reference": reference, "error": str(e)})
        finally:
            with self._lock:
                self._running.pop(digest, None)

    def running(self) -> List[str]:
        with self._lock:
            return list(self._running)
