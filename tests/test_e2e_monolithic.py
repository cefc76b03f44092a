"""Monolithic images end to end: `srun -N3 --oci-image=<monolithic ref>` on the real 3-node
Slurm cluster, run as an ordinary user, with no conversion anywhere; the untrusted and
corrupt cases; and a user's `oci-image publish` through the node's daemon followed by
`srun -N3` of what they published.

The registry is the real docker-registry behind tests/registry_proxy.py, which only
counts what the cluster asks (request kinds, blob GETs per digest). Monolithic images
"published by another site" are made in this process, straight to the registry, so the
proxy sees only the cluster's traffic."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import requests

from cluster_fixture import cluster_available
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import DAEMON_CONF, start_site, stop_site
from monohelp import client, convert_and_publish, push_source
from ocibuild import Pusher, sha256
from registry_proxy import RegistryProxy

from ociimage.registry import mediatypes as mt

pytestmark = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))


class Mono:
    def __init__(self, site, proxy, registry, installed):
        self.site, self.proxy, self.registry, self.installed = site, proxy, registry, installed
        self.cluster, self.daemons, self.cache = site.cluster, site.daemons, site.cache
        self.other_site = Path(tempfile.mkdtemp(prefix="oci-emono-other-"))

    def elsewhere(self, name: str, repo: str, **kw):
        """An image converted and published as `repo:v1` by another site (another cache):
        (published, entry there, source image)."""
        src = push_source(self.registry, f"emono/{name}", os_id=f"emono-{name}", **kw)
        entry, pub, _ = convert_and_publish(client(), self.other_site / name,
                                            f"{self.registry.host}/emono/{name}:v1",
                                            f"{self.registry.host}/{repo}:v1")
        return pub, entry, src

    def config_digest(self, repo: str, tag: str = "v1") -> str:
        r = requests.get(f"{self.registry.url}/v2/{repo}/manifests/{tag}", timeout=10,
                         headers={"Accept": mt.OCI_MANIFEST})
        return r.json()["config"]["digest"]

    def ref(self, repo: str, tag: str = "v1") -> str:
        return f"{self.proxy.host}/{repo}:{tag}"

    def srun(self, *args, timeout=120):
        return self.cluster.run_as_user(["srun", *args], cwd="/tmp", timeout=timeout)

    def blob_gets(self, digest: str, since: int) -> int:
        return sum(1 for m, p, s in self.proxy.log[since:]
                   if m == "GET" and p.split("?")[0].endswith("/blobs/" + digest) and s == 200)

    def metric(self, name: str) -> float:
        total = 0.0
        for d in self.daemons:
            text = requests.get(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).text
            total += sum(float(x.split()[-1]) for x in text.splitlines()
                         if x.startswith(name + " ") or x.startswith(name + "{"))
        return total

    def conversions(self) -> int:
        return int(self.metric('ociimage_conversions_total{result="ok"}'))

    def converting_lines(self) -> int:
        return sum(d.log().count('"converting"') for d in self.daemons)

    def entry_meta(self, digest: str):
        p = self.cache / "images" / (digest.replace(":", "-") + ".json")
        return json.loads(p.read_text()) if p.exists() else None

    def leftovers(self, digest: str) -> list:
        stem = digest.replace(":", "-")
        return [p.name for p in (self.cache / "images").glob(stem + "*")] + \
            [p.name for p in (self.cache / "tmp").glob(stem + "*")]


@pytest.fixture(scope="module")
def mono(registry, installed):
    # slow: the same registry through a tarpit (~256 KiB/s), to watch a download in srun
    with RegistryProxy(registry.url) as proxy, \
            RegistryProxy(registry.url, tarpit=True, tarpit_over=256 << 10,
                          tarpit_bytes=32 << 10, tarpit_interval=0.125) as slow:
        conf = DAEMON_CONF + (f"[registries]\ntrusted_squashfs = {proxy.host}/trusted "
                              f"{slow.host}/trusted\n")
        site = start_site(installed, "oci-emono-", nodes=3, daemon_conf=conf)
        m = Mono(site, proxy, registry, installed)
        m.slow = slow
        try:
            yield m
        finally:
            stop_site(site)
            shutil.rmtree(m.other_site, ignore_errors=True)


def _node_lines(stdout: str) -> list:
    return sorted(line.split(": ", 1)[1] for line in stdout.splitlines() if ": " in line)


def _one_line_errors(stderr: str) -> list:
    """The error lines of a failed step: the same one line from each node that failed (the
    plugin shows every failing node's, after its own prefix), never a traceback."""
    errs = [x[x.index("oci-image: error:"):] for x in stderr.splitlines()
            if "oci-image: error:" in x]
    assert errs and len(set(errs)) == 1 and "Traceback" not in stderr, stderr
    return errs


def test_trusted_monolithic_image_starts_on_three_nodes_without_converting(mono):
    pub, theirs, src = mono.elsewhere("app", "trusted/app")
    mark, conversions, converting = mono.proxy.mark(), mono.conversions(), mono.converting_lines()
    r = mono.srun("-N3", "-l", f"--oci-image={mono.ref('trusted/app')}", "sh", "-c",
                  'echo "$SLURMD_NODENAME $(grep ^ID= /etc/os-release) $(id -un) $(pwd)"')
    assert r.returncode == 0, r.stderr
    user = mono.cluster.user
    assert _node_lines(r.stdout) == [f"n{i} ID=emono-app {user} /opt/app" for i in (1, 2, 3)]
    # no conversion anywhere: no producer ran tar2sqfs, the entry says it was fetched
    assert mono.conversions() == conversions and mono.converting_lines() == converting
    meta = mono.entry_meta(pub.manifest_digest)
    assert meta["origin"] == {"kind": "fetched", "via": "reference",
                              "from": f"{mono.ref('trusted/app')}@{pub.manifest_digest}",
                              "squashfs_digest": pub.squashfs_digest}
    # the cluster downloaded the SquashFS once (and its config), no layer of the source at
    # all: the tag resolved once at submit, the manifest once by the node that fetched
    counts = mono.proxy.counts(config_digests=[mono.config_digest("trusted/app")], since=mark)
    assert mono.blob_gets(pub.squashfs_digest, mark) == 1, mono.proxy.log[mark:]
    assert sum(mono.blob_gets(d, mark) for d in src.layer_digests) == 0
    assert (counts["blob_get_layer"], counts["blob_get_config"], counts["push"]) == (1, 1, 0), \
        counts
    # it is the other site's SquashFS, bit for bit (the live FETCH progress of the download:
    # test_monolithic.py::test_daemon_streams_fetch_progress_while_the_squashfs_downloads)
    cached = mono.cache / "images" / (pub.manifest_digest.replace(":", "-") + ".sqfs")
    assert cached.read_bytes() == theirs.path.read_bytes()


def test_untrusted_monolithic_image_is_refused_on_every_node(mono):
    pub, _, _ = mono.elsewhere("untrusted", "untrusted/app")
    mark = mono.proxy.mark()
    r = mono.srun("-N3", f"--oci-image={mono.ref('untrusted/app')}", "echo", "RAN")
    assert r.returncode != 0 and "RAN" not in r.stdout, r.stdout
    errs = _one_line_errors(r.stderr)
    assert all("is a ready-to-mount SquashFS image from" in e and "does not trust" in e
               and "emono/untrusted:v1@sha256:" in e for e in errs), errs
    # refused before any download, nothing kept, nothing mounted
    assert mono.blob_gets(pub.squashfs_digest, mark) == 0
    counts = mono.proxy.counts(config_digests=[mono.config_digest("untrusted/app")], since=mark)
    assert counts["blob_get_layer"] == 0, counts
    assert mono.leftovers(pub.manifest_digest) == []
    loops = Path("/proc/self/mountinfo").read_text()
    assert pub.manifest_digest.split(":")[1] not in loops


def _truncated(mono, repo: str):
    """A monolithic image whose SquashFS is cut in half (its digest that of the half)."""
    _, theirs, _ = mono.elsewhere("half", "elsewhere/half")
    half = theirs.path.read_bytes()[: theirs.size // 2]
    p = Pusher(mono.registry.url)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [sha256(half)]}}).encode()
    cd, bd = p.blob(repo, cfg), p.blob(repo, half)
    digest = p.manifest(repo, "v1", json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": mt.SQUASHFS_LAYER,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": cd, "size": len(cfg)},
        "layers": [{"mediaType": mt.SQUASHFS_LAYER, "digest": bd, "size": len(half)}]}).encode(),
        mt.OCI_MANIFEST)
    return digest, bd


