"""Attacks on the hot path's sockets (#19, from its adversarial review): the step socket
under a burst and under one user's stuck steps, the resolve op's network policy and
credentials, the health Watch at stop. Real daemons and registries; users are real users.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from daemon_proc import DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import unmount_under
from ocibuild import Pusher
from registry_server import RegistryServer
from stepclient import options, plugstack, run_step
from test_security import ensure_user
from token_issuer import TokenIssuer

from ociimage import errors
from ociimage.stepsock import call, step_socket_path
from ociimage.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon needs root")

USER = "ocitest"


@pytest.fixture
def daemon_in_tmp():
    """A daemon whose sockets ordinary users can reach (under /tmp, directories 0755)."""
    made = []

    def start(conf: str = "") -> DaemonProcess:
        base = Path(tempfile.mkdtemp(prefix="oci-hot-", dir="/tmp"))
        os.chmod(base, 0o755)
        (base / "d").mkdir(mode=0o755)
        (base / "d" / "none.conf").write_text(conf)
        d = DaemonProcess(base / "d", base / "cache").start()
        os.chmod(d.socket.parent, 0o755)
        made.append((base, d))
        return d

    yield start
    for base, d in made:
        d.stop()
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def test_a_burst_of_step_clients_all_get_an_answer(daemon_in_tmp):
    """More steps at once than a listen queue holds: each waits its turn, none fails."""
    d = daemon_in_tmp()
    path = step_socket_path(d.socket)
    out, go = [], threading.Event()

    def one(i):
        go.wait()
        try:
            call(path, {"op": "release", "job": "900", "step": str(i)}, timeout=60)
            out.append("ok")
        except errors.OciImageError as e:
            out.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(300)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(120)
    assert {k: out.count(k) for k in set(out)} == {"ok": 300}


class Tarpit:
    """127.0.0.1:port forwarding to a registry, until hang(): then it accepts and is silent."""

    def __init__(self, upstream_port: int):
        self.up, self.hanging, self.held = upstream_port, False, []
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(512)
        self.port = self.ls.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            if self.hanging:
                self.held.append(c)
                continue
            u = socket.create_connection(("127.0.0.1", self.up))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.ls.close()
        for c in self.held:
            c.close()


def _prepare(path, user, job, step, ref, outcomes=None, timeout=120):
    req = {"job_id": job, "step_id": str(step), "uid": user.pw_uid, "gid": user.pw_gid,
           "image": ref, "cwd": "/tmp", "node": "n1", "home": user.pw_dir,
           "user_name": user.pw_name}
    try:
        c = call(path, {"op": "prepare", "step": req}, timeout=timeout)["container"]
        if outcomes is not None:
            outcomes.append("ok")
        return c
    except errors.OciImageError as e:
        if outcomes is None:
            raise
        outcomes.append(type(e).__name__ + ": " + str(e))


def test_one_users_stuck_steps_cannot_fail_another_jobs_steps(daemon_in_tmp, registry):
    """The user's image comes from a registry of theirs that stops answering: each of their
    steps waits on its access check (until [registries] request_timeout). Another job's
    requests on the node are served meanwhile, at once."""
    attacker = ensure_user(USER)
    pit = Tarpit(registry.port)
    pushed = Pusher(registry.url).image("hot/tarpit", "v1", busybox_layers(os_id="tarpit"),
                                        config=IMAGE_CONFIG)
    ref = f"127.0.0.1:{pit.port}/hot/tarpit@{pushed.manifest_digest}"
    d = daemon_in_tmp("[registries]\nrequest_timeout = 20\n")
    path = step_socket_path(d.socket)
    try:
        assert d.cli("pull", ref).returncode == 0      # cached, by root: no verdict for anyone
        pit.hanging = True
        outcomes = []
        threads = [threading.Thread(target=_prepare, args=(path, attacker, "500", i, ref,
                                                           outcomes), daemon=True)
                   for i in range(300)]
        for t in threads:
            t.start()
        time.sleep(3)
        assert outcomes == []                          # all 300 stuck on the registry
        started = time.monotonic()
        # another job's requests on the same node: served now, not after the attacker's
        assert call(path, {"op": "release", "job": "777", "step": "0"},
                    timeout=30) == {"state": "released"}
        assert call(path, {"op": "release-job", "job": "778"},
                    timeout=30)["state"] == "released"
        assert time.monotonic() - started < 5
        for t in threads:
            t.join(120)
        assert len(outcomes) == 300 and "ok" not in outcomes
    finally:
        pit.close()


def test_a_cache_hit_takes_none_of_the_users_pull_slots(daemon_in_tmp, registry):
    """A user whose one allowed pull ([daemon] max_pulls_per_uid = 1) is stuck still starts
    steps in an image that is already cached, even one this daemon has not looked at yet
    (another node converted it)."""
    user = ensure_user(USER)
    pusher = Pusher(registry.url)
    cached = pusher.image("hot/cached", "v1", busybox_layers(os_id="cached"), config=IMAGE_CONFIG)
    cached_ref = f"{registry.host}/hot/cached@{cached.manifest_digest}"
    pit = Tarpit(registry.port)
    slow = pusher.image("hot/slow", "v1", busybox_layers(os_id="slow"), config=IMAGE_CONFIG)
    slow_ref = f"127.0.0.1:{pit.port}/hot/slow@{slow.manifest_digest}"
    d = daemon_in_tmp("[daemon]\nmax_pulls_per_uid = 1\n[registries]\nrequest_timeout = 20\n")
    other = DaemonProcess(d.base, d.cache_dir, node="n2").start()   # same cache, another node
    path = step_socket_path(d.socket)
    try:
        assert other.cli("pull", cached_ref).returncode == 0
        pit.hanging = True
        stuck = []
        t = threading.Thread(target=_prepare, args=(path, user, "600", 0, slow_ref, stuck),
                             daemon=True)
        t.start()
        time.sleep(2)
        assert stuck == []                             # the user's only pull slot is taken
        c = _prepare(path, user, "601", 0, cached_ref)
        assert c["digest"] == cached.manifest_digest
        call(path, {"op": "release", "job": "601", "step": "0"})
        t.join(60)
        assert len(stuck) == 1 and stuck[0] != "ok"
    finally:
        other.stop()
        pit.close()


def _local_address() -> str:
    """This host's address toward its default route (where a site's internal service would
    be), not loopback; "" without one. connect() on UDP sends nothing."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))
        addr = s.getsockname()[0]
    except OSError:
        return ""
    finally:
        s.close()
    return "" if addr.startswith("127.") else addr


