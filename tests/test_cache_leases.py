"""Leases at scale: a hit never waits for a lock, renewal is one heartbeat per node, a node
reads only its own lease directory, and prune reads the leases once whatever the number of
entries (measured with strace on real processes)."""

import hashlib
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ociimage.cache import Cache, entry_name
from ociimage.config import Config
from ociimage.errors import InUse, NotFound

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
ctx = multiprocessing.get_context("fork")
needs_strace = pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")


def dg(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


def put(c: Cache, d: str, size: int = 100):
    return c.build(d, lambda tmp: (tmp.write_bytes(b"x" * size), {})[1])


def traced(tmp_path, body: str, name="trace"):
    """Run body in a fresh Python under strace; the calls as strace -y wrote them."""
    trace = tmp_path / name
    script = f"import sys\nsys.path.insert(0, {str(DAEMON)!r})\n" + textwrap.dedent(body)
    out = subprocess.run(["strace", "-f", "-y", "-e", "trace=%file,%desc", "-o", str(trace),
                          sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return trace.read_text().splitlines()


@pytest.mark.parametrize("locking", ["flock", "claim"])
def test_a_hit_leases_at_once_while_another_process_holds_the_digest(tmp_path, locking):
    root, d = tmp_path / "c", dg("busy")
    put(Cache(root, locking=locking), d)
    held, release = ctx.Event(), ctx.Event()

    def hold():
        lk = Cache(root, node="other", locking=locking).acquire(d)
        held.set()
        release.wait(60)
        lk.release()

    p = ctx.Process(target=hold)
    p.start()
    try:
        assert held.wait(30)
        c = Cache(root, node="n1", locking=locking, lock_timeout=30)
        t0 = time.monotonic()
        lease = c.add_lease(d, "job 1.0")
        assert time.monotonic() - t0 < 5, "add_lease waited for the digest's lock"
        assert p.is_alive() and lease.id in c.own_lease_ids()
    finally:
        release.set()
        p.join(30)


def test_leases_live_by_their_node_s_heartbeat(tmp_path):
    root, d = tmp_path / "c", dg("hb")
    n1, n2 = Cache(root, node="n1"), Cache(root, node="n2")
    put(n1, d)
    n2.add_lease(d, "job 7.0", ttl=1.0)
    for _ in range(3):  # kept alive past its ttl by heartbeats alone, nothing rewritten
        time.sleep(0.5)
        n2.heartbeat(1.0)
    with pytest.raises(InUse, match="job 7.0 on n2"):
        n1.remove(d)
    time.sleep(1.2)  # no heartbeat: n2 looks dead, its leases no longer count
    assert n1.leases_for(d) == []
    n1.remove(d)
    assert not list((root / "leases" / "n2").glob("*.json")), "a dead node's leases are deleted"
    with pytest.raises(NotFound):
        n2.add_lease(d, "job 8.0")
    assert not list((root / "leases" / "n2").glob("*.json")), "a refused lease is not left"


def _lease_and_check(root, d, n, errors):
    c = Cache(root, node=f"hit{os.getpid()}")
    sqfs = c.sqfs_path(d)
    got = 0
    for _ in range(n):
        try:
            lease = c.add_lease(d, "job 1.0")
        except NotFound:
            continue
        got += 1
        try:
            before = os.stat(sqfs).st_ino  # what a step would mount
            time.sleep(0.001)
            after = os.stat(sqfs).st_ino
        except FileNotFoundError:
            before, after = 0, -1
        if before != after:
            with open(errors, "a") as f:
                f.write("evicted while leased\n")
        c.drop_lease(lease)
    with open(errors, "a") as f:
        f.write(f"leased {got}\n")


def test_prune_never_evicts_an_entry_leased_without_a_lock(tmp_path):
    """Hits lease (no lock) while another process prunes and rebuilds: whenever add_lease
    succeeded, the image file stays (same inode) until the lease is dropped. (The metadata
    may be put aside for a moment and back: then a new hit waits for prune's lock.)"""
    root, d = tmp_path / "c", dg("race")
    put(Cache(root), d)
    errors = tmp_path / "errors"
    hitters = [ctx.Process(target=_lease_and_check, args=(root, d, 300, errors))
               for _ in range(2)]
    for p in hitters:
        p.start()
    pruner = Cache(root, node="pruner")
    evicted = 0
    while any(p.is_alive() for p in hitters):
        evicted += len(pruner.prune())
        put(pruner, d)
    for p in hitters:
        p.join()
        assert p.exitcode == 0
    lines = errors.read_text().splitlines()
    assert "evicted while leased" not in lines
    assert evicted > 0 and sum(int(ln.split()[1]) for ln in lines if ln.startswith("leased")) > 0


@needs_strace
def test_prune_lists_leases_once_not_per_entry(tmp_path):
    """40 entries, 60 leases on 3 nodes (one dead): the old prune read every lease per entry
    (40 x 60 opens); now no lease file is opened and each node directory is listed twice."""
    root = tmp_path / "c"
    nodes = {n: Cache(root, node=n) for n in ("n1", "n2", "dead")}
    digests = [dg(f"e{i}") for i in range(40)]
    for d in digests:
        put(nodes["n1"], d)
    for i in range(54):  # digests 0-9 leased by live nodes, 10-12 only by the dead one
        nodes[("n1", "n2")[i % 2]].add_lease(digests[i % 10], f"job {i}.0")
    for i in range(6):
        nodes["dead"].add_lease(digests[10 + i % 3], f"job {i}.0")
    alive = root / "leases" / "dead" / "alive"
    os.utime(alive, (time.time() - 10,) * 2)  # its heartbeat passed: a dead node
    lines = traced(tmp_path, f"""
        from ociimage.cache import Cache
        removed = Cache({str(root)!r}, node="n1").prune()
        assert len(removed) == 40 - 10, len(removed)  # the dead node's digests go too
    """)
    under = [ln for ln in lines if f"{root}/leases/" in ln]
    opened_leases = [ln for ln in under if "openat(" in ln and ".json" in ln]
    assert len(opened_leases) <= 60, "prune read leases per entry"
    assert opened_leases == []
    listed = [ln for ln in under if "openat(" in ln and "O_DIRECTORY" in ln]
    assert len(listed) <= 2 * 3 + 2, "\n".join(listed)
    assert len(list((root / "leases" / "dead").glob("*.json"))) == 0
    assert len(list((root / "leases").glob("n*/*.json"))) == 54


@needs_strace
def test_housekeeping_is_one_heartbeat_and_reads_no_other_node(tmp_path):
    """50 leases of this node, 50 of another: housekeeping touches its heartbeat once and
    opens nothing under another node's directory, nor any lease file."""
    root = tmp_path / "c"
    n1, other = Cache(root, node="n1"), Cache(root, node="other")
    d = dg("hk")
    put(n1, d)
    for i in range(50):
        n1.add_lease(d, f"job {i}.0")
        other.add_lease(d, f"job {i}.0")
    lines = traced(tmp_path, f"""
        from pathlib import Path
        from ociimage.cache import Cache
        from ociimage.config import Config
        from ociimage.runtime.steps import StepManager
        cfg = Config(cache_dir=Path({str(root)!r}), runtime_dir=Path({str(tmp_path / "run")!r}),
                     node="n1", lease_ttl=60)
        cache = Cache(cfg.cache_dir, node="n1", lease_ttl=60)
        sm = StepManager(cfg, cache, None)
        sm._swept_at -= 60  # due for the leaked-lease sweep as well
        sm.housekeeping()
    """)
    under = [ln for ln in lines if f"{root}/leases/" in ln]
    assert not [ln for ln in under if "/leases/other" in ln], "read another node's leases"
    assert not [ln for ln in under if ".json" in ln], "renewal opened lease files"
    assert [ln for ln in under if "utimensat(" in ln and "/leases/n1/alive" in ln]
    assert len(under) <= 10, "\n".join(under)  # one utime, one listing (the sweep)
    assert os.stat(root / "leases" / "n1" / "alive").st_mtime > time.time() + 50


def test_housekeeping_drops_leases_no_step_holds(tmp_path):
    """A lease a step leaked (its release never came) is dropped by its own node's
    housekeeping once two sweeps (lease_ttl/2 apart) found no step holding it."""
    from ociimage.runtime.steps import StepManager
    root = tmp_path / "c"
    cache = Cache(root, node="n1", lease_ttl=10)
    d = dg("leak")
    put(cache, d)
    leaked = cache.add_lease(d, "job 5.0")
    kept = Cache(root, node="other").add_lease(d, "job 6.0")
    sm = StepManager(Config(cache_dir=root, runtime_dir=tmp_path / "run", node="n1",
                            lease_ttl=10), cache, None)
    for _ in range(2):
        sm._swept_at -= 10
        assert leaked.id in cache.own_lease_ids()
        sm.housekeeping()
    assert leaked.id not in cache.own_lease_ids()
    assert kept.path.exists()  # another node's lease is never this node's to drop


def test_node_leases_and_release_read_only_this_node(tmp_path):
    root = tmp_path / "c"
    n1, n2 = Cache(root, node="n1"), Cache(root, node="n2")
    d = dg("own")
    put(n1, d)
    mine = n1.add_lease(d, "job 1.0")
    n2.add_lease(d, "job 1.0")
    (root / "leases" / "n2").chmod(0)  # what n1 would trip over if it looked (root ignores
    try:                               # modes, so also: the names prove it)
        assert set(n1.node_leases()) == {mine.id} and n1.own_lease_ids() == {mine.id}
        assert all(le.node == "n1" for le in n1.node_leases().values())
    finally:
        (root / "leases" / "n2").chmod(0o700)
    assert {le.node for le in n1.iter_leases()} == {"n1", "n2"}  # display reads all
    assert mine.path.name.startswith(entry_name(d) + ".")
