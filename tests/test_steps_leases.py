"""A step's lease while its image is still being pulled (issue 15 review).

The lease is taken before the pull (Cache.reserve), so that no prune on any node evicts
the image between its pull and its use; a pull can take an hour, during which the
node's housekeeping sweeps leases that no step holds. The pull here is the real
Cache.build of the image, made slow by running the housekeeping sweeps inside it.
"""

from __future__ import annotations

from ociimage.cache import Cache
from ociimage.config import Config
from ociimage.runtime.steps import StepManager

D = "sha256:" + "ab" * 32


class SlowPull:
    """ImageStore.pull as a step sees it: the real cache build, during which the node's
    housekeeping sweeps twice (a long conversion spans several sweeps)."""

    def __init__(self, cache: Cache):
        self.cache, self.steps = cache, None
        self.seen = []

    def pull(self, image, uid=None, report=None):
        for _ in range(2):
            self.steps._swept_at -= 10 * self.steps._ttl   # the next sweep is due now
            self.steps.housekeeping()
            self.seen.append(sorted(self.cache.own_lease_ids()))
        return self.cache.build(D, lambda p: (p.write_bytes(b"hsqs" + b"\0" * 100), {})[1])


def test_a_lease_taken_before_a_long_pull_survives_the_sweeps_and_any_prune(tmp_path):
    cfg = Config(lease_ttl=20.0, runtime_dir=tmp_path / "run", node="A",
                 cache_dir=tmp_path / "cache")
    a = Cache(tmp_path / "cache", node="A", lease_ttl=20.0)
    other = Cache(tmp_path / "cache", node="B", lease_ttl=20.0)
    store = SlowPull(a)
    steps = StepManager(cfg, a, store)
    store.steps = steps

    class Request:
        image, job_id, step_id, uid = f"reg.example/x@{D}", "1", "0", 1000

    entry, lease_id = steps._pull_and_lease(Request, lambda ev: None)
    assert store.seen == [[lease_id], [lease_id]]     # the reservation outlived both sweeps
    assert lease_id in a.own_lease_ids()
    assert other.prune() == []                        # so no node may evict the image
    assert a.get(D) is not None and entry.digest == D
