"""RegistryClient against the real docker-registry.

A fault-injecting proxy sits in front of the registry only for what the
registry itself cannot be made to do: cut or reset a blob stream, ignore
Range, answer 429/503, serve oversized or ambiguous manifests (2.8
refuses to store those), or redirect blob downloads to another host.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import struct
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import bcrypt
import pytest

from ocibuild import (DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Entry, Pusher,
                      sha256)
from registry_server import RegistryServer

from ociimage.errors import (AuthenticationRequired, DigestMismatch, LimitExceeded, NotFound,
                             PlatformNotFound, RegistryProtocolError, RegistryUnavailable,
                             UnsupportedMediaType)
from ociimage.reference import parse_reference
from ociimage.registry import mediatypes as mt
from ociimage.registry.client import Descriptor, RegistryClient
from ociimage.registry.credentials import Credentials, StaticCredentials
from ociimage.registry.platform import Platform

BIG = random.Random(7).randbytes(1 << 20)  # 1 MiB that gzip cannot shrink


def client(**kw) -> RegistryClient:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 10)
    return RegistryClient(**kw)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-answer is what these tests provoke


def serve(handler) -> QuietServer:
    srv = QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return srv


# -- fault proxy -------------------------------------------------------------

class FaultProxy:
    """A tiny HTTP proxy to an upstream registry; `hook` may take over a request.

    hook(handler, method, path) returns True when it answered the request
    itself; handler.forward(...) relays to the upstream with optional changes.
    """

    def __init__(self, upstream: str, hook=None):
        self.upstream = urlsplit(upstream)
        self.hook = hook
        self.seen = []  # (method, path, headers)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                with threading.Lock():
                    proxy.seen.append((self.command, self.path, dict(self.headers)))
                if proxy.hook and proxy.hook(self, self.command, self.path):
                    return
                self.forward()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

            def send_raw(self, status, headers, body=b"", *, cut_after=None, reset=False):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                if self.command == "HEAD":
                    return
                if cut_after is None:
                    self.wfile.write(body)
                    return
                self.wfile.write(body[:cut_after])
                self.wfile.flush()
                if reset:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                self.connection.close()

            def forward(self, *, drop_request=(), transform=None, cut_after=None, reset=False):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", *drop_request)}
                conn = http.client.HTTPConnection(proxy.upstream.hostname,
                                                  proxy.upstream.port, timeout=10)
                conn.request(self.command, self.path, body, headers)
                resp = conn.getresponse()
                data = resp.read()
                status, out_headers = resp.status, resp.getheaders()
                conn.close()
                if transform:
                    status, out_headers, data = transform(status, out_headers, data)
                if self.command != "HEAD":
                    out_headers = [(k, v) for k, v in out_headers
                                   if k.lower() != "content-length"]
                    out_headers.append(("Content-Length", str(len(data))))
                self.send_raw(status, out_headers, data, cut_after=cut_after, reset=reset)

        self.server = serve(Handler)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def count(self, method, suffix) -> int:
        return sum(1 for m, p, _ in self.seen if m == method and p.split("?")[0].endswith(suffix))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_to(registry):
    proxies = []

    def make(hook, upstream=None):
        p = FaultProxy(upstream or registry.url, hook)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


# -- images ------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(registry):
    p = Pusher(registry.url)
    out = {}
    out["single"] = p.image("t/single", "v1", [[Entry("etc/", "dir", mode=0o755),
                                                Entry("etc/hello", data=b"hello")],
                                               [Entry("big", data=BIG)]])
    amd = p.image("t/multi", None, [[Entry("arch", data=b"amd64")]], architecture="amd64")
    arm64 = p.image("t/multi", None, [[Entry("arch", data=b"arm64")]], architecture="arm64")
    armv6 = p.image("t/multi", None, [[Entry("arch", data=b"armv6")]], architecture="arm")
    out["multi_images"] = {"amd64": amd, "arm64": arm64, "armv6": armv6}
    out["multi"] = p.index("t/multi", "v1", [amd, arm64, armv6], [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
        {"os": "linux", "architecture": "arm", "variant": "v6"}])
    damd = p.image("t/docker", None, [[Entry("arch", data=b"d-amd64")]], docker=True)
    darm = p.image("t/docker", None, [[Entry("arch", data=b"d-arm64")]], docker=True,
                   architecture="arm64")
    out["docker_images"] = {"amd64": damd, "arm64": darm}
    out["docker_list"] = p.index("t/docker", "list", [damd, darm], [
        {"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"}],
        docker=True)
    out["docker_single"] = p.image("t/docker", "single", [[Entry("x", data=b"x")]], docker=True)
    return out


def ref(registry, text):
    return parse_reference(f"{registry.host}/{text}")


# -- pulling -----------------------------------------------------------------

def test_scheme_choice():
    c = RegistryClient(insecure_registries=["reg.lan:5000", "plain.example", "10.1.0.0/16"])
    assert c.base_url("docker.io") == "https://registry-1.docker.io"
    assert c.base_url("localhost:5000") == "http://localhost:5000"
    assert c.base_url("127.0.0.5:1234") == "http://127.0.0.5:1234"
    assert c.base_url("[::1]:5000") == "http://[::1]:5000"
    assert c.base_url("reg.lan:5000") == "http://reg.lan:5000"
    assert c.base_url("reg.lan:5001") == "https://reg.lan:5001"
    assert c.base_url("plain.example:443") == "http://plain.example:443"
    assert c.base_url("10.1.2.3:5000") == "http://10.1.2.3:5000"
    assert c.base_url("quay.io") == "https://quay.io"
    assert c.base_url("localhost.example.com") == "https://localhost.example.com"


def test_ping(registry):
    assert client().ping(registry.host)


def test_pull_by_tag_oci(registry, images):
    c = client()
    img = images["single"]
    r = c.resolve(ref(registry, "t/single:v1"), Platform("linux", "amd64"))
    assert r.index_digest is None
    assert r.manifest.media_type == mt.OCI_MANIFEST
    assert r.manifest.digest == img.manifest_digest == r.digest
    assert r.reference.digest == img.manifest_digest and r.reference.tag == "v1"
    assert r.config_descriptor.digest == img.config_digest
    assert r.config["rootfs"]["type"] == "layers"
    assert r.platform == Platform("linux", "amd64")
    assert [d.digest for d in r.layers] == img.layer_digests
    progress = []
    with c.open_blob(r.reference, r.layers[1], on_bytes=progress.append) as f:
        data = f.read()
    assert sha256(data) == img.layer_digests[1]
    assert sum(progress) == r.layers[1].size


def test_pull_by_digest(registry, images):
    c = client()
    img = images["single"]
    r0 = ref(registry, "t/single@" + img.manifest_digest)
    m = c.get_manifest(r0)
    assert m.digest == img.manifest_digest and m.data == img.manifest
    r = c.resolve(r0)
    assert str(r.reference) == f"{registry.host}/t/single@{img.manifest_digest}"
    assert c.resolve_digest(r0) == img.manifest_digest


def test_resolve_digest_uses_head(fresh_registry):
    img = Pusher(fresh_registry.url).image("h/x", "v", [[Entry("a", data=b"a")]])
    c = client()
    assert c.resolve_digest(ref(fresh_registry, "h/x:v")) == img.manifest_digest
    log = [(m, p) for m, p, s in fresh_registry.access_log() if "/manifests/" in p and m != "PUT"]
    assert log == [("HEAD", "/v2/h/x/manifests/v")]


def test_multi_arch_oci_index(registry, images):
    c = client()
    r0 = ref(registry, "t/multi:v1")
    imgs = images["multi_images"]
    for plat, key in [(Platform("linux", "amd64"), "amd64"),
                      (Platform("linux", "arm64"), "arm64"),
                      (Platform("linux", "arm64", "v8"), "arm64"),
                      (Platform("linux", "arm", "v7"), "armv6")]:
        r = c.resolve(r0, plat)
        assert r.index_digest == images["multi"]
        assert r.digest == imgs[key].manifest_digest, plat
        assert r.reference.digest == imgs[key].manifest_digest
        with c.open_blob(r.reference, r.layers[0]) as f:
            assert sha256(f.read()) == imgs[key].layer_digests[0]
    assert c.resolve_digest(r0) == images["multi"]
    assert c.get_manifest(r0).is_index
    with pytest.raises(PlatformNotFound) as ei:
        c.resolve(r0, Platform("linux", "s390x"))
    msg = str(ei.value)
    assert "linux/s390x" in msg and "linux/amd64" in msg and "linux/arm64/v8" in msg


def test_docker_manifest_list_and_schema2(registry, images):
    c = client()
    r = c.resolve(ref(registry, "t/docker:list"), Platform("linux", "arm64"))
    assert r.index_digest == images["docker_list"]
    assert r.manifest.media_type == mt.DOCKER_MANIFEST
    assert r.config_descriptor.media_type == mt.DOCKER_CONFIG
    assert r.digest == images["docker_images"]["arm64"].manifest_digest
    assert r.layers[0].media_type == mt.DOCKER_LAYER_GZIP
    assert c.get_manifest(ref(registry, "t/docker:list")).media_type == mt.DOCKER_MANIFEST_LIST
    s = c.resolve(ref(registry, "t/docker:single"), Platform("linux", "amd64"))
    assert s.manifest.media_type == mt.DOCKER_MANIFEST and s.index_digest is None
    with pytest.raises(PlatformNotFound, match="linux/amd64"):
        c.resolve(ref(registry, "t/docker:single"), Platform("linux", "ppc64le"))


def test_not_found(registry, images):
    c = client()
    with pytest.raises(NotFound, match="image not found: .*t/nothere:v1"):
        c.resolve(ref(registry, "t/nothere:v1"))
    with pytest.raises(NotFound, match="image not found: .*t/single:nope"):
        c.get_manifest(ref(registry, "t/single:nope"))
    with pytest.raises(NotFound):
        c.resolve_digest(ref(registry, "t/single:nope"))
    missing = Descriptor(mt.OCI_LAYER_GZIP, "sha256:" + "0" * 64, 10)
    with pytest.raises(NotFound, match="blob sha256:0+ not found"):
        c.open_blob(ref(registry, "t/single:v1"), missing).read()


def _blob_path(reg, digest):
    hexd = digest.split(":")[1]
    return reg.workdir / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_digest_mismatch_from_corrupted_storage(fresh_registry):
    p = Pusher(fresh_registry.url)
    img = p.image("c/x", "v1", [[Entry("f", data=b"some content")]])
    c = client()
    r0 = ref(fresh_registry, "c/x:v1")
    good = c.resolve(r0, Platform("linux", "amd64"))
    # same length, different bytes: only the digest can tell
    lp = _blob_path(fresh_registry, img.layer_digests[0])
    raw = bytearray(lp.read_bytes())
    raw[-1] ^= 0xFF
    lp.write_bytes(bytes(raw))
    with pytest.raises(DigestMismatch, match=img.layer_digests[0]):
        c.open_blob(good.reference, good.layers[0]).read()
    # the manifest, still valid JSON of the same size
    mp = _blob_path(fresh_registry, img.manifest_digest)
    raw = mp.read_bytes()
    changed = raw.replace(b'": {', b'":{ ', 1)
    assert changed != raw and len(changed) == len(raw)
    mp.write_bytes(changed)
    with pytest.raises(DigestMismatch, match="expected " + img.manifest_digest):
        c.get_manifest(ref(fresh_registry, "c/x@" + img.manifest_digest))
    with pytest.raises(DigestMismatch, match="announced"):  # by tag: Docker-Content-Digest
        c.get_manifest(r0)


def test_config_digest_mismatch(fresh_registry):
    img = Pusher(fresh_registry.url).image("c/y", "v1", [[Entry("f")]])
    cp = _blob_path(fresh_registry, img.config_digest)
    cp.write_bytes(cp.read_bytes().replace(b'"amd64"', b'"AMD64"'))
    with pytest.raises(DigestMismatch):
        client().resolve(ref(fresh_registry, "c/y:v1"), Platform("linux", "amd64"))


# -- faults the registry cannot produce -------------------------------------

def _is_blob(method, path, digest):
    return method == "GET" and path.split("?")[0].endswith("/blobs/" + digest)


@pytest.mark.parametrize("mode", ["truncate", "reset", "ignore_range"])
def test_blob_resume(registry, images, proxy_to, mode):
    digest = images["single"].layer_digests[1]
    state = {"n": 0}

    def hook(h, method, path):
        if not _is_blob(method, path, digest):
            return False
        state["n"] += 1
        if state["n"] <= 2:  # cut twice, at different offsets
            h.forward(cut_after=200_000 * state["n"], reset=(mode == "reset"))
            return True
        if mode == "ignore_range":
            h.forward(drop_request=("range",))
            return True
        return False

    proxy = proxy_to(hook)
    c = client()
    r = c.resolve(parse_reference(f"{proxy.host}/t/single:v1"), Platform("linux", "amd64"))
    layer = r.layers[1]
    progress = []
    with c.open_blob(r.reference, layer, on_bytes=progress.append) as f:
        data = f.read()
    assert sha256(data) == digest and len(data) == layer.size
    assert sum(progress) == layer.size  # skipped bytes are not counted twice
    ranges = [hd.get("Range") for m, p, hd in proxy.seen if _is_blob(m, p, digest)]
    assert ranges[0] is None and len(ranges) == 3
    assert ranges[1] and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert ranges[2] and int(ranges[2][6:-1]) > int(ranges[1][6:-1])


def test_blob_keeps_failing(registry, images, proxy_to):
    digest = images["single"].layer_digests[1]

    def hook(h, method, path):
        if _is_blob(method, path, digest) and "Range" in h.headers:
            h.forward(cut_after=0)  # never any progress after the first cut
            return True
        if _is_blob(method, path, digest):
            h.forward(cut_after=1000)
            return True
        return False

    proxy = proxy_to(hook)
    c = client(retries=2)
    r0 = parse_reference(f"{proxy.host}/t/single:v1")
    r = c.resolve(r0, Platform("linux", "amd64"))
    with pytest.raises(RegistryUnavailable, match="kept failing"):
        c.open_blob(r.reference, r.layers[1]).read()


@pytest.mark.parametrize("retry_after", ["1", "date"])
def test_429_retry_after(registry, images, proxy_to, retry_after):
    state = {"n": 0}

    def hook(h, method, path):
        if "/manifests/" in path and state["n"] == 0:
            state["n"] += 1
            value = retry_after if retry_after != "date" else formatdate(time.time() + 2,
                                                                           usegmt=True)
            h.send_raw(429, [("Retry-After", value), ("Content-Length", "0")])
            return True
        return False

    proxy = proxy_to(hook)
    t0 = time.monotonic()
    m = client(backoff=0.001).get_manifest(parse_reference(f"{proxy.host}/t/single:v1"))
    assert m.digest == images["single"].manifest_digest
    assert time.monotonic() - t0 >= 0.9  # it waited as told, not the tiny backoff
    assert proxy.count("GET", "/manifests/v1") == 2


def test_503_then_success_and_giving_up(registry, images, proxy_to):
    state = {"n": 0, "limit": 2}

    def hook(h, method, path):
        if "/manifests/" in path and state["n"] < state["limit"]:
            state["n"] += 1
            h.send_raw(503, [("Content-Length", "0")])
            return True
        return False

    proxy = proxy_to(hook)
    r0 = parse_reference(f"{proxy.host}/t/single:v1")
    assert client().get_manifest(r0).digest == images["single"].manifest_digest
    state.update(n=0, limit=100)
    with pytest.raises(RegistryUnavailable, match="HTTP 503"):
        client(retries=2).get_manifest(r0)
    assert state["n"] == 3


def test_manifest_cut_mid_body_is_retried_by_the_chain(registry, images, proxy_to):
    """The transport chain reads a manifest's body inside its retries (chain.Retry)."""
    state = {"cuts": 0, "limit": 2}

    def hook(h, method, path):
        if method == "GET" and "/manifests/" in path and state["cuts"] < state["limit"]:
            state["cuts"] += 1
            h.forward(cut_after=20)
            return True
        return False

    proxy = proxy_to(hook)
    r0 = parse_reference(f"{proxy.host}/t/single:v1")
    assert client(retries=2).get_manifest(r0).digest == images["single"].manifest_digest
    gets = [p for m, p, _ in proxy.seen if m == "GET" and "/manifests/" in p]
    assert state["cuts"] == 2 and len(gets) == 3
    state.update(cuts=0, limit=100)
    with pytest.raises(RegistryUnavailable, match="reading the manifest of .* kept failing"):
        client(retries=2).get_manifest(r0)
    assert state["cuts"] == 3


