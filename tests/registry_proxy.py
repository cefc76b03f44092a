"""An HTTP proxy in front of the real test registry, for what the registry will not do itself.

* faults: interrupt chosen PATCH requests; the client sees its connection
  dropped without an answer, so it must ask the registry where to resume.
  "drop": the registry got none of the chunk; "half": it got the first half
  (Distribution 2.8 then invalidates the upload session, whose _state token
  carries the offset, and the client has to start over);
* a tarpit: blob bodies over `tarpit_over` bytes are sent a few bytes at a
  time (`tarpit_bytes` every `tarpit_interval` seconds) after honest headers,
  the way a hostile or broken server holds a client's thread;
* redirects: blob GETs answered 307 to `redirect_blobs` + "/_storage" + path
  (any URL: another host name for this proxy, plain http, a metadata address);
  "/_storage/..." is served here from the registry, without credentials, like
  blob storage behind a registry;
* a token realm: with `bearer_realm`, every /v2/ request without
  Authorization is answered 401 with a Bearer challenge naming that realm;
* a hostile upload minimum: with `chunk_min_length`, every upload the registry opens
  (POST .../blobs/uploads/ answered 202) announces `OCI-Chunk-Min-Length` of that many
  bytes, the way a registry could ask a client to read a whole image into memory;
* a feature Docker Distribution 2.8 lacks: the referrers API
  (`GET /v2/<name>/referrers/<digest>`), answered from the fallback tag's
  index the way a registry implementing it would (no server-side filter), with
  the fallback tag itself hidden so a client can only have used the API.

Everything else is forwarded unchanged, with the proxy's Host so the
registry's Location URLs point back at the proxy. Requests are logged, and
`counts()` sorts them by kind (see `request_kind`) for the tests and benchmarks
that count what a job start costs the registry (tests/test_scale.py,
bench/scale.py). `backlog` is the listen queue: the default of Python's
http.server (5) drops the SYNs of a hundred nodes asking at once, which the
clients then retry a second later.
"""

from __future__ import annotations

import collections
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loopback_http import LoopbackServer
from typing import Counter, Dict, Iterable, List, Optional, Tuple

import requests

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection",
        "te", "trailer", "upgrade"}
_REFERRERS = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<alg>[a-z0-9]+):(?P<hex>[0-9a-f]+)$")
_FALLBACK = re.compile(r"^/v2/.+/manifests/sha256-[0-9a-f]{64}$")
_BLOB = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
STORAGE = "/_storage"
_MANIFEST = re.compile(r"^/v2/.+/manifests/(?P<ref>[^/]+)$")
_BLOB_ANY = re.compile(r"^/v2/.+/blobs/(?P<digest>[a-z0-9]+:[0-9a-f]+)$")
_DIGEST = re.compile(r"^[a-z0-9]+:[0-9a-f]{32,}$")

#: the kinds request_kind() answers, in the order reports list them
KINDS = ("manifest_get_tag", "manifest_head_tag", "manifest_get_digest", "manifest_head_digest",
         "blob_get_config", "blob_get_layer", "blob_head", "token", "ping", "push", "other")


def request_kind(method: str, path: str, config_digests: Iterable[str] = ()) -> str:
    """What one registry request was: manifest GET/HEAD by tag or by digest, blob GET of a
    config (its digest in config_digests) or of a layer, a blob HEAD, a token request, the
    /v2/ ping, an upload (push), or other."""
    path = path.split("?", 1)[0]
    if path.startswith(STORAGE + "/"):
        path = path[len(STORAGE):]
    if method in ("PUT", "POST", "PATCH", "DELETE"):
        return "push"
    if path in ("/v2", "/v2/"):
        return "ping"
    m = _MANIFEST.match(path)
    if m and method in ("GET", "HEAD"):
        by = "digest" if _DIGEST.match(m.group("ref")) else "tag"
        return f"manifest_{method.lower()}_{by}"
    m = _BLOB_ANY.match(path)
    if m:
        if method == "HEAD":
            return "blob_head"
        if method == "GET":
            return "blob_get_config" if m.group("digest") in set(config_digests) \
                else "blob_get_layer"
    if not path.startswith("/v2/") and "token" in path:
        return "token"
    return "other"


