"""Issue 13, the privilege boundary: attacks by ordinary users on the shared cache and the
user (prefetch) socket, each of which worked before and must fail now.

Real parts: Debian's docker-registry with htpasswd Basic auth (users `site` for the
daemon's own identity, `alice` for ocipriv, `bob` for ociother), real oci-imaged
processes, real loop mounts for the steps; the attacker is a real non-root process
(subprocess with the user's uid and gid, no extra groups)."""

from __future__ import annotations

import base64
import fcntl
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

import bcrypt
import pytest

from cluster_fixture import as_user as cluster_as_user
from daemon_proc import DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import unmount_under
from ocibuild import Pusher
from registry_server import RegistryServer
from test_security import OTHER_USER, PRIV_USER, ensure_user

from ociimage.client import DaemonClient
from ociimage.errors import OciImageError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (real users, mounts)")

PASSWORDS = {"site": "s1te-Acc0unt-pw", "alice": "al1ce-Pr1vate-pw", "bob": "b0b-0ther-pw"}


# ---- fixtures and helpers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def reg():
    d = Path(tempfile.mkdtemp(prefix="oci-priv-reg-"))
    htpasswd = d / "htpasswd"
    htpasswd.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
                                for u, p in PASSWORDS.items()))
    with RegistryServer(d / "reg", auth=("htpasswd", str(htpasswd))) as r:
        r.pusher = Pusher(r.url, auth=("site", PASSWORDS["site"]))
        yield r
    shutil.rmtree(d, ignore_errors=True)


def push(reg, repo):
    img = reg.pusher.image(repo, "v1", busybox_layers(os_id=repo.replace("/", "-")),
                           config=IMAGE_CONFIG)
    return img, f"{reg.host}/{repo}:v1@{img.manifest_digest}"


def login(user, reg, account):
    """user's ~/.docker/config.json holds account's login (None: no login at all)."""
    pw = ensure_user(user)
    d = Path(pw.pw_dir) / ".docker"
    if account is None:
        shutil.rmtree(d, ignore_errors=True)
        return pw
    d.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{account}:{PASSWORDS[account]}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    for p in (d, d / "config.json"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(d / "config.json", 0o600)
    return pw


# What an ordinary user runs: the system Python for stdlib-only probes, and the installed
# copy of the project (under /tmp) for its commands; never this checkout's venv, which on
# a fresh machine lives in root's 0700 home.
USER_PYTHON = "/usr/bin/python3"


class Site:
    def __init__(self, base, daemon, conf, installed):
        self.base, self.daemon, self.conf = base, daemon, conf
        self.bin = installed.bin
        self.cache = daemon.cache_dir
        self.psock = daemon.socket.parent / "oci-imaged-prefetch.sock"

    def entry(self, digest) -> Path:
        return self.cache / "images" / (digest.replace(":", "-") + ".json")


@pytest.fixture
def site(reg, request, installed):
    """One daemon whose OWN registry identity is `site` (as root's docker login would be)."""
    base = Path(tempfile.mkdtemp(prefix="oci-priv-", dir="/tmp"))
    os.chmod(base, 0o755)            # users reach the socket directory, as under /run
    site_auth = base / "site-auth.json"
    auth = base64.b64encode(f"site:{PASSWORDS['site']}".encode()).decode()
    site_auth.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    os.chmod(site_auth, 0o600)
    extra = getattr(request, "param", {})   # {"cache": "key = value\n", "daemon": ...}
    conf = base / "oci-image.conf"
    conf.write_text(f"[daemon]\nsocket = {base}/n1/oci-imaged.sock\nmount_idle = 1\n"
                    f"{extra.get('daemon', '')}[cache]\ndir = {base}/cache\n"
                    f"{extra.get('cache', '')}")
    old = os.environ.get("REGISTRY_AUTH_FILE")
    os.environ["REGISTRY_AUTH_FILE"] = str(site_auth)   # the daemon's own credentials
    try:
        d = DaemonProcess(base, base / "cache", extra=["--config", str(conf)]).start()
    finally:
        if old is None:
            os.environ.pop("REGISTRY_AUTH_FILE")
        else:
            os.environ["REGISTRY_AUTH_FILE"] = old
    yield Site(base, d, conf, installed)
    d.stop()
    unmount_under(base)
    shutil.rmtree(base, ignore_errors=True)


def as_user_argv(argv, pw):
    """argv run as the user (uid, gid, no supplementary groups) by setpriv: never
    subprocess's user=/group=, which fork() (that hangs in a process that has spoken gRPC,
    with Debian 13's grpcio)."""
    return cluster_as_user(list(argv), pw.pw_uid, pw.pw_gid)


def as_user(user, code, *args, timeout=60, env=None, python=USER_PYTHON):
    """Run Python code as an ordinary user (its own uid/gid, no supplementary groups)."""
    pw = pwd.getpwnam(user)
    e = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "PYTHONDONTWRITEBYTECODE": "1",
         **(env or {})}
    return subprocess.run(as_user_argv([str(python), "-c", code, *args], pw), env=e, cwd="/", capture_output=True, text=True,
                          timeout=timeout)


