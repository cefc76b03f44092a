"""A tiny busybox image for runtime tests: a rootfs directory, then a SquashFS of it.

The image knows nothing of the test user (so the generated /etc/passwd is
what makes `id` print their name), says ID=ocitest in /etc/os-release, has
a setuid-root copy of busybox (to show nosuid works) and a /data directory
to mount onto.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BUSYBOX = "/usr/bin/busybox"
APPLETS = ("sh", "cat", "id", "ls", "touch", "mkdir", "echo", "stat", "pwd", "grep", "rm",
           "whoami", "test", "true", "false", "env", "readlink", "head")

PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
          "this line is garbage\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"
OS_RELEASE = 'NAME="OCI test image"\nID=ocitest\nVERSION_ID=1\n'


def have_tools() -> bool:
    return os.path.exists(BUSYBOX) and shutil.which("mksquashfs") is not None


def make_rootfs(root: Path) -> Path:
    root = Path(root)
    for d in ("bin", "etc", "data", "home", "root", "tmp", "proc", "sys", "dev", "usr/bin",
              "work"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox-suid")
    os.chmod(root / "bin" / "busybox-suid", 0o4755)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "etc" / "os-release").write_text(OS_RELEASE)
    (root / "work" / "marker").write_text("image workdir\n")
    return root


def make_squashfs(root: Path, out: Path) -> Path:
    subprocess.run(["mksquashfs", str(root), str(out), "-comp", "zstd", "-all-root",
                    "-noappend", "-quiet", "-no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    # mksquashfs -all-root keeps modes, so the setuid bit survives
    return out


def build_image(workdir: Path) -> Path:
    """rootfs + image.sqfs under workdir; returns the .sqfs path."""
    workdir = Path(workdir)
    root = make_rootfs(workdir / "rootfs")
    return make_squashfs(root, workdir / "image.sqfs")