def test_resolve_follows_the_sites_network_policy_not_the_users(daemon_in_tmp):
    """The user names a plain-HTTP service that is not a registry of the site's: the root
    daemon sends it nothing in plain HTTP, and the user's insecure list is refused."""
    ip = _local_address()
    if not ip:
        pytest.skip("no non-loopback address here")
    ensure_user(USER)
    seen = []

    class Service(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            seen.append(("HEAD", self.path))
            self.send_response(405)
            self.end_headers()

        def do_GET(self):
            seen.append(("GET", self.path))
            body = b'{"errors": [{"code": "DENIED", "message": "internal-secret"}]}'
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((ip, 0), Service)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host = f"{ip}:{srv.server_port}"
    d = daemon_in_tmp()
    sock = str(d.socket.parent / "oci-imaged-prefetch.sock")
    code = ("import json, socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
            "s.sendall(json.dumps(json.loads(sys.argv[2])).encode() + b'\\n')\n"
            "print(s.recv(65536).decode())\n")
    try:
        replies = []
        for msg in ({"op": "resolve", "image": f"{host}/admin/x:y", "insecure": [host]},
                    {"op": "resolve", "image": f"{host}/admin/x:y"}):
            r = subprocess.run(["runuser", "-u", USER, "--", "/usr/bin/python3", "-c", code, sock,
                                json.dumps(msg)], capture_output=True, text=True, timeout=90)
            assert r.returncode == 0, r.stderr
            replies.append(json.loads(r.stdout))
    finally:
        srv.shutdown()
    assert replies[0] == {"error": "resolve: unknown fields insecure", "code": "INVALID_ARGUMENT"}
    assert "error" in replies[1] and "internal-secret" not in replies[1]["error"]
    assert seen == []                       # TLS was tried, no HTTP request was ever made


@pytest.fixture
def private_registry(tmp_path):
    issuer = TokenIssuer(tmp_path / "issuer", {"hot": "hot-pw:x"}, {"hot": {"hot/*": ["pull"]},
                                                                     "": {}})
    with issuer:
        with RegistryServer(tmp_path / "reg", auth=issuer.registry_auth()) as reg:
            p = Pusher(reg.url)
            p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
                {"type": "repository", "name": "hot/app", "actions": ["pull", "push"]}])
            img = p.image("hot/app", "v1", busybox_layers(os_id="hotpriv"), config=IMAGE_CONFIG)
            yield reg, img


