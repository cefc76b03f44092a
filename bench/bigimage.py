#!/usr/bin/env python3
"""Benchmark a big image: `oci-image convert` vs skopeo+umoci+mksquashfs vs the bare pipe.

The image (bench/bigbuild.py, built once and kept under --cache): five
layers of real Debian 12 packages, ~2.5 GB of gzip, ~6 GB and ~230,000
entries unpacked. It is pushed with skopeo to a real docker-registry on
loopback, then, in the same run, as fresh processes, alternating the order
each repetition:

  ours      oci-image convert REF -o out.sqfs                        (zstd level 3)
  alt       skopeo copy docker://REF oci:dir:tag
            umoci unpack --image dir:tag bundle
            mksquashfs bundle/rootfs out.sqfs -comp zstd -Xcompression-level 3 -noappend
  bare      for each layer blob of the local OCI layout (no registry), bottom-most first:
              DECOMPRESSOR -dc BLOB | tar2sqfs <ours' flags> layer-N.sqfs
            with igzip (ISA-L, the fastest gzip inflater Debian packages) and with
            gzip (what the issue measured); and the biggest layer alone with each.

The bare pipe is the floor of "decompress and write a SquashFS" with the same
writer and flags, but it is not a conversion: no registry, no digest check,
no flattening (it writes one SquashFS per layer, shadowed files included).
Reported: wall time, CPU (user+sys of the whole process tree, from wait4),
peak RSS summed over the live process tree (sampled every 10 ms) and of the
largest single process; the listings of ours and alt (unsquashfs -lln) are
compared as a correctness check.

Run as root:  .venv/bin/python bench/bigimage.py [--reps 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, measure, median, svg_bars, table, write_result  # noqa: E402
from bigbuild import DEFAULT_CACHE, TAG, build_image  # noqa: E402
from _common import VENV_BIN  # noqa: E402
from convert import compare_listings, listing, run_alt, tree_stats  # noqa: E402
from registry_server import RegistryServer  # noqa: E402  (tests/)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))
from ociimage.layout import LayoutImage  # noqa: E402
from ociimage.squash import SquashOptions, find_writer, writer_argv  # noqa: E402

REPO = "bench/big"
KEYS = ("wall_s", "cpu_s", "peak_tree_rss_mib", "ru_maxrss_mib")


def layout_layers(layout: Path) -> list:
    """[(blob path, size, media type)] of the layout's image, bottom-most first."""
    image = LayoutImage(layout, tag=TAG)
    return [(image.blob_path(l.digest), l.size, l.media_type) for l in image.layers()]


def run_ours(ref: str, work: Path, env: dict) -> dict:
    out = work / "ours.sqfs"
    out.unlink(missing_ok=True)
    r = measure([str(VENV_BIN / "oci-image"), "--json", "convert", ref, "-o", str(out)], env=env)
    meta = json.loads(r["stdout"])
    return {**{k: r[k] for k in KEYS}, "size": out.stat().st_size, "entries": meta.get("entries"),
            "digest": meta.get("digest"), "inflaters": meta["converter"].get("inflaters"),
            "out": str(out)}