class RegistryProxy(LoopbackServer):
    def __init__(self, upstream: str, *, cut_patches: Optional[Dict[int, str]] = None,
                 referrers_api: bool = False, tarpit: bool = False, tarpit_over: int = 4096,
                 tarpit_bytes: int = 2, tarpit_interval: float = 0.2,
                 redirect_blobs: Optional[str] = None, bearer_realm: Optional[str] = None,
                 backlog: int = 5, chunk_min_length: Optional[int] = None):
        self.backlog = backlog
        self.chunk_min_length = chunk_min_length
        self.upstream = upstream.rstrip("/")
        self.tarpit, self.tarpit_over = tarpit, tarpit_over
        self.tarpit_bytes, self.tarpit_interval = tarpit_bytes, tarpit_interval
        #: blob GETs trickled so far, and those whose client hung up on the tarpit
        self.trickling = 0
        self.trickle_ended = 0
        self.redirect_blobs = redirect_blobs
        self.bearer_realm = bearer_realm
        #: PATCH ordinal (1-based) -> "drop" | "half"
        self.cut_patches = dict(cut_patches or {})
        self.referrers_api = referrers_api
        self.log: List[Tuple[str, str, int]] = []
        self.patches = 0
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    def mark(self) -> int:
        """A position in the log: counts(since=mark()) counts only what came after."""
        with self._lock:
            return len(self.log)

    def counts(self, config_digests: Iterable[str] = (), since: int = 0) -> Counter:
        """Requests since `since`, by request_kind (every kind present, zeros included),
        plus "manifest_config" (manifest requests and config blob GETs: what the goal of a
        cold start bounds), "blob_get" (all blob GETs) and "total"."""
        cfg = set(config_digests)
        with self._lock:
            log = list(self.log[since:])
        c: Counter = collections.Counter({k: 0 for k in KINDS})
        for method, path, _status in log:
            c[request_kind(method, path, cfg)] += 1
        c["manifest_config"] = sum(c[k] for k in KINDS if k.startswith("manifest_")) + \
            c["blob_get_config"]
        c["blob_get"] = c["blob_get_config"] + c["blob_get_layer"]
        c["total"] = len(log)
        return c

    def _serve(self, handler) -> None:
        if self.backlog == 5:
            return super()._serve(handler)
        backlog = self.backlog

        class Server(ThreadingHTTPServer):
            request_queue_size = backlog

        self._server = Server(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "RegistryProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _record(self, status: int) -> None:
                with proxy._lock:
                    proxy.log.append((self.command, self.path, status))

            def _send(self, status: int, headers, body: bytes, length: Optional[str] = None):
                # Logged before the client can have the answer: its next request (on
                # another connection, another handler thread) must come after it in the
                # log, or tests reading the log in order see a late entry under load.
                self._record(status)
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", length if length is not None else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _forward(self, body: bytes, headers=None):
                h = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                h.update(headers or {})
                h["Host"] = proxy.host
                r = requests.request(self.command, proxy.upstream + self.path, headers=h,
                                     data=body, allow_redirects=False, stream=True, timeout=60)
                data = r.raw.read(decode_content=False) if self.command != "HEAD" else b""
                length = r.headers.get("Content-Length") if self.command == "HEAD" else None
                return r, data, length

            def _referrers(self, m) -> None:
                tag = f"{m.group('alg')}-{m.group('hex')}"
                r = requests.get(f"{proxy.upstream}/v2/{m.group('name')}/manifests/{tag}",
                                 headers={"Accept": OCI_INDEX,
                                          "Authorization": self.headers.get("Authorization", "")},
                                 timeout=30)
                if r.status_code == 401:
                    self._send(401, r.headers.items(), r.content)
                    return
                manifests = r.json().get("manifests", []) if r.status_code == 200 else []
                body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                   "manifests": manifests}).encode()
                self._send(200, [("Content-Type", OCI_INDEX)], body)

            def _trickle(self, r, data: bytes) -> None:
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with proxy._lock:
                    proxy.trickling += 1
                self._record(-2)
                try:
                    for i in range(0, len(data), proxy.tarpit_bytes):
                        self.wfile.write(data[i:i + proxy.tarpit_bytes])
                        self.wfile.flush()
                        time.sleep(proxy.tarpit_interval)
                except OSError:  # the client gave up: what the tarpit tests wait for
                    with proxy._lock:
                        proxy.trickle_ended += 1
                self.close_connection = True

            def _handle(self) -> None:
                body = self._body()
                path = self.path.split("?", 1)[0]
                if path.startswith(STORAGE + "/"):
                    asked, self.path = self.path, self.path[len(STORAGE):]
                    if "Authorization" in self.headers:
                        del self.headers["Authorization"]
                    r, data, length = self._forward(body)
                    self.path = asked  # logged as asked
                    self._send(r.status_code, r.headers.items(), data, length)
                    return
                if proxy.bearer_realm and path.startswith("/v2/") and \
                        "Authorization" not in self.headers:
                    self._send(401, [("WWW-Authenticate", f'Bearer realm="{proxy.bearer_realm}",'
                                                          f'service="proxy"')], b"")
                    return
                if proxy.redirect_blobs and self.command == "GET" and _BLOB.match(path):
                    self._send(307, [("Location", proxy.redirect_blobs + STORAGE + self.path)], b"")
                    return
                if proxy.referrers_api:
                    m = _REFERRERS.match(path)
                    if m and self.command == "GET":
                        self._referrers(m)
                        return
                    if _FALLBACK.match(path) and self.command in ("GET", "HEAD"):
                        self._send(404, [("Content-Type", "application/json")],
                                   b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                        return
                extra = None
                cut = None
                if self.command == "PATCH":
                    with proxy._lock:
                        proxy.patches += 1
                        cut = proxy.cut_patches.get(proxy.patches)
                    if cut == "half":
                        start = int((self.headers.get("Content-Range") or "0-0").split("-")[0])
                        body = body[:len(body) // 2]
                        extra = {"Content-Range": f"{start}-{start + len(body) - 1}"}
                if cut != "drop":
                    r, data, length = self._forward(body, extra)
                if proxy.tarpit and self.command == "GET" and _BLOB.match(path) \
                        and r.status_code in (200, 206) and len(data) > proxy.tarpit_over:
                    self._trickle(r, data)
                    return
                if proxy.chunk_min_length is not None and self.command == "POST" and \
                        path.endswith("/blobs/uploads/") and r.status_code == 202:
                    headers = list(r.headers.items()) + [
                        ("OCI-Chunk-Min-Length", str(proxy.chunk_min_length))]
                    self._send(r.status_code, headers, data, length)
                    return
                if cut:
                    # The registry has the first half; the client hears nothing.
                    self._record(-1)
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                self._send(r.status_code, r.headers.items(), data, length)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self._serve(Handler)
        return self
