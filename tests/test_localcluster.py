"""The local multi-node cluster used by the end-to-end tests works, as root and as the test user."""

import pwd
import subprocess

import pytest

from cluster_fixture import LocalCluster, local_cluster  # noqa: F401


def nodes_of(out: str):
    return sorted(l.strip() for l in out.splitlines() if l.strip())


def test_srun_three_nodes_as_root(local_cluster):
    r = local_cluster.run(["srun", "-N3", "printenv", "SLURMD_NODENAME"], cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert nodes_of(r.stdout) == ["n1", "n2", "n3"]
    r = local_cluster.run(["srun", "-N3", "hostname"], cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert nodes_of(r.stdout) == [local_cluster.hostname] * 3


def test_srun_three_nodes_as_test_user(local_cluster):
    pw = pwd.getpwnam(local_cluster.user)
    assert (pw.pw_uid, pw.pw_gid) == (local_cluster.uid, local_cluster.gid)
    assert local_cluster.uid != 0
    r = local_cluster.run_as_user(["srun", "-N3", "sh", "-c", 'echo "$SLURMD_NODENAME $(id -u)"'])
    assert r.returncode == 0, r.stderr
    assert nodes_of(r.stdout) == [f"n{i} {local_cluster.uid}" for i in (1, 2, 3)]
    r = local_cluster.run_as_user(["srun", "-N3", "hostname"])
    assert r.returncode == 0, r.stderr
    assert len(nodes_of(r.stdout)) == 3


def test_sbatch_wait_as_test_user(local_cluster):
    out = f"{local_cluster.home}/lc-sbatch-%j.out"
    r = local_cluster.run_as_user(
        ["sbatch", "--wait", "-N3", "-o", out, "--wrap", "srun printenv SLURMD_NODENAME"])
    assert r.returncode == 0, r.stdout + r.stderr
    jobid = r.stdout.split()[-1]
    path = out.replace("%j", jobid)
    with open(path) as f:
        assert nodes_of(f.read()) == ["n1", "n2", "n3"]
    subprocess.run(["rm", "-f", path])


def test_start_is_idempotent_and_status(local_cluster):
    import time
    assert local_cluster.is_running()
    before = local_cluster._running()
    same = LocalCluster(local_cluster.state_dir, nodes=local_cluster.nodes)
    same.start()  # already running: no-op
    assert same._running() == before            # the same processes: nothing was restarted
    st = same.status()
    assert st["daemons"] == {n: before[n] for n in ["munged", "slurmctld", "n1", "n2", "n3"]}
    # every node is up and, once an earlier test's job has left it, idle
    deadline = time.monotonic() + 60
    while set(st["nodes"].values()) != {"idle"} and time.monotonic() < deadline:
        time.sleep(0.5)
        st = same.status()
    assert st["nodes"] == {"n1": "idle", "n2": "idle", "n3": "idle"}


def test_crash_recovery_and_stop(tmp_path):
    from cluster_fixture import start_cluster, stop_cluster
    import os, signal, time
    c = start_cluster(nodes=2, prefix="oci-lc-crash-")
    try:
        # simulate a crash: SIGKILL every daemon, leaving pid files and sockets behind
        for pid in c._running().values():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        assert not c.is_running()
        c2 = LocalCluster(c.state_dir, nodes=2)
        c2.start()
        r = c2.run(["srun", "-N2", "printenv", "SLURMD_NODENAME"], cwd="/tmp")
        assert r.returncode == 0, r.stderr
        assert nodes_of(r.stdout) == ["n1", "n2"]
        c2.stop()
        assert not c2._running()
        c2.stop()  # nothing running: fine
    finally:
        stop_cluster(c)
