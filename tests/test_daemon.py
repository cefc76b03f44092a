"""oci-imaged as a real process on a temporary socket, driven through the real CLI."""

import json
import os
import pwd
import stat
import subprocess
import threading
import time

import pytest
import requests

from daemon_proc import DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from ocibuild import Pusher
from ociimage.images import SHUTTING_DOWN
from registry_proxy import RegistryProxy

TEST_USER = "ocitest"


def _ensure_user():
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", TEST_USER], check=True)


@pytest.fixture
def daemon(tmp_path, registry):
    d = DaemonProcess(tmp_path / "d", tmp_path / "cache").start()
    yield d
    d.stop()


def _push(registry, repo, **kw):
    return Pusher(registry.url).image(repo, "v1", busybox_layers(**kw), config=IMAGE_CONFIG)


def test_pull_through_daemon_then_hit(daemon, registry):
    img = _push(registry, "daemon/pull", os_id="pull")
    ref = f"{registry.host}/daemon/pull:v1"
    r = daemon.cli("--json", "pull", ref, check=True)
    out = json.loads(r.stdout)
    assert out["digest"] == img.manifest_digest
    assert os.path.exists(out["path"]) and out["path"].startswith(str(daemon.cache_dir))
    assert out["meta"]["config"]["WorkingDir"] == "/opt/app"
    fetches = registry.blob_fetches(img.layer_digests[0])
    r2 = daemon.cli("pull", ref, check=True)
    assert r2.stdout.split() == [img.manifest_digest, out["path"]]
    assert registry.blob_fetches(img.layer_digests[0]) == fetches  # a hit fetches no layer
    ls = json.loads(daemon.cli("--json", "ls", check=True).stdout)
    assert [x["digest"] for x in ls] == [img.manifest_digest]
    inspect = json.loads(daemon.cli("inspect", img.manifest_digest[:19], check=True).stdout)
    assert inspect["reference"].endswith("daemon/pull:v1@" + img.manifest_digest)
    metrics = requests.get(f"http://127.0.0.1:{daemon.metrics_port}/metrics").text
    assert "ociimage_conversions_total{result=\"ok\"} 1.0" in metrics
    assert "ociimage_cache_hits_total 1.0" in metrics
    assert "ociimage_registry_bytes_total" in metrics


def test_errors_are_one_line_with_status(daemon, registry):
    r = daemon.cli("pull", f"{registry.host}/no/such:image")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("oci-image: error:") and "not found" in last.lower()
    assert "Traceback" not in r.stderr
    r = daemon.cli("pull", "Bad Ref!")
    assert r.returncode == 2 and r.stderr.startswith("oci-image: error:") and r.stderr.count("\n") == 1


def test_cli_without_daemon(tmp_path):
    d = DaemonProcess(tmp_path / "d", tmp_path / "cache")
    r = d.cli("ls")
    assert r.returncode == 3
    assert r.stderr.strip().startswith("oci-image: error: cannot reach oci-imaged at")
    assert r.stderr.count("\n") == 1


