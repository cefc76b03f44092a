#!/usr/bin/env python3
"""Benchmark the daemon's Pull on a cache hit under many concurrent clients.

Starts a real docker-registry and a real oci-imaged (tests/daemon_proc.py) on
a temporary socket and cache, pushes a small busybox image, pulls it once
(the conversion), then runs --clients threads in this process, each with its
own `unix:` gRPC channel and ImagesStub, each making --requests Pull calls
alternating by digest (REF@sha256:...) and by tag (REF:tag). Every reply is
checked (digest, path). The first call on each channel (connection set-up) is
reported apart from the measured rounds, which start together on a barrier.

Reports p50/p95/p99/max latency (whole stream, until the Image event) for
digest and tag, requests/s, the daemon's RSS at rest and its peak during the
load (/proc/<pid>/status VmRSS sampled every 5 ms, VmHWM), one unloaded
client for comparison, and the wall time of the CLI (`oci-image pull`, a fresh
process per call) for the same cache hits.

The same measurement runs first against an earlier revision's daemon and CLI (--before,
installed from a git worktree), then this checkout's, and both are printed side by side.

Run:  .venv/bin/python bench/pull_latency.py [--clients 64] [--requests 20] [--before REV]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, VENV_BIN, install_revision, machine, measure,  # noqa: E402
                     median, proc_status, table, write_result)
from daemon_proc import DaemonProcess  # noqa: E402  (tests/)
from images import busybox_layers  # noqa: E402
from ocibuild import Pusher  # noqa: E402
from registry_server import RegistryServer  # noqa: E402

import grpc  # noqa: E402
from ociimage.v1 import ociimage_pb2 as pb  # noqa: E402
from ociimage.v1 import ociimage_pb2_grpc as pbg  # noqa: E402


def pct(xs, p):
    """Nearest-rank percentile of a list."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def summarize(lat_s):
    ms = [x * 1000 for x in lat_s]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p95_ms": round(pct(ms, 95), 2),
            "p99_ms": round(pct(ms, 99), 2), "max_ms": round(max(ms), 2),
            "mean_ms": round(sum(ms) / len(ms), 2)}


def pull_once(stub, ref, timeout=60):
    img = None
    for ev in stub.Pull(pb.PullRequest(reference=ref), timeout=timeout):
        if ev.WhichOneof("event") == "image":
            img = ev.image
    return img