def test_connection_refused():
    with pytest.raises(RegistryUnavailable, match="cannot reach registry 127.0.0.1:1"):
        client(retries=1).get_manifest(parse_reference("127.0.0.1:1/x:y"))


def _manifest_transform(new_body=None, content_type=None):
    def transform(status, headers, data):
        headers = [(k, v) for k, v in headers if k.lower() != "docker-content-digest"]
        if content_type:
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            headers.append(("Content-Type", content_type))
        return status, headers, new_body if new_body is not None else data
    return transform


def test_manifest_too_big(registry, images, proxy_to):
    big = dict(images["single"].manifest)
    big["annotations"] = {"pad": "x" * (5 << 20)}
    body = json.dumps(big).encode()

    def hook(h, method, path):
        if "/manifests/" in path:
            h.forward(transform=_manifest_transform(body))
            return True
        return False

    proxy = proxy_to(hook)
    with pytest.raises(LimitExceeded, match="manifest"):
        client().get_manifest(parse_reference(f"{proxy.host}/t/single:v1"))


def test_manifest_too_big_without_length(registry, images):
    # a chunked answer with no Content-Length: the limit holds while reading
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", OCI_MANIFEST)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(200):  # 12.5 MiB if read to the end
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                self.sent_all = False

    srv = serve(H)
    try:
        with pytest.raises(LimitExceeded):
            client().get_manifest(parse_reference(f"127.0.0.1:{srv.server_address[1]}/a/b:c"))
    finally:
        srv.shutdown()
        srv.server_close()


