"""Converting once per cluster: the blocking flock wait (its cost on the shared filesystem,
measured with strace), progress for waiters, cancellation, and claim files (forced mode)
with several real processes, a SIGKILLed claimer and a claimer that lost its claim."""

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ociimage.cache import Cache, entry_name
from ociimage.cachemode import detect_locking
from ociimage.config import load_config
from ociimage.errors import ConfigError
from ociimage.runtime.mounts import MountEntry

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
ctx = multiprocessing.get_context("fork")


def dg(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


def wait_for(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _slow_build(root, digest, node, seconds, log, data=b"s", **kw):
    """A converter in its own process: logs that it ran, notes progress, takes `seconds`."""
    c = Cache(root, node=node, **kw)

    def producer(tmp):
        with open(log, "a") as f:
            f.write(f"{node}\n")
        end = time.monotonic() + seconds
        with open(tmp, "wb") as f:
            i = 0
            while time.monotonic() < end:
                f.write(data * 1000)
                f.flush()
                c.note_progress(digest, "convert", i, 100)
                i += 1
                time.sleep(0.05)
        return {"by": node}

    e = c.build(digest, producer)
    Path(f"{log}.{node}.got").write_text(e.meta["by"])


def _children(pid, named=None):
    """pid's children (only those whose command is `named`, if given): the test process may
    have others (a session's registry server, another module's daemons)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, fields = text.split("(", 1)[1].rsplit(")", 1)[0], text.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and (named is None or comm == named):
            out.append(int(stat.parent.name))
    return out


# ---- flock: a blocking wait --------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_a_waiting_node_makes_a_bounded_number_of_lock_file_calls(tmp_path):
    """The waiter runs under strace while another process converts for ~5 s: every system
    call naming the lock file (paths, and descriptors as strace -y shows them) is counted.
    Polling made ~35 a second (~175 here); the blocking wait makes a handful in all."""
    root, d = tmp_path / "c", dg("strace")
    Cache(root, locking="flock")
    log = tmp_path / "producers.log"
    holder = ctx.Process(target=_slow_build, args=(root, d, "builder", 5.0, log))
    holder.start()
    wait_for(lambda: log.exists(), what="the builder to start")
    waiter = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(DAEMON)!r})
        from ociimage.cache import Cache
        calls = []
        c = Cache({str(root)!r}, node="waiter", locking="flock")
        e = c.build({d!r}, lambda tmp: sys.exit("the waiter converted"),
                    on_wait=lambda waited, builder: calls.append([waited, builder]))
        print(json.dumps({{"by": e.meta["by"], "calls": calls}}))
    """)
    trace = tmp_path / "trace"
    out = subprocess.run(["strace", "-f", "-y", "-e", "trace=%file,%desc", "-o", str(trace),
                          sys.executable, "-c", waiter], capture_output=True, text=True,
                         timeout=60)
    holder.join(30)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["by"] == "builder" and log.read_text().split() == ["builder"]
    lock = str(root / "locks" / (entry_name(d) + ".lock"))
    lock_calls = [ln for ln in trace.read_text().splitlines() if lock in ln]
    assert 1 <= len(lock_calls) <= 10, "\n".join(lock_calls)
    assert any("flock(" in ln and "LOCK_EX" in ln for ln in lock_calls)
    # progress still reaches the waiter: on_wait about once a second, with the builder's record
    calls = result["calls"]
    assert len(calls) >= 2
    builders = [b for _, b in calls if b]
    assert builders and builders[-1]["node"] == "builder" and builders[-1]["phase"] in (
        "start", "convert")
    assert set(builders[-1]) >= {"node", "pid", "phase", "done", "total", "updated"}
    assert not (root / "records" / "progress" / f"{entry_name(d)}.json").exists()


def test_progress_is_written_at_most_every_few_seconds_and_only_by_the_builder(tmp_path):
    c = Cache(tmp_path / "c", node="n1")
    d = dg("progress")
    record = tmp_path / "c" / "records" / "progress" / f"{entry_name(d)}.json"
    c.note_progress(d, "convert", 1, 2)  # not building it: a no-op
    assert not record.exists()
    seen = []

    def producer(tmp):
        for i in range(20):
            c.note_progress(d, "convert", i, 20)
            seen.append(json.loads(record.read_text())["done"])
        tmp.write_bytes(b"p")
        return {}

    c.build(d, producer)
    assert set(seen) == {0}  # 20 calls within 3 s: one write (the first), the rest skipped
    assert oct(record.parent.stat().st_mode & 0o777) == "0o700"
    assert not record.exists()  # gone once the entry is published


def test_a_cancelled_wait_ends_at_once_with_no_lock_and_no_child(tmp_path):
    root, d = tmp_path / "c", dg("cancel")
    Cache(root)
    log = tmp_path / "p.log"
    holder = ctx.Process(target=_slow_build, args=(root, d, "builder", 4.0, log))
    holder.start()
    wait_for(lambda: log.exists(), what="the builder to start")
    c = Cache(root, node="waiter")

    class Cancelled(Exception):
        pass

    def on_wait(waited, builder):
        if waited >= 1.0:
            assert _children(os.getpid(), "flock"), "expected flock(1) waiting for us"
            raise Cancelled()

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        c.build(d, lambda tmp: pytest.fail("converted while another node does"), on_wait=on_wait)
    assert time.monotonic() - t0 < 3.5 and holder.is_alive()  # ended before the conversion
    assert _children(os.getpid(), "flock") == []  # the flock(1) child is gone
    assert holder.pid in _children(os.getpid())
    holder.join(30)
    lk = c.lock(d)
    assert lk.try_acquire()  # nothing of the cancelled wait still holds the lock
    lk.release()


# ---- claims (forced: locking = claim) ----------------------------------------------------

def test_claims_convert_once_with_several_processes(tmp_path):
    root, d = tmp_path / "c", dg("claims")
    Cache(root, locking="claim")
    log = tmp_path / "producers.log"
    procs = [ctx.Process(target=_slow_build, args=(root, d, f"n{i}", 1.0, log),
                         kwargs={"locking": "claim", "claim_poll": 0.1}) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    [builder] = log.read_text().split()
    assert {Path(f"{log}.n{i}.got").read_text() for i in range(6)} == {builder}
    assert not list((root / "locks").glob("*.claim")) and not list((root / "tmp").iterdir())
    assert not list((root / "locks").glob("*.lock"))  # no flock was used


def test_a_killed_claimer_is_taken_over_after_claim_stale(tmp_path):
    root, d = tmp_path / "c", dg("killed-claimer")
    Cache(root, locking="claim")
    log = tmp_path / "p.log"
    a = ctx.Process(target=_slow_build, args=(root, d, "a", 60.0, log),
                    kwargs={"locking": "claim", "claim_stale": 2.0})
    a.start()
    wait_for(lambda: list((root / "tmp").glob(entry_name(d) + ".*")), what="a to convert")
    os.kill(a.pid, signal.SIGKILL)
    a.join()
    b = Cache(root, node="b", locking="claim", claim_stale=2.0, claim_poll=0.1)
    assert b.get(d) is None  # never a partial entry
    t0 = time.monotonic()
    _slow_build(root, d, "b", 0.3, log, locking="claim", claim_stale=2.0, claim_poll=0.1)
    assert time.monotonic() - t0 >= 2.0  # it waited for the claim to go stale first
    assert log.read_text().split() == ["a", "b"]
    assert b.get(d).meta["by"] == "b"
    assert not list((root / "tmp").iterdir()), "the dead claimer's files are swept"
    assert not (root / "locks" / f"{entry_name(d)}.claim").exists()


def test_a_claimer_that_lost_its_claim_publishes_nothing(tmp_path):
    """a stalls (SIGSTOP) longer than claim_stale: b takes over and publishes; a, resumed,
    finds the claim is not its own at its next heartbeat or before publishing, and abandons."""
    root, d = tmp_path / "c", dg("lost-claim")
    Cache(root, locking="claim")
    log = tmp_path / "p.log"
    a = ctx.Process(target=_slow_build, args=(root, d, "a", 3.0, log),
                    kwargs={"data": b"A", "locking": "claim", "claim_stale": 2.0,
                            "claim_poll": 0.1})
    a.start()
    wait_for(lambda: list((root / "tmp").glob(entry_name(d) + ".*")), what="a to convert")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        _slow_build(root, d, "b", 0.3, log, data=b"B", locking="claim", claim_stale=2.0,
                    claim_poll=0.1)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a.join(60)
    assert a.exitcode == 0
    assert log.read_text().split() == ["a", "b"]
    c = Cache(root, locking="claim")
    e = c.get(d)
    assert e.meta["by"] == "b" and set(e.path.read_bytes()) == {ord("B")}
    assert Path(f"{log}.a.got").read_text() == "b"  # a returned b's entry, published nothing
    assert not list((root / "tmp").iterdir())


def test_lease_and_prune_in_claim_mode(tmp_path):
    c = Cache(tmp_path / "c", node="n1", locking="claim")
    a, b = dg("ca"), dg("cb")
    for x in (a, b):
        c.build(x, lambda tmp: (tmp.write_bytes(b"x"), {})[1])
    lease = c.add_lease(a, "job 1.0")
    assert [e.digest for e in c.prune()] == [b]
    c.drop_lease(lease)
    c.remove(a)
    assert c.list() == [] and not list((tmp_path / "c" / "locks").iterdir())


# ---- which mode -----------------------------------------------------------------------------

def _mount(fstype, options, super_options, mp="/shared"):
    return MountEntry(1, 0, "/", "/", "rw", "", "ext4", "/dev/vda", "rw") if fstype is None else \
        MountEntry(2, 1, "/", mp, options, "", fstype, "srv:/export", super_options)


@pytest.mark.parametrize("fstype,options,super_options,mode", [
    ("nfs4", "rw,relatime", "rw,vers=4.2,local_lock=flock,addr=10.0.0.1", "claim"),
    ("nfs4", "rw", "rw,vers=4.2,local_lock=all", "claim"),
    ("nfs", "rw", "rw,vers=3,nolock,local_lock=all", "claim"),
    ("nfs4", "rw", "rw,vers=4.2,local_lock=none,addr=10.0.0.1", "flock"),
    ("lustre", "rw", "rw,localflock,lazystatfs", "claim"),
    ("lustre", "rw", "rw,lazystatfs", "claim"),
    ("lustre", "rw", "rw,flock,lazystatfs", "flock"),
    ("ext4", "rw", "rw", "flock"),
])
def test_auto_detects_where_flock_is_node_local(fstype, options, super_options, mode):
    mounts = [_mount(None, "", ""), _mount(fstype, options, super_options)]
    got, why = detect_locking("/shared/cache", mounts)
    assert got == mode and fstype in why
    assert detect_locking("/elsewhere", mounts)[0] == "flock"  # the root mount, ext4


def test_locking_settings_are_validated(tmp_path):
    assert Cache(tmp_path / "c").locking == "flock"  # this machine's local filesystem
    assert Cache(tmp_path / "d", locking="claim").locking_reason == "[cache] locking"
    with pytest.raises(ConfigError, match="locking"):
        Cache(tmp_path / "e", locking="lockd")
    p = tmp_path / "oci-image.conf"
    p.write_text("[cache]\nlocking = claim\nclaim_stale = 30\n")
    cfg = load_config(p)
    assert (cfg.locking, cfg.claim_stale) == ("claim", 30.0)
    for bad, msg in (("locking = nfs", r"\[cache\] locking"), ("claim_stale = 1", "claim_stale")):
        p.write_text(f"[cache]\n{bad}\n")
        with pytest.raises(ConfigError, match=msg):
            load_config(p)