def _corrupted(mono, repo: str):
    """A monolithic image whose stored SquashFS blob has one byte flipped (digest mismatch)."""
    pub, _, _ = mono.elsewhere("flipped", repo)
    hexpart = pub.squashfs_digest.split(":")[1]
    data = mono.registry.workdir / "data/docker/registry/v2/blobs/sha256" / hexpart[:2] / \
        hexpart / "data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    return pub.manifest_digest, pub.squashfs_digest


@pytest.mark.parametrize("damage, needle", [(_corrupted, "digest"),
                                            (_truncated, "truncated SquashFS image")])
def test_a_corrupt_squashfs_fails_the_step_in_one_line_leaving_nothing(mono, damage, needle):
    repo = f"trusted/{damage.__name__.strip('_')}"
    digest, blob = damage(mono, repo)
    mark = mono.proxy.mark()
    r = mono.srun("-N3", f"--oci-image={mono.ref(repo)}", "echo", "RAN")
    assert r.returncode != 0 and "RAN" not in r.stdout, r.stdout
    errs = _one_line_errors(r.stderr)
    assert needle in errs[0] and blob in errs[0], errs
    assert mono.blob_gets(blob, mark) >= 1          # it was tried, and nothing was kept
    assert mono.entry_meta(digest) is None and mono.leftovers(digest) == []


