"""Shared helpers for the benchmarks: machine description, measured runs.

A measured run starts a fresh process, samples the resident memory of its
whole process tree (sum over live descendants, every ~10 ms, from /proc) and
on exit also takes the kernel's ru_maxrss from wait4() (the largest single
process in the tree that was waited for). Both are reported; the tree sum is
the honest figure when several processes run at once (ours: Python + tar2sqfs).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VENV_BIN = ROOT / ".venv" / "bin"

sys.path.insert(0, str(ROOT / "tests"))


def machine() -> dict:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "mem_gib": round(mem_kib / 1048576, 1), "python": platform.python_version()}


def _children_map() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            ppid = int(st[st.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(root: int) -> int:
    kids = _children_map()
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += _rss_kib(p)
        todo.extend(kids.get(p, ()))
    return total


def proc_status(pid: int, *fields: str) -> Dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in fields:
                out[k] = int(line.split()[1])
    return out


def measure(argv: Sequence[str], env: Optional[dict] = None, interval: float = 0.01,
            check: bool = True) -> dict:
    """Run argv as a fresh process; wall seconds, peak tree RSS, ru_maxrss."""
    t0 = time.monotonic()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_kib(proc.pid))
            done.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    # read pipes without deadlock, then reap with wait4 for the rusage
    out_chunks, err_chunks = [], []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    t_out.start(); t_err.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    done.set(); th.join(); t_out.join(); t_err.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = {"argv": list(argv), "wall_s": round(wall, 3), "peak_tree_rss_mib": round(peak[0] / 1024, 1),
           "ru_maxrss_mib": round(ru.ru_maxrss / 1024, 1),
           "cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "rc": proc.returncode,
           "stdout": (out_chunks[0] if out_chunks else b"").decode(errors="replace"),
           "stderr": (err_chunks[0] if err_chunks else b"").decode(errors="replace")}
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {res['stderr'][-2000:]}")
    return res


def median(xs):
    return statistics.median(xs)


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return p


def table(rows: List[List[str]], header: List[str]) -> str:
    cols = [header] + rows
    w = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(header), line(["-" * x for x in w])] + [line(r) for r in rows])


# ---- hand-written SVG bar charts (no matplotlib dependency) ---------------

def svg_bars(path: Path, title: str, groups: List[str], series: Dict[str, List[float]],
             unit: str, colors: Optional[Dict[str, str]] = None, stacked: Optional[Dict[str, List[str]]] = None) -> None:
    """Grouped horizontal bars: one group per entry in `groups`, one bar per series."""
    palette = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"]
    colors = colors or {}
    names = list(series)
    for i, n in enumerate(names):
        colors.setdefault(n, palette[i % len(palette)])
    # each group has its own scale (groups may be in different units)
    gmax = [max(series[n][gi] for n in names) or 1 for gi in range(len(groups))]
    left, width, bar_h, gap = 190, 520, 18, 16
    h = 50 + len(groups) * (len(names) * bar_h + gap) + 30 + 18 * len(names)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="22" font-size="15" font-weight="bold">{_esc(title)}</text>']
    y = 40
    for gi, g in enumerate(groups):
        out.append(f'<text x="{left - 8}" y="{y + len(names) * bar_h / 2 + 4}" text-anchor="end">{_esc(g)}</text>')
        for n in names:
            v = series[n][gi]
            bw = width * v / gmax[gi]
            out.append(f'<rect x="{left}" y="{y}" width="{bw:.1f}" height="{bar_h - 3}" fill="{colors[n]}"/>')
            out.append(f'<text x="{left + bw + 4:.1f}" y="{y + bar_h - 6}">{v:g}{unit}</text>')
            y += bar_h
        y += gap
    y += 10
    for n in names:
        out.append(f'<rect x="{left}" y="{y - 10}" width="12" height="12" fill="{colors[n]}"/>')
        out.append(f'<text x="{left + 18}" y="{y}">{_esc(n)}</text>')
        y += 18
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")


def _esc(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def tree_entries(base: Path, limit_bytes: int, total: int = 0):
    """A layer of real files: base's tree (paths as in the image, under base), until
    total reaches limit_bytes; returns (entries, total)."""
    from ocibuild import Entry  # tests/
    entries = []
    for p in sorted(Path(base).rglob("*")):
        rel = str(p)[1:]
        try:
            if p.is_symlink():
                entries.append(Entry(rel, "symlink", linkname=os.readlink(p)))
            elif p.is_dir():
                entries.append(Entry(rel + "/", "dir", mode=0o755))
            elif p.is_file():
                data = p.read_bytes()
                total += len(data)
                entries.append(Entry(rel, data=data, mode=0o644))
        except OSError:
            continue
        if total > limit_bytes:
            break
    return entries, total



def install_revision(rev: Optional[str], prefix: Path, work: Path) -> Path:
    """scripts/install-local.sh of this checkout (rev None) or of a git worktree of rev
    (under work, removed afterwards) into prefix; returns prefix.

    The step client is the RPM's (scripts/step-wrapper.sh, or before it existed the
    spec's `python -s` wrapper), not pip's console-script shim, so that per-step
    figures are a package's."""
    root = Path(__file__).resolve().parent.parent
    src = root
    if rev:
        src = work / f"src-{rev}"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(src), rev],
                       check=True, capture_output=True)
    try:
        subprocess.run([str(src / "scripts" / "install-local.sh"), str(prefix)], check=True,
                       capture_output=True)
        if not (src / "scripts" / "step-wrapper.sh").exists():
            # a revision from before step-wrapper.sh: its RPM's wrapper (python -s)
            step = prefix / "venv" / "bin" / "oci-image-step"
            step.write_text(f"#!{prefix}/venv/bin/python -s\nimport sys\n"
                            "from ociimage.step import main\nsys.exit(main())\n")
    finally:
        if rev:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(src)],
                           check=False, capture_output=True)
    return prefix