def test_content_type_mismatch_and_ambiguous(registry, images, proxy_to):
    img = images["single"]
    ambiguous = dict(img.manifest)
    ambiguous["manifests"] = []
    plans = {
        # CVE-2021-41190: served as an index, declares itself a manifest
        "ct": _manifest_transform(content_type=OCI_INDEX),
        "both": _manifest_transform(json.dumps(ambiguous).encode()),
        "schema1": _manifest_transform(
            json.dumps({"schemaVersion": 1, "name": "t/single", "fsLayers": []}).encode(),
            content_type=mt.DOCKER_SCHEMA1_SIGNED),
        "weird": _manifest_transform(
            json.dumps({"schemaVersion": 2, "mediaType": "application/x-weird"}).encode(),
            content_type="application/x-weird"),
    }
    current = {}

    def hook(h, method, path):
        if "/manifests/" in path:
            h.forward(transform=plans[current["plan"]])
            return True
        return False

    proxy = proxy_to(hook)
    r0 = parse_reference(f"{proxy.host}/t/single:v1")
    current["plan"] = "ct"
    with pytest.raises(RegistryProtocolError, match="served as .*index.* declares"):
        client().get_manifest(r0)
    current["plan"] = "both"
    with pytest.raises(RegistryProtocolError, match="both 'layers' and 'manifests'"):
        client().get_manifest(r0)
    current["plan"] = "schema1"
    with pytest.raises(UnsupportedMediaType, match="schema 1"):
        client().get_manifest(r0)
    current["plan"] = "weird"
    with pytest.raises(UnsupportedMediaType, match="application/x-weird"):
        client().get_manifest(r0)


