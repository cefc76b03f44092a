"""The daemon's image store: pull into the shared cache once, with metrics and single flight.

Independent of gRPC so it can be driven by tests and other front ends.
"""

from __future__ import annotations

import logging
import pwd
import threading
import time
from typing import Optional

from .cache import Cache, CacheEntry
from .config import Config
from .errors import Cancelled
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

    def lookup(self, reference: str) -> Optional[CacheEntry]:
        """A cache hit for a reference that already names a digest, without asking the registry."""
        ref = parse_reference(reference)
        return self.cache.get(ref.digest) if ref.digest else None

    def pull(self, reference: str, platform: str = "", uid: Optional[int] = None,
             report: Reporter = silent) -> CacheEntry:
        ref: Reference = parse_reference(reference)
        if ref.digest:
            entry = self.cache.get(ref.digest)
            if entry:
                self.metrics.cache_hits.inc()
                self.cache.touch(ref.digest)
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

    def enforce_quota(self) -> None:
        if self.config.quota is not None:
            removed = self.cache.prune(quota=self.config.quota)
            if removed:
                log.info("quota eviction", extra={"removed": [e.digest for e in removed],
                                                  "quota": self.config.quota})
