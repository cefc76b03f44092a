"""The Slurm adapter (ociimage.slurm) without a cluster: parsing real `squeue --json` output,
the choice of back end (pyslurm only when it matches the installed Slurm), caching, and what
eviction does when Slurm cannot be asked.

tests/data/squeue-<release>-recorded.json are real `squeue --json` outputs of Debian 12's Slurm
22.05, Debian 13's 24.11 and Debian unstable's 26.05 (three data_parser layouts), captured from
the test cluster by tests/test_slurm_aware.py (OCI_SAVE_SQUEUE_JSON=DIR, see `make
test-matrix`): a held sbatch job whose comment is the user's "mine" plus the marker the step
client appended. tests/data/squeue-22.05-held.json is an older 22.05 capture, from when the
plugin wrote the image's name too (oci-image=NAME@sha256:...): still read, by its digest."""

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from ociimage.cache import Cache
from ociimage.config import Config
from ociimage.images import ImageStore, Prefetcher
from ociimage.errors import AccessDenied, InvalidArgument
from ociimage.slurm import (CliBackend, Job, PyslurmBackend, SlurmJobs, SlurmUnavailable,
                            add_marker, make_backend, markers, parse_squeue_json, record_image,
                            submitted_job)

DATA = Path(__file__).resolve().parent / "data"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_old_22_05_output_with_a_named_marker():
    raw = (DATA / "squeue-22.05-held.json").read_text()
    assert json.loads(raw)["meta"]["Slurm"]["release"].startswith("22.05")
    jobs = parse_squeue_json(raw)
    assert len(jobs) == 1
    j = jobs[0]
    assert j.job_id == "1" and j.state == "PENDING" and j.user == "ocitest" and j.user_id == 1001
    assert "/sa/held:v1@" in j.comment       # what older plugins wrote ...
    # ... is read by its digest alone
    assert j.claimed == ["sha256:1149a19311da5f59a0b7a373f635b98d2e088f58f03bf8d2893386a9f868d98b"]
    assert j.digests == j.claimed and j.admin == []


@pytest.mark.parametrize("release", ["22.05", "24.11", "26.05"])
def test_real_output_of_each_release(release):
    raw = (DATA / f"squeue-{release}-recorded.json").read_text()
    data = json.loads(raw)
    meta = data["meta"].get("Slurm") or data["meta"]["slurm"]    # "Slurm" in 22.05 only
    version = meta["version"]
    assert f"{int(version['major'])}.{int(version['minor']):02d}" == release
    jobs = parse_squeue_json(raw)
    assert len(jobs) == len(data["jobs"]) >= 1
    recorded = [j for j in jobs if j.comment.startswith("mine ")]
    assert len(recorded) == 1, [j.comment for j in jobs]
    j = recorded[0]
    assert j.state == "PENDING" and j.user == "ocitest"
    assert isinstance(j.user_id, int) and j.user_id > 0
    assert isinstance(j.submit_time, int) and j.submit_time > 1_700_000_000
    assert len(j.claimed) == 1 and j.claimed[0].startswith("sha256:")
    # only the digest was recorded: no registry, repository or tag in a comment everyone sees
    assert j.comment == f"mine oci-image={j.claimed[0]}"
    assert int(j.job_id) > 0


def test_newer_data_parser_layout():
    """>= 23.02 (v0.0.39+): job_state is a list, numbers may be {set, number} objects
    (written after the published OpenAPI schema, not captured: no such Slurm here)."""
    raw = json.dumps({"jobs": [
        {"job_id": 7, "job_state": ["PENDING", "REQUEUED"], "user_name": "u",
         "comment": f"oci-image=reg/a@{D1}", "admin_comment": "",
         "array_job_id": {"set": True, "number": 0}, "array_task_id": {"set": False, "number": 0}},
        {"job_id": 9, "job_state": ["RUNNING"], "user_name": "u", "comment": "",
         "admin_comment": f"x oci-image=reg/b:1@{D2}",
         "array_job_id": {"set": True, "number": 8}, "array_task_id": {"set": True, "number": 1}},
        {"job_id": 10, "job_state": ["COMPLETED"], "comment": f"oci-image=reg/c@{D1}"},
    ], "errors": [], "warnings": []})
    jobs = parse_squeue_json(raw)
    assert [(j.job_id, j.state, j.digests) for j in jobs] == [
        ("7", "PENDING", [D1]), ("8_1", "RUNNING", [D2]), ("10", "COMPLETED", [D1])]