def test_socket_is_root_only(daemon):
    mode = os.stat(daemon.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    _ensure_user()
    os.chmod(daemon.base, 0o755)
    os.chmod(daemon.socket.parent, 0o755)
    r = daemon.cli("ls", user=TEST_USER)
    assert r.returncode != 0 and "permission denied" in r.stderr.lower()


def test_three_daemons_one_conversion(tmp_path, fresh_registry):
    img = Pusher(fresh_registry.url).image("three/img", "v1", busybox_layers(extra_mb=8))
    cache = tmp_path / "cache"
    daemons = [DaemonProcess(tmp_path / "d", cache, node=f"n{i}").start() for i in (1, 2, 3)]
    try:
        results = {}

        def pull(d):
            results[d.node] = d.cli("--json", "pull", f"{fresh_registry.host}/three/img:v1")

        threads = [threading.Thread(target=pull, args=(d,)) for d in daemons]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(results) == ["n1", "n2", "n3"]     # every pull ended
        paths = set()
        for node, r in results.items():
            assert r.returncode == 0, (node, r.stderr)
            paths.add(json.loads(r.stdout)["path"])
        assert len(paths) == 1
        for digest in img.layer_digests:
            assert fresh_registry.blob_fetches(digest) == 1
        conversions = 0
        for d in daemons:
            m = requests.get(f"http://127.0.0.1:{d.metrics_port}/metrics").text
            for line in m.splitlines():
                if line.startswith('ociimage_conversions_total{result="ok"}'):
                    conversions += float(line.split()[-1])
        assert conversions == 1
    finally:
        for d in daemons:
            d.stop()


def test_sigkill_mid_conversion_then_restart(tmp_path, registry):
    Pusher(registry.url).image("killed/img", "v1", busybox_layers(extra_mb=48))
    cache = tmp_path / "cache"
    d = DaemonProcess(tmp_path / "d", cache).start()
    ref = f"{registry.host}/killed/img:v1"
    cli = subprocess.Popen([str(d.argv()[0]).replace("oci-imaged", "oci-image"), "--socket",
                            str(d.socket), "pull", ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline and not any((cache / "tmp").glob("sha256-*")):
        time.sleep(0.01)
    assert any((cache / "tmp").glob("sha256-*")), "conversion never started"
    d.kill()
    try:
        _, err = cli.communicate(timeout=30)
    except BaseException:
        cli.kill()
        raise
    last = err.decode().strip().splitlines()[-1]
    assert cli.returncode == 3 and last.startswith("oci-image: error: oci-imaged at") and "went away" in last
    assert not list((cache / "images").glob("*.json"))
    d.start()
    try:
        r = d.cli("--json", "pull", ref, check=True)
        assert os.path.getsize(json.loads(r.stdout)["path"]) > 48 << 20
        assert not list((cache / "tmp").iterdir())
    finally:
        d.stop()


def test_sigterm_removes_socket(tmp_path):
    d = DaemonProcess(tmp_path / "d", tmp_path / "cache").start()
    try:
        assert d.stop() == 0
        assert not d.socket.exists()
        # a stale socket left by a SIGKILLed daemon does not stop the next one
        d.start()
        d.kill()
        assert d.socket.exists()
        d.start()
        assert d.cli("ls").returncode == 0
    finally:
        d.stop()


def test_prune_quota_spares_leased_images(daemon, registry):
    from ociimage.cache import Cache
    a = _push(registry, "prune/a", os_id="a")
    b = _push(registry, "prune/b", os_id="b")
    for repo in ("prune/a", "prune/b"):
        daemon.cli("pull", f"{registry.host}/{repo}:v1", check=True)
    # a step on another node holds image a (leases live in the shared cache)
    Cache(daemon.cache_dir, node="n9").add_lease(a.manifest_digest, "job 42.0")
    r = daemon.cli("--json", "prune", "--quota", "1", check=True)
    assert [x["digest"] for x in json.loads(r.stdout)] == [b.manifest_digest]
    left = json.loads(daemon.cli("--json", "ls", check=True).stdout)
    assert [x["digest"] for x in left] == [a.manifest_digest]
    assert left[0]["users"] == ["job 42.0@n9"]
    r = daemon.cli("rm", a.manifest_digest)
    assert r.returncode != 0 and "in use by job 42.0 on n9" in r.stderr


def test_health_service(daemon):
    import grpc
    from ociimage.v1 import health_pb2, health_pb2_grpc
    ch = grpc.insecure_channel(f"unix:{daemon.socket}")
    stub = health_pb2_grpc.HealthStub(ch)
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_sigterm_mid_conversion_abandons_cleanly(tmp_path, registry):
    Pusher(registry.url).image("term/img", "v1", busybox_layers(extra_mb=48))
    cache = tmp_path / "cache"
    d = DaemonProcess(tmp_path / "d", cache).start()
    # ~2.5 MB/s: still converting when SIGTERM comes, however fast the converter
    slow = RegistryProxy(registry.url, tarpit=True, tarpit_over=1 << 20, tarpit_bytes=256 << 10,
                         tarpit_interval=0.1).__enter__()
    cli = subprocess.Popen([str(d.argv()[0]).replace("oci-imaged", "oci-image"), "--socket",
                            str(d.socket), "pull", f"{slow.host}/term/img:v1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not any((cache / "tmp").glob("sha256-*")):
            time.sleep(0.01)
        assert any((cache / "tmp").glob("sha256-*")), "conversion never started"
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 15
        _, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
        slow.__exit__(None, None, None)
    last = err.decode().strip().splitlines()[-1]
    assert cli.returncode != 0 and last.startswith("oci-image: error:")
    # the daemon says why it ended the pull (not a connection that just went away)
    assert last == f"oci-image: error: {SHUTTING_DOWN}", err.decode()
    assert not list((cache / "tmp").iterdir())           # nothing partial left
    assert not list((cache / "images").glob("*.json"))
    assert not d.socket.exists()
