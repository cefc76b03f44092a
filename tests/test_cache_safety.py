"""What the cache must survive on a shared filesystem: stale "does not exist" answers, a
remover stalled past claim_stale, nodes in different lock modes, transient claim errors,
dead claimers, clocks that disagree, and many entries at once (real processes and files)."""

import hashlib
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ociimage import eviction
from ociimage.cache import Cache, entry_name
from ociimage.cachelock import ClaimLock, FlockLock, LockLost
from ociimage.cachemode import detect_locking
from ociimage.errors import ConfigError
from ociimage.leases import LeaseBook
from ociimage.runtime.mounts import MountEntry
from test_cache_coord import wait_for

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
ctx = multiprocessing.get_context("fork")
CLAIM = {"locking": "claim", "claim_stale": 2.0, "claim_poll": 0.1}


def dg(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


def put(c: Cache, d: str, data: bytes = b"x" * 100, **meta):
    return c.build(d, lambda tmp: (tmp.write_bytes(data), dict(meta))[1])




def _mounts(mp, fstype, super_options, options="rw"):
    return [MountEntry(1, 0, "/", "/", "rw", "", "ext4", "/dev/vda", "rw"),
            MountEntry(2, 1, "/", str(mp), options, "", fstype, "srv:/export", super_options)]


# ---- A: a lone image file is never taken for garbage by a converter -------------------------

def test_a_converter_leaves_a_lone_image_file_alone(tmp_path):
    """On NFS a cached "no metadata" answer makes a just-published entry look like a
    crashed writer's lone .sqfs: deleting it there would ESTALE every node using it."""
    c, d = Cache(tmp_path / "c"), dg("lone")
    c.sqfs_path(d).write_bytes(b"published by another node")
    seen = []
    e = c.build(d, lambda tmp: (seen.append(c.sqfs_path(d).exists()), tmp.write_bytes(b"new"),
                                {})[2])
    assert seen == [True], "the converter deleted the image file before publishing its own"
    assert e.path.read_bytes() == b"new"  # the publish replaced it


def test_prune_removes_only_old_lone_image_files(tmp_path):
    c = Cache(tmp_path / "c")
    young, old, kept = dg("young"), dg("old"), dg("kept")
    put(c, kept)
    for d in (young, old):
        c.sqfs_path(d).write_bytes(b"lone")
    hours_ago = time.time() - 7200
    os.utime(c.sqfs_path(old), (hours_ago, hours_ago))
    os.utime(c.sqfs_path(kept), (hours_ago, hours_ago))
    c.prune(keep=lambda d: d == kept)
    assert c.sqfs_path(young).exists() and not c.sqfs_path(old).exists()
    assert c.get(kept) is not None


@pytest.mark.parametrize("super_options,ok", [
    ("rw,vers=4.2,addr=10.0.0.1", False),           # lookupcache=all is the default
    ("rw,vers=4.2,lookupcache=pos,addr=10.0.0.1", True),
    ("rw,vers=3,lookupcache=none", True),
])
def test_daemon_start_requires_lookupcache_positive_on_nfs(tmp_path, super_options, ok):
    c = Cache(tmp_path / "c")
    mounts = _mounts(tmp_path, "nfs4", super_options)
    if ok:
        c.check_locking(mounts)
        return
    with pytest.raises(ConfigError, match=r"-o lookupcache=positive") as e:
        c.check_locking(mounts)
    assert "\n" not in str(e.value)
    c.check_locking(_mounts(tmp_path, "ext4", "rw"))  # not NFS: nothing to require


# ---- B: a remover stalled past claim_stale deletes nothing of the taker's ------------------

def _remove(root, d, out):
    try:
        Cache(root, node="A", **CLAIM).remove(d)
        out.write_text("removed")
    except Exception as e:  # noqa: BLE001
        out.write_text(f"{type(e).__name__}: {e}")


def test_a_remover_that_lost_its_claim_deletes_nothing(tmp_path):
    root, d = tmp_path / "c", dg("stalled-remover")
    b = Cache(root, node="B", **CLAIM)
    put(b, d, b"o" * 100, v="old")
    # an old-format lease name makes the remover open it while listing leases: a FIFO
    # holds it there, between hiding the metadata and deciding
    (root / "leases" / "Z").mkdir()
    fifo = root / "leases" / "Z" / "0123.json"
    os.mkfifo(fifo, 0o600)
    out = tmp_path / "out"
    p = ctx.Process(target=_remove, args=(root, d, out))
    p.start()
    try:
        wait_for(lambda: not b.meta_path(d).exists(), what="the remover to hide the entry")
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGSTOP)  # a stall longer than claim_stale
        # takes the claim over and puts the whole entry's metadata back (it may be leased)
        e = put(b, d, b"n" * 300, v="new")
        assert e.meta["v"] == "old"
        os.kill(p.pid, signal.SIGCONT)
        with open(fifo, "w"):
            pass
        p.join(30)
    finally:
        os.kill(p.pid, signal.SIGKILL) if p.is_alive() else None
    assert "ClaimLost" in out.read_text()
    got = b.get(d)
    assert got is not None and got.meta["v"] == "old" and got.size == 100


