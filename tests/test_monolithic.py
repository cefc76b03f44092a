"""Pulling ready to mount: monolithic images by their own reference, monolithic referrers of
ordinary images, trust, and a step run from a monolithic image through a real oci-imaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_proc import DaemonProcess
from monohelp import client, convert_and_publish, layer_fetches, pull, push_source
from ocibuild import Pusher, sha256
from registry_proxy import RegistryProxy

from ociimage.cache import Cache
from ociimage.errors import AccessDenied, CorruptLayer, DigestMismatch, OciImageError
from ociimage.monolithic import Trust
from ociimage.registry import mediatypes as mt

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def published(registry, tmp_path_factory):
    """mono/app:v1 (ordinary) converted once and published as mono/app:v1-squashfs."""
    src = push_source(registry, "mono/app", os_id="mono")
    cache_dir = tmp_path_factory.mktemp("origin-cache")
    entry, pub, resolved = convert_and_publish(client(), cache_dir, f"{registry.host}/mono/app:v1",
                                               f"{registry.host}/mono/app:v1-squashfs")
    return src, entry, pub


def _same_meta(a: dict, b: dict) -> None:
    for key in ("reference", "manifest_digest", "index_digest", "platform", "config", "layers",
                "compressed_size", "digest", "size"):
        assert a.get(key) == b.get(key), key


def test_trust_rules():
    t = Trust(["reg.example.org:5000/hpc", "https://other.example/", "index.docker.io/acme"])
    assert t.allows("reg.example.org:5000", "hpc") and t.allows("reg.example.org:5000", "hpc/x")
    assert not t.allows("reg.example.org:5000", "hpc-old/x")
    assert not t.allows("reg.example.org", "hpc")  # another port is another registry
    assert t.allows("other.example", "any/thing")
    assert t.allows("docker.io", "acme/solver") and not t.allows("docker.io", "library/ubuntu")
    assert not Trust([])


def test_pull_monolithic_by_its_tag_is_a_download(registry, published, tmp_path):
    src, origin, pub = published
    before = layer_fetches(registry, src)
    entry, produced = pull(client(), tmp_path / "cache", f"{registry.host}/mono/app:v1-squashfs",
                           trusted=[f"{registry.host}/mono"])
    assert produced == "fetched"
    assert entry.digest == pub.manifest_digest
    assert entry.path.read_bytes() == origin.path.read_bytes()  # bit-identical
    assert entry.meta["origin"] == {"kind": "fetched", "via": "reference",
                                    "from": f"{registry.host}/mono/app:v1-squashfs@{pub.manifest_digest}",
                                    "squashfs_digest": pub.squashfs_digest}
    assert entry.meta["config"] == origin.meta["config"]  # the source's runtime config
    assert "conversion_seconds" not in entry.meta
    assert layer_fetches(registry, src) == before  # no layer of the source was read
    # `oci-image convert` of a monolithic image writes the verified layer itself
    from ociimage.pull import PullOptions, convert_to_file
    meta = convert_to_file(client(), f"{registry.host}/mono/app:v1-squashfs", tmp_path / "x.sqfs",
                           PullOptions())
    assert (tmp_path / "x.sqfs").read_bytes() == origin.path.read_bytes()
    assert meta["origin"]["kind"] == "fetched"


def test_untrusted_monolithic_is_refused(registry, published, tmp_path):
    _, _, pub = published
    for trusted in ([], [f"{registry.host}/other"]):
        with pytest.raises(AccessDenied) as e:
            pull(client(), tmp_path / "cache", f"{registry.host}/mono/app:v1-squashfs",
                 trusted=trusted)
        msg = str(e.value)
        assert "\n" not in msg and "does not trust" in msg and "trusted_squashfs" in msg
        assert "mono/app:v1@" in msg  # names the image to run instead
    assert Cache(tmp_path / "cache").list() == []
    assert not any((tmp_path / "cache" / "tmp").iterdir())
    # the CLI says it in one line
    env = dict(os.environ, OCI_IMAGE_CONFIG=str(tmp_path / "none.conf"))
    r = subprocess.run([str(Path(sys.executable).parent / "oci-image"), "pull", "--cache-dir",
                        str(tmp_path / "cache"), f"{registry.host}/mono/app:v1-squashfs"],
                       capture_output=True, text=True, env=env, timeout=60)
    errors = [x for x in r.stderr.splitlines() if x.startswith("oci-image: error:")]
    assert r.returncode != 0 and len(errors) == 1 and "does not trust" in errors[0]


def test_source_pull_fetches_trusted_referrer_via_fallback_tag(registry, published, tmp_path):
    src, origin, pub = published
    before = layer_fetches(registry, src)
    entry, produced = pull(client(), tmp_path / "cache", f"{registry.host}/mono/app:v1",
                           trusted=[registry.host])
    assert produced == "fetched"
    assert entry.digest == src.manifest_digest  # keyed by the source, as a conversion would be
    assert entry.path.read_bytes() == origin.path.read_bytes()
    _same_meta(entry.meta, origin.meta)
    assert entry.meta["converter"]["compression"] == origin.meta["converter"]["compression"]
    assert entry.meta["origin"]["kind"] == "fetched"
    assert entry.meta["origin"]["via"] == "fallback tag"
    assert entry.meta["origin"]["from"] == f"{registry.host}/mono/app@{pub.manifest_digest}"
    assert layer_fetches(registry, src) == before


def test_source_pull_untrusted_converts(registry, published, tmp_path):
    src, origin, _ = published
    before = layer_fetches(registry, src)
    entry, produced = pull(client(), tmp_path / "cache", f"{registry.host}/mono/app:v1",
                           trusted=[f"{registry.host}/elsewhere"])
    assert produced == "converted" and entry.meta["origin"] == {"kind": "converted"}
    assert layer_fetches(registry, src) == before + len(src.layer_digests)
    assert entry.path.read_bytes() == origin.path.read_bytes()  # conversion is reproducible


def test_publish_to_repository_is_looked_in(registry, published, tmp_path):
    # a site repository holding conversions (publish_to) is found without trusting the source
    src = push_source(registry, "mono/other", os_id="other")
    _, pub, _ = convert_and_publish(client(), tmp_path / "c1", f"{registry.host}/mono/other:v1",
                                    f"{registry.host}/site/converted")
    entry, produced = pull(client(), tmp_path / "c2", f"{registry.host}/mono/other:v1",
                           publish_to=f"{registry.host}/site/converted")
    assert produced == "fetched" and entry.digest == src.manifest_digest
    assert entry.meta["origin"]["from"] == f"{registry.host}/site/converted@{pub.manifest_digest}"


def test_referrers_api_path(registry, published, tmp_path):
    # Docker Distribution 2.8 has no referrers API: a proxy answers it (from the fallback
    # index, unfiltered) and hides the fallback tag, so only the API can have been used.
    src, origin, pub = published
    with RegistryProxy(registry.url, referrers_api=True) as proxy:
        entry, produced = pull(client(), tmp_path / "cache", f"{proxy.host}/mono/app:v1",
                               trusted=[proxy.host])
    assert produced == "fetched" and entry.meta["origin"]["via"] == "referrers API"
    assert entry.path.read_bytes() == origin.path.read_bytes()
    refs = [p for m, p, s in proxy.log if "/referrers/" in p]
    assert refs == [f"/v2/mono/app/referrers/{src.manifest_digest}"
                    f"?artifactType={mt.SQUASHFS_LAYER.replace('/', '%2F')}"]
    assert not any("/manifests/sha256-" in p for _, p, _ in proxy.log)


def test_corrupted_squashfs_blob_is_rejected_by_digest(fresh_registry, tmp_path):
    reg = fresh_registry
    push_source(reg, "bad/app", os_id="bad")
    _, pub, _ = convert_and_publish(client(), tmp_path / "c1", f"{reg.host}/bad/app:v1",
                                    f"{reg.host}/bad/app:sqfs")
    hexpart = pub.squashfs_digest.split(":")[1]
    data = reg.workdir / "data/docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(DigestMismatch):
        pull(client(retries=0), tmp_path / "c2", f"{reg.host}/bad/app:sqfs", trusted=[reg.host])
    assert Cache(tmp_path / "c2").list() == []
    # through the source: the bad referrer is passed over and the image converted
    entry, produced = pull(client(retries=0), tmp_path / "c3", f"{reg.host}/bad/app:v1",
                           trusted=[reg.host])
    assert produced == "converted"


def test_a_layer_that_is_not_squashfs_is_rejected(registry, tmp_path):
    p = Pusher(registry.url)
    blob = os.urandom(4096)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [sha256(blob)]}}).encode()
    cd, bd = p.blob("fake/sqfs", cfg), p.blob("fake/sqfs", blob)
    p.manifest("fake/sqfs", "v1", json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": cd, "size": len(cfg)},
        "layers": [{"mediaType": mt.SQUASHFS_LAYER, "digest": bd, "size": len(blob)}]}).encode(),
        mt.OCI_MANIFEST)
    with pytest.raises(CorruptLayer) as e:
        pull(client(), tmp_path / "cache", f"{registry.host}/fake/sqfs:v1",
             trusted=[registry.host])
    assert "not a SquashFS" in str(e.value)
    assert Cache(tmp_path / "cache").list() == []


# -- through a real oci-imaged -----------------------------------------------

ENTER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from ociimage.runtime import syscalls
fd = os.open(sys.argv[2], os.O_RDONLY)
syscalls.setns(fd, syscalls.CLONE_NEWNS)
os.chdir(sys.argv[3])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.execv("/bin/sh", ["/bin/sh", "-c", sys.argv[4]])
"""