def test_a_user_publishes_through_the_daemon_and_runs_it_on_three_nodes(mono):
    src = push_source(mono.registry, "emono/pub", os_id="emono-pub")
    d1 = mono.daemons[0]
    conversions = mono.conversions()
    mark = mono.proxy.mark()
    r = mono.cluster.run_as_user(
        ["env", f"OCI_IMAGE_CONFIG={mono.site.conf}", str(mono.installed.bin / "oci-image"),
         "--socket", str(d1.socket), "publish", mono.ref("emono/pub"), mono.ref("trusted/pub")],
        cwd="/tmp", timeout=120)
    assert r.returncode == 0, r.stderr
    digest, published = r.stdout.split()
    assert published == f"{mono.ref('trusted/pub')}@{digest}"
    assert "uploading to" in r.stderr and "oci-image: error" not in r.stderr, r.stderr
    # n1's daemon converted the source once, in the shared cache, and pushed the SquashFS
    assert mono.conversions() == conversions + 1
    assert sum(mono.blob_gets(d, mark) for d in src.layer_digests) == len(src.layer_digests)
    assert f'"published for a user" uid={mono.cluster.uid}' in d1.log()
    meta = mono.entry_meta(digest)
    assert meta is None   # publishing fetched nothing: the monolithic image is not cached yet
    mark = mono.proxy.mark()
    r = mono.srun("-N3", "-l", f"--oci-image={mono.ref('trusted/pub')}", "sh", "-c",
                  'echo "$SLURMD_NODENAME $(grep ^ID= /etc/os-release)"')
    assert r.returncode == 0, r.stderr
    assert _node_lines(r.stdout) == [f"n{i} ID=emono-pub" for i in (1, 2, 3)]
    assert mono.conversions() == conversions + 1          # the step converted nothing
    squashfs = mono.entry_meta(digest)["squashfs_digest"]
    assert mono.blob_gets(squashfs, mark) == 1            # one download for the cluster
    assert mono.entry_meta(digest)["origin"]["kind"] == "fetched"


def test_srun_shows_the_download_of_a_monolithic_image_live(mono):
    """While the SquashFS downloads (slowly, through the tarpit), srun's stderr says so,
    from the step's first node, with bytes of the blob's size, before the tasks run."""
    import re
    import subprocess
    import threading
    import time

    from cluster_fixture import as_user
    pub, theirs, _ = mono.elsewhere("slowdl", "trusted/slowdl", extra_mb=4)  # ~17 s here
    conversions = mono.conversions()
    p = subprocess.Popen(as_user(["srun", "-N3", f"--oci-image={mono.slow.host}/trusted/slowdl:v1",
                                  "echo", "RAN"], mono.cluster.uid, mono.cluster.gid),
                         cwd="/tmp", env=mono.cluster.user_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    start, err = time.monotonic(), []
    t = threading.Thread(target=lambda: err.extend((time.monotonic() - start, l.rstrip())
                                                   for l in p.stderr))
    t.start()
    out = p.stdout.read()
    ran_at = time.monotonic() - start
    assert p.wait(180) == 0, err
    t.join(10)
    assert out.split() == ["RAN"] * 3
    from ociimage.progress import _human
    size = _human(theirs.size)   # the SquashFS blob's size, as the lines write it
    lines = [(at, l) for at, l in err if re.match(
        r"^oci-image: n1: (downloading|waiting for node n\d fetching this image): +\d+% ", l)]
    assert len(lines) >= 2 and all(f"of {size}" in l for _, l in lines), err
    assert ran_at - lines[0][0] >= 2, err          # shown while it downloads, not after
    assert mono.conversions() == conversions
