"""A cluster of N real oci-imaged processes on this machine, sharing one cache directory.

Each daemon is a node of its own (its own --node name, socket and runtime dir,
tests/daemon_proc.py); only the cache is shared, as on a cluster's shared
filesystem. The daemons are asked the way a job step's client asks (a Pull RPC
over the root socket carrying the job user's uid, so the daemon pulls and checks
access with that user's credentials), all at once:

    sim = SimCluster(base, nodes=64).start()
    run = sim.pull_all(pinned_ref, uid)          # SimRun: per-node times, errors
    sim.conversions()                            # producer runs, from the daemons' logs
    sim.rss()                                    # memory of the daemons and their helpers
    sim.stop()

Used by tests/test_scale.py and bench/scale.py. `scale_image()` builds an image of
real files (this machine's Python standard library, a few MB) whose conversion
takes a few seconds, with a salt layer so each call gives a never-seen digest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from daemon_proc import BIN, DaemonProcess
from ocibuild import Entry, Pusher

#: zstd level 19 on one thread: a conversion of scale_image() takes a few seconds (about 5 s
#: here), long enough that the other nodes' waiting is measurable; the default (level 3, all
#: cores) converts it in well under one.
SLOW_SQUASH = "[squash]\nlevel = 19\njobs = 1\n"
SIM_CONF = ("[daemon]\nprefetch_socket = off\nmount_idle = 1\n"
            "[slurm]\njobs = off\n"
            "[cache]\nlease_ttl = 60\n" + SLOW_SQUASH)
_CONVERTING = re.compile(r'"converting"')  # the producer's log line (pull.py), once a run


def real_files(limit_mb: float, roots: Sequence[str] = ()) -> List[Entry]:
    """Regular files (and their directories) from this machine, up to limit_mb in all,
    in a stable order: real file contents, the way an image holds a Python or a libc."""
    roots = list(roots) or [os.path.dirname(os.__file__)]  # the standard library
    limit = int(limit_mb * (1 << 20))
    entries: List[Entry] = []
    dirs = set()
    total = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages",
                                                                "dist-packages"))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                rel = "opt/files" + path
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i]) + "/"
                    if d not in dirs:
                        dirs.add(d)
                        entries.append(Entry(d, "dir", mode=0o755))
                entries.append(Entry(rel, data=data, mode=0o644))
                total += len(data)
                if total >= limit:
                    return entries
    return entries


_FILES_CACHE: Dict[float, List[Entry]] = {}


def scale_image(pusher: Pusher, repo: str, tag: str = "v1", files_mb: float = 5):
    """Push a never-seen image: busybox, `files_mb` of real files in two layers, and a salt
    layer. Returns the Pushed (manifest_digest, config_digest, layer_digests)."""
    from images import IMAGE_CONFIG, busybox_layers
    if files_mb not in _FILES_CACHE:
        _FILES_CACHE[files_mb] = real_files(files_mb)
    files = _FILES_CACHE[files_mb]
    half = len(files) // 2
    base = busybox_layers()[0]
    salt = [Entry("etc/", "dir", mode=0o755),
            Entry("etc/scale-id", data=(uuid.uuid4().hex + "\n").encode())]
    return pusher.image(repo, tag, [base + files[:half], files[half:], salt],
                        config=IMAGE_CONFIG)


def blob_count(pushed) -> int:
    return len(pushed.layer_digests) + 1  # the layers and the config


@dataclass
class NodeResult:
    node: str
    seconds: float = 0.0
    digest: str = ""
    path: str = ""
    error: str = ""
    waited: bool = False


@dataclass
class SimRun:
    nodes: int
    wall: float
    results: List[NodeResult] = field(default_factory=list)

    @property
    def errors(self) -> List[str]:
        return [f"{r.node}: {r.error}" for r in self.results if r.error]

    @property
    def paths(self) -> set:
        return {r.path for r in self.results if not r.error}

    def to_json(self) -> dict:
        times = sorted(r.seconds for r in self.results)
        return {"nodes": self.nodes, "wall_s": round(self.wall, 3),
                "first_ready_s": round(times[0], 3) if times else None,
                "median_ready_s": round(times[len(times) // 2], 3) if times else None,
                "all_ready_s": round(times[-1], 3) if times else None,
                "errors": self.errors[:5], "error_count": len(self.errors)}


def converting_lines(daemons: Sequence[DaemonProcess]) -> Dict[str, int]:
    """node -> number of "converting" lines in its daemon's log (one per producer run)."""
    return {d.node: sum(1 for line in d.log().splitlines() if _CONVERTING.search(line))
            for d in daemons}


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pids: set) -> set:
    """pids and all their descendants."""
    parent: Dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(pids), list(pids)
    kids: Dict[int, List[int]] = {}
    for c, p in parent.items():
        kids.setdefault(p, []).append(c)
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class SimCluster:
    def __init__(self, base: Path, nodes: int, conf: str = SIM_CONF, batch: int = 8,
                 cache: Optional[Path] = None):
        self.base = Path(base)
        self.n = nodes
        self.batch = batch
        self.cache = Path(cache) if cache else self.base / "cache"
        self.conf_path = self.base / "sim.conf"
        self.conf = conf
        self.daemons: List[DaemonProcess] = []
        self.start_seconds = 0.0

    def start(self) -> "SimCluster":
        """Start the daemons `batch` at a time (each waits for its socket)."""
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.conf_path.write_text(self.conf)
        t0 = time.monotonic()
        todo = [DaemonProcess(self.base, self.cache, node=f"n{i}", metrics=False,
                              extra=["--config", str(self.conf_path)])
                for i in range(1, self.n + 1)]
        try:
            for i in range(0, len(todo), self.batch):
                group = todo[i:i + self.batch]
                with ThreadPoolExecutor(len(group)) as ex:
                    errors = [f.exception() for f in [ex.submit(d.start, 120) for d in group]]
                self.daemons += [d for d, e in zip(group, errors) if e is None]
                bad = [e for e in errors if e is not None]
                if bad:
                    raise bad[0]
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda d: d.stop(), self.daemons))
        self.daemons = []

    def __enter__(self) -> "SimCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def node(self, name: str) -> DaemonProcess:
        return next(d for d in self.daemons if d.node == name)

    # ---- asking all nodes at once -----------------------------------------------------
    def pull_all(self, reference: str, uid: int, nodes: Optional[Sequence[str]] = None,
                 timeout: float = 600) -> SimRun:
        """Every node (or those named) asked at the same moment for `reference` with uid;
        per-node time from that moment to the image being ready there."""
        import grpc
        from ociimage.v1 import ociimage_pb2 as pb
        from ociimage.v1 import ociimage_pb2_grpc as pbg
        daemons = [d for d in self.daemons if nodes is None or d.node in nodes]
        chans = [grpc.insecure_channel(f"unix:{d.socket}") for d in daemons]
        for ch in chans:
            grpc.channel_ready_future(ch).result(timeout=30)
        stubs = [pbg.ImagesStub(ch) for ch in chans]
        results = [NodeResult(d.node) for d in daemons]
        go = threading.Barrier(len(daemons) + 1)
        t0 = [0.0]

        def ask(i: int) -> None:
            r = results[i]
            go.wait()
            try:
                for ev in stubs[i].Pull(pb.PullRequest(reference=reference, uid=uid),
                                        timeout=timeout):
                    kind = ev.WhichOneof("event")
                    if kind == "progress" and ev.progress.phase == "wait":
                        r.waited = True
                    elif kind == "image":
                        r.digest, r.path = ev.image.digest, ev.image.path
                        break
                else:
                    r.error = "no image in the answer"
            except grpc.RpcError as e:
                r.error = f"{e.code().name}: {e.details()}"
            r.seconds = time.monotonic() - t0[0]

        threads = [threading.Thread(target=ask, args=(i,), daemon=True)
                   for i in range(len(daemons))]
        for t in threads:
            t.start()
        t0[0] = time.monotonic()
        go.wait()
        for t in threads:
            t.join(timeout + 30)
        wall = time.monotonic() - t0[0]
        for ch in chans:
            ch.close()
        return SimRun(len(daemons), wall, results)

    # ---- what they did ---------------------------------------------------------------
    def converting_lines(self) -> Dict[str, int]:
        """node -> number of "converting" log lines (one per producer run)."""
        return converting_lines(self.daemons)

    def conversions(self) -> int:
        return sum(self.converting_lines().values())

    def pids(self) -> List[int]:
        return [d.proc.pid for d in self.daemons if d.proc]

    def rss(self) -> dict:
        """Resident memory of the daemons and every process under them (as-user helpers)."""
        daemons = set(self.pids())
        every = _children(daemons)
        d_kb = sum(_rss_kb(p) for p in daemons)
        all_kb = sum(_rss_kb(p) for p in every)
        return {"daemons": len(daemons), "processes": len(every),
                "daemons_mb": round(d_kb / 1024, 1), "all_mb": round(all_kb / 1024, 1),
                "per_daemon_mb": round(all_kb / 1024 / max(1, len(daemons)), 1)}


