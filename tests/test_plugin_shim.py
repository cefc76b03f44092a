"""The SPANK shim (plugin/spank_oci_image.so) on a real 3-node cluster, with a
test-only step client (tests/fake_step_client.sh) instead of the daemon.

Runs as the unprivileged test user where it matters.  The fake step client
logs every exec to calls.log, so the tests can see exactly what the plugin ran.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cluster_fixture import cluster_available, start_cluster, stop_cluster

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "plugin"
IMAGE_ID = "ID=ocitestimage"

pytestmark = pytest.mark.skipif(cluster_available() is not None or not shutil.which("mksquashfs")
                                or not shutil.which("busybox"),
                                reason="needs root, Slurm, mksquashfs and busybox")


def _build_plugin() -> Path:
    r = subprocess.run(["make", "-C", str(PLUGIN_DIR)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return PLUGIN_DIR / "spank_oci_image.so"


def _make_image(state: Path) -> Path:
    """A tiny static-busybox rootfs as a squashfs, loop-mounted read-only."""
    rootfs = state / "rootfs"
    for d in ("bin", "usr/bin", "etc", "proc", "dev", "tmp", "mnt", "sys", "work"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox"), rootfs / "bin/busybox")
    for c in ("sh", "cat", "true", "false", "pwd", "env", "printenv", "id", "echo"):
        for d in ("bin", "usr/bin"):
            os.symlink("/bin/busybox", rootfs / d / c)
    (rootfs / "etc/os-release").write_text('PRETTY_NAME="OCI test image"\n' + IMAGE_ID + "\n")
    sqfs = state / "image.sqfs"
    subprocess.run(["mksquashfs", str(rootfs), str(sqfs), "-noappend", "-quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    mnt = state / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(sqfs), str(mnt)], check=True)
    return mnt


class Shim:
    def __init__(self, cluster, fake_dir: Path):
        self.c = cluster
        self.fake = fake_dir
        self.log = fake_dir / "calls.log"
        self.config = fake_dir / "config"
        self.base_config = self.config.read_text()

    def calls(self):
        return [l.split(" ", 2)[1:] for l in self.log.read_text().splitlines() if l.strip()]

    def clear(self):
        self.log.write_text("")

    def set_config(self, extra: str = ""):
        self.config.write_text(self.base_config + extra)

    def srun(self, *args, user=True, cwd=None):
        argv = ["srun"] + list(args)
        if user:
            return self.c.run_as_user(argv, cwd=cwd or "/tmp")
        return self.c.run(argv, cwd=cwd or "/tmp")

    def wait_calls(self, pred, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            calls = self.calls()
            if pred(calls):
                return calls
            time.sleep(0.1)
        return self.calls()


@pytest.fixture(scope="module")
def shim():
    so = _build_plugin()
    holder = {}

    def plugstack(state: Path) -> str:
        fake = state / "fake"
        fake.mkdir()
        shutil.copy(so, state / "spank_oci_image.so")
        shutil.copy(ROOT / "tests/fake_step_client.sh", fake / "step-client")
        os.chmod(fake / "step-client", 0o755)
        mnt = _make_image(state)
        (state / "runtime").mkdir()
        (fake / "config").write_text(f"LOG={fake}/calls.log\nMNT={mnt}\nRUNTIME={state}/runtime\n")
        (fake / "calls.log").write_text("")
        os.chmod(fake / "calls.log", 0o666)
        os.chmod(fake, 0o755)
        holder["fake"] = fake
        return f"required {state}/spank_oci_image.so step_client={fake}/step-client\n"

    c = start_cluster(nodes=3, plugstack_text=plugstack, prefix="oci-shim-")
    try:
        yield Shim(c, holder["fake"])
    finally:
        c.stop(quiet=True)
        ns_dir = c.state_dir / "runtime" / "ns"
        if ns_dir.is_dir():
            for f in ns_dir.iterdir():
                subprocess.run(["umount", str(f)], stderr=subprocess.DEVNULL)
            for _ in range(10):  # stacked bind mounts
                if subprocess.run(["umount", str(ns_dir)], stderr=subprocess.DEVNULL).returncode:
                    break
        subprocess.run(["umount", str(c.state_dir / "mnt")], stderr=subprocess.DEVNULL)
        stop_cluster(c)


def test_help_lists_options(shim):
    r = shim.srun("--help")
    for opt in ("--oci-image=REF", "--oci-mounts", "--oci-workdir", "--oci-writable",
                "--oci-mount-home", "--no-oci-mount-home", "--oci-entrypoint", "--oci-env",
                "--oci-batch-in-image"):
        assert opt in r.stdout, opt


def test_image_on_three_nodes_as_user(shim):
    shim.clear()
    r = shim.srun("-N3", "--oci-image=test/img:1", "cat", "/etc/os-release")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(IMAGE_ID) == 3
    calls = shim.wait_calls(lambda cs: sum(c[1].startswith("release") for c in cs) >= 3)
    submits = [c for c in calls if c[1].startswith("submit")]
    prepares = [c for c in calls if c[1].startswith("prepare")]
    releases = [c for c in calls if c[1].startswith("release")]
    assert submits == [[f"uid={shim.c.uid}", "submit --image test/img:1"]]
    assert len(prepares) == 3 and all(c[0] == "uid=0" for c in prepares)
    nodes = sorted(re.search(r"--node (\S+)", c[1]).group(1) for c in prepares)
    assert nodes == ["n1", "n2", "n3"]
    p = prepares[0][1]
    assert f"--uid {shim.c.uid} --gid {shim.c.gid}" in p
    assert "--image test/img:1@sha256:" + "a" * 64 in p
    assert "--cwd /tmp" in p and "--job-env-fd 3" in p
    # release: once per step per node
    assert len(releases) == 3
    assert sorted(re.search(r"--node (\S+)", c[1]).group(1) for c in releases) == nodes


def test_env_and_workdir_applied(shim):
    r = shim.srun("-N1", "--oci-image=test/img:1", "--oci-workdir=/work", "sh", "-c",
                  'pwd; echo "img=$OCI_FAKE_IMAGE pinned=$OCI_IMAGE_PINNED unset=${OCI_UNSET_ME-none}"',
                  cwd="/tmp")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "/work"
    assert "img=test/img:1@sha256:" in lines[1] and "pinned=test/img:1@sha256:" in lines[1]
    assert lines[1].endswith("unset=none")


def test_cwd_missing_in_image(shim):
    """slurmstepd chdirs after task_init_privileged, inside the image: it warns;
    the shim then applies the step client's cwd in task_init."""
    r = shim.srun("-N1", "--oci-image=test/img:1", "pwd", cwd=shim.c.home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/"
    assert "couldn't chdir to `%s'" % shim.c.home in r.stderr


def test_no_image_never_execs_step_client(shim):
    shim.clear()
    r = shim.srun("-N3", "true")
    assert r.returncode == 0, r.stderr
    r = shim.srun("-N3", "cat", "/etc/os-release")
    assert IMAGE_ID not in r.stdout
    time.sleep(0.5)
    assert shim.calls() == []


def test_prepare_failure_reaches_user(shim):
    shim.set_config('FAIL_PREPARE="disk on fire"\n')
    try:
        shim.clear()
        r = shim.srun("-N2", "--oci-image=test/img:1", "echo", "SHOULD-NOT-RUN")
    finally:
        shim.set_config()
    assert r.returncode != 0
    assert "SHOULD-NOT-RUN" not in r.stdout
    assert "disk on fire" in r.stderr
    # release still runs for a prepare that was attempted
    calls = shim.wait_calls(lambda cs: sum(c[1].startswith("release") for c in cs) >= 2)
    assert sum(c[1].startswith("release") for c in calls) == 2


def test_submit_failure_reaches_user(shim):
    shim.clear()
    r = shim.srun("-N1", "--oci-image=fail-submit/x", "true")
    assert r.returncode != 0
    assert "fake: image fail-submit/x not found in registry" in r.stderr
    assert [c[1].split()[0] for c in shim.calls()] == ["submit"]


def test_env_var_oci_image(shim):
    r = shim.c.run_as_user(["env", "OCI_IMAGE=test/img:1", "srun", "-N1", "cat", "/etc/os-release"],
                           cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert IMAGE_ID in r.stdout


def test_sbatch_image_applies_to_steps_not_script(shim):
    shim.clear()
    home = Path(shim.c.home)
    script = home / "shim-job.sh"
    out = home / "shim-job.out"
    script.write_text("#!/bin/sh\n#SBATCH --oci-image=test/img:2\n#SBATCH -N2\n"
                      "echo \"script: $(grep -c ocitestimage /etc/os-release)\"\n"
                      "srun cat /etc/os-release\n")
    os.chown(script, shim.c.uid, shim.c.gid)
    try:
        r = shim.c.run_as_user(["sbatch", "--wait", "-o", str(out), str(script)], timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        text = out.read_text()
    finally:
        script.unlink()
        out.unlink(missing_ok=True)
    assert "script: 0" in text            # the batch script ran on the host
    assert text.count(IMAGE_ID) == 2      # its srun ran in the image on both nodes
    calls = shim.wait_calls(lambda cs: sum(c[1].startswith("release") for c in cs) >= 2)
    assert sum(c[1].startswith("submit") for c in calls) == 1   # pinned once, at sbatch
    prepares = [c[1] for c in calls if c[1].startswith("prepare")]
    assert len(prepares) == 2 and all("--step 0 " in p for p in prepares)
    assert sorted(re.search(r"--node (\S+)", p).group(1) for p in prepares) == ["n1", "n2"]


def test_bad_plugstack_argument():
    so = _build_plugin()

    def plugstack(state: Path) -> str:
        shutil.copy(so, state / "spank_oci_image.so")
        return f"required {state}/spank_oci_image.so step_client=/bin/true bogus=1\n"

    c = start_cluster(nodes=1, plugstack_text=plugstack, prefix="oci-badps-")
    try:
        r = c.run_as_user(["srun", "-N1", "true"], cwd="/tmp")
        assert r.returncode != 0
        assert 'unknown argument "bogus"' in r.stderr
        assert 'unknown argument "bogus"' in c.node_log("n1").read_text()
    finally:
        stop_cluster(c)
