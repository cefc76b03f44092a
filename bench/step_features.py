#!/usr/bin/env python3
"""What each step feature of #18 costs a step, against the plain step, in the same run.

    .venv/bin/python bench/step_features.py [--runs 15]

Starts (as root) a registry, one oci-imaged per node sharing a cache and a 2-node Slurm
cluster on this machine (tests/localsite.py), and times `srun -N1 --oci-image=REF true`
as the unprivileged test user: plain, with --oci-writable (a tmpfs overlay), with
--oci-remap-root (a user namespace made by a spawned child, an idmapped image mount),
with a tmpfs mount, and with CDI devices (a test spec: one node the host's /dev lacks,
so the step gets an overlay /dev). Named containers are timed inside one job (salloc):
the first step that makes the container, then later steps that reuse it, against plain
steps in the same allocation. Rounds alternate the variants, so drift hits all alike.
Writes bench/results/step_features.json.
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

from images import IMAGE_CONFIG, busybox_layers  # noqa: E402
from ocibuild import Pusher  # noqa: E402
from registry_server import RegistryServer  # noqa: E402


def summary(xs):
    xs = sorted(xs)
    return {"median_s": round(statistics.median(xs), 4),
            "p90_s": round(xs[min(len(xs) - 1, int(len(xs) * 0.9))], 4),
            "min_s": round(xs[0], 4), "runs": len(xs)}


def cdi_conf(base: Path) -> str:
    devs = base / "devs"
    devs.mkdir(mode=0o755)
    os.mknod(devs / "null0", 0o666 | 0o020000, os.makedev(1, 3))
    spec_dir = base / "cdi"
    spec_dir.mkdir(mode=0o755)
    spec = {"cdiVersion": "0.6.0", "kind": "bench.example/dev", "devices": [
        {"name": "a", "containerEdits": {"deviceNodes": [
            {"path": "/dev/bench/null0", "hostPath": str(devs / "null0")}]}}]}
    (spec_dir / "bench.json").write_text(json.dumps(spec))
    os.chmod(spec_dir / "bench.json", 0o644)
    return (f"[daemon]\nmount_idle = 600\ncdi_spec_dirs = {spec_dir}\n"
            f"[cache]\nlease_ttl = 60\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    from _common import install_revision
    from install_fixture import Installed
    from localsite import start_site, stop_site

    work = Path(tempfile.mkdtemp(prefix="oci-bench-feat-", dir="/tmp"))
    os.chmod(work, 0o755)
    installed = Installed(install_revision(None, work / "install", work))
    with RegistryServer(Path(tempfile.mkdtemp(prefix="oci-bench-reg-"))) as reg:
        Pusher(reg.url).image("bench/app", "v1", busybox_layers(), config=IMAGE_CONFIG)
        ref = f"{reg.host}/bench/app:v1"
        site = start_site(installed, "oci-bench-feat-", nodes=2, daemon_conf=cdi_conf)
        try:
            def srun(*extra):
                t = time.perf_counter()
                r = site.cluster.run_as_user(["srun", "-N1", "-w", "n1", f"--oci-image={ref}",
                                              *extra, "true"], cwd="/tmp", timeout=120)
                dt = time.perf_counter() - t
                if r.returncode != 0:
                    raise SystemExit(f"srun {' '.join(extra)} failed: {r.stderr}")
                return dt

            variants = {
                "plain": (),
                "writable": ("--oci-writable",),
                "remap_root": ("--oci-remap-root",),
                "tmpfs": ("--oci-mounts=tmpfs:/scratch:size=64m",),
                "cdi_overlay_dev": ("--oci-devices=bench.example/dev=a",),
            }
            srun()  # pull, convert and mount once: every variant then starts warm
            times = {k: [] for k in variants}
            for _ in range(args.runs):
                for name, extra in variants.items():
                    times[name].append(srun(*extra))
            # named containers: one allocation, timed per step from inside it
            script = (f"t() {{ s=$(date +%s.%N); srun -N1 -w n1 \"$@\" true || exit 1; "
                      f"e=$(date +%s.%N); echo \"$1 $(echo \"$e - $s\" | bc)\"; }}; "
                      f"t --oci-image={ref} --oci-name=first; "
                      f"for i in $(seq {args.runs}); do t --oci-name=first; "
                      f"t --oci-image={ref}; done")
            r = site.cluster.run_as_user(["salloc", "-N1", "-w", "n1", "sh", "-c", script],
                                         cwd="/tmp", timeout=600)
            if r.returncode != 0:
                raise SystemExit(f"salloc failed: {r.stderr}")
            named = {"make": [], "reuse": [], "plain_in_job": []}
            lines = [l.split() for l in r.stdout.splitlines() if len(l.split()) == 2]
            named["make"].append(float(lines[0][1]))
            for opt, dt in lines[1:]:
                named["reuse" if opt == "--oci-name=first" else "plain_in_job"].append(float(dt))
        finally:
            stop_site(site)
            shutil.rmtree(work, ignore_errors=True)
    result = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
              "srun_N1_true": {k: summary(v) for k, v in times.items()},
              "named_in_one_job": {k: summary(v) for k, v in named.items()}}
    base = result["srun_N1_true"]["plain"]["median_s"]
    print(f"srun -N1 --oci-image=REF true, median of {args.runs} (cached image):")
    for k, v in result["srun_N1_true"].items():
        print(f"  {k:16s} {v['median_s'] * 1000:7.0f} ms  ({(v['median_s'] - base) * 1000:+.0f} ms)")
    nbase = result["named_in_one_job"]["plain_in_job"]["median_s"]
    print("steps of one job (salloc):")
    for k, v in result["named_in_one_job"].items():
        print(f"  {k:16s} {v['median_s'] * 1000:7.0f} ms  ({(v['median_s'] - nbase) * 1000:+.0f} ms)")
    out = ROOT / "bench" / "results" / "step_features.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
