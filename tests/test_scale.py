"""Cluster scale (issue 15): what a job start on N nodes costs the registry and the shared
filesystem, counted, with real parts beyond 3 nodes.

* the simulation: N real oci-imaged processes (tests/simcluster.py), each a node of its own
  sharing one cache directory, asked at once as a user (Pull with the job user's uid, the
  way a step's client asks) for a never-seen digest-pinned image after srun's submit-side
  resolve of its tag (`oci-image-step submit`, as the user), then again (a new job on the
  cached image). N = 16 in the default run, 128 with -m slow.
* the local Slurm cluster with 16 slurmd and one daemon per node: `srun -N16 --oci-image=`
  as the unprivileged test user, cold and warm, every node's output checked.

Both put a counting proxy (tests/registry_proxy.py) between every client (submit side and
daemons) and the real docker-registry, count the producer runs from the daemons' logs, and
strace one waiting daemon for its calls on the cache's files (tests/fsops.py).

The goals asserted are issue 15's counts, all independent of N:
  cold start: manifest + config requests <= 3 in all (submit-side resolve included),
              blob GETs == number of blobs, exactly one conversion;
  new job on the cached image: <= 2 registry requests in all;
  a waiting node: <= 10 calls on lock files per conversion.
Timings are not asserted here; bench/scale.py measures them against the ideal.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cluster_fixture import cluster_available
from fsops import FsTrace, parse
from install_fixture import installed  # noqa: F401 - a fixture
from ocibuild import Pusher
from registry_proxy import RegistryProxy, request_kind
from registry_server import RegistryServer
from simcluster import (SLOW_SQUASH, SimCluster, blob_count, converting_lines, job_start,
                        scale_image, sim_user)

MANIFEST_AND_CONFIG_COLD = 3
WARM_REQUESTS = 2
LOCK_CALLS_PER_CONVERSION = 10

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the daemons run as root")


# ---- the counting tools themselves --------------------------------------------------------

def test_request_kinds():
    cfg = "sha256:" + "c" * 64
    layer = "sha256:" + "a" * 64
    assert request_kind("GET", "/v2/") == "ping"
    assert request_kind("HEAD", "/v2/a/b/manifests/v1") == "manifest_head_tag"
    assert request_kind("GET", "/v2/a/b/manifests/v1") == "manifest_get_tag"
    assert request_kind("GET", f"/v2/a/manifests/{layer}") == "manifest_get_digest"
    assert request_kind("HEAD", f"/v2/a/manifests/{layer}") == "manifest_head_digest"
    assert request_kind("GET", f"/v2/a/blobs/{cfg}", [cfg]) == "blob_get_config"
    assert request_kind("GET", f"/v2/a/blobs/{layer}?x=1", [cfg]) == "blob_get_layer"
    assert request_kind("GET", f"/_storage/v2/a/blobs/{layer}", [cfg]) == "blob_get_layer"
    assert request_kind("HEAD", f"/v2/a/blobs/{layer}") == "blob_head"
    assert request_kind("GET", "/token?scope=repository:a:pull") == "token"
    assert request_kind("PUT", f"/v2/a/manifests/v1") == "push"
    assert request_kind("GET", "/v2/_catalog") == "other"


def test_fsops_counts_calls_under_the_directory_once_each(tmp_path):
    root = tmp_path / "cache"
    r = os.path.realpath(root)
    text = "\n".join([
        f'101 openat(AT_FDCWD, "{r}/locks/sha256-x.lock", O_RDWR|O_CREAT) = 7<{r}/locks/sha256-x.lock>',
        f"101 flock(7<{r}/locks/sha256-x.lock>, LOCK_EX|LOCK_NB) = -1 EAGAIN",
        f"102 flock(7<{r}/locks/sha256-x.lock>, LOCK_EX <unfinished ...>",
        "101 read(3</etc/passwd>, \"\", 10) = 0",
        "102 <... flock resumed>) = 0",
        f'101 newfstatat(AT_FDCWD, "{r}/images/sha256-x.json", 0x7f, 0) = -1 ENOENT',
        f"101 close(7<{r}/locks/sha256-x.lock>) = 0",
        # naming the directory in data or in a command line is no call on its files
        f'101 write(2</var/log/d.log>, "waiting for {r}/locks/sha256-x.lock", 40) = 40',
        f'103 execve("/usr/bin/tar2sqfs", ["tar2sqfs", "{r}/tmp/x"], 0x7ff) = 0',
    ])
    ops = parse(text, root, 2.0)
    assert (ops.total, ops.lock) == (5, 4)
    assert ops.lock_by_call == {"flock": 2, "openat": 1, "close": 1}
    assert ops.by_area == {"locks": 4, "images": 1}


@root_only
def test_fsops_traces_a_live_process(tmp_path):
    import subprocess
    import sys
    root = tmp_path / "c"
    (root / "locks").mkdir(parents=True)
    code = ("import fcntl, os, sys, time\n"
            "sys.stdin.readline()\n"
            f"fd = os.open({str(root / 'locks' / 'a.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "for _ in range(5):\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "os.close(fd)\nprint('done', flush=True)\nsys.stdin.readline()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        with FsTrace(p.pid, root, tmp_path / "t.strace") as t:
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline() == "done\n"
        ops = t.result()
    finally:
        p.kill()
        p.wait()
    assert ops.lock_by_call["flock"] == 5 and ops.lock_by_call["openat"] == 1, ops
    assert ops.lock == 7 and ops.total == 7, ops


# ---- N real daemons sharing one cache ----------------------------------------------------

@pytest.fixture(scope="module", params=[16, pytest.param(128, marks=pytest.mark.slow)],
                ids=lambda n: f"{n}daemons")
def sim_job(request, installed):
    """One cold job start and one new job on the cached image, on N daemons: job_start()'s
    figures (see tests/simcluster.py), kept for the tests below. The submit side runs the
    installed step client, as the user (a checkout under /root is not theirs to read)."""
    if os.geteuid() != 0:
        pytest.skip("the daemons run as root")
    n = request.param
    base = Path(tempfile.mkdtemp(prefix="oci-scale-sim-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        with RegistryServer(base / "registry") as reg, \
                RegistryProxy(reg.url, backlog=512) as proxy, \
                SimCluster(base / "sim", n, batch=8) as sim:
            yield job_start(sim, proxy, Pusher(reg.url), sim_user(),
                            step_client=installed.step_client)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _figures(run: dict) -> str:
    c, w = run["cold"], run["warm"]
    return (f"N={run['nodes']} blobs={run['blobs']} cold registry="
            f"{ {k: v for k, v in c['registry'].items() if v} } conversions={c['conversions']} "
            f"waiting node fs={c['waiting_node_fs'] and {k: c['waiting_node_fs'][k] for k in ('lock', 'total', 'seconds')} } "
            f"warm registry={ {k: v for k, v in w['registry'].items() if v} }")


def test_sim_cold_start_every_node_ready_one_conversion(sim_job):
    cold = sim_job["cold"]
    assert cold["error_count"] == 0, cold["errors"]
    assert cold["paths"] == 1
    assert cold["conversions"] == 1, _figures(sim_job)
    # the others were told they wait for another node's conversion, which lasted long
    # enough to be waited for (else the waiting-node figures below would measure nothing)
    assert cold["waited"] >= 1, cold
    assert cold["waiting_node_fs"] is not None and cold["waiting_node_fs"]["seconds"] >= 2, cold


def test_sim_cold_start_manifest_and_config_once_per_cluster(sim_job):
    reg = sim_job["cold"]["registry"]
    assert reg["manifest_config"] <= MANIFEST_AND_CONFIG_COLD, _figures(sim_job)


def test_sim_cold_start_each_blob_once(sim_job):
    reg = sim_job["cold"]["registry"]
    assert reg["blob_get"] == sim_job["blobs"], _figures(sim_job)


def test_sim_new_job_on_cached_image(sim_job):
    warm = sim_job["warm"]
    assert warm["error_count"] == 0 and warm["conversions"] == 0, warm
    assert warm["registry"]["total"] <= WARM_REQUESTS, _figures(sim_job)


def test_sim_waiting_node_lock_calls_per_conversion(sim_job):
    fs = sim_job["cold"]["waiting_node_fs"]
    conversions = max(1, sim_job["cold"]["conversions"])
    assert fs["lock"] / conversions <= LOCK_CALLS_PER_CONVERSION, _figures(sim_job)


# ---- srun -N16 on the local Slurm cluster -------------------------------------------------

CLUSTER_NODES = 16


@pytest.fixture(scope="module")
def srun16(installed):
    """The local cluster with 16 slurmd and a daemon per node, the registry behind a
    counting proxy; srun -N16 cold on a never-seen image, then a new srun on it."""
    if cluster_available() is not None:
        pytest.skip(str(cluster_available()))
    from localsite import DAEMON_CONF, start_site, stop_site
    base = Path(tempfile.mkdtemp(prefix="oci-scale-reg-", dir="/tmp"))
    reg = RegistryServer(base / "registry").start()
    proxy = RegistryProxy(reg.url, backlog=512).start()
    site = start_site(installed, "oci-scale-", nodes=CLUSTER_NODES,
                      daemon_conf=DAEMON_CONF + SLOW_SQUASH)
    try:
        pushed = scale_image(Pusher(reg.url), "scale/srun16")
        ref = f"{proxy.host}/scale/srun16:v1"
        out = {"blobs": blob_count(pushed), "nodes": CLUSTER_NODES}
        cmd = ['sh', '-c', 'echo "$SLURMD_NODENAME $(cat /etc/scale-id) $(id -u)"']
        for phase in ("cold", "warm"):
            conv0 = converting_lines(site.daemons)
            mark = proxy.mark()
            traced = site.daemons[-2:]  # two: one of them at least waits for the converter
            traces = [FsTrace(d.proc.pid, site.cache, base / f"{phase}-{d.node}.strace").start()
                      for d in traced]
            try:
                t0 = time.monotonic()
                r = site.cluster.run_as_user(["srun", f"-N{CLUSTER_NODES}", "-l",
                                              f"--oci-image={ref}", *cmd],
                                             cwd="/tmp", timeout=600)
                took = time.monotonic() - t0
            finally:
                for t in traces:
                    t.stop()
            conv1 = converting_lines(site.daemons)
            converted = [n for n in conv1 if conv1[n] > conv0.get(n, 0)]
            fs = {d.node: t.result().to_json() for d, t in zip(traced, traces)}
            waiting = [n for n in fs if n not in converted]
            out[phase] = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                          "seconds": took, "converted_on": converted,
                          "conversions": sum(conv1[n] - conv0.get(n, 0) for n in conv1),
                          "registry": dict(proxy.counts([pushed.config_digest], since=mark)),
                          "fs": fs, "traced": waiting[0], "waiting_fs": fs[waiting[0]]}
        out["uid"] = site.cluster.uid
        yield out
    finally:
        stop_site(site)
        proxy.stop()
        reg.stop()
        shutil.rmtree(base, ignore_errors=True)


def _srun_figures(run: dict) -> str:
    return " ".join(f"{p}: {run[p]['seconds']:.1f}s conversions={run[p]['conversions']} "
                    f"registry={ {k: v for k, v in run[p]['registry'].items() if v} } "
                    f"{run[p]['traced']} lock calls={run[p]['waiting_fs']['lock']}"
                    for p in ("cold", "warm"))


def _node_lines(run: dict, phase: str) -> dict:
    lines = {}
    for line in run[phase]["stdout"].splitlines():
        m = re.match(r"^\s*(\d+): (n\d+) ([0-9a-f]{32}) (\d+)$", line)
        assert m, line
        lines[m.group(2)] = (m.group(3), int(m.group(4)))
    return lines


def test_srun16_every_node_runs_the_image_as_the_user(srun16):
    seen = {}
    for phase in ("cold", "warm"):
        assert srun16[phase]["rc"] == 0, srun16[phase]["stderr"][-3000:]
        lines = _node_lines(srun16, phase)
        assert sorted(lines) == sorted(f"n{i}" for i in range(1, CLUSTER_NODES + 1)), lines
        assert {uid for _salt, uid in lines.values()} == {srun16["uid"]}
        seen[phase] = {s for s, _uid in lines.values()}
        assert len(seen[phase]) == 1  # one image everywhere: the salt layer's id
    assert seen["cold"] == seen["warm"]


def test_srun16_cold_start_one_conversion(srun16):
    assert srun16["cold"]["conversions"] == 1, _srun_figures(srun16)
    assert srun16["warm"]["conversions"] == 0, _srun_figures(srun16)


def test_srun16_cold_start_manifest_and_config_once_per_cluster(srun16):
    assert srun16["cold"]["registry"]["manifest_config"] <= MANIFEST_AND_CONFIG_COLD, \
        _srun_figures(srun16)


def test_srun16_cold_start_each_blob_once(srun16):
    assert srun16["cold"]["registry"]["blob_get"] == srun16["blobs"], _srun_figures(srun16)


def test_srun16_new_job_on_cached_image(srun16):
    assert srun16["warm"]["registry"]["total"] <= WARM_REQUESTS, _srun_figures(srun16)


def test_srun16_waiting_node_lock_calls_per_conversion(srun16):
    cold = srun16["cold"]
    assert cold["waiting_fs"]["seconds"] >= 2, cold["waiting_fs"]
    assert cold["waiting_fs"]["lock"] <= LOCK_CALLS_PER_CONVERSION * max(1, cold["conversions"]), \
        _srun_figures(srun16)
