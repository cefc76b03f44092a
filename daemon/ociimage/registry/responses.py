"""A registry's answer as a typed error, without leaking secrets or URLs.

Distribution-spec error bodies (`{"errors": [{"code", "message"}]}`) are
read, bounded, and mapped to the errors of errors.py: 401 to
AuthenticationRequired (or AccessDenied when a token server took the
credentials but grants nothing), 403/DENIED to AccessDenied, 404 and the
*_UNKNOWN codes to NotFound, 429 and 5xx to RegistryUnavailable. A message
is put on one line and any secret of the user's credentials is masked.
"""

from __future__ import annotations

import json
from typing import Sequence

import requests

from ..errors import (AccessDenied, AuthenticationRequired, NotFound, OciImageError,
                      RegistryProtocolError, RegistryUnavailable)
from .auth import Authenticator, read_limited
from .deadlines import STREAM_ERRORS
from .manifest import one_line

MAX_ERROR_BODY = 64 << 10
_NOT_FOUND_CODES = {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"}


def describe(exc: BaseException) -> str:
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


def repo_of(scopes: Sequence[str]) -> str:
    for s in scopes:
        parts = s.split(":")
        if len(parts) >= 3 and parts[0] == "repository":
            return ":".join(parts[1:-1])
    return ""


class ErrorMapper:
    """Typed errors for one client's responses (its credentials say what to mask)."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    def scrub(self, domain: str, text: str) -> str:
        creds = self.auth.credentials(domain)
        for secret in (creds.secrets() if creds else []):
            text = text.replace(secret, "***")
        return text

    def auth_error(self, domain: str, scopes: Sequence[str], *,
                   anonymous: bool) -> OciImageError:
        repo = repo_of(scopes)
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

    def raise_for(self, resp: requests.Response, domain: str, scopes: Sequence[str],
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
        except STREAM_ERRORS:
            pass
        finally:
            resp.close()
        message = self.scrub(domain, one_line(message))
        code = one_line(code, 40)
        detail = f": {message}" if message else ""
        repo = repo_of(scopes)
        where = f"{domain}/{repo}" if repo else domain
        if status == 401:
            raise self.auth_error(domain, scopes, anonymous=False)
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
