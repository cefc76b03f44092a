"""Publishing the SquashFS as a monolithic OCI image: the push side of the Distribution Spec
against the real docker-registry (2.8), checked with skopeo, a tool we did not write."""

from __future__ import annotations

import json
import logging
import subprocess
from urllib.parse import parse_qs, urlsplit

import pytest

from monohelp import client, convert_and_publish, file_sha, push_source
from ocibuild import Pusher
from registry_proxy import RegistryProxy
from registry_server import RegistryServer, free_port
from token_issuer import TokenIssuer

from ociimage.cache import Cache
from ociimage.errors import AccessDenied
from ociimage.monolithic import (A_COMPRESSION, A_CONVERTER, A_SOURCE_DIGEST, A_SOURCE_REF,
                                 fallback_tag)
from ociimage.pull import PullOptions, pull_to_cache
from ociimage.registry import mediatypes as mt
from ociimage.registry.credentials import Credentials, StaticCredentials


def skopeo(*args) -> str:
    r = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_published_manifest_config_fallback_tag_and_skopeo_copy(registry, tmp_path):
    src = push_source(registry, "pub/app", os_id="pub")
    c = client()
    entry, pub, resolved = convert_and_publish(c, tmp_path / "cache", f"{registry.host}/pub/app:v1",
                                               f"{registry.host}/pub/app:v1-squashfs")
    assert pub.blob == "uploaded" and pub.referrers == "fallback tag"  # 2.8: no OCI-Subject
    sqfs_digest = file_sha(entry.path)
    raw = json.loads(skopeo("inspect", "--tls-verify=false", "--raw",
                            f"docker://{registry.host}/pub/app:v1-squashfs"))
    assert raw["mediaType"] == mt.OCI_MANIFEST and raw["artifactType"] == mt.SQUASHFS_LAYER
    assert raw["layers"] == [{"mediaType": mt.SQUASHFS_LAYER, "digest": sqfs_digest,
                              "size": entry.size}]
    assert raw["subject"]["digest"] == src.manifest_digest
    assert raw["subject"]["mediaType"] == mt.OCI_MANIFEST
    a = raw["annotations"]
    assert a[A_SOURCE_DIGEST] == src.manifest_digest
    assert a[A_SOURCE_REF] == f"{registry.host}/pub/app:v1@{src.manifest_digest}"
    assert a[A_COMPRESSION] == "zstd" and a[A_CONVERTER]
    assert a["org.opencontainers.image.base.digest"] == src.manifest_digest
    cfg = json.loads(skopeo("inspect", "--tls-verify=false", "--config", "--raw",
                            f"docker://{registry.host}/pub/app:v1-squashfs"))
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [sqfs_digest]}
    assert cfg["config"]["WorkingDir"] == "/opt/app"
    assert cfg["config"]["Entrypoint"] == ["/opt/app/hello.sh"]
    assert "IMAGE_VAR=from-image" in cfg["config"]["Env"]
    # the fallback tag: an index of the source's referrers
    idx = json.loads(skopeo("inspect", "--tls-verify=false", "--raw",
                            f"docker://{registry.host}/pub/app:{fallback_tag(src.manifest_digest)}"))
    assert idx["mediaType"] == mt.OCI_INDEX
    assert [(m["digest"], m["artifactType"]) for m in idx["manifests"]] == \
        [(pub.manifest_digest, mt.SQUASHFS_LAYER)]
    assert idx["manifests"][0]["annotations"][A_SOURCE_DIGEST] == src.manifest_digest
    # publishing again is idempotent (deterministic manifest, entry not duplicated)
    _, again, _ = convert_and_publish(c, tmp_path / "cache", f"{registry.host}/pub/app:v1",
                                      f"{registry.host}/pub/app:v1-squashfs")
    assert again.manifest_digest == pub.manifest_digest and again.blob == "exists"
    idx2 = json.loads(skopeo("inspect", "--tls-verify=false", "--raw",
                             f"docker://{registry.host}/pub/app:{fallback_tag(src.manifest_digest)}"))
    assert idx2 == idx
    # a tool we did not write copies it like any image
    skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
           f"docker://{registry.host}/pub/app:v1-squashfs", f"docker://{registry.host}/pub/copy:v1")
    copied = json.loads(skopeo("inspect", "--tls-verify=false", "--raw",
                               f"docker://{registry.host}/pub/copy:v1"))
    assert copied["layers"] == raw["layers"] and copied["subject"] == raw["subject"]


