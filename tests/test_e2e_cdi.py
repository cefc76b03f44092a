"""CDI devices end to end (`--oci-devices`, `[daemon] gpu_cdi_kind`): on a real 2-node
cluster with the real plugin, step client and daemons, srun as the test user.

The site's CDI specs are written here (root's, 0644) into a spec directory the daemons'
config names. Their device nodes are copies of /dev/null (1:3) and /dev/zero (1:5)
whose container paths (/dev/oci-test/...) do not exist on the host: the step's /dev
must get them without anything being created in the host's /dev. Slurm's gres/gpu
plugin is given two fake GPUs (gres.conf File= character devices made here), so that
`--gres=gpu:1` shows the GPU mapping.
"""

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from cluster_fixture import cluster_available
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import start_site, stop_site

KIND = "test.example/dev"
GPU_KIND = "test.example/gpu"


def _host_dev_tree():
    out = {}
    for d, dirs, files in os.walk("/dev", followlinks=False):
        for n in dirs + files:
            p = os.path.join(d, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out[p] = (stat.S_IFMT(st.st_mode), st.st_rdev)
        # the submounts' contents (pts come and go with every terminal) are not /dev's
        dirs[:] = [x for x in dirs if not os.path.ismount(os.path.join(d, x))]
    return out


def _root_file(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def _specs(base: Path, user_uid: int) -> str:
    devs = base / "devs"
    devs.mkdir(mode=0o755)
    for name, minor in (("null0", 3), ("zero0", 5), ("gpu0", 3), ("gpu1", 5)):
        os.mknod(devs / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    data = base / "cdi-data"
    data.mkdir(mode=0o755)
    _root_file(data / "hello", "hello from a CDI mount\n")
    hookout = base / "hookout"
    hookout.mkdir(mode=0o700)
    spec_dir = base / "cdi"
    spec_dir.mkdir(mode=0o755)
    dev_spec = {
        "cdiVersion": "0.6.0", "kind": KIND,
        "devices": [
            {"name": "a", "containerEdits": {
                "deviceNodes": [
                    {"path": "/dev/oci-test/null0", "hostPath": str(devs / "null0"),
                     "type": "c", "major": 1, "minor": 3, "fileMode": 0o666},
                    {"path": "/dev/oci-test/zero0", "hostPath": str(devs / "zero0"),
                     "type": "c", "major": 1, "minor": 5, "fileMode": 0o644}],
                "mounts": [{"hostPath": str(data), "containerPath": "/opt/cdi-data",
                            "options": ["ro", "nosuid", "nodev", "bind"]}],
                "env": ["OCI_TEST_CDI=device-a"]}},
            {"name": "hooked", "containerEdits": {
                "env": ["OCI_TEST_HOOKED=1"],
                "hooks": [{"hookName": "createContainer", "path": "/bin/sh",
                           "args": ["sh", "-c",
                                    # the state on stdin, the bundle's root, the hook's env
                                    f'cat > {hookout}/state.json && '
                                    f'env > {hookout}/env && '
                                    f'cp "$(sed -n \'s/.*"bundle": "\\([^"]*\\)".*/\\1/p\' '
                                    f'{hookout}/state.json)/config.json" {hookout}/config.json && '
                                    # the container's root, through the pid it was given
                                    f'ls "/proc/$(sed -n \'s/.*"pid": \\([0-9]*\\).*/\\1/p\' '
                                    f'{hookout}/state.json)/root/opt/app" > {hookout}/rootls'],
                           "env": ["HOOK_SAYS=hi"]}]}},
            {"name": "broken", "containerEdits": {
                "env": ["OCI_TEST_BROKEN=1"],
                "hooks": [{"hookName": "createRuntime", "path": "/bin/sh",
                           "args": ["sh", "-c", "echo the device is not ready >&2; exit 3"]}]}},
        ]}
    _root_file(spec_dir / "test.json", json.dumps(dev_spec))
    gpu_spec = {"cdiVersion": "0.6.0", "kind": GPU_KIND, "devices": [
        {"name": str(i), "containerEdits": {"deviceNodes": [
            {"path": f"/dev/oci-test/gpu{i}", "type": "c", "major": 1, "minor": 3 + 2 * i}],
            "env": [f"OCI_TEST_GPU{i}=yes"]}} for i in (0, 1)]}
    _root_file(spec_dir / "gpu.json", json.dumps(gpu_spec))
    # a user's file in the root-owned directory: refused (it would have root bind /etc)
    user_spec = {"cdiVersion": "0.6.0", "kind": "test.example/user", "devices": [
        {"name": "x", "containerEdits": {"mounts": [
            {"hostPath": "/etc", "containerPath": "/hostetc", "options": ["bind"]}]}}]}
    (spec_dir / "user.json").write_text(json.dumps(user_spec))
    os.chown(spec_dir / "user.json", user_uid, 0)
    os.chmod(spec_dir / "user.json", 0o644)
    # root's, but writable by anyone: refused
    user_spec["kind"] = "test.example/ww"
    _root_file(spec_dir / "ww.json", json.dumps(user_spec), mode=0o666)
    # a user's directory among the spec dirs: refused whole, whoever owns its files
    udir = base / "usercdi"
    udir.mkdir(mode=0o755)
    user_spec["kind"] = "test.example/udir"
    _root_file(udir / "u.json", json.dumps(user_spec))
    os.chown(udir, user_uid, 0)
    return (f"[daemon]\nmount_idle = 1\ncdi_spec_dirs = {spec_dir} {udir}\n"
            f"gpu_cdi_kind = {GPU_KIND}\n[cache]\nlease_ttl = 60\n")


@pytest.fixture(scope="module")
def e2e(registry, installed):  # noqa: F811
    if cluster_available() is not None:
        pytest.skip(str(cluster_available()))
    import tempfile
    from images import IMAGE_CONFIG, busybox_layers
    from localcluster import DEFAULT_USER, ensure_user
    from ocibuild import Pusher

    dev_before = _host_dev_tree()
    pw = ensure_user(DEFAULT_USER)
    base = Path(tempfile.mkdtemp(prefix="oci-e2e-cdi-specs-", dir="/tmp"))
    os.chmod(base, 0o755)
    daemon_conf = _specs(base, pw.pw_uid)
    gres = f"NodeName=n[1-2] Name=gpu File={base}/devs/gpu[0-1]\n"
    site = start_site(installed, "oci-e2e-cdi-", nodes=2, daemon_conf=daemon_conf,
                      cluster_kw={"extra_conf": ["GresTypes=gpu"], "node_conf": "Gres=gpu:2",
                                  "gres_conf": gres})
    try:
        pusher = Pusher(registry.url)
        pusher.image("e2e-cdi/busybox", "v1", busybox_layers(), config=IMAGE_CONFIG)
        ref = f"{registry.host}/e2e-cdi/busybox:v1"

        def srun(*args, env=None):
            argv = ["srun", *args]
            if env:
                argv = ["env", *[f"{k}={v}" for k, v in env.items()], *argv]
            return site.cluster.run_as_user(argv, cwd="/tmp", timeout=90)

        yield site, srun, ref, base, dev_before, installed
    finally:
        stop_site(site)
        import shutil
        shutil.rmtree(base, ignore_errors=True)


def _one_line(stderr: str) -> str:
    """Our one line (Slurm adds its own: srun's exit status, slurmstepd's plugin failure)."""
    lines = [l for l in stderr.splitlines() if "oci-image: error:" in l]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


ZERO4 = hashlib.sha256(b"\0" * 4).hexdigest()


def test_device_nodes_mounts_and_env_arrive(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    script = ("stat -c '%n %F %t:%T %a %u' /dev/oci-test/null0 /dev/oci-test/zero0; "
              "echo written > /dev/oci-test/null0 && echo write-ok; "
              "head -c 4 /dev/oci-test/zero0 | sha256sum; "
              "cat /opt/cdi-data/hello; echo env=$OCI_TEST_CDI; "
              "touch /opt/cdi-data/new 2>/dev/null || echo mount-ro; "
              "ls /dev/pts/ptmx /dev/shm >/dev/null && echo submounts-ok")
    r = srun("-N2", f"--oci-image={ref}", "--oci-devices=test.example/dev=a", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    want = ["/dev/oci-test/null0 character special file 1:3 666 0",
            "/dev/oci-test/zero0 character special file 1:5 644 0",
            "write-ok", f"{ZERO4}  -", "hello from a CDI mount", "env=device-a", "mount-ro",
            "submounts-ok"]
    assert sorted(r.stdout.splitlines()) == sorted(want * 2), r.stdout  # 2 tasks interleave
    assert not os.path.lexists("/dev/oci-test")
    assert not os.path.exists(base / "cdi-data" / "new")


def test_the_variable_sets_the_devices_too(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", f"--oci-image={ref}", "sh", "-c", "ls /dev/oci-test; echo env=$OCI_TEST_CDI",
             env={"OCI_DEVICES": "test.example/dev=a"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["null0", "zero0", "env=device-a"], r.stdout


def test_without_the_option_nothing_is_injected(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", f"--oci-image={ref}", "sh", "-c",
             "ls /dev/oci-test 2>/dev/null || echo no-nodes; "
             "ls /opt/cdi-data 2>/dev/null || echo no-mount; echo env=${OCI_TEST_CDI-unset}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["no-nodes", "no-mount", "env=unset"], r.stdout


def test_bad_syntax_is_refused_at_submit(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", f"--oci-image={ref}", "--oci-devices=foo", "true")
    assert r.returncode != 0
    line = _one_line(r.stderr)
    assert '--oci-devices: "foo" is not a qualified CDI device name (vendor/class=name)' in line
    assert "Traceback" not in r.stderr


def test_unknown_device_is_one_line_naming_device_node_and_dirs(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", "-w", "n2", f"--oci-image={ref}", "--oci-devices=test.example/dev=nope",
             "true")
    assert r.returncode != 0
    line = _one_line(r.stderr)
    assert "test.example/dev=nope" in line and "node n2" in line and f"{base}/cdi" in line, line
    assert "Traceback" not in r.stderr


def test_a_users_spec_file_is_refused(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", f"--oci-image={ref}", "--oci-devices=test.example/user=x",
             "ls", "/hostetc")
    assert r.returncode != 0
    line = _one_line(r.stderr)
    assert "no CDI spec" in line and "test.example/user=x" in line, line
    assert f"{base}/cdi/user.json" in line and "not root" in line, line


def test_a_spec_file_anyone_may_write_is_refused(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    assert stat.S_IMODE(os.stat(base / "cdi" / "ww.json").st_mode) == 0o666
    r = srun("-N1", f"--oci-image={ref}", "--oci-devices=test.example/ww=x", "ls", "/hostetc")
    assert r.returncode != 0
    line = _one_line(r.stderr)
    assert "no CDI spec" in line and "test.example/ww=x" in line, line


def test_a_users_spec_directory_is_refused(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", f"--oci-image={ref}", "--oci-devices=test.example/udir=x",
             "ls", "/hostetc")
    assert r.returncode != 0
    line = _one_line(r.stderr)
    assert "no CDI spec" in line and "test.example/udir=x" in line, line


def test_a_failing_cdi_hook_fails_the_step_with_one_line(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", f"--oci-image={ref}", "--oci-devices=test.example/dev=broken",
             "echo", "never")
    assert r.returncode != 0 and "never" not in r.stdout
    line = _one_line(r.stderr)
    assert "CDI hook createRuntime sh: the device is not ready" in line, line


def test_cdi_hooks_are_refused_in_a_named_container(e2e):
    """A named container's root is the job's to change while another of its steps runs:
    root's hooks must not write there (the devices without hooks are fine)."""
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", f"--oci-image={ref}", "--oci-devices=test.example/dev=hooked",
             "--oci-name=c", "echo", "never")
    assert r.returncode != 0 and "never" not in r.stdout
    line = _one_line(r.stderr)
    assert ("--oci-devices: test.example/dev=hooked: the site's CDI spec runs hooks, which "
            "cannot run in a named container (--oci-name)") in line, line
    r = srun("-N1", f"--oci-image={ref}", "--oci-devices=test.example/dev=a", "--oci-name=c",
             "sh", "-c", "test -c /dev/oci-test/null0 && echo node")
    assert r.returncode == 0 and r.stdout == "node\n", r.stderr


def test_cdi_hook_gets_state_and_bundle(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", f"--oci-image={ref}", "--oci-devices=test.example/dev=hooked",
             "sh", "-c", "echo env=$OCI_TEST_HOOKED")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "env=1\n"
    state = json.loads((base / "hookout" / "state.json").read_text())
    config = json.loads((base / "hookout" / "config.json").read_text())
    assert state["status"] == "creating" and state["id"].endswith(".0"), state
    assert config["root"] == {"path": f"/proc/{state['pid']}/root", "readonly": True}, config
    assert "OCI_TEST_HOOKED=1" in config["process"]["env"]
    assert "hello.sh" in (base / "hookout" / "rootls").read_text().split()
    env = dict(l.split("=", 1) for l in (base / "hookout" / "env").read_text().splitlines()
               if "=" in l)
    # exactly the spec's environment (sh adds PWD and the like, never the job's)
    assert env["HOOK_SAYS"] == "hi"
    assert not any(k.startswith("SLURM_") or k == "HOME" for k in env), env


def test_slurm_gpus_become_cdi_devices(e2e):
    site, srun, ref, base, _dev, _inst = e2e
    r = srun("-N1", "--gres=gpu:1", f"--oci-image={ref}", "sh", "-c",
             "echo gpus=$SLURM_STEP_GPUS; ls /dev/oci-test; env | grep ^OCI_TEST_GPU")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("gpus="), lines
    index = lines[0][len("gpus="):]
    assert index in ("0", "1"), lines
    assert lines[1:] == [f"gpu{index}", f"OCI_TEST_GPU{index}=yes"], lines
    r = srun("-N1", "--gres=gpu:2", f"--oci-image={ref}", "ls", "/dev/oci-test")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["gpu0", "gpu1"]
    r = srun("-N1", f"--oci-image={ref}", "sh", "-c", "ls /dev/oci-test 2>/dev/null || echo none")
    assert r.returncode == 0 and r.stdout == "none\n", (r.stdout, r.stderr)


def test_oci_image_devices_lists_the_nodes_devices(e2e):
    site, srun, ref, base, _dev, inst = e2e
    argv = [str(inst.bin / "oci-image"), "--config", str(site.conf), "devices"]
    r = site.cluster.run_as_user(argv + ["--json"], cwd="/tmp", timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [d["name"] for d in doc["devices"]] == [
        "test.example/dev=a", "test.example/dev=broken", "test.example/dev=hooked",
        "test.example/gpu=0", "test.example/gpu=1"]
    a = doc["devices"][0]
    assert a["device_nodes"] == ["/dev/oci-test/null0", "/dev/oci-test/zero0"]
    assert a["mounts"] == ["/opt/cdi-data"] and a["env"] == ["OCI_TEST_CDI=device-a"]
    assert any("user.json" in e and "not root" in e for e in doc["errors"]), doc["errors"]
    assert any("usercdi" in e for e in doc["errors"]), doc["errors"]
    r = site.cluster.run_as_user(argv, cwd="/tmp", timeout=60)
    assert r.returncode == 0 and "test.example/gpu=1" in r.stdout, r.stderr


def test_zz_host_dev_is_unchanged(e2e):
    _site, _srun, _ref, _base, dev_before, _inst = e2e
    after = _host_dev_tree()
    assert not os.path.lexists("/dev/oci-test")
    # loop devices come and go with every image mount on this machine, the tests' or not
    new = {p for p in set(after) - set(dev_before) if not re.fullmatch(r"/dev/loop[0-9]+", p)}
    assert new == set(), sorted(new)
