"""Load and soak against one node's real daemon, through its real PrepareStep/ReleaseStep RPCs.

Measured before and after: mounts, loop devices, the daemon's open files, step
namespace files, processes (the daemon's and namespace holders) and daemon RSS.
Figures are printed (run with -s) and, with OCI_SOAK_REPORT=FILE, written as JSON.

    .venv/bin/python -m pytest tests/test_soak.py -q -s              # 64 concurrent, 30 steps
    .venv/bin/python -m pytest tests/test_soak.py -q -s -m slow      # 300 steps
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from images import IMAGE_CONFIG, busybox_layers
from ocibuild import Pusher
from test_faults import ENTER, ROOT, loops_for, mounts_under, prepare, release, unmount_under
from daemon_proc import DaemonProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")


def snapshot(d: DaemonProcess) -> dict:
    pid = d.proc.pid
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    procs = 0
    sock = str(d.socket)
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if sock in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"):
                    procs += 1
            except OSError:
                pass
    steps = d.runtime_dir / "steps"
    return {"mounts": len(mounts_under(d.base)), "loop_devices": len(loops_for(d.cache_dir)),
            "daemon_fds": len(os.listdir(f"/proc/{pid}/fd")),
            "namespace_files": len(list(steps.glob("*/mnt"))) if steps.exists() else 0,
            "processes": procs, "daemon_rss_kib": rss,
            "leases": len(list(d.cache_dir.glob("leases/*/*.json")))}


def settle(d: DaemonProcess, timeout=15) -> dict:
    """Wait for the idle image mount to go (mount_idle = 1 s), then measure."""
    deadline = time.monotonic() + timeout
    snap = snapshot(d)
    while time.monotonic() < deadline and (snap["mounts"] or snap["loop_devices"]):
        time.sleep(0.25)
        snap = snapshot(d)
    return snap


@pytest.fixture
def node(tmp_path, registry):
    base = tmp_path / "d"
    base.mkdir()
    (base / "soak.conf").write_text("[daemon]\nmount_idle = 1\n[cache]\nlease_ttl = 120\n")
    d = DaemonProcess(base, tmp_path / "cache", extra=["--config", str(base / "soak.conf")]).start()
    img = Pusher(registry.url).image("soak/app", "v1", busybox_layers(os_id="soak"),
                                     config=IMAGE_CONFIG)
    ref = f"{registry.host}/soak/app:v1@{img.manifest_digest}"
    d.cli("pull", ref, check=True)
    # one step first, so imports, thread pools and caches are warm before measuring
    prepare(d, ref, "1", "0")
    release(d, "1", "0")
    yield d, ref
    d.stop()
    unmount_under(tmp_path)


def report(name: str, data: dict) -> None:
    print(f"\n{name}: {json.dumps(data, sort_keys=True)}")
    path = os.environ.get("OCI_SOAK_REPORT")
    if path:
        existing = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        existing[name] = data
        Path(path).write_text(json.dumps(existing, indent=1, sort_keys=True))


def run_task(ns_path: str) -> str:
    r = subprocess.run(["python3", "-c", ENTER, str(ROOT / "daemon"), ns_path,
                        "grep ^ID= /etc/os-release"], capture_output=True, text=True, timeout=60)
    return r.stdout.strip()


def test_64_concurrent_steps(node):
    d, ref = node
    before = settle(d)
    n = 64
    barrier = threading.Barrier(n)
    lat, errors, outputs = [], [], []
    lock = threading.Lock()

    def one(i):
        try:
            barrier.wait(30)
            t0 = time.monotonic()
            c = prepare(d, ref, "2000", str(i))
            with lock:
                lat.append(time.monotonic() - t0)
            if i % 8 == 0:  # a task in every eighth step
                out = run_task(c.ns_path)
                with lock:
                    outputs.append(out)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(f"{i}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wall = time.monotonic() - t0
    during = snapshot(d)
    for i in range(n):
        release(d, "2000", str(i))
    after = settle(d)
    data = {"steps": n, "errors": len(errors), "wall_s": round(wall, 2),
            "prepare_p50_ms": round(statistics.median(lat) * 1000) if lat else None,
            "prepare_max_ms": round(max(lat) * 1000) if lat else None,
            "before": before, "during": during, "after": after}
    report("concurrent_64", data)
    assert not errors, errors[:3]
    assert outputs == ["ID=soak"] * 8
    assert during["namespace_files"] == n and during["loop_devices"] == 1
    for k in ("mounts", "loop_devices", "namespace_files", "processes", "leases"):
        assert after[k] == before[k], (k, before, after)
    assert after["daemon_fds"] <= before["daemon_fds"] + 4


def _consecutive(d, ref, n):
    before = settle(d)
    lat = []
    for i in range(n):
        t0 = time.monotonic()
        c = prepare(d, ref, "3000", str(i))
        lat.append(time.monotonic() - t0)
        if i % 10 == 0:
            assert run_task(c.ns_path) == "ID=soak"
        release(d, "3000", str(i))
    after = settle(d)
    data = {"steps": n, "prepare_p50_ms": round(statistics.median(lat) * 1000),
            "prepare_max_ms": round(max(lat) * 1000), "before": before, "after": after,
            "rss_growth_kib": after["daemon_rss_kib"] - before["daemon_rss_kib"]}
    report(f"consecutive_{n}", data)
    for k in ("mounts", "loop_devices", "namespace_files", "processes", "leases"):
        assert after[k] == before[k], (k, before, after)
    assert after["daemon_fds"] <= before["daemon_fds"] + 4
    return data


def test_30_consecutive_steps(node):
    d, ref = node
    data = _consecutive(d, ref, 30)
    assert data["rss_growth_kib"] < 30 * 1024


@pytest.mark.slow
def test_300_consecutive_steps(node):
    d, ref = node
    data = _consecutive(d, ref, 300)
    assert data["rss_growth_kib"] < 40 * 1024
