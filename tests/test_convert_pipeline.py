"""The conversion pipeline: concurrent layer downloads, the child inflater and its fallback.

Real registry (through a proxy that holds blob answers so downloads overlap
or not), real igzip/pigz/zstd, real tar2sqfs. What is asserted would fail if
the feature broke: downloads that do not overlap, more at once than allowed,
a tampered layer that leaves something behind or passes, an inflater that
is not the one expected, a fallback that gives another image, memory that
grows with the layers' size.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ocibuild import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Entry, Pusher, layer_tar
from test_registry_client import FaultProxy

from ociimage.cache import Cache
from ociimage.errors import CorruptLayer, DigestMismatch, LimitExceeded
from ociimage.fetch import Spool
from ociimage.inflate import ChildInflater, find_tool, inflater_name, open_spooled_layer
from ociimage.layers import GZIP, ZSTD
from ociimage.progress import DOWNLOAD
from ociimage.pull import PullOptions, convert_to_file, pull_to_cache
from ociimage.registry.client import Descriptor, RegistryClient

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="converts as root, like the daemon")


def _layers(n, size=256 << 10):
    """n layers of real-looking content, bottom-first, each with a file of its own."""
    out = []
    for i in range(n):
        data = (f"layer {i} ".encode() + os.urandom(64)) * (size // 73)
        out.append([Entry(f"l{i}/", "dir", mode=0o755), Entry(f"l{i}/data", data=data),
                    Entry("shared", data=f"from layer {i}\n".encode())])
    return out


class _Holding:
    """A proxy hook that holds layer GETs until `want` are in flight (or `wait` s passed)."""

    def __init__(self, layer_digests, want, wait=10.0, tamper=None):
        self.layers = set(layer_digests)
        self.want, self.wait, self.tamper = want, wait, tamper
        self.in_flight = self.max_in_flight = 0
        self.starts = []
        self.cond = threading.Condition()

    def __call__(self, h, method, path):
        digest = path.split("?")[0].rsplit("/", 1)[-1]
        if method != "GET" or digest not in self.layers:
            return False
        with self.cond:
            self.in_flight += 1
            self.starts.append(digest)
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()
            # the last layers have no company to wait for
            self.cond.wait_for(lambda: self.in_flight >= self.want
                               or len(set(self.starts)) == len(self.layers), timeout=self.wait)
        try:
            transform = None
            if digest == self.tamper:
                def transform(status, headers, data):
                    body = bytearray(data)
                    body[len(body) // 2] ^= 0xFF  # same size, other bytes
                    return status, headers, bytes(body)
            h.forward(transform=transform)
        finally:
            with self.cond:
                self.in_flight -= 1
        return True


def _client():
    return RegistryClient(retries=1, backoff=0.01)


def _leftovers(directory: Path, keep=()):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_layers_download_concurrently_within_the_bound(registry, tmp_path):
    img = Pusher(registry.url).image("pipe/conc", "v1", _layers(5))
    hold = _Holding(img.layer_digests, want=2, wait=5.0)
    proxy = FaultProxy(registry.url, hold)
    try:
        out = tmp_path / "two.sqfs"
        convert_to_file(_client(), f"{proxy.host}/pipe/conc:v1", out,
                        PullOptions(parallel_downloads=2))
        assert hold.max_in_flight == 2          # overlapping, and never more than allowed
        # in the order they are read: top-most first
        top_first = list(reversed(img.layer_digests))
        assert set(hold.starts[:2]) == set(top_first[:2]) and set(hold.starts) == set(top_first)
        hold3 = _Holding(img.layer_digests, want=3, wait=5.0)
        proxy.hook = hold3
        convert_to_file(_client(), f"{proxy.host}/pipe/conc:v1", tmp_path / "three.sqfs",
                        PullOptions(parallel_downloads=3))
        assert hold3.max_in_flight == 3
    finally:
        proxy.close()
    assert (tmp_path / "two.sqfs").read_bytes() == (tmp_path / "three.sqfs").read_bytes()
    assert _leftovers(tmp_path) == ["three.sqfs", "two.sqfs"]   # no spool files left


@pytest.mark.parametrize("which", [1, 2])  # a middle layer, then the top-most one
def test_a_tampered_layer_among_concurrent_ones_fails_and_leaves_nothing(registry, tmp_path,
                                                                         which):
    img = Pusher(registry.url).image(f"pipe/tamper{which}", "v1", _layers(4))
    hold = _Holding(img.layer_digests, want=3, wait=2.0, tamper=img.layer_digests[which])
    proxy = FaultProxy(registry.url, hold)
    ref = f"{proxy.host}/pipe/tamper{which}:v1"
    work = tmp_path / "out"
    work.mkdir()
    try:
        with pytest.raises(DigestMismatch, match=img.layer_digests[which]):
            convert_to_file(_client(), ref, work / "img.sqfs", PullOptions())
        assert _leftovers(work) == []
        cache = Cache(tmp_path / "cache", node="n1")
        with pytest.raises(DigestMismatch):
            pull_to_cache(_client(), cache, ref, PullOptions())
        assert cache.list() == []
        assert _leftovers(tmp_path / "cache" / "tmp") == []
        assert _leftovers(tmp_path / "cache" / "images") == []
        assert hold.max_in_flight >= 2
    finally:
        proxy.close()


def test_spools_are_gone_after_a_conversion_into_the_cache(registry, tmp_path):
    img = Pusher(registry.url).image("pipe/cache", "v1", _layers(3))
    events = []
    cache = Cache(tmp_path / "cache", node="n1")
    entry = pull_to_cache(_client(), cache, f"{registry.host}/pipe/cache:v1", PullOptions(),
                          events.append)
    assert entry.digest == img.manifest_digest
    assert _leftovers(tmp_path / "cache" / "tmp") == []
    downloads = [e for e in events if e.phase == DOWNLOAD]
    total = sum(l["size"] for l in img.manifest["layers"])
    assert downloads and all(e.total == total for e in downloads)
    assert [e.current for e in downloads] == sorted(e.current for e in downloads)
    assert downloads[-1].current == total


def test_without_a_child_inflater_the_image_is_the_same(registry, tmp_path):
    """The fallback: no igzip/pigz on PATH -> zlib in-process, bit-identical result."""
    Pusher(registry.url).image("pipe/fallback", "v1", _layers(3))
    ref = f"{registry.host}/pipe/fallback:v1"
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "tar2sqfs").symlink_to(shutil.which("tar2sqfs"))
    env = dict(os.environ, OCI_IMAGE_CONFIG="/nonexistent.conf")
    outs = {}
    for name, path in (("default", os.environ["PATH"]), ("bare", str(bare))):
        out = tmp_path / f"{name}.sqfs"
        r = subprocess.run([str(BIN / "oci-image"), "--json", "convert", ref, "-o", str(out)],
                           capture_output=True, text=True, env=dict(env, PATH=path), timeout=120)
        assert r.returncode == 0, r.stderr
        outs[name] = (json.loads(r.stdout)["converter"]["inflaters"], out.read_bytes())
    assert outs["default"][0] == [inflater_name(GZIP)] != ["zlib (in-process)"]
    assert outs["bare"][0] == ["zlib (in-process)"]
    assert outs["default"][1] == outs["bare"][1]


def test_inflater_order_igzip_then_pigz_then_none(tmp_path, monkeypatch):
    d = tmp_path / "bin"
    d.mkdir()
    pigz, igzip = shutil.which("pigz"), shutil.which("igzip")
    monkeypatch.setenv("PATH", str(d))
    assert find_tool(GZIP) is None and inflater_name(GZIP) == "zlib (in-process)"
    (d / "pigz").symlink_to(pigz)
    assert find_tool(GZIP)[0] == str(d / "pigz")
    (d / "igzip").symlink_to(igzip)
    assert find_tool(GZIP) == [str(d / "igzip"), "-d", "-c"]
    assert find_tool(ZSTD) is None and inflater_name(ZSTD) == "zstandard (in-process)"


# ---- the child inflater's strictness, with each tool and without --------------------------

def _spool(tmp_path, blob, *, error=None, cut=None):
    path = tmp_path / "blob.layer0"
    path.write_bytes(blob if cut is None else blob[:cut])
    s = Spool(0, Descriptor(OCI_LAYER_GZIP, "sha256:" + "0" * 64, len(blob)), path)
    s.written = path.stat().st_size
    if error is not None:
        s.error = error
    else:
        s.done = True
    return s


def _read(reader):
    try:
        out = io.BytesIO()
        while True:
            chunk = reader.read(1 << 16)
            if not chunk:
                break
            out.write(chunk)
        reader.drain()
        return out.getvalue()
    finally:
        reader.close()


GZIP_TOOLS = {"igzip": {GZIP: (("igzip", "-d", "-c"),)}, "pigz": {GZIP: (("pigz", "-d", "-c"),)},
              "in-process": {}}
TAR = layer_tar([Entry("a", data=b"x" * 300_000), Entry("b", data=os.urandom(100_000))])


@pytest.mark.parametrize("tool", list(GZIP_TOOLS))
def test_gzip_layers_through_each_inflater(tmp_path, tool):
    tools = GZIP_TOOLS[tool]
    blob = gzip.compress(TAR) + gzip.compress(b"")  # two members, as some writers make
    r = open_spooled_layer(_spool(tmp_path, blob), GZIP, check=lambda: None, on_bytes=None,
                           name="layer 1", tools=tools)
    assert isinstance(r, ChildInflater) == (tool != "in-process")
    assert _read(r) == TAR
    with pytest.raises(CorruptLayer):  # truncated
        _read(open_spooled_layer(_spool(tmp_path, blob, cut=len(blob) // 2), GZIP,
                                 check=lambda: None, on_bytes=None, name="l", tools=tools))
    bad = bytearray(blob)
    bad[len(bad) // 3] ^= 0xFF
    with pytest.raises(CorruptLayer):
        _read(open_spooled_layer(_spool(tmp_path, bytes(bad)), GZIP, check=lambda: None,
                                 on_bytes=None, name="l", tools=tools))
    with pytest.raises(LimitExceeded, match="decompression bomb"):
        _read(open_spooled_layer(_spool(tmp_path, gzip.compress(b"\0" * (8 << 20))), GZIP,
                                 check=lambda: None, on_bytes=None, name="l",
                                 max_bytes=1 << 20, tools=tools))
    # the download's verdict wins over the cut stream it leaves behind
    with pytest.raises(DigestMismatch):
        _read(open_spooled_layer(_spool(tmp_path, blob, cut=len(blob) // 2,
                                        error=DigestMismatch("blob: digest mismatch")),
                                 GZIP, check=lambda: None, on_bytes=None, name="l", tools=tools))


@pytest.mark.parametrize("tool", ["zstd", "in-process"])
def test_zstd_layers_through_each_inflater(tmp_path, tool):
    import zstandard
    tools = {ZSTD: (("zstd", "-d", "-c", "-q"),)} if tool == "zstd" else {}
    blob = zstandard.ZstdCompressor().compress(TAR)
    assert _read(open_spooled_layer(_spool(tmp_path, blob), ZSTD, check=lambda: None,
                                    on_bytes=None, name="l", tools=tools)) == TAR
    for broken in (blob[:len(blob) // 2], blob + b"garbage"):
        with pytest.raises(CorruptLayer):
            _read(open_spooled_layer(_spool(tmp_path, broken), ZSTD, check=lambda: None,
                                     on_bytes=None, name="l", tools=tools))


def test_zstd_image_converts_with_the_cli_inflater(registry, tmp_path):
    Pusher(registry.url).image("pipe/zstd", "v1", _layers(2), layer_media_type=OCI_LAYER_ZSTD)
    meta = convert_to_file(_client(), f"{registry.host}/pipe/zstd:v1", tmp_path / "z.sqfs",
                           PullOptions())
    assert meta["converter"]["inflaters"] == ["zstd"]


# ---- memory stays bounded however big the layers are ---------------------------------------

def _tree_rss_kib(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/stat").read()
                kids.setdefault(int(st[st.rindex(")") + 2:].split()[1]), []).append(int(d))
            except (OSError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, ()))
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _push_streamed(registry, tmp_path, repo, layer_files):
    """Push an image whose layers (tar files, bottom-first) are zstd-compressed and uploaded
    from disk: nothing of them passes through this process's memory (a child forked from a
    big process would report its size as the child's peak RSS to later tests)."""
    import hashlib
    from ociimage.reference import parse_reference
    client = RegistryClient()
    layers, diff_ids = [], []
    for tar in layer_files:
        blob = tar.with_suffix(".zst")
        subprocess.run(["zstd", "-q", "-1", "-f", str(tar), "-o", str(blob)], check=True)
        digests = []
        for f in (tar, blob):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            digests.append("sha256:" + h.hexdigest())
        diff_ids.append(digests[0])
        ref = parse_reference(f"{registry.host}/{repo}:v1")
        client.push_blob(ref, blob, digests[1], blob.stat().st_size, chunk_size=16 << 20)
        layers.append({"mediaType": OCI_LAYER_ZSTD, "digest": digests[1],
                       "size": blob.stat().st_size})
    p = Pusher(registry.url)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": p.blob(repo, cfg), "size": len(cfg)},
                "layers": layers}
    p.manifest(repo, "v1", json.dumps(manifest).encode(), manifest["mediaType"])