def run_bare(layers: list, tool: str, work: Path) -> dict:
    """DECOMPRESSOR -dc blob | tar2sqfs, one layer after the other, as one shell."""
    writer = find_writer()
    script = []
    for i, (blob, _size, _mt) in enumerate(layers):
        argv = writer_argv(writer, str(work / f"bare-{i}.sqfs"), SquashOptions())
        script.append(f"{tool} -dc {shlex.quote(str(blob))} | {shlex.join(argv)} || exit 1")
    r = measure(["bash", "-o", "pipefail", "-c", "\n".join(script)])
    size = sum((work / f"bare-{i}.sqfs").stat().st_size for i in range(len(layers)))
    for i in range(len(layers)):
        (work / f"bare-{i}.sqfs").unlink()
    return {**{k: r[k] for k in KEYS}, "size": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the built image is kept")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the image from Debian packages")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (debootstrap, chroot, umoci unpack with real owners)")
    for tool in ("igzip", "gzip", "skopeo", "umoci", "mksquashfs", "unsquashfs"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (igzip: apt install isal)")
    layout = build_image(args.cache, args.rebuild)
    layers = layout_layers(layout)
    biggest = [max(layers, key=lambda l: l[1])]

    work = Path(tempfile.mkdtemp(prefix="oci-bench-big-", dir="/var/tmp"))
    env = dict(os.environ, OCI_IMAGE_CONFIG=str(work / "none.conf"))
    reg = RegistryServer(workdir=work / "registry").start()
    runs = {k: [] for k in ("ours", "alt", "bare_igzip", "bare_gzip",
                            "biggest_igzip", "biggest_gzip")}
    try:
        ref = f"{reg.host}/{REPO}:{TAG}"
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{TAG}",
                        f"docker://{ref}"], check=True, stdout=subprocess.DEVNULL)
        jobs = {
            "ours": lambda: run_ours(ref, work, env),
            "alt": lambda: run_alt(ref, work),
            "bare_igzip": lambda: run_bare(layers, "igzip", work),
            "bare_gzip": lambda: run_bare(layers, "gzip", work),
            "biggest_igzip": lambda: run_bare(biggest, "igzip", work),
            "biggest_gzip": lambda: run_bare(biggest, "gzip", work),
        }
        for i in range(args.reps):
            order = list(jobs) if i % 2 == 0 else list(reversed(jobs))
            for name in order:
                r = jobs[name]()
                runs[name].append(r)
                print(f"rep {i + 1} {name:13s}: {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  "
                      f"peak tree RSS {r['peak_tree_rss_mib']:7.1f} MiB  "
                      f"size {r['size'] / 2**20:.0f} MiB", flush=True)
        rootfs_bytes, rootfs_entries = tree_stats(Path(runs["alt"][-1]["bundle"]) / "rootfs")
        cmp = compare_listings(listing(Path(runs["ours"][-1]["out"])),
                               listing(Path(runs["alt"][-1]["out"])))
    finally:
        reg.stop()

    summary = {name: {k: median([r[k] for r in rs]) for k in KEYS + ("size",)}
               for name, rs in runs.items()}
    summary["alt_phases"] = {p: {k: median([r["phases"][p][k] for r in runs["alt"]])
                                 for k in ("wall_s", "cpu_s", "peak_tree_rss_mib")}
                             for p in runs["alt"][0]["phases"]}
    ours = summary["ours"]
    ratios = {f"wall_vs_{n}": round(ours["wall_s"] / summary[n]["wall_s"], 3)
              for n in ("alt", "bare_igzip", "bare_gzip", "biggest_igzip", "biggest_gzip")}
    goals = {"wall_le_0.35x_alt": ratios["wall_vs_alt"] <= 0.35,
             "wall_le_0.8x_bare_igzip": ratios["wall_vs_bare_igzip"] <= 0.8,
             "wall_le_0.8x_bare_gzip": ratios["wall_vs_bare_gzip"] <= 0.8,
             "peak_tree_rss_le_150MiB": ours["peak_tree_rss_mib"] <= 150}
    M = 2 ** 20
    image = {"reference": f"<registry>/{REPO}:{TAG}", "digest": runs["ours"][-1]["digest"],
             "layers": len(layers), "layer_sizes": [l[1] for l in layers],
             "compressed_bytes": sum(l[1] for l in layers), "rootfs_bytes": rootfs_bytes,
             "rootfs_entries": rootfs_entries, "entries_ours": runs["ours"][-1]["entries"],
             "inflaters_ours": runs["ours"][-1]["inflaters"]}

    labels = {"ours": "ours: oci-image convert", "alt": "alt: skopeo + umoci + mksquashfs",
              "bare_igzip": "bare: igzip -dc | tar2sqfs, each layer",
              "bare_gzip": "bare: gzip -dc | tar2sqfs, each layer",
              "biggest_igzip": "bare: igzip, biggest layer alone",
              "biggest_gzip": "bare: gzip, biggest layer alone"}
    rows = []
    for name in labels:
        s = summary[name]
        rows.append([labels[name], f"{s['wall_s']:.1f}", f"{s['cpu_s']:.1f}",
                     f"{s['peak_tree_rss_mib']:.0f}", f"{s['ru_maxrss_mib']:.0f}",
                     f"{s['size'] / M:.0f}",
                     "" if name == "ours" else f"{ours['wall_s'] / s['wall_s']:.2f}x"])
        if name == "alt":
            for p, v in summary["alt_phases"].items():
                rows.append([f"  {p}", f"{v['wall_s']:.1f}", f"{v['cpu_s']:.1f}",
                             f"{v['peak_tree_rss_mib']:.0f}", "", "", ""])
    print()
    print(f"image: {len(layers)} layers, {image['compressed_bytes'] / M:.0f} MiB compressed, "
          f"rootfs {rootfs_bytes / M:.0f} MiB in {rootfs_entries} entries "
          f"(ours: {image['entries_ours']} entries; inflater {image['inflaters_ours']})")
    print(f"median of {args.reps}, {machine()['nproc']} cores:")
    print(table(rows, ["", "wall s", "cpu s", "peak tree RSS MiB", "max 1-proc MiB", "out MiB",
                       "ours/this wall"]))
    print(f"listing check (unsquashfs -lln, ours vs alt): only ours {cmp['n_only_ours']}, "
          f"only alt {cmp['n_only_alt']}, differing {cmp['n_differ']}")
    for k in ("only_ours", "only_alt", "differ"):
        if cmp[k]:
            print(f"  {k}: {cmp[k][:8]}")
    print(f"goals: {goals}")

    result = {"machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "reps": args.reps, "image": image, "summary": summary, "ratios": ratios,
              "goals": goals, "listing_check": cmp,
              "runs": {n: [{k: v for k, v in r.items() if k not in ("out", "bundle")} for r in rs]
                       for n, rs in runs.items()},
              "commands": {
                  "ours": "oci-image convert REF -o out.sqfs",
                  "alt": ["skopeo copy --src-tls-verify=false docker://REF oci:dir:bench",
                          "umoci unpack --image dir:bench bundle",
                          "mksquashfs bundle/rootfs out.sqfs -comp zstd -Xcompression-level 3 "
                          "-noappend -no-progress -quiet"],
                  "bare": "for each layer blob, bottom-most first: {igzip|gzip} -dc BLOB | "
                          + shlex.join(writer_argv(find_writer(), "layer-N.sqfs",
                                                   SquashOptions()))}}
    if not args.no_write:
        p = write_result("bigimage", result)
        names = ["ours", "alt", "bare_igzip", "bare_gzip"]
        svg_bars(RESULTS / "bigimage.svg",
                 f"convert a {image['compressed_bytes'] / 1e9:.1f} GB, {rootfs_entries // 1000}k-entry "
                 f"image ({machine()['nproc']} cores)",
                 ["wall time (s)", "CPU time (s)", "peak RSS, process tree (MiB)"],
                 {labels[n]: [summary[n]["wall_s"], summary[n]["cpu_s"],
                              summary[n]["peak_tree_rss_mib"]] for n in names}, "")
        print(f"wrote {p} and {RESULTS / 'bigimage.svg'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
