#!/usr/bin/env python3
"""Benchmark "convert once": `oci-image convert` vs the script a site would write.

Builds (once, cached under --cache, default /var/tmp/oci-bench) a realistic
three-layer Debian image with umoci:

  layer 1  debootstrap --variant=minbase bookworm
  layer 2  chroot apt-get install python3 python3-requests
  layer 3  rm -rf /usr/share/doc /usr/share/man   (whiteouts)

pushes it with skopeo to a real docker-registry on loopback, then measures,
alternating the order each repetition, as fresh processes:

  ours  .venv/bin/oci-image convert REF -o out.sqfs           (zstd level 3)
  alt   skopeo copy docker://REF oci:dir:tag
        umoci unpack --image dir:tag bundle
        mksquashfs bundle/rootfs out.sqfs -comp zstd -Xcompression-level 3 -noappend

wall time, peak RSS (sum over the live process tree, sampled every 10 ms; and
the kernel's ru_maxrss of the largest single process), CPU seconds and output
size. Medians over --reps runs. For context also mksquashfs at its default
zstd level (15). The two images' listings (unsquashfs -lln) are compared as a
correctness check.

Run as root:  .venv/bin/python bench/convert.py [--reps 3] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, VENV_BIN, machine, measure, median, svg_bars, table,  # noqa: E402
                     write_result)
from registry_server import RegistryServer  # noqa: E402  (tests/)

MIRROR = "http://deb.debian.org/debian"
TAG = "bench"
REPO = "bench/debian-python"


def sh(*argv, **kw):
    print("+", " ".join(map(str, argv)), flush=True)
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def layout_has_tag(layout: Path, tag: str) -> bool:
    if not (layout / "index.json").exists():
        return False
    r = subprocess.run(["umoci", "ls", "--layout", str(layout)], capture_output=True, text=True)
    return r.returncode == 0 and tag in r.stdout.split()


def build_image(cache: Path, rebuild: bool = False) -> Path:
    """The OCI layout cache/layout with tag `bench`; built once."""
    layout, bundle, minbase = cache / "layout", cache / "bundle", cache / "minbase"
    if not rebuild and layout_has_tag(layout, TAG):
        return layout
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if rebuild or not minbase.is_dir():
        tmp = cache / "minbase.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        sh("debootstrap", "--variant=minbase", "bookworm", tmp, MIRROR)
        shutil.rmtree(minbase, ignore_errors=True)
        tmp.rename(minbase)
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", f"{layout}:{TAG}")
    sh("umoci", "unpack", "--image", f"{layout}:{TAG}", bundle)
    rootfs = bundle / "rootfs"
    # layer 1: the debootstrap rootfs
    sh("cp", "-a", f"{minbase}/.", rootfs)
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{TAG}", bundle)
    # layer 2: python3 installed with apt inside a chroot
    mounts = []
    try:
        sh("mount", "-t", "proc", "proc", rootfs / "proc")
        mounts.append(rootfs / "proc")
        resolv = rootfs / "etc" / "resolv.conf"
        if resolv.is_symlink() or not resolv.exists():
            resolv.unlink(missing_ok=True)
            resolv.write_text("")
        sh("mount", "--bind", "/etc/resolv.conf", resolv)
        mounts.append(resolv)
        prc = rootfs / "usr/sbin/policy-rc.d"
        prc.write_text("#!/bin/sh\nexit 101\n")
        prc.chmod(0o755)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        sh("chroot", rootfs, "apt-get", "update", env=env)
        sh("chroot", rootfs, "apt-get", "install", "-y", "--no-install-recommends",
           "python3", "python3-requests", env=env)
        sh("chroot", rootfs, "apt-get", "clean", env=env)
        prc.unlink()
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", str(m)])
    for p in (rootfs / "var/lib/apt/lists").glob("*"):
        if p.is_file():
            p.unlink()
    (rootfs / "etc/resolv.conf").write_text("")  # the bind mount target, left empty
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{TAG}", bundle)
    # layer 3: deletions -> whiteouts
    shutil.rmtree(rootfs / "usr/share/doc")
    shutil.rmtree(rootfs / "usr/share/man")
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{TAG}", bundle)
    sh("umoci", "config", "--image", f"{layout}:{TAG}", "--config.cmd", "/usr/bin/python3",
       "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "--config.env", "LANG=C.UTF-8")
    sh("umoci", "gc", "--layout", layout)
    shutil.rmtree(bundle, ignore_errors=True)
    print(f"built {layout}:{TAG} in {time.monotonic() - t0:.0f} s", flush=True)
    return layout


def tree_stats(root: Path):
    """(bytes in regular files, entries below root incl. dirs)."""
    size = entries = 0
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        for n in filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_mode & 0o170000) == 0o100000:
                size += st.st_size
    return size, entries


def listing(sqfs: Path) -> dict:
    """path -> 'perms uid/gid size-or-target' from unsquashfs -lln (root excluded)."""
    r = subprocess.run(["unsquashfs", "-lln", "-d", "R", str(sqfs)], capture_output=True,
                       text=True, check=True)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("R/"):
            continue
        perms, owner, size, _date, _time, name = parts
        if perms[0] in "cb":  # device: size column is "maj, min"
            continue
        target = name.split(" -> ", 1)
        out[target[0]] = (perms, owner, size if perms[0] != "d" else "",
                          target[1] if len(target) > 1 else "")
    return out


def compare_listings(a: dict, b: dict) -> dict:
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return {"only_ours": only_a[:20], "only_alt": only_b[:20], "differ": differ[:20],
            "n_only_ours": len(only_a), "n_only_alt": len(only_b), "n_differ": len(differ),
            "examples": {k: {"ours": a[k], "alt": b[k]} for k in differ[:5]}}


def run_ours(ref: str, work: Path, env: dict) -> dict:
    out = work / "ours.sqfs"
    out.unlink(missing_ok=True)
    r = measure([str(VENV_BIN / "oci-image"), "--json", "convert", ref, "-o", str(out)], env=env)
    meta = json.loads(r["stdout"])
    return {"wall_s": r["wall_s"], "peak_tree_rss_mib": r["peak_tree_rss_mib"],
            "ru_maxrss_mib": r["ru_maxrss_mib"], "cpu_s": r["cpu_s"],
            "size": out.stat().st_size, "entries": meta.get("entries"), "digest": meta.get("digest"),
            "out": str(out)}


def run_alt(ref: str, work: Path, level: int = 3, keep: bool = False) -> dict:
    oci, bundle, out = work / "alt-oci", work / "alt-bundle", work / "alt.sqfs"
    shutil.rmtree(oci, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    out.unlink(missing_ok=True)
    phases = [
        ("skopeo copy", ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}",
                         f"oci:{oci}:{TAG}"]),
        ("umoci unpack", ["umoci", "unpack", "--image", f"{oci}:{TAG}", str(bundle)]),
        ("mksquashfs", ["mksquashfs", str(bundle / "rootfs"), str(out), "-comp", "zstd",
                        "-Xcompression-level", str(level), "-noappend", "-no-progress", "-quiet"]),
    ]
    res = {"phases": {}}
    for name, argv in phases:
        r = measure(argv)
        res["phases"][name] = {k: r[k] for k in ("wall_s", "peak_tree_rss_mib", "ru_maxrss_mib", "cpu_s")}
    ph = res["phases"].values()
    res["wall_s"] = round(sum(p["wall_s"] for p in ph), 3)
    res["cpu_s"] = round(sum(p["cpu_s"] for p in ph), 3)
    res["peak_tree_rss_mib"] = max(p["peak_tree_rss_mib"] for p in ph)
    res["ru_maxrss_mib"] = max(p["ru_maxrss_mib"] for p in ph)
    res["size"] = out.stat().st_size
    res["out"] = str(out)
    res["bundle"] = str(bundle)
    return res


def mksquashfs_only(bundle: Path, work: Path, level: int) -> dict:
    out = work / f"mksq-l{level}.sqfs"
    r = measure(["mksquashfs", str(bundle / "rootfs"), str(out), "-comp", "zstd",
                 "-Xcompression-level", str(level), "-noappend", "-no-progress", "-quiet"])
    size = out.stat().st_size
    out.unlink()
    return {"level": level, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
            "peak_tree_rss_mib": r["peak_tree_rss_mib"], "size": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="/var/tmp/oci-bench", help="where the built image is kept")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the image from Debian packages")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (debootstrap, chroot, umoci unpack with real owners)")
    cache = Path(args.cache)
    layout = build_image(cache, args.rebuild)

    work = Path(tempfile.mkdtemp(prefix="oci-bench-convert-", dir="/var/tmp"))
    env = dict(os.environ, OCI_IMAGE_CONFIG=str(work / "none.conf"))
    reg = RegistryServer(workdir=work / "registry").start()
    try:
        ref = f"{reg.host}/{REPO}:{TAG}"
        sh("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{TAG}", f"docker://{ref}",
           stdout=subprocess.DEVNULL)
        import requests
        man = requests.get(f"{reg.url}/v2/{REPO}/manifests/{TAG}", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        layers = [l["size"] for l in man["layers"]]

        ours, alt = [], []
        for i in range(args.reps):
            order = ("ours", "alt") if i % 2 == 0 else ("alt", "ours")
            for which in order:
                if which == "ours":
                    ours.append(run_ours(ref, work, env))
                    r = ours[-1]
                else:
                    alt.append(run_alt(ref, work))
                    r = alt[-1]
                print(f"rep {i + 1} {which:4s}: {r['wall_s']:7.2f} s  peak tree RSS "
                      f"{r['peak_tree_rss_mib']:7.1f} MiB  cpu {r['cpu_s']:6.2f} s  "
                      f"size {r['size'] / 2**20:.1f} MiB", flush=True)

        bundle = Path(alt[-1]["bundle"])
        rootfs_bytes, rootfs_entries = tree_stats(bundle / "rootfs")
        cmp = compare_listings(listing(Path(ours[-1]["out"])), listing(Path(alt[-1]["out"])))
        context = [mksquashfs_only(bundle, work, lvl) for lvl in (3, 15)]
    finally:
        reg.stop()

    def med(rs, key):
        return median([r[key] for r in rs])

    summary = {
        "ours": {k: med(ours, k) for k in ("wall_s", "peak_tree_rss_mib", "ru_maxrss_mib", "cpu_s", "size")},
        "alt": {k: med(alt, k) for k in ("wall_s", "peak_tree_rss_mib", "ru_maxrss_mib", "cpu_s", "size")},
        "alt_phases": {p: {k: median([r["phases"][p][k] for r in alt])
                           for k in ("wall_s", "peak_tree_rss_mib", "cpu_s")}
                       for p in alt[0]["phases"]},
    }
    summary["ratio_wall"] = round(summary["ours"]["wall_s"] / summary["alt"]["wall_s"], 3)
    summary["ratio_peak_rss"] = round(summary["ours"]["peak_tree_rss_mib"]
                                      / summary["alt"]["peak_tree_rss_mib"], 3)
    summary["ratio_size"] = round(summary["ours"]["size"] / summary["alt"]["size"], 3)
    image = {"reference": f"<registry>/{REPO}:{TAG}", "digest": ours[-1]["digest"],
             "layers": len(layers), "layer_sizes": layers, "compressed_bytes": sum(layers),
             "rootfs_bytes": rootfs_bytes, "rootfs_entries": rootfs_entries,
             "entries_ours": ours[-1]["entries"]}

    M = 2 ** 20
    rows = [["ours: oci-image convert", f"{summary['ours']['wall_s']:.2f}",
             f"{summary['ours']['cpu_s']:.2f}", f"{summary['ours']['peak_tree_rss_mib']:.1f}",
             f"{summary['ours']['ru_maxrss_mib']:.1f}", f"{summary['ours']['size'] / M:.1f}"]]
    for p, v in summary["alt_phases"].items():
        rows.append([f"  alt: {p}", f"{v['wall_s']:.2f}", f"{v['cpu_s']:.2f}",
                     f"{v['peak_tree_rss_mib']:.1f}", "", ""])
    rows.append(["alt: total", f"{summary['alt']['wall_s']:.2f}", f"{summary['alt']['cpu_s']:.2f}",
                 f"{summary['alt']['peak_tree_rss_mib']:.1f}", f"{summary['alt']['ru_maxrss_mib']:.1f}",
                 f"{summary['alt']['size'] / M:.1f}"])
    rows.append(["ratio ours/alt", f"{summary['ratio_wall']:.2f}x", "",
                 f"{summary['ratio_peak_rss']:.2f}x", "", f"{summary['ratio_size']:.2f}x"])
    print()
    print(f"image: {len(layers)} layers, {sum(layers) / M:.1f} MiB compressed, rootfs "
          f"{rootfs_bytes / M:.1f} MiB in {rootfs_entries} entries (ours counted {image['entries_ours']})")
    print(f"median of {args.reps} (order alternated):")
    print(table(rows, ["", "wall s", "cpu s", "peak tree RSS MiB", "max 1-proc RSS MiB", "out MiB"]))
    print()
    print(table([[f"mksquashfs zstd -Xcompression-level {c['level']}", f"{c['wall_s']:.2f}",
                  f"{c['cpu_s']:.2f}", f"{c['size'] / M:.1f}"] for c in context],
                ["context (same rootfs, one run each)", "wall s", "cpu s", "out MiB"]))
    print()
    print(f"listing check (unsquashfs -lln, ours vs alt): only ours {cmp['n_only_ours']}, "
          f"only alt {cmp['n_only_alt']}, differing {cmp['n_differ']}")
    for k in ("only_ours", "only_alt", "differ"):
        if cmp[k]:
            print(f"  {k}: {cmp[k][:8]}")
    goal = {"wall_ratio_le_0.5": summary["ratio_wall"] <= 0.5,
            "ours_peak_rss_le_150MB": summary["ours"]["peak_tree_rss_mib"] * M <= 150e6}
    print(f"goals: {goal}")

    result = {"machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "reps": args.reps, "image": image, "summary": summary, "goals": goal,
              "mksquashfs_context": context, "listing_check": cmp,
              "runs": {"ours": [{k: v for k, v in r.items() if k != "out"} for r in ours],
                       "alt": [{k: v for k, v in r.items() if k not in ("out", "bundle")} for r in alt]},
              "commands": {
                  "ours": "oci-image convert REF -o out.sqfs",
                  "alt": ["skopeo copy --src-tls-verify=false docker://REF oci:dir:bench",
                          "umoci unpack --image dir:bench bundle",
                          "mksquashfs bundle/rootfs out.sqfs -comp zstd -Xcompression-level 3 "
                          "-noappend -no-progress -quiet"]}}
    if not args.no_write:
        p = write_result("convert", result)
        svg_bars(RESULTS / "convert.svg",
                 f"convert one {len(layers)}-layer Debian+python3 image ({machine()['nproc']} cores), median of {args.reps}",
                 ["wall time (s)", "peak RSS, process tree (MiB)", "CPU time (s)"],
                 {"ours: oci-image convert": [summary["ours"]["wall_s"], summary["ours"]["peak_tree_rss_mib"],
                                              summary["ours"]["cpu_s"]],
                  "skopeo + umoci unpack + mksquashfs": [summary["alt"]["wall_s"],
                                                         summary["alt"]["peak_tree_rss_mib"],
                                                         summary["alt"]["cpu_s"]]}, "")
        print(f"wrote {p} and {RESULTS / 'convert.svg'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