def _big_tar(path, name, size):
    import tarfile
    with tarfile.open(path, "w") as tf, open("/dev/urandom", "rb") as rnd:
        ti = tarfile.TarInfo(name)
        ti.size = size
        tf.addfile(ti, io.BufferedReader(_Limited(rnd, size)))


class _Limited(io.RawIOBase):
    def __init__(self, f, n):
        self.f, self.n = f, n

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(min(len(b), self.n, 1 << 20))
        self.n -= len(data)
        b[:len(data)] = data
        return len(data)


def test_memory_of_the_whole_conversion_is_bounded(registry, tmp_path):
    """40,000 entries and 2 x 128 MB layers (zstd: quick to make): the process tree (Python,
    the zstd children, tar2sqfs) stays below what holding one layer would take; a sanity
    bound, not a timing."""
    import tarfile
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tf:
        for i in range(40_000):
            ti = tarfile.TarInfo(f"many/d{i % 200}/f{i}")
            data = b"%d\n" % i
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    bigs = []
    for k in range(2):
        bigs.append(tmp_path / f"big{k}.tar")
        _big_tar(bigs[-1], f"big{k}", 128 << 20)
    _push_streamed(registry, tmp_path, "pipe/mem", [many] + bigs)
    out = tmp_path / "mem.sqfs"
    proc = subprocess.Popen([str(BIN / "oci-image"), "convert", f"{registry.host}/pipe/mem:v1",
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OCI_IMAGE_CONFIG="/nonexistent.conf"))
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_kib(proc.pid))
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert out.stat().st_size > 256 << 20
    assert peak < 150 << 10, f"peak RSS of the conversion's process tree: {peak >> 10} MiB"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("tool", ["igzip", "pigz"])