def test_putting_metadata_back_never_overwrites_a_newer_entry(tmp_path):
    c, d = Cache(tmp_path / "c"), dg("unhide")
    put(c, d, b"o" * 100, v="old")
    aside = tmp_path / "aside.json"  # out of tmp/, where a converter would put it back
    os.rename(eviction._hide(c, d), aside)
    put(c, d, b"n" * 300, v="new")
    eviction._unhide(c, d, aside)
    assert c.get(d).meta["v"] == "new" and not aside.exists()


# ---- C: one lock mode per cache ---------------------------------------------------------------

def test_a_node_in_another_lock_mode_refuses_to_start(tmp_path):
    root = tmp_path / "c"
    Cache(root, node="A", locking="flock")
    with pytest.raises(ConfigError) as e:
        Cache(root, node="B", locking="claim")
    msg = str(e.value)
    assert "claim" in msg and "flock" in msg and "locking.json" in msg and "\n" not in msg
    Cache(root, node="C", locking="flock")  # the same mode: fine
    assert json.loads((root / "locking.json").read_text())["mode"] == "flock"
    assert (root / "locking.json").stat().st_mode & 0o077 == 0


def _open_cache(root, mode, out):
    try:
        Cache(root, node=mode, locking=mode)
        out.write_text("ok")
    except ConfigError:
        out.write_text("refused")


