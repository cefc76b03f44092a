#!/usr/bin/env python3
"""Per-step cost of --oci-image, and time to first task for a new image, on the local 3-node cluster.

    .venv/bin/python bench/srun_overhead.py [--runs 15] [--rounds 3] [--before a5db242]

Starts (as root) a registry, one oci-imaged per node sharing a cache, and a
3-node Slurm cluster whose plugstack loads the plugin, all on this machine;
runs srun as the unprivileged test user. This checkout and an earlier revision (--before,
installed from a git worktree, with daemons of its own) are measured in the same run,
in rounds that alternate them. It measures:
  * `srun -N1 true` with an empty plugstack (Slurm alone),
  * `srun -N1 true` with the plugin loaded but no image (the "no cost when unused" path),
  * `srun -N1 --oci-image=<cached> true` and the same on 3 nodes,
  * time until the first task runs on 3 nodes for a never-seen image, against
    `oci-image convert` of the same image alone.
Writes bench/results/srun_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import install_revision, svg_bars, tree_entries  # noqa: E402
from daemon_proc import DaemonProcess  # noqa: E402
from images import busybox_layers  # noqa: E402
from localcluster import LocalCluster  # noqa: E402
from ocibuild import Entry, Pusher  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from stepclient import options, plugstack, run_step  # noqa: E402


def timed(fn, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(xs):
    xs = sorted(xs)
    return {"median_s": round(statistics.median(xs), 4),
            "p90_s": round(xs[min(len(xs) - 1, int(len(xs) * 0.9))], 4),
            "min_s": round(xs[0], 4), "runs": len(xs)}


def python_tree_layer(limit_mb: int = 60):
    """A realistic layer: this machine's Python standard library (many small files)."""
    return tree_entries(Path("/usr/lib/python3.11"), limit_mb << 20)


class Variant:
    """One revision's install, its three daemons and its plugstack line."""

    def __init__(self, name: str, prefix: Path, base: Path, conf: Path):
        self.name, self.prefix = name, prefix
        vbin = prefix / "venv" / "bin"
        self.dir = base / name
        self.daemons = [DaemonProcess(self.dir, self.dir / "cache", node=f"n{i}",
                                      extra=["--config", str(conf)], bin_dir=vbin)
                        for i in (1, 2, 3)]
        # n1's daemon is also this host's ("login node") daemon: srun resolves tags there
        self.plug = (f"required {prefix}/lib/spank_oci_image.so "
                     f"step_client={vbin}/oci-image-step socket={self.dir}/%n/oci-imaged.sock "
                     f"prefetch_socket={self.dir}/n1/oci-imaged-prefetch.sock\n")


