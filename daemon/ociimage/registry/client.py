"""Pull and push sides of the OCI Distribution Spec, on requests.

Every byte taken from a registry is checked against a digest before use:
manifests by the digest they were asked for (or, by tag, against the
Docker-Content-Digest header), blobs while streaming. Redirects are
followed here rather than by requests, so that Authorization only ever goes
to the registry's own origin and never to blob storage it redirects to, and
so that each redirect target passes the network policy (transport.py: plain
http only to loopback and insecure registries, never to link-local or
metadata addresses). Every operation runs under a deadline, blobs also under
a minimum rate, and all of it under the cancellation token of the work that
asked (cancel.py): a server that trickles bytes cannot hold a thread.

The request core (_request: auth, retries, redirects; _raise_for: error
mapping) is method-agnostic and takes token scopes. The push side (blob
existence check, cross-repository mount, monolithic or chunked upload that
resumes from the registry's Range after an interruption, manifest PUT) asks
for `pull,push` on the target and `pull` on a mount source. The referrers
API is read here; its fallback tag scheme lives with its user (monolithic.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import (Any, BinaryIO, Callable, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Tuple, Union)
from urllib.parse import quote, urljoin, urlsplit

import requests
import urllib3

from .. import __version__
from ..cancel import CancelToken, current as current_token
from ..digests import ALGORITHMS, VerifyingReader, is_valid_digest, validate_digest
from ..errors import (AccessDenied, AuthenticationRequired, Cancelled, DigestMismatch,
                      LimitExceeded, NotFound, OciImageError, PlatformNotFound,
                      RegistryProtocolError, RegistryUnavailable, UnsupportedMediaType)
from ..reference import Reference
from . import mediatypes as mt
from .auth import Authenticator, read_limited, repository_scope
from .credentials import Credentials
from .platform import Platform, host_platform, select_platform
from .transport import (WATCHDOG, NetLimits, NetPolicy, Transfer, active_transfers,
                        guarded_session, watching)

log = logging.getLogger("ociimage.registry")

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 8 << 20
MAX_ERROR_BODY = 64 << 10
MAX_REDIRECTS = 10
READ_CHUNK = 64 << 10
MAX_BACKOFF = 30.0
DEFAULT_USER_AGENT = f"slurm-oci-image/{__version__} python-requests/{requests.__version__}"
DOCKER_HUB = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"

_RETRY_STATUSES = {429, 500, 502, 503, 504}
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_NOT_FOUND_CODES = {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"}
# Errors raised by requests/urllib3/sockets while a response body streams.
_STREAM_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _url_for_log(url: str) -> str:
    # Pre-signed storage URLs carry signatures in the query string.
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}{p.path}"


def _origin(url: str):
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return (p.scheme.lower(), (p.hostname or "").lower(), port)


def _describe(exc: BaseException) -> str:
    """A short, secret-free reason for a transport error (its text may embed URLs)."""
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("timed out", "timed out"), ("Read timed out", "timed out"),
                           ("Name or service not known", "host name not found"),
                           ("nodename nor servname", "host name not found"),
                           ("Temporary failure in name resolution", "host name not found"),
                           ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
                           ("Connection reset", "connection reset"),
                           ("IncompleteRead", "connection closed mid-transfer"),
                           ("RemoteDisconnected", "connection closed by the server"),
                           ("Connection aborted", "connection aborted")):
        if needle in text:
            return reason
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    return type(exc).__name__


MOUNTED = "mounted"
MAX_REFERRER_PAGES = 20
DEFAULT_CHUNK_SIZE = 32 << 20


class _UploadLost(Exception):
    """The registry lost an upload session (or never finished it): start over."""


@dataclass(frozen=True)
class PushedManifest:
    reference: Reference
    digest: str
    size: int
    media_type: str
    #: the registry answered OCI-Subject: it indexes `subject` itself (referrers API)
    subject_processed: bool = False

    def descriptor(self, **kw) -> Descriptor:
        return Descriptor(media_type=self.media_type, digest=self.digest, size=self.size, **kw)


def _read_range(source, offset: int, n: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[offset:offset + n])
    with open(source, "rb") as f:
        f.seek(offset)
        data = f.read(n)
    if len(data) != n:
        raise OciImageError(f"{source} changed while it was being uploaded")
    return data


def _with_query(url: str, key: str, value: str) -> str:
    sep = "&" if urlsplit(url).query else "?"
    return f"{url}{sep}{key}={quote(value, safe=':')}"


def _range_end(header: Optional[str]) -> int:
    """'0-1023' -> 1024 (bytes held); '' -> 0. 'bytes=0-1023' is accepted too."""
    if not header:
        return 0
    value = header.strip()
    if value.startswith("bytes="):
        value = value[6:]
    start, _, end = value.partition("-")
    try:
        end_i = int(end)
    except ValueError:
        return 0
    return end_i + 1 if end_i >= 0 else 0


def _next_link(header: str) -> Optional[str]:
    for part in header.split(","):
        if 'rel="next"' in part or "rel=next" in part:
            url = part.split(";", 1)[0].strip()
            if url.startswith("<") and url.endswith(">"):
                return url[1:-1]
    return None

def _registry_op(kind: str):
    """Run a client method as one registry operation (RegistryClient._operation)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, target, *args, **kwargs):
            name = target.familiar() if isinstance(target, Reference) else str(target)
            with self._operation(f"{kind} ({name})"):
                return fn(self, target, *args, **kwargs)
        return wrapper
    return deco


