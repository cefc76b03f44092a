"""`oci-image convert` and `oci-image pull --cache-dir` end to end: real registry, real tools."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

import fstree
from images import busybox_layers
from ocibuild import OCI_LAYER_GZIP, Entry, Pusher
from registry_server import RegistryServer

BIN = Path(sys.executable).parent
OCI_IMAGE = str(BIN / "oci-image")


def run(*args, env=None, timeout=180):
    e = dict(os.environ, OCI_IMAGE_CONFIG="/nonexistent.conf")
    e.update(env or {})
    return subprocess.run([OCI_IMAGE, *args], capture_output=True, text=True, timeout=timeout, env=e)


def one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("oci-image: error:"), r.stderr
    last = lines[-1].lower()
    for n in needles:
        assert n.lower() in last, r.stderr
    return last


# ---- built with the real tools: umoci builds, skopeo pushes, umoci unpacks -------------

def _sh(*argv, cwd=None):
    subprocess.run(argv, check=True, cwd=cwd, capture_output=True)


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory, registry):
    """A 3-layer image made by umoci: files, then changes (delete, replace, hardlink, setuid)."""
    work = tmp_path_factory.mktemp("umoci")
    layout = work / "oci"
    _sh("umoci", "init", "--layout", str(layout))
    _sh("umoci", "new", "--image", f"{layout}:img")
    bundle = work / "bundle"

    def edit(fn):
        _sh("umoci", "unpack", "--image", f"{layout}:img", str(bundle))
        fn(bundle / "rootfs")
        _sh("umoci", "repack", "--image", f"{layout}:img", str(bundle))
        shutil.rmtree(bundle)

    def base(r):
        (r / "bin").mkdir()
        shutil.copy("/usr/bin/busybox", r / "bin" / "busybox")
        for a in ("sh", "cat", "ls"):
            os.symlink("busybox", r / "bin" / a)
        (r / "etc").mkdir()
        (r / "etc" / "os-release").write_text("ID=umoci\n")
        (r / "data" / "sub").mkdir(parents=True)
        (r / "data" / "sub" / "gone.txt").write_text("deleted later")
        (r / "data" / "keep.txt").write_text("kept")
        (r / "data" / "becomes-dir").write_text("a file first")
        (r / "data" / "was-dir").mkdir()
        (r / "data" / "was-dir" / "child").write_text("child")
        os.chown(r / "data" / "keep.txt", 1234, 5678)
        os.chmod(r / "data" / "keep.txt", 0o640)

    def change(r):
        (r / "data" / "sub" / "gone.txt").unlink()
        (r / "data" / "becomes-dir").unlink()
        (r / "data" / "becomes-dir").mkdir()
        (r / "data" / "becomes-dir" / "inner").write_text("inner")
        shutil.rmtree(r / "data" / "was-dir")
        (r / "data" / "was-dir").write_text("now a file")
        os.link(r / "data" / "keep.txt", r / "data" / "keep-link")
        os.chmod(r / "bin" / "busybox", 0o4755)
        os.mkdir(r / "tmp")
        os.chmod(r / "tmp", 0o1777)

    def opaque(r):
        shutil.rmtree(r / "data" / "sub")
        (r / "data" / "sub").mkdir()
        (r / "data" / "sub" / "fresh.txt").write_text("fresh")

    edit(base)
    edit(change)
    edit(opaque)
    _sh("umoci", "config", "--image", f"{layout}:img", "--config.env", "FOO=bar",
        "--config.workingdir", "/data")
    _sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:img",
        f"docker://{registry.host}/umoci/img:v1")
    expected = work / "expected"
    _sh("umoci", "unpack", "--image", f"{layout}:img", str(expected))
    return f"{registry.host}/umoci/img:v1", expected / "rootfs"


def test_convert_matches_umoci_unpack(umoci_image, tmp_path):
    ref, expected_root = umoci_image
    out = tmp_path / "img.sqfs"
    r = run("--json", "convert", ref, "-o", str(out))
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["config"]["WorkingDir"] == "/data" and "FOO=bar" in meta["config"]["Env"]
    got = fstree.tree_of(out)
    want = fstree.walk(expected_root)
    assert fstree.names(got) == fstree.names(want)
    for path, w in want.items():
        if not path:
            continue
        g = got[path]
        assert (g.kind, g.mode, g.uid, g.gid, g.sha256, g.target) == \
               (w.kind, w.mode, w.uid, w.gid, w.sha256, w.target), path
    assert fstree.hardlink_groups(got) == fstree.hardlink_groups(want)
    assert fstree.find(got, "data/sub/gone.txt") is None
    assert fstree.find(got, "data/sub/fresh.txt").kind == "file"
    assert fstree.find(got, "bin/busybox").mode == 0o4755


def test_convert_is_reproducible(umoci_image, tmp_path):
    ref, _ = umoci_image
    a, b = tmp_path / "a.sqfs", tmp_path / "b.sqfs"
    assert run("convert", ref, "-o", str(a)).returncode == 0
    assert run("convert", ref, "-o", str(b), "--jobs", "1").returncode == 0
    assert a.read_bytes() == b.read_bytes()


# ---- convert once: many processes, one conversion ---------------------------------------

def test_eight_processes_one_conversion(tmp_path, fresh_registry):
    img = Pusher(fresh_registry.url).image("many/img", "v1", busybox_layers(extra_mb=4))
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([OCI_IMAGE, "--json", "pull", f"{fresh_registry.host}/many/img:v1",
                               "--cache-dir", str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(os.environ, OCI_IMAGE_CONFIG="/x"))
             for _ in range(8)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert len({o["path"] for o in outs}) == 1
    assert {o["digest"] for o in outs} == {img.manifest_digest}
    for d in img.layer_digests:
        assert fresh_registry.blob_fetches(d) == 1, d
    assert not list((cache / "tmp").iterdir())


def test_killed_converter_then_next_run_succeeds(tmp_path, registry):
    Pusher(registry.url).image("kill/img", "v1", busybox_layers(extra_mb=48))
    cache = tmp_path / "cache"
    ref = f"{registry.host}/kill/img:v1"
    p = subprocess.Popen([OCI_IMAGE, "pull", ref, "--cache-dir", str(cache)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline and not any((cache / "tmp").glob("sha256-*")):
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not list((cache / "images").glob("*.json"))
    r = run("pull", ref, "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    assert not list((cache / "tmp").iterdir())
    assert len(list((cache / "images").glob("*.sqfs"))) == 1


# ---- bad input: one line, nothing cached --------------------------------------------------

def _nothing_cached(cache: Path):
    assert not list((cache / "images").glob("*")) if cache.exists() else True
    assert not list((cache / "tmp").glob("*")) if (cache / "tmp").exists() else True


def test_malformed_reference(tmp_path):
    one_line_error(run("pull", "Not A Ref", "--cache-dir", str(tmp_path / "c")), "invalid")
    _nothing_cached(tmp_path / "c")


def test_unknown_repository_and_tag(tmp_path, registry):
    Pusher(registry.url).image("known/img", "v1", busybox_layers())
    one_line_error(run("pull", f"{registry.host}/unknown/img:v1", "--cache-dir", str(tmp_path / "c")),
                   "not found")
    one_line_error(run("convert", f"{registry.host}/known/img:nope", "-o", str(tmp_path / "x.sqfs")),
                   "not found")
    assert not (tmp_path / "x.sqfs").exists()
    _nothing_cached(tmp_path / "c")


def test_unauthorized_never_prints_credentials(tmp_path):
    htpasswd = tmp_path / "htpasswd"
    secret = "s3cret-Pa55word"
    htpasswd.write_text("alice:" + bcrypt.hashpw(secret.encode(), bcrypt.gensalt(4)).decode() + "\n")
    with RegistryServer(tmp_path / "reg", auth=("htpasswd", str(htpasswd))) as reg:
        Pusher(reg.url, auth=("alice", secret)).image("priv/img", "v1", busybox_layers())
        ref = f"{reg.host}/priv/img:v1"
        one_line_error(run("pull", ref, "--cache-dir", str(tmp_path / "c")), "authentication required")
        home = tmp_path / "home"
        (home / ".docker").mkdir(parents=True)
        import base64
        wrong = base64.b64encode(b"alice:wrong-" + secret.encode()).decode()
        (home / ".docker" / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": wrong}}}))
        r = run("-vv", "pull", ref, "--cache-dir", str(tmp_path / "c"), env={"HOME": str(home)})
        one_line_error(r)
        assert secret not in r.stderr + r.stdout and wrong not in r.stderr + r.stdout
        good = base64.b64encode(b"alice:" + secret.encode()).decode()
        (home / ".docker" / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": good}}}))
        r = run("-vv", "pull", ref, "--cache-dir", str(tmp_path / "c"), env={"HOME": str(home)})
        assert r.returncode == 0, r.stderr
        assert secret not in r.stderr + r.stdout and good not in r.stderr + r.stdout


def _blob_file(reg: RegistryServer, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return reg.workdir / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def test_digest_mismatch(tmp_path, fresh_registry):
    img = Pusher(fresh_registry.url).image("corrupt/img", "v1", busybox_layers())
    blob = _blob_file(fresh_registry, img.layer_digests[1])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    one_line_error(run("pull", f"{fresh_registry.host}/corrupt/img:v1", "--cache-dir", str(tmp_path / "c")),
                   "digest")
    _nothing_cached(tmp_path / "c")


def test_unsupported_media_type(tmp_path, registry):
    Pusher(registry.url).image("weird/img", "v1", [[Entry("f", data=b"x")]],
                               layer_media_type="application/vnd.example.layer.v1+weird")
    one_line_error(run("convert", f"{registry.host}/weird/img:v1", "-o", str(tmp_path / "x.sqfs")),
                   "media type")
    assert not list(tmp_path.iterdir())


def test_truncated_layer(tmp_path, registry):
    """A layer whose gzip stream is cut short (its digest matches the cut bytes)."""
    import gzip
    import hashlib
    from ocibuild import layer_tar
    p = Pusher(registry.url)
    good = gzip.compress(layer_tar([Entry("big", data=os.urandom(300000))]), mtime=0)
    bad = good[: len(good) // 2]
    d = p.blob("trunc/img", bad)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
    cd = p.blob("trunc/img", cfg)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                           "size": len(cfg)},
                "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": d, "size": len(bad)}]}
    p.manifest("trunc/img", "v1", json.dumps(manifest).encode(), manifest["mediaType"])
    assert hashlib.sha256(bad).hexdigest() == d.split(":")[1]
    one_line_error(run("pull", f"{registry.host}/trunc/img:v1", "--cache-dir", str(tmp_path / "c")),
                   "layer")
    _nothing_cached(tmp_path / "c")


def test_disk_full_while_squashing(tmp_path, registry):
    Pusher(registry.url).image("full/img", "v1", busybox_layers(extra_mb=6))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], check=True)
    try:
        cache = small / "cache"
        r = run("pull", f"{registry.host}/full/img:v1", "--cache-dir", str(cache))
        one_line_error(r, "space")
        _nothing_cached(cache)
        r = run("convert", f"{registry.host}/full/img:v1", "-o", str(small / "out.sqfs"))
        one_line_error(r, "space")
        assert not [p for p in small.iterdir() if p.name != "cache"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_pull_prints_digest_and_path(tmp_path, registry):
    img = Pusher(registry.url).image("plain/img", "v1", busybox_layers())
    r = run("pull", f"{registry.host}/plain/img:v1", "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    digest, path = r.stdout.split()
    assert digest == img.manifest_digest and Path(path).is_file()
    assert "converting" in r.stderr  # plain progress lines when not a terminal
