"""Which Slurm jobs (pending or running) need which images: one interface, two back ends.

Where the digest of a job comes from: the plugin pins the digest at submit and,
for sbatch, records it in the job's comment as ``oci-image=NAME@sha256:<hex>``
(appended to whatever comment the user gave). The job's environment
(OCI_IMAGE_PINNED) is not an option: neither ``squeue --json`` (22.05) nor
``scontrol show job`` shows a job's environment, and a SPANK plugin cannot set
any other field that those commands show before the job is submitted (its
init_post_opt runs before sbatch builds the job description from its own
options). Admins may also put the same marker in AdminComment (e.g. from a
job_submit plugin); both are read.

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

MARKER = re.compile(r"(?:^|[\s,;])oci-image=(\S+?@(sha256:[0-9a-f]{64}))(?=$|[\s,;])")
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
    references: List[str] = field(default_factory=list)   # pinned NAME@sha256:...

    @property
    def digests(self) -> List[str]:
        return [r.rsplit("@", 1)[1] for r in self.references]


def markers(*texts: Optional[str]) -> List[str]:
    """Pinned references recorded in comment-like fields, in order, without repeats."""
    out: List[str] = []
    for t in texts:
        for m in MARKER.finditer(t or ""):
            if m.group(1) not in out:
                out.append(m.group(1))
    return out


def _state(value) -> str:
    """job_state: "PENDING" (22.05, v0.0.38) or ["PENDING", "..."] (>= 23.02)."""
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value or "")


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
        state = _state(j.get("job_state"))
        jobs.append(Job(job_id=_job_id(j), state=state, user=_text(j.get("user_name")),
                        references=markers(_text(j.get("comment")),
                                           _text(j.get("admin_comment")))))
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
        try:
            r = self.runner(["squeue", "--json"], capture_output=True, text=True,
                            timeout=self.timeout, env=self._env())
        except FileNotFoundError:
            raise SlurmUnavailable("squeue is not installed") from None
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"squeue --json timed out after {self.timeout:.0f}s") from None
        except OSError as e:
            raise SlurmUnavailable(f"cannot run squeue: {e}") from None
        if r.returncode != 0:
            last = (r.stderr or "").strip().splitlines()
            raise SlurmUnavailable(f"squeue --json failed: {last[-1] if last else r.returncode}")
        return r.stdout

    def jobs(self) -> List[Job]:
        return parse_squeue_json(self.raw())


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
                          getattr(j, "comment", "") or "", getattr(j, "admin_comment", "") or "")
                         for j in p.Jobs.load().values()]
            else:                   # the old dict API
                items = [(str(k), str(v.get("job_state", "")), str(v.get("user_id", "")),
                          v.get("comment") or "", v.get("admin_comment") or "")
                         for k, v in p.job().get().items()]
        except Exception as e:  # noqa: BLE001 - any pyslurm failure means "unknown"
            raise SlurmUnavailable(f"pyslurm: {e}") from None
        return [Job(jid, state, user, markers(c, a)) for jid, state, user, c, a in items]


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
    """Cached view of the jobs that need images (refreshed at most every `ttl` seconds)."""

    def __init__(self, backend, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._at: Optional[float] = None
        self._jobs: Optional[List[Job]] = None
        self._error: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def jobs(self) -> Optional[List[Job]]:
        """Active jobs, or None when Slurm could not be asked (last error in .error)."""
        if self.backend is None:
            return []
        with self._lock:
            now = self.clock()
            if self._at is not None and now - self._at < self.ttl:
                return self._jobs
            try:
                jobs = [j for j in self.backend.jobs() if j.state in ACTIVE_STATES]
                self._jobs, self._error = jobs, None
            except SlurmUnavailable as e:
                if self._error != str(e):
                    log.warning("cannot list Slurm jobs; sparing every cached image until it works",
                                extra={"error": str(e)})
                self._jobs, self._error = None, str(e)
            self._at = now
            return self._jobs

    @property
    def error(self) -> Optional[str]:
        return self._error

    def needed(self) -> Optional[Dict[str, List[Job]]]:
        """{digest: [jobs needing it]}, or None when Slurm could not be asked."""
        jobs = self.jobs()
        if jobs is None:
            return None
        out: Dict[str, List[Job]] = {}
        for j in jobs:
            for d in j.digests:
                out.setdefault(d, []).append(j)
        return out


def describe(jobs: Iterable[Job]) -> List[str]:
    return [f"{j.job_id} ({j.state.lower()})" for j in jobs]
