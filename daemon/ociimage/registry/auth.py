"""Registry authentication: WWW-Authenticate challenges, Basic, and Bearer tokens.

Implements the Docker/OCI token flow: the registry answers 401 with a
challenge naming a token realm, a service and a scope; the client fetches
a token from the realm (anonymously, with Basic credentials, or by
exchanging an identity token) and retries. Tokens are cached per
(realm, service, scopes, user) until shortly before they expire, so a pull
of many layers costs one token request. Scopes are lists of strings, so a
push side can ask for `pull,push` or several repositories (cross-repo
mount) with the same machinery.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from ..errors import (AccessDenied, AuthenticationRequired, RegistryProtocolError,
                      RegistryUnavailable)
from .credentials import Credentials
from .manifest import json_object

log = logging.getLogger("ociimage.registry")

DEFAULT_TOKEN_LIFETIME = 60
#: Refresh this long before the token server's expiry, for clock and transfer slack.
EXPIRY_MARGIN = 5
MAX_TOKEN_RESPONSE = 1 << 20


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer", "basic", ...
    params: Dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> Optional[str]:
        return self.params.get("realm")

    @property
    def service(self) -> Optional[str]:
        return self.params.get("service")

    @property
    def scope(self) -> Optional[str]:
        return self.params.get("scope")

    @property
    def error(self) -> Optional[str]:
        return self.params.get("error")


_TOKEN_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~")


def parse_www_authenticate(header: str) -> List[Challenge]:
    """Parse a WWW-Authenticate value into challenges (RFC 7235).

    Handles quoted values containing commas and escaped quotes
    (scope="repository:a:pull,push"), and several challenges in one header.
    """
    out: List[Challenge] = []
    s = header or ""
    i, n = 0, len(s)

    def skip_ws(j: int) -> int:
        while j < n and s[j] in " \t":
            j += 1
        return j

    def read_token(j: int) -> Tuple[str, int]:
        k = j
        while k < n and s[k] in _TOKEN_CHARS:
            k += 1
        return s[j:k], k

    current: Optional[Challenge] = None
    while i < n:
        i = skip_ws(i)
        if i < n and s[i] == ",":
            i += 1
            continue
        tok, j = read_token(i)
        if not tok:
            i += 1  # garbage: skip one character rather than fail the whole header
            continue
        k = skip_ws(j)
        if k < n and s[k] == "=" and current is not None:
            k = skip_ws(k + 1)
            if k < n and s[k] == '"':
                k += 1
                buf = []
                while k < n and s[k] != '"':
                    if s[k] == "\\" and k + 1 < n:
                        k += 1
                    buf.append(s[k])
                    k += 1
                value = "".join(buf)
                k += 1  # closing quote
            else:
                value, k = read_token(k)
            current.params[tok.lower()] = value
            i = k
            continue
        # a new auth scheme
        current = Challenge(tok.lower(), {})
        out.append(current)
        i = j
        # token68 form (e.g. "Basic abc=="): no params to read
    return out


def read_limited(resp, limit: int) -> Optional[bytes]:
    """The response body, or None when it is longer than `limit` (reads at most limit+64K)."""
    parts, total = [], 0
    for chunk in resp.iter_content(65536):
        total += len(chunk)
        if total > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def repository_scope(repository: str, actions: Sequence[str] = ("pull",)) -> str:
    return f"repository:{repository}:{','.join(actions)}"


def pull_scopes(ref) -> List[str]:
    """The token scopes reading ref's repository needs."""
    return [repository_scope(ref.path, ("pull",))]


def push_scopes(ref, mount_from: Optional[str] = None) -> List[str]:
    """`pull,push` on the target; `pull` on the repository a blob is mounted from."""
    scopes = [repository_scope(ref.path, ("pull", "push"))]
    if mount_from and mount_from != ref.path:
        scopes.append(repository_scope(mount_from, ("pull",)))
    return scopes


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass
class _Token:
    value: str
    expires_at: float


# fetch(method, url, *, headers, params, data, what) -> requests.Response, with retries and
# the network policy applied to url (a realm on a link-local address is never contacted)
Fetcher = Callable[..., "object"]


