"""Deadlines and fairness in the real daemon: tarpits, abandoned requests, per-uid caps, SIGTERM.

A real oci-imaged (tests/daemon_proc.py) pulls through a RegistryProxy in
tarpit mode (layer blobs trickled at 10 bytes/s, after honest headers) in
front of the real docker-registry, and directly from that registry for the
healthy requests of another user. The proxy counts the trickles it started
and those whose client hung up, which is how these tests see the daemon
abandon a download.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from daemon_proc import DaemonProcess
from ocibuild import Entry, Pusher
from registry_proxy import RegistryProxy

from ociimage.cache import Cache
from ociimage.images import SHUTTING_DOWN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")

UID_A, UID_B = 4242, 4343


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def images(registry):
    """name -> Pushed; each layer is incompressible and well over the tarpit threshold."""
    rnd = random.Random(99)
    p = Pusher(registry.url)
    return {name: p.image(f"fair/{name}", "v1",
                          [[Entry("etc/", "dir", mode=0o755),
                            Entry(f"etc/{name}", data=rnd.randbytes(64 << 10))]])
            for name in ("a1", "a2", "a3", "a4", "b", "locked")}


@pytest.fixture
def tarpit(registry):
    with RegistryProxy(registry.url, tarpit=True, tarpit_over=16 << 10) as p:
        yield p


@pytest.fixture
def daemon(tmp_path):
    made = []

    def make(conf: str) -> DaemonProcess:
        base = tmp_path / "d"
        base.mkdir(exist_ok=True)
        (base / "n1.conf").write_text("[daemon]\nmount_idle = 1\nprefetch_socket = off\n" + conf)
        d = DaemonProcess(base, tmp_path / "cache", node="n1", metrics=False,
                          extra=["--config", str(base / "n1.conf")])
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.kill()


def channel(d):
    from ociimage.v1 import ociimage_pb2_grpc as pbg
    ch = grpc.insecure_channel(f"unix:{d.socket}")
    return ch, pbg.ImagesStub(ch)


def start_pull(stub, ref, uid):
    """A streaming Pull RPC in flight; returns the call (cancel() it, or next() it)."""
    from ociimage.v1 import ociimage_pb2 as pb
    return stub.Pull(pb.PullRequest(reference=ref, uid=uid))


def outcome(call):
    """('image', digest) or (status code name, details) of a Pull call, read to its end."""
    try:
        for ev in call:
            if ev.WhichOneof("event") == "image":
                return "image", ev.image.digest
    except grpc.RpcError as e:
        return e.code().name, e.details()
    return "none", ""


def cache_is_clean(cache_dir: Path) -> None:
    assert Cache(cache_dir, node="check").list() == []
    assert list((cache_dir / "images").glob("*")) == []
    assert [p.name for p in (cache_dir / "tmp").iterdir() if p.name.startswith("sha256-")] == []


def test_tarpit_pull_fails_within_the_deadline_leaving_nothing(daemon, tarpit, images, tmp_path):
    d = daemon("[registries]\nmin_rate = 4K\nrate_window = 3\nrequest_timeout = 30\n")
    started = time.monotonic()
    r = d.cli("pull", f"{tarpit.host}/fair/a1:v1", timeout=60)
    took = time.monotonic() - started
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()  # progress lines, then the error
    errors = [l for l in lines if l.startswith("oci-image: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "abandoned" in errors[0] and "[registries] min_rate" in errors[0], errors[0]
    # a window of 3s and a watchdog tick: well before the 30s request_timeout or the
    # hour 64 KiB would take at 10 bytes/s
    assert took < 12, took
    wait_for(lambda: tarpit.trickle_ended == tarpit.trickling == 1, 5, "the daemon to hang up")
    cache_is_clean(tmp_path / "cache")


def test_cancelled_clients_abandon_the_work_while_other_users_proceed(daemon, tarpit, images,
                                                                       registry, tmp_path):
    # no minimum rate: only the clients going away can end these downloads
    d = daemon("max_pulls_per_uid = 8\nmax_requests_per_uid = 16\n"
               "[registries]\nmin_rate = 0\nrequest_timeout = 3600\n")
    ch, stub = channel(d)
    try:
        calls = {name: [start_pull(stub, f"{tarpit.host}/fair/{name}:v1", UID_A)
                        for _ in range(3)] for name in ("a1", "a2", "a3")}
        wait_for(lambda: tarpit.trickling == 3, 20, "three downloads in the tarpit")
        # a pull that someone still waits for goes on when the others leave, even the
        # request that started it
        for call in calls["a1"][:2]:
            call.cancel()
        time.sleep(2)
        assert tarpit.trickle_ended == 0
        # the last waiter gone: abandoned at once
        calls["a1"][2].cancel()
        wait_for(lambda: tarpit.trickle_ended == 1, 5, "a1's download to be abandoned")
        # a client whose connection is closed (as when it is killed) counts as gone too
        ch.close()
        wait_for(lambda: tarpit.trickle_ended == 3, 5, "every download to be abandoned")
    finally:
        ch.close()
    wait_for(lambda: not [p for p in (tmp_path / "cache" / "tmp").iterdir()
                          if p.name.startswith("sha256-")], 5, "temporary files to go")
    cache_is_clean(tmp_path / "cache")
    ch, stub = channel(d)
    try:
        started = time.monotonic()
        got = outcome(start_pull(stub, f"{registry.host}/fair/b:v1", UID_B))
        assert got == ("image", images["b"].manifest_digest), got
        assert time.monotonic() - started < 15
    finally:
        ch.close()
    assert "Traceback" not in d.log()


def test_per_uid_caps(daemon, tarpit, images, registry):
    d = daemon("max_pulls_per_uid = 2\nmax_requests_per_uid = 3\n"
               "[registries]\nmin_rate = 0\nrequest_timeout = 3600\n")
    ch, stub = channel(d)
    try:
        a1 = start_pull(stub, f"{tarpit.host}/fair/a1:v1", UID_A)
        a2 = start_pull(stub, f"{tarpit.host}/fair/a2:v1", UID_A)
        wait_for(lambda: tarpit.trickling == 2, 20, "two downloads in the tarpit")
        started = time.monotonic()
        code, details = outcome(start_pull(stub, f"{tarpit.host}/fair/a3:v1", UID_A))
        assert code == "RESOURCE_EXHAUSTED", (code, details)
        assert f"uid {UID_A} already has 2 image pulls in progress" in details
        assert "max_pulls_per_uid" in details and "\n" not in details
        assert time.monotonic() - started < 5  # refused, not queued
        # another request for an image already being pulled is one more waiter...
        a1b = start_pull(stub, f"{tarpit.host}/fair/a1:v1", UID_A)
        time.sleep(1)  # let it reach the daemon
        # ... up to max_requests_per_uid
        code, details = outcome(start_pull(stub, f"{tarpit.host}/fair/a2:v1", UID_A))
        assert code == "RESOURCE_EXHAUSTED", (code, details)
        assert "max_requests_per_uid" in details
        # other users are not affected
        got = outcome(start_pull(stub, f"{registry.host}/fair/b:v1", UID_B))
        assert got == ("image", images["b"].manifest_digest), got
        for call in (a1, a2, a1b):
            call.cancel()
        # the slots come back once the requests are gone
        wait_for(lambda: tarpit.trickle_ended == 2, 5, "the downloads to be abandoned")
        a3 = start_pull(stub, f"{tarpit.host}/fair/a3:v1", UID_A)
        wait_for(lambda: tarpit.trickling == 3, 20, "uid A's next pull to start")
        a3.cancel()
    finally:
        ch.close()


def test_sigterm_ends_a_daemon_stuck_on_a_tarpit_and_a_lock(daemon, tarpit, images, registry,
                                                            tmp_path):
    d = daemon("stop_timeout = 3\n[registries]\nmin_rate = 0\nrequest_timeout = 3600\n")
    holder = Cache(tmp_path / "cache", node="elsewhere")
    lock = holder.acquire(images["locked"].manifest_digest)  # "another node converting it"
    ch, stub = channel(d)
    try:
        stuck = start_pull(stub, f"{tarpit.host}/fair/a1:v1", UID_A)
        waiting = start_pull(stub, f"{registry.host}/fair/locked:v1", UID_B)
        wait_for(lambda: tarpit.trickling == 1, 20, "a download in the tarpit")
        for ev in waiting:  # until the daemon says it waits for the lock
            if ev.WhichOneof("event") == "progress" and ev.progress.phase == "wait":
                break
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"oci-imaged still running 10s after SIGTERM: {d.log()[-2000:]}")
        took = time.monotonic() - started
        assert took < 5.5, took
        assert d.proc.returncode == 0, d.log()[-2000:]
        assert not d.socket.exists()
        # both are told why (not cut off): the download and the wait for the lock alike
        assert outcome(stuck) == ("CANCELLED", SHUTTING_DOWN)
        assert outcome(waiting) == ("CANCELLED", SHUTTING_DOWN)
    finally:
        ch.close()
        lock.release()
    wait_for(lambda: tarpit.trickle_ended == 1, 5, "the tarpit download to be dropped")
    cache_is_clean(tmp_path / "cache")
    assert "Traceback" not in d.log()

