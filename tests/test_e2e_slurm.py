"""`srun --oci-image` end to end: real 3-node Slurm, the real plugin, step client and one
oci-imaged per node sharing one cache, the real registry. Run as an ordinary user."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster_fixture import cluster_available, start_cluster, stop_cluster
from daemon_proc import DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from ocibuild import Pusher

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugin" / "spank_oci_image.so"
STEP_CLIENT = Path(sys.executable).parent / "oci-image-step"

pytestmark = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))


class Env:
    def __init__(self, base: Path, cluster, daemons, registry):
        self.base, self.cluster, self.daemons, self.registry = base, cluster, daemons, registry
        self.cache = base / "cache"
        self.pusher = Pusher(registry.url)

    def push(self, repo, tag="v1", **kw):
        return self.pusher.image(repo, tag, busybox_layers(**kw), config=IMAGE_CONFIG)

    def ref(self, repo, tag="v1"):
        return f"{self.registry.host}/{repo}:{tag}"

    def srun(self, *args, cwd=None, timeout=120, env=None):
        argv = ["srun", *args]
        if env:
            argv = ["env", *[f"{k}={v}" for k, v in env.items()], *argv]
        return self.cluster.run_as_user(argv, cwd=cwd or "/tmp", timeout=timeout)

    def conversions(self) -> int:
        import requests
        n = 0
        for d in self.daemons:
            for line in requests.get(f"http://127.0.0.1:{d.metrics_port}/metrics").text.splitlines():
                if line.startswith('ociimage_conversions_total{result="ok"}'):
                    n += float(line.split()[-1])
        return int(n)

    def leftovers(self):
        """Step namespaces, image mounts and loop devices still present under our runtime dirs."""
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4].startswith(str(self.base))]
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        return mounts, [l for l in loops.splitlines() if str(self.cache) in l]


@pytest.fixture(scope="module")
def e2e(registry):
    base = Path(tempfile.mkdtemp(prefix="oci-e2e-", dir="/tmp"))
    os.chmod(base, 0o755)
    conf = base / "oci-image.conf"
    conf.write_text("[daemon]\nmount_idle = 1\n[cache]\nlease_ttl = 60\n")
    daemons = [DaemonProcess(base, base / "cache", node=f"n{i}",
                             extra=["--config", str(conf)]).start() for i in (1, 2, 3)]
    plugstack = (f"required {PLUGIN} step_client={STEP_CLIENT} "
                 f"socket={base}/%n/oci-imaged.sock allow_sqfs=yes\n")
    cluster = start_cluster(nodes=3, plugstack_text=plugstack, prefix="oci-e2e-slurm-")
    env = Env(base, cluster, daemons, registry)
    try:
        yield env
    finally:
        stop_cluster(cluster)
        for d in daemons:
            d.stop()
        for m in sorted(env.leftovers()[0], reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        if not os.environ.get("OCI_KEEP_CLUSTER"):
            shutil.rmtree(base, ignore_errors=True)


def _wait_clean(e2e, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mounts, loops = e2e.leftovers()
        if not mounts and not loops:
            return
        time.sleep(0.25)
    raise AssertionError(f"left behind: {e2e.leftovers()}")


def test_new_image_on_three_nodes_one_conversion(e2e):
    e2e.push("e2e/first", os_id="first")
    before = e2e.conversions()
    r = e2e.srun("-N3", "-l", f"--oci-image={e2e.ref('e2e/first')}", "sh", "-c",
                 'echo "$SLURMD_NODENAME $(grep ^ID= /etc/os-release) $(id -un) $(id -u)"')
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.split("\n")[:-1])
    uid = e2e.cluster.uid
    assert [l.split(": ", 1)[1] for l in lines] == [
        f"n{i} ID=first {e2e.cluster.user} {uid}" for i in (1, 2, 3)]
    assert e2e.conversions() - before == 1
    assert len(list((e2e.cache / "images").glob("*.json"))) == 1


def test_environment_workdir_and_mounts(e2e, tmp_path):
    e2e.push("e2e/env")
    data = Path(tempfile.mkdtemp(prefix="oci-e2e-data-", dir="/tmp"))
    os.chmod(data, 0o777)
    (data / "in.txt").write_text("host data\n")
    ref = e2e.ref("e2e/env")
    script = ('echo "pwd=$(pwd)"; echo "path=$PATH"; echo "var=$IMAGE_VAR"; '
              'echo "job=${SLURM_JOB_ID:+set}"; cat /data/in.txt; '
              'touch /data/out.txt && echo rw-ok; touch /ro/x 2>/dev/null || echo ro-refused; '
              'touch /opt/app/data/new 2>/dev/null || echo image-readonly')
    r = e2e.srun("-N1", f"--oci-image={ref}", f"--oci-mounts={data}:/data,{data}:/ro:ro",
                 "sh", "-c", script, env={"IMAGE_VAR": "from-host"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "pwd=/opt/app" in out                      # the image's WorkingDir
    assert "path=/opt/app:/bin:/usr/bin" in out       # PATH comes from the image
    assert "var=from-image" in out                    # the image's Env wins by default
    assert "job=set" in out                           # Slurm's own variables pass through
    assert "host data" in out and "rw-ok" in out and "ro-refused" in out
    assert "image-readonly" in out
    assert (data / "out.txt").exists()
    r = e2e.srun("-N1", f"--oci-image={ref}", "--oci-env=IMAGE_VAR", "--oci-workdir=/tmp",
                 "sh", "-c", 'echo "var=$IMAGE_VAR pwd=$(pwd)"', env={"IMAGE_VAR": "from-host"})
    assert "var=from-host pwd=/tmp" in r.stdout, r.stderr
    shutil.rmtree(data)


def test_writable_overlay_is_per_step(e2e):
    ref = e2e.ref("e2e/env")
    e2e.push("e2e/env")
    r = e2e.srun("-N1", f"--oci-image={ref}", "--oci-writable", "sh", "-c",
                 "echo hi > /opt/app/data/new && cat /opt/app/data/new")
    assert r.returncode == 0 and "hi" in r.stdout, r.stderr
    r = e2e.srun("-N1", f"--oci-image={ref}", "sh", "-c",
                 "cat /opt/app/data/new 2>/dev/null || echo gone; touch /opt/app/data/x 2>&1")
    assert "gone" in r.stdout and "Read-only file system" in r.stdout + r.stderr


def test_home_mounted_unless_disabled(e2e):
    ref = e2e.ref("e2e/env")
    e2e.push("e2e/env")
    home = e2e.cluster.home
    marker = Path(home) / "oci-e2e-marker"
    e2e.cluster.run_as_user(["sh", "-c", f"echo mine > {marker}"])
    r = e2e.srun("-N1", f"--oci-image={ref}", "cat", str(marker), cwd=home)
    assert r.stdout.strip() == "mine", r.stderr
    r = e2e.srun("-N1", f"--oci-image={ref}", "--no-oci-mount-home", "sh", "-c",
                 f"cat {marker} 2>/dev/null || echo no-home")
    assert "no-home" in r.stdout


def test_local_sqfs_file(e2e):
    e2e.push("e2e/local", os_id="localfile")
    out = Path(tempfile.mkdtemp(prefix="oci-e2e-sqfs-", dir="/tmp")) / "img.sqfs"
    os.chmod(out.parent, 0o755)
    subprocess.run([str(Path(sys.executable).parent / "oci-image"), "convert",
                    e2e.ref("e2e/local"), "-o", str(out)], check=True, capture_output=True)
    os.chmod(out, 0o644)
    r = e2e.srun("-N2", f"--oci-image={out}", "grep", "^ID=", "/etc/os-release")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ID=localfile", "ID=localfile"]
    shutil.rmtree(out.parent)


def test_batch_steps_pin_the_digest_even_if_the_tag_moves(e2e):
    e2e.push("e2e/moving", tag="latest", os_id="old")
    go = Path(tempfile.mkdtemp(prefix="oci-e2e-go-", dir="/tmp"))
    os.chmod(go, 0o777)
    out = go / "out"
    script = go / "job.sh"
    script.write_text(f"""#!/bin/sh