class Authenticator:
    """Per-client authentication state: known challenges and cached tokens."""

    def __init__(self, fetch: Fetcher, credentials_for: Callable[[str], Optional[Credentials]],
                 *, may_send_secrets_to: Callable[[str], bool] = lambda url: True,
                 clock: Callable[[], float] = time.monotonic,
                 operation: Callable[[str], ContextManager] = lambda what: contextlib.nullcontext()):
        self._fetch = fetch
        #: operation(what): the deadline a token request (with its body) runs under
        self._operation = operation
        self._credentials_for = credentials_for
        self._may_send_secrets_to = may_send_secrets_to
        self.clock = clock
        self._lock = threading.Lock()
        self._challenges: Dict[str, Challenge] = {}
        self._tokens: Dict[tuple, _Token] = {}
        #: number of token requests made (for metrics and tests)
        self.token_requests = 0

    def credentials(self, domain: str) -> Optional[Credentials]:
        try:
            creds = self._credentials_for(domain)
        except Exception as e:  # a broken store must not make pulls of public images fail
            log.debug("credential lookup for %s failed (%s)", domain, type(e).__name__)
            return None
        return creds or None

    def _key(self, ch: Challenge, scopes: Sequence[str], creds: Optional[Credentials]) -> tuple:
        who = creds.username if creds and creds.username else ("<token>" if creds else "")
        return (ch.realm, ch.service, tuple(sorted(scopes)), who)

    def cached_authorization(self, domain: str, scopes: Sequence[str]) -> Optional[str]:
        """An Authorization value usable without a 401 round trip, if known."""
        with self._lock:
            ch = self._challenges.get(domain)
        if ch is None:
            return None
        creds = self.credentials(domain)
        if ch.scheme == "basic":
            return basic_header(creds) if creds and creds.has_basic else None
        if ch.scheme == "bearer":
            if creds and creds.registry_token:
                return "Bearer " + creds.registry_token
            with self._lock:
                tok = self._tokens.get(self._key(ch, scopes, creds))
            if tok and tok.expires_at > self.clock():
                return "Bearer " + tok.value
        return None

    def authorize(self, domain: str, scopes: Sequence[str], www_authenticate: str,
                  sent: Optional[str] = None) -> Optional[str]:
        """Answer a 401: the Authorization value to retry with, or None if we have none.

        `sent` is what the rejected request carried; a cached token that was
        rejected is dropped so the next one is fresh.
        """
        challenges = parse_www_authenticate(www_authenticate)
        by_scheme = {c.scheme: c for c in challenges}
        ch = by_scheme.get("bearer") or by_scheme.get("basic")
        if ch is None:
            raise RegistryProtocolError(
                f"registry {domain} requires an unsupported authentication scheme "
                f"({', '.join(sorted(by_scheme)) or 'none given'})")
        creds = self.credentials(domain)
        with self._lock:
            self._challenges[domain] = ch
        if ch.scheme == "basic":
            if not (creds and creds.has_basic):
                return None
            return basic_header(creds)
        if creds and creds.registry_token:
            return "Bearer " + creds.registry_token
        if not ch.realm:
            raise RegistryProtocolError(f"registry {domain} sent a Bearer challenge without a realm")
        key = self._key(ch, scopes, creds)
        with self._lock:
            tok = self._tokens.get(key)
            if tok and (sent == "Bearer " + tok.value or tok.expires_at <= self.clock()):
                del self._tokens[key]
                tok = None
        if tok is not None:
            return "Bearer " + tok.value
        tok = self._fetch_token(domain, ch, scopes, creds)
        with self._lock:
            self._tokens[key] = tok
        return "Bearer " + tok.value

    def forget(self, domain: str) -> None:
        with self._lock:
            self._challenges.pop(domain, None)

    def _fetch_token(self, domain: str, ch: Challenge, scopes: Sequence[str],
                     creds: Optional[Credentials]) -> _Token:
        realm = ch.realm or ""
        if not realm.lower().startswith(("https://", "http://")):
            raise RegistryProtocolError(f"registry {domain} names a token realm that is not "
                                        f"an http(s) URL")
        if creds and not self._may_send_secrets_to(realm):
            log.debug("not sending credentials for %s to a plain-http token realm", domain)
            creds = None
        headers = {}
        params: List[Tuple[str, str]] = []
        if ch.service:
            params.append(("service", ch.service))
        p = urlsplit(realm)
        what = f"the token realm {p.scheme}://{p.netloc}{p.path} named by registry {domain}"
        with self._operation(f"the token request to {p.netloc} for registry {domain}"):
            return self._request_token(domain, realm, ch, scopes, creds, headers, params, what)

    def _request_token(self, domain, realm, ch, scopes, creds, headers, params, what) -> _Token:
        self.token_requests += 1
        if creds and creds.identity_token:
            # OAuth2 refresh-token grant, as Docker does for identity tokens.
            data = [("grant_type", "refresh_token"), ("refresh_token", creds.identity_token),
                    ("client_id", "ociimage")] + params
            if scopes:
                data.append(("scope", " ".join(scopes)))
            log.debug("requesting token for %s from its realm (refresh token)", domain)
            resp = self._fetch("POST", realm, headers=headers, data=data, what=what)
        else:
            params += [("scope", s) for s in scopes]
            if creds and creds.has_basic:
                headers["Authorization"] = basic_header(creds)
            log.debug("requesting %s token for %s scopes %s",
                      "authenticated" if creds else "anonymous", domain, " ".join(scopes))
            resp = self._fetch("GET", realm, headers=headers, params=params, what=what)
        try:
            return self._parse_token_response(domain, resp, creds)
        finally:
            resp.close()

    def _parse_token_response(self, domain: str, resp, creds: Optional[Credentials]) -> _Token:
        status = resp.status_code
        if status == 401:
            if creds:
                raise AuthenticationRequired(
                    f"the credentials for {domain} were rejected: log in again with "
                    f"`docker login {domain}` or fix ~/.docker/config.json")
            raise AuthenticationRequired(
                f"authentication required for {domain}: log in with `docker login {domain}` "
                f"or provide credentials in ~/.docker/config.json")
        if status == 403:
            raise AccessDenied(f"the token server of {domain} denied access")
        if status >= 500 or status == 429:
            raise RegistryUnavailable(f"the token server of {domain} failed (HTTP {status})")
        if status != 200:
            raise RegistryProtocolError(f"the token server of {domain} answered HTTP {status}")
        body = read_limited(resp, MAX_TOKEN_RESPONSE)
        if body is None:
            raise RegistryProtocolError(f"the token server of {domain} sent an oversized answer")
        invalid = f"the token server of {domain} sent invalid JSON"
        data = json_object(body, invalid, invalid)
        value = data.get("token") or data.get("access_token")
        if not isinstance(value, str) or not value or any(c in value for c in "\r\n\0 "):
            raise RegistryProtocolError(f"the token server of {domain} sent no usable token")
        lifetime = data.get("expires_in")
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        lifetime = float(lifetime)
        margin = min(EXPIRY_MARGIN, lifetime / 10)
        return _Token(value, self.clock() + lifetime - margin)