def test_redirect_does_not_leak_authorization(tmp_path, caplog):
    """Blob GETs answered with a redirect to other-origin storage: no Authorization there."""
    password = "pw-Redirect-7f3a"
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(b"bob:" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
                         + b"\n")
    stored = {}
    storage_seen = []

    class Storage(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            storage_seen.append(dict(self.headers))
            data = stored[self.path.split("?")[0].rsplit("/", 1)[-1]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

    storage = serve(Storage)
    # "localhost" vs 127.0.0.1 and another port: a different origin either way
    storage_base = f"http://localhost:{storage.server_address[1]}"
    with RegistryServer(tmp_path / "reg", auth=("htpasswd", htpasswd)) as reg:
        img = Pusher(reg.url, auth=("bob", password)).image(
            "p/img", "v1", [[Entry("f", data=b"private")]])
        stored[img.config_digest] = _blob_path(reg, img.config_digest).read_bytes()
        stored[img.layer_digests[0]] = _blob_path(reg, img.layer_digests[0]).read_bytes()

        def hook(h, method, path):
            if method == "GET" and "/blobs/" in path:
                digest = path.rsplit("/", 1)[-1]
                h.send_raw(307, [("Location", f"{storage_base}/store/{digest}?sig=SECRETSIG"),
                                 ("Content-Length", "0")])
                return True
            return False

        proxy = FaultProxy(reg.url, hook)
        try:
            creds = StaticCredentials({proxy.host: Credentials("bob", password)})
            c = client(credentials=creds)
            with caplog.at_level(logging.DEBUG, logger="ociimage"):
                r = c.resolve(parse_reference(f"{proxy.host}/p/img:v1"), Platform("linux", "amd64"))
                with c.open_blob(r.reference, r.layers[0]) as f:
                    assert sha256(f.read()) == img.layer_digests[0]
        finally:
            proxy.close()
            storage.shutdown()
            storage.server_close()
    assert len(storage_seen) == 2
    assert all("Authorization" not in h for h in storage_seen)
    # the registry side did get credentials
    assert any("Authorization" in hd for m, p, hd in proxy.seen if "/blobs/" in p)
    assert password not in caplog.text and "SECRETSIG" not in caplog.text


def test_auth_required_on_plain_registry_is_not_triggered(registry, images):
    # a registry without auth never challenges; no credentials are looked up
    calls = []
    c = client(credentials=lambda d: calls.append(d))
    c.get_manifest(ref(registry, "t/single:v1"))
    assert calls == []


def test_anonymous_against_basic_registry(tmp_path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(b"bob:" + bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)) + b"\n")
    with RegistryServer(tmp_path / "reg", auth=("htpasswd", htpasswd)) as reg:
        with pytest.raises(AuthenticationRequired, match="docker login"):
            client().get_manifest(ref(reg, "a/b:c"))
