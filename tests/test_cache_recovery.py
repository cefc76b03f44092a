"""Recovery from failures half-way: a failed prune frees its locks, a crashed remover's metadata goes back,
dead-node leases are looked at again before deletion, claims of dead nodes are taken
over by every waiter, and the daemon's start checks come before the mode is recorded
(real files and processes; where a real fault cannot be had as root, a subclass of
Cache puts a path under a regular file in front of the real one: ENOTDIR)."""

import hashlib
import os
import threading
import time

import pytest

from ociimage import eviction
from ociimage.cache import Cache
from ociimage.cachelock import ClaimLock

CLAIM = {"locking": "claim", "claim_stale": 1.0, "claim_poll": 0.05}


def dg(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


def put(c: Cache, d: str, data: bytes = b"x" * 100, **meta):
    return c.build(d, lambda tmp: (tmp.write_bytes(data), dict(meta))[1])


def _claims(root):
    return sorted(p.name for p in (root / "locks").glob("*.claim"))


def _beats():
    return [t.name for t in threading.enumerate() if t.name.startswith("claim ")]


class HideFails(Cache):
    """rename(2) of the metadata aside fails (ENOTDIR: the target is under a file)."""

    def _hidden_path(self, digest):
        return self.root / "layout.json" / "x.hidden"


class BreaksLater(Cache):
    """Once `broken`, the entries' paths are under a regular file: unlink/link fail ENOTDIR."""
    broken = False

    def sqfs_path(self, digest):
        return self.root / "layout.json" / "x" if self.broken else super().sqfs_path(digest)

    def meta_path(self, digest):
        return self.root / "layout.json" / "y" if self.broken else super().meta_path(digest)


# ---- 1: a failed prune holds no lock ------------------------------------------------------

def test_a_prune_whose_hide_fails_releases_the_lock(tmp_path):
    root = tmp_path / "c"
    c = HideFails(root, node="n1", **CLAIM)
    put(c, dg("a"))
    with pytest.raises(NotADirectoryError):
        c.prune(quota=0)
    assert _claims(root) == [] and _beats() == []


def test_a_prune_that_cannot_put_entries_back_releases_every_lock(tmp_path):
    root = tmp_path / "c"
    c = BreaksLater(root, node="n1", **CLAIM)
    ds = [dg(f"e{i}") for i in range(4)]
    for i, d in enumerate(ds):
        put(c, d)
        os.utime(c._used_path(d), (1000 + i, 1000 + i)) if c._used_path(d).exists() else None
    last = sorted(c.list(), key=lambda e: e.last_used)[-1].digest

    def keep(d):  # the last entry: the paths break after the others were hidden
        if d == last:
            c.broken = True
            return True
        return False
    with pytest.raises(OSError):
        c.prune(keep=keep)
    c.broken = False
    assert _claims(root) == [] and _beats() == []


# ---- 2: a crashed remover's metadata goes back -----------------------------------------

def test_a_crashed_removers_metadata_goes_back_and_the_leased_image_stays(tmp_path):
    root, d = tmp_path / "c", dg("crashed-remover")
    c = Cache(root, node="n1", **CLAIM)
    put(c, d)
    old = time.time() - 7200
    os.utime(c.sqfs_path(d), (old, old))
    n2 = Cache(root, node="n2", **CLAIM)
    n2.heartbeat()
    n2.add_lease(d, "job 1.0")
    os.rename(c.meta_path(d), c._hidden_path(d))  # a remover hid it, then crashed
    n3 = Cache(root, node="n3", **CLAIM)
    n3.prune(quota=10 ** 9)
    assert c.sqfs_path(d).exists() and c.get(d) is not None
    assert not list((root / "tmp").glob("*.hidden"))


def test_a_converter_puts_a_crashed_removers_metadata_back(tmp_path):
    root, d = tmp_path / "c", dg("converter")
    c = Cache(root, node="n1")
    put(c, d, v="old")
    os.rename(c.meta_path(d), c._hidden_path(d))
    assert put(c, d, b"n" * 300, v="new").meta["v"] == "old"  # not converted again


def test_metadata_aside_is_deleted_only_without_its_image(tmp_path):
    root, d = tmp_path / "c", dg("no-image")
    c = Cache(root, node="n1")
    put(c, d)
    aside = c._hidden_path(d)
    os.rename(c.meta_path(d), aside)
    c.sqfs_path(d).write_bytes(b"other size")  # not the image it describes: keep both
    c.sweep_tmp()
    assert aside.exists()
    c.sqfs_path(d).unlink()
    c.sweep_tmp()
    assert not aside.exists()


def test_a_lone_image_with_a_live_lease_is_kept(tmp_path):
    root, d = tmp_path / "c", dg("lone-leased")
    c = Cache(root, node="n1")
    put(c, d)
    c.add_lease(d, "job 2.0")
    c.meta_path(d).unlink()  # lost, whatever the way
    old = time.time() - 7200
    os.utime(c.sqfs_path(d), (old, old))
    eviction.sweep_lone_images(c)
    assert c.sqfs_path(d).exists()


# ---- 3: dead-node leases are looked at again before deletion --------------------------------

def test_a_node_back_during_a_prune_keeps_its_leases(tmp_path):
    root, d = tmp_path / "c", dg("back")
    c = Cache(root, node="n1")
    put(c, d)
    n2 = Cache(root, node="n2", lease_ttl=1)
    le = n2.add_lease(d, "job 7.0")
    os.utime(root / "leases" / "n2" / "alive", (1, 1))  # its heartbeat lapsed
    n3 = Cache(root, node="n3")

    def keep(_):
        n2.heartbeat(600)  # n2 is back while n3's prune runs
        return True
    n3.prune(keep=keep)
    assert le.id in n2.own_lease_ids()


def test_housekeeping_restores_leases_of_its_steps_another_node_deleted(tmp_path):
    from ociimage.config import Config
    from ociimage.runtime.steps import StepManager, StepRecord
    root, d = tmp_path / "c", dg("restore")
    cache = Cache(root, node="n1", lease_ttl=10)
    put(cache, d)
    step, pending = cache.add_lease(d, "job 5.0"), cache.add_lease(d, "job 6.0")
    sm = StepManager(Config(cache_dir=root, runtime_dir=tmp_path / "run", node="n1",
                            lease_ttl=10), cache, None)
    sm._steps[("5", "0")] = StepRecord("5", "0", d, str(tmp_path / "ns"), step.id, "/")
    sm._pending.add(pending.id)
    step.path.unlink()  # another node's prune, from a listing made while our heartbeat lapsed
    pending.path.unlink()
    sm._swept_at -= 10
    sm._sweep_leases()
    assert {step.id, pending.id} <= cache.own_lease_ids()
    assert "job 5.0" in {le.holder for le in cache.node_leases().values()}


# ---- 4: a dead node's claim is taken over ---------------------------------------------------

def _dead_claim(root, digest):
    """A claim a node made and never released nor kept alive: its node died."""
    c = Cache(root, node="dead", **CLAIM)
    lk = c.lock(digest)
    assert lk.try_acquire()
    return lk.path


def test_asking_takes_over_the_claim_of_a_node_that_died_asking(tmp_path, monkeypatch):
    from ociimage import verdicts
    monkeypatch.setattr(verdicts, "ASK_LOCK_TIMEOUT", 0.3)  # < claim_stale, as 30 s < 60 s
    root = tmp_path / "c"
    c = Cache(root, node="n1", **CLAIM)
    path = _dead_claim(root, verdicts.lock_digest("q"))
    with verdicts.SharedAnswers(c).asking("q"):
        assert '"node": "n1"' in path.read_text()  # ours now
    assert not path.exists()


def test_the_records_sweep_takes_over_a_dead_sweepers_claim(tmp_path):
    from ociimage import verdicts
    root = tmp_path / "c"
    c = Cache(root, node="n1", **CLAIM)
    _dead_claim(root, verdicts.lock_digest("sweep-records"))
    sa = verdicts.SharedAnswers(c)
    sa.sweep_if_due()
    time.sleep(1.1)
    sa.sweep_if_due()
    assert c.read_record("housekeeping", "records-swept") is not None


def test_the_daemons_claim_sweep_takes_over_dead_claims(tmp_path):
    root = tmp_path / "c"
    c = Cache(root, node="n1", **CLAIM)
    path = _dead_claim(root, dg("converted-then-died"))
    deadline = time.monotonic() + 5
    while path.exists() and time.monotonic() < deadline:
        eviction.sweep_claims_if_due(c)
        time.sleep(0.1)
    assert not path.exists()


def test_remove_waits_long_enough_to_take_a_dead_claim_over(tmp_path):
    root, d = tmp_path / "c", dg("rm")
    c = Cache(root, node="n1", lock_timeout=0.3, **CLAIM)
    put(c, d)
    _dead_claim(root, d)
    c.remove(d)
    assert c.get(d) is None


# ---- 7, 8, 9: the server's time, the mode record, nocto ------------------------------------

def test_using_the_local_clock_for_leases_is_a_warning(tmp_path, caplog):
    import logging
    from ociimage.leases import LeaseBook
    (tmp_path / "leases").mkdir()
    (tmp_path / "leases" / "n1").write_bytes(b"")  # not a directory: `now` cannot be touched
    book = LeaseBook(tmp_path / "leases", tmp_path, "n1")
    with caplog.at_level(logging.WARNING, logger="ociimage.cache"):
        book.fs_now()
        book.fs_now()
    said = [r for r in caplog.records if "this node's clock" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING


def test_the_mode_record_is_fsynced_before_it_is_linked(tmp_path, monkeypatch):
    synced, linked = [], []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def link(src, dst, *a, **kw):
        if str(dst).endswith("locking.json"):
            linked.append(str(src))
            assert str(src) in synced, "linked into place before it was fsynced"
        return real_link(src, dst, *a, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    Cache(tmp_path / "c", locking="flock")
    assert linked


def test_daemon_start_refuses_nfs_mounted_nocto(tmp_path):
    from ociimage.errors import ConfigError
    from test_cache_safety import _mounts
    c = Cache(tmp_path / "c")
    with pytest.raises(ConfigError, match=r"nocto") as e:
        c.check_locking(_mounts(tmp_path, "nfs4", "rw,vers=4.2,lookupcache=pos,nocto"))
    assert "\n" not in str(e.value)
    c.check_locking(_mounts(tmp_path, "nfs4", "rw,vers=4.2,lookupcache=pos"))


# ---- 5: the mode is recorded only once the daemon's checks passed ----------------------------

def test_a_failed_daemon_start_records_no_mode(tmp_path):
    from ociimage.config import Config
    from ociimage.errors import ConfigError
    from test_cache_safety import _mounts
    root = tmp_path / "c"
    cfg = Config(cache_dir=root, runtime_dir=tmp_path / "run", node="n1", locking="claim")
    c = Cache.from_config(cfg)  # the daemon's (and the CLI's) cache: records nothing yet
    assert not (root / "locking.json").exists()
    with pytest.raises(ConfigError):
        c.check_locking(_mounts(tmp_path, "nfs4", "rw,vers=4.2"))  # lookupcache=all
    assert not (root / "locking.json").exists()
    c.check_locking(_mounts(tmp_path, "nfs4", "rw,vers=4.2,lookupcache=pos"))
    assert '"claim"' in (root / "locking.json").read_text()
    with pytest.raises(ConfigError, match="locking.json"):  # a recorded mode is still checked
        Cache.from_config(Config(cache_dir=root, runtime_dir=tmp_path / "run", node="n2",
                                 locking="flock"))
