"""Which Slurm jobs (pending or running) need which images: one interface, two back ends.

Where the digest of a job comes from: the plugin pins the digest at submit and,
for sbatch, the step client (`oci-image-step record-job`, run by the plugin at
sbatch's exit) appends ``oci-image=sha256:<hex>`` to the job's comment, after
whatever comment the user gave. Only the digest: the registry, repository and
tag may be private, and squeue shows every job's comment to everyone. Older
plugins wrote ``oci-image=NAME@sha256:<hex>``; those are read by their digest.
The job's environment (OCI_IMAGE_PINNED) is not an option: neither
``squeue --json`` nor ``scontrol show job`` shows a job's environment, and a
SPANK plugin cannot set any other field that those commands show before the
job is submitted (its init_post_opt runs before sbatch builds the job
description from its own options).

A comment is the user's to write, so a marker there is a claim, not a fact: it
spares an image only once the job's owner (``user_id``, which users cannot
forge) is confirmed to be allowed to use it (``needed(may_use=...)``, see
ImageStore.keep_for_jobs). Otherwise any user could keep every other user's
private images in the cache and make the quota unenforceable. Admins may also
put a marker in AdminComment (e.g. from a job_submit plugin); only operators can
write that field, so those markers count as they are.

Back ends, chosen by ``[slurm] jobs``:

* ``pyslurm`` - only when importable AND built for the installed Slurm's
  major.minor (pyslurm's own build refuses anything else; PyPI has 25.11 only,
  so against Debian's 22.05/24.11 this is never the case).
* ``cli`` - ``squeue --json`` (Slurm >= 21.08, including 22.05 and 24.11; its
  JSON layout changed between data_parser versions, both are understood).
* ``auto`` (default) - pyslurm if it matches, else the CLI if ``squeue`` is
  installed and a Slurm configuration is found, else ``off``.
* ``off`` - no queries; prune and the quota spare only leased images.

When a configured back end fails (slurmctld down, timeout), ``needed()``
returns None and callers must spare every image (see ImageStore.keep_for_jobs).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

log = logging.getLogger("ociimage.slurm")

# oci-image=sha256:<hex> (what we write) or oci-image=NAME@sha256:<hex> (older plugins)
MARKER = re.compile(r"(?:^|[\s,;])oci-image=(?:[^\s,;@]+@)?(sha256:[0-9a-f]{64})(?=$|[\s,;])")
MARKER_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# states in which a job still needs its image (PENDING also covers held jobs)
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                           "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING",
                           "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"})


class SlurmUnavailable(Exception):
    """Slurm could not be asked (no client, controller down, unparseable answer)."""


@dataclass
class Job:
    job_id: str
    state: str
    user: str = ""
    user_id: Optional[int] = None
    claimed: List[str] = field(default_factory=list)  # digests in Comment (the user's claim)
    admin: List[str] = field(default_factory=list)    # digests in AdminComment (operators only)
    comment: str = ""
    submit_time: Optional[int] = None

    @property
    def digests(self) -> List[str]:
        return self.admin + [d for d in self.claimed if d not in self.admin]


def markers(*texts: Optional[str]) -> List[str]:
    """Digests recorded in comment-like fields, in order, without repeats."""
    out: List[str] = []
    for t in texts:
        for m in MARKER.finditer(t or ""):
            if m.group(1) not in out:
                out.append(m.group(1))
    return out


def add_marker(comment: str, digest: str) -> str:
    """The comment with ``oci-image=<digest>`` appended (after a space when not empty)."""
    comment = comment or ""
    mark = f"oci-image={digest}"
    return f"{comment} {mark}" if comment.strip() else mark


def _state(value) -> str:
    """job_state: "PENDING" (22.05, v0.0.38) or ["PENDING", "..."] (>= 23.02)."""
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value or "")


def _number(value) -> Optional[int]:
    """123 (22.05) or {"set": true, "infinite": false, "number": 123} (>= 23.02)."""
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _text(value) -> str:
    if isinstance(value, dict):  # some data_parser versions wrap strings? be lenient
        value = value.get("value") or ""
    return value if isinstance(value, str) else ""


def _job_id(j: dict) -> str:
    jid = j.get("job_id")
    if isinstance(jid, dict):  # {"set": true, "number": N} in newer parsers
        jid = jid.get("number")
    at, ai = j.get("array_job_id"), j.get("array_task_id")
    if isinstance(at, dict):
        at = at.get("number") if at.get("set", True) else None
    if isinstance(ai, dict):
        ai = ai.get("number") if ai.get("set", True) else None
    if at and ai is not None and str(ai) not in ("", "4294967294") and str(at) != "0":
        return f"{at}_{ai}"
    return str(jid)


def parse_squeue_json(text: str) -> List[Job]:
    """Jobs from `squeue --json` (22.05's v0.0.38 and later data_parser layouts)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SlurmUnavailable(f"squeue --json: unparseable output ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise SlurmUnavailable("squeue --json: no 'jobs' list in the output")
    errors = data.get("errors") or []
    if errors:
        raise SlurmUnavailable(f"squeue --json: {errors[0]}")
    jobs = []
    for j in data["jobs"]:
        if not isinstance(j, dict):
            continue
        comment = _text(j.get("comment"))
        jobs.append(Job(job_id=_job_id(j), state=_state(j.get("job_state")),
                        user=_text(j.get("user_name")), user_id=_number(j.get("user_id")),
                        claimed=markers(comment), admin=markers(_text(j.get("admin_comment"))),
                        comment=comment, submit_time=_number(j.get("submit_time"))))
    return jobs


def installed_slurm_version(runner=subprocess.run) -> Optional[str]:
    """'22.05' from `squeue --version` ("slurm-wlm 22.05.8" / "slurm 24.11.1")."""
    try:
        out = runner(["squeue", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\d+)\.(\d+)\.\d+", out or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _major_minor(version: str):
    """'22.05.8' and pyslurm's '22.5.3' -> (22, 5)."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


class CliBackend:
    name = "cli"

    def __init__(self, slurm_conf: Optional[str] = None, timeout: float = 15.0, runner=subprocess.run):
        self.slurm_conf = slurm_conf
        self.timeout = timeout
        self.runner = runner

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SQUEUE_", "SLURM_"))}
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        elif os.environ.get("SLURM_CONF"):
            env["SLURM_CONF"] = os.environ["SLURM_CONF"]
        return env

    def raw(self) -> str:
        return _run(["squeue", "--json"], self.runner, self.timeout, self._env())

    def jobs(self) -> List[Job]:
        return parse_squeue_json(self.raw())


def _client_env() -> dict:
    """The caller's environment without squeue's/scontrol's own format settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SQUEUE_", "SCONTROL_")) and k != "SLURM_TIME_FORMAT"}
    env["SLURM_TIME_FORMAT"] = "%s"   # times as seconds since the epoch
    return env


def _run(argv: List[str], runner, timeout: float, env: Optional[dict] = None) -> str:
    """argv's output; SlurmUnavailable with one line when it cannot be run or fails."""
    what = " ".join(argv[:2])
    try:
        r = runner(argv, capture_output=True, text=True, timeout=timeout,
                   env=_client_env() if env is None else env)
    except FileNotFoundError:
        raise SlurmUnavailable(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"{what} timed out after {timeout:.0f}s") from None
    except OSError as e:
        raise SlurmUnavailable(f"cannot run {argv[0]}: {e}") from None
    if r.returncode != 0:
        last = (r.stderr or "").strip().splitlines()
        raise SlurmUnavailable(f"{what} failed: {last[-1] if last else r.returncode}")
    return r.stdout


def submitted_job(uid: int, sid: int, since: float, runner=subprocess.run,
                  timeout: float = 15.0) -> Optional[str]:
    """The job sbatch just submitted: the newest job of `uid` from session `sid`, submitted
    at most 30 s (clock skew) before `since`, whose comment has no marker yet; or None.

    A heuristic: at sbatch's exit SPANK gives the plugin no job id (its allocator context
    has S_JOB_UID and S_JOB_GID only, in 22.05, 24.11 and 26.05 alike), and sbatch puts
    the id in no variable. Two sbatch calls of one user in one session at the same time
    (`sbatch a & sbatch b &`) may have their markers swapped; the daemon only uses a
    marker to spare images, so a swap at worst spares the wrong one of the two.
    Uses `squeue -O` fields that exist in every release (squeue --json has no
    alloc_sid in 22.05, and ignores --user there).
    """
    out = _run(["squeue", "--noheader", f"--user={uid}",
                "--Format=JobID:40,AllocSID:20,SubmitTime:24"], runner, timeout)
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        jid = parts[0].split("_", 1)[0]   # a job array's tasks: 12_[1-9], 12_3 -> 12
        jsid, submitted = int(parts[1]), int(parts[2])
        if jsid == sid and submitted + 30 >= since and jid.isdigit():
            found.append(int(jid))
    for jid in sorted(set(found), reverse=True):
        if not markers(job_comment(str(jid), runner, timeout)):
            return str(jid)
    return None


def job_comment(job_id: str, runner=subprocess.run, timeout: float = 15.0) -> str:
    """The job's comment, whole (`squeue -o %k`: no width, so nothing is cut)."""
    out = _run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%k"], runner, timeout)
    text = out.split("\n", 1)[0]   # a job array: one line per task record, the same comment
    return "" if text == "(null)" else text


def record_image(job_id: str, digest: str, runner=subprocess.run, timeout: float = 15.0) -> str:
    """Append ``oci-image=<digest>`` to the job's comment (`scontrol update`, as its owner)."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest or ""):
        raise ValueError(f"not a digest: {digest!r}")
    comment = add_marker(job_comment(job_id, runner, timeout), digest)
    _run(["scontrol", "update", f"JobId={job_id}", f"Comment={comment}"], runner, timeout)
    return comment


class PyslurmBackend:
    """pyslurm's job list. Used only when pyslurm was built for the installed Slurm."""
    name = "pyslurm"

    def __init__(self, module):
        self.pyslurm = module

    @staticmethod
    def load(runner=subprocess.run):
        """The backend, or None (with the reason logged) when pyslurm cannot be used here."""
        try:
            import pyslurm  # type: ignore
        except ImportError:
            return None
        built = getattr(pyslurm, "__version__", "") or ""
        installed = installed_slurm_version(runner)
        if not installed or _major_minor(built) != _major_minor(installed):
            log.info("pyslurm does not match the installed Slurm, using the CLI",
                     extra={"pyslurm": built, "slurm": installed})
            return None
        return PyslurmBackend(pyslurm)

    def jobs(self) -> List[Job]:
        p = self.pyslurm
        try:
            if hasattr(p, "Jobs"):  # pyslurm >= 22.5.x object API
                items = [(str(j.id), str(j.state), str(getattr(j, "user_name", "") or ""),
                          _number(getattr(j, "user_id", None)),
                          getattr(j, "comment", "") or "", getattr(j, "admin_comment", "") or "")
                         for j in p.Jobs.load().values()]
            else:                   # the old dict API
                items = [(str(k), str(v.get("job_state", "")), "", _number(v.get("user_id")),
                          v.get("comment") or "", v.get("admin_comment") or "")
                         for k, v in p.job().get().items()]
        except Exception as e:  # noqa: BLE001 - any pyslurm failure means "unknown"
            raise SlurmUnavailable(f"pyslurm: {e}") from None
        return [Job(jid, state, user, uid, markers(c), markers(a), c)
                for jid, state, user, uid, c, a in items]


def _slurm_configured(slurm_conf: Optional[str]) -> bool:
    candidates = [slurm_conf, os.environ.get("SLURM_CONF"), "/etc/slurm/slurm.conf",
                  "/etc/slurm-llnl/slurm.conf", "/run/slurm/conf/slurm.conf",
                  "/var/spool/slurmd/conf-cache/slurm.conf"]
    return any(c and os.path.exists(c) for c in candidates)


def make_backend(mode: str = "auto", slurm_conf: Optional[str] = None, runner=subprocess.run):
    """The back end for [slurm] jobs = auto|pyslurm|cli|off, or None for off."""
    if mode == "off":
        return None
    if mode in ("auto", "pyslurm"):
        b = PyslurmBackend.load(runner)
        if b is not None:
            return b
        if mode == "pyslurm":
            log.warning("[slurm] jobs = pyslurm, but no pyslurm matching the installed Slurm "
                        "is importable; using squeue --json")
            return CliBackend(slurm_conf, runner=runner)
    if mode == "cli":
        return CliBackend(slurm_conf, runner=runner)
    if shutil.which("squeue") and _slurm_configured(slurm_conf):
        return CliBackend(slurm_conf, runner=runner)
    log.info("no Slurm client configuration found: image eviction does not know about jobs")
    return None


class SlurmJobs:
    """Cached view of the jobs that need images, shared by every node of the cluster.

    What slurmctld pays: a job-list query (`squeue --json`, or pyslurm's
    Jobs.load) packs every job in the queue, and slurmctld has no server-side
    filter for "jobs whose comment names an image". So the list is asked for
    at most once per `ttl` seconds for the whole CLUSTER, not per node: the node
    that asks keeps only the jobs that name an image (id, state, owner, digests)
    in a shared record of the cache (root's alone), and every other node reuses
    that record while it is younger than `ttl`. A node asks only when it needs
    the list (prune and the quota, i.e. after a conversion or an admin's prune),
    never per step, so a node costs slurmctld at most one query per `ttl`
    seconds, and a cluster pruning everywhere at once still about one per `ttl`.
    """

    RECORD = ("slurm", "jobs")

    def __init__(self, backend, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 shared=None, wall: Callable[[], float] = time.time):
        self.backend = backend
        self.ttl = ttl
        self.clock = clock
        self.wall = wall
        #: the cache (Cache.read_record / write_record), or None: this process only
        self.shared = shared
        self._lock = threading.Lock()
        self._at: Optional[float] = None
        self._jobs: Optional[List[Job]] = None
        self._error: Optional[str] = None
        self._verdicts: Dict[tuple, tuple] = {}
        #: queries this process made to Slurm (for tests and docs/scale.md)
        self.queries = 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def jobs(self) -> Optional[List[Job]]:
        """Active jobs that name an image, or None when Slurm could not be asked (see .error)."""
        if self.backend is None:
            return []
        with self._lock:
            now = self.clock()
            if self._at is not None and now - self._at < self.ttl:
                return self._jobs
            jobs = self._from_record()
            if jobs is None:
                try:
                    self.queries += 1
                    jobs = [j for j in self.backend.jobs()
                            if j.state in ACTIVE_STATES and (j.claimed or j.admin)]
                    self._error = None
                    self._to_record(jobs)
                except SlurmUnavailable as e:
                    if self._error != str(e):
                        log.warning("cannot list Slurm jobs; sparing every cached image until "
                                    "it works", extra={"error": str(e)})
                    jobs, self._error = None, str(e)
            self._jobs, self._at = jobs, now
            return self._jobs

    def _from_record(self) -> Optional[List[Job]]:
        """Another node's answer, if younger than ttl (None: ask Slurm)."""
        if self.shared is None:
            return None
        try:
            data = self.shared.read_record(*self.RECORD)
        except Exception:  # noqa: BLE001 - a bad record only means asking Slurm
            return None
        try:
            age = self.wall() - float(data["fetched"])
            # A record from the future (a node's clock ahead) counts as stale, so a
            # wrong clock can make nodes ask more often, never trust an old list.
            if not 0 <= age < self.ttl:
                return None
            return [Job(str(j["id"]), str(j["state"]), user_id=_number(j.get("uid")),
                        claimed=[d for d in j.get("claimed", []) if MARKER_DIGEST.fullmatch(d)],
                        admin=[d for d in j.get("admin", []) if MARKER_DIGEST.fullmatch(d)])
                    for j in data["jobs"]]
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def _to_record(self, jobs: List[Job]) -> None:
        if self.shared is None:
            return
        try:
            self.shared.write_record(*self.RECORD, {
                "fetched": self.wall(), "node": getattr(self.shared, "node", ""),
                "jobs": [{"id": j.job_id, "state": j.state, "uid": j.user_id,
                          "claimed": j.claimed, "admin": j.admin} for j in jobs]})
        except Exception as e:  # noqa: BLE001 - sharing is an optimisation
            log.info("cannot share the Slurm job list", extra={"error": str(e)})

    @property
    def error(self) -> Optional[str]:
        return self._error

    def needed(self, may_use: Optional[Callable[[str, int], Optional[bool]]] = None
               ) -> Optional[Dict[str, List[Job]]]:
        """{digest: [jobs needing it]}, or None when Slurm could not be asked.

        may_use(digest, uid): whether that user may use the cached image (True/False),
        or None when there is nothing to decide (the image is not cached). A digest in a
        job's Comment counts only when may_use confirms the job's owner; verdicts are
        kept per (uid, digest) for `verdict_ttl` seconds (refusals `refusal_ttl`).
        Without may_use every marker counts (tests and tools that only list jobs).
        """
        jobs = self.jobs()
        if jobs is None:
            return None
        out: Dict[str, List[Job]] = {}
        for j in jobs:
            for d in j.admin:
                out.setdefault(d, []).append(j)
            for d in j.claimed:
                if d in j.admin or (may_use is not None and not self._verdict(may_use, d, j)):
                    continue
                out.setdefault(d, []).append(j)
        return out

    verdict_ttl = 300.0
    refusal_ttl = 30.0

    def _verdict(self, may_use, digest: str, job: Job) -> bool:
        if job.user_id is None:
            return False  # an owner we cannot name cannot be checked
        key = (job.user_id, digest)
        now = self.clock()
        with self._lock:
            cached = self._verdicts.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        ok = may_use(digest, job.user_id)
        if ok is None:
            return False
        if not ok:
            log.info("a job names an image its owner may not use: it does not spare it",
                     extra={"job": job.job_id, "uid": job.user_id, "digest": digest})
        with self._lock:
            self._verdicts[key] = (bool(ok), now + (self.verdict_ttl if ok else self.refusal_ttl))
        return bool(ok)


def describe(jobs: Iterable[Job]) -> List[str]:
    return [f"{j.job_id} ({j.state.lower()})" for j in jobs]
