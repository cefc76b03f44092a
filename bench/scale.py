#!/usr/bin/env python3
"""What a job start costs against the number of nodes: 1 to 128 real oci-imaged sharing one cache.

    .venv/bin/python bench/scale.py [--nodes 1,2,4,8,16,32,64,128] [--files-mb 5] [--batch 8]

Starts (as root) a docker-registry behind a counting proxy (tests/registry_proxy.py)
and as many real `oci-imaged` processes as the largest N, each a node of its own
(own --node, socket and runtime dir) sharing one cache directory
(tests/simcluster.py). For each N, on nodes n1..nN, with a never-seen image each
time (busybox + `--files-mb` of this machine's Python standard library + a salt
layer: 4 blobs, converted with zstd level 19 on one thread, about 5 s here):

  cold  srun's submit-side resolve of the tag (`oci-image-step submit` as the test
        user), then all N nodes asked at once (Pull with the user's uid, as a step's
        client asks) for the pinned digest;
  warm  the same again: a new job on the cached image.

Recorded for each: time until every node is ready, producer runs ("converting" in
the daemons' logs), registry requests by kind, and the calls on the cache's files
of two traced nodes (strace -f -y, tests/fsops.py): for the cold start those of a
node that waited for another's conversion, lock files apart.

The comparison in the same run is N = 1: a single node's conversion. Issue 15's goals,
all independent of N: cold start on N nodes <= 1.2 x that + 1 s; manifest + config
requests <= 3 and blob GETs = blobs; a new job <= 2 requests; a waiting node <= 10
lock-file calls per conversion. The table marks each; nothing is asserted (the counts
are asserted in tests/test_scale.py).

All N daemons run on this one machine: the waiting nodes' polling competes with the
converter for the same cores, which a real cluster does not do (there each waiting node
costs the metadata server, not the converter's CPU). Writes bench/results/scale.json
and bench/results/scale.svg.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, RESULTS, _esc, machine, table, write_result  # noqa: E402

from ocibuild import Pusher  # noqa: E402
from registry_proxy import RegistryProxy  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from simcluster import SIM_CONF, SimCluster, job_start, sim_user  # noqa: E402

GOAL_MANIFEST_CONFIG = 3
GOAL_WARM = 2
GOAL_LOCK = 10


def git_head() -> str:
    import subprocess
    r = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
                       capture_output=True, text=True)
    return r.stdout.strip()


def row(r: dict, t1: float) -> dict:
    c, w = r["cold"], r["warm"]
    fs = c["waiting_node_fs"]
    ideal = 1.2 * t1 + 1.0
    warm_fs = [f["total"] for f in w["fs"].values()]
    return {
        "nodes": r["nodes"], "blobs": r["blobs"],
        "cold_all_ready_s": c["all_ready_s"], "cold_median_ready_s": c["median_ready_s"],
        "ideal_s": round(ideal, 2), "time_ok": c["all_ready_s"] <= ideal,
        "submit_resolve_s": c["submit_resolve_s"],
        "conversions": c["conversions"], "errors": c["error_count"] + w["error_count"],
        "cold_manifest_config": c["registry"]["manifest_config"],
        "cold_blob_get": c["registry"]["blob_get"], "cold_requests": c["registry"]["total"],
        "warm_requests": w["registry"]["total"], "warm_all_ready_s": w["all_ready_s"],
        "waiting_lock_calls": fs["lock"] if fs else None,
        "waiting_cache_calls": fs["total"] if fs else None,
        "waiting_seconds": fs["seconds"] if fs else None,
        "waiting_lock_per_s": round(fs["lock"] / fs["seconds"], 1) if fs and fs["seconds"] else None,
        "warm_cache_calls_per_node": max(warm_fs) if warm_fs else None,
    }


def print_table(rows: List[dict]) -> str:
    hdr = ["N", "cold all-ready s", "goal s", "conv", "manif+cfg (<=3)", "blob GETs (=blobs)",
           "cold req", "warm req (<=2)", "waiting lock calls (<=10)", "/s", "waiting cache calls",
           "warm calls/node"]
    out = []
    for r in rows:
        mark = lambda ok: "" if ok else " !"
        out.append([
            r["nodes"], f"{r['cold_all_ready_s']:.2f}{mark(r['time_ok'])}", f"{r['ideal_s']:.2f}",
            r["conversions"],
            f"{r['cold_manifest_config']}{mark(r['cold_manifest_config'] <= GOAL_MANIFEST_CONFIG)}",
            f"{r['cold_blob_get']} ({r['blobs']}){mark(r['cold_blob_get'] == r['blobs'])}",
            r["cold_requests"], f"{r['warm_requests']}{mark(r['warm_requests'] <= GOAL_WARM)}",
            "-" if r["waiting_lock_calls"] is None else
            f"{r['waiting_lock_calls']}{mark(r['waiting_lock_calls'] <= GOAL_LOCK)}",
            "-" if r["waiting_lock_per_s"] is None else r["waiting_lock_per_s"],
            "-" if r["waiting_cache_calls"] is None else r["waiting_cache_calls"],
            "-" if r["warm_cache_calls_per_node"] is None else r["warm_cache_calls_per_node"]])
    text = table(out, hdr)
    print(text)
    print("(! = misses issue 15's goal)")
    return text


# ---- a small hand-written SVG line chart (no matplotlib here) ------------------------------

PALETTE = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"]


def _panel(x0: float, y0: float, w: float, h: float, title: str, xs: Sequence[int],
           series: Dict[str, Sequence[Optional[float]]], unit: str,
           dashed: Sequence[str] = (), log_y: bool = False) -> List[str]:
    vals = [v for s in series.values() for v in s if v is not None]
    vmax = max(vals + [1.0])
    vmin = max(min([v for v in vals if v > 0] + [1.0]), 0.5) if log_y else 0.0
    if log_y:
        lo, hi = math.floor(math.log10(vmin)), math.ceil(math.log10(vmax * 1.05))
        ticks = [10 ** k for k in range(lo, hi + 1)]
        ymap = lambda v: y0 + h - h * (math.log10(max(v, 10 ** lo)) - lo) / max(1, hi - lo)
    else:
        step = 10 ** math.floor(math.log10(vmax)) if vmax > 0 else 1
        while vmax / step > 6:
            step *= 2
        top = step * math.ceil(vmax * 1.05 / step)
        ticks = [step * k for k in range(int(top / step) + 1)]
        ymap = lambda v: y0 + h - h * v / top
    lx = [math.log2(x) for x in xs]
    span = max(lx[-1] - lx[0], 1)
    xmap = lambda x: x0 + w * (math.log2(x) - lx[0]) / span
    out = [f'<text x="{x0}" y="{y0 - 10}" font-size="13" font-weight="bold">{_esc(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for t in ticks:
        y = ymap(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end">{t:g}{unit}</text>')
    for x in xs:
        out.append(f'<text x="{xmap(x):.1f}" y="{y0 + h + 15}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 32}" text-anchor="middle">nodes</text>')
    ly = y0 + h + 52  # the legend under the panel
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [(xmap(x), ymap(v)) for x, v in zip(xs, s) if v is not None]
        dash = ' stroke-dasharray="6,4"' if name in dashed else ""
        if pts:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="'
                       + " ".join(f"{px:.1f},{py:.1f}" for px, py in pts) + '"/>')
            if name not in dashed:
                out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>' for px, py in pts]
        out.append(f'<line x1="{x0 + 8}" y1="{ly - 4}" x2="{x0 + 28}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{x0 + 33}" y="{ly}">{_esc(name)}</text>')
        ly += 15
    return out


def write_svg(path: Path, rows: List[dict], subtitle: str,
              before: Optional[List[dict]] = None) -> None:
    """before: the rows of an earlier run (other code), drawn dotted where N matches."""
    xs = [r["nodes"] for r in rows]
    old = {r["nodes"]: r for r in (before or [])}

    def was(key: str) -> List[Optional[float]]:
        return [old[x].get(key) if x in old else None for x in xs]
    pw, ph, gap = 330, 230, 85
    W = 60 + 3 * pw + 2 * gap + 20
    H = 420
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">Job start on N nodes '
           f'(real oci-imaged sharing one cache)</text>',
           f'<text x="10" y="37" fill="#555">{_esc(subtitle)}</text>']
    x0, y0 = 60, 75
    out += _panel(x0, y0, pw, ph, "time until every node is ready", xs, {
        "cold start": [r["cold_all_ready_s"] for r in rows],
        "goal: 1.2 x one node + 1 s": [r["ideal_s"] for r in rows],
        "new job, cached": [r["warm_all_ready_s"] for r in rows]}, " s",
        dashed=["goal: 1.2 x one node + 1 s"])
    x0 += pw + gap
    out += _panel(x0, y0, pw, ph, "registry requests per job start", xs, {
        "cold: manifest + config": [r["cold_manifest_config"] for r in rows],
        "cold: blob GETs": [r["cold_blob_get"] for r in rows],
        "new job: all requests": [r["warm_requests"] for r in rows],
        "goal: manifest + config": [GOAL_MANIFEST_CONFIG] * len(rows),
        "goal: new job": [GOAL_WARM] * len(rows),
        **({"before: cold manifest + config": was("cold_manifest_config"),
            "before: new job": was("warm_requests")} if old else {})}, "", log_y=True,
        dashed=["goal: manifest + config", "goal: new job", "before: cold manifest + config",
                "before: new job"])
    x0 += pw + gap
    out += _panel(x0, y0, pw, ph, "a waiting node's calls on the cache", xs, {
        "lock-file calls per conversion": [r["waiting_lock_calls"] for r in rows],
        "all cache calls": [r["waiting_cache_calls"] for r in rows],
        "goal: lock-file calls": [GOAL_LOCK] * len(rows),
        **({"before: lock-file calls": was("waiting_lock_calls")} if old else {})}, "",
        log_y=True, dashed=["goal: lock-file calls", "before: lock-file calls"])
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1,2,4,8,16,32,64,128",
                    help="comma-separated node counts (the first should be 1: the comparison)")
    ap.add_argument("--files-mb", type=float, default=5)
    ap.add_argument("--batch", type=int, default=8, help="daemons started at once")
    ap.add_argument("--name", default="scale", help="bench/results/NAME.json and NAME.svg")
    ap.add_argument("--replot", action="store_true", help="only redraw NAME.svg from NAME.json")
    ap.add_argument("--before", metavar="NAME",
                    help="also draw bench/results/NAME.json (an earlier run: other code), dotted")
    ap.add_argument("--locking", choices=("auto", "flock", "claim"), default="auto",
                    help="[cache] locking of the daemons (claim: as on Lustre localflock / NFS "
                         "nolock)")
    a = ap.parse_args(argv)
    import json
    before = json.loads((RESULTS / f"{a.before}.json").read_text())["rows"] if a.before else None
    if a.replot:
        data = json.loads((RESULTS / f"{a.name}.json").read_text())
        m = data["machine"]
        write_svg(RESULTS / f"{a.name}.svg", data["rows"],
                  f"{m['nproc']} cores, all daemons on one machine; commit {data['commit'][:60]}",
                  before)
        return 0
    if os.geteuid() != 0:
        print("bench/scale.py: run as root (the daemons are root)", file=sys.stderr)
        return 2
    ns = sorted({int(x) for x in a.nodes.split(",") if x.strip()})
    base = Path(tempfile.mkdtemp(prefix="oci-bench-scale-", dir="/tmp"))
    os.chmod(base, 0o755)
    user = sim_user()
    # the submit side runs as the user: an installed step client they can read (this
    # checkout may be under /root)
    subprocess.run([str(ROOT / "scripts" / "install-local.sh"), str(base / "install")],
                   check=True, stdout=subprocess.DEVNULL)
    step_client = base / "install" / "venv" / "bin" / "oci-image-step"
    rows, runs = [], []
    try:
        with RegistryServer(base / "registry") as reg, \
                RegistryProxy(reg.url, backlog=1024) as proxy:
            t0 = time.monotonic()
            conf = SIM_CONF.replace("[cache]\n", f"[cache]\nlocking = {a.locking}\n", 1)
            sim = SimCluster(base / "sim", max(ns), conf=conf, batch=a.batch).start()
            started = {"daemons": max(ns), "seconds": round(time.monotonic() - t0, 1),
                       "rss": sim.rss()}
            print(f"started {max(ns)} daemons in {started['seconds']} s; "
                  f"{started['rss']['all_mb']} MB resident with their helpers", flush=True)
            try:
                t1 = None
                for n in ns:
                    r = job_start(sim, proxy, Pusher(reg.url), user, nodes=n,
                                  step_client=step_client,
                                  files_mb=a.files_mb, trace=min(2, n))
                    if t1 is None:
                        t1 = r["cold"]["all_ready_s"]
                    runs.append(r)
                    rows.append(row(r, t1))
                    x = rows[-1]
                    print(f"N={n}: cold {x['cold_all_ready_s']:.2f} s, {x['conversions']} "
                          f"conversion(s), {x['cold_requests']} requests; warm "
                          f"{x['warm_requests']} requests; waiting node "
                          f"{x['waiting_lock_calls']} lock-file calls; rss "
                          f"{r['rss']['all_mb']} MB", flush=True)
            finally:
                sim.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    text = print_table(rows)
    head = git_head()
    data = {"machine": machine(), "commit": head, "files_mb": a.files_mb, "started": started,
            "locking": a.locking,
            "goals": {"cold_time": "<= 1.2 x N=1 + 1 s", "manifest_config": GOAL_MANIFEST_CONFIG,
                      "blob_get": "= blobs", "warm_requests": GOAL_WARM,
                      "waiting_lock_calls": GOAL_LOCK},
            "rows": rows, "runs": runs, "table": text}
    p = write_result(a.name, data)
    svg = RESULTS / f"{a.name}.svg"
    m = data["machine"]
    write_svg(svg, rows, f"{m['nproc']} cores, all daemons on one machine, [cache] locking = "
                         f"{a.locking}; commit {head[:60]}", before)
    print(f"wrote {p} and {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