def _step(daemon, image, job):
    from ociimage.client import DaemonClient
    from ociimage.v1 import ociimage_pb2 as pb
    req = pb.PrepareStepRequest(job_id=job, step_id="0", uid=65534, gid=65534, image=image,
                                cwd="/", mount_home=False, user_name="nobody", home="/",
                                node=daemon.node)
    return DaemonClient(str(daemon.socket)).prepare_step(req)


def _loop_backing_files():
    out = []
    for d in Path("/sys/block").glob("loop*"):
        f = d / "loop" / "backing_file"
        if f.exists():
            out.append(f.read_text().strip())
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")
def test_daemon_runs_monolithic_image_and_never_mounts_untrusted(registry, published, tmp_path):
    src, origin, pub = published
    base = tmp_path / "d"
    base.mkdir()
    (base / "none.conf").write_text(f"[registries]\ntrusted_squashfs = {registry.host}/mono\n")
    daemon = DaemonProcess(base, tmp_path / "cache", metrics=False).start()
    try:
        # untrusted (another repository of the same registry): refused, nothing mounted
        # the same monolithic image, copied to a repository the daemon does not trust
        subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                        f"docker://{registry.host}/mono/app:v1-squashfs",
                        f"docker://{registry.host}/untrusted/app:v1"], check=True,
                       capture_output=True, timeout=60)
        loops = _loop_backing_files()
        with pytest.raises(OciImageError) as e:
            _step(daemon, f"{registry.host}/untrusted/app:v1@{pub.manifest_digest}", "701")
        assert "does not trust" in str(e.value)
        assert _loop_backing_files() == loops
        assert Cache(tmp_path / "cache").list() == []
        # trusted: a step runs in it, no conversion
        c = _step(daemon, f"{registry.host}/mono/app:v1-squashfs@{pub.manifest_digest}", "702")
        assert c.digest == pub.manifest_digest and c.cwd == "/opt/app"
        assert "IMAGE_VAR=from-image" in list(c.set_env)
        r = subprocess.run([sys.executable, "-c", ENTER, str(ROOT / "daemon"), c.ns_path, c.cwd,
                            "cat /etc/os-release; id -u; pwd"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "ID=mono" in r.stdout and "65534" in r.stdout and "/opt/app" in r.stdout
        entry = Cache(tmp_path / "cache").get(pub.manifest_digest)
        assert entry.meta["origin"]["kind"] == "fetched"
        assert any(b == str(entry.path) for b in _loop_backing_files())
        assert "converting" not in daemon.log()
        from ociimage.client import DaemonClient
        DaemonClient(str(daemon.socket)).release_step("702", "0")
    finally:
        daemon.stop()
        _unmount_under(base)


def _unmount_under(path: Path) -> None:
    """The daemon leaves image mounts for its successor; a test must not."""
    from ociimage.runtime.mounts import read_mountinfo
    prefix = os.path.realpath(path) + "/"
    for m in sorted((e.mount_point for e in read_mountinfo()
                     if e.mount_point.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")
def test_daemon_publish_to_converts_once_per_world(registry, tmp_path):
    import time
    src = push_source(registry, "world/app", os_id="world")
    ref = f"{registry.host}/world/app:v1"
    site = f"{registry.host}/site/world"
    daemons = []
    for name in ("a", "b"):  # two sites: separate caches, the same publish_to repository
        base = tmp_path / name
        base.mkdir()
        (base / "none.conf").write_text(f"[registries]\npublish_to = {site}\n")
        daemons.append(DaemonProcess(base, tmp_path / f"cache-{name}", metrics=False).start())
    try:
        first = json.loads(daemons[0].cli("--json", "pull", ref, check=True).stdout)
        assert first["meta"]["origin"] == {"kind": "converted"}
        tag = f"{site}:sha256-{src.manifest_digest.split(':')[1]}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # published in the background
            r = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                                f"docker://{tag}"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        assert r.returncode == 0, daemons[0].log()[-2000:]
        before = layer_fetches(registry, src)
        second = json.loads(daemons[1].cli("--json", "pull", ref, check=True).stdout)
        assert second["digest"] == first["digest"] == src.manifest_digest
        assert second["meta"]["origin"]["kind"] == "fetched"
        assert second["meta"]["origin"]["from"].startswith(f"{site}@sha256:")
        assert Path(second["path"]).read_bytes() == Path(first["path"]).read_bytes()
        assert layer_fetches(registry, src) == before
    finally:
        for d in daemons:
            d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")
def test_daemon_streams_fetch_progress_while_the_squashfs_downloads(registry, published, tmp_path):
    """A monolithic image trickled by a proxy (about 200 kB/s): the Pull stream carries
    FETCH events (current, total = the blob's size) throughout the download, not at its end."""
    import time
    from ociimage.client import DaemonClient
    _, origin, pub = published
    with RegistryProxy(registry.url, tarpit=True, tarpit_over=64 << 10, tarpit_bytes=32 << 10,
                       tarpit_interval=0.15) as proxy:
        base = tmp_path / "d"
        base.mkdir()
        (base / "none.conf").write_text(f"[registries]\ntrusted_squashfs = {proxy.host}/mono\n")
        daemon = DaemonProcess(base, tmp_path / "cache", metrics=False).start()
        seen = []
        try:
            t0 = time.monotonic()
            img = DaemonClient(str(daemon.socket)).pull(
                f"{proxy.host}/mono/app:v1-squashfs",
                progress=lambda ev: seen.append((time.monotonic(), ev)))
            t_end = time.monotonic()
        finally:
            daemon.stop()
    assert img["digest"] == pub.manifest_digest and img["meta"]["origin"]["kind"] == "fetched"
    assert proxy.trickling == 1  # the SquashFS, and only it, came through the tarpit
    fetch = [(t, ev) for t, ev in seen if ev.phase == "fetch"]
    assert fetch and {ev.total for _, ev in fetch} == {pub.size}, seen
    currents = [ev.current for _, ev in fetch]
    assert currents == sorted(currents) and currents[0] == 0 and currents[-1] == pub.size
    assert not [ev for _, ev in seen if ev.phase == "download"]  # nothing was converted
    # live: spread over the download (about 5 s here), at least every ~1 s, not bunched up
    # at the end; the bounds leave room for a loaded machine
    times = [t for t, _ in fetch]
    assert t_end - t0 > 3, "the trickle did not slow the download down"
    assert times[-1] - times[0] > 0.6 * (t_end - t0) - 1, [round(t - t0, 2) for t in times]
    middle = [t for t, ev in fetch if 0 < ev.current < pub.size]
    assert len(middle) >= 5, [round(t - t0, 2) for t in times]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < 2.0, [round(t - t0, 2) for t in times]
