"""`oci-image … --json`: every command prints exactly one JSON document on stdout, its
result or, on failure, {"error", "code", "exit_code"} (docs/json-output.md); --json
works before the command and after it. Against the real registry, a real cache
directory and (for the daemon's side) a real oci-imaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_proc import DaemonProcess
from images import busybox_layers
from ocibuild import Pusher

BIN = Path(sys.executable).parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the daemon)")


def oci_image(*args: str, tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OCI_IMAGE_CONFIG=str(tmp_path / "none.conf"))
    return subprocess.run([str(BIN / "oci-image"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def result(r: subprocess.CompletedProcess):
    """The one JSON document of a command that worked."""
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)   # the whole of stdout: one document, nothing else


def failure(r: subprocess.CompletedProcess, exit_code: int, code: str, needle: str) -> dict:
    """The one JSON document of a command that failed, checked against its stderr line."""
    doc = json.loads(r.stdout)
    assert sorted(doc) == ["code", "error", "exit_code"], doc
    assert (r.returncode, doc["exit_code"], doc["code"]) == (exit_code, exit_code, code), (doc, r)
    assert needle in doc["error"], doc
    lines = [l for l in r.stderr.splitlines() if ": error: " in l]
    assert len(lines) == 1 and lines[0].endswith(doc["error"]), r.stderr
    assert "Traceback" not in r.stderr
    return doc


@pytest.fixture(scope="module")
def image(registry):
    return Pusher(registry.url).image("cli/json", "v1", busybox_layers(os_id="clijson"))


@pytest.fixture
def cached(registry, image, tmp_path):
    """A cache directory holding the image: (cache dir, its digest)."""
    cache = tmp_path / "cache"
    entry = result(oci_image("pull", "--cache-dir", str(cache), f"{registry.host}/cli/json:v1",
                             "--json", tmp_path=tmp_path))
    assert entry["digest"] == image.manifest_digest
    return cache, image.manifest_digest


def test_json_is_accepted_before_and_after_every_command():
    from ociimage.cli import COMMANDS, build_parser
    p = build_parser()
    required = {"convert": ["R", "-o", "f"], "pull": ["R"], "inspect": ["D"], "rm": ["D"],
                "publish": ["R", "T"], "ls": [], "prune": [], "devices": []}
    assert sorted(required) == sorted(COMMANDS)
    for name, args in required.items():
        assert p.parse_args([name, *args]).json is False, name
        assert p.parse_args(["--json", name, *args]).json is True, name
        assert p.parse_args([name, *args, "--json"]).json is True, name


def test_convert(registry, image, tmp_path):
    out = tmp_path / "img.sqfs"
    meta = result(oci_image("convert", f"{registry.host}/cli/json:v1", "-o", str(out), "--json",
                            tmp_path=tmp_path))
    assert meta["digest"] == image.manifest_digest and out.stat().st_size == meta["size"]
    failure(oci_image("--json", "convert", f"{registry.host}/cli/nothere:v1", "-o",
                      str(tmp_path / "x.sqfs"), tmp_path=tmp_path),
            1, "NOT_FOUND", "not found")
    failure(oci_image("convert", "bad ref!", "-o", str(tmp_path / "x.sqfs"), "--json",
                      tmp_path=tmp_path),
            2, "INVALID_ARGUMENT", "invalid image reference 'bad ref!'")
    assert not (tmp_path / "x.sqfs").exists()


def test_pull(registry, image, cached, tmp_path):
    cache, digest = cached
    again = result(oci_image("--json", "pull", "--cache-dir", str(cache),
                             f"{registry.host}/cli/json:v1", tmp_path=tmp_path))
    assert again["digest"] == digest and again["path"].endswith(".sqfs")
    failure(oci_image("pull", "--json", tmp_path=tmp_path),   # a refused command line
            2, "INVALID_ARGUMENT", "the following arguments are required: REF")


def test_ls(cached, tmp_path):
    cache, digest = cached
    rows = result(oci_image("ls", "--cache-dir", str(cache), "--json", tmp_path=tmp_path))
    assert [(r["digest"], r["users"], r["jobs"]) for r in rows] == [(digest, [], [])]
    failure(oci_image("--json", "ls", "--cache-dir", str(cache), "--no-such-option",
                      tmp_path=tmp_path),
            2, "INVALID_ARGUMENT", "unrecognized arguments: --no-such-option")


def test_inspect(cached, tmp_path):
    cache, digest = cached
    info = result(oci_image("inspect", digest[:19], "--cache-dir", str(cache), "--json",
                            tmp_path=tmp_path))
    assert info["digest"] == digest and "/cli/json:v1@sha256:" in info["reference"]
    failure(oci_image("--json", "inspect", "sha256:" + "e" * 64, "--cache-dir", str(cache),
                      tmp_path=tmp_path),
            1, "NOT_FOUND", f"image sha256:{'e' * 64} is not in the cache")


def test_rm(cached, tmp_path):
    cache, digest = cached
    assert result(oci_image("rm", digest, "--cache-dir", str(cache), "--json",
                            tmp_path=tmp_path)) == [{"digest": digest}]
    assert result(oci_image("--json", "ls", "--cache-dir", str(cache), tmp_path=tmp_path)) == []
    failure(oci_image("rm", "--json", "sha256:0", "--cache-dir", str(cache), tmp_path=tmp_path),
            2, "INVALID_ARGUMENT", "'sha256:0' matches 0 cached images")


def test_prune(cached, tmp_path):
    cache, digest = cached
    removed = result(oci_image("prune", "--quota", "1", "--cache-dir", str(cache), "--json",
                               tmp_path=tmp_path))
    assert [r["digest"] for r in removed] == [digest]
    assert result(oci_image("--json", "prune", "--cache-dir", str(cache),
                            tmp_path=tmp_path)) == []
    failure(oci_image("--json", "prune", "--quota", "lots", "--cache-dir", str(cache),
                      tmp_path=tmp_path),
            2, "FAILED_PRECONDITION", "--quota: 'lots' is not a size")   # (config's parse_size)


def test_publish(registry, image, tmp_path):
    cache = str(tmp_path / "cache")
    out = result(oci_image("publish", "--cache-dir", cache, f"{registry.host}/cli/json:v1",
                           f"{registry.host}/cli/json:sqfs", "--json", tmp_path=tmp_path))
    assert out["reference"].startswith(f"{registry.host}/cli/json:sqfs@sha256:")
    assert out["source_digest"] == image.manifest_digest
    failure(oci_image("--json", "publish", "--cache-dir", cache, f"{registry.host}/cli/json:sqfs",
                      f"{registry.host}/cli/json:again", tmp_path=tmp_path),
            2, "INVALID_ARGUMENT", "is already a monolithic (SquashFS) image")


@needs_root
def test_through_the_daemon(registry, image, tmp_path):
    """The same documents when oci-imaged does the work, and its errors in the same shape."""
    d = DaemonProcess(tmp_path / "d", tmp_path / "dcache", metrics=False).start()
    try:
        ref = f"{registry.host}/cli/json:v1"
        entry = json.loads(d.cli("pull", ref, "--json", check=True).stdout)
        assert entry["digest"] == image.manifest_digest
        rows = json.loads(d.cli("ls", "--json", check=True).stdout)
        assert [r["digest"] for r in rows] == [image.manifest_digest]
        info = json.loads(d.cli("--json", "inspect", image.manifest_digest, check=True).stdout)
        assert info["digest"] == image.manifest_digest
        for args, exit_code, code, needle in (
                (["pull", f"{registry.host}/cli/nothere:v1"], 1, "NOT_FOUND", "not found"),
                (["inspect", "sha256:" + "e" * 64], 1, "NOT_FOUND", "e" * 64),
                (["rm", "sha256:" + "../" * 21 + "x"], 2, "INVALID_ARGUMENT", "invalid digest")):
            failure(d.cli(*args, "--json"), exit_code, code, needle)
        assert json.loads(d.cli("rm", image.manifest_digest, "--json", check=True).stdout) == [
            {"digest": image.manifest_digest}]
        assert json.loads(d.cli("--json", "prune", check=True).stdout) == []
    finally:
        d.stop()
    # and without a daemon to talk to: the same shape, exit code 3
    failure(d.cli("ls", "--json"), 3, "UNAVAILABLE", "cannot reach oci-imaged")


def test_devices(tmp_path):
    specs = tmp_path / "cdi"
    specs.mkdir(mode=0o755)
    (specs / "t.json").write_text(json.dumps({
        "cdiVersion": "0.6.0", "kind": "test.example/dev", "devices": [
            {"name": "a", "containerEdits": {"env": ["A=1"], "deviceNodes": [
                {"path": "/dev/oci-test/a", "type": "c", "major": 1, "minor": 3}]}}]}))
    (specs / "bad.json").write_text("{")
    doc = result(oci_image("devices", "--spec-dir", str(specs), "--json", tmp_path=tmp_path))
    assert doc["spec_dirs"] == [str(specs)]
    assert doc["devices"] == [{"name": "test.example/dev=a", "spec": str(specs / "t.json"),
                               "device_nodes": ["/dev/oci-test/a"], "mounts": [],
                               "env": ["A=1"], "hooks": []}]
    assert len(doc["errors"]) == 1 and "bad.json: invalid JSON" in doc["errors"][0]
