"""The daemon's hot path (#19): a cache hit costs one stat, and the gRPC server's standard
health service streams its changes. A real daemon, a real registry, strace on the daemon."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest

from daemon_proc import DaemonProcess
from images import busybox_layers
from ocibuild import Pusher

from ociimage.v1 import health_pb2, health_pb2_grpc
from ociimage.v1 import ociimage_pb2 as pb
from ociimage.v1 import ociimage_pb2_grpc as pbg


def _pull(stub, ref):
    image = None
    for ev in stub.Pull(pb.PullRequest(reference=ref), timeout=60):
        if ev.WhichOneof("event") == "image":
            image = ev.image
    return image


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_a_cache_hit_by_digest_is_one_stat_of_the_cache(tmp_path, registry):
    pushed = Pusher(registry.url).image("hot/img", "v1", busybox_layers(os_id="hot"))
    ref = f"{registry.host}/hot/img@{pushed.manifest_digest}"
    cache = tmp_path / "cache"
    d = DaemonProcess(tmp_path / "d", cache).start()
    ch = grpc.insecure_channel(f"unix:{d.socket}")
    stub = pbg.ImagesStub(ch)
    try:
        first = _pull(stub, ref)              # the conversion
        assert first.digest == pushed.manifest_digest
        assert _pull(stub, ref).path == first.path   # a hit this daemon has validated
        out = tmp_path / "strace.out"
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=%file,%desc",
                                   "-o", str(out), "-p", str(d.proc.pid)],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)                       # strace attaches to every thread
        hits = 20
        for _ in range(hits):
            img = _pull(stub, ref)
            assert (img.digest, img.path) == (first.digest, first.path)
        time.sleep(0.5)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    finally:
        ch.close()
        d.stop()
    calls = [line for line in out.read_text().splitlines() if str(cache) in line]
    stats = [c for c in calls if re.search(r"\b(stat|lstat|newfstatat|statx)\(", c)]
    assert len(stats) == hits, calls          # one per hit: the entry's metadata
    assert all(".json" in c for c in stats), stats
    assert [c for c in calls if c not in stats] == []    # nothing opened, read or written


def test_health_watch_streams_until_the_daemon_stops(tmp_path):
    d = DaemonProcess(tmp_path / "d", tmp_path / "cache").start()
    ch = grpc.insecure_channel(f"unix:{d.socket}")
    stub = health_pb2_grpc.HealthStub(ch)
    R = health_pb2.HealthCheckResponse
    seen = []
    done = threading.Event()

    def watch():
        try:
            for r in stub.Watch(health_pb2.HealthCheckRequest(service="ociimage.v1.Images"),
                                timeout=60):
                seen.append(r.status)
        except grpc.RpcError as e:
            seen.append(e.code())
        finally:
            done.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [R.SERVING]
        time.sleep(1.0)
        assert seen == [R.SERVING] and not done.is_set()   # a stream, not one message
        other = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert next(other).status == R.SERVICE_UNKNOWN      # the standard's answer, streamed
        other.cancel()
        d.proc.send_signal(signal.SIGTERM)
        assert done.wait(20)
    finally:
        ch.close()
        d.stop()
    assert seen[:2] == [R.SERVING, R.NOT_SERVING], seen