def submit_resolve(reference: str, uid: int, gid: int, home: str, timeout: float = 60,
                   step_client=None) -> str:
    """What srun does once at submit: the step client resolves the tag to a digest with the
    user's own credentials (`oci-image-step submit`, run as the user). Returns REF@digest.

    step_client: an installed one the user can run (tests: install_fixture); this
    checkout's by default, which a user can only run where the checkout is readable."""
    from cluster_fixture import as_user
    from stepclient import options, plugstack, run_step
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home}
    client = str(step_client or BIN / "oci-image-step")
    # no daemon's user socket here: the step client asks the registry itself
    r = run_step(as_user([client, "submit", *plugstack(f"step_client={client}",
                                                       "prefetch_socket=none"),
                          *options(oci_image=reference)], uid, gid),
                 env=env, timeout=timeout, cwd="/")
    if r.returncode != 0:
        raise RuntimeError(f"submit resolve of {reference} failed: {r.stderr.strip()}")
    if not r.pinned:
        raise RuntimeError(f"submit resolve of {reference} pinned nothing: {r.records}")
    return r.pinned


def sim_user():
    """(name, uid, gid, home) of the unprivileged test user (created if missing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from localcluster import DEFAULT_USER, ensure_user
    pw = ensure_user(DEFAULT_USER)
    return pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir


def job_start(sim: SimCluster, proxy, pusher: Pusher, user, nodes: Optional[int] = None,
              files_mb: float = 5, trace: int = 2, repo: Optional[str] = None,
              timeout: float = 600, step_client=None) -> dict:
    """One cold job start on `nodes` nodes (n1..nN) for a never-seen image, then a new job
    on the cached image, each with srun's submit-side resolve of the tag first.

    Counts the registry requests by kind (proxy.counts), the producer runs, and the
    filesystem calls on the cache of up to `trace` traced nodes (strace): the waiting
    node's (one that did not convert) for the cold start, a node's cache hit for the warm
    one. Returns a JSON-able dict."""
    from fsops import FsTrace
    name, uid, gid, home = user
    n = nodes or sim.n
    names = [f"n{i}" for i in range(1, n + 1)]
    repo = repo or f"scale/n{n}-{uuid.uuid4().hex[:8]}"
    pushed = scale_image(pusher, repo, files_mb=files_mb)
    cfg = [pushed.config_digest]
    ref = f"{proxy.host}/{repo}:v1"
    out: dict = {"nodes": n, "blobs": blob_count(pushed), "image_mb": files_mb}

    def phase(label: str) -> dict:
        conv0 = sim.converting_lines()
        mark = proxy.mark()
        t0 = time.monotonic()
        pinned = submit_resolve(ref, uid, gid, home, step_client=step_client)
        resolve_s = time.monotonic() - t0
        traced = names[-trace:] if trace else []  # the last nodes: least likely to convert
        traces = {}
        for node in traced:
            d = sim.node(node)
            traces[node] = FsTrace(d.proc.pid, sim.cache,
                                   sim.base / f"{label}-{node}.strace").start()
        try:
            run = sim.pull_all(pinned, uid, nodes=names, timeout=timeout)
        finally:
            for t in traces.values():
                t.stop()
        conv1 = sim.converting_lines()
        converted = {k: conv1[k] - conv0.get(k, 0) for k in conv1 if conv1[k] - conv0.get(k, 0)}
        counts = proxy.counts(cfg, since=mark)
        res = run.to_json()
        res.update(pinned=pinned, submit_resolve_s=round(resolve_s, 3),
                   conversions=sum(converted.values()), converted_on=sorted(converted),
                   waited=sum(1 for r in run.results if r.waited),
                   paths=len(run.paths), registry=dict(counts))
        fs = {}
        for node, t in traces.items():
            ops = t.result()
            fs[node] = dict(ops.to_json(), converted=node in converted,
                            waited=next((r.waited for r in run.results if r.node == node), False))
        res["fs"] = fs
        waiting = [f for f in fs.values() if not f["converted"]]
        res["waiting_node_fs"] = waiting[0] if waiting else None
        return res

    out["cold"] = phase("cold")
    out["warm"] = phase("warm")
    out["rss"] = sim.rss()
    return out