def step_breakdown(v: Variant, tag: str, cluster, runs: int) -> dict:
    """Where a step's time goes on one node, as slurmstepd would spend it (root, n1's daemon):
    a bare `python -IS`, the step client's prepare and release as fresh processes, and the
    daemon's own work for them (the same requests from a warm client). The difference
    between a fresh prepare and the daemon's work is what preparing the image once per job
    could save at most, if later steps still ran the step client; the daemon's prepare is
    what it could save if they did not."""
    sys.path.insert(0, str(ROOT / "daemon"))
    from ociimage.stepsock import call, step_socket_path
    py = v.prefix / "venv" / "bin" / "python"
    step = v.prefix / "venv" / "bin" / "oci-image-step"
    d = v.daemons[0]
    plug = plugstack(f"step_client={step}", f"socket={d.socket}")
    sub = run_step([str(step), "submit", *plugstack(f"step_client={step}", "prefetch_socket=none"),
                    *options(oci_image=tag)])
    if sub.returncode != 0 or not sub.pinned:
        raise RuntimeError(f"submit of {tag} failed: {sub.stderr}")
    pinned = sub.pinned
    # n1 as the step's second node: only a step's first node shows progress
    job_env = {"SLURM_STEP_NODELIST": "n0,n1", "OCI_SUBMIT_CWD": "/tmp"}
    env_blob = b"".join(f"{k}={v}".encode() + b"\0" for k, v in job_env.items())
    ids = ["--job", "424242", "--uid", str(cluster.uid), "--gid", str(cluster.gid),
           "--node-id", "1"]

    def release(i: int) -> None:  # as slurmstepd: the job's environment on a memfd
        fd = os.memfd_create("job-env", 0)
        try:
            os.write(fd, env_blob)
            subprocess.run([str(step), "release", *ids, "--step", str(i), "--job-env-fd",
                            str(fd), *plug], check=True, pass_fds=[fd])
        finally:
            os.close(fd)

    bare = timed(lambda: subprocess.run([str(py), "-IS", "-c", "pass"], check=True), runs)
    prep, rel, warm_prep, warm_rel = [], [], [], []
    for i in range(runs):
        t = time.perf_counter()
        r = run_step([str(step), "prepare", *ids, "--step", str(i), *plug,
                      *options(oci_image=pinned)], job_env=job_env)
        prep.append(time.perf_counter() - t)
        if r.fd is not None:
            os.close(r.fd)
        if r.returncode != 0 or r.fd is None:
            raise RuntimeError(f"prepare of step {i} failed: {r.stderr}")
        t = time.perf_counter()
        release(i)
        rel.append(time.perf_counter() - t)
    path = step_socket_path(d.socket)
    req = {"job_id": "424243", "uid": cluster.uid, "gid": cluster.gid, "image": pinned,
           "cwd": "/tmp", "node": "n1", "mount_home": True, "home": "/tmp",
           "user_name": cluster.user}
    for i in range(runs):
        t = time.perf_counter()
        call(path, {"op": "prepare", "step": dict(req, step_id=str(i))})
        warm_prep.append(time.perf_counter() - t)
        t = time.perf_counter()
        call(path, {"op": "release", "job": "424243", "step": str(i)})
        warm_rel.append(time.perf_counter() - t)
    out = {"python_IS_pass": summary(bare), "step_client_prepare": summary(prep),
           "step_client_release": summary(rel), "daemon_prepare_warm_client": summary(warm_prep),
           "daemon_release_warm_client": summary(warm_rel)}
    print("where a step's time goes (one node, median):")
    for k, r in out.items():
        print(f"  {k:<30} {r['median_s'] * 1000:7.1f} ms")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15, help="per case and revision")
    ap.add_argument("--rounds", type=int, default=3,
                    help="the runs are split in rounds that alternate the revisions, so that "
                         "the machine's other load falls on both alike")
    ap.add_argument("--before", default="a5db242",
                    help="the revision to compare with (default: the last one before the plugin became a shim)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="oci-bench-srun-", dir="/tmp"))
    os.chmod(base, 0o755)
    conf = base / "oci-image.conf"
    conf.write_text("[daemon]\nmount_idle = 600\n")
    os.chmod(conf, 0o644)
    install_revision(None, base / "install-this", base)
    install_revision(args.before, base / "install-before", base)
    variants = [Variant("this", base / "install-this", base, conf),
                Variant(args.before, base / "install-before", base, conf)]
    reg = RegistryServer(base / "registry").start()
    for v in variants:
        for d in v.daemons:
            d.start()
    (base / "slurm").mkdir(mode=0o755)
    cluster = LocalCluster(base / "slurm", nodes=3)
    results = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                           "cpu": next((l.split(":", 1)[1].strip() for l in
                                        open("/proc/cpuinfo") if l.startswith("model name")), "")},
               "before": args.before, "runs": args.runs, "rounds": args.rounds}
    samples = {}
    try:
        cluster.start()
        pusher = Pusher(reg.url)
        pusher.image("bench/small", "v1", busybox_layers())
        small = f"{reg.host}/bench/small:v1"

        def srun(*a):
            r = cluster.run_as_user(["srun", *a], cwd="/tmp", timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"srun {a} failed: {r.stderr}")
            return r

        def steps_in_job(nodes: int, runs: int, image: str = "") -> list:
            """Time each `srun true` inside one batch job (the digest is pinned once, at sbatch)."""
            tag = f"{nodes}-{bool(image)}-{time.monotonic_ns()}"
            script, out = base / f"steps-{tag}.sh", base / f"steps-{tag}.out"
            script.write_text(
                "#!/bin/sh\n" + (f"#SBATCH --oci-image={image}\n" if image else "") +
                f"#SBATCH -N{nodes}\n#SBATCH -o {out}\n"
                f"for i in $(seq {runs}); do s=$(date +%s%N); srun -N{nodes} true; "
                "e=$(date +%s%N); echo STEP $((e-s)); done\n")
            os.chmod(script, 0o755)
            os.chmod(base, 0o777)
            r = cluster.run_as_user(["sbatch", "--wait", str(script)], cwd="/tmp", timeout=600)
            os.chmod(base, 0o755)
            if r.returncode != 0:
                raise RuntimeError(f"sbatch failed: {r.stderr} {out.read_text() if out.exists() else ''}")
            return [int(l.split()[1]) / 1e9 for l in out.read_text().splitlines()
                    if l.startswith("STEP ")]

        def use(plug: str) -> None:
            cluster.set_plugstack(plug)
            cluster.reconfigure()
            time.sleep(1)

        def add(key, xs):
            samples.setdefault(key, []).extend(xs)

        for v in variants:  # convert + mount once per revision (their caches are their own)
            use(v.plug)
            srun("-N3", f"--oci-image={small}", "true")
        per = max(1, args.runs // args.rounds)
        for rnd in range(args.rounds):
            use("")
            add("standalone_srun_no_plugin_N1", timed(lambda: srun("-N1", "true"), per))
            add("step_in_job_no_plugin_N1", steps_in_job(1, per))
            add("step_in_job_no_plugin_N3", steps_in_job(3, per))
            for v in (variants if rnd % 2 == 0 else variants[::-1]):
                use(v.plug)
                add(f"{v.name}:standalone_srun_plugin_no_image_N1",
                    timed(lambda: srun("-N1", "true"), per))
                add(f"{v.name}:standalone_srun_cached_image_N1",
                    timed(lambda: srun("-N1", f"--oci-image={small}", "true"), per))
                add(f"{v.name}:step_in_job_cached_image_N1", steps_in_job(1, per, small))
                add(f"{v.name}:step_in_job_cached_image_N3", steps_in_job(3, per, small))
        results.update({k: summary(xs) for k, xs in samples.items()})

        results["breakdown"] = step_breakdown(variants[0], f"{reg.host}/bench/small:v1", cluster,
                                              args.runs)
        use(variants[0].plug)
        entries, size = python_tree_layer()
        layers = busybox_layers() + [entries]
        pusher.image("bench/new", "v1", layers)
        pusher.image("bench/new2", "v1", layers + [[Entry("marker", data=b"2")]])
        out = base / "alone.sqfs"
        t = time.perf_counter()
        subprocess.run([str(variants[0].prefix / "venv/bin/oci-image"), "convert",
                        f"{reg.host}/bench/new:v1", "-o", str(out)], check=True,
                       capture_output=True)
        convert_alone = time.perf_counter() - t
        t = time.perf_counter()
        srun("-N3", f"--oci-image={reg.host}/bench/new2:v1", "true")
        first_task = time.perf_counter() - t
        results["new_image"] = {"layer_bytes": size, "convert_alone_s": round(convert_alone, 3),
                                "srun_N3_first_task_s": round(first_task, 3),
                                "sqfs_bytes": out.stat().st_size}
    finally:
        cluster.stop(quiet=True)
        for v in variants:
            for d in v.daemons:
                d.stop()
        reg.stop()
        mounts = [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                  if l.split()[4].startswith(str(base))]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(base, ignore_errors=True)

    print(f"{'case':<40} {'median':>8} {'p90':>8}  vs plain Slurm (same run)")
    base_of = {"standalone_srun_plugin_no_image_N1": "standalone_srun_no_plugin_N1",
               "standalone_srun_cached_image_N1": "standalone_srun_no_plugin_N1",
               "step_in_job_cached_image_N1": "step_in_job_no_plugin_N1",
               "step_in_job_cached_image_N3": "step_in_job_no_plugin_N3"}
    for k in ("standalone_srun_no_plugin_N1", "step_in_job_no_plugin_N1",
              "step_in_job_no_plugin_N3"):
        print(f"{k:<40} {results[k]['median_s']:>7.3f}s {results[k]['p90_s']:>7.3f}s")
    for case, ref in base_of.items():
        for v in variants:
            k = f"{v.name}:{case}"
            r = results[k]
            delta = r["median_s"] - results[ref]["median_s"]
            r["delta_vs_plain_s"] = round(delta, 4)
            print(f"{k:<40} {r['median_s']:>7.3f}s {r['p90_s']:>7.3f}s  {delta:+.3f}s")
    n = results["new_image"]
    print(f"new image ({n['layer_bytes'] / 1e6:.0f} MB of files): convert alone {n['convert_alone_s']:.2f}s, "
          f"srun -N3 until the tasks ran {n['srun_N3_first_task_s']:.2f}s")
    goals = {"standalone_le_plain_plus_150ms":
             results["this:standalone_srun_cached_image_N1"]["delta_vs_plain_s"] <= 0.150,
             "step_in_job_le_plain_plus_80ms":
             results["this:step_in_job_cached_image_N1"]["delta_vs_plain_s"] <= 0.080}
    results["goals"] = goals
    print("goals:", goals)
    out = ROOT / "bench" / "results" / "srun_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".svg"))
    return 0


def plot(results: dict, path: Path) -> None:
    """What --oci-image adds to a step over plain Slurm, this checkout against --before."""
    cases = [("standalone srun, tag", "standalone_srun_cached_image_N1"),
             ("step in a job, 1 node", "step_in_job_cached_image_N1"),
             ("step in a job, 3 nodes", "step_in_job_cached_image_N3")]
    before = results["before"]
    series = {name: [round(results[f"{key}:{c}"]["delta_vs_plain_s"] * 1000) for _, c in cases]
              for name, key in (("this checkout", "this"), (f"{before} (before)", before))}
    svg_bars(path, "srun ... true in a cached image: ms added to plain Slurm (median)",
             [label for label, _ in cases], series, " ms")


if __name__ == "__main__":
    sys.exit(main())