def test_the_child_inflater_runs_as_nobody(tmp_path, monkeypatch, tool):
    """It parses bytes from any registry a user names: never as root."""
    from ociimage import inflate
    if shutil.which(tool) is None:
        pytest.skip(f"no {tool} here")
    seen = []
    real = subprocess.Popen

    def spy(argv, **kw):
        p = real(argv, **kw)
        deadline = time.monotonic() + 5  # setpriv drops to nobody, then execs the tool
        while time.monotonic() < deadline:
            status = Path(f"/proc/{p.pid}/status").read_text()
            if status.startswith(f"Name:\t{tool}"):
                break
            time.sleep(0.01)
        seen.append(status)
        return p

    monkeypatch.setattr(inflate.subprocess, "Popen", spy)
    r = open_spooled_layer(_spool(tmp_path, gzip.compress(TAR)), GZIP, check=lambda: None,
                           on_bytes=None, name="layer 1", tools=GZIP_TOOLS[tool])
    assert isinstance(r, ChildInflater) and _read(r) == TAR
    uids = next(l for l in seen[0].splitlines() if l.startswith("Uid:")).split()[1:]
    gids = next(l for l in seen[0].splitlines() if l.startswith("Gid:")).split()[1:]
    groups = next(l for l in seen[0].splitlines() if l.startswith("Groups:")).split()[1:]
    assert uids == ["65534"] * 4 and gids == ["65534"] * 4 and groups == [], seen[0]


