"""The transport chain every registry request goes through, link by link.

go-containerregistry wraps an http.RoundTripper once per concern
(transport.NewRetry(transport.NewUserAgent(transport.NewLogger(bearer)))) and
every call in pkg/v1/remote goes through the result. This is the same in
Python. A requests.Session has a single hook per request, and its own
redirect and netrc handling that has to be switched off anyway, so each
concern here is a small object with `send(exchange) -> Response` that wraps
the next one:

    Auth -> Retry -> UserAgent -> Redirects -> Log -> Wire (requests.Session)

* Auth adds the cached Authorization for the registry's own origin, and on
  a 401 follows the challenge (auth.py) and sends once more.
* Retry repeats connection failures, 429 and 5xx with exponential backoff
  (retry.py), honouring Retry-After; a request unsafe to repeat asks for
  0 retries. It can also read a small body (a manifest) inside the retries,
  so a connection cut mid-body is retried like one cut before it.
* Redirects follows redirects itself: each target passes the network policy
  (transport.py) and Authorization is dropped as soon as the URL leaves the
  origin it was meant for, so blob storage never sees it.
* Log notes each exchange without the query string (pre-signed URLs carry
  signatures there); Wire is the guarded session, which connects only to
  checked addresses and under the operation's deadline (deadlines.py).

Token realms and pings go through the same chain with no registry named,
which Auth passes through. Resuming an interrupted blob read (blobstream.py)
and an interrupted chunked upload (push.py) are built on this chain and on
the same Attempts, since they need the registry's answer about where to go
on from.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from ..errors import RegistryProtocolError, RegistryUnavailable
from .auth import Authenticator, read_limited
from .deadlines import STREAM_ERRORS, Deadlines
from .responses import ErrorMapper, describe
from .retry import RETRY_STATUSES, Backoff
from .transport import NetLimits, NetPolicy

log = logging.getLogger("ociimage.registry")

MAX_REDIRECTS = 10
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}


@dataclass
class Exchange:
    """One logical request, as the links see it."""

    method: str
    url: str
    headers: Dict[str, str] = field(default_factory=dict)
    data: Any = None
    params: Any = None
    #: names the request in a network-policy refusal
    what: str = ""
    #: the registry whose credentials apply; "" for token realms and pings
    domain: str = ""
    scopes: Sequence[str] = ()
    #: None: the client's count; 0 for requests not safe to repeat blindly (PATCH)
    retries: Optional[int] = None
    #: read a 200 answer's body (up to this many bytes) inside the retries, into
    #: response.oci_body (None when longer)
    body_limit: Optional[int] = None
    #: what that body is, for "reading ... kept failing"
    reading: str = ""

    def with_header(self, name: str, value: Optional[str]) -> "Exchange":
        """A copy with header name set to value (removed when value is None)."""
        h = dict(self.headers)
        if value is None:
            h.pop(name, None)
        else:
            h[name] = value
        return dataclasses.replace(self, headers=h)


def origin(url: str):
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return (p.scheme.lower(), (p.hostname or "").lower(), port)


def url_for_log(url: str) -> str:
    # Pre-signed storage URLs carry signatures in the query string.
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}{p.path}"


class _NoAuth(requests.auth.AuthBase):
    """Passed as auth= so requests does not add ~/.netrc credentials on its own."""

    def __call__(self, r):
        return r


class Wire:
    """One HTTP exchange on the guarded session: no redirects, streamed body."""

    def __init__(self, session: requests.Session, limits: NetLimits, deadlines: Deadlines):
        self.session = session
        self.limits = limits
        self.deadlines = deadlines

    def send(self, ex: Exchange) -> requests.Response:
        self.deadlines.raise_if_aborted()
        return self.session.request(ex.method, ex.url, headers=ex.headers, params=ex.params,
                                    data=ex.data, stream=True,
                                    timeout=(self.limits.connect, self.limits.stall),
                                    allow_redirects=False, auth=_NoAuth())


class Log:
    def __init__(self, inner):
        self.inner = inner

    def send(self, ex: Exchange) -> requests.Response:
        resp = self.inner.send(ex)
        log.debug("%s %s -> %d", ex.method, url_for_log(ex.url), resp.status_code)
        return resp


class Redirects:
    """Follow redirects by hand: policy on every target, Authorization kept on-origin."""

    def __init__(self, inner, policy: NetPolicy):
        self.inner = inner
        self.policy = policy

    def send(self, ex: Exchange) -> requests.Response:
        first = origin(ex.url)
        self.policy.check_url(ex.url, ex.what or f"the request to {first[1]}")
        for _ in range(MAX_REDIRECTS + 1):
            sent = ex if origin(ex.url) == first else ex.with_header("Authorization", None)
            resp = self.inner.send(sent)
            location = resp.headers.get("Location")
            if resp.status_code not in _REDIRECT_STATUSES or not location:
                return resp
            resp.close()
            new_url = urljoin(resp.url, location)
            if urlsplit(new_url).scheme.lower() not in ("http", "https"):
                raise RegistryProtocolError(f"{origin(ex.url)[1]} redirected to a non-http URL")
            self.policy.check_url(new_url, f"the redirect from {urlsplit(ex.url).netloc} to "
                                           f"{url_for_log(new_url)}")
            method, data = ex.method, ex.data
            if resp.status_code == 303 and method not in ("GET", "HEAD"):
                method, data = "GET", None
            # the query is now part of the new URL
            ex = dataclasses.replace(ex, method=method, url=new_url, data=data, params=None)
        raise RegistryProtocolError(f"too many redirects from {first[1]}")


class UserAgent:
    def __init__(self, inner, user_agent: str):
        self.inner = inner
        self.user_agent = user_agent

    def send(self, ex: Exchange) -> requests.Response:
        if "User-Agent" not in ex.headers:
            ex = ex.with_header("User-Agent", self.user_agent)
        return self.inner.send(ex)


class Retry:
    """Repeat what failed for a reason that may pass: connection trouble, 429, 5xx."""

    def __init__(self, inner, backoff: Backoff, deadlines: Deadlines):
        self.inner = inner
        self.backoff = backoff
        self.deadlines = deadlines

    def send(self, ex: Exchange) -> requests.Response:
        attempts = self.backoff.attempts(ex.retries)
        where = f"registry {ex.domain}" if ex.domain else urlsplit(ex.url).netloc
        while True:
            try:
                resp = self.inner.send(ex)
            except requests.RequestException as e:
                self.deadlines.raise_if_aborted()
                delay = attempts.next_delay()
                if delay is None:
                    raise RegistryUnavailable(f"cannot reach {where}: {describe(e)}") from None
                log.debug("%s %s failed (%s); retrying in %.2fs", ex.method, where,
                          describe(e), delay)
                self.deadlines.sleep(delay)
                continue
            if resp.status_code in RETRY_STATUSES:
                delay = attempts.next_delay(self.backoff.retry_after(resp))
                if delay is None:
                    return resp
                log.debug("%s %s: HTTP %d; retrying in %.2fs", ex.method, where,
                          resp.status_code, delay)
                resp.close()
                self.deadlines.sleep(delay)
                continue
            if ex.body_limit is None or resp.status_code != 200:
                return resp
            try:
                self._read_body(resp, ex.body_limit)
            except STREAM_ERRORS as e:
                resp.close()
                delay = attempts.next_delay()
                if delay is None:
                    raise RegistryUnavailable(f"reading {ex.reading or 'the answer'} kept "
                                              f"failing: {describe(e)}") from None
                self.deadlines.sleep(delay)
                continue
            return resp

    @staticmethod
    def _read_body(resp: requests.Response, limit: int) -> None:
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            resp.oci_body = None  # type: ignore[attr-defined]
            return
        try:
            body = read_limited(resp, limit)
        finally:
            resp.close()
        # urllib3 1.26 (Debian 12) takes a connection closed mid-body for the body's end;
        # 2.x raises. Either way it is a cut transfer, to be retried like one.
        if body is not None and length.isdigit() and len(body) < int(length):
            raise urllib3.exceptions.IncompleteRead(len(body), int(length) - len(body))
        resp.oci_body = body  # type: ignore[attr-defined]


class Auth:
    """Registry credentials for the registry's own origin; one more try after a 401."""

    def __init__(self, inner, transport: "RegistryTransport"):
        self.inner = inner
        self.transport = transport

    def send(self, ex: Exchange) -> requests.Response:
        if not ex.domain:
            return self.inner.send(ex)
        auth = self.transport.auth
        same_origin = origin(ex.url) == origin(self.transport.base_url(ex.domain))
        authorization = auth.cached_authorization(ex.domain, ex.scopes) if same_origin else None
        resp = self.inner.send(ex.with_header("Authorization", authorization))
        if resp.status_code != 401 or not same_origin:
            return resp
        challenge = resp.headers.get("WWW-Authenticate", "")
        resp.close()
        new = auth.authorize(ex.domain, ex.scopes, challenge, sent=authorization)
        if new is None:
            raise self.transport.errors.auth_error(ex.domain, ex.scopes, anonymous=True)
        return self.inner.send(ex.with_header("Authorization", new))


