"""The daemon's image store: pull into the shared cache once, with metrics and single flight.

Independent of gRPC so it can be driven by tests and other front ends.
"""

from __future__ import annotations

import logging
import pwd
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .access import AccessChecker
from .asuser import Identity
from .cache import Cache, CacheEntry
from .config import Config
from . import cancel
from .errors import Cancelled, InvalidArgument, LimitExceeded, OciImageError
from .metrics import Metrics
from .progress import DOWNLOAD, FETCH, ProgressEvent, Reporter, silent
from .pull import (PullOptions, cached_pinned, publish_conversion, pull_pinned_to_cache,
                   pull_to_cache)
from .reference import Reference, parse_reference
from .registry.client import RegistryClient
from .registry.credentials import CredentialStore
from .registry.platform import parse_platform
from .singleflight import SingleFlight
from .squash import SquashOptions
from .verdicts import SharedAnswers

log = logging.getLogger("ociimage.images")

SHUTTING_DOWN = "the daemon is shutting down; try again when it is back"


class UidGate:
    """Per-uid caps on the pulls in progress, so one user cannot take every worker thread.

    A uid may have at most max_pulls distinct pulls (keys) in progress and at
    most max_requests requests waiting on them (the same image asked for by
    many steps at once is one pull and many requests). Beyond either, the
    request fails at once with RESOURCE_EXHAUSTED; other uids are not affected.
    Requests without a uid are the admin's own (oci-image pull as root) or
    prefetches, which the Prefetcher bounds itself: they are not capped here.
    """

    def __init__(self, max_pulls: int, max_requests: int):
        self.max_pulls, self.max_requests = max_pulls, max_requests
        self._lock = threading.Lock()
        self._keys: Dict[Optional[int], Dict[str, int]] = {}

    @contextmanager
    def slot(self, uid: Optional[int], key: str) -> Iterator[None]:
        if uid is None:
            yield
            return
        who = f"uid {uid}"
        with self._lock:
            keys = self._keys.setdefault(uid, {})
            if key not in keys and len(keys) >= self.max_pulls:
                raise LimitExceeded(f"{who} already has {len(keys)} image pulls in progress on "
                                    f"this node ([daemon] max_pulls_per_uid); wait for them to "
                                    f"finish and try again")
            if sum(keys.values()) >= self.max_requests:
                raise LimitExceeded(f"{who} already has {sum(keys.values())} requests waiting "
                                    f"for image pulls on this node ([daemon] "
                                    f"max_requests_per_uid); try again later")
            keys[key] = keys.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                keys = self._keys[uid]
                keys[key] -= 1
                if not keys[key]:
                    del keys[key]
                if not keys:
                    del self._keys[uid]

    def in_progress(self, uid: Optional[int]) -> int:
        with self._lock:
            return len(self._keys.get(uid, {}))


