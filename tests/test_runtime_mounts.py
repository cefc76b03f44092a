"""NodeMounts against the real kernel: one loop mount per image, refcounted, reaped, adopted."""

from __future__ import annotations

import glob
import os
import subprocess
import time
from pathlib import Path

import pytest

from ociimage.errors import CacheError, InvalidArgument
from ociimage.runtime import mounts as m

import rootfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not rootfs.have_tools(),
                                reason="needs root, busybox and mksquashfs")

DIGEST = "sha256:" + "1" * 64
OTHER = "sha256:" + "2" * 64


def loops_for(path: Path):
    """/dev/loopN devices whose backing file is path."""
    out = []
    for f in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            if Path(f).read_text().strip() == str(path):
                out.append(f.split("/")[3])
        except OSError:
            pass
    return out


def mounts_under(path: Path):
    prefix = os.path.realpath(path)
    return [e.mount_point for e in m.read_mountinfo()
            if e.mount_point == prefix or e.mount_point.startswith(prefix + "/")]


def wait_no_loop(path: Path, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while loops_for(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return loops_for(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return rootfs.build_image(tmp_path_factory.mktemp("img"))


@pytest.fixture
def run_dir(tmp_path, image):
    d = tmp_path / "run"
    yield d
    left = mounts_under(tmp_path)
    for mp in reversed(left):  # leave the machine clean even when a test failed
        subprocess.run(["umount", "-l", mp], check=False)
    assert not left, f"left mounted: {left}"
    assert not wait_no_loop(image), "loop device not freed"


def test_two_acquires_share_one_mount_and_one_loop_device(run_dir, image):
    nm = m.NodeMounts(run_dir, idle=0)
    p1 = nm.acquire(DIGEST, image)
    p2 = nm.acquire(DIGEST, image)
    assert p1 == p2 == run_dir / "images" / ("1" * 64)
    assert (p1 / "etc" / "os-release").read_text().find("ID=ocitest") >= 0
    assert mounts_under(run_dir) == [str(p1)]
    entry = m.mount_at(p1)
    assert entry.fstype == "squashfs"
    assert {"ro", "nosuid", "nodev"} <= set(entry.options.split(","))
    assert len(loops_for(image)) == 1
    assert nm.mounted()[DIGEST]["refs"] == 2
    assert oct(os.stat(run_dir / "images").st_mode & 0o777) == "0o700"

    nm.release(DIGEST)
    assert nm.reap() == []  # still one reference
    nm.release(DIGEST)
    assert nm.reap() == [DIGEST]
    assert mounts_under(run_dir) == []
    assert not p1.exists()
    assert wait_no_loop(image) == []
    assert nm.mounted() == {}


def test_idle_image_stays_until_idle_time_passes(run_dir, image):
    nm = m.NodeMounts(run_dir, idle=60)
    nm.acquire(DIGEST, image)
    nm.release(DIGEST)
    assert nm.reap() == []
    assert nm.mounted()[DIGEST]["refs"] == 0
    # a new step in the idle window reuses the mount
    nm.acquire(DIGEST, image)
    nm.release(DIGEST)
    assert nm.reap(now=time.monotonic() + 61) == [DIGEST]
    assert mounts_under(run_dir) == []


def test_recover_adopts_mounts_of_a_previous_daemon(run_dir, image):
    old = m.NodeMounts(run_dir, idle=0)
    path = old.acquire(DIGEST, image)
    old.acquire(OTHER, image)
    del old  # the daemon "restarts" without unmounting

    new = m.NodeMounts(run_dir, idle=0)
    adopted = new.recover({DIGEST: 1})
    assert sorted(adopted) == sorted([DIGEST, OTHER])
    state = new.mounted()
    assert state[DIGEST]["refs"] == 1 and state[OTHER]["refs"] == 0
    assert state[DIGEST]["source"] == str(image)
    # an acquire after recovery must not mount a second time
    assert new.acquire(DIGEST, image) == path
    assert len(mounts_under(run_dir)) == 2
    assert new.reap() == [OTHER]  # unused: reaped at once with idle=0
    new.release(DIGEST)
    new.release(DIGEST)
    assert new.reap() == [DIGEST]
    assert mounts_under(run_dir) == []


def test_shutdown_keeps_images_in_use(run_dir, image):
    nm = m.NodeMounts(run_dir, idle=60)
    nm.acquire(DIGEST, image)
    nm.acquire(OTHER, image)
    nm.release(OTHER)
    nm.shutdown()
    assert list(nm.mounted()) == [DIGEST]
    assert len(mounts_under(run_dir)) == 1
    nm.release(DIGEST)
    nm.reap(now=time.monotonic() + 3600)
    assert mounts_under(run_dir) == []


def test_recover_removes_leftover_mountpoints(run_dir):
    (run_dir / "images" / ("3" * 64)).mkdir(parents=True)
    nm = m.NodeMounts(run_dir)
    assert nm.recover([]) == []
    assert not (run_dir / "images" / ("3" * 64)).exists()


def test_bad_inputs(run_dir, tmp_path):
    nm = m.NodeMounts(run_dir)
    with pytest.raises(InvalidArgument):
        nm.acquire("sha256:../../etc", tmp_path)
    with pytest.raises(CacheError):
        nm.acquire(DIGEST, tmp_path / "missing.sqfs")
    garbage = tmp_path / "garbage.sqfs"
    garbage.write_bytes(b"not a squashfs" * 100)
    with pytest.raises(m.MountError):
        nm.acquire(DIGEST, garbage)
    assert not (run_dir / "images" / ("1" * 64)).exists()
    assert wait_no_loop(garbage) == []
    nm.release(DIGEST)  # releasing what is not held is harmless
    assert nm.mounted() == {}


def test_mountinfo_parsing_unescapes_and_reports_propagation():
    entries = m.read_mountinfo()
    root = m.mount_at("/", entries)
    # what the kernel says of / here, read from the raw line: its optional fields
    raw = [l.split() for l in Path("/proc/self/mountinfo").read_text().splitlines()
           if l.split()[4] == "/"][-1]
    tags = raw[6:raw.index("-")]
    want = ("shared" if any(t.startswith("shared:") for t in tags) else
            "slave" if any(t.startswith("master:") for t in tags) else
            "unbindable" if "unbindable" in tags else "private")
    assert root is not None and root.propagation == want, (root, tags)
    assert m.mount_containing("/proc/self", entries).fstype == "proc"
    assert m._unescape(r"/a\040b") == "/a b"
