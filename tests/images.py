"""Small but real images for tests: a busybox root filesystem in a few layers."""

from __future__ import annotations

import os
from typing import List

from ocibuild import Entry

BUSYBOX = "/usr/bin/busybox"
APPLETS = ("sh", "cat", "ls", "id", "pwd", "env", "echo", "true", "false", "sleep", "touch",
           "stat", "mount", "grep", "head", "wc", "sha256sum", "printenv", "whoami", "readlink",
           "hostname", "rm", "mkdir", "test", "uname")


def busybox_layers(os_id: str = "ocitest", version: str = "1", extra_mb: int = 0) -> List[List[Entry]]:
    """Bottom-first layers: busybox + applets, /etc, and a layer that changes and deletes things."""
    with open(BUSYBOX, "rb") as f:
        bb = f.read()
    base = [Entry("bin/", "dir", mode=0o755), Entry("bin/busybox", data=bb, mode=0o755)]
    base += [Entry(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS]
    base += [Entry("etc/", "dir", mode=0o755),
             Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"),
             Entry("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n"),
             Entry("tmp/", "dir", mode=0o1777), Entry("root/", "dir", mode=0o700),
             Entry("usr/", "dir", mode=0o755), Entry("usr/bin/", "dir", mode=0o755),
             Entry("usr/bin/env", "symlink", linkname="/bin/busybox"),
             Entry("opt/", "dir", mode=0o755), Entry("opt/app/", "dir", mode=0o755),
             Entry("opt/app/obsolete.txt", data=b"deleted by the next layer\n")]
    top = [Entry("etc/os-release",
                 data=f'NAME="OCI test image"\nID={os_id}\nVERSION_ID="{version}"\n'.encode()),
           Entry("opt/app/.wh.obsolete.txt"),
           Entry("opt/app/hello.sh", data=b"#!/bin/sh\necho hello from the image \"$@\"\n", mode=0o755),
           Entry("opt/app/setuid-true", data=bb, mode=0o4755),
           Entry("opt/app/data/", "dir", mode=0o777)]
    layers = [base, top]
    if extra_mb:
        layers.append([Entry("opt/blob.bin", data=os.urandom(extra_mb << 20))])
    return layers


IMAGE_CONFIG = {"Env": ["PATH=/opt/app:/bin:/usr/bin", "IMAGE_VAR=from-image", "LANG=C.UTF-8"],
                "WorkingDir": "/opt/app", "Entrypoint": ["/opt/app/hello.sh"], "Cmd": ["world"]}