def test_first_daemons_racing_agree_on_one_mode(tmp_path):
    root = tmp_path / "c"
    Cache(tmp_path / "c")  # the layout exists; no mode recorded yet
    (root / "locking.json").unlink()
    outs = [tmp_path / f"o{i}" for i in range(8)]
    procs = [ctx.Process(target=_open_cache, args=(root, ("flock", "claim")[i % 2], o))
             for i, o in enumerate(outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    winner = json.loads((root / "locking.json").read_text())["mode"]
    for i, o in enumerate(outs):
        assert o.read_text() == ("ok" if ("flock", "claim")[i % 2] == winner else "refused")


@pytest.mark.parametrize("fstype,super_options,mode", [
    ("beegfs", "rw,cfgFile=/etc/beegfs/beegfs-client.conf", "claim"),
    ("fuse.sshfs", "rw,user_id=0", "claim"),
    ("fuse", "rw", "claim"),
    ("cifs", "rw,vers=3.1.1", "claim"),        # not known to be coherent
    ("gpfs", "rw", "flock"),
    ("ceph", "rw,name=admin", "flock"),
    ("xfs", "rw,attr2", "flock"),
    ("tmpfs", "rw", "flock"),
])
def test_auto_uses_flock_only_where_known_coherent(tmp_path, fstype, super_options, mode):
    got, why = detect_locking(tmp_path / "cache", _mounts(tmp_path, fstype, super_options))
    assert got == mode and fstype in why


# ---- D: claim details ---------------------------------------------------------------------------

def _claim(tmp_path, node="A", stale=2.0):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return ClaimLock(tmp_path / "x.claim", "sha256:x", tmp_path / "tmp", node, stale=stale)


def test_a_transient_error_does_not_end_the_heartbeat(tmp_path):
    lk = _claim(tmp_path)
    assert lk.try_acquire()
    lk.keep_alive()  # beats every 0.5 s
    try:
        # the claim unreadable for a while (EISDIR here; EIO or ESTALE on NFS), then back
        os.rename(lk.path, tmp_path / "held")
        lk.path.mkdir()
        time.sleep(1.6)
        lk.path.rmdir()
        os.rename(tmp_path / "held", lk.path)
        before = lk.path.stat().st_mtime_ns
        wait_for(lambda: lk.path.stat().st_mtime_ns != before, timeout=5,
                 what="a heartbeat after the error")
        assert not lk.was_lost()
        lk.check_owned()
    finally:
        lk.release()
    assert not lk.path.exists()


def test_a_lost_claim_released_leaves_the_new_claim_untouched(tmp_path):
    a, c = _claim(tmp_path, "A"), _claim(tmp_path, "C")
    assert a.try_acquire()
    a.path.unlink()  # taken over: the taker removed it ...
    assert c.try_acquire()  # ... and another node claimed it since
    st = c.path.stat()
    time.sleep(0.05)
    a.release()
    after = c.path.stat()
    assert (after.st_ino, after.st_ctime_ns) == (st.st_ino, st.st_ctime_ns), \
        "release moved another node's live claim"
    assert c.owned()
    c.release()


def test_a_stale_takeover_does_not_move_a_changed_claim(tmp_path):
    a, b = _claim(tmp_path, "A"), _claim(tmp_path, "B")
    assert a.try_acquire()
    sig = b._signature()
    time.sleep(0.02)
    os.utime(a.path)  # a heartbeat after the waiter looked: alive
    ctime = a.path.stat().st_ctime_ns
    assert not b._take_over(sig)
    assert a.path.stat().st_ctime_ns == ctime and a.owned()
    a.release()


def test_a_retransmitted_link_is_recognised_as_ours(tmp_path):
    lk = _claim(tmp_path)
    tmp = tmp_path / "tmp" / "claim.A.mine"
    tmp.write_text(json.dumps({"token": "feedbeef"}))
    os.link(tmp, lk.path)  # the first LINK happened; its reply was lost
    assert lk._link(tmp, "feedbeef")
    other = tmp_path / "tmp" / "claim.B"
    other.write_text(json.dumps({"token": "0ther"}))
    assert not lk._link(other, "0ther")  # a claim that is not ours


# ---- E: a dead claimer's claim ends -------------------------------------------------------------

def _claim_and_die(root, d, build):
    c = Cache(root, node="dead", **CLAIM)
    if build:
        put(c, d)
    lk = c.lock(d)
    assert lk.try_acquire()
    if not build:  # crashed mid-conversion: its temp file stays
        (c.tmp / f"{entry_name(d)}.dead.1.abcd.sqfs").write_bytes(b"half")
    os._exit(0)  # no release


def test_prune_and_sweep_take_over_dead_claims(tmp_path):
    root, published, halfway = tmp_path / "c", dg("published"), dg("halfway")
    c = Cache(root, node="n", **CLAIM)
    for d, build in ((published, True), (halfway, False)):
        p = ctx.Process(target=_claim_and_die, args=(root, d, build))
        p.start()
        p.join(30)
    assert c.prune() == []  # claimed: first seen now
    time.sleep(2.2)  # claim_stale with no heartbeat
    assert [e.digest for e in c.prune()] == [published]
    assert not list(c.locks.glob("*.claim")) and not list(c.tmp.iterdir())


# ---- F: lease liveness in the file server's time ------------------------------------------------

def test_a_node_whose_clock_is_behind_keeps_its_leases(tmp_path):
    root, d = tmp_path / "c", dg("skew")
    a, b = Cache(root, node="A", lease_ttl=60), Cache(root, node="B", lease_ttl=60)
    put(a, d)
    b._book.clock = lambda: time.time() - 3600
    b.heartbeat()
    b.add_lease(d, "job 1.0")
    assert a.prune() == [] and a.get(d) is not None


def test_liveness_compares_heartbeats_with_the_servers_time(tmp_path):
    root, d = tmp_path / "c", dg("skew2")
    a, b = Cache(root, node="A"), Cache(root, node="B")
    put(a, d)
    b.add_lease(d, "job 1.0")
    alive = root / "leases" / "B" / "alive"
    a._book.clock = lambda: time.time() + 3600  # A's clock is ahead
    os.utime(alive, (time.time() + 30,) * 2)
    assert a.prune() == []
    a._book.clock = lambda: time.time() - 3600  # behind
    os.utime(alive, (time.time() - 30,) * 2)
    assert [e.digest for e in a.prune()] == [d]


def test_a_lease_deleted_while_its_node_was_down_is_restored(tmp_path):
    root, d = tmp_path / "c", dg("restore")
    c = Cache(root, node="A")
    put(c, d)
    lease = c.add_lease(d, "job 1.0")
    c.drop_lease(lease)  # as a prune elsewhere deletes a dead node's leases
    back = c.restore_lease(lease.id, "job 1.0")
    assert back.id == lease.id and lease.id in c.own_lease_ids()
    assert LeaseBook(root / "leases", root / "tmp", "B").snapshot().live[d]


# ---- G: small things ---------------------------------------------------------------------------

def test_a_flock_wait_works_with_descriptors_above_1024(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("RLIMIT_NOFILE too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(1030)]
    try:
        holder, waiter = FlockLock(tmp_path / "l", "x"), FlockLock(tmp_path / "l", "x")
        assert holder.try_acquire()
        threading.Timer(1.5, holder.release).start()
        assert waiter.acquire(10, "test")
        waiter.release()
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_lost_flock_is_noticed_before_publishing(tmp_path):
    lk, other = FlockLock(tmp_path / "l", "x"), FlockLock(tmp_path / "l", "x")
    assert lk.try_acquire()
    lk.check_owned()
    import fcntl
    fcntl.flock(lk._fd, fcntl.LOCK_UN)  # what NFSv4 does when the client's lease expired
    assert other.try_acquire()
    with pytest.raises(LockLost, match="lost"):
        lk.check_owned()
    assert lk.was_lost()
    other.release()
    lk.release()


def test_prune_of_more_entries_than_descriptors(tmp_path):
    root = tmp_path / "c"
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(DAEMON)!r})
        from ociimage.cache import Cache
        c = Cache({str(root)!r}, node="A", locking="flock")
        for i in range(150):
            c.build("sha256:%064x" % i, lambda p: (p.write_bytes(b"x" * 10), {{}})[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
        print(len(c.prune()), len(c.list()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["150", "0"]