@pytest.mark.parametrize("text, want", [
    (f"oci-image={D1}", [D1]),                         # what the step client writes
    (f"mine oci-image={D1}", [D1]),
    (f"oci-image=r/x@{D1}", [D1]),                     # older plugins: by its digest
    (f"my comment oci-image=r/x:tag@{D1} oci-image=r:5000/y@{D2}", [D1, D2]),
    (f"oci-image=r/x@{D1},oci-image={D1}", [D1]),
    (f"oci-image=sha256:{'A' * 64}", []),              # not a digest of ours
    (f"xoci-image=r/x@{D1}", []),                      # not a marker of ours
    ("oci-image=r/x:latest", []),                      # not pinned
    (f"oci-image=r/x@{D1[:-1]}", []),                  # truncated digest
    (None, []),
])
def test_markers(text, want):
    assert markers(text) == want


def test_add_marker():
    assert add_marker("", D1) == f"oci-image={D1}"
    assert add_marker("mine", D1) == f"mine oci-image={D1}"
    assert markers(add_marker("a b;c", D2)) == [D2]


def _squeue_runner(rows, comments, calls):
    """squeue -O / -o %k and scontrol update, as a runner (the argv each gets is checked)."""
    def run(argv, **kw):
        calls.append(argv)
        assert kw["env"]["SLURM_TIME_FORMAT"] == "%s"
        if argv[0] == "squeue" and any(a.startswith("--Format=") for a in argv):
            return subprocess.CompletedProcess(argv, 0, "".join(
                f"{j:<40}{sid:<20}{t:<24}\n" for j, sid, t in rows), "")
        if argv[0] == "squeue":
            jid = [a for a in argv if a.startswith("--jobs=")][0].split("=")[1]
            return subprocess.CompletedProcess(argv, 0, comments.get(jid, "(null)") + "\n", "")
        if argv[0] == "scontrol":
            return subprocess.CompletedProcess(argv, 0, "", "")
        raise AssertionError(argv)
    return run


def test_submitted_job_is_the_newest_untagged_job_of_this_session():
    rows = [(11, 500, 1000), (12, 500, 1000), (13, 777, 1000), (10, 500, 900), (14, 500, 1001)]
    comments = {"14": f"oci-image={D1}", "12": "mine"}
    calls = []
    run = _squeue_runner(rows, comments, calls)
    # 14 is tagged already, 13 is another session's, 10 was submitted too long ago
    assert submitted_job(1001, 500, since=1010, runner=run) == "12"
    assert calls[0][:3] == ["squeue", "--noheader", "--user=1001"]
    assert submitted_job(1001, 999, since=1010, runner=run) is None
    # a job array submitted by the same sbatch: its id, once
    calls.clear()
    arr = _squeue_runner([("20_[3-9]", 500, 1005), ("20_1", 500, 1005), (12, 500, 1000)],
                         comments, calls)
    assert submitted_job(1001, 500, since=1010, runner=arr) == "20"
    assert len([c for c in calls if "--jobs=20" in c]) == 1
    calls.clear()
    assert record_image("12", D2, runner=run) == f"mine oci-image={D2}"
    assert calls[-1] == ["scontrol", "update", "JobId=12", f"Comment=mine oci-image={D2}"]
    with pytest.raises(ValueError):
        record_image("12", "reg/x@" + D2, runner=run)


@pytest.mark.parametrize("raw, needle", [
    ("not json", "unparseable"),
    ('{"meta": {}}', "no 'jobs'"),
    ('{"jobs": [], "errors": [{"error": "Unable to contact slurm controller"}]}', "controller"),
])
def test_bad_output_means_unavailable(raw, needle):
    with pytest.raises(SlurmUnavailable, match=needle):
        parse_squeue_json(raw)


def _runner(stdout="", returncode=0, stderr="", calls=None):
    def run(argv, **kw):
        if calls is not None:
            calls.append((argv, kw.get("env", {}).get("SLURM_CONF")))
        if argv[:2] == ["squeue", "--version"]:
            return subprocess.CompletedProcess(argv, 0, "slurm-wlm 22.05.8\n", "")
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)
    return run


def test_cli_backend_runs_squeue_json_with_the_configured_slurm_conf():
    calls = []
    raw = (DATA / "squeue-22.05-held.json").read_text()
    b = CliBackend("/etc/slurm/other.conf", runner=_runner(raw, calls=calls))
    assert [j.job_id for j in b.jobs()] == ["1"]
    assert calls == [(["squeue", "--json"], "/etc/slurm/other.conf")]
    b = CliBackend(runner=_runner("", 1, "squeue: error: Unable to contact slurm controller"))
    with pytest.raises(SlurmUnavailable, match="Unable to contact"):
        b.jobs()