def step_prefetch(site, user, image, timeout=30):
    pw = pwd.getpwnam(user)
    return subprocess.run(as_user_argv([str(site.bin / "oci-image-step"), "prefetch", "--socket",
                           str(site.psock), "--image", image], pw), env={"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir,
                                                "PYTHONDONTWRITEBYTECODE": "1"},
                          cwd="/", capture_output=True, text=True, timeout=timeout)


def prepare(site, image, job, user):
    from ociimage.v1 import ociimage_pb2 as pb
    pw = pwd.getpwnam(user)
    req = pb.PrepareStepRequest(job_id=job, step_id="0", uid=pw.pw_uid, gid=pw.pw_gid,
                                image=image, cwd="/", mount_home=False, user_name=user,
                                home="/", node=site.daemon.node)
    c = DaemonClient(str(site.daemon.socket), timeout=60)
    try:
        return c.prepare_step(req)
    finally:
        c.close()


def release(site, job):
    c = DaemonClient(str(site.daemon.socket), timeout=30)
    try:
        c.release_step(job, "0")
    finally:
        c.close()


def cache_paths(site):
    """Everything under the cache, as root sees it (the list the attacker is handed)."""
    out = [str(site.cache)]
    for top, dirs, files in os.walk(site.cache):
        out += [os.path.join(top, n) for n in dirs + files]
    return out


TRY_OPEN = r"""
import errno, json, os, sys
res = {}
for p in sys.argv[1:]:
    try:
        fd = os.open(p, os.O_RDONLY)
        os.close(fd)
        res[p] = "opened"
    except OSError as e:
        res[p] = errno.errorcode[e.errno]
print(json.dumps(res))
"""


# ---- (3) the shared cache belongs to root ------------------------------------------------

def test_users_cannot_read_anything_in_the_cache(reg, site):
    login(PRIV_USER, reg, "alice")
    login(OTHER_USER, reg, None)
    img, pinned = push(reg, "priv/secret")
    prepare(site, pinned, "701", PRIV_USER)      # cached with alice's credentials, leased
    try:
        paths = cache_paths(site)
        kinds = {Path(p).suffix for p in paths}
        assert {".sqfs", ".json", ".lock", ".used"} <= kinds, paths
        assert any("/leases/n1/" in p for p in paths), paths
        # created root's alone: nothing made wider and narrowed later
        for p in paths:
            st = os.lstat(p)
            want = 0o700 if os.path.isdir(p) else 0o600
            assert st.st_uid == 0 and (st.st_mode & 0o777) == want, (p, oct(st.st_mode))
        for user in (OTHER_USER, PRIV_USER):     # even the user who pulled it
            r = as_user(user, TRY_OPEN, *paths)
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert set(res) == set(paths) and set(res.values()) == {"EACCES"}, res
        sqfs = site.cache / "images" / (img.manifest_digest.replace(":", "-") + ".sqfs")
        pw = pwd.getpwnam(OTHER_USER)
        r = subprocess.run(as_user_argv(["sqfs2tar", str(sqfs)], pw), capture_output=True, cwd="/")
        assert r.returncode != 0 and b"ID=priv-secret" not in r.stdout, r.stderr
        assert b"Permission denied" in r.stderr, r.stderr
        # control: root reads it, so the refusal above is the permission, not a broken file
        r = subprocess.run(["sqfs2tar", str(sqfs)], capture_output=True)
        assert r.returncode == 0 and b"ID=priv-secret" in r.stdout
    finally:
        release(site, "701")


def test_a_cache_from_the_older_version_is_narrowed_at_daemon_start(reg, site):
    img, pinned = push(reg, "priv/older")
    login(PRIV_USER, reg, "alice")
    DaemonClient(str(site.daemon.socket)).pull(pinned, uid=pwd.getpwnam(PRIV_USER).pw_uid)
    site.daemon.stop()
    # what the previous version left: 0755 directories, 0644 files
    for p in cache_paths(site):
        os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
    r = as_user(OTHER_USER, TRY_OPEN, *cache_paths(site))
    assert set(json.loads(r.stdout).values()) == {"opened"}   # the hole being closed
    site.daemon.start()
    paths = cache_paths(site)
    r = as_user(OTHER_USER, TRY_OPEN, *paths)
    assert set(json.loads(r.stdout).values()) == {"EACCES"}, r.stdout
    assert all((os.lstat(p).st_mode & 0o777) == (0o700 if os.path.isdir(p) else 0o600)
               for p in paths)
    assert "made the image cache root-only" in site.daemon.log()