def test_a_broken_layer_fails_at_once_without_downloading_the_rest(registry, tmp_path):
    """A layer that is not gzip from its first bytes: the conversion fails as soon as the
    inflater says so, not after the whole blob (which a hostile manifest can make a
    terabyte) came through; the download is stopped and nothing is left."""
    from registry_proxy import RegistryProxy
    p = Pusher(registry.url)
    blob = b"NOT GZIP" + os.urandom(6 << 20)
    layer = p.blob("pipe/broken", blob)
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": p.blob("pipe/broken", cfg), "size": len(cfg)},
                "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer, "size": len(blob)}]}
    p.manifest("pipe/broken", "v1", json.dumps(manifest).encode(),
               "application/vnd.oci.image.manifest.v1+json")
    work = tmp_path / "out"
    work.mkdir()
    # ~256 KiB/s: the whole blob would take about 25 s
    with RegistryProxy(registry.url, tarpit=True, tarpit_over=64 << 10, tarpit_bytes=32 << 10,
                       tarpit_interval=0.125) as slow:
        started = time.monotonic()
        with pytest.raises(CorruptLayer):
            convert_to_file(_client(), f"{slow.host}/pipe/broken:v1", work / "img.sqfs",
                            PullOptions())
        took = time.monotonic() - started
        assert took < 12, f"waited {took:.0f} s for a blob already known to be broken"
        assert _leftovers(work) == []