def test_fallback_index_keeps_other_referrers(registry, tmp_path):
    src = push_source(registry, "pub/keep", os_id="keep")
    p = Pusher(registry.url)
    # someone else's referrer (e.g. a signature) is already in the fallback index
    blob = p.blob("pub/keep", b"{}")
    other = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                        "artifactType": "application/vnd.example.signature",
                        "config": {"mediaType": mt.OCI_EMPTY, "digest": blob, "size": 2},
                        "layers": [{"mediaType": mt.OCI_EMPTY, "digest": blob, "size": 2}],
                        "subject": {"mediaType": mt.OCI_MANIFEST, "digest": src.manifest_digest,
                                    "size": 1}}).encode()
    other_digest = p.manifest("pub/keep", "sig", other, mt.OCI_MANIFEST)
    desc = {"mediaType": mt.OCI_MANIFEST, "digest": other_digest, "size": len(other),
            "artifactType": "application/vnd.example.signature"}
    p.manifest("pub/keep", fallback_tag(src.manifest_digest),
               json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                           "manifests": [desc]}).encode(), mt.OCI_INDEX)
    _, pub, _ = convert_and_publish(client(), tmp_path / "cache", f"{registry.host}/pub/keep:v1",
                                    f"{registry.host}/pub/keep")
    assert pub.reference.tag is None  # no tag given: pushed by digest, found through the index
    idx = json.loads(skopeo("inspect", "--tls-verify=false", "--raw",
                            f"docker://{registry.host}/pub/keep:{fallback_tag(src.manifest_digest)}"))
    assert [m["digest"] for m in idx["manifests"]] == [other_digest, pub.manifest_digest]


def test_cross_repository_mount(fresh_registry, tmp_path):
    reg = fresh_registry
    push_source(reg, "src/app", os_id="mount")
    c = client()
    _, first, _ = convert_and_publish(c, tmp_path / "cache", f"{reg.host}/src/app:v1",
                                      f"{reg.host}/src/app:v1-squashfs")
    assert first.blob == "uploaded"
    n = len(reg.access_log())
    _, second, _ = convert_and_publish(c, tmp_path / "cache", f"{reg.host}/src/app:v1",
                                       f"{reg.host}/site/app:v1")
    assert second.blob == "mounted"
    log = reg.access_log()[n:]
    mounts = [(m, p, s) for m, p, s in log if m == "POST" and "mount=" in p]
    assert mounts and mounts[0][2] == 201
    assert f"mount={second.squashfs_digest}" in mounts[0][1]
    # the source repository, as the registry decodes it (either encoding of '/' is the same)
    assert parse_qs(urlsplit(mounts[0][1]).query)["from"] == ["src/app"], mounts[0][1]
    # the SquashFS went up once: the only blob uploads in the second publish are the config's
    uploads = [(m, p) for m, p, s in log if m in ("PATCH", "PUT") and "/blobs/uploads/" in p]
    assert all(second.squashfs_digest not in p for _, p in uploads)
    assert not any(m == "PATCH" for m, _ in uploads)


def _chunked_publish_through(reg, proxy, tmp_path, repo):
    push_source(reg, repo, os_id=repo.replace("/", "-"))
    return convert_and_publish(client(), tmp_path / "cache", f"{proxy.host}/{repo}:v1",
                               f"{proxy.host}/{repo}:v1-squashfs", chunk_size=64 << 10)


def _uploads_started(log, repo):
    return sum(1 for m, p, s in log if m == "POST" and p.startswith(f"/v2/{repo}/blobs/uploads/"))


def test_chunked_upload_resumes_after_interrupted_patch(fresh_registry, tmp_path, caplog):
    reg = fresh_registry
    caplog.set_level(logging.INFO, logger="ociimage.registry")
    with RegistryProxy(reg.url, cut_patches={2: "drop", 4: "drop"}) as proxy:
        entry, pub, _ = _chunked_publish_through(reg, proxy, tmp_path, "chunk/app")
    assert entry.size > 4 * (64 << 10)  # several chunks
    assert pub.blob == "uploaded"
    cuts = [i for i, (m, _, s) in enumerate(proxy.log) if s == -1]
    assert len(cuts) == 2 and all(proxy.log[i][0] == "PATCH" for i in cuts)
    for i in cuts:
        # the client asked the registry how much it has, then went on from there
        status, nxt = proxy.log[i + 1], proxy.log[i + 2]
        assert status[0] == "GET" and "/blobs/uploads/" in status[1] and status[2] == 204
        assert nxt[0] == "PATCH" and nxt[2] == 202
    # one upload session for the SquashFS (+1 for the config): resumed, not restarted
    assert _uploads_started(proxy.log, "chunk/app") == 2
    assert sum("resuming the upload" in r.getMessage() for r in caplog.records) == 2
    # the registry holds exactly the file
    out = subprocess.run(["curl", "-sf", f"{reg.url}/v2/chunk/app/blobs/{pub.squashfs_digest}"],
                         capture_output=True, timeout=30).stdout
    assert out == entry.path.read_bytes()


