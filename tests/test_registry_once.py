"""Issue 15 point 1: registry requests per job start do not grow with the number of nodes.

Real parts: 8 real oci-imaged processes (tests/daemon_proc.py) sharing one
cache directory, a counting RegistryProxy in front of the real docker-registry
(and of a token-auth one for private images), all asked at once, as an
ordinary user, for a digest-pinned image none of them has seen: a cold job
start on 8 nodes; then again: a new job on the cached image. The proxy's log
is what the registry saw, counted by kind.

Goals (the submit-side tag lookup is one more request, not made here):
cold: manifest + config requests <= 2 (an index: + 1 for the index itself),
blob GETs == blobs, one conversion; cached: <= 1 registry request in all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from daemon_proc import DaemonProcess
from ocibuild import Entry, Pusher
from registry_proxy import RegistryProxy
from registry_server import RegistryServer
from test_security import docker_login, ensure_user
from token_issuer import TokenIssuer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")

NODES = 8
UID = 4242          # no passwd entry: no credentials, the anonymous user
UID_B = 4343
USER_A = "ociro-a"  # this file's own users (other test files rewrite theirs)
A_PW = "ro-Alice-pw-15"


def _layers(name: str, n: int = 3):
    rnd = random.Random(name)
    return [[Entry(f"l{i}/", "dir", mode=0o755),
             Entry(f"l{i}/{name}", data=rnd.randbytes(8 << 10))] for i in range(n)]


class Counts:
    """What the registry was asked, by kind, from the proxy's log since mark()."""

    def __init__(self, proxy: RegistryProxy, config_digests=()):
        self.proxy, self.configs = proxy, set(config_digests)
        self.start = 0

    def mark(self) -> None:
        self.start = len(self.proxy.log)

    def kinds(self) -> dict:
        out = {"manifest": 0, "config": 0, "layer": 0, "other": 0, "unauthorized": 0}
        for method, path, status in self.proxy.log[self.start:]:
            path = path.split("?", 1)[0]
            if status == 401:
                out["unauthorized"] += 1  # a Bearer challenge, or a refusal: counted apart
            elif "/manifests/" in path and method in ("GET", "HEAD"):
                out["manifest"] += 1
            elif "/blobs/" in path and method == "GET":
                out["config" if path.rsplit("/", 1)[1] in self.configs else "layer"] += 1
            elif path != "/v2/":
                out["other"] += 1
        return out


@pytest.fixture
def nodes(tmp_path):
    made = []

    def start(n: int = NODES, first: int = 0):
        base = tmp_path / "d"
        base.mkdir(exist_ok=True)
        new = []
        for i in range(first, first + n):
            conf = base / f"n{i}.conf"
            conf.write_text("[daemon]\nprefetch_socket = off\n")
            new.append(DaemonProcess(base, tmp_path / "cache", node=f"n{i}", metrics=False,
                                     extra=["--config", str(conf)]))
        made.extend(new)
        # started together: 8 Python daemons on a small machine take a while each; a
        # daemon that did not start fails the test with its own log (DaemonProcess.start)
        with ThreadPoolExecutor(len(new)) as ex:
            for f in [ex.submit(d.start, 120) for d in new]:
                f.result()
        assert all(d.proc and d.proc.poll() is None for d in new)
        return new

    yield start
    for d in made:
        d.kill()


