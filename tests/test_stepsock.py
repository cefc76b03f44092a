"""The step socket (daemon/ociimage/stepsock.py): the per-step path of every job, root only.

A real oci-imaged, a real registry, real step namespaces; the attacks run as an
ordinary user.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from daemon_proc import BIN, DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from localsite import unmount_under
from ocibuild import Pusher
from stepclient import options, plugstack, run_step
from test_security import ensure_user

from ociimage import errors
from ociimage.stepsock import MAX_STEP_REQUEST, call, step_socket_path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon needs root")

USER = "ocitest"
#: the attacker's interpreter: the system's (this checkout's venv may be out of their reach)
USER_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def site(registry):
    # under /tmp, not pytest's 0700 directories: the attacker must reach the socket's door
    base = Path(tempfile.mkdtemp(prefix="oci-stepsock-", dir="/tmp"))
    os.chmod(base, 0o755)
    d = DaemonProcess(base / "d", base / "cache").start()
    pushed = Pusher(registry.url).image("step/img", "v1", busybox_layers(os_id="stepsock"),
                                        config=IMAGE_CONFIG)
    ref = f"{registry.host}/step/img:v1@{pushed.manifest_digest}"
    yield d, ref
    d.stop()
    unmount_under(base)
    shutil.rmtree(base, ignore_errors=True)


def _request(user: pwd.struct_passwd, job: str, step: str, image: str) -> dict:
    return {"job_id": job, "step_id": step, "uid": user.pw_uid, "gid": user.pw_gid,
            "image": image, "cwd": "/tmp", "mount_home": False, "node": "n1",
            "home": user.pw_dir, "user_name": user.pw_name}


def _as_user(code: str, path: str):
    """Run python code as the test user with the step socket's path as argv[1]."""
    ensure_user(USER)
    return subprocess.run(["runuser", "-u", USER, "--", USER_PYTHON, "-c", code, path],
                          capture_output=True, text=True, timeout=60)


def test_prepare_and_release_through_the_step_socket(site):
    d, ref = site
    user = ensure_user(USER)
    path = step_socket_path(d.socket)
    assert Path(path).stat().st_mode & 0o777 == 0o600 and Path(path).stat().st_uid == 0
    phases = []
    reply = call(path, {"op": "prepare", "step": _request(user, "71", "0", ref)},
                 lambda ev: phases.append(ev.phase))
    c = reply["container"]
    assert c["digest"] == ref.rsplit("@", 1)[1]
    assert c["ns_path"] == f"/proc/{c['holder_pid']}/ns/mnt"
    assert os.stat(c["ns_path"]).st_ino == int(c["ns_inode"])
    assert phases[-1] == "mount" and "download" in phases  # a first pull, then the mount
    # the image's Env reaches the step's records
    assert any(kv.startswith("PATH=") for kv in c["set_env"])
    assert call(path, {"op": "release", "job": "71", "step": "0"}) == {"state": "released"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{c['holder_pid']}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{c['holder_pid']}"), "the namespace's holder outlived release"


def test_an_ordinary_user_cannot_reach_the_step_socket(site):
    d, _ref = site
    r = _as_user("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('EACCES')\n",
                 step_socket_path(d.socket))
    assert r.stdout.strip() == "EACCES", (r.stdout, r.stderr)


def test_a_socket_made_world_writable_still_serves_root_only(site):
    """Defence in depth: if the socket's mode were ever wider (an admin's chmod), the
    daemon still refuses every caller but root before reading a byte."""
    d, ref = site
    user = ensure_user(USER)
    path = step_socket_path(d.socket)
    msg = json.dumps({"op": "prepare", "step": _request(user, "72", "0", ref)})
    os.chmod(path, 0o666)
    try:
        r = subprocess.run(["runuser", "-u", USER, "--", USER_PYTHON, "-c",
                            "import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                            "s.settimeout(20)\ns.connect(sys.argv[1])\nprint('connected')\n"
                            "try:\n    s.sendall(sys.argv[2].encode() + b'\\n')\n"
                            "    print(repr(s.recv(65536)))\n"
                            "except (BrokenPipeError, ConnectionResetError):\n"
                            "    print('closed')\n", path, msg],
                           capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(path, 0o600)
    # it connected, and the answer was a close without a byte
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() in (["connected", "closed"], ["connected", "b''"]), r.stdout
    assert "refused a caller on a root-only socket" in d.log()
    assert not (d.runtime_dir / "steps" / "72.0").exists()
    assert call(path, {"op": "release-job", "job": "72"}) == {"state": "released", "steps": 0,
                                                               "leases": 0}


def test_malformed_requests_get_one_line_and_the_daemon_stays(site):
    d, ref = site
    path = step_socket_path(d.socket)
    with pytest.raises(errors.InvalidArgument, match="not a PrepareStepRequest"):
        call(path, {"op": "prepare", "step": {"job_id": "1", "no_such_field": 1}})
    with pytest.raises(errors.InvalidArgument, match="unknown op"):
        call(path, {"op": "format-disk", "job": "1"})
    with pytest.raises(errors.InvalidArgument, match="invalid job/step id"):
        call(path, {"op": "release", "job": "../../etc", "step": "0"})
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    try:
        s.sendall(b"x" * (MAX_STEP_REQUEST + 2))
    except OSError:
        pass  # the daemon may close before taking all of it
    reply = s.recv(65536)
    s.close()
    assert json.loads(reply) == {"error": f"request larger than {MAX_STEP_REQUEST} bytes",
                                 "code": "INVALID_ARGUMENT"}
    user = ensure_user(USER)
    c = call(path, {"op": "prepare", "step": _request(user, "73", "0", ref)})["container"]
    assert c["ns_path"]
    call(path, {"op": "release", "job": "73", "step": "0"})


def test_the_step_client_imports_no_grpc_protobuf_or_registry_code(site):
    """The per-step start-up: prepare and release are the step client's whole per-step work."""
    d, ref = site
    user = ensure_user(USER)
    step = str(BIN / "oci-image-step")
    base = [sys.executable, "-X", "importtime", step]
    ids = ["--job", "74", "--step", "0", "--uid", str(user.pw_uid), "--gid", str(user.pw_gid),
           "--node-id", "1", *plugstack(f"step_client={step}", f"socket={d.socket}")]
    # the step's second node (n1): only the first shows progress
    job_env = {"SLURM_STEP_NODELIST": "n[0-1]", "OCI_SUBMIT_CWD": "/tmp"}
    r = run_step(base + ["prepare", *ids, *options(oci_image=ref)], job_env=job_env, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.fd is not None  # the step's namespace
    try:
        assert os.readlink(f"/proc/self/fd/{r.fd}").startswith("mnt:[")
    finally:
        os.close(r.fd)
    # the tasks' directory: /tmp is not in the image, so the image's WorkingDir
    assert r.values("cwd") == [IMAGE_CONFIG["WorkingDir"]]
    rel = run_step(base + ["release", *ids], job_env=job_env, timeout=60)
    assert rel.returncode == 0, rel.stderr[-2000:]
    for out in (r.stderr, rel.stderr):
        imported = {line.split("|")[-1].strip() for line in out.splitlines()
                    if line.startswith("import time:")}
        assert "ociimage.stepsock" in imported          # the log is the one we think
        heavy = {m for m in imported
                 if m.split(".")[0] in ("grpc", "google", "requests", "urllib3")
                 or m.startswith(("ociimage.registry", "ociimage.flatten", "ociimage.v1"))}
        assert heavy == set()