def test_pyslurm_is_used_only_when_it_matches_the_installed_slurm(monkeypatch):
    # not importable (PyPI has 25.11 only; Debian ships 22.05/24.11): the CLI is used
    monkeypatch.setitem(sys.modules, "pyslurm", None)      # makes `import pyslurm` fail
    assert PyslurmBackend.load(_runner()) is None
    b = make_backend("pyslurm", runner=_runner())
    assert isinstance(b, CliBackend)
    assert make_backend("off") is None
    assert isinstance(make_backend("cli", runner=_runner()), CliBackend)

    fake = types.ModuleType("pyslurm")
    fake.__version__ = "25.11.0"
    monkeypatch.setitem(sys.modules, "pyslurm", fake)
    assert PyslurmBackend.load(_runner()) is None          # built for another Slurm

    class FakeJob:
        def __init__(self, jid, state, comment):
            self.id, self.state, self.comment, self.admin_comment = jid, state, comment, ""
            self.user_name, self.user_id = "u", 1001

    fake.__version__ = "22.5.3"
    fake.Jobs = types.SimpleNamespace(load=lambda: {
        1: FakeJob(1, "PENDING", f"oci-image=r/x@{D1}"), 2: FakeJob(2, "RUNNING", "")})
    # pyslurm's versions are 22.5.x for Slurm 22.05 (the runner's squeue says 22.05.8)
    b = make_backend("auto", runner=_runner())
    assert isinstance(b, PyslurmBackend)
    assert [(j.job_id, j.digests) for j in b.jobs()] == [("1", [D1]), ("2", [])]


class FakeBackend:
    def __init__(self):
        self.calls = 0
        self.fail = False
        self.jobs_ = [Job("5", "PENDING", "u", 1001, [D1]), Job("6", "RUNNING", "u", 1001, [D1]),
                      Job("7", "COMPLETED", "u", 1001, [D2])]

    def jobs(self):
        self.calls += 1
        if self.fail:
            raise SlurmUnavailable("slurmctld is down")
        return self.jobs_


def test_slurm_jobs_cache_and_failure():
    now = [100.0]
    b = FakeBackend()
    sj = SlurmJobs(b, ttl=5, clock=lambda: now[0])
    needed = sj.needed()
    assert {d: [j.job_id for j in js] for d, js in needed.items()} == {D1: ["5", "6"]}  # not 7
    sj.needed()
    assert b.calls == 1                      # cached for ttl seconds
    now[0] += 6
    b.fail = True
    assert sj.needed() is None and "down" in sj.error
    assert SlurmJobs(None).needed() == {}    # off: nothing needed, nothing unknown


def test_a_comment_counts_only_when_its_owner_may_use_the_image():
    now = [100.0]
    b = FakeBackend()
    b.jobs_ = [Job("5", "PENDING", "eve", 1002, [D1, D2]),      # D1: not hers to use
               Job("6", "PENDING", "al", 1001, [D1]),
               Job("7", "PENDING", "x", None, [D2]),            # owner unknown: not counted
               Job("8", "PENDING", "root", 1002, [], admin=[D1])]  # AdminComment: operators'
    asked = []

    def may_use(digest, uid):
        asked.append((digest, uid))
        return {(D1, 1001): True, (D1, 1002): False, (D2, 1002): True}[(digest, uid)]

    sj = SlurmJobs(b, ttl=0, clock=lambda: now[0])
    got = {d: sorted(j.job_id for j in js) for d, js in sj.needed(may_use).items()}
    assert got == {D1: ["6", "8"], D2: ["5"]}
    assert sorted(asked) == [(D1, 1001), (D1, 1002), (D2, 1002)]
    sj.needed(may_use)
    assert len(asked) == 3                    # verdicts are kept ...
    now[0] += sj.refusal_ttl + 1
    sj.needed(may_use)
    assert sorted(asked[3:]) == [(D1, 1002)]  # ... a refusal for less long
    # not cached (None): nothing to spare, and nothing remembered
    sj2 = SlurmJobs(b, ttl=0, clock=lambda: now[0])
    assert sj2.needed(lambda d, u: None) == {D1: [b.jobs_[3]]}
    assert sj2._verdicts == {}


class AllowOnly:
    """ImageStore.access for these tests: uid 1001 (and root, as with the real checker) may
    use everything, nobody else anything."""
    def check(self, entry, uid):
        if uid not in (1001, 0, None):
            raise AccessDenied(f"uid {uid} may not use {entry.digest}")


def _store(tmp_path, backend):
    cache = Cache(tmp_path / "cache", node="n1")
    store = ImageStore(cache, Config(cache_dir=tmp_path / "cache"))
    store.access = AllowOnly()
    store.slurm = SlurmJobs(backend, ttl=0)
    for d in (D1, D2):
        cache.build(d, lambda p: (p.write_bytes(b"x" * 10), {"reference": "r"})[1])
    return cache, store