#SBATCH --oci-image={e2e.ref('e2e/moving', 'latest')}
#SBATCH -N2
#SBATCH -o {out}
echo "batch $(grep ^ID= /etc/os-release)"
srun -N2 grep ^ID= /etc/os-release
touch {go}/first-done
while [ ! -f {go}/go ]; do sleep 0.2; done
srun -N1 grep ^ID= /etc/os-release
""")
    os.chmod(script, 0o755)
    r = e2e.cluster.run_as_user(["sbatch", "--parsable", str(script)], cwd=str(go))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    deadline = time.time() + 60
    while not (go / "first-done").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (go / "first-done").exists(), out.read_text() if out.exists() else "no output"
    e2e.push("e2e/moving", tag="latest", os_id="new")   # the tag moves mid-job
    (go / "go").touch()
    deadline = time.time() + 60
    while time.time() < deadline:
        st = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True,
                            env=e2e.cluster.env()).stdout.strip()
        if not st:
            break
        time.sleep(0.3)
    text = out.read_text()
    host_id = [l for l in Path("/etc/os-release").read_text().splitlines() if l.startswith("ID=")][0]
    assert f"batch {host_id}" in text   # the batch script itself runs on the host
    assert text.count("ID=old") == 3 and "ID=new" not in text, text
    shutil.rmtree(go)


def test_user_visible_errors(e2e):
    r = e2e.srun("-N1", "--oci-image=Bad Ref!", "true")
    assert r.returncode != 0 and "invalid" in r.stderr.lower() and "Traceback" not in r.stderr
    r = e2e.srun("-N1", f"--oci-image={e2e.registry.host}/no/such:image", "true")
    assert r.returncode != 0 and "not found" in r.stderr.lower()
    # a daemon that is down: the node says so, the task never runs
    e2e.push("e2e/down")
    d = e2e.daemons[1]
    d.stop()
    try:
        r = e2e.srun("-N1", "-w", "n2", f"--oci-image={e2e.ref('e2e/down')}", "echo", "RAN")
        assert r.returncode != 0 and "RAN" not in r.stdout
        assert "cannot reach oci-imaged" in r.stderr, r.stderr
    finally:
        d.start()


def test_steps_without_image_are_untouched(e2e):
    r = e2e.srun("-N3", "cat", "/etc/os-release")
    host = Path("/etc/os-release").read_text()
    assert r.returncode == 0 and r.stdout == host * 3


def test_nothing_left_behind(e2e):
    _wait_clean(e2e)
    assert not list(e2e.cache.glob("leases/*/*.json"))