class ImageStore:
    def __init__(self, cache: Cache, config: Config, metrics: Optional[Metrics] = None):
        self.cache = cache
        self.config = config
        self.metrics = metrics or Metrics()
        self._flights = SingleFlight()
        self._stopping = threading.Event()
        self._quota_lock = threading.Lock()
        self._quota_running = self._quota_again = False
        self.gate = UidGate(config.max_pulls_per_uid, config.max_requests_per_uid)
        self.slurm = None  # slurm.SlurmJobs, attached by the daemon
        # A cache hit is keyed by digest alone: before handing a private image to
        # a user, the registry must confirm that user may pull it.
        # Verdicts are shared with every node through the cache's records (issue 15).
        self.answers = SharedAnswers(cache)
        self.access = AccessChecker(self.client, anonymous_client=RegistryClient(
            credentials=None, insecure_registries=config.insecure_registries,
            limits=config.net_limits()), shared=self.answers)

    def stop(self) -> None:
        """Abandon in-flight pulls now: their sockets are shut, their waits end (no partial
        files: each conversion removes its temporary file on the way out)."""
        self._stopping.set()
        self._flights.cancel_all(SHUTTING_DOWN)

    def wait_idle(self, timeout: float) -> bool:
        return self._flights.wait_idle(timeout)

    def credentials_for(self, uid: Optional[int]) -> CredentialStore:
        """The credentials of uid's own files, read as uid (None: the daemon's own)."""
        if uid is None:
            return CredentialStore()
        try:
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:
            return CredentialStore(home="/nonexistent", environ={})
        return CredentialStore(home=home, environ={"XDG_RUNTIME_DIR": f"/run/user/{uid}"},
                               as_user=Identity.of_user(uid))

    def client(self, uid: Optional[int] = None,
               credentials: Optional[CredentialStore] = None) -> RegistryClient:
        return RegistryClient(credentials=credentials if credentials is not None
                              else self.credentials_for(uid),
                              insecure_registries=self.config.insecure_registries,
                              limits=self.config.net_limits())

    def resolve_tag(self, ref: Reference, uid: int, environ=None) -> str:
        """The digest a tag names at the registry now, asked as the user at submit would.

        For srun/sbatch on this host (usersock "resolve"): environ holds the user's HOME,
        REGISTRY_AUTH_FILE, DOCKER_CONFIG, XDG_RUNTIME_DIR, only paths of credential
        files that are read as the user; the site's network policy applies.
        """
        creds = None
        if environ:
            env = dict(environ)
            home = env.pop("HOME", None)
            if home is None:
                try:
                    home = pwd.getpwuid(uid).pw_dir
                except KeyError:
                    home = "/nonexistent"
            creds = CredentialStore(home=home, environ=env, as_user=Identity.of_user(uid))
        return self.client(uid, credentials=creds).resolve_digest(ref)

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

    def lookup(self, reference: str, uid: Optional[int] = None,
               platform: Optional[str] = None) -> Optional[CacheEntry]:
        """A cache hit for a reference that already names a digest, if uid may use it.

        With platform (a string, "" for this host's), an index digest also hits
        the entry some node recorded for that platform; without, only the
        digest's own entry does (the caller has not said which platform).
        Raises AccessDenied for a private image the registry does not let uid pull.
        """
        ref = parse_reference(reference)
        if not ref.digest:
            return None
        if platform is None:
            entry = self.cache.get(ref.digest)
        else:
            entry = cached_pinned(self.cache, ref.digest, self.options(platform).platform,
                                  self.answers)
        if entry is not None:
            self.access.check(entry, uid)
        return entry

    def lookup_known(self, reference: str, uid: Optional[int] = None) -> Optional[CacheEntry]:
        """lookup() for the hot path: the entry of a digest this daemon has seen, which uid
        may use as far as this daemon remembers, with one stat (Cache.get's memo) and no
        other I/O; None whenever lookup() or pull() must tell (they may block)."""
        ref = parse_reference(reference)
        if not ref.digest:
            return None
        entry = self.cache.get(ref.digest, known_only=True)
        if entry is None or not self.access.remembered(entry, uid):
            return None
        return entry

    def pull(self, reference: str, platform: str = "", uid: Optional[int] = None,
             report: Reporter = silent) -> CacheEntry:
        ref: Reference = parse_reference(reference)
        # a step's pinned digest this daemon has seen: one stat, nothing that can block
        entry = self.lookup_known(reference, uid) or self.lookup(reference, uid, platform)
        if entry is not None:
            # A hit never takes one of uid's pull slots ([daemon] max_pulls_per_uid): a user
            # converting four images must still start steps in the ones already cached.
            self.metrics.cache_hits.inc()
            self.cache.touch(entry.digest)
            return entry
        key = f"{ref}|{platform}|{uid}"
        with self.gate.slot(uid, key):
            return self._flights.do(key, lambda rep: self._pull(ref, platform, uid, rep), report)

    def _pull(self, ref: Reference, platform: str, uid: Optional[int], report: Reporter) -> CacheEntry:
        started = time.monotonic()
        counted = {"bytes": 0}
        outcome: dict = {}

        token = cancel.current()  # the flight's: cancelled when nobody waits any more

        def tracking(ev: ProgressEvent) -> None:
            # also called about once a second while waiting for another converter's lock
            if self._stopping.is_set():
                raise Cancelled(SHUTTING_DOWN)
            token.check()
            if ev.phase in (DOWNLOAD, FETCH):  # bytes from the registry, either way
                delta = ev.current - counted["bytes"]
                if delta > 0:
                    self.metrics.registry_bytes.inc(delta)
                    counted["bytes"] = ev.current
            report(ev)

        options = self.options(platform)
        site = self.site_client() if options.publish_to else None
        try:
            if ref.digest:
                # Steps and prefetches: one node of the cluster asks the registry (issue 15).
                entry = pull_pinned_to_cache(
                    self.client(uid), self.cache, ref, options, tracking, site_client=site,
                    outcome=outcome, on_resolved=lambda r: self.access.record_pulled(
                        uid, r.reference, r.manifest.digest))
            else:
                asked = self.access.now()
                entry = pull_to_cache(self.client(uid), self.cache, ref, options, tracking,
                                      site_client=site, outcome=outcome)
                resolved = outcome.get("resolved")
                if outcome.get("produced") and resolved is not None:
                    # this uid's credentials just fetched it, layers and all, from there (a
                    # conversion may take long: the verdict counts from the question)
                    self.access.record_pulled(uid, resolved.reference, entry.digest,
                                              since=asked)
            # Always, also when this call resolved something itself: what it resolved may be
            # a repository (even a registry) the user controls that serves another image's
            # manifest, and the entry found is then someone else's. The check asks about the
            # entry's own source; for what this uid just pulled from there it is answered
            # from the verdict recorded above, without a request.
            self.access.check(entry, uid)
        except Exception:
            if outcome.get("produced") is None and (counted["bytes"] or outcome.get("converting")):
                self.metrics.conversions.labels("error").inc()
            raise
        produced = outcome.get("produced")
        if produced == "converted":
            self.metrics.conversions.labels("ok").inc()
            self.metrics.conversion_seconds.observe(time.monotonic() - started)
        if produced:
            self.metrics.cache_misses.inc()
            self.enforce_quota_soon()
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
        marker naming an image its owner may not pull spares nothing. The marker is the
        digest pinned at submit, which for a multi-arch image is its index's: that maps
        to the cached platform manifest through the index's shared record."""
        entry = cached_pinned(self.cache, digest, None)
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
        # markers name what was pinned (an index, for a multi-arch image); prune sees the
        # cached entries' own digests
        by_entry: Dict[str, list] = {}
        for marker, jobs in needed.items():
            entry = cached_pinned(self.cache, marker, None)
            by_entry.setdefault(entry.digest if entry else marker, []).extend(jobs)
        return (lambda d: d in by_entry), by_entry

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

    def enforce_quota_soon(self) -> None:
        """Enforce the quota off the request path, one run at a time (a request that
        arrives meanwhile makes it run once more). Deciding what to spare asks the
        registry about every image that users' job comments name, with the owners'
        credentials: that must never make the step that just converted wait."""
        if self.config.quota is None:
            return
        with self._quota_lock:
            if self._quota_running:
                self._quota_again = True
                return
            self._quota_running = True

        def run() -> None:
            while True:
                try:
                    self.enforce_quota()
                except Exception:  # noqa: BLE001 - the next conversion tries again
                    log.exception("quota enforcement failed")
                with self._quota_lock:
                    if not self._quota_again:
                        self._quota_running = False
                        return
                    self._quota_again = False

        threading.Thread(target=run, daemon=True, name="quota").start()

    def enforce_quota(self) -> None:
        if self.config.quota is not None:
            removed, _kept = self.prune(quota=self.config.quota)
            if removed:
                log.info("quota eviction", extra={"removed": [e.digest for e in removed],
                                                  "quota": self.config.quota})