HOLD_LOCKS = r"""
import fcntl, json, os, sys, time
held = []
for p in sys.argv[2:]:
    for mode in (fcntl.LOCK_SH, fcntl.LOCK_EX):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            held.append(p)
        except OSError:
            os.close(fd)
print(json.dumps(held), flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_user_flocks_cannot_stall_a_step(reg, site):
    login(PRIV_USER, reg, "alice")
    img, pinned = push(reg, "priv/locked")
    uid = pwd.getpwnam(PRIV_USER).pw_uid
    DaemonClient(str(site.daemon.socket)).pull(pinned, uid=uid)
    paths = cache_paths(site)
    lock = str(site.cache / "locks" / (img.manifest_digest.replace(":", "-") + ".lock"))
    assert lock in paths
    pw = pwd.getpwnam(OTHER_USER)
    holder = subprocess.Popen(as_user_argv([USER_PYTHON, "-c", HOLD_LOCKS, "60", *paths], pw),
                              stdout=subprocess.PIPE,
                              text=True, cwd="/", env={"PYTHONDONTWRITEBYTECODE": "1"})
    try:
        assert json.loads(holder.stdout.readline()) == []       # could hold nothing
        t0 = time.monotonic()
        c = prepare(site, pinned, "702", PRIV_USER)               # takes the digest lock
        assert c.digest == img.manifest_digest and time.monotonic() - t0 < 20
        release(site, "702")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("site", [{"cache": "lock_timeout = 2\nconvert_timeout = 3\n"}],
                         indirect=True)
def test_a_stuck_lock_ends_in_a_one_line_timeout(reg, site):
    """Root holds the digest lock (a stuck peer node): a step on the cached image does not
    wait for it at all (a cache hit takes no lock, issue 15); a pull that has to wait for
    the conversion fails after convert_timeout with one line; nothing hangs."""
    login(PRIV_USER, reg, "alice")
    img, pinned = push(reg, "priv/stuck")
    other, other_pinned = push(reg, "priv/stuck2")
    uid = pwd.getpwnam(PRIV_USER).pw_uid
    DaemonClient(str(site.daemon.socket)).pull(pinned, uid=uid)
    fds = []
    for d in (img.manifest_digest, other.manifest_digest):
        fd = os.open(site.cache / "locks" / (d.replace(":", "-") + ".lock"),
                     os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fds.append(fd)
    try:
        t0 = time.monotonic()
        c = prepare(site, pinned, "703", PRIV_USER)     # the lease takes no lock
        assert c.digest == img.manifest_digest
        assert time.monotonic() - t0 < 2, "a cache hit waited for the stuck peer's lock"
        release(site, "703")
        t0 = time.monotonic()
        with pytest.raises(OciImageError) as e:
            DaemonClient(str(site.daemon.socket), timeout=60).pull(other_pinned, uid=uid)
        assert 3 <= time.monotonic() - t0 < 20
        assert "\n" not in str(e.value) and "[cache] convert_timeout = 3" in str(e.value), e.value
    finally:
        for fd in fds:
            os.close(fd)
    # once the peer lets go, the image that had to wait is converted
    c = prepare(site, other_pinned, "704", PRIV_USER)
    assert c.digest == other.manifest_digest
    release(site, "704")


# ---- (4) the user socket knows who is calling ---------------------------------------------

def _wait_log(site, line, timeout=10):
    """Whether line shows up in the daemon's log (written just after the fact it reports)."""
    deadline = time.monotonic() + timeout
    while line not in site.daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    return line in site.daemon.log()