class _NoAuth(requests.auth.AuthBase):
    """Passed as auth= so requests does not add ~/.netrc credentials on its own."""

    def __call__(self, r):
        return r


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Optional[Platform] = None
    artifact_type: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "descriptor") -> "Descriptor":
        if not isinstance(d, dict):
            raise RegistryProtocolError(f"{where}: descriptor is not a JSON object")
        media_type = d.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise RegistryProtocolError(f"{where}: descriptor has no mediaType")
        digest = validate_digest(d.get("digest"), what=f"digest in {where}",
                                 error=RegistryProtocolError)
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryProtocolError(f"{where}: descriptor {digest} has no valid size")
        urls = d.get("urls") or ()
        annotations = d.get("annotations") or {}
        artifact_type = d.get("artifactType")
        return cls(media_type=media_type, digest=digest, size=size,
                   urls=tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (),
                   annotations=annotations if isinstance(annotations, dict) else {},
                   platform=Platform.from_dict(d.get("platform")) if "platform" in d else None,
                   artifact_type=artifact_type if isinstance(artifact_type, str) else None)

    def to_dict(self) -> dict:
        d: Dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            d["platform"] = self.platform.to_dict()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    raw: bytes = field(repr=False)
    data: dict = field(repr=False)

    @property
    def is_index(self) -> bool:
        return mt.is_index(self.media_type)

    @property
    def manifests(self) -> List[Descriptor]:
        """The entries of an index (empty for an image manifest)."""
        if not self.is_index:
            return []
        return [Descriptor.from_dict(d, f"index {self.digest}") for d in self.data["manifests"]]

    @property
    def config(self) -> Descriptor:
        if self.is_index:
            raise RegistryProtocolError(f"{self.digest} is an index, not an image manifest")
        return Descriptor.from_dict(self.data["config"], f"config of manifest {self.digest}")

    @property
    def layers(self) -> List[Descriptor]:
        if self.is_index:
            raise RegistryProtocolError(f"{self.digest} is an index, not an image manifest")
        return [Descriptor.from_dict(d, f"layer of manifest {self.digest}")
                for d in self.data["layers"]]

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class ResolvedImage:
    #: the image reference pinned to the platform manifest's digest (tag kept)
    reference: Reference
    manifest: Manifest
    #: digest of the index the manifest was chosen from, None for a single-platform image
    index_digest: Optional[str]
    config_descriptor: Descriptor
    config: dict = field(repr=False)
    layers: List[Descriptor] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def platform(self) -> Platform:
        c = self.config
        return Platform(str(c.get("os", "")), str(c.get("architecture", "")),
                        c.get("variant") if isinstance(c.get("variant"), str) else None)


