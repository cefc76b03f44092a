"""The node's mount lock is never held across a mount(8): while one image's mount is under
way (a real mount, made slow by a wrapper in front of mount(8) on PATH), steps of an image
already mounted take and release it, and the mount table can be read."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest

from ociimage.runtime import mounts as m

import rootfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not rootfs.have_tools(),
                                reason="needs root, busybox and mksquashfs")

SLOW, FAST = "sha256:" + "3" * 64, "sha256:" + "4" * 64


def test_mount_lock_is_not_held_across_a_mount(tmp_path, monkeypatch):
    image = rootfs.build_image(tmp_path / "img")
    real = shutil.which("mount")
    bindir, started, go = tmp_path / "bin", tmp_path / "started", tmp_path / "go"
    bindir.mkdir()
    (bindir / "mount").write_text(
        f"#!/bin/sh\n[ -e {tmp_path}/slow ] && {{ touch {started}; "
        f"while [ ! -e {go} ]; do sleep 0.05; done; }}\nexec {real} \"$@\"\n")
    (bindir / "mount").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    nm = m.NodeMounts(tmp_path / "run", idle=0)
    try:
        nm.acquire(FAST, image)  # mounted before the slow one starts
        (tmp_path / "slow").touch()
        slow = threading.Thread(target=nm.acquire, args=(SLOW, image), daemon=True)
        slow.start()
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the slow mount never started"
            time.sleep(0.02)
        done = threading.Event()

        def other_step():
            nm.acquire(FAST, image)
            nm.release(FAST)
            nm.mounted()
            done.set()

        threading.Thread(target=other_step, daemon=True).start()
        assert done.wait(20), "a step of a mounted image waited for another image's mount"
        assert not go.exists() and slow.is_alive()  # the slow mount was still under way
        go.touch()
        slow.join(30)
        assert not slow.is_alive() and nm.mounted()[SLOW]["refs"] == 1
    finally:
        go.touch()
        for d in (FAST, SLOW):
            while nm.mounted().get(d, {}).get("refs"):
                nm.release(d)
        nm.reap(now=time.monotonic() + 1)
        for mp in (nm._mountpoint(FAST), nm._mountpoint(SLOW)):
            if m.mount_at(mp):
                subprocess.run(["umount", "-l", str(mp)], check=False)
    assert not nm.mounted()
