"""Private images stay private: a cached image is served to a user only after the registry
confirms that user may pull it.

The shared cache is keyed by manifest digest, so a step pinned to a digest
finds the SquashFS without asking the registry anything. For a public image
that is what we want; for a private one it would let any user of the cluster
run an image that only its puller was allowed to read. So before a cache hit
is handed to a user, the check here asks the registry:

* is the manifest readable anonymously? (a HEAD by digest without
  credentials; cached per (registry, repository, digest)) -> anyone may use it;
* else, a HEAD of the manifest by digest with *the requesting user's*
  credentials (read from their files, as for a pull) -> allowed only on 200.

Answers are cached for a short TTL (positive and negative), per (uid,
registry, repository, digest), so a job of 1000 steps costs one request per
node per TTL, and a revoked grant stops working within the TTL. A registry
that cannot be reached fails closed for a private image, with a message that
says so; a positive answer still in the cache keeps working meanwhile.

Root (uid 0, or no uid: the daemon's own `oci-image pull`) is never checked.
Images that never came from a registry (a user's own .sqfs) are not checked
here: the runtime checks that the user can read the file.

Wiring (the caller's side, see docs/reliability.md): ImageStore gets
`self.access = AccessChecker(self.client)`, and every path that hands a cache
entry to a request carrying a uid without the registry having been asked with
that uid's credentials calls `self.access.check(entry, uid)` first.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .cache import CacheEntry
from .errors import (AccessDenied, AuthenticationRequired, NotFound, OciImageError,
                     RegistryUnavailable)
from .reference import Reference, parse_reference
from .registry import mediatypes as mt
from .registry.client import RegistryClient

log = logging.getLogger("ociimage.access")

DEFAULT_TTL = 300.0
NEGATIVE_TTL = 30.0


@dataclass
class _Answer:
    allowed: bool
    expires: float
    reason: str = ""


class AccessChecker:
    """client_for(uid) -> a RegistryClient with that user's credentials (None: anonymous)."""

    def __init__(self, client_for: Callable[[Optional[int]], RegistryClient], *,
                 ttl: float = DEFAULT_TTL, negative_ttl: float = NEGATIVE_TTL,
                 clock: Callable[[], float] = time.monotonic, anonymous_client=None):
        self._client_for = client_for
        self._anonymous = anonymous_client
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._public: Dict[Tuple[str, str, str], _Answer] = {}
        self._users: Dict[Tuple[int, str, str, str], _Answer] = {}
        #: registry requests made (for tests and metrics)
        self.requests = 0

    # ---- the check -------------------------------------------------------

    def check(self, entry: CacheEntry, uid: Optional[int]) -> None:
        """Return if uid may use entry; raise AccessDenied (or RegistryUnavailable) if not."""
        if uid is None or uid == 0:
            return
        ref = self._source(entry)
        if ref is None:
            return  # not from a registry (nothing to ask)
        digest = entry.digest
        key = (ref.domain, ref.path, digest)
        if self._is_public(ref, digest, key):
            return
        ukey = (uid,) + key
        now = self._clock()
        with self._lock:
            ans = self._users.get(ukey)
        if ans is None or ans.expires <= now:
            ans = self._ask_as_user(ref, digest, uid)
            with self._lock:
                self._users[ukey] = ans
        if not ans.allowed:
            raise AccessDenied(ans.reason)

    def forget(self, uid: Optional[int] = None) -> None:
        with self._lock:
            if uid is None:
                self._users.clear()
                self._public.clear()
            else:
                for k in [k for k in self._users if k[0] == uid]:
                    del self._users[k]

    # ---- helpers ---------------------------------------------------------

    @staticmethod
    def _source(entry: CacheEntry) -> Optional[Reference]:
        text = entry.meta.get("reference") or ""
        if not text:
            return None
        try:
            return parse_reference(text)
        except OciImageError:
            return None

    def _head(self, client: RegistryClient, ref: Reference, digest: str) -> int:
        """Status of HEAD /v2/<repo>/manifests/<digest> (after auth, retries)."""
        self.requests += 1
        resp = client._request("HEAD", ref.domain, f"/v2/{ref.path}/manifests/{digest}",
                               client.pull_scopes(ref), {"Accept": mt.ACCEPT})
        status = resp.status_code
        if status == 200:
            resp.close()
            return 200
        try:
            client._raise_for(resp, ref.domain, client.pull_scopes(ref),
                              f"image not found: {ref.domain}/{ref.path}@{digest}",
                              f"the manifest request for {ref.domain}/{ref.path}@{digest}")
        except (AuthenticationRequired, AccessDenied, NotFound):
            return status
        return status

    def _is_public(self, ref: Reference, digest: str, key) -> bool:
        now = self._clock()
        with self._lock:
            ans = self._public.get(key)
        if ans is not None and ans.expires > now:
            return ans.allowed
        client = self._anonymous or self._client_for(None)
        try:
            public = self._head(client, ref, digest) == 200
        except OciImageError:
            # unreachable or odd: treat as private (the per-user check decides, fail closed)
            return False
        with self._lock:
            self._public[key] = _Answer(public, now + (self.ttl if public else self.negative_ttl))
        return public

    def _ask_as_user(self, ref: Reference, digest: str, uid: int) -> _Answer:
        now = self._clock()
        where = f"{ref.domain}/{ref.path}"
        try:
            status = self._head(self._client_for(uid), ref, digest)
        except RegistryUnavailable as e:
            log.warning("cannot confirm access to a private image",
                        extra={"uid": uid, "repository": where, "error": str(e)})
            return _Answer(False, now + min(self.negative_ttl, 5.0),
                           f"cannot confirm with {ref.domain} that you may use the private image "
                           f"{where}@{digest[:19]}…: {e}")
        except OciImageError as e:
            return _Answer(False, now + self.negative_ttl,
                           f"cannot confirm with {ref.domain} that you may use the private image "
                           f"{where}: {e}")
        if status == 200:
            return _Answer(True, now + self.ttl)
        log.info("access to a cached private image refused",
                 extra={"uid": uid, "repository": where, "digest": digest, "status": status})
        return _Answer(False, now + self.negative_ttl,
                       f"{ref.domain} does not let you pull {where} (HTTP {status}); it is a "
                       f"private image: log in with `docker login {ref.domain}` as a user "
                       f"allowed to pull it")
