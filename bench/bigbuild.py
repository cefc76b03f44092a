"""Build (once) the big benchmark image: a multi-GB Debian image from real packages.

Five layers made with umoci, each an `apt-get install` of real Debian 12
packages in a chroot of the layers below (no random data anywhere):

  1. debootstrap --variant=minbase bookworm
  2. toolchains: gcc/g++/gfortran, clang + LLVM 14, Boost (all -dev), Go 1.19
     with its sources, OpenJDK 17, Rust, the kernel headers, cmake, git
  3. scientific Python + R + Octave: numpy, scipy, pandas, matplotlib,
     scikit-learn, sympy, ...
  4. TeX Live: latex-extra, fonts-extra, science, pictures, publishers
  5. clean-up: /usr/share/doc and /usr/share/man removed (whiteouts), apt
     lists and caches gone, one config file changed

The layout is kept under CACHE/layout (tag `big`), so later runs skip the
build. Used by bench/bigimage.py; `python3 bench/bigbuild.py [--cache DIR]`
builds it alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
TAG = "big"
DEFAULT_CACHE = Path("/var/tmp/oci-bench-big")

#: (layer name, packages installed in it)
LAYERS = [
    ("toolchains", ["build-essential", "gfortran", "cmake", "git", "clang-14", "llvm-14-dev",
                    "libboost-all-dev", "golang-1.19", "golang-1.19-src",
                    "openjdk-17-jdk-headless", "rustc", "cargo", "linux-headers-amd64"]),
    ("science", ["python3-numpy", "python3-scipy", "python3-pandas", "python3-matplotlib",
                 "python3-sklearn", "python3-sympy", "python3-h5py", "python3-numba",
                 "python3-statsmodels", "python3-skimage", "python3-networkx",
                 "r-base-core", "r-recommended", "octave"]),
    ("texlive", ["texlive-latex-extra", "texlive-fonts-extra", "texlive-science",
                 "texlive-pictures", "texlive-publishers"]),
]


def sh(*argv, **kw):
    print("+", " ".join(map(str, argv)), flush=True)
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def layout_has_tag(layout: Path, tag: str) -> bool:
    if not (layout / "index.json").exists():
        return False
    r = subprocess.run(["umoci", "ls", "--layout", str(layout)], capture_output=True, text=True)
    return r.returncode == 0 and tag in r.stdout.split()


class _Chroot:
    """/proc and resolv.conf for apt inside rootfs; no daemons started."""

    def __init__(self, rootfs: Path):
        self.rootfs = rootfs
        self.mounts = []

    def __enter__(self):
        r = self.rootfs
        sh("mount", "-t", "proc", "proc", r / "proc")
        self.mounts.append(r / "proc")
        resolv = r / "etc" / "resolv.conf"
        if resolv.is_symlink() or not resolv.exists():
            resolv.unlink(missing_ok=True)
            resolv.write_text("")
        sh("mount", "--bind", "/etc/resolv.conf", resolv)
        self.mounts.append(resolv)
        prc = r / "usr/sbin/policy-rc.d"
        prc.write_text("#!/bin/sh\nexit 101\n")
        prc.chmod(0o755)
        return self

    def run(self, *argv):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        sh("chroot", self.rootfs, *argv, env=env)

    def __exit__(self, *exc):
        (self.rootfs / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        for m in reversed(self.mounts):
            subprocess.run(["umount", str(m)])
        for p in (self.rootfs / "var/lib/apt/lists").glob("*"):
            if p.is_file():
                p.unlink()
        shutil.rmtree(self.rootfs / "var/cache/apt/archives", ignore_errors=True)
        (self.rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        (self.rootfs / "etc/resolv.conf").write_text("")


def build_image(cache: Path = DEFAULT_CACHE, rebuild: bool = False) -> Path:
    """The OCI layout cache/layout with tag `big`; built once."""
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
    ref = f"{layout}:{TAG}"
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", ref)
    sh("umoci", "unpack", "--image", ref, bundle)
    rootfs = bundle / "rootfs"
    sh("cp", "-a", f"{minbase}/.", rootfs)
    sh("umoci", "repack", "--refresh-bundle", "--image", ref, bundle)
    for name, packages in LAYERS:
        with _Chroot(rootfs) as c:
            c.run("apt-get", "update")
            c.run("apt-get", "install", "-y", "--no-install-recommends", *packages)
            c.run("apt-get", "clean")
        print(f"layer {name}: installed after {time.monotonic() - t0:.0f} s", flush=True)
        sh("umoci", "repack", "--refresh-bundle", "--image", ref, bundle)
    shutil.rmtree(rootfs / "usr/share/doc")
    shutil.rmtree(rootfs / "usr/share/man")
    (rootfs / "etc/motd").write_text("benchmark image\n")
    sh("umoci", "repack", "--refresh-bundle", "--image", ref, bundle)
    sh("umoci", "config", "--image", ref, "--config.cmd", "/bin/bash",
       "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "--config.env", "LANG=C.UTF-8")
    sh("umoci", "gc", "--layout", layout)
    shutil.rmtree(bundle, ignore_errors=True)
    print(f"built {ref} in {time.monotonic() - t0:.0f} s", flush=True)
    return layout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (debootstrap, chroot)")
    build_image(args.cache, args.rebuild)
    return 0


if __name__ == "__main__":
    sys.exit(main())