class Prefetcher:
    """Background pulls asked for by unprivileged submitters (the user socket).

    Each pull runs with the CALLER's registry credentials (uid from SO_PEERCRED,
    usersock.py), never the daemon's own: a user can only make the daemon fetch
    what the registry would give that user. Bounded work: only digest-pinned
    references, one pull per digest and uid at a time (and the cache's single
    flight and per-digest lock besides), at most `rate` new pulls a minute and
    `max_running` at once in all, `rate_per_user` and `running_per_user` per
    uid, and a (digest, uid) that failed is not retried for `retry_after` seconds.
    """

    def __init__(self, store: ImageStore, rate: int = 30, max_running: int = 4,
                 retry_after: float = 300.0, rate_per_user: int = 10, running_per_user: int = 2):
        self.store = store
        self.rate = rate
        self.max_running = max_running
        self.rate_per_user = rate_per_user
        self.running_per_user = running_per_user
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._running: Dict[Tuple[str, int], str] = {}
        self._failed: Dict[Tuple[str, int], Tuple[float, str]] = {}
        self._started: List[Tuple[float, int]] = []

    def request(self, reference: str, uid: int) -> Tuple[str, str, str]:
        """-> (state, digest, reason); state is cached, started, running or skipped.

        A cached image is "cached" only for a uid the registry lets pull it
        (AccessDenied otherwise): the answer is the same one a step would get.
        """
        ref = parse_reference(reference)
        if not ref.digest or not ref.digest.startswith("sha256:"):
            raise InvalidArgument("prefetch needs a digest-pinned reference (NAME@sha256:...)")
        digest = ref.digest
        if self.store.lookup(str(ref), uid) is not None:
            return "cached", digest, ""
        key = (digest, uid)
        now = time.monotonic()
        with self._lock:
            if key in self._running:
                return "running", digest, ""
            if len(self._failed) > 4096:  # bounded memory whatever users ask for
                self._failed = {k: v for k, v in self._failed.items()
                                if now - v[0] < self.retry_after}
            failed = self._failed.get(key)
            if failed is not None and now - failed[0] < self.retry_after:
                return "skipped", digest, f"failed recently: {failed[1]}"
            self._started = [(t, u) for t, u in self._started if now - t < 60.0]
            mine_started = sum(1 for _t, u in self._started if u == uid)
            mine_running = sum(1 for _d, u in self._running if u == uid)
            reason = ""
            if len(self._started) >= self.rate or len(self._running) >= self.max_running:
                reason = "the daemon's prefetch limit"
            elif mine_started >= self.rate_per_user or mine_running >= self.running_per_user:
                reason = "this user's prefetch limit"
            if reason:
                log.info("prefetch skipped: rate limit", extra={"digest": digest, "uid": uid,
                                                                "limit": reason})
                return "skipped", digest, reason
            self._started.append((now, uid))
            self._running[key] = str(ref)
        threading.Thread(target=self._run, args=(str(ref), digest, uid), daemon=True,
                         name="prefetch").start()
        return "started", digest, ""

    def _run(self, reference: str, digest: str, uid: int) -> None:
        log.info("prefetch started", extra={"reference": reference, "uid": uid})
        t0 = time.monotonic()
        try:
            self.store.pull(reference, uid=uid)
            log.info("prefetch done", extra={"reference": reference, "uid": uid,
                                             "seconds": round(time.monotonic() - t0, 2)})
        except Exception as e:  # noqa: BLE001 - a failed prefetch only costs the nodes a pull
            with self._lock:
                self._failed[(digest, uid)] = (time.monotonic(), str(e))
            log.warning("prefetch failed (the nodes will pull at step start)",
                        extra={"reference": reference, "uid": uid, "error": str(e)})
        finally:
            with self._lock:
                self._running.pop((digest, uid), None)

    def running(self) -> List[Tuple[str, int]]:
        with self._lock:
            return list(self._running)