def pull_all(daemons, ref: str, uid: int):
    """Pull ref as uid on every daemon at once; -> [("image", digest) | (code, details)]."""
    from ociimage.v1 import ociimage_pb2 as pb
    from ociimage.v1 import ociimage_pb2_grpc as pbg
    results = [None] * len(daemons)
    go = threading.Barrier(len(daemons))

    def one(i, d):
        ch = grpc.insecure_channel(f"unix:{d.socket}")
        try:
            go.wait()
            try:
                for ev in pbg.ImagesStub(ch).Pull(pb.PullRequest(reference=ref, uid=uid),
                                                  timeout=300):
                    if ev.WhichOneof("event") == "image":
                        results[i] = ("image", ev.image.digest)
                        return
                results[i] = ("none", "")
            except grpc.RpcError as e:
                results[i] = (e.code().name, e.details())
        finally:
            ch.close()

    threads = [threading.Thread(target=one, args=(i, d)) for i, d in enumerate(daemons)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(320)
    return results


def conversions(daemons) -> int:
    return sum(d.log().count('"converting"') for d in daemons)


def test_cold_and_cached_start_ask_the_registry_once(fresh_registry, nodes):
    with RegistryProxy(fresh_registry.url) as proxy:
        img = Pusher(fresh_registry.url).image("once/plain", "v1", _layers("plain"))
        ref = f"{proxy.host}/once/plain@{img.manifest_digest}"
        counts = Counts(proxy, [img.config_digest])
        daemons = nodes()
        counts.mark()
        started = time.monotonic()
        results = pull_all(daemons, ref, UID)
        assert results == [("image", img.manifest_digest)] * NODES, results
        cold = counts.kinds()
        print(f"cold start on {NODES} nodes: {cold} in {time.monotonic() - started:.1f}s")
        assert cold["manifest"] + cold["config"] <= 2, cold
        assert cold["config"] == 1 and cold["layer"] == len(img.layer_digests), cold
        assert conversions(daemons) == 1
        # The builder pulled as UID: its verdict serves every node's new job.
        counts.mark()
        assert pull_all(daemons, ref, UID) == [("image", img.manifest_digest)] * NODES
        cached = counts.kinds()
        print(f"new job, same user: {cached}")
        assert sum(cached.values()) <= 1, cached
        # Another user, never asked about: one question for the cluster, then shared.
        counts.mark()
        assert pull_all(daemons, ref, UID_B) == [("image", img.manifest_digest)] * NODES
        other = counts.kinds()
        print(f"new job, another user: {other}")
        assert sum(other.values()) <= 1, other
        assert conversions(daemons) == 1


def test_index_image_is_resolved_and_converted_once(fresh_registry, nodes):
    with RegistryProxy(fresh_registry.url) as proxy:
        p = Pusher(fresh_registry.url)
        amd = p.image("once/multi", None, _layers("amd64"), architecture="amd64")
        arm = p.image("once/multi", None, _layers("arm64", 2), architecture="arm64")
        index = p.index("once/multi", "v1", [amd, arm],
                        [{"os": "linux", "architecture": "amd64"},
                         {"os": "linux", "architecture": "arm64", "variant": "v8"}])
        import platform as _p
        mine = amd if _p.machine() in ("x86_64", "amd64") else arm
        ref = f"{proxy.host}/once/multi@{index}"
        counts = Counts(proxy, [amd.config_digest, arm.config_digest])
        daemons = nodes()
        counts.mark()
        results = pull_all(daemons, ref, UID)
        # the entry is the platform manifest's, whatever digest the step names
        assert results == [("image", mine.manifest_digest)] * NODES, results
        cold = counts.kinds()
        print(f"cold start of an index on {NODES} nodes: {cold}")
        assert cold["manifest"] <= 2 and cold["config"] == 1, cold       # index + manifest
        assert cold["layer"] == len(mine.layer_digests), cold
        assert conversions(daemons) == 1
        counts.mark()
        assert pull_all(daemons, ref, UID) == [("image", mine.manifest_digest)] * NODES
        cached = counts.kinds()
        print(f"new job on the cached index: {cached}")
        assert sum(cached.values()) <= 1, cached
        cache = Path(daemons[0].cache_dir)
        assert len(list((cache / "records" / "resolved").glob("*.json"))) == 1
        assert not (cache / "images" / (index.replace(":", "-") + ".json")).exists()


@pytest.fixture
def token_registry(tmp_path):
    issuer = TokenIssuer(tmp_path / "issuer", {"ro-alice": A_PW},
                         {"ro-alice": {"priv/*": ["pull"]}})
    with issuer:
        with RegistryServer(tmp_path / "reg", auth=issuer.registry_auth()) as reg:
            p = Pusher(reg.url)
            p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
                {"type": "repository", "name": "priv/app", "actions": ["pull", "push"]}])
            img = p.image("priv/app", "v1", _layers("private"))
            yield issuer, reg, img


def test_private_image_verdicts_are_shared_and_per_user(token_registry, nodes):
    issuer, reg, img = token_registry
    with RegistryProxy(reg.url) as proxy:
        pw = ensure_user(USER_A)
        docker_login(USER_A, proxy.host, "ro-alice", A_PW)
        ref = f"{proxy.host}/priv/app@{img.manifest_digest}"
        counts = Counts(proxy, [img.config_digest])
        daemons = nodes()
        counts.mark()
        results = pull_all(daemons, ref, pw.pw_uid)
        assert results == [("image", img.manifest_digest)] * NODES, results
        cold = counts.kinds()
        print(f"cold start of a private image on {NODES} nodes: {cold}")
        assert cold["manifest"] + cold["config"] <= 2, cold
        assert cold["unauthorized"] <= 1, cold          # the builder's first challenge
        assert cold["layer"] == len(img.layer_digests), cold
        assert conversions(daemons) == 1
        counts.mark()
        assert pull_all(daemons, ref, pw.pw_uid) == [("image", img.manifest_digest)] * NODES
        assert sum(counts.kinds().values()) == 0        # the builder's verdict, shared
        # B has no credentials: refused everywhere although A's positive verdict is on
        # record, with one question for the cluster; the refusal is shared too.
        counts.mark()
        refused = pull_all(daemons, ref, UID_B)
        assert all(code == "PERMISSION_DENIED" and "private image" in details
                   for code, details in refused), refused
        asked = counts.kinds()
        print(f"user without credentials on {NODES} nodes: {asked}")
        # one anonymous question for the cluster: the Bearer challenge (on a client that
        # has not met this registry yet), then the answer (401 with an anonymous token)
        assert asked["unauthorized"] <= 2 and sum(asked.values()) == asked["unauthorized"], asked
        counts.mark()
        assert all(code == "PERMISSION_DENIED" for code, _ in pull_all(daemons, ref, UID_B))
        assert sum(counts.kinds().values()) == 0        # within the negative TTL: no question
        access = Path(daemons[0].cache_dir) / "records" / "access"
        records = {json.loads(r.read_text())["uid"]: r for r in access.glob("*.json")}
        assert sorted(records) == sorted([pw.pw_uid, UID_B])  # A's positive, B's negative
        for r in records.values():
            assert r.stat().st_mode & 0o777 == 0o600 and r.stat().st_uid == 0
        # A's positive verdict put in B's place is not B's: ignored, and B is asked about
        shutil.copyfile(records[pw.pw_uid], records[UID_B])
        fresh = nodes(1, first=NODES)
        counts.mark()
        [(code, _)] = pull_all(fresh, ref, UID_B)
        assert code == "PERMISSION_DENIED"
        assert counts.kinds()["unauthorized"] >= 1
