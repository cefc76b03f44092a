"""The shared cache: atomic publish, one producer across processes, crash recovery, leases, LRU."""

import hashlib
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ociimage.cache import Cache, entry_name
from ociimage.errors import InUse, InvalidArgument, NotFound


def dg(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


def _writer(data: bytes, log: Path = None, delay: float = 0.0):
    def producer(tmp: Path) -> dict:
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        with open(tmp, "wb") as f:
            for i in range(0, len(data), 4096):
                f.write(data[i:i + 4096])
                if delay:
                    time.sleep(delay)
        return {"reference": "test/image:1"}
    return producer


def test_publish_and_get(tmp_path):
    c = Cache(tmp_path / "c")
    d = dg("a")
    assert c.get(d) is None
    e = c.build(d, _writer(b"x" * 10000))
    assert e.path == c.sqfs_path(d) and e.path.read_bytes() == b"x" * 10000
    assert e.size == 10000 and e.meta["reference"] == "test/image:1" and e.meta["digest"] == d
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    # a second build is a cache hit: the producer must not run
    assert c.build(d, lambda tmp: pytest.fail("producer ran on a hit")).path == e.path


def test_invalid_digest_never_becomes_a_path(tmp_path):
    c = Cache(tmp_path / "c")
    for bad in ("sha256:../../etc/passwd", "md5:abc", "sha256:" + "A" * 64, ""):
        with pytest.raises(InvalidArgument):
            c.sqfs_path(bad)


def test_failed_producer_leaves_nothing(tmp_path):
    c = Cache(tmp_path / "c")
    d = dg("fail")

    def producer(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        c.build(d, producer)
    assert c.get(d) is None
    assert not c.sqfs_path(d).exists() and not c.meta_path(d).exists()
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_truncated_or_orphaned_entries_are_not_valid(tmp_path):
    c = Cache(tmp_path / "c")
    d = dg("t")
    c.build(d, _writer(b"y" * 5000))
    with open(c.sqfs_path(d), "r+b") as f:
        f.truncate(100)
    assert c.get(d) is None  # size disagrees with the metadata
    d2 = dg("orphan")
    c.sqfs_path(d2).write_bytes(b"no metadata")  # what a crash between the renames leaves
    assert c.get(d2) is None
    e = c.build(d2, _writer(b"z" * 10))
    assert e.path.read_bytes() == b"z" * 10


def _build_in_process(root, digest, log, data, delay):
    Cache(root, node=f"node{os.getpid()}").build(digest, _writer(data, Path(log), delay))


def test_concurrent_processes_convert_once(tmp_path):
    root = tmp_path / "c"
    Cache(root)
    d = dg("concurrent")
    log = tmp_path / "producers.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_process, args=(root, d, log, b"q" * 200000, 0.0005))
             for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1
    assert Cache(root).get(d).path.read_bytes() == b"q" * 200000


def test_killed_converter_leaves_no_valid_entry_and_no_blocking_lock(tmp_path):
    root = tmp_path / "c"
    Cache(root)
    d = dg("killed")
    log = tmp_path / "p.log"
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_build_in_process, args=(root, d, log, b"k" * 400000, 0.01))
    p.start()
    deadline = time.time() + 20
    while not list((root / "tmp").glob(entry_name(d) + ".*")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    c = Cache(root)
    assert c.get(d) is None
    assert list((root / "tmp").glob(entry_name(d) + ".*")), "expected a leftover temp file"
    e = c.build(d, _writer(b"k" * 1000))  # must not block on the dead holder's lock
    assert e.path.read_bytes() == b"k" * 1000
    assert not list((root / "tmp").glob(entry_name(d) + ".*"))


def test_leases_block_remove_and_prune(tmp_path):
    c = Cache(tmp_path / "c", node="n1")
    a, b = dg("a"), dg("b")
    c.build(a, _writer(b"a" * 100))
    c.build(b, _writer(b"b" * 100))
    lease = c.add_lease(a, "job 1.0")
    with pytest.raises(InUse):
        c.remove(a)
    removed = c.prune()
    assert [e.digest for e in removed] == [b]
    assert c.get(a) is not None and c.get(b) is None
    c.drop_lease(lease)
    c.remove(a)
    assert c.get(a) is None
    with pytest.raises(NotFound):
        c.remove(a)
    with pytest.raises(NotFound):
        c.add_lease(a, "job 2.0")


def test_leases_from_other_nodes_count_and_expire(tmp_path):
    root = tmp_path / "c"
    n1, n2 = Cache(root, node="n1"), Cache(root, node="n2")
    a = dg("shared")
    n1.build(a, _writer(b"s" * 10))
    n2.add_lease(a, "job 7.0", ttl=0.5)
    assert n1.prune() == []  # n2's lease protects it
    time.sleep(0.6)
    assert n1.leases_for(a) == []  # expired leases of dead holders no longer count
    assert n1.expire_leases() == 1
    assert [e.digest for e in n1.prune()] == [a]


def test_prune_quota_evicts_least_recently_used_first(tmp_path):
    c = Cache(tmp_path / "c")
    ds = [dg(str(i)) for i in range(4)]
    for i, d in enumerate(ds):
        c.build(d, _writer(b"x" * 1000))
        os.utime(c.images / (entry_name(d) + ".used"), (1000 + i, 1000 + i))
    c.touch(ds[0], resolution=0)  # most recently used now
    removed = c.prune(quota=2000)
    assert [e.digest for e in removed] == [ds[1], ds[2]]
    assert c.get(ds[0]) and c.get(ds[3])
    assert c.prune(quota=2000) == []
    # keep() spares images others need (e.g. pending jobs)
    assert c.prune(keep=lambda d: d == ds[3])[0].digest == ds[0]
    assert c.get(ds[3])


def test_check_locking(tmp_path):
    Cache(tmp_path / "c").check_locking()


def test_unwritable_cache_dir_is_a_config_error(tmp_path):
    from ociimage.errors import ConfigError
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError):
        Cache(f / "sub")


def test_everything_created_is_root_s_alone_and_narrowed_when_old(tmp_path):
    """Modes at creation (the cache is root's alone), and secure() for an older cache."""
    c = Cache(tmp_path / "c", node="n1")
    d = dg("modes")
    c.build(d, _writer(b"m" * 5000))
    c.add_lease(d, "job 1.0")
    paths = [tmp_path / "c"] + list((tmp_path / "c").rglob("*"))
    assert {p.suffix for p in paths} >= {".sqfs", ".json", ".used", ".lock"}
    for p in paths:
        assert (p.lstat().st_mode & 0o777) == (0o700 if p.is_dir() else 0o600), p
    for p in paths:                          # what the previous version left
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert c.secure() == len(paths)
    for p in paths:
        assert (p.lstat().st_mode & 0o777) == (0o700 if p.is_dir() else 0o600), p
    assert c.secure() == 0


def test_lock_wait_ends_in_a_one_line_timeout(tmp_path):
    import fcntl
    from ociimage.errors import LockTimeout
    c = Cache(tmp_path / "c", lock_timeout=0.3, convert_timeout=0.5)
    d = dg("stuck")
    held = c.lock(d)
    assert held.try_acquire()
    try:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as e:
            c.acquire(d)
        assert 0.3 <= time.monotonic() - t0 < 2
        assert "\n" not in str(e.value) and "[cache] lock_timeout = 0.3" in str(e.value)
        with pytest.raises(LockTimeout, match=r"\[cache\] convert_timeout = 0.5"):
            c.build(d, _writer(b"x"))
        # a shared flock (what a user used to hold) blocks it the same way: hence deadlines
        fd = os.open(c._lock_path(dg("shared")), os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        with pytest.raises(LockTimeout):
            c.acquire(dg("shared"))
        os.close(fd)
        c.acquire(dg("shared")).release()
    finally:
        held.release()
    c.acquire(d).release()


def test_shared_records_are_root_s_alone_and_path_safe(tmp_path):
    c = Cache(tmp_path / "c")
    c.write_record("access", "u1000.abc", {"allowed": True})
    assert c.read_record("access", "u1000.abc") == {"allowed": True}
    assert c.read_record("access", "missing") is None
    p = tmp_path / "c" / "records" / "access" / "u1000.abc.json"
    assert p.stat().st_mode & 0o777 == 0o600
    assert p.parent.stat().st_mode & 0o777 == 0o700
    assert not list((tmp_path / "c" / "tmp").iterdir())  # written aside, renamed in
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(Exception, match="invalid record name"):
            c.write_record("access", bad, {})
    p.write_text("{half")
    assert c.read_record("access", "u1000.abc") is None  # unreadable: ask again
    c.remove_record("access", "u1000.abc")
    assert not p.exists()
