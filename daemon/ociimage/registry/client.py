"""RegistryClient: one user's view of registries, the pull and push sides together.

This is the facade the rest of the daemon uses; the work is done by
modules with one job each:

* chain.py: the transport chain every request goes through (auth, retry
  with backoff, user agent, redirects that keep Authorization on the
  registry's origin and pass each target through the network policy,
  logging) on the guarded session of transport.py;
* deadlines.py: request_timeout, the blob deadline and cancellation;
* manifest.py: the manifest model (descriptors, manifests, indexes, checks);
* puller.py: resolve a reference, fetch manifests, configs and referrers;
* blobstream.py: a blob read that resumes with Range and verifies its digest;
* push.py: blob existence, cross-repository mount, monolithic or chunked
  resumable upload, manifest PUT;
* responses.py: a registry's answer as a typed error.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import requests

from .. import __version__
from ..cancel import CancelToken
from ..reference import Reference
from . import mediatypes as mt
from .auth import pull_scopes, push_scopes
from .chain import RegistryTransport
from .credentials import Credentials
from .deadlines import Deadlines
# The model's names are imported from here by the rest of the daemon too.
from .manifest import MAX_MANIFEST_SIZE, Descriptor, Manifest, PushedManifest, ResolvedImage
from .platform import Platform
from .puller import Puller
from .push import DEFAULT_CHUNK_SIZE, Pusher
from .retry import Backoff
from .transport import NetLimits, NetPolicy, guarded_session

DEFAULT_USER_AGENT = f"slurm-oci-image/{__version__} python-requests/{requests.__version__}"
DOCKER_HUB = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"

CredentialSource = Union[None, Callable[[str], Optional[Credentials]], object]


class RegistryClient:
    """A client for one user's view of registries (one credential source).

    credentials: None (anonymous), an object with .get(domain) (a
    CredentialStore, StaticCredentials or a dict of domain -> Credentials),
    or a callable domain -> Credentials.
    """

    def __init__(self, credentials: CredentialSource = None,
                 insecure_registries: Iterable[str] = (), timeout: float = 30,
                 retries: int = 5, backoff: float = 0.5, user_agent: str = DEFAULT_USER_AGENT,
                 *, verify: Union[bool, str] = True, session: Optional[requests.Session] = None,
                 max_retry_after: float = 60.0, max_manifest_size: int = MAX_MANIFEST_SIZE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, limits: Optional[NetLimits] = None,
                 resolver=None, cancel: Optional[CancelToken] = None):
        # `timeout` is the stall timeout when no limits are given (older callers)
        self.limits = limits or NetLimits(connect=min(NetLimits.connect, timeout), stall=timeout)
        self.timeout = self.limits.stall
        self.backoff = Backoff(retries, backoff, max_retry_after)
        self.retries = self.backoff.retries
        self.policy = NetPolicy(insecure_registries, resolver=resolver)
        self.session = guarded_session(self.policy, session)
        self.session.verify = verify
        if credentials is None:
            lookup: Callable[[str], Optional[Credentials]] = lambda domain: None
        elif callable(credentials) and not hasattr(credentials, "get"):
            lookup = credentials  # type: ignore[assignment]
        else:
            lookup = credentials.get  # type: ignore[union-attr]
        self.transport = RegistryTransport(self.session, self.policy, self.limits, self.backoff,
                                           Deadlines(self.limits, cancel), user_agent, lookup,
                                           self.base_url)
        self.auth = self.transport.auth
        self.puller = Puller(self.transport, max_manifest_size)
        self.pusher = Pusher(self.transport, chunk_size)

    # -- context manager -------------------------------------------------

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- addressing ------------------------------------------------------

    @staticmethod
    def _hostname(domain: str) -> str:
        return (urlsplit("//" + domain).hostname or "").lower()

    def is_plain_http(self, domain: str) -> bool:
        """Loopback registries and configured insecure registries speak plain http."""
        return self.policy.plain_http_allowed(domain)

    def base_url(self, domain: str) -> str:
        host = DOCKER_HUB_REGISTRY if domain == DOCKER_HUB else domain
        return ("http://" if self.is_plain_http(domain) else "https://") + host

    # -- pull side (puller.py, blobstream.py) ------------------------------

    pull_scopes = staticmethod(pull_scopes)
    push_scopes = staticmethod(push_scopes)

    def ping(self, domain: str) -> bool:
        return self.puller.ping(domain)

    def get_manifest(self, ref: Reference, accept: str = mt.ACCEPT, *,
                     expected: Optional[Descriptor] = None) -> Manifest:
        return self.puller.get_manifest(ref, accept, expected=expected)

    def resolve_digest(self, ref: Reference) -> str:
        return self.puller.resolve_digest(ref)

    def resolve(self, ref: Reference, platform: Optional[Platform] = None) -> ResolvedImage:
        return self.puller.resolve(ref, platform)

    def open_blob(self, ref: Reference, descriptor: Descriptor,
                  on_bytes: Optional[Callable[[int], None]] = None,
                  on_retry: Optional[Callable[[str], None]] = None) -> BinaryIO:
        return self.puller.open_blob(ref, descriptor, on_bytes, on_retry)

    def fetch_blob(self, ref: Reference, descriptor: Descriptor, max_size: int) -> bytes:
        return self.puller.fetch_blob(ref, descriptor, max_size)

    def get_referrers(self, ref: Reference, digest: str,
                      artifact_type: Optional[str] = None) -> Optional[List[Descriptor]]:
        return self.puller.get_referrers(ref, digest, artifact_type)

    # -- push side (push.py) -----------------------------------------------

    def blob_exists(self, ref: Reference, digest: str,
                    scopes: Optional[Sequence[str]] = None) -> bool:
        return self.pusher.blob_exists(ref, digest, scopes)

    def mount_blob(self, ref: Reference, digest: str, from_repo: str) -> Optional[str]:
        return self.pusher.mount_blob(ref, digest, from_repo)

    def push_blob(self, ref: Reference, source, digest: str, size: int, *,
                  mount_from: Sequence[str] = (), chunk_size: Optional[int] = None,
                  on_bytes: Optional[Callable[[int], None]] = None) -> str:
        return self.pusher.push_blob(ref, source, digest, size, mount_from=mount_from,
                                     chunk_size=chunk_size, on_bytes=on_bytes)

    def upload_status(self, ref: Reference, scopes: Sequence[str],
                      location: str) -> Tuple[str, int]:
        return self.pusher.upload_status(ref, scopes, location)

    def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> PushedManifest:
        return self.pusher.put_manifest(ref, raw, media_type)