def _wait_state(site, user, image, want, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        r = step_prefetch(site, user, image)
        if r.stdout.split()[:1] == [want] or time.monotonic() > deadline:
            return r
        time.sleep(0.3)


def test_prefetch_pulls_with_the_callers_credentials_only(reg, site):
    login(OTHER_USER, reg, None)         # no login: only the daemon's `site` may pull
    login(PRIV_USER, reg, "alice")
    siteonly, pinned = push(reg, "priv/siteonly")
    mark = len(reg.access_log())
    r = step_prefetch(site, OTHER_USER, pinned)
    assert r.returncode == 0 and r.stdout.split()[0] == "started", r.stderr
    r = _wait_state(site, OTHER_USER, pinned, "skipped")
    assert r.stdout.startswith("skipped") and "authentication required" in r.stdout, r.stdout
    # nothing was pulled: every request for that repository since was refused (401:
    # no manifest, no blob served), nothing in the cache
    served = [(m, p, s) for m, p, s in reg.access_log()[mark:] if "/priv/siteonly/" in p]
    assert served and all(s == 401 for _m, _p, s in served), served
    assert not site.entry(siteonly.manifest_digest).exists()
    other_uid = pwd.getpwnam(OTHER_USER).pw_uid
    assert _wait_log(site, f'"prefetch failed (the nodes will pull at step start)" '
                           f'reference="{pinned}" uid={other_uid}')
    # the user gets nothing through the importer's op either
    r = as_user(OTHER_USER, "import sys, ociimage.sockclient as u\n"
                "print(u.request(sys.argv[1], {'op': 'open', 'image': sys.argv[2]}))",
                str(site.psock), pinned, python=site.bin / "python")
    assert r.returncode == 0 and "'missing'" in r.stdout and ", None)" in r.stdout, r
    # the caller's own credentials: pulled, and the log says for whom
    mine, mine_pinned = push(reg, "priv/mine")
    r = step_prefetch(site, PRIV_USER, mine_pinned)
    assert r.returncode == 0 and r.stdout.split()[0] == "started", r.stderr
    assert _wait_state(site, PRIV_USER, mine_pinned, "cached").stdout.startswith("cached")
    assert site.entry(mine.manifest_digest).exists()
    priv_uid = pwd.getpwnam(PRIV_USER).pw_uid
    assert _wait_log(site, f'"prefetch done" reference="{mine_pinned}" uid={priv_uid}')
    # now cached, it is still nothing for a user the registry refuses
    r = step_prefetch(site, OTHER_USER, mine_pinned)
    assert r.returncode != 0 and "does not let you pull it (HTTP 401)" in r.stderr, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("site", [{"daemon": "prefetch_rate_per_user = 2\n"
                                             "prefetch_running_per_user = 2\n"}], indirect=True)
def test_per_user_prefetch_limits_leave_other_users_alone(reg, site):
    login(PRIV_USER, reg, "alice")
    login(OTHER_USER, reg, "bob")
    pins = [push(reg, f"priv/lim{i}")[1] for i in range(4)]
    states = [step_prefetch(site, PRIV_USER, p).stdout for p in pins[:3]]
    assert [s.split()[0] for s in states] == ["started", "started", "skipped"], states
    assert "this user's prefetch limit" in states[2]
    r = step_prefetch(site, OTHER_USER, pins[3])     # another uid still proceeds
    assert r.returncode == 0 and r.stdout.split()[0] == "started", r.stderr
    assert _wait_state(site, OTHER_USER, pins[3], "cached").stdout.startswith("cached")


FLOOD = r"""
import json, socket, sys, time
path = sys.argv[1]
def conn():
    s = socket.socket(socket.AF_UNIX); s.connect(path); return s
out = {}
big = conn()
t0 = time.monotonic()
try:
    big.sendall(b"x" * (1 << 20))                     # a huge line
except OSError as e:
    out["big_send_error"] = type(e).__name__
big.settimeout(10)
try:
    out["big"] = big.recv(4096).decode()
except OSError as e:
    out["big"] = "error " + type(e).__name__
out["big_s"] = time.monotonic() - t0
big.close()
time.sleep(0.5)                                      # its slot is given back
idle = [conn() for _ in range(7)]                    # send nothing
trickle = conn(); trickle.send(b'{"op"')             # and one that trickles
t1 = time.monotonic()
extra = [conn() for _ in range(4)]                   # past this user's connection cap
out["busy"] = []
for s in extra:
    s.settimeout(5)
    out["busy"].append(s.recv(4096).decode())
print(json.dumps({"phase": "flooding"}), flush=True)
for _ in range(8):
    try:
        trickle.send(b" ")
    except OSError:
        break
    time.sleep(0.4)
trickle.settimeout(10)
out["trickle"] = trickle.recv(4096).decode()
out["idle"] = []
for s in idle:
    s.settimeout(10)
    out["idle"].append(s.recv(4096).decode())
out["total_s"] = time.monotonic() - t1
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("site", [{"daemon": "prefetch_request_timeout = 2\n"}], indirect=True)
def test_user_socket_is_bounded_against_idle_huge_and_slow_clients(reg, site):
    login(PRIV_USER, reg, "alice")
    _, pinned = push(reg, "priv/bounded")
    pw = pwd.getpwnam(OTHER_USER)
    flood = subprocess.Popen(as_user_argv([USER_PYTHON, "-c", FLOOD, str(site.psock)], pw), stdout=subprocess.PIPE, text=True,
                             cwd="/", env={"PYTHONDONTWRITEBYTECODE": "1"})
    try:
        assert json.loads(flood.stdout.readline()) == {"phase": "flooding"}
        # while ociother's 8 connections are open and stalled, ocipriv is served at once
        t0 = time.monotonic()
        r = step_prefetch(site, PRIV_USER, pinned, timeout=10)
        assert r.returncode == 0 and r.stdout.split()[0] == "started", r.stderr
        assert time.monotonic() - t0 < 3
        out = json.loads(flood.stdout.readline())
    finally:
        flood.kill()
        flood.wait()
    assert "larger than 4096 bytes" in out["big"] and out["big_s"] < 5, out
    assert len(out["busy"]) == 4 and all("busy" in b for b in out["busy"]), out
    for answer in out["idle"] + [out["trickle"]]:
        assert "not complete within 2 s" in answer, out
    assert out["total_s"] < 12, out


# ---- the pyxis importer, now that the cache is root's alone ------------------------------

OPEN_OP = r"""
import json, os, sys
import ociimage.sockclient as u
from ociimage.errors import OciImageError
try:
    reply, fd = u.request(sys.argv[1], {"op": "open", "image": sys.argv[2]})
except OciImageError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"reply": reply, "fd": fd is not None,
                      "head": os.pread(fd, 4, 0).decode() if fd is not None else ""}))