class RegistryTransport:
    """The chain, assembled for one client, and what its users need beside it."""

    def __init__(self, session: requests.Session, policy: NetPolicy, limits: NetLimits,
                 backoff: Backoff, deadlines: Deadlines, user_agent: str, credentials_for,
                 base_url):
        self.policy = policy
        self.limits = limits
        self.backoff = backoff
        self.deadlines = deadlines
        self.base_url = base_url
        self.auth = Authenticator(self.plain, credentials_for,
                                  may_send_secrets_to=self._may_send_secrets_to,
                                  operation=deadlines.operation)
        self.errors = ErrorMapper(self.auth)
        wire = Wire(session, limits, deadlines)
        self.chain = Auth(Retry(UserAgent(Redirects(Log(wire), policy), user_agent),
                                backoff, deadlines), self)

    def _may_send_secrets_to(self, url: str) -> bool:
        p = urlsplit(url)
        if p.scheme.lower() == "https":
            return True
        return self.policy.plain_http_allowed(p.netloc)

    def request(self, method: str, domain: str, path: str, scopes: Sequence[str],
                headers: Optional[Dict[str, str]] = None, *, data=None,
                url: Optional[str] = None, retries: Optional[int] = None,
                body_limit: Optional[int] = None, reading: str = "") -> requests.Response:
        """A registry API request through the whole chain.

        Returns the final response, whatever its status; the caller maps
        errors with raise_for and must close it. `url` (an upload Location)
        replaces base_url + path; credentials go with it only when it is on
        the registry's own origin.
        """
        base = self.base_url(domain)
        full = urljoin(base + "/", url) if url else base + path
        return self.chain.send(Exchange(method, full, dict(headers or {}), data=data,
                                        what=f"the request to registry {domain}",
                                        domain=domain, scopes=list(scopes), retries=retries,
                                        body_limit=body_limit, reading=reading))

    def plain(self, method: str, url: str, *, headers=None, params=None, data=None,
              what: str = "") -> requests.Response:
        """A request outside registry auth (token realms, ping), through the same chain."""
        return self.chain.send(Exchange(method, url, dict(headers or {}), data=data,
                                        params=params, what=what))

    def raise_for(self, resp: requests.Response, domain: str, scopes: Sequence[str],
                  not_found: str, what: str) -> None:
        self.errors.raise_for(resp, domain, scopes, not_found, what)