def test_chunk_partly_received_starts_the_upload_over(fresh_registry, tmp_path, caplog):
    # Distribution 2.8 cancels an upload whose _state offset no longer matches what it
    # holds: the status request answers 404 and the client starts over.
    reg = fresh_registry
    caplog.set_level(logging.INFO, logger="ociimage.registry")
    with RegistryProxy(reg.url, cut_patches={2: "half"}) as proxy:
        entry, pub, _ = _chunked_publish_through(reg, proxy, tmp_path, "half/app")
    assert pub.blob == "uploaded"
    assert _uploads_started(proxy.log, "half/app") == 3
    assert any("starting over" in r.getMessage() for r in caplog.records)
    out = subprocess.run(["curl", "-sf", f"{reg.url}/v2/half/app/blobs/{pub.squashfs_digest}"],
                         capture_output=True, timeout=30).stdout
    assert out == entry.path.read_bytes()


def test_push_with_token_auth_scopes(tmp_path):
    issuer = TokenIssuer(tmp_path / "issuer", {"pub": "pub-pw", "ro": "ro-pw"},
                         {"pub": {"src/*": ["pull"], "mono/*": ["pull", "push"]},
                          "ro": {"src/*": ["pull"], "mono/*": ["pull"]}})
    with issuer, RegistryServer(tmp_path / "reg", auth=issuer.registry_auth()) as reg:
        p = Pusher(reg.url)
        p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
            {"type": "repository", "name": "src/app", "actions": ["pull", "push"]}])
        p.image("src/app", "v1", __import__("images").busybox_layers(os_id="tok"))
        creds = StaticCredentials({reg.host: Credentials("pub", "pub-pw")})
        c = client(credentials=creds)
        _, first, _ = convert_and_publish(c, tmp_path / "cache", f"{reg.host}/src/app:v1",
                                          f"{reg.host}/mono/a:v1")
        scopes = [s for r in issuer.requests for s in r["scopes"]]
        assert "repository:mono/a:pull,push" in scopes
        assert "repository:src/app:pull" in scopes
        # second target: the blob is mounted from the first, asking pull on the mount source
        _, second, _ = convert_and_publish(c, tmp_path / "cache", f"{reg.host}/src/app:v1",
                                           f"{reg.host}/mono/b:v1", mount_from=["mono/a"])
        assert second.blob == "mounted"
        mount_req = [r["scopes"] for r in issuer.requests
                     if "repository:mono/b:pull,push" in r["scopes"]
                     and "repository:mono/a:pull" in r["scopes"]]
        assert mount_req
        # read-only credentials: a clear refusal naming push
        ro = client(credentials=StaticCredentials({reg.host: Credentials("ro", "ro-pw")}))
        with pytest.raises(AccessDenied) as e:
            convert_and_publish(ro, tmp_path / "cache", f"{reg.host}/src/app:v1",
                                f"{reg.host}/mono/c:v1")
        assert "push" in str(e.value) and "\n" not in str(e.value)


def test_publish_to_is_best_effort(registry, tmp_path, caplog):
    push_source(registry, "bef/app", os_id="bef")
    dead = f"127.0.0.1:{free_port()}"
    caplog.set_level(logging.WARNING)
    c = client(retries=0)
    entry = pull_to_cache(c, Cache(tmp_path / "c1", node="t"), f"{registry.host}/bef/app:v1",
                          PullOptions(publish_to=f"{dead}/site/conv"))
    assert entry.meta["origin"]["kind"] == "converted"
    assert any("publishing the conversion failed" in r.getMessage() for r in caplog.records)
    # and with a reachable target, the conversion is there afterwards
    entry = pull_to_cache(client(), Cache(tmp_path / "c2", node="t"),
                          f"{registry.host}/bef/app:v1",
                          PullOptions(publish_to=f"{registry.host}/site/conv"))
    idx = json.loads(skopeo("inspect", "--tls-verify=false", "--raw",
                            f"docker://{registry.host}/site/conv:{fallback_tag(entry.digest)}"))
    assert idx["manifests"][0]["artifactType"] == mt.SQUASHFS_LAYER


def test_cli_publish(registry, tmp_path):
    import os
    import sys
    from pathlib import Path
    push_source(registry, "cli/app", os_id="cli")
    exe = Path(sys.executable).parent / "oci-image"
    env = dict(os.environ, OCI_IMAGE_CONFIG=str(tmp_path / "none.conf"))
    r = subprocess.run([str(exe), "--json", "publish", "--cache-dir", str(tmp_path / "cache"),
                        f"{registry.host}/cli/app:v1", f"{registry.host}/cli/app:sqfs"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["referrers"] == "fallback tag" and out["reference"].startswith(
        f"{registry.host}/cli/app:sqfs@sha256:")
    r = subprocess.run([str(exe), "publish", "--cache-dir", str(tmp_path / "cache"),
                        f"{registry.host}/cli/app:sqfs", f"{registry.host}/cli/app:again"],
                       capture_output=True, text=True, env=env, timeout=60)
    errors = [line for line in r.stderr.splitlines() if line.startswith("oci-image: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "already a monolithic" in errors[0]
    assert r.stderr.splitlines()[-1] == errors[0] and "Traceback" not in r.stderr
