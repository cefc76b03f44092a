"""A user's own registry cannot unlock someone else's cached private image (issue 15 review).

The cache is keyed by digest. A user who knows a private image's manifest and config
(small JSON that leaks easily: a revoked user, a CI log) but not its layers serves them
from a registry of their own, behind an index or a tag of their own, and asks for that:
resolving it succeeds and names the digest of the cached private image. The entry found
must still be checked against where IT came from, with this user's credentials.
The attacker's registry is a small HTTP server (it is the attacker's: anything may
answer there); the private image is in a real docker-registry with token auth.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from ocibuild import Entry, Pusher
from registry_server import RegistryServer
from token_issuer import TokenIssuer

from ociimage.cache import Cache
from ociimage.config import Config
from ociimage.errors import AccessDenied
from ociimage.images import ImageStore
from ociimage.registry.credentials import Credentials, StaticCredentials
from ociimage.registry.platform import host_platform

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class AttackerRegistry:
    """Serves fixed documents by path; everything else 404. Logs what it was asked."""

    def __init__(self):
        self.served, self.log = {}, []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _go(self, body: bool):
                outer.log.append(f"{self.command} {self.path}")
                data, ctype = outer.served.get(self.path, (None, None))
                if self.path == "/v2/":
                    data, ctype = b"", "text/plain"
                self.send_response(404 if data is None else 200)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                if body and data:
                    self.wfile.write(data)

            def do_GET(self):
                self._go(True)

            def do_HEAD(self):
                self._go(False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.host = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def setting(tmp_path):
    issuer = TokenIssuer(tmp_path / "issuer", {"alice": "pa", "bob": "pb"},
                         {"alice": {"priv/*": ["pull"]}, "bob": {}})
    with issuer, RegistryServer(tmp_path / "reg", auth=issuer.registry_auth()) as reg:
        p = Pusher(reg.url)
        p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
            {"type": "repository", "name": "priv/app", "actions": ["pull", "push"]}])
        arch = host_platform().architecture
        img = p.image("priv/app", "v1", [[Entry("etc/", "dir", mode=0o755),
                                          Entry("etc/secret", data=b"TOP SECRET")]],
                      architecture=arch)
        cache = Cache(tmp_path / "cache", node="n1")
        evil = AttackerRegistry()
        store = ImageStore(cache, Config(cache_dir=tmp_path / "cache",
                                         insecure_registries=[reg.host, evil.host]))
        creds = {1001: StaticCredentials({reg.host: Credentials("alice", "pa")}),
                 1002: StaticCredentials({reg.host: Credentials("bob", "pb")})}
        store.credentials_for = lambda uid: creds.get(uid) or StaticCredentials({})
        # alice, who may, caches it
        store.pull(f"{reg.host}/priv/app@{img.manifest_digest}", uid=1001)
        # what bob knows: the manifest and the config, not the layers
        tok = issuer.make_token("alice", [{"type": "repository", "name": "priv/app",
                                           "actions": ["pull"]}])
        hdr = {"Authorization": "Bearer " + tok, "Accept": OCI_MANIFEST}
        mraw = requests.get(f"{reg.url}/v2/priv/app/manifests/{img.manifest_digest}",
                            headers=hdr).content
        craw = requests.get(f"{reg.url}/v2/priv/app/blobs/{img.config_digest}",
                            headers=hdr).content
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": img.manifest_digest, "size": len(mraw),
             "platform": {"os": "linux", "architecture": arch}}]}).encode()
        idig = "sha256:" + hashlib.sha256(index).hexdigest()
        evil.served.update({
            f"/v2/evil/x/manifests/{idig}": (index, OCI_INDEX),
            "/v2/evil/x/manifests/latest": (index, OCI_INDEX),
            f"/v2/evil/x/manifests/{img.manifest_digest}": (mraw, OCI_MANIFEST),
            f"/v2/evil/x/blobs/{img.config_digest}": (craw, "application/octet-stream")})
        try:
            yield store, reg, img, evil, idig
        finally:
            evil.close()


def test_the_private_image_itself_is_refused(setting):
    store, reg, img, _evil, _idig = setting
    with pytest.raises(AccessDenied, match="does not let you pull"):
        store.pull(f"{reg.host}/priv/app@{img.manifest_digest}", uid=1002)


def test_a_refusal_names_no_other_users_repository(setting):
    """A digest is public (squeue shows every job's marker): asking for it under any name
    must not reveal the private registry and repository the cached image came from."""
    store, reg, img, _evil, _idig = setting
    for ref in (f"docker.io/library/anything@{img.manifest_digest}",
                f"{reg.host}/other/name@{img.manifest_digest}"):
        with pytest.raises(AccessDenied) as e:
            store.lookup(ref, 1002)
        assert "priv/app" not in str(e.value) and reg.host not in str(e.value), e.value
        assert img.manifest_digest[7:19] in str(e.value)  # it says which image, by digest


@pytest.mark.parametrize("how", ["index digest", "tag"])
def test_an_index_or_tag_of_ones_own_registry_naming_it_is_refused(setting, how):
    store, reg, img, evil, idig = setting
    ref = f"{evil.host}/evil/x@{idig}" if how == "index digest" else f"{evil.host}/evil/x:latest"
    with pytest.raises(AccessDenied, match="does not let you pull") as e:
        store.pull(ref, uid=1002)
    # and the refusal does not tell bob where the image he does not know came from
    assert "priv/app" not in str(e.value) and reg.host not in str(e.value), e.value
    # the attacker's registry served its index and the manifest: it was asked, and the
    # refusal came from the image's own registry, not from a missing document
    assert any("/manifests/" in line for line in evil.log), evil.log
    # nor does the cache hit that follows (the index's record, if any) let bob in
    with pytest.raises(AccessDenied):
        store.pull(ref, uid=1002)
    # and a refused ask leaves nothing behind for good: any user can serve indexes naming
    # a cached manifest, as many as they like
    assert store.cache.record_names("resolved") == []
    # alice still gets it the same ways
    assert store.pull(f"{reg.host}/priv/app@{img.manifest_digest}", uid=1001).digest \
        == img.manifest_digest
