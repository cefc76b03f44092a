"""`oci-image publish` through oci-imaged by ordinary users, and the attacks on that channel.

Real parts: Debian's docker-registry with token auth and per-repository grants
(tests/token_issuer.py: `alice` may pull and push priv/* and alice/*, `bob` bob/*, the
daemon's own identity `site` everything, anonymous users pull public/*), a plain
registry of "Bob's own", one real oci-imaged, and the installed `oci-image` run by real
non-root users (ocipriv holds alice's login, ociother bob's). Each attack is what a
user on a node could try through the user socket; each must fail, and fail without
anything reaching a registry under someone else's name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from cluster_fixture import as_user
from daemon_proc import DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import unmount_under
from ocibuild import Pusher
from registry_proxy import RegistryProxy
from registry_server import RegistryServer
from test_security import OTHER_USER, PRIV_USER, ensure_user
from token_issuer import TokenIssuer

from ociimage.errors import LimitExceeded
from ociimage.publisher import MAX_CHUNK, Publisher, parse_request

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (real users, a daemon)")

PASSWORDS = {"site": "s1te-Publ1sh-pw", "alice": "al1ce-Publ1sh-pw", "bob": "b0b-Publ1sh-pw"}
GRANTS = {"site": {"*": ["pull", "push"]},
          "alice": {"priv/*": ["pull", "push"], "alice/*": ["pull", "push"], "public/*": ["pull"]},
          "bob": {"bob/*": ["pull", "push"], "public/*": ["pull"]},
          "": {"public/*": ["pull"]}}
#: a short publish_timeout, below the registry deadlines: the hang test waits for it
DAEMON_CONF = ("[daemon]\nmount_idle = 1\npublish_running = 2\npublish_running_per_user = 1\n"
               "publish_timeout = 8\n[registries]\nrequest_timeout = 60\nstall_timeout = 60\n")


# ---- pure: what a request may carry, and the slots -----------------------------------------

@pytest.mark.parametrize("request_, needle", [
    ({"op": "publish", "image": "/etc/shadow", "target": "r:5000/x"}, "not a file"),
    ({"op": "publish", "image": "r:5000/a:v1", "target": "r:5000/x", "cache_dir": "/root"},
     "unknown field(s) cache_dir"),
    ({"op": "publish", "image": "r:5000/a:v1", "target": "r:5000/x",
      "env": {"REGISTRY_AUTH_FILE": "/root/.docker/config.json"}}, "unknown field(s) env"),
    ({"op": "publish", "image": "r:5000/a:v1", "target": "r:5000/x", "chunk_size": 1 << 40},
     "chunk_size must be 1 to 64 MiB"),
    ({"op": "publish", "image": "r:5000/a:v1", "target": "r:5000/x", "chunk_size": True},
     "chunk_size"),
    ({"op": "publish", "image": "r:5000/a:v1", "target": "r:5000/x",
      "mount_from": ["a"] * 100}, "mount_from"),
    ({"op": "publish", "image": "r:5000/a:v1", "target": "r:5000/x@sha256:" + "0" * 64},
     "not a digest"),
    ({"op": "publish", "image": "r:5000/a:v1"}, "'target' must be"),
    ({"op": "publish", "image": "r:5000/a:v1", "target": "r:5000/x\ny"}, "whitespace"),
])
def test_a_publish_request_carries_no_path_and_nothing_unknown(request_, needle):
    from ociimage.errors import InvalidArgument
    with pytest.raises(InvalidArgument) as e:
        parse_request(request_)
    assert needle in str(e.value) and "\n" not in str(e.value)
    ok = parse_request({"op": "publish", "image": "r:5000/a:v1", "target": "r:5000/x:t",
                        "chunk_size": MAX_CHUNK, "mount_from": ["a/b"]})
    assert ok.chunk_size == MAX_CHUNK and ok.mount_from == ("a/b",)


def test_publish_slots_are_bounded_per_user_and_in_all():
    p = Publisher(store=None, running=2, running_per_user=1)
    with p._slot(1001):
        with pytest.raises(LimitExceeded, match="publish_running_per_user = 1"):
            with p._slot(1001):
                pass
        with p._slot(1002):
            with pytest.raises(LimitExceeded, match=r"publish_running = 2\)"):
                with p._slot(1003):
                    pass
    assert p.in_progress() == 0
    with p._slot(1001):   # given back
        assert p.in_progress() == 1


# ---- the site: a token registry, a daemon whose own identity is `site` ---------------------

def login(user: str, host: str, account) -> pwd.struct_passwd:
    pw = ensure_user(user)
    d = Path(pw.pw_dir) / ".docker"
    shutil.rmtree(d, ignore_errors=True)
    if account is None:
        return pw
    d.mkdir()
    auth = base64.b64encode(f"{account}:{PASSWORDS[account]}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    for p in (d, d / "config.json"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(d / "config.json", 0o600)
    return pw


class Site:
    def __init__(self, base, issuer, reg, daemon, conf, installed):
        self.base = base
        self.issuer, self.reg, self.daemon, self.conf = issuer, reg, daemon, conf
        self.bin = installed.bin
        self.psock = daemon.socket.parent / "oci-imaged-prefetch.sock"

    def admin(self, repo: str) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = "Bearer " + self.issuer.make_token("admin", [
            {"type": "repository", "name": repo, "actions": ["pull", "push"]}])
        return s

    def push(self, repo: str, os_id: str, extra_mb: int = 0):
        p = Pusher(self.reg.url)
        p.s = self.admin(repo)
        img = p.image(repo, "v1", busybox_layers(os_id=os_id, extra_mb=extra_mb),
                      config=IMAGE_CONFIG)
        return img, f"{self.reg.host}/{repo}:v1"

    def manifest(self, repo: str, ref: str):
        """The manifest at repo:ref as the registry holds it (None: there is none)."""
        r = self.admin(repo).get(f"{self.reg.url}/v2/{repo}/manifests/{ref}", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        return r.json() if r.status_code == 200 else None

    def tokens_since(self, mark: int) -> list:
        with self.issuer._lock:
            return list(self.issuer.requests[mark:])

    def publish(self, user, *args, timeout=90, popen=False, json_out=False):
        pw = pwd.getpwnam(user)
        argv = as_user([str(self.bin / "oci-image"), "--socket", str(self.daemon.socket),
                        *(["--json"] if json_out else []), "publish", *args],
                       pw.pw_uid, pw.pw_gid)
        env = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "PYTHONDONTWRITEBYTECODE": "1",
               "OCI_IMAGE_CONFIG": str(self.conf)}
        if popen:
            return subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        return subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def site(installed):
    if os.geteuid() != 0:
        pytest.skip("needs root (real users, a daemon)")
    base = Path(tempfile.mkdtemp(prefix="oci-pubd-", dir="/tmp"))
    os.chmod(base, 0o755)            # users reach the socket directory, as under /run
    issuer = TokenIssuer(base / "issuer", {k: v for k, v in PASSWORDS.items()}, GRANTS)
    with issuer:
        with RegistryServer(base / "reg", auth=issuer.registry_auth()) as reg:
            site_auth = base / "site-auth.json"
            auth = base64.b64encode(f"site:{PASSWORDS['site']}".encode()).decode()
            site_auth.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
            os.chmod(site_auth, 0o600)
            conf = base / "oci-image.conf"
            conf.write_text(DAEMON_CONF)
            os.chmod(conf, 0o644)
            old = os.environ.get("REGISTRY_AUTH_FILE")
            os.environ["REGISTRY_AUTH_FILE"] = str(site_auth)  # the daemon's own credentials
            try:
                d = DaemonProcess(base, base / "cache", metrics=False,
                                  extra=["--config", str(conf)]).start()
            finally:
                if old is None:
                    os.environ.pop("REGISTRY_AUTH_FILE")
                else:
                    os.environ["REGISTRY_AUTH_FILE"] = old
            try:
                yield Site(base, issuer, reg, d, conf, installed)
            finally:
                d.stop()
                unmount_under(base)
    shutil.rmtree(base, ignore_errors=True)


def _errors(stderr: str) -> list:
    return [x for x in stderr.splitlines() if x.startswith("oci-image: error:")]


def _one_error(r) -> str:
    errs = _errors(r.stderr)
    assert r.returncode != 0 and len(errs) == 1 and "Traceback" not in r.stderr, r.stderr
    return errs[0]


# ---- the happy path ------------------------------------------------------------------------

@needs_root
def test_a_user_publishes_with_their_own_credentials(site):
    login(PRIV_USER, site.reg.host, "alice")
    src, ref = site.push("priv/app", "priv-pub")
    mark = site.issuer.token_requests()
    r = site.publish(PRIV_USER, ref, f"{site.reg.host}/alice/app:sqfs")
    assert r.returncode == 0, r.stderr
    digest, published = r.stdout.split()
    assert published == f"{site.reg.host}/alice/app:sqfs@{digest}"
    # progress, one line each, from resolving to the upload
    for word in ("resolving", "image ready", "uploading to", "published"):
        assert word in r.stderr, r.stderr
    assert not _errors(r.stderr)
    m = site.manifest("alice/app", "sqfs")
    assert m and m["subject"]["digest"] == src.manifest_digest
    cached = site.daemon.cache_dir / "images" / (src.manifest_digest.replace(":", "-") + ".sqfs")
    assert m["layers"][0]["digest"] == "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest()
    # every registry token of that publish was alice's: none was the daemon's own (`site`)
    users = {t["user"] for t in site.tokens_since(mark)}
    assert users == {"alice"}, site.tokens_since(mark)
    assert any("repository:alice/app:pull,push" in t["scopes"] for t in site.tokens_since(mark))
    uid = pwd.getpwnam(PRIV_USER).pw_uid
    assert f'"published for a user" uid={uid}' in site.daemon.log()
    # the same with --json: the fields of the standalone command
    r = site.publish(PRIV_USER, ref, f"{site.reg.host}/alice/app:sqfs", json_out=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["digest"] == digest and out["blob"] == "exists"
    assert out["source_digest"] == src.manifest_digest


# ---- attacks -------------------------------------------------------------------------------

@needs_root
def test_another_users_cached_private_image_is_not_published(site):
    """alice's private priv/secret is in the cache. bob names it by digest, and through a
    registry of his own that serves the same manifest: refused, nothing pushed."""
    login(PRIV_USER, site.reg.host, "alice")
    login(OTHER_USER, site.reg.host, "bob")
    src, ref = site.push("priv/secret", "secret")
    r = site.publish(PRIV_USER, ref, f"{site.reg.host}/alice/secret:sqfs")  # now cached
    assert r.returncode == 0, r.stderr
    pinned = f"{site.reg.host}/priv/secret@{src.manifest_digest}"
    err = _one_error(site.publish(OTHER_USER, pinned, f"{site.reg.host}/bob/stolen:v1"))
    # bob is logged in, but his token does not grant pull access to alice's repository
    assert f"access denied to {site.reg.host}/priv/secret" in err, err
    with RegistryServer(site.base / "bobreg") as bobreg:
        copy = Pusher(bobreg.url).image("bob/copy", "v1", busybox_layers(os_id="secret"),
                                        config=IMAGE_CONFIG)
        assert copy.manifest_digest == src.manifest_digest   # the same image, bob's registry
        for target in (f"{site.reg.host}/bob/stolen:v1", f"{bobreg.host}/bob/stolen:v1"):
            err = _one_error(site.publish(OTHER_USER, f"{bobreg.host}/bob/copy:v1", target))
            assert "does not let you pull it" in err, err
            assert "priv/secret" not in err and site.reg.host not in err, err  # digest only
        assert requests.get(f"{bobreg.url}/v2/bob/stolen/tags/list").status_code == 404
    assert site.manifest("bob/stolen", "v1") is None


@needs_root
def test_the_daemon_pushes_with_neither_roots_nor_another_users_credentials(site):
    login(PRIV_USER, site.reg.host, "alice")
    login(OTHER_USER, site.reg.host, "bob")
    _, public = site.push("public/tool", "tool")     # anyone may read it
    mark = site.issuer.token_requests()
    # bob may not write alice/*; the daemon (site) could: it does not, on bob's behalf
    err = _one_error(site.publish(OTHER_USER, public, f"{site.reg.host}/alice/evil:v1"))
    assert f"access denied to {site.reg.host}/alice/evil" in err and "push access" in err, err
    assert site.manifest("alice/evil", "v1") is None
    assert {t["user"] for t in site.tokens_since(mark)} <= {"bob", ""}, site.tokens_since(mark)
    # bob's credentials file is a symlink to alice's: read as bob, it gives him nothing
    bob = pwd.getpwnam(OTHER_USER)
    alice_cfg = Path(pwd.getpwnam(PRIV_USER).pw_dir) / ".docker" / "config.json"
    bob_cfg = Path(bob.pw_dir) / ".docker" / "config.json"
    bob_cfg.unlink()
    os.symlink(alice_cfg, bob_cfg)
    os.lchown(bob_cfg, bob.pw_uid, bob.pw_gid)
    mark = site.issuer.token_requests()
    err = _one_error(site.publish(OTHER_USER, public, f"{site.reg.host}/alice/evil:v1"))
    # alice's file, read as bob, is no file of his: he has no credentials at all
    assert f"authentication required for {site.reg.host}/alice/evil" in err, err
    assert site.manifest("alice/evil", "v1") is None
    assert "alice" not in {t["user"] for t in site.tokens_since(mark)}, site.tokens_since(mark)
    # control: with his own login bob publishes where he may write
    login(OTHER_USER, site.reg.host, "bob")
    r = site.publish(OTHER_USER, public, f"{site.reg.host}/bob/tool:sqfs")
    assert r.returncode == 0, r.stderr
    assert site.manifest("bob/tool", "sqfs") is not None


@needs_root
def test_a_registry_cannot_make_the_daemon_read_a_whole_image_into_memory(site, registry):
    """A registry (of the user's choosing) announcing OCI-Chunk-Min-Length of 1 TiB: the
    daemon sends nothing rather than read the image into memory to make such a chunk."""
    login(OTHER_USER, site.reg.host, "bob")
    _, big = site.push("public/big", "big", extra_mb=2)
    with RegistryProxy(registry.url, chunk_min_length=1 << 40) as proxy:
        r = site.publish(OTHER_USER, "--chunk-size", "1M", big, f"{proxy.host}/bob/big:v1")
        err = _one_error(r)
        assert f"wants upload chunks of at least {1 << 40} bytes" in err, err
        assert not [p for m, p, _ in proxy.log if m == "PATCH"], proxy.log


class Blackhole:
    """A TCP server that accepts and never answers (a registry that hangs)."""

    def __init__(self, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.closed = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._hold, args=(c,), daemon=True).start()

    def _hold(self, c):
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass
        self.closed += 1

    def close(self):
        self.sock.close()


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)
    return cond()


@needs_root
def test_a_user_cannot_hang_the_daemon_for_others(site):
    login(PRIV_USER, site.reg.host, "alice")
    login(OTHER_USER, site.reg.host, "bob")
    _, public = site.push("public/hang", "hang")
    alices, alice_ref = site.push("priv/busy", "busy")
    hole = Blackhole()
    t0 = time.monotonic()
    stuck = site.publish(OTHER_USER, public, f"{hole.host}/x/y:v1", popen=True)
    try:
        assert _wait(lambda: hole.accepted > 0, 30), stuck.stderr.read() if stuck.poll() else ""
        # bob's second publish: refused at once, his slot is taken
        t1 = time.monotonic()
        err = _one_error(site.publish(OTHER_USER, public, f"{site.reg.host}/bob/two:v1"))
        assert "already have 1 publish" in err and time.monotonic() - t1 < 10, err
        # alice is not held up by bob's stuck publish
        r = site.publish(PRIV_USER, alice_ref, f"{site.reg.host}/alice/busy:sqfs")
        assert r.returncode == 0, r.stderr
        # bob's stuck publish ends with one line at [daemon] publish_timeout (8 s), well
        # before the registry deadlines (60 s) would end it
        _out, stderr = stuck.communicate(timeout=60)
    finally:
        if stuck.poll() is None:
            stuck.kill()
    elapsed = time.monotonic() - t0
    errs = _errors(stderr)
    assert stuck.returncode != 0 and len(errs) == 1, stderr
    assert "the publish did not finish within [daemon] publish_timeout = 8 s" in errs[0], stderr
    assert 7 < elapsed < 40, (elapsed, stderr)
    assert _wait(lambda: hole.closed >= hole.accepted, 10)   # its connections were cut
    # a client that goes away (killed) has its publish abandoned, and its slot back
    accepted = hole.accepted
    gone = site.publish(OTHER_USER, public, f"{hole.host}/x/z:v1", popen=True)
    assert _wait(lambda: hole.accepted > accepted, 30)
    gone.send_signal(signal.SIGKILL)
    gone.wait()
    assert _wait(lambda: hole.closed >= hole.accepted, 10), (hole.accepted, hole.closed)
    uid = pwd.getpwnam(OTHER_USER).pw_uid
    line = '"user request abandoned" who="%d" reason="the client went away"' % uid
    assert _wait(lambda: line in site.daemon.log(), 10), site.daemon.log()[-2000:]
    r = site.publish(OTHER_USER, public, f"{site.reg.host}/bob/hang:sqfs")
    assert r.returncode == 0, r.stderr