def test_prune_spares_needed_images_and_everything_when_slurm_is_down(tmp_path):
    b = FakeBackend()
    cache, store = _store(tmp_path, b)
    b.fail = True
    removed, kept = store.prune(quota=1)
    assert removed == [] and sorted(kept) == [D1, D2]       # unknown: evict nothing
    b.fail = False
    removed, kept = store.prune(quota=1)
    assert [e.digest for e in removed] == [D2] and kept == [D1]
    assert cache.get(D1) is not None


def test_prune_ignores_a_marker_whose_owner_may_not_use_the_image(tmp_path):
    b = FakeBackend()
    b.jobs_ = [Job("5", "PENDING", "eve", 1002, [D1, D2])]    # names images that are not hers
    cache, store = _store(tmp_path, b)
    removed, kept = store.prune(quota=1)
    assert sorted(e.digest for e in removed) == [D1, D2] and kept == []


def _wait_until(condition, timeout: float = 10.0) -> None:
    """Wait for the prefetcher's pull threads; fail (not pass) if they never get there."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the prefetch pulls did not get there in time"
        time.sleep(0.01)


def test_prefetch_requires_a_pinned_digest_and_deduplicates(tmp_path, monkeypatch):
    cache, store = _store(tmp_path, None)
    p = Prefetcher(store, rate=2, rate_per_user=2)
    with pytest.raises(InvalidArgument, match="digest-pinned"):
        p.request("reg.example.org/a:latest", 0)
    assert p.request(f"reg.example.org/a@{D1}", 0) == ("cached", D1, "")
    started = []
    release = __import__("threading").Event()
    monkeypatch.setattr(store, "pull", lambda ref, uid=None: (started.append((ref, uid)),
                                                              release.wait(30)))
    D3, D4, D5 = ("sha256:" + c * 64 for c in "345")
    assert p.request(f"reg.example.org/a@{D3}", 1000) == ("started", D3, "")
    assert p.request(f"reg.example.org/b@{D3}", 1000) == ("running", D3, "")  # one pull per digest
    assert p.request(f"reg.example.org/a@{D4}", 1000) == ("started", D4, "")
    assert p.request(f"reg.example.org/a@{D5}", 1000)[:2] == ("skipped", D5)  # rate: 2 a minute
    _wait_until(lambda: len(started) == 2)          # both pulls run at once ...
    release.set()
    _wait_until(lambda: not p._running)             # ... and both end
    # every pull ran with the caller's uid, never the daemon's own credentials (None)
    assert sorted(started) == [(f"reg.example.org/a@{D3}", 1000), (f"reg.example.org/a@{D4}", 1000)]


def test_prefetch_limits_per_uid_leave_other_users_alone(tmp_path, monkeypatch):
    cache, store = _store(tmp_path, None)
    p = Prefetcher(store, rate=30, max_running=4, rate_per_user=10, running_per_user=2)
    release = __import__("threading").Event()
    started = []
    monkeypatch.setattr(store, "pull", lambda ref, uid=None: (started.append(uid), release.wait(30)))
    ds = ["sha256:" + f"{i:02x}" * 32 for i in range(6)]
    assert [p.request(f"r.example/a@{d}", 1001)[0] for d in ds[:3]] == ["started", "started",
                                                                           "skipped"]
    assert "this user's" in p.request(f"r.example/a@{ds[3]}", 1001)[2]
    assert p.request(f"r.example/a@{ds[4]}", 1002)[0] == "started"      # another uid proceeds
    assert p.request(f"r.example/a@{ds[0]}", 1002)[0] == "started"      # same digest, own pull
    _wait_until(lambda: len(started) == 4)
    release.set()
    _wait_until(lambda: not p._running)
    assert sorted(started) == [1001, 1001, 1002, 1002]


def test_prune_spares_a_multi_arch_image_whose_job_names_its_index(tmp_path):
    """A multi-arch image is pinned at submit by its index digest, and that is what the job's
    comment names; the cache holds the platform manifest's entry (mapped by a record)."""
    from ociimage.pull import platform_key
    from ociimage.verdicts import SharedAnswers
    index = "sha256:" + "1d" * 32
    b = FakeBackend()
    b.jobs_ = [Job("5", "PENDING", "al", 1001, [index])]
    cache, store = _store(tmp_path, b)
    SharedAnswers(cache).record_resolved(index, platform_key(None), D1)
    removed, kept = store.prune(quota=1)
    assert [e.digest for e in removed] == [D2] and kept == [D1]
    assert cache.get(D1) is not None
