"""A small real token server for docker-registry's `auth: token` mode.

Issues RS256 JWTs the way Docker Distribution 2.8 verifies them
(registry/auth/token/token.go): claims iss/aud/exp/nbf/access, signature
by a key whose certificate is in the header's `x5c` (standard base64 DER)
and chains to the registry's `rootcertbundle` (here: the same self-signed
certificate). Users authenticate with Basic auth; grants are per user and
repository-name pattern. Requests are counted so tests can check token
reuse.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loopback_http import LoopbackServer
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuer(LoopbackServer):
    """users: name -> password; grants: name -> {repo pattern: [actions]}.

    The user "" is the anonymous one (grants[""] applies to requests without
    credentials). expires_in is what the answer announces.
    """

    def __init__(self, workdir: Path, users: Dict[str, str],
                 grants: Dict[str, Dict[str, Sequence[str]]], *, service: str = "test-registry",
                 issuer: str = "test-issuer", expires_in: int = 300,
                 refresh_tokens: Optional[Dict[str, str]] = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.grants = grants
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        #: refresh token -> user, for the OAuth2 refresh_token grant
        self.refresh_tokens = refresh_tokens or {}
        self.requests: List[dict] = []
        self._lock = threading.Lock()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token issuer")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.workdir / "token-root.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._server: Optional[ThreadingHTTPServer] = None

    # -- JWT ---------------------------------------------------------------

    def make_token(self, subject: str, access: List[dict]) -> str:
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode("ascii")]}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 3600,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        sig = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def granted(self, user: str, scopes: Sequence[str]) -> List[dict]:
        access = []
        mine = self.grants.get(user, {})
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            allowed = set()
            for pattern, acts in mine.items():
                if fnmatch.fnmatchcase(name, pattern):
                    allowed |= set(acts)
            ok = [a for a in actions if a in allowed]
            if typ == "repository" and ok:
                access.append({"type": typ, "name": name, "actions": ok})
        return access

    # -- HTTP ---------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    def registry_auth(self):
        """The `auth` argument for RegistryServer."""
        return ("token", {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.cert_path)})

    def token_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> "TokenIssuer":
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _user(self):
                """(user or "" for anonymous) or None when credentials are wrong."""
                header = self.headers.get("Authorization", "")
                if not header:
                    return ""
                if not header.startswith("Basic "):
                    return None
                try:
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                except Exception:
                    return None
                return user if issuer.users.get(user) == password and user else None

            def _issue(self, user: str, scopes: List[str], service: str, grant: str):
                with issuer._lock:
                    issuer.requests.append({"user": user, "scopes": scopes, "grant": grant,
                                            "service": service})
                if service != issuer.service:
                    self._answer(400, {"errors": [{"code": "UNSUPPORTED", "message": "service"}]})
                    return
                token = issuer.make_token(user, issuer.granted(user, scopes))
                body = {"token": token, "expires_in": issuer.expires_in}
                if grant == "refresh_token":
                    body = {"access_token": token, "expires_in": issuer.expires_in}
                self._answer(200, body)

            def do_GET(self):
                u = urlsplit(self.path)
                if u.path != "/token":
                    self._answer(404, {})
                    return
                query = parse_qsl(u.query)
                scopes = [v for k, v in query if k == "scope"]
                service = dict(query).get("service", "")
                user = self._user()
                if user is None:
                    with issuer._lock:
                        issuer.requests.append({"user": None, "scopes": scopes, "grant": "basic"})
                    self._answer(401, {"errors": [{"code": "UNAUTHORIZED",
                                                   "message": "bad credentials"}]},
                                 [("WWW-Authenticate", 'Basic realm="token"')])
                    return
                self._issue(user, scopes, service, "basic" if user else "anonymous")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qsl(self.rfile.read(length).decode())
                values = dict(form)
                scopes = " ".join(v for k, v in form if k == "scope").split()
                if values.get("grant_type") != "refresh_token" or \
                        values.get("refresh_token") not in issuer.refresh_tokens:
                    with issuer._lock:
                        issuer.requests.append({"user": None, "scopes": scopes,
                                                "grant": "refresh_token"})
                    self._answer(401, {"error": "invalid_grant"})
                    return
                user = issuer.refresh_tokens[values["refresh_token"]]
                self._issue(user, scopes, values.get("service", ""), "refresh_token")

        self._serve(Handler)
        return self