"""


def importer(site, user, *args, env=None):
    pw = pwd.getpwnam(user)
    e = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "PYTHONDONTWRITEBYTECODE": "1",
         "SLURM_JOB_ID": "705", "SLURM_STEP_ID": "0", **(env or {})}
    return subprocess.run(as_user_argv([str(site.bin / "oci-image-pyxis-importer"), "--config",
                           str(site.conf), *args], pw), env=e, cwd="/", stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def test_pyxis_importer_hands_a_private_image_only_to_users_the_registry_allows(reg, site):
    login(PRIV_USER, reg, "alice")
    login(OTHER_USER, reg, None)
    img, pinned = push(reg, "priv/pyxis")
    uri = f"docker://{reg.host}#priv/pyxis:v1"
    # the user who may pull it: converted on a miss (with alice's credentials), then a
    # private copy of the user's own that enroot can read
    r = importer(site, PRIV_USER, "get", uri)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    pw = pwd.getpwnam(PRIV_USER)
    assert path.parent == Path(f"/tmp/oci-image-pyxis.{pw.pw_uid}")
    st, dst = path.stat(), path.parent.stat()
    assert (st.st_uid, st.st_mode & 0o777, dst.st_uid, dst.st_mode & 0o777) == \
        (pw.pw_uid, 0o600, pw.pw_uid, 0o700)
    cached = site.cache / "images" / (img.manifest_digest.replace(":", "-") + ".sqfs")
    assert path.read_bytes() == cached.read_bytes()
    assert _wait_log(site, f'"image handed to a user" uid={pw.pw_uid}')
    r2 = importer(site, PRIV_USER, "get", uri)      # pyxis may ask twice: the same path
    assert r2.returncode == 0 and r2.stdout == r.stdout, r2.stderr
    for _ in range(2):                              # release, twice as pyxis does
        rel = importer(site, PRIV_USER, "release")
        assert rel.returncode == 0 and rel.stdout == "", rel.stderr
    assert not path.exists() and cached.exists()
    # a user the registry refuses: the importer stops at their own resolve ...
    r = importer(site, OTHER_USER, "get", uri)
    assert r.returncode != 0 and r.stdout == "" and "authentication required" in r.stderr, r
    # ... and asking the daemon directly with the pinned digest gets no descriptor
    r = as_user(OTHER_USER, OPEN_OP, str(site.psock), pinned, python=site.bin / "python")
    out = json.loads(r.stdout)
    assert "does not let you pull it (HTTP 401)" in out.get("error", ""), out
    # control: the same request as the allowed user gets the SquashFS
    out = json.loads(as_user(PRIV_USER, OPEN_OP, str(site.psock), pinned,
                             python=site.bin / "python").stdout)
    assert out["fd"] and out["head"] == "hsqs" and out["reply"]["state"] == "ready", out
    assert not any(Path("/tmp").glob(f"oci-image-pyxis.{pwd.getpwnam(OTHER_USER).pw_uid}/*"))
