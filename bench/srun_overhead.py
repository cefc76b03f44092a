#!/usr/bin/env python3
"""Per-step cost of --oci-image, and time to first task for a new image, on the local 3-node cluster.

    .venv/bin/python bench/srun_overhead.py [--runs 15]

Starts (as root) a registry, one oci-imaged per node sharing a cache, and a
3-node Slurm cluster whose plugstack loads the plugin, all on this machine;
runs srun as the unprivileged test user. In the same run it measures:
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

from _common import tree_entries  # noqa: E402
from daemon_proc import DaemonProcess  # noqa: E402
from images import busybox_layers  # noqa: E402
from localcluster import LocalCluster  # noqa: E402
from ocibuild import Entry, Pusher  # noqa: E402
from registry_server import RegistryServer  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="oci-bench-srun-", dir="/tmp"))
    os.chmod(base, 0o755)
    prefix = base / "install"
    subprocess.run([str(ROOT / "scripts" / "install-local.sh"), str(prefix)], check=True)
    reg = RegistryServer(base / "registry").start()
    conf = base / "oci-image.conf"
    conf.write_text("[daemon]\nmount_idle = 600\n")
    daemons = [DaemonProcess(base, base / "cache", node=f"n{i}", extra=["--config", str(conf)])
               for i in (1, 2, 3)]
    for d in daemons:
        d.start()
    plug = (f"required {prefix}/lib/spank_oci_image.so step_client={prefix}/venv/bin/oci-image-step "
            f"socket={base}/%n/oci-imaged.sock\n")
    (base / "slurm").mkdir(mode=0o755)
    cluster = LocalCluster(base / "slurm", nodes=3)
    cluster.set_plugstack(plug)
    results = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                           "cpu": next((l.split(":", 1)[1].strip() for l in
                                        open("/proc/cpuinfo") if l.startswith("model name")), "")}}
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

        srun("-N3", f"--oci-image={small}", "true")  # convert + mount once
        srun("-N3", "true")

        def steps_in_job(nodes: int, image: str = "") -> list:
            """Time each `srun true` inside one batch job (the digest is pinned once, at sbatch)."""
            script = base / f"steps-{nodes}-{bool(image)}.sh"
            out = base / f"steps-{nodes}-{bool(image)}.out"
            script.write_text(
                "#!/bin/sh\n" + (f"#SBATCH --oci-image={image}\n" if image else "") +
                f"#SBATCH -N{nodes}\n#SBATCH -o {out}\n"
                f"for i in $(seq {args.runs}); do s=$(date +%s%N); srun -N{nodes} true; "
                "e=$(date +%s%N); echo STEP $((e-s)); done\n")
            os.chmod(script, 0o755)
            os.chmod(base, 0o777)
            r = cluster.run_as_user(["sbatch", "--wait", str(script)], cwd="/tmp", timeout=600)
            os.chmod(base, 0o755)
            if r.returncode != 0:
                raise RuntimeError(f"sbatch failed: {r.stderr} {out.read_text() if out.exists() else ''}")
            return [int(l.split()[1]) / 1e9 for l in out.read_text().splitlines()
                    if l.startswith("STEP ")]

        results["standalone_srun_plugin_no_image_N1"] = summary(
            timed(lambda: srun("-N1", "true"), args.runs))
        results["standalone_srun_cached_image_N1"] = summary(
            timed(lambda: srun("-N1", f"--oci-image={small}", "true"), args.runs))
        results["step_in_job_no_image_N1"] = summary(steps_in_job(1))
        results["step_in_job_cached_image_N1"] = summary(steps_in_job(1, small))
        results["step_in_job_no_image_N3"] = summary(steps_in_job(3))
        results["step_in_job_cached_image_N3"] = summary(steps_in_job(3, small))
        cluster.set_plugstack("")
        cluster.reconfigure()
        time.sleep(1)
        results["standalone_srun_no_plugin_N1"] = summary(timed(lambda: srun("-N1", "true"), args.runs))
        results["step_in_job_no_plugin_N1"] = summary(steps_in_job(1))
        cluster.set_plugstack(plug)
        cluster.reconfigure()
        time.sleep(1)

        entries, size = python_tree_layer()
        layers = busybox_layers() + [entries]
        pusher.image("bench/new", "v1", layers)
        pusher.image("bench/new2", "v1", layers + [[Entry("marker", data=b"2")]])
        out = base / "alone.sqfs"
        t = time.perf_counter()
        subprocess.run([str(prefix / "venv/bin/oci-image"), "convert", f"{reg.host}/bench/new:v1",
                        "-o", str(out)], check=True, capture_output=True)
        convert_alone = time.perf_counter() - t
        t = time.perf_counter()
        srun("-N3", f"--oci-image={reg.host}/bench/new2:v1", "true")
        first_task = time.perf_counter() - t
        results["new_image"] = {"layer_bytes": size, "convert_alone_s": round(convert_alone, 3),
                                "srun_N3_first_task_s": round(first_task, 3),
                                "sqfs_bytes": out.stat().st_size}
    finally:
        cluster.stop(quiet=True)
        for d in daemons:
            d.stop()
        reg.stop()
        mounts = [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                  if l.split()[4].startswith(str(base))]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(base, ignore_errors=True)

    print(f"{'case':<38} {'median':>8} {'p90':>8}  vs the same without image")
    pairs = [("standalone_srun_no_plugin_N1", "standalone_srun_no_plugin_N1"),
             ("standalone_srun_plugin_no_image_N1", "standalone_srun_no_plugin_N1"),
             ("standalone_srun_cached_image_N1", "standalone_srun_plugin_no_image_N1"),
             ("step_in_job_no_plugin_N1", "step_in_job_no_plugin_N1"),
             ("step_in_job_no_image_N1", "step_in_job_no_plugin_N1"),
             ("step_in_job_cached_image_N1", "step_in_job_no_image_N1"),
             ("step_in_job_no_image_N3", "step_in_job_no_image_N3"),
             ("step_in_job_cached_image_N3", "step_in_job_no_image_N3")]
    for k, ref in pairs:
        r = results[k]
        delta = r["median_s"] - results[ref]["median_s"]
        results[k]["delta_vs_" + ref + "_s"] = round(delta, 4)
        print(f"{k:<38} {r['median_s']:>7.3f}s {r['p90_s']:>7.3f}s  {delta:+.3f}s")
    n = results["new_image"]
    print(f"new image ({n['layer_bytes'] / 1e6:.0f} MB of files): convert alone {n['convert_alone_s']:.2f}s, "
          f"srun -N3 until the tasks ran {n['srun_N3_first_task_s']:.2f}s")
    out = ROOT / "bench" / "results" / "srun_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
