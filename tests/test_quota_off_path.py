"""Quota enforcement never holds up the pull that triggered it (issue 15, user attack review).

Deciding what eviction spares asks the registry, with each job owner's credentials,
about every cached image that users' job comments name. A user who names images they
converted from a registry of their own, which answers slowly, must not make another
user's step wait: the quota runs after the pull has returned. The slow registry is the
attacker's (a small HTTP server: anything may answer there); the image pulled comes from
the real docker-registry; the job list stands in for squeue's (a user's comment).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from images import busybox_layers
from ocibuild import Pusher

from ociimage.cache import Cache
from ociimage.config import Config
from ociimage.images import ImageStore
from ociimage.slurm import Job, SlurmJobs

BOB = 1002
HEAD_DELAY = 4.0
D = "sha256:" + "b0" * 32


class SlowRegistry:
    def __init__(self):
        self.heads = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                outer.heads += 1
                time.sleep(HEAD_DELAY)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.host = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class BobsJobs:
    """squeue's answer: one pending job of bob's whose comment names his image."""

    def jobs(self):
        return [Job("9", "PENDING", "bob", BOB, [D])]


def test_a_slow_registry_named_in_job_comments_does_not_hold_up_a_pull(tmp_path, registry):
    slow = SlowRegistry()
    cache = Cache(tmp_path / "cache", node="n1")
    # bob converted an image from his own registry earlier: its source is that registry
    cache.build(D, lambda p: (p.write_bytes(b"x" * 100), {"reference": f"{slow.host}/bob/x@{D}"})[1])
    store = ImageStore(cache, Config(cache_dir=tmp_path / "cache", quota=1,
                                     insecure_registries=[registry.host, slow.host]))
    store.slurm = SlurmJobs(BobsJobs(), ttl=0)
    img = Pusher(registry.url).image("quota/alice", "v1", busybox_layers(os_id="alice"))
    t0 = time.monotonic()
    entry = store.pull(f"{registry.host}/quota/alice@{img.manifest_digest}")
    took = time.monotonic() - t0
    assert entry.digest == img.manifest_digest
    assert took < HEAD_DELAY, f"the pull waited {took:.1f} s for bob's registry"
    # the quota still runs, after the pull: it asks bob's registry as bob, is refused
    # (404), so bob's marker spares nothing and his image is evicted
    deadline = time.monotonic() + 30
    while cache.get(D) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slow.heads >= 1 and cache.get(D) is None
    slow.server.shutdown()
