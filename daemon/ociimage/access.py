"""Private images stay private: a cached image is served to a user only after the registry
confirms that user may pull it.

The shared cache is keyed by manifest digest, so a step pinned to a digest
finds the SquashFS without asking the registry anything. For a public image
that is what we want; for a private one it would let any user of the cluster
run an image that only its puller was allowed to read. So before a cache hit
is handed to a user, the registry must have said, within a TTL, that this
user (or anyone, anonymously) may read the manifest by digest:

* a user with credentials for the registry is asked about first: a HEAD of
  the manifest by digest with *the requesting user's* credentials (read from
  their files, as for a pull) -> allowed on 200; otherwise the image is
  allowed only if an anonymous HEAD succeeds (it is public);
* a user without credentials for the registry is the anonymous user: one
  anonymous HEAD decides both the public verdict and theirs.

Verdicts are per (uid, registry, repository, digest), and the public ones per
(registry, repository, digest): positive for DEFAULT_TTL, negative for
NEGATIVE_TTL. They are shared cluster-wide (verdicts.py: records in the cache
that only root can write, a wall-clock expiry, contents that must match the
key) and one node at a time asks about an image, so a job on N nodes costs
one request per user and image per TTL, not one per node; each node also
remembers them in memory, so its steps read no file either. A revoked grant
stops working within the TTL (plus verdicts.CLOCK_SLACK of clock skew). The
node that pulled the image with a user's credentials records a positive
verdict for that user (record_pulled): the registry just answered it.

A registry that cannot be reached fails closed for a private image, with a
message that says so; that answer is this node's alone (for at most 5 s: a
network problem of one node is not the registry's verdict). A positive
verdict still valid keeps working meanwhile.

Root (uid 0, or no uid: the daemon's own `oci-image pull`) is never checked.
Images that never came from a registry (a user's own .sqfs) are not checked
here: the runtime checks that the user can read the file.

Wiring (the caller's side, see docs/reliability.md): ImageStore gets
`self.access = AccessChecker(self.client, shared=SharedAnswers(cache))`, and
every path that hands a cache entry to a request carrying a uid without the
registry having been asked with that uid's credentials calls
`self.access.check(entry, uid)` first.
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
from .verdicts import SharedAnswers

log = logging.getLogger("ociimage.access")

DEFAULT_TTL = 300.0
NEGATIVE_TTL = 30.0
#: an unreachable registry: this node's own answer, kept briefly
UNREACHABLE_TTL = 5.0

#: the registry's definite answers about a manifest (anything else is an error)
_ANSWERS = (200, 401, 403, 404)


@dataclass
class _Answer:
    allowed: bool
    expires: float  # by self._clock (monotonic unless a test gives another)
    reason: str = ""


class AccessChecker:
    """client_for(uid) -> a RegistryClient with that user's credentials (None: anonymous).

    shared: where verdicts are shared with the other nodes (None: this node only).
    """

    def __init__(self, client_for: Callable[[Optional[int]], RegistryClient], *,
                 ttl: float = DEFAULT_TTL, negative_ttl: float = NEGATIVE_TTL,
                 clock: Callable[[], float] = time.monotonic, anonymous_client=None,
                 shared: Optional[SharedAnswers] = None):
        self._client_for = client_for
        self._anonymous = anonymous_client
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._shared = shared or SharedAnswers(None)
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
        ans = self._known(ref, entry.digest, uid)
        if ans is None:
            # The user's credentials are read (as the user, which may be slow: their home
            # on a hung filesystem) BEFORE the cluster-wide lock below, so one user can
            # only delay their own check, never another user's question about the image.
            started = self._clock()
            client = self._client_for(uid)
            has_credentials = self._has_credentials(client, ref.domain)
            # One node at a time asks about this image; the others then find its answer.
            with self._shared.asking("access", ref.domain, ref.path, entry.digest):
                ans = self._known(ref, entry.digest, uid)
                if ans is None:
                    ans = self._ask(ref, entry.digest, uid, client, has_credentials, started)
        if not ans.allowed:
            raise AccessDenied(ans.reason)

    def remembered(self, entry: CacheEntry, uid: Optional[int]) -> Optional[bool]:
        """check() from this daemon's memory alone: True (may use it), False (may not:
        check() raises the reason), None (not known here: only check() can tell).
        Never reads a file or asks the registry, so the hot path can call it anywhere."""
        if uid is None or uid == 0:
            return True
        ref = self._source(entry)
        if ref is None:
            return True
        now = self._clock()
        pkey = (ref.domain, ref.path, entry.digest)
        with self._lock:
            public = self._public.get(pkey)
            mine = self._users.get((uid,) + pkey)
        if public is not None and public.allowed and public.expires > now:
            return True
        if mine is not None and mine.expires > now:
            return mine.allowed
        return None

    def now(self) -> float:
        """This checker's clock, for record_pulled's `since`."""
        return self._clock()

    def record_pulled(self, uid: Optional[int], ref: Reference, digest: str,
                      since: Optional[float] = None) -> None:
        """The registry served digest from ref's repository to uid's credentials (at or
        after `since`, now() when the pull began: the verdict's TTL counts from then)."""
        if uid is None or uid == 0:
            return
        self._remember((uid, ref.domain, ref.path, digest), True, self.ttl, "", share=True,
                       since=since)

    def forget(self, uid: Optional[int] = None) -> None:
        """Forget this node's memory of verdicts (the shared records expire on their own)."""
        with self._lock:
            if uid is None:
                self._users.clear()
                self._public.clear()
            else:
                for k in [k for k in self._users if k[0] == uid]:
                    del self._users[k]

    # ---- what is known: this node's memory, then the shared records -------

    def _known(self, ref: Reference, digest: str, uid: int) -> Optional[_Answer]:
        pkey = (ref.domain, ref.path, digest)
        public = self._lookup(self._public, pkey)
        if public is not None and public.allowed:
            return public
        mine = self._lookup(self._users, (uid,) + pkey)
        if mine is not None:
            return mine
        return None

    def _lookup(self, memo: dict, key: tuple) -> Optional[_Answer]:
        now = self._clock()
        with self._lock:
            ans = memo.get(key)
        if ans is not None and ans.expires > now:
            return ans
        rec = self._shared.verdict(_record_key(key), ttl=self.ttl,
                                   negative_ttl=self.negative_ttl)
        if rec is None:
            return None
        ans = _Answer(rec["allowed"], now + rec["remaining"], rec["reason"])
        with self._lock:
            memo[key] = ans
        return ans

    def _remember(self, key: tuple, allowed: bool, ttl: float, reason: str, *,
                  share: bool, since: Optional[float] = None) -> _Answer:
        # A verdict is good for ttl from when the question was ASKED (since), not from when
        # a slow answer arrived: a grant revoked meanwhile must stop working in time.
        if since is not None:
            ttl = max(0.0, ttl - (self._clock() - since))
        ans = _Answer(allowed, self._clock() + ttl, reason)
        with self._lock:
            (self._users if len(key) == 4 else self._public)[key] = ans
        if share:
            self._shared.record_verdict(_record_key(key), allowed, ttl, reason)
        return ans

    # ---- asking the registry ---------------------------------------------

    def _ask(self, ref: Reference, digest: str, uid: int, client: RegistryClient,
             has_credentials: bool, started: float) -> _Answer:
        pkey = (ref.domain, ref.path, digest)
        ukey = (uid,) + pkey
        if not has_credentials:
            # The user is the anonymous user here: one question decides both verdicts.
            public = self._ask_public(ref, digest, started)
            if public is None:
                return self._unreachable(ukey, ref, digest, "")
            if public.allowed:
                return public
            return self._refused(ukey, ref, digest, public.reason)
        try:
            status = self._head(client, ref, digest)
        except RegistryUnavailable as e:
            log.warning("cannot confirm access to a private image",
                        extra={"uid": uid, "repository": f"{ref.domain}/{ref.path}",
                               "error": str(e)})
            return self._unreachable(ukey, ref, digest, str(e))
        except OciImageError as e:
            log.warning("cannot confirm access to a private image",
                        extra={"uid": uid, "repository": f"{ref.domain}/{ref.path}",
                               "error": str(e)})
            return self._remember(ukey, False, self.negative_ttl,
                                  f"cannot confirm that you may use the private image "
                                  f"{_short(digest)}: its registry answered with an error",
                                  share=False)
        if status == 200:
            return self._remember(ukey, True, self.ttl, "", share=True, since=started)
        # Refused with the user's own credentials (say stale ones): still allowed if it is
        # public, as it would be for a user without any.
        public = self._lookup(self._public, pkey) or self._ask_public(ref, digest, started)
        if public is not None and public.allowed:
            return public
        return self._refused(ukey, ref, digest, f"HTTP {status}")

    def _ask_public(self, ref: Reference, digest: str,
                    started: Optional[float] = None) -> Optional[_Answer]:
        """The anonymous verdict, shared (None: the registry could not be asked)."""
        started = self._clock() if started is None else started
        client = self._anonymous or self._client_for(None)
        try:
            status = self._head(client, ref, digest)
        except OciImageError:
            return None
        public = status == 200
        return self._remember((ref.domain, ref.path, digest), public,
                              self.ttl if public else self.negative_ttl,
                              "" if public else f"HTTP {status}", share=True, since=started)

    def _refused(self, ukey: tuple, ref: Reference, digest: str, why: str) -> _Answer:
        where = f"{ref.domain}/{ref.path}"
        log.info("access to a cached private image refused",
                 extra={"uid": ukey[0], "repository": where, "digest": digest, "answer": why})
        # The message names neither the registry nor the repository the entry came from:
        # a digest is public (squeue shows every job's marker), where it came from may be
        # another user's private repository. The asker knows what they asked for.
        return self._remember(ukey, False, self.negative_ttl,
                              f"the registry of the cached image {_short(digest)} does not let "
                              f"you pull it ({why}): it is a private image; log in "
                              f"(`docker login REGISTRY`) as a user allowed to pull it",
                              share=True)

    def _unreachable(self, ukey: tuple, ref: Reference, digest: str, error: str) -> _Answer:
        where = f"{ref.domain}/{ref.path}"
        log.warning("cannot reach the registry of a cached private image",
                    extra={"uid": ukey[0], "repository": where, "error": error})
        return self._remember(ukey, False, min(self.negative_ttl, UNREACHABLE_TTL),
                              f"cannot confirm that you may use the private image "
                              f"{_short(digest)}: its registry cannot be reached; try again "
                              f"later", share=False)

    @staticmethod
    def _has_credentials(client: RegistryClient, domain: str) -> bool:
        # auth.credentials never raises: unreadable credential files count as none, so
        # such a user is asked about as the anonymous user (the stricter answer).
        return bool(client.auth.credentials(domain))

    @staticmethod
    def _source(entry: CacheEntry) -> Optional[Reference]:
        """Where the entry came from; None only for an entry that names no registry at all
        (imported by an admin). A name that cannot be parsed is refused, never waved by."""
        text = entry.meta.get("reference") or ""
        if not text:
            return None
        try:
            return parse_reference(text)
        except OciImageError:
            raise AccessDenied(f"cannot tell which registry the cached image {entry.digest} "
                               f"came from; ask an admin to remove it from the cache") from None

    def _head(self, client: RegistryClient, ref: Reference, digest: str) -> int:
        """Status of HEAD /v2/<repo>/manifests/<digest> (after auth, retries): one of _ANSWERS."""
        self.requests += 1
        # one registry operation like any other: bounded by request_timeout and aborted at
        # once when the request (a step, a publish) is cancelled, retries and all
        what = f"the access check of {ref.domain}/{ref.path}@{digest}"
        try:
            with client.transport.deadlines.operation(what):
                resp = client.transport.request("HEAD", ref.domain,
                                                f"/v2/{ref.path}/manifests/{digest}",
                                                client.pull_scopes(ref), {"Accept": mt.ACCEPT})
        except AuthenticationRequired:  # refused before any answer (no credentials for a
            return 401                  # Basic-auth registry): an answer, not an outage
        except AccessDenied:
            return 403
        status = resp.status_code
        if status == 200:
            resp.close()
            return 200
        try:
            client.transport.raise_for(resp, ref.domain, client.pull_scopes(ref),
                                       f"image not found: {ref.domain}/{ref.path}@{digest}",
                                       f"the manifest request for {ref.domain}/{ref.path}@{digest}")
        except (AuthenticationRequired, AccessDenied, NotFound):
            return status if status in _ANSWERS else 403
        return status if status in _ANSWERS else 403


def _record_key(key: tuple) -> dict:
    if len(key) == 4:
        return {"uid": key[0], "registry": key[1], "repository": key[2], "digest": key[3]}
    return {"registry": key[0], "repository": key[1], "digest": key[2]}


def _short(digest: str) -> str:
    """A digest as users see it in messages: the first 12 hex digits."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}…"
