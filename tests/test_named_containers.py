"""runtime/named.py on its own: real overlay mounts on a real directory (root, no cluster).

The image's node mount is stood in for by a plain directory and a counting NodeMounts; the
end-to-end behaviour is tests/test_e2e_named.py's.
"""

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from ociimage.errors import AccessDenied, InvalidArgument, NoSpace, NotFound, RuntimeSetupError
from ociimage.runtime.mounts import mount_at
from ociimage.runtime.named import NamedContainers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlays: needs root")

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


class CountingMounts:
    """NodeMounts' reference counting, nothing mounted."""

    def __init__(self):
        self.refs = {}

    def acquire(self, digest, _sqfs, fd=None):
        self.refs[digest] = self.refs.get(digest, 0) + 1

    def release(self, digest):
        self.refs[digest] -= 1


@pytest.fixture
def site(tmp_path):
    lower = tmp_path / "image"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "os-release").write_text("ID=lower\n")
    mounts = CountingMounts()
    nc = NamedContainers(tmp_path / "containers", mounts)
    yield nc, mounts, lower
    for m in sorted((l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                     if l.split()[4].startswith(str(tmp_path))), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


def test_made_once_then_used_and_removed_with_the_job(site):
    nc, mounts, lower = site
    c = nc.use("7", "env", 1000, 1000, D1, "img@" + D1, {"Env": ["A=1"]}, lower, "n1")
    assert mount_at(c.root).fstype == "overlay"
    assert (c.root / "etc" / "os-release").read_text() == "ID=lower\n"
    for d in (nc.base, nc.base / "7", nc.base / "7" / "env"):
        st = os.lstat(d)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    (c.root / "written").write_text("x")
    assert (c.path / "upper" / "written").read_text() == "x"
    assert mounts.refs == {D1: 1}
    again = nc.use("7", "env", 1000, 1000, D1, "img@" + D1, {}, lower, "n1")
    assert again.config == {"Env": ["A=1"]} and mounts.refs == {D1: 1}  # the same one
    assert nc.lookup("7", "env:no_create", 1000, "n1").digest == D1
    assert nc.remove_job("7") == 1
    assert not (nc.base / "7").exists() and mount_at(c.root) is None and mounts.refs == {D1: 0}


def test_refusals(site):
    nc, _mounts, lower = site
    nc.use("7", "env", 1000, 1000, D1, "img@" + D1, {}, lower, "n1")
    with pytest.raises(InvalidArgument, match="made from img@sha256:1111"):
        nc.use("7", "env", 1000, 1000, D2, "other@" + D2, {}, lower, "n1")
    with pytest.raises(InvalidArgument, match="already has a container env on node n1"):
        nc.use("7", "env:create", 1000, 1000, D1, "img@" + D1, {}, lower, "n1")
    with pytest.raises(AccessDenied):
        nc.lookup("7", "env", 1001, "n1")
    with pytest.raises(NotFound, match="job 8 has no container env on node n1; give --oci-image"):
        nc.lookup("8", "env", 1000, "n1")
    with pytest.raises(NotFound, match="no_create"):
        nc.use("8", "env:no_create", 1000, 1000, D1, "img@" + D1, {}, lower, "n1")
    with pytest.raises(InvalidArgument):
        nc.lookup("7", "../7", 1000, "n1")
    assert not (nc.base / "8").exists()


def test_a_base_others_may_write_is_refused(site, tmp_path):
    nc, _mounts, lower = site
    nc.base.mkdir(mode=0o700)
    os.chmod(nc.base, 0o777)
    with pytest.raises(RuntimeSetupError, match=r"must be root's and not writable by others"):
        nc.use("7", "env", 1000, 1000, D1, "img@" + D1, {}, lower, "n1")


def test_a_symlink_on_the_way_is_never_followed(site, tmp_path):
    nc, _mounts, lower = site
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    nc.base.mkdir(mode=0o700)
    os.symlink(elsewhere, nc.base / "7")
    with pytest.raises(RuntimeSetupError, match="cannot make named container env"):
        nc.use("7", "env", 1000, 1000, D1, "img@" + D1, {}, lower, "n1")
    assert list(elsewhere.iterdir()) == []


def test_too_little_free_space_is_one_line(site, tmp_path):
    _nc, mounts, lower = site
    small = tmp_path / "small"
    small.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M,mode=0700", "t", str(small)],
                   check=True)
    nc = NamedContainers(small, mounts, min_free=8 << 20)
    with pytest.raises(NoSpace) as e:
        nc.use("7", "env", 1000, 1000, D1, "img@" + D1, {}, lower, "n1")
    assert str(e.value).startswith("--oci-name=env: node n1 has only 4 MiB free for named "
                                   "containers (the site asks for 8 MiB)")
    assert "\n" not in str(e.value)


def test_a_restart_adopts_recorded_ones_and_removes_unrecorded_ones(site):
    nc, mounts, lower = site
    c = nc.use("7", "env", 1000, 1000, D1, "img@" + D1, {}, lower, "n1")
    half = nc.use("7", "half", 1000, 1000, D2, "img@" + D2, {}, lower, "n1")
    os.unlink(half.path / "record.json")  # as if the daemon died between mount and record
    fresh = NamedContainers(nc.base, CountingMounts())
    assert fresh.recover() == {D1: 1}
    assert mount_at(c.root) is not None and json.loads((c.path / "record.json").read_text())
    assert not half.path.exists() and mount_at(half.root) is None
    assert fresh.lookup("7", "env", 1000, "n1").digest == D1
