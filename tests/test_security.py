"""Security properties, each tested end to end (real registry, real daemons, real Slurm).

Already proven elsewhere, and cited in docs/reliability.md rather than repeated:
the socket is 0600 and refuses an ordinary user (test_daemon.test_socket_is_root_only),
the image root is ro,nosuid,nodev (test_runtime_namespaces), an untrusted SquashFS is
never kernel-mounted (test_monolithic.test_daemon_runs_monolithic_image_and_never_mounts_untrusted),
credentials stay out of CLI errors (test_pull.test_unauthorized_never_prints_credentials,
test_registry_auth) and docker-credential helpers are never run as root (test_credentials).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from cluster_fixture import cluster_available
from daemon_proc import BIN, DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import start_site, stop_site, unmount_under
from ocibuild import Entry, Pusher
from registry_server import RegistryServer
from stepclient import options, plugstack, run_step
from token_issuer import TokenIssuer

from ociimage.access import AccessChecker
from ociimage.cache import CacheEntry
from ociimage.errors import AccessDenied, OciImageError
from ociimage.registry.client import RegistryClient
from ociimage.registry.credentials import Credentials, StaticCredentials

ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_cluster = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))

ALICE_PW = "al1ce-S3cret-pw:with/colon"
BOB_PW = "b0b-An0ther-S3cret"
PRIV_USER = "ocipriv"     # has alice's login in ~/.docker/config.json
OTHER_USER = "ociother"   # has bob's login: valid credentials, no grant on the private repo


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def docker_login(user: str, host: str, username: str, password: str) -> Path:
    pw = ensure_user(user)
    d = Path(pw.pw_dir) / ".docker"
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "config.json"
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    cfg.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    for p in (d, cfg):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(cfg, 0o600)
    return cfg


def euid_binary(tmp: Path) -> bytes:
    """A static program printing its effective uid (busybox drops setuid itself: useless here)."""
    src = tmp / "euid.c"
    src.write_text('#include <stdio.h>\n#include <unistd.h>\n'
                   'int main(void){printf("euid=%d\\n",(int)geteuid());return 0;}\n')
    out = tmp / "euid"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(src)], check=True,
                   capture_output=True)
    return out.read_bytes()


def hostile_security_layer(euid: bytes):
    return [Entry("opt/sec/", "dir", mode=0o755),
            Entry("opt/sec/euid", data=euid, mode=0o4755),                 # setuid root
            Entry("opt/sec/null", "char", mode=0o666, devmajor=1, devminor=3),  # /dev/null's numbers
            Entry("opt/sec/sda", "block", mode=0o666, devmajor=8, devminor=0)]


# ---- private images: the registry confirms each user's access --------------------------

@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("sec-token")
    issuer = TokenIssuer(d / "issuer", {"alice": ALICE_PW, "bob": BOB_PW},
                         {"alice": {"priv/*": ["pull", "push"]}, "bob": {"bob/*": ["pull"]},
                          "": {"public/*": ["pull"]}})
    with issuer:
        with RegistryServer(d / "reg", auth=issuer.registry_auth()) as reg:
            p = Pusher(reg.url)
            p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
                {"type": "repository", "name": n, "actions": ["pull", "push"]}
                for n in ("priv/app", "public/app")])
            priv = p.image("priv/app", "v1", busybox_layers(os_id="private"), config=IMAGE_CONFIG)
            pub = p.image("public/app", "v1", busybox_layers(os_id="public"), config=IMAGE_CONFIG)
            yield issuer, reg, priv, pub


def _entry(reg, repo, img) -> CacheEntry:
    ref = f"{reg.host}/{repo}:v1@{img.manifest_digest}"
    return CacheEntry(img.manifest_digest, Path("/nonexistent.sqfs"), {"reference": ref}, 0, 0.0)


def test_access_checker_asks_the_registry_as_the_user(token_registry):
    issuer, reg, priv, pub = token_registry
    creds = {1001: StaticCredentials({reg.host: Credentials("alice", ALICE_PW)}),
             1002: StaticCredentials({reg.host: Credentials("bob", BOB_PW)}),
             1003: None}
    now = [0.0]
    checker = AccessChecker(lambda uid: RegistryClient(credentials=creds.get(uid), backoff=0.01),
                            ttl=60, negative_ttl=10, clock=lambda: now[0])
    private, public = _entry(reg, "priv/app", priv), _entry(reg, "public/app", pub)
    checker.check(private, 1001)                     # alice may
    for uid in (1002, 1003):                         # bob (valid login, no grant), anonymous
        with pytest.raises(AccessDenied) as e:
            checker.check(private, uid)
        msg = str(e.value)
        # which image, by digest; not the repository (a digest is public, its source not)
        assert "private image" in msg and priv.manifest_digest[7:19] in msg, msg
        assert "priv/app" not in msg and reg.host not in msg, msg
        assert ALICE_PW not in msg and BOB_PW not in msg
    for uid in (1001, 1002, 1003, None, 0):          # public: anyone; root never asks
        checker.check(public, uid)
    checker.check(private, 0)
    checker.check(private, None)
    # answers are cached for their TTL: repeating costs no registry request ...
    n = checker.requests
    for _ in range(20):
        checker.check(private, 1001)
        checker.check(public, 1003)
        with pytest.raises(AccessDenied):
            checker.check(private, 1002)
    assert checker.requests == n
    # ... and a revoked grant stops working once the TTL has passed
    issuer.grants["alice"] = {}
    checker.check(private, 1001)
    now[0] += 61
    with pytest.raises(AccessDenied):
        checker.check(private, 1001)
    issuer.grants["alice"] = {"priv/*": ["pull", "push"]}


def test_access_checker_fails_closed_when_the_registry_is_down(token_registry):
    issuer, reg, priv, _ = token_registry
    dead = f"127.0.0.1:{_free_port()}"
    entry = CacheEntry(priv.manifest_digest, Path("/x"),
                       {"reference": f"{dead}/priv/app:v1@{priv.manifest_digest}"}, 0, 0.0)
    checker = AccessChecker(lambda uid: RegistryClient(retries=0, timeout=2))
    with pytest.raises(AccessDenied) as e:
        checker.check(entry, 1001)
    msg = str(e.value)
    assert "cannot confirm" in msg and "cannot be reached" in msg, msg
    assert priv.manifest_digest[7:19] in msg and dead not in msg, msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(daemon, image, job, uid, gid, user=""):
    from ociimage.client import DaemonClient
    from ociimage.v1 import ociimage_pb2 as pb
    req = pb.PrepareStepRequest(job_id=job, step_id="0", uid=uid, gid=gid, image=image, cwd="/",
                                mount_home=False, user_name=user or f"u{uid}", home="/",
                                node=daemon.node)
    c = DaemonClient(str(daemon.socket))
    try:
        return c.prepare_step(req)
    finally:
        c.close()


def _release(daemon, job):
    from ociimage.client import DaemonClient
    DaemonClient(str(daemon.socket)).release_step(job, "0")


@pytest.fixture
def token_daemon(tmp_path, token_registry):
    base = tmp_path / "d"
    base.mkdir()
    d = DaemonProcess(base, tmp_path / "cache", extra=["--log-level", "debug"]).start()
    yield d
    d.stop()
    unmount_under(base)


@needs_root
def test_cached_private_image_is_not_served_to_a_user_without_access(token_registry, token_daemon):
    _, reg, priv, _ = token_registry
    a = ensure_user(PRIV_USER)
    b = ensure_user(OTHER_USER)
    docker_login(PRIV_USER, reg.host, "alice", ALICE_PW)
    docker_login(OTHER_USER, reg.host, "bob", BOB_PW)
    pinned = f"{reg.host}/priv/app:v1@{priv.manifest_digest}"
    # bob cannot pull it himself ...
    with pytest.raises(OciImageError):
        _prepare(token_daemon, pinned, "901", b.pw_uid, b.pw_gid)
    # ... alice can, and then it is in the shared cache
    c = _prepare(token_daemon, pinned, "902", a.pw_uid, a.pw_gid)
    assert c.digest == priv.manifest_digest
    _release(token_daemon, "902")
    # bob, and a user with no login at all, must still be refused: the registry says no
    for uid, gid, job in ((b.pw_uid, b.pw_gid, "903"), (65534, 65534, "904")):
        with pytest.raises(AccessDenied):
            try:
                _prepare(token_daemon, pinned, job, uid, gid)
            finally:
                try:
                    _release(token_daemon, job)
                except OciImageError:
                    pass


@needs_root
def test_credentials_never_leak(token_registry, token_daemon, tmp_path):
    """Daemon log at debug level, metrics, errors, step client and daemon child process
    arguments and environments, cache metadata: none holds a password or an auth string."""
    issuer, reg, priv, _ = token_registry
    a = ensure_user(PRIV_USER)
    b = ensure_user(OTHER_USER)
    docker_login(PRIV_USER, reg.host, "alice", ALICE_PW)
    docker_login(OTHER_USER, reg.host, "bob", "wrong-" + BOB_PW)
    p = Pusher(reg.url)
    p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
        {"type": "repository", "name": "priv/big", "actions": ["pull", "push"]}])
    big = p.image("priv/big", "v1", busybox_layers(os_id="big", extra_mb=24))
    secrets = [ALICE_PW, BOB_PW, base64.b64encode(f"alice:{ALICE_PW}".encode()).decode(),
               base64.b64encode(f"bob:wrong-{BOB_PW}".encode()).decode()]
    seen, stop = [], threading.Event()

    def snoop():  # every process's argv and environment while the pull runs
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    for f in ("cmdline", "environ"):
                        try:
                            seen.append(Path(f"/proc/{pid}/{f}").read_bytes())
                        except OSError:
                            pass
            time.sleep(0.05)

    t = threading.Thread(target=snoop)
    t.start()
    client = str(BIN / "oci-image-step")
    step = run_step(
        [sys.executable, "-m", "ociimage.step", "prepare", "--job", "911", "--step", "0",
         "--uid", str(a.pw_uid), "--gid", str(a.pw_gid), "--node-id", "0",
         *plugstack(f"step_client={client}", f"socket={token_daemon.socket}"),
         *options(oci_image=f"{reg.host}/priv/big:v1@{big.manifest_digest}",
                  no_oci_mount_home="")],
        job_env={"SLURM_STEP_NODELIST": "n1"}, timeout=120, cwd=str(ROOT / "daemon"))
    stop.set()
    t.join()
    assert step.returncode == 0, step.stderr
    assert step.fd is not None  # the step's namespace: the prepare went through
    os.close(step.fd)
    records = "\n".join(f"{k}={v}" for k, v in step.records).encode()
    _release(token_daemon, "911")
    with pytest.raises(OciImageError) as e:      # wrong password: the error names no secret
        _prepare(token_daemon, f"{reg.host}/priv/big:v1", "912", b.pw_uid, b.pw_gid)
    texts = {"error": str(e.value).encode(), "step stderr": step.stderr.encode(),
             "step stdout": step.stdout.encode(), "step records": records,
             "daemon log": token_daemon.log().encode(),
             "metrics": requests.get(f"http://127.0.0.1:{token_daemon.metrics_port}/metrics").content,
             "processes": b"\n".join(seen)}
    for meta in (token_daemon.cache_dir / "images").glob("*.json"):
        texts[str(meta)] = meta.read_bytes()
    assert len(seen) > 100
    for name, blob in texts.items():
        for s in secrets:
            assert s.encode() not in blob, f"{name} contains a credential"
    assert b"Bearer " not in texts["daemon log"]


# ---- on the real cluster -----------------------------------------------------------------

class SecEnv:
    def __init__(self, base, cluster, daemons, registry, installed):
        self.base, self.cluster, self.daemons, self.registry = base, cluster, daemons, registry
        self.installed = installed
        self.cache = base / "cache"
        self.pusher = Pusher(registry.url)

    def srun(self, *args, timeout=120, as_root=False):
        if as_root:
            return subprocess.run(["srun", *args], capture_output=True, text=True, timeout=timeout,
                                  env=self.cluster.env(), cwd="/tmp")
        return self.cluster.run_as_user(["srun", *args], cwd="/tmp", timeout=timeout)

    def loops(self):
        out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        return [l for l in out.splitlines() if str(self.base) in l]


@pytest.fixture(scope="session")
def sec_cluster(registry, installed, tmp_path_factory):
    """3 daemons + 3-node Slurm, plugin loaded with the default allow_sqfs=no."""
    if cluster_available():
        pytest.skip(cluster_available())
    site = start_site(installed, "oci-sec-", nodes=3)
    try:
        yield SecEnv(site.base, site.cluster, site.daemons, registry, installed)
    finally:
        stop_site(site)


@pytest.fixture(scope="module")
def sec_image(sec_cluster, tmp_path_factory):
    euid = euid_binary(tmp_path_factory.mktemp("euid"))
    layers = busybox_layers(os_id="sec") + [hostile_security_layer(euid)]
    img = sec_cluster.pusher.image("sec/app", "v1", layers, config=IMAGE_CONFIG)
    return f"{sec_cluster.registry.host}/sec/app:v1", img, euid


@needs_cluster
def test_tasks_run_as_the_job_user(sec_cluster, sec_image):
    ref, _, _ = sec_image
    uid = sec_cluster.cluster.uid
    r = sec_cluster.srun("-N3", f"--oci-image={ref}", "sh", "-c", "id -u; id -g")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(uid), str(sec_cluster.cluster.gid)] * 3
    # only a job of root's runs as root
    r = sec_cluster.srun("-N1", f"--oci-image={ref}", "id", "-u", as_root=True)
    assert r.returncode == 0 and r.stdout.split() == ["0"], r.stderr


@needs_cluster
def test_setuid_binary_in_image_gains_nothing(sec_cluster, sec_image, tmp_path):
    ref, _, euid = sec_image
    # control: the same setuid-root program outside the container really is setuid
    ctl = Path(tempfile.mkdtemp(prefix="oci-sec-ctl-", dir="/tmp"))
    try:
        os.chmod(ctl, 0o755)
        (ctl / "euid").write_bytes(euid)
        os.chmod(ctl / "euid", 0o4755)
        r = sec_cluster.cluster.run_as_user([str(ctl / "euid")], cwd="/tmp")
        assert r.stdout.strip() == "euid=0", "control failed: /tmp is nosuid?"
    finally:
        shutil.rmtree(ctl)
    r = sec_cluster.srun("-N2", f"--oci-image={ref}", "sh", "-c",
                         "ls -ln /opt/sec/euid; /opt/sec/euid")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("-rwsr-xr-x") == 2              # the bit is in the image ...
    assert r.stdout.count(f"euid={sec_cluster.cluster.uid}") == 2  # ... and grants nothing
    assert "euid=0" not in r.stdout


@needs_cluster
def test_device_nodes_in_image_are_unusable(sec_cluster, sec_image):
    ref, _, _ = sec_image
    r = sec_cluster.srun("-N1", f"--oci-image={ref}", "sh", "-c",
                         "ls -ln /opt/sec/null; cat /opt/sec/null; echo rc=$?; "
                         "echo x > /opt/sec/null; echo rc=$?; head -c1 /opt/sec/sda; echo rc=$?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("crw-rw-rw-") and "1,   3" in r.stdout.splitlines()[0]
    assert r.stdout.count("rc=1") == 3 and "rc=0" not in r.stdout
    # EACCES from nodev, for reading and writing alike
    assert r.stderr.count("Permission denied") == 3, r.stderr
    # even root in the container cannot open them
    r = sec_cluster.srun("-N1", f"--oci-image={ref}", "sh", "-c",
                         "cat /opt/sec/null && echo OPENED; head -c1 /opt/sec/sda && echo OPENED",
                         as_root=True)
    assert "OPENED" not in r.stdout and "Permission denied" in r.stderr


@needs_cluster
def test_own_sqfs_needs_allow_sqfs(sec_cluster, sec_image):
    """allow_sqfs is off on this cluster: a user's own SquashFS is refused, nothing is mounted
    (the allowed case: test_e2e_slurm.test_local_sqfs_file)."""
    ref, _, _ = sec_image
    out = Path(tempfile.mkdtemp(prefix="oci-sec-sqfs-", dir="/tmp"))
    try:
        os.chmod(out, 0o755)
        f = out / "mine.sqfs"
        subprocess.run(["mksquashfs", str(ROOT / "docs"), str(f), "-quiet", "-noappend"],
                       check=True, capture_output=True)
        os.chmod(f, 0o644)
        r = sec_cluster.srun("-N1", f"--oci-image={f}", "echo", "RAN")
        assert r.returncode != 0 and "RAN" not in r.stdout
        assert "does not allow" in r.stderr and "Traceback" not in r.stderr, r.stderr
        # Nothing but cache images is mounted from this site (the earlier tests' image
        # mounts come and go as they idle out, so the list itself is not compared), and
        # no loop device anywhere is backed by the user's file.
        cached = str(sec_cluster.cache / "images") + "/"
        assert all(f"({cached}" in l for l in sec_cluster.loops()), sec_cluster.loops()
        backing = [b.read_text().strip() for b in Path("/sys/block").glob("loop*/loop/backing_file")]
        assert str(f) not in backing and str(out) not in " ".join(backing)
    finally:
        shutil.rmtree(out)