def test_submit_through_the_daemon_reads_the_callers_home_like_before(daemon_in_tmp,
                                                                      private_registry,
                                                                      installed):
    """Credentials under the user's $HOME (not the passwd home): found at submit with or
    without a daemon on the host, and through the daemon they are read as the user."""
    reg, img = private_registry
    user = ensure_user(USER)
    home = Path(tempfile.mkdtemp(prefix="oci-hot-home-", dir="/tmp"))
    try:
        (home / ".docker").mkdir()
        auth = base64.b64encode(b"hot:hot-pw:x").decode()
        (home / ".docker" / "config.json").write_text(
            json.dumps({"auths": {reg.host: {"auth": auth}}}))
        for p in (home, home / ".docker", home / ".docker" / "config.json"):
            os.chown(p, user.pw_uid, user.pw_gid)
        os.chmod(home / ".docker" / "config.json", 0o600)
        d = daemon_in_tmp()
        sock = str(d.socket.parent / "oci-imaged-prefetch.sock")
        tag = f"{reg.host}/hot/app:v1"

        def submit(prefetch_socket):
            client = str(installed.step_client)
            return run_step(["runuser", "-u", USER, "--", "env", f"HOME={home}", client,
                             "submit", *plugstack(f"step_client={client}",
                                                  f"prefetch_socket={prefetch_socket}"),
                             *options(oci_image=tag)], timeout=60, cwd="/tmp")
        for r in (submit("none"), submit(sock)):
            assert r.returncode == 0, r.stderr
            assert r.pinned == f"{tag}@{img.manifest_digest}"
        assert f'"tag resolved for a user" uid={user.pw_uid}' in d.log()   # the daemon's
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_an_open_health_watch_ends_at_the_stop_and_holds_it_no_longer(daemon_in_tmp):
    """Watch streams until the stop begins, says NOT_SERVING and ends; the daemon is gone
    within [daemon] stop_timeout (5 s) however long the watcher would have listened."""
    d = daemon_in_tmp()
    ch = grpc.insecure_channel(f"unix:{d.socket}")
    seen = []
    it = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=600)

    def watch():
        for r in it:
            seen.append((time.monotonic(), r.status))
        seen.append((time.monotonic(), "end"))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    R = health_pb2.HealthCheckResponse
    assert [s for _, s in seen] == [R.SERVING]
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(30)
    stopped = time.monotonic()
    t.join(10)
    ch.close()
    assert [s for _, s in seen] == [R.SERVING, R.NOT_SERVING, "end"]
    assert seen[2][0] - started < 1.0            # the stream ended as the stop began
    assert stopped - started < 5.0 + 1.0