CredentialSource = Union[None, Callable[[str], Optional[Credentials]], Any]


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
        #: None: the token current() on the thread doing each operation
        self._cancel = cancel
        #: blobs up to this size go up in one PUT; larger ones in PATCH chunks of it
        self.chunk_size = chunk_size
        #: None, or the largest chunk (a chunk is read into memory) this client sends,
        #: whatever the registry's OCI-Chunk-Min-Length asks for: oci-imaged publishing to
        #: a registry a user chose must not read a whole image into root's memory
        self.max_chunk_size: Optional[int] = None
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.user_agent = user_agent
        self.max_retry_after = max_retry_after
        self.max_manifest_size = max_manifest_size
        self.policy = NetPolicy(insecure_registries, resolver=resolver)
        self.session = guarded_session(self.policy, session)
        self.session.verify = verify
        if credentials is None:
            lookup: Callable[[str], Optional[Credentials]] = lambda domain: None
        elif callable(credentials) and not hasattr(credentials, "get"):
            lookup = credentials
        else:
            lookup = credentials.get
        self.auth = Authenticator(self._fetch_plain, lookup,
                                  may_send_secrets_to=self._may_send_secrets_to,
                                  operation=self._operation)

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

    def _may_send_secrets_to(self, url: str) -> bool:
        p = urlsplit(url)
        if p.scheme.lower() == "https":
            return True
        return self.is_plain_http(p.netloc)

    # -- deadlines and cancellation --------------------------------------

    def _token(self) -> CancelToken:
        return self._cancel or current_token()

    def _transfer(self, what: str, deadline: Optional[float] = None, *,
                  blob_size: Optional[int] = None) -> Transfer:
        lim = self.limits
        if blob_size is not None:
            return Transfer(what, lim.blob_deadline(blob_size), min_rate=lim.min_rate,
                            window=lim.rate_window, cancel=self._token(),
                            limit_name="[registries] request_timeout plus the size at min_rate")
        return Transfer(what, deadline or lim.request, cancel=self._token(),
                        limit_name="[registries] request_timeout")

    @staticmethod
    def _abort_error(t: Transfer) -> OciImageError:
        if t.cancelled:
            return Cancelled(t.reason)
        return RegistryUnavailable(f"{t.what} was abandoned: {t.reason}",
                                   hint="the registry is too slow or stalling; try again later")

    def _raise_if_aborted(self, *extra: Transfer) -> None:
        """Raise the typed error of an operation on this thread that ran out or was cancelled."""
        token = self._token()
        for t in list(extra) + active_transfers():
            if t.expired():
                raise self._abort_error(t) from None
        token.check()

    @contextlib.contextmanager
    def _operation(self, what: str, deadline: Optional[float] = None):
        """One registry operation, retries included, bounded by request_timeout (or deadline).

        Whatever the operation raised after its transfer was abandoned (a
        reset socket, a short body) is replaced by the reason it was abandoned.
        """
        t = self._transfer(what, deadline)
        t.expired()
        with watching(t):
            try:
                yield t
            except OciImageError:
                if t.reason is not None:
                    raise self._abort_error(t) from None
                raise
            except _STREAM_ERRORS:
                if t.reason is not None:
                    raise self._abort_error(t) from None
                raise
            if t.reason is not None:
                raise self._abort_error(t)

    def _sleep(self, delay: float, *extra: Transfer) -> None:
        """A backoff that ends early when the work is cancelled or out of time."""
        limit = delay
        for t in list(extra) + active_transfers():
            left = t.remaining()
            if left is not None:
                limit = min(limit, max(0.0, left) + 0.01)
        self._token().wait(limit)
        self._raise_if_aborted(*extra)

    # -- transport -------------------------------------------------------

    def _backoff_delay(self, attempt: int) -> float:
        base = min(MAX_BACKOFF, self.backoff * (2 ** attempt))
        return base + random.uniform(0, base / 2)

    def _retry_after(self, resp: requests.Response) -> Optional[float]:
        value = resp.headers.get("Retry-After")
        if not value:
            return None
        value = value.strip()
        if value.isdigit():
            delay = float(value)
        else:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None:
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            delay = (when - datetime.now(timezone.utc)).total_seconds()
        # a registry asking for an hour should fail the pull rather than hang it
        return max(0.0, min(delay, self.max_retry_after))

    def _send(self, method: str, url: str, headers: Mapping[str, str], *,
              params=None, data=None, what: str = "") -> requests.Response:
        """One exchange, following redirects by hand.

        Authorization is kept only while the URL stays on the origin it was
        meant for; blob storage behind a redirect never sees it. Each URL,
        the first and every redirect target, passes the network policy first.
        """
        origin = _origin(url)
        self.policy.check_url(url, what or f"the request to {origin[1]}")
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if _origin(url) != origin:
                h.pop("Authorization", None)
            self._raise_if_aborted()
            resp = self.session.request(method, url, headers=h, params=params, data=data,
                                        stream=True,
                                        timeout=(self.limits.connect, self.limits.stall),
                                        allow_redirects=False, auth=_NoAuth())
            log.debug("%s %s -> %d", method, _url_for_log(url), resp.status_code)
            location = resp.headers.get("Location")
            if resp.status_code not in _REDIRECT_STATUSES or not location:
                return resp
            resp.close()
            new_url = urljoin(resp.url, location)
            if urlsplit(new_url).scheme.lower() not in ("http", "https"):
                raise RegistryProtocolError(f"{_origin(url)[1]} redirected to a non-http URL")
            self.policy.check_url(new_url, f"the redirect from {urlsplit(url).netloc} to "
                                           f"{_url_for_log(new_url)}")
            if resp.status_code == 303 and method not in ("GET", "HEAD"):
                method, data = "GET", None
            # the query is now part of the new URL
            url, params = new_url, None
        raise RegistryProtocolError(f"too many redirects from {origin[1]}")

    def _fetch_plain(self, method: str, url: str, *, headers=None, params=None,
                     data=None, what: str = "") -> requests.Response:
        """A request outside registry auth (token realms, ping), with retries."""
        attempt = 0
        while True:
            h = {"User-Agent": self.user_agent}
            h.update(headers or {})
            try:
                resp = self._send(method, url, h, params=params, data=data, what=what)
            except requests.RequestException as e:
                self._raise_if_aborted()
                if attempt >= self.retries:
                    raise RegistryUnavailable(f"cannot reach {urlsplit(url).netloc}: "
                                              f"{_describe(e)}") from None
                self._sleep(self._backoff_delay(attempt))
                attempt += 1
                continue
            if resp.status_code in _RETRY_STATUSES and attempt < self.retries:
                delay = self._retry_after(resp)
                resp.close()
                self._sleep(delay if delay is not None else self._backoff_delay(attempt))
                attempt += 1
                continue
            return resp

    def _request(self, method: str, domain: str, path: str, scopes: Sequence[str],
                 headers: Optional[Mapping[str, str]] = None, *, data=None,
                 url: Optional[str] = None, retries: Optional[int] = None) -> requests.Response:
        """A registry API request with auth, retries on 5xx/429/connection errors.

        Returns the final response, whatever its status; the caller maps
        errors with _raise_for and must close it. `url` (an upload Location)
        replaces base_url + path; credentials go with it only when it is on
        the registry's own origin. `retries` overrides the client's count
        (0 for requests that are not safe to repeat blindly, e.g. PATCH).
        """
        base = self.base_url(domain)
        url = urljoin(base + "/", url) if url else base + path
        same_origin = _origin(url) == _origin(base)
        max_retries = self.retries if retries is None else max(0, retries)
        authorization = self.auth.cached_authorization(domain, scopes) if same_origin else None
        auth_retried = False
        attempt = 0
        while True:
            h = {"User-Agent": self.user_agent}
            h.update(headers or {})
            if authorization:
                h["Authorization"] = authorization
            try:
                resp = self._send(method, url, h, data=data,
                                  what=f"the request to registry {domain}")
            except requests.RequestException as e:
                self._raise_if_aborted()
                if attempt >= max_retries:
                    raise RegistryUnavailable(f"cannot reach registry {domain}: "
                                              f"{_describe(e)}") from None
                delay = self._backoff_delay(attempt)
                log.debug("%s %s failed (%s); retrying in %.2fs", method, domain,
                          _describe(e), delay)
                self._sleep(delay)
                attempt += 1
                continue
            if resp.status_code == 401 and not auth_retried and same_origin:
                auth_retried = True
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.close()
                new = self.auth.authorize(domain, scopes, challenge, sent=authorization)
                if new is None:
                    raise self._auth_error(domain, scopes, anonymous=True)
                authorization = new
                continue
            if resp.status_code in _RETRY_STATUSES and attempt < max_retries:
                delay = self._retry_after(resp)
                if delay is None:
                    delay = self._backoff_delay(attempt)
                log.debug("%s %s: HTTP %d; retrying in %.2fs", method, domain,
                          resp.status_code, delay)
                resp.close()
                self._sleep(delay)
                attempt += 1
                continue
            return resp

    # -- errors ----------------------------------------------------------

    def _scrub(self, domain: str, text: str) -> str:
        creds = self.auth.credentials(domain)
        for secret in (creds.secrets() if creds else []):
            text = text.replace(secret, "***")
        return text

    @staticmethod
    def _repo_of(scopes: Sequence[str]) -> str:
        for s in scopes:
            parts = s.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                return ":".join(parts[1:-1])
        return ""

    def _auth_error(self, domain: str, scopes: Sequence[str], *, anonymous: bool) -> OciImageError:
        repo = self._repo_of(scopes)
        where = f"{domain}/{repo}" if repo else domain
        if anonymous or not self.auth.credentials(domain):
            return AuthenticationRequired(
                f"authentication required for {where}: log in with `docker login {domain}` "
                f"or provide credentials in ~/.docker/config.json")
        ch = self.auth._challenges.get(domain)
        if ch is not None and ch.scheme == "bearer":
            # the token server took the credentials but the token grants no access
            action = "push" if any(s.endswith(",push") or s.endswith(":push")
                                   for s in scopes) else "pull"
            return AccessDenied(f"access denied to {where}: the credentials for {domain} "
                                f"do not grant {action} access (or the repository does not "
                                f"exist)")
        return AuthenticationRequired(
            f"the credentials for {domain} were rejected for {where}: log in again with "
            f"`docker login {domain}` or fix ~/.docker/config.json")

    def _raise_for(self, resp: requests.Response, domain: str, scopes: Sequence[str],
                   not_found: str, what: str) -> None:
        """Raise the typed error for a non-success response (and close it)."""
        status = resp.status_code
        code, message = "", ""
        try:
            if resp.request is not None and resp.request.method != "HEAD":
                body = read_limited(resp, MAX_ERROR_BODY)
                if body:
                    try:
                        errors = json.loads(body).get("errors")
                    except (ValueError, AttributeError):
                        errors = None
                    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                        code = str(errors[0].get("code") or "")
                        message = str(errors[0].get("message") or "")
        except _STREAM_ERRORS:
            pass
        finally:
            resp.close()
        message = self._scrub(domain, _one_line(message))
        code = _one_line(code, 40)
        detail = f": {message}" if message else ""
        repo = self._repo_of(scopes)
        where = f"{domain}/{repo}" if repo else domain
        if status == 401:
            raise self._auth_error(domain, scopes, anonymous=False)
        if status == 403 or code == "DENIED":
            raise AccessDenied(f"access denied to {where}{detail}")
        if status == 404 or code in _NOT_FOUND_CODES:
            raise NotFound(not_found)
        if status == 429 or code == "TOOMANYREQUESTS":
            raise RegistryUnavailable(f"registry {domain} is rate limiting requests "
                                      f"(HTTP 429): try again later")
        if status >= 500:
            raise RegistryUnavailable(f"registry {domain} failed on {what} (HTTP {status}){detail}")
        code_text = f" {code}" if code else ""
        raise RegistryProtocolError(f"registry {domain} answered HTTP {status}{code_text} "
                                    f"to {what}{detail}")

    # -- API -------------------------------------------------------------

    @_registry_op("the ping of registry")
    def ping(self, domain: str) -> bool:
        """True when `domain` answers as a v2 registry (200, or 401 with a challenge)."""
        resp = self._fetch_plain("GET", self.base_url(domain) + "/v2/")
        try:
            if resp.status_code == 200:
                return True
            if resp.status_code == 401 and resp.headers.get("WWW-Authenticate"):
                return True
        finally:
            resp.close()
        if resp.status_code in _RETRY_STATUSES:
            raise RegistryUnavailable(f"registry {domain} failed (HTTP {resp.status_code})")
        raise RegistryProtocolError(f"{domain} does not look like an OCI registry "
                                    f"(GET /v2/ answered HTTP {resp.status_code})")

    @staticmethod
    def pull_scopes(ref: Reference) -> List[str]:
        return [repository_scope(ref.path, ("pull",))]

    @_registry_op("the manifest request")
    def get_manifest(self, ref: Reference, accept: str = mt.ACCEPT, *,
                     expected: Optional[Descriptor] = None) -> Manifest:
        """Fetch and verify the manifest or index `ref` names (its digest, else its tag)."""
        scopes = self.pull_scopes(ref)
        path = f"/v2/{ref.path}/manifests/{ref.identifier}"
        attempt = 0
        while True:
            resp = self._request("GET", ref.domain, path, scopes, {"Accept": accept})
            if resp.status_code != 200:
                self._raise_for(resp, ref.domain, scopes, f"image not found: {ref.familiar()}",
                                f"the manifest request for {ref.familiar()}")
            try:
                length = resp.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > self.max_manifest_size:
                    raise LimitExceeded(f"manifest of {ref.familiar()} is {int(length)} bytes, "
                                        f"over the {self.max_manifest_size} byte limit")
                raw = read_limited(resp, self.max_manifest_size)
                if raw is None:
                    raise LimitExceeded(f"manifest of {ref.familiar()} is over the "
                                        f"{self.max_manifest_size} byte limit")
                content_type = mt.base_type(resp.headers.get("Content-Type", ""))
                header_digest = resp.headers.get("Docker-Content-Digest")
            except _STREAM_ERRORS as e:
                if attempt >= self.retries:
                    raise RegistryUnavailable(f"reading the manifest of {ref.familiar()} "
                                              f"kept failing: {_describe(e)}") from None
                self._sleep(self._backoff_delay(attempt))
                attempt += 1
                continue
            finally:
                resp.close()
            return self._parse_manifest(ref, raw, content_type, header_digest, expected)

    def _parse_manifest(self, ref: Reference, raw: bytes, content_type: str,
                        header_digest: Optional[str], expected: Optional[Descriptor]) -> Manifest:
        name = ref.familiar()
        if ref.digest:
            algorithm = ref.digest.split(":", 1)[0]
            actual = f"{algorithm}:{ALGORITHMS[algorithm](raw).hexdigest()}"
            if actual != ref.digest:
                raise DigestMismatch(f"manifest of {name}: content digest is {actual}, "
                                     f"expected {ref.digest}")
            digest = ref.digest
        else:
            digest = "sha256:" + ALGORITHMS["sha256"](raw).hexdigest()
            if header_digest and is_valid_digest(header_digest.strip()):
                header_digest = header_digest.strip()
                algorithm = header_digest.split(":", 1)[0]
                actual = f"{algorithm}:{ALGORITHMS[algorithm](raw).hexdigest()}"
                if actual != header_digest:
                    raise DigestMismatch(f"manifest of {name}: content digest is {actual}, "
                                         f"but the registry announced {header_digest}")
            elif header_digest:
                log.debug("ignoring malformed Docker-Content-Digest for %s", name)
        if expected is not None and expected.size != len(raw):
            raise DigestMismatch(f"manifest {digest} of {name} is {len(raw)} bytes, "
                                 f"the index says {expected.size}")
        try:
            data = json.loads(raw)
        except ValueError:
            raise RegistryProtocolError(f"manifest of {name} is not valid JSON") from None
        if not isinstance(data, dict):
            raise RegistryProtocolError(f"manifest of {name} is not a JSON object")
        if data.get("schemaVersion") == 1 or content_type in mt.SCHEMA1_TYPES:
            raise UnsupportedMediaType(f"{name} is a Docker schema 1 image, which is not "
                                       f"supported: re-push it with a current docker or podman")
        if "layers" in data and "manifests" in data:
            # CVE-2021-41190: an ambiguous document could be read as either kind
            raise RegistryProtocolError(f"manifest of {name} is ambiguous: it has both "
                                        f"'layers' and 'manifests'")
        declared = data.get("mediaType")
        if declared is not None and not isinstance(declared, str):
            raise RegistryProtocolError(f"manifest of {name} has an invalid mediaType")
        specific_ct = content_type in mt.ALL_MANIFEST_TYPES or content_type.startswith(
            "application/vnd.")
        if declared and specific_ct and content_type != declared:
            raise RegistryProtocolError(f"manifest of {name} is served as {content_type} but "
                                        f"declares mediaType {declared}")
        media_type = declared or (content_type if specific_ct else "")
        if not media_type:
            if isinstance(data.get("manifests"), list):
                media_type = mt.OCI_INDEX
            elif "config" in data and "layers" in data:
                media_type = mt.OCI_MANIFEST
        if media_type not in mt.ALL_MANIFEST_TYPES:
            raise UnsupportedMediaType(f"{name} has unsupported manifest type "
                                       f"'{_one_line(media_type, 100) or 'unknown'}'")
        if mt.is_index(media_type):
            if not isinstance(data.get("manifests"), list) or "config" in data:
                raise RegistryProtocolError(f"index of {name} is malformed")
        else:
            if not isinstance(data.get("config"), dict) or not isinstance(data.get("layers"), list):
                raise RegistryProtocolError(f"manifest of {name} is malformed: it needs "
                                            f"'config' and 'layers'")
        if expected is not None and expected.media_type in mt.ALL_MANIFEST_TYPES \
                and expected.media_type != media_type:
            raise RegistryProtocolError(f"manifest {digest} of {name} is {media_type}, "
                                        f"the index says {expected.media_type}")
        return Manifest(media_type=media_type, digest=digest, raw=raw, data=data)

    @_registry_op("the tag lookup")
    def resolve_digest(self, ref: Reference) -> str:
        """Tag -> digest cheaply (HEAD); the digest of whatever the tag names (index or manifest)."""
        if ref.digest:
            return ref.digest
        scopes = self.pull_scopes(ref)
        resp = self._request("HEAD", ref.domain, f"/v2/{ref.path}/manifests/{ref.identifier}",
                             scopes, {"Accept": mt.ACCEPT})
        if resp.status_code == 200:
            digest = (resp.headers.get("Docker-Content-Digest") or "").strip()
            resp.close()
            if is_valid_digest(digest):
                return digest
            log.debug("no usable Docker-Content-Digest on HEAD for %s; using GET", ref.familiar())
        elif resp.status_code in (405, 501):
            resp.close()
        else:
            self._raise_for(resp, ref.domain, scopes, f"image not found: {ref.familiar()}",
                            f"the manifest request for {ref.familiar()}")
        return self.get_manifest(ref).digest

    def resolve(self, ref: Reference, platform: Optional[Platform] = None) -> ResolvedImage:
        """Follow `ref` to the image manifest for `platform` (default: this host) and its config."""
        want = platform or host_platform()
        manifest = self.get_manifest(ref)
        index_digest = None
        image_ref = ref
        if manifest.is_index:
            index_digest = manifest.digest
            candidates = []
            for desc in manifest.manifests:
                if desc.media_type in mt.MANIFEST_TYPES:
                    candidates.append((desc.platform, desc))
            chosen = select_platform(want, candidates)
            image_ref = ref.with_digest(chosen.digest)
            log.debug("%s: chose %s for %s", ref.familiar(), chosen.digest, want)
            manifest = self.get_manifest(image_ref, accept=mt.ACCEPT, expected=chosen)
            if manifest.is_index:
                raise RegistryProtocolError(f"{ref.familiar()}: nested image indexes are "
                                            f"not supported")
        else:
            image_ref = ref.with_digest(manifest.digest)
        config_desc = manifest.config
        if config_desc.media_type not in mt.CONFIG_TYPES:
            raise UnsupportedMediaType(f"{ref.familiar()} is not a container image (its config "
                                       f"is {_one_line(config_desc.media_type, 100)})")
        raw = self.fetch_blob(image_ref, config_desc, MAX_CONFIG_SIZE)
        try:
            config = json.loads(raw)
        except ValueError:
            raise RegistryProtocolError(f"config of {ref.familiar()} is not valid JSON") from None
        if not isinstance(config, dict):
            raise RegistryProtocolError(f"config of {ref.familiar()} is not a JSON object")
        layers = manifest.layers
        image = ResolvedImage(reference=image_ref, manifest=manifest, index_digest=index_digest,
                              config_descriptor=config_desc, config=config, layers=layers)
        if index_digest is None and config.get("os") and config.get("architecture"):
            have = image.platform
            if not want.can_run(have):
                if platform is not None:
                    raise PlatformNotFound(f"{ref.familiar()} is built for {have}, "
                                           f"not {want}; available: {have}")
                log.debug("%s is built for %s, this host is %s", ref.familiar(), have, want)
        return image

    def open_blob(self, ref: Reference, descriptor: Descriptor,
                  on_bytes: Optional[Callable[[int], None]] = None,
                  on_retry: Optional[Callable[[str], None]] = None) -> BinaryIO:
        """A verified stream of a blob; resumes with Range after connection trouble.

        The digest/size check happens when the stream is read to its end:
        read it to EOF before trusting what was read. on_retry(message) hears
        of each interruption (a stall past the timeout, a reset, a short
        body) before the download resumes, so a user can be told.
        """
        stream = _BlobStream(self, ref, descriptor, on_retry=on_retry)
        return VerifyingReader(stream, descriptor.digest, descriptor.size,  # type: ignore
                               name=f"blob {descriptor.digest} of {ref.familiar()}",
                               on_bytes=on_bytes)

    def fetch_blob(self, ref: Reference, descriptor: Descriptor, max_size: int) -> bytes:
        """A small blob (config, manifest-sized JSON) read fully and verified."""
        if descriptor.size > max_size:
            raise LimitExceeded(f"blob {descriptor.digest} of {ref.familiar()} is "
                                f"{descriptor.size} bytes, over the {max_size} byte limit")
        with self.open_blob(ref, descriptor) as f:
            return f.read()


    # -- push side -------------------------------------------------------

    @staticmethod
    def push_scopes(ref: Reference, mount_from: Optional[str] = None) -> List[str]:
        """`pull,push` on the target; `pull` on the repository a blob is mounted from."""
        scopes = [repository_scope(ref.path, ("pull", "push"))]
        if mount_from and mount_from != ref.path:
            scopes.append(repository_scope(mount_from, ("pull",)))
        return scopes

    @_registry_op("the blob existence check")
    def blob_exists(self, ref: Reference, digest: str,
                    scopes: Optional[Sequence[str]] = None) -> bool:
        """HEAD /v2/<name>/blobs/<digest>: is the blob in this repository?"""
        scopes = list(scopes or self.pull_scopes(ref))
        resp = self._request("HEAD", ref.domain, f"/v2/{ref.path}/blobs/{digest}", scopes)
        if resp.status_code == 200:
            resp.close()
            return True
        if resp.status_code == 404:
            resp.close()
            return False
        self._raise_for(resp, ref.domain, scopes, f"blob {digest} not found",
                        f"the existence check of blob {digest}")
        return False  # not reached

    @staticmethod
    def _location(resp: requests.Response, what: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryProtocolError(f"the registry answered {what} without a Location")
        return urljoin(resp.url, location)

    @_registry_op("the upload request")
    def _start_upload(self, ref: Reference, scopes: Sequence[str]) -> Tuple[str, int]:
        """POST /v2/<name>/blobs/uploads/ -> (upload URL, the registry's minimum chunk)."""
        resp = self._request("POST", ref.domain, f"/v2/{ref.path}/blobs/uploads/", scopes,
                             {"Content-Length": "0"})
        if resp.status_code != 202:
            self._raise_for(resp, ref.domain, scopes, f"repository {ref.name} not found",
                            f"the upload request to {ref.name}")
        location = self._location(resp, f"the upload request to {ref.name}")
        minimum = resp.headers.get("OCI-Chunk-Min-Length", "")
        resp.close()
        return location, int(minimum) if minimum.isdigit() else 0

    @_registry_op("the blob mount request")
    def mount_blob(self, ref: Reference, digest: str, from_repo: str) -> Optional[str]:
        """Cross-repository mount (POST .../blobs/uploads/?mount=&from=): MOUNTED, else
        the upload URL the registry opened instead, or None when it refused."""
        scopes = self.push_scopes(ref, from_repo)
        path = (f"/v2/{ref.path}/blobs/uploads/?mount={quote(digest, safe=':')}"
                f"&from={quote(from_repo, safe='/')}")
        resp = self._request("POST", ref.domain, path, scopes, {"Content-Length": "0"})
        try:
            if resp.status_code == 201:
                log.info("mounted blob %s into %s from %s", digest, ref.name, from_repo)
                return MOUNTED
            if resp.status_code == 202 and resp.headers.get("Location"):
                log.debug("mount of %s from %s refused; uploading", digest, from_repo)
                return self._location(resp, "the mount request")
            log.debug("mount of %s from %s answered HTTP %d", digest, from_repo,
                      resp.status_code)
            return None
        finally:
            resp.close()

    def push_blob(self, ref: Reference, source: Union[bytes, str, "os.PathLike"], digest: str,
                  size: int, *, mount_from: Sequence[str] = (),
                  chunk_size: Optional[int] = None,
                  on_bytes: Optional[Callable[[int], None]] = None) -> str:
        """Make blob `digest` exist in ref's repository; return how: "exists",
        "mounted" or "uploaded".

        Order: HEAD (already there), cross-repository mount from each of
        `mount_from` (same registry), else upload: one PUT when the blob fits
        in a chunk, PATCH chunks otherwise. An interrupted chunked upload asks
        the registry how much it has (GET on the upload URL, Range header) and
        goes on from there; an upload the registry forgot starts over.
        """
        validate_digest(digest)
        scopes = self.push_scopes(ref)
        if self.blob_exists(ref, digest, scopes):
            return "exists"
        location: Optional[str] = None
        for repo in mount_from:
            if not repo or repo == ref.path:
                continue
            try:
                got = self.mount_blob(ref, digest, repo)
            except OciImageError as e:  # e.g. no pull access to the source: upload instead
                log.debug("mount of %s from %s failed: %s", digest, repo, e)
                continue
            if got == MOUNTED:
                return "mounted"
            if got:
                location = got
                break
        chunk = max(1, int(chunk_size or self.chunk_size))
        restarts = 0
        while True:
            minimum = 0
            if location is None:
                location, minimum = self._start_upload(ref, scopes)
            if self.max_chunk_size is not None and size > chunk \
                    and max(chunk, minimum) > self.max_chunk_size:
                raise LimitExceeded(f"registry {ref.domain} wants upload chunks of at least "
                                    f"{minimum} bytes; at most {self.max_chunk_size} are "
                                    f"sent at once")
            try:
                if size <= chunk:
                    self._upload_monolithic(ref, scopes, location, source, digest, size,
                                            on_bytes)
                else:
                    self._upload_chunked(ref, scopes, location, source, digest, size,
                                         max(chunk, minimum), on_bytes)
                return "uploaded"
            except _UploadLost as e:
                restarts += 1
                if restarts > self.retries:
                    raise RegistryUnavailable(f"upload of blob {digest} to {ref.name} kept "
                                              f"failing: {e}") from None
                log.info("upload of %s to %s lost (%s); starting over", digest, ref.name, e)
                location = None
                self._sleep(self._backoff_delay(restarts - 1))

    def _upload_monolithic(self, ref, scopes, location, source, digest, size, on_bytes) -> None:
        data = _read_range(source, 0, size)
        try:
            with self._operation(f"the upload of blob {digest} to {ref.domain}",
                                 self.limits.blob_deadline(size)):
                resp = self._request("PUT", ref.domain, "", scopes,
                                     {"Content-Type": "application/octet-stream"},
                                     data=data, url=_with_query(location, "digest", digest),
                                     retries=0)
        except RegistryUnavailable as e:
            if self._blob_landed(ref, digest, scopes):
                return
            raise _UploadLost(str(e)) from None
        self._finish_upload(ref, scopes, resp, digest)
        if on_bytes:
            on_bytes(size)

    def _blob_landed(self, ref, digest, scopes) -> bool:
        try:
            return self.blob_exists(ref, digest, scopes)
        except OciImageError:
            return False

    def _finish_upload(self, ref, scopes, resp, digest) -> None:
        status = resp.status_code
        if status in (200, 201, 204):
            announced = (resp.headers.get("Docker-Content-Digest") or "").strip()
            resp.close()
            if announced and announced != digest:
                raise DigestMismatch(f"registry {ref.domain} stored blob {announced}, "
                                     f"we sent {digest}")
            return
        if status == 404 or status in _RETRY_STATUSES:
            resp.close()
            if self._blob_landed(ref, digest, scopes):
                return
            raise _UploadLost(f"HTTP {status} on completing the upload")
        if status == 400:
            body = b""
            try:
                body = read_limited(resp, MAX_ERROR_BODY) or b""
            except _STREAM_ERRORS:
                pass
            resp.close()
            if b"DIGEST_INVALID" in body:
                raise DigestMismatch(f"registry {ref.domain} says the uploaded blob does "
                                     f"not match {digest}")
            raise RegistryProtocolError(f"registry {ref.domain} refused the upload of "
                                        f"{digest} (HTTP 400)")
        self._raise_for(resp, ref.domain, scopes, f"repository {ref.name} not found",
                        f"the upload of blob {digest}")

    @_registry_op("the upload status request")
    def upload_status(self, ref: Reference, scopes: Sequence[str],
                      location: str) -> Tuple[str, int]:
        """GET on an upload URL: (the URL to go on with, bytes the registry holds)."""
        resp = self._request("GET", ref.domain, "", scopes, url=location)
        try:
            if resp.status_code == 404:
                raise _UploadLost("the registry no longer knows the upload")
            if resp.status_code not in (200, 204):
                self._raise_for(resp, ref.domain, scopes, "upload not found",
                                "the upload status request")
            new = urljoin(resp.url, resp.headers["Location"]) \
                if resp.headers.get("Location") else location
            return new, _range_end(resp.headers.get("Range"))
        finally:
            resp.close()

    def _upload_chunked(self, ref, scopes, location, source, digest, size, chunk,
                        on_bytes) -> None:
        offset = 0
        failures = 0
        reported = 0
        while offset < size:
            n = min(chunk, size - offset)
            data = _read_range(source, offset, n)
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Range": f"{offset}-{offset + n - 1}"}
            problem = ""
            try:
                with self._operation(f"a chunk upload of blob {digest} to {ref.domain}",
                                     self.limits.blob_deadline(n)):
                    resp = self._request("PATCH", ref.domain, "", scopes, headers, data=data,
                                         url=location, retries=0)
            except RegistryUnavailable as e:
                problem = str(e)
            else:
                status = resp.status_code
                if status == 202:
                    location = self._location(resp, "a chunk upload")
                    end = _range_end(resp.headers.get("Range"))
                    resp.close()
                    offset = end if end > offset else offset + n
                    failures = 0
                    if on_bytes and offset > reported:
                        on_bytes(offset - reported)
                        reported = offset
                    continue
                if status == 404:
                    resp.close()
                    raise _UploadLost("the registry no longer knows the upload")
                if status in (416,) or status in _RETRY_STATUSES:
                    problem = f"HTTP {status}"
                    resp.close()
                else:
                    self._raise_for(resp, ref.domain, scopes, f"repository {ref.name} not found",
                                    f"a chunk upload of blob {digest}")
            failures += 1
            if failures > self.retries:
                raise RegistryUnavailable(f"upload of blob {digest} to {ref.name} kept failing "
                                          f"at byte {offset}: {problem}")
            delay = self._backoff_delay(failures - 1)
            log.info("chunk upload of %s failed at byte %d (%s); asking the registry where to "
                     "resume in %.2fs", digest, offset, problem, delay)
            self._sleep(delay)
            location, offset = self.upload_status(ref, scopes, location)
            if offset > size:
                raise _UploadLost(f"the registry holds {offset} bytes of a {size} byte blob")
            log.info("resuming the upload of %s at byte %d", digest, offset)
        try:
            resp = self._request("PUT", ref.domain, "", scopes, {"Content-Length": "0"},
                                 url=_with_query(location, "digest", digest), retries=0)
        except RegistryUnavailable as e:
            if self._blob_landed(ref, digest, scopes):
                return
            raise _UploadLost(str(e)) from None
        self._finish_upload(ref, scopes, resp, digest)

    @_registry_op("the manifest upload")
    def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> "PushedManifest":
        """PUT a manifest or index under ref's tag (or, untagged, its own digest)."""
        digest = "sha256:" + ALGORITHMS["sha256"](raw).hexdigest()
        scopes = self.push_scopes(ref)
        identifier = ref.tag if ref.tag and not ref.digest else digest
        if ref.digest and ref.digest != digest:
            raise DigestMismatch(f"manifest for {ref.familiar()} has digest {digest}")
        resp = self._request("PUT", ref.domain, f"/v2/{ref.path}/manifests/{identifier}",
                             scopes, {"Content-Type": media_type}, data=raw)
        if resp.status_code not in (200, 201, 202):
            self._raise_for(resp, ref.domain, scopes, f"repository {ref.name} not found",
                            f"the manifest upload to {ref.familiar()}")
        announced = (resp.headers.get("Docker-Content-Digest") or "").strip()
        subject = (resp.headers.get("OCI-Subject") or "").strip()
        resp.close()
        if announced and announced != digest:
            raise DigestMismatch(f"registry {ref.domain} stored manifest {announced}, "
                                 f"we sent {digest}")
        return PushedManifest(reference=ref.with_digest(digest), digest=digest,
                              size=len(raw), media_type=media_type,
                              subject_processed=bool(subject))

    @_registry_op("the referrers request")
    def get_referrers(self, ref: Reference, digest: str,
                      artifact_type: Optional[str] = None) -> Optional[List[Descriptor]]:
        """The referrers API (`GET /v2/<name>/referrers/<digest>`), filtered by
        artifact type; None when the registry does not implement it (404), so
        the caller falls back to the tag scheme."""
        validate_digest(digest)
        scopes = self.pull_scopes(ref)
        path = f"/v2/{ref.path}/referrers/{digest}"
        if artifact_type:
            path += f"?artifactType={quote(artifact_type, safe='')}"
        out: List[Descriptor] = []
        url: Optional[str] = None
        for _ in range(MAX_REFERRER_PAGES):
            resp = self._request("GET", ref.domain, path, scopes, {"Accept": mt.OCI_INDEX},
                                 url=url)
            if resp.status_code in (404, 405, 501) and not out and url is None:
                resp.close()
                return None
            if resp.status_code != 200:
                self._raise_for(resp, ref.domain, scopes, f"referrers of {digest} not found",
                                f"the referrers request for {digest}")
            try:
                ctype = mt.base_type(resp.headers.get("Content-Type", ""))
                applied = resp.headers.get("OCI-Filters-Applied", "")
                link = resp.headers.get("Link", "")
                raw = read_limited(resp, self.max_manifest_size)
            except _STREAM_ERRORS as e:
                raise RegistryUnavailable(f"reading the referrers of {digest} failed: "
                                          f"{_describe(e)}") from None
            finally:
                resp.close()
            if ctype != mt.OCI_INDEX:
                # Some servers route unknown paths to a generic 200 page.
                if not out and url is None:
                    return None
                raise RegistryProtocolError(f"referrers of {digest} came as {ctype}")
            if raw is None:
                raise LimitExceeded(f"the referrers list of {digest} is too large")
            try:
                data = json.loads(raw)
                items = data.get("manifests") or []
            except (ValueError, AttributeError):
                raise RegistryProtocolError(f"referrers list of {digest} is not valid "
                                            f"JSON") from None
            for i, d in enumerate(items):
                desc = Descriptor.from_dict(d, f"referrer {i} of {digest}")
                if artifact_type and "artifactType" not in applied \
                        and desc.artifact_type != artifact_type:
                    continue
                out.append(desc)
            nxt = _next_link(link)
            if not nxt:
                break
            url = urljoin(self.base_url(ref.domain) + path, nxt)
        return out

class _BlobStream(io.RawIOBase):
    """The raw bytes of a blob, reconnecting with Range after a failed read."""

    def __init__(self, client: RegistryClient, ref: Reference, descriptor: Descriptor,
                 on_retry: Optional[Callable[[str], None]] = None):
        super().__init__()
        self.on_retry = on_retry
        self.client = client
        self.ref = ref
        self.descriptor = descriptor
        self.scopes = client.pull_scopes(ref)
        self.path = f"/v2/{ref.path}/blobs/{descriptor.digest}"
        self.offset = 0
        self.resp: Optional[requests.Response] = None
        self.failures = 0
        self.reconnects = 0
        self._skip = 0
        self._eof = False
        # The whole download, reconnects included, under one deadline and rate check
        # (registered with the watchdog at the first connect, until EOF or close).
        self.transfer = client._transfer(
            f"the download of blob {descriptor.digest} from {ref.domain}/{ref.path}",
            blob_size=descriptor.size)
        self._watched = False

    def _unwatch(self) -> None:
        if self._watched:
            WATCHDOG.discard(self.transfer)
            self._watched = False

    def _check_abort(self) -> None:
        if self.transfer.expired():
            self._unwatch()
            raise self.client._abort_error(self.transfer)

    def readable(self) -> bool:
        return True

    def _connect(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        if not self._watched:
            WATCHDOG.add(self.transfer)
            self._watched = True
        try:
            with watching(self.transfer, register=False):
                resp = self.client._request("GET", self.ref.domain, self.path, self.scopes,
                                            headers)
        except OciImageError:
            self._check_abort()
            raise
        status = resp.status_code
        if status == 206 and self.offset:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {self.offset}-"):
                resp.close()
                raise RegistryProtocolError(f"registry {self.ref.domain} answered a range "
                                            f"request for {self.descriptor.digest} with the "
                                            f"wrong range")
        elif status == 200:
            # the server ignored Range: drop what we already have
            self._skip = self.offset
        elif status == 416 and self.offset >= self.descriptor.size:
            resp.close()
            self._eof = True
            return
        else:
            self.client._raise_for(resp, self.ref.domain, self.scopes,
                                   f"blob {self.descriptor.digest} not found in "
                                   f"{self.ref.domain}/{self.ref.path}",
                                   f"the request for blob {self.descriptor.digest}")
        self.resp = resp

    def _failed(self, reason: str) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None
            self.transfer.detach()
        self.failures += 1
        if self.failures > self.client.retries:
            raise RegistryUnavailable(f"download of blob {self.descriptor.digest} from "
                                      f"{self.ref.domain}/{self.ref.path} kept failing: {reason}")
        self._check_abort()
        delay = self.client._backoff_delay(self.failures - 1)
        log.debug("blob %s: %s at offset %d; resuming in %.2fs", self.descriptor.digest,
                  reason, self.offset, delay)
        if self.on_retry is not None:
            self.on_retry(f"download from {self.ref.domain} interrupted ({_one_line(reason, 120)}) "
                          f"at {self.offset >> 20} MiB of {self.descriptor.size >> 20} MiB; "
                          f"resuming in {delay:.0f}s (try {self.failures} of "
                          f"{self.client.retries})")
        self.reconnects += 1
        self.client._sleep(delay, self.transfer)

    def readinto(self, b) -> int:
        while True:
            if self._eof:
                return 0
            try:
                if self.resp is None:
                    self._connect()
                    if self._eof:
                        return 0
                assert self.resp is not None
                if self._skip:
                    junk = self.resp.raw.read(min(self._skip, READ_CHUNK), decode_content=True)
                    if not junk:
                        self._failed("premature end of stream")
                        continue
                    self._skip -= len(junk)
                    self.transfer.progress(len(junk))
                    continue
                # small reads: urllib3 discards a partly filled read when the
                # connection drops, and what was received is progress to keep
                chunk = self.resp.raw.read(min(len(b), READ_CHUNK), decode_content=True)
            except _STREAM_ERRORS as e:
                self._check_abort()
                self._failed(_describe(e))
                continue
            if not chunk:
                self._check_abort()
                if self.offset < self.descriptor.size:
                    self._failed("premature end of stream")
                    continue
                self._eof = True
                self._unwatch()
                self.resp.close()
                self.resp = None
                self.transfer.detach()
                return 0
            self.offset += len(chunk)
            self.transfer.progress(len(chunk))
            self.failures = 0
            b[:len(chunk)] = chunk
            return len(chunk)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 20
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def close(self) -> None:
        self._unwatch()
        if self.resp is not None:
            self.resp.close()
            self.resp = None
        self.transfer.detach()
        super().close()
