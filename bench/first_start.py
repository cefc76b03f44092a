#!/usr/bin/env python3
"""What a user sees while a never-seen image starts on 3 nodes: this checkout against an
earlier revision (default: the one before live progress), in the same run.

    .venv/bin/python bench/first_start.py [--mb 600] [--before f9616b6]

Builds an image from this machine's own files (/usr/lib/python3.X, /usr/share, shared
libraries: real files, several layers, about --mb MB), pushes it to a real registry on
loopback, and for each revision installs it (scripts/install-local.sh of a git worktree),
starts 3 daemons and a 3-node Slurm cluster, and runs, as the unprivileged test user,
`srun -N3 --oci-image=<a never-seen tag of it> true`, stamping each line of srun's stderr
as it arrives. Figures: seconds from srun's start to the first line, the longest silence
while the step waits, the number of lines, and until the tasks ran.
Writes bench/results/first_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import install_revision, tree_entries  # noqa: E402
from cluster_fixture import as_user  # noqa: E402
from install_fixture import Installed  # noqa: E402
from localsite import start_site, stop_site  # noqa: E402
from images import busybox_layers  # noqa: E402
from ocibuild import Entry, Pusher  # noqa: E402
from registry_server import RegistryServer  # noqa: E402

TREES = [f"/usr/lib/python3.{sys.version_info.minor}", "/usr/share", "/usr/lib/x86_64-linux-gnu"]


def tree_layers(limit_mb: int):
    """Real files, one layer per tree, about limit_mb MB in all."""
    layers, total = [], 0
    for base in TREES:
        entries, total = tree_entries(Path(base), limit_mb << 20, total)
        layers.append(entries)
        if total > limit_mb << 20:
            break
    return layers, total


def install(rev: str, base: Path) -> Installed:
    return Installed(install_revision(None if rev == "HEAD" else rev, base / f"install-{rev}",
                                      base))


def srun_timed(cluster, argv):
    p = subprocess.Popen(as_user(["srun", *argv], cluster.uid, cluster.gid), cwd="/tmp",
                         env=cluster.user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, errors="replace")
    start = time.monotonic()
    err, out = [], []

    def read(stream, into):
        for line in stream:
            into.append((round(time.monotonic() - start, 3), line.rstrip("\n")))

    ts = [threading.Thread(target=read, args=(p.stderr, err)),
          threading.Thread(target=read, args=(p.stdout, out))]
    for t in ts:
        t.start()
    rc = p.wait(900)
    for t in ts:
        t.join()
    return rc, out, err


def first_start(installed, registry, layers, tag):
    site = start_site(installed, "oci-bench-first-", nodes=3)
    try:
        Pusher(registry.url).image("bench/first", tag, busybox_layers() + layers
                                   + [[Entry("marker", data=tag.encode())]])
        rc, out, err = srun_timed(site.cluster, ["-N3", f"--oci-image={registry.host}/bench/first:{tag}",
                                                 "true"])
        if rc != 0:
            raise RuntimeError(f"srun failed: {err}")
        done = max(t for t, _ in err) if err else None
        stamps = [0.0] + [t for t, _ in err]
        return {"first_line_s": err[0][0] if err else None,
                "longest_silence_s": round(max(b - a for a, b in zip(stamps, stamps[1:])), 3)
                if err else None,
                "lines": len(err), "last_line_s": done,
                "stderr": err}
    finally:
        stop_site(site)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=600)
    ap.add_argument("--before", default="f9616b6", help="the revision to compare with")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="oci-bench-first-", dir="/tmp"))
    os.chmod(base, 0o755)
    results = {"image_mb": None, "runs": {}}
    try:
        layers, total = tree_layers(args.mb)
        results["image_mb"] = round(total / 1e6)
        results["image_files"] = sum(len(l) for l in layers)
        with RegistryServer(base / "registry") as registry:
            for rev in (args.before, "HEAD"):
                results["runs"][rev] = first_start(install(rev, base), registry, layers, f"t-{rev}")
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"image: {results['image_mb']} MB, {results['image_files']} files, never seen; "
          f"srun -N3 as a user")
    print(f"{'revision':<10} {'first line':>11} {'longest silence':>16} {'lines':>6} {'last line':>10}")
    for rev, r in results["runs"].items():
        fl = f"{r['first_line_s']:.1f} s" if r["first_line_s"] is not None else "-"
        print(f"{rev:<10} {fl:>11} {r['longest_silence_s']:>14.1f} s {r['lines']:>6} "
              f"{r['last_line_s']:>8.1f} s")
    for rev, r in results["runs"].items():
        print(f"\n{rev}: srun's stderr, stamped on arrival")
        for t, line in r["stderr"]:
            print(f"  {t:6.1f}  {line}")
    if not args.no_write:
        out = ROOT / "bench" / "results" / "first_start.json"
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