def cpu_s(pid: int) -> float:
    """utime+stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_once(args, bin_dir: Path, label: str) -> dict:
    """The whole measurement against the daemon and CLI of one install (bin_dir)."""
    print(f"== {label} ({bin_dir})")
    work = Path(tempfile.mkdtemp(prefix="oci-bench-pull-", dir="/var/tmp"))
    reg = RegistryServer(workdir=work / "registry").start()
    d = None
    try:
        pushed = Pusher(reg.url).image("bench/busybox", "v1", busybox_layers())
        tag_ref = f"{reg.host}/bench/busybox:v1"
        dig_ref = f"{reg.host}/bench/busybox@{pushed.manifest_digest}"
        d = DaemonProcess(work / "d", work / "cache", bin_dir=bin_dir).start()
        pid = d.proc.pid
        sock = "unix:" + str(d.socket)

        ch = grpc.insecure_channel(sock)
        stub = pbg.ImagesStub(ch)
        t0 = time.monotonic()
        img = pull_once(stub, tag_ref)
        first_pull_s = time.monotonic() - t0
        assert img.digest == pushed.manifest_digest, (img.digest, pushed.manifest_digest)
        assert Path(img.path).is_file(), img.path
        expect = (img.digest, img.path)
        print(f"first pull (convert) {first_pull_s * 1000:.0f} ms -> {img.path} ({img.size} B)")

        # unloaded: one client, sequential
        single = {"digest": [], "tag": []}
        pull_once(stub, dig_ref)
        d_cpu0, t_single = cpu_s(pid), time.perf_counter()
        for i in range(args.single):
            kind, ref = ("digest", dig_ref) if i % 2 == 0 else ("tag", tag_ref)
            t = time.perf_counter()
            r = pull_once(stub, ref)
            single[kind].append(time.perf_counter() - t)
            assert (r.digest, r.path) == expect
        single_s = time.perf_counter() - t_single
        single_daemon_cpu = cpu_s(pid) - d_cpu0
        ch.close()
        time.sleep(1.0)
        rest = proc_status(pid, "VmRSS", "VmHWM", "Threads")
        print(f"daemon at rest: VmRSS {rest['VmRSS'] / 1024:.1f} MiB, VmHWM {rest['VmHWM'] / 1024:.1f} MiB, "
              f"{rest['Threads']} threads")

        # loaded: N clients, one channel each
        n = args.clients
        barrier = threading.Barrier(n + 1)
        lat = {"digest": [], "tag": []}
        connect, errors = [], []
        lock = threading.Lock()
        peak = {"rss": 0, "threads": 0}
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                try:
                    st = proc_status(pid, "VmRSS", "Threads")
                    peak["rss"] = max(peak["rss"], st["VmRSS"])
                    peak["threads"] = max(peak["threads"], st["Threads"])
                except OSError:
                    pass
                stop.wait(0.005)

        def client(k):
            mine = {"digest": [], "tag": []}
            try:
                c = grpc.insecure_channel(sock)
                s = pbg.ImagesStub(c)
                t = time.perf_counter()
                r = pull_once(s, dig_ref)
                c0 = time.perf_counter() - t
                assert (r.digest, r.path) == expect
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"client {k} connect: {e!r}")
                barrier.wait()
                return
            barrier.wait()
            for i in range(args.requests):
                kind, ref = ("digest", dig_ref) if (i + k) % 2 == 0 else ("tag", tag_ref)
                t = time.perf_counter()
                try:
                    r = pull_once(s, ref)
                    ok = (r.digest, r.path) == expect
                except grpc.RpcError as e:
                    ok = False
                    r = e
                dt = time.perf_counter() - t
                if not ok:
                    with lock:
                        errors.append(f"client {k} {kind}: {r!r}"[:300])
                    continue
                mine[kind].append(dt)
            c.close()
            with lock:
                connect.append(c0)
                for kk in mine:
                    lat[kk].extend(mine[kk])

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t_load, d_cpu0, c_cpu0 = time.perf_counter(), cpu_s(pid), self_cpu_s()
        for t in threads:
            t.join()
        load_s = time.perf_counter() - t_load
        load_daemon_cpu, load_client_cpu = cpu_s(pid) - d_cpu0, self_cpu_s() - c_cpu0
        stop.set()
        th.join()
        after = proc_status(pid, "VmRSS", "VmHWM", "Threads")
        total = len(lat["digest"]) + len(lat["tag"])

        # the CLI, a fresh process per call
        env = dict(os.environ, OCI_IMAGE_CONFIG=str(work / "d" / "none.conf"))
        cli = {}
        for kind, ref in (("digest", dig_ref), ("tag", tag_ref)):
            runs = [measure([str(bin_dir / "oci-image"), "--socket", str(d.socket), "pull", ref], env=env)
                    for _ in range(args.cli_runs)]
            for r in runs:
                assert r["stdout"].split()[0] == expect[0], r["stdout"]
            cli[kind] = {"median_wall_ms": round(median([r["wall_s"] for r in runs]) * 1000, 1),
                         "min_wall_ms": round(min(r["wall_s"] for r in runs) * 1000, 1),
                         "median_peak_rss_mib": median([r["peak_tree_rss_mib"] for r in runs])}
        alive = d.proc.poll() is None
    finally:
        if d:
            d.stop()
        reg.stop()

    res_load = {k: summarize(v) for k, v in lat.items() if v}
    res_load["all"] = summarize(lat["digest"] + lat["tag"])
    res_single = {k: summarize(v) for k, v in single.items()}
    res_connect = summarize(connect) if connect else None

    rows = []
    for label, r in [("1 client, by digest", res_single["digest"]), ("1 client, by tag", res_single["tag"]),
                     (f"{n} clients, by digest", res_load.get("digest")),
                     (f"{n} clients, by tag", res_load.get("tag")),
                     (f"{n} clients, all", res_load["all"]),
                     (f"{n} clients, 1st call/channel", res_connect)]:
        if r:
            rows.append([label, r["n"], f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['p99_ms']:.2f}",
                         f"{r['max_ms']:.2f}"])
    print()
    print(table(rows, ["Pull on a cache hit", "calls", "p50 ms", "p95 ms", "p99 ms", "max ms"]))
    print(f"\nload: {total} calls in {load_s:.2f} s = {total / load_s:.0f} calls/s; errors {len(errors)}")
    for e in errors[:5]:
        print("  ", e)
    cpu = {"single_daemon_cpu_ms_per_call": round(single_daemon_cpu * 1000 / args.single, 2),
           "single_calls_per_s": round(args.single / single_s, 1),
           "load_daemon_cpu_s": round(load_daemon_cpu, 2), "load_client_cpu_s": round(load_client_cpu, 2),
           "load_daemon_cpu_ms_per_call": round(load_daemon_cpu * 1000 / max(total, 1), 2),
           "load_daemon_cores_busy": round(load_daemon_cpu / load_s, 2),
           "load_client_cores_busy": round(load_client_cpu / load_s, 2),
           "littles_law_mean_ms": round(n / (total / load_s) * 1000, 1)}
    print(f"CPU: daemon {cpu['single_daemon_cpu_ms_per_call']} ms/call unloaded "
          f"({cpu['single_calls_per_s']} calls/s, 1 client); under load daemon "
          f"{cpu['load_daemon_cpu_ms_per_call']} ms/call, daemon busy {cpu['load_daemon_cores_busy']} cores, "
          f"bench clients busy {cpu['load_client_cores_busy']} cores (of {os.cpu_count()}); "
          f"{n} in flight / throughput = {cpu['littles_law_mean_ms']} ms mean")
    print(f"daemon RSS: at rest {rest['VmRSS'] / 1024:.1f} MiB (HWM so far {rest['VmHWM'] / 1024:.1f}, "
          f"includes the first conversion); peak sampled under load {peak['rss'] / 1024:.1f} MiB; "
          f"after load VmRSS {after['VmRSS'] / 1024:.1f} MiB, VmHWM {after['VmHWM'] / 1024:.1f} MiB; "
          f"threads at rest {rest['Threads']}, peak {peak['threads']}")
    print(table([[f"oci-image pull (by {k})", c["median_wall_ms"], c["min_wall_ms"], c["median_peak_rss_mib"]]
                 for k, c in cli.items()],
                ["CLI, fresh process per call", "median wall ms", "min wall ms", "peak RSS MiB"]))
    goal = {"p99_le_50ms": res_load["all"]["p99_ms"] <= 50.0, "no_errors": not errors,
            "daemon_alive": alive}
    print(f"goals: {goal}")

    result = {"machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "params": vars(args), "first_pull_ms": round(first_pull_s * 1000, 1),
              "single_client": res_single, "loaded": res_load, "first_call_per_channel": res_connect,
              "load_seconds": round(load_s, 3), "calls_per_s": round(total / load_s, 1),
              "errors": errors[:50], "n_errors": len(errors),
              "daemon_rss_mib": {"rest_vmrss": round(rest["VmRSS"] / 1024, 1),
                                 "rest_vmhwm": round(rest["VmHWM"] / 1024, 1),
                                 "load_peak_vmrss": round(peak["rss"] / 1024, 1),
                                 "after_vmrss": round(after["VmRSS"] / 1024, 1),
                                 "after_vmhwm": round(after["VmHWM"] / 1024, 1)},
              "daemon_threads": {"rest": rest["Threads"], "load_peak": peak["threads"]},
              "cpu": cpu, "cli": cli, "goals": goal}
    result["_samples"] = {f"{n} clients, by digest": lat["digest"],
                          f"{n} clients, by tag": lat["tag"],
                          "1 client, by digest": single["digest"],
                          "1 client, by tag": single["tag"]}
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=20, help="Pull calls per client (measured)")
    ap.add_argument("--single", type=int, default=200, help="calls by the unloaded single client")
    ap.add_argument("--cli-runs", type=int, default=5)
    ap.add_argument("--before", default="55e19f1",
                    help="the revision to compare with, measured in the same run ('' for none)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    runs = {}
    work = Path(tempfile.mkdtemp(prefix="oci-bench-pull-rev-", dir="/var/tmp"))
    try:
        if args.before:
            prefix = install_revision(args.before, work / "install-before", work)
            runs[args.before] = run_once(args, prefix / "venv" / "bin", args.before)
        runs["this"] = run_once(args, VENV_BIN, "this checkout")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.clients
    print(f"\n{'revision':<14} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>8} "
          f"{'daemon ms/call':>15} {'RSS at rest MiB':>16}   ({n} clients, cache hits)")
    for name, r in runs.items():
        print(f"{name:<14} {r['loaded']['all']['p50_ms']:>8.2f} {r['loaded']['all']['p99_ms']:>8.2f} "
              f"{r['calls_per_s']:>8.0f} {r['cpu']['load_daemon_cpu_ms_per_call']:>15.2f} "
              f"{r['daemon_rss_mib']['rest_vmrss']:>16.1f}")
    samples = runs["this"].pop("_samples")
    for r in runs.values():
        r.pop("_samples", None)
    if not args.no_write:
        result = dict(runs["this"], before={args.before: runs[args.before]} if args.before else {})
        p = write_result("pull_latency", result)
        cdf_svg(RESULTS / "pull_latency.svg",
                f"Pull on a cache hit: latency CDF, {n} concurrent clients x {args.requests} "
                f"({machine()['nproc']} cores)", samples)
        print(f"wrote {p} and {RESULTS / 'pull_latency.svg'}")
    return 0


def cdf_svg(path: Path, title: str, series: dict) -> None:
    """Latency CDFs on a log-scaled millisecond axis, hand-written SVG."""
    import math
    colors = ["#4477aa", "#ee6677", "#228833", "#ccbb44"]
    W, H, L, R, T, B = 760, 420, 60, 20, 40, 110
    allv = [x * 1000 for v in series.values() for x in v if x > 0]
    lo = 10 ** math.floor(math.log10(min(allv)))
    hi = 10 ** math.ceil(math.log10(max(allv)))
    X = lambda v: L + (W - L - R) * (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    Y = lambda q: T + (H - T - B) * (1 - q)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="22" font-size="14" font-weight="bold">{title}</text>']
    d = lo
    while d <= hi * 1.0001:
        out.append(f'<line x1="{X(d):.1f}" y1="{Y(0)}" x2="{X(d):.1f}" y2="{Y(1)}" stroke="#ddd"/>')
        out.append(f'<text x="{X(d):.1f}" y="{Y(0) + 15}" text-anchor="middle">{d:g} ms</text>')
        d *= 10
    for q in (0, 0.5, 0.95, 0.99, 1):
        out.append(f'<line x1="{L}" y1="{Y(q):.1f}" x2="{W - R}" y2="{Y(q):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 4}" y="{Y(q) + 4:.1f}" text-anchor="end">p{q * 100:g}</text>')
    out.append(f'<line x1="{X(50):.1f}" y1="{Y(0)}" x2="{X(50):.1f}" y2="{Y(1)}" stroke="#aa3377" '
               f'stroke-dasharray="4 3"/><text x="{X(50) + 3:.1f}" y="{Y(1) + 12}" fill="#aa3377">goal p99 50 ms</text>')
    ly = H - B + 35
    for i, (name, vals) in enumerate(series.items()):
        s = sorted(x * 1000 for x in vals)
        if not s:
            continue
        pts = " ".join(f"{X(v):.1f},{Y((j + 1) / len(s)):.1f}" for j, v in enumerate(s))
        out.append(f'<polyline fill="none" stroke="{colors[i % 4]}" stroke-width="1.8" points="{pts}"/>')
        out.append(f'<rect x="{L}" y="{ly - 10}" width="12" height="12" fill="{colors[i % 4]}"/>'
                   f'<text x="{L + 18}" y="{ly}">{name} (n={len(s)})</text>')
        ly += 17
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
