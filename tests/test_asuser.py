"""asuser: lookups made by a process that is the user (the kernel decides), never by root."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ociimage import asuser
from ociimage.errors import AccessDenied, InvalidArgument, NotFound

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")

USER = asuser.Identity(23456, 23457, (23457,))


@pytest.fixture
def tree(tmp_path):
    base = Path("/var/tmp") / f"oci-asuser-{os.getpid()}-{tmp_path.name}"
    (base / "locked" / "inner").mkdir(parents=True)
    os.chmod(base, 0o755)
    os.chmod(base / "locked", 0o700)            # root's: the user cannot get past it
    os.chmod(base / "locked" / "inner", 0o755)
    (base / "locked" / "inner" / "f").write_text("root's\n")
    mine = base / "mine"
    mine.mkdir()
    os.chown(mine, USER.uid, USER.gid)
    (mine / "config.json").write_text("{}")
    os.chown(mine / "config.json", USER.uid, USER.gid)
    os.symlink(base / "locked" / "inner", mine / "link")
    os.mkfifo(mine / "fifo")
    with open(mine / "sparse", "wb") as f:
        f.truncate(8 << 30)
    yield base
    for p in sorted(base.rglob("*"), reverse=True):
        (p.rmdir if p.is_dir() and not p.is_symlink() else p.unlink)()
    base.rmdir()


def test_the_kernel_checks_as_the_user(tree):
    mine = tree / "mine"
    got = asuser.open_paths(USER, [str(mine), str(mine / "link"), str(tree / "locked" / "inner"),
                                   "/proc/self/root/etc", str(mine / "missing")])
    try:
        assert isinstance(got[0], asuser.Opened) and got[0].is_dir and got[0].path == str(mine)
        assert isinstance(got[1], AccessDenied)   # the symlink leads where the user cannot go
        assert isinstance(got[2], AccessDenied)
        assert isinstance(got[3], AccessDenied) and "link" in str(got[3])  # no magic links
        assert isinstance(got[4], NotFound)
        # what root alone could open, the user's lookup could not
        root = asuser.open_paths(asuser.Identity(0, 0, (0,)), [str(mine / "link")])
        assert isinstance(root[0], asuser.Opened) and root[0].path == str(tree / "locked" / "inner")
        root[0].close()
    finally:
        for r in got:
            if isinstance(r, asuser.Opened):
                r.close()


def test_files_are_read_as_the_user_regular_and_bounded(tree):
    mine = tree / "mine"
    got = asuser.read_files(USER, [str(mine / "config.json"), str(mine / "fifo"),
                                   str(mine / "sparse"), str(tree / "locked" / "inner" / "f"),
                                   "/etc/shadow"], limit=1 << 20)
    assert got[0] == b"{}"
    assert isinstance(got[1], AccessDenied) and "not a regular file" in str(got[1])  # no wait
    assert isinstance(got[2], AccessDenied) and "larger than" in str(got[2])  # no 8 GiB read
    assert isinstance(got[3], AccessDenied) and isinstance(got[4], AccessDenied)


def test_no_descriptor_of_the_helper_child_lingers(tree):
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        for r in asuser.open_paths(USER, [str(tree / "mine")]):
            r.close()
        asuser.read_files(USER, [str(tree / "mine" / "config.json")])
    assert set(os.listdir("/proc/self/fd")) <= before | {str(asuser._helper._ctrl.fileno())}


def test_an_oversized_request_is_refused_without_restarting_the_helper(tree):
    asuser.start_helper()
    pid = asuser._helper._pid
    with pytest.raises(InvalidArgument):
        asuser.open_paths(USER, ["/" + "é" * 3000] * 40)   # 80 KB of one user's mounts
    with pytest.raises(InvalidArgument):
        asuser.open_paths(USER, ["/x"] * 1000)
    assert asuser._helper._pid == pid
    got = asuser.open_paths(USER, [str(tree / "mine")])
    assert isinstance(got[0], asuser.Opened)
    got[0].close()
    # the helper's children are reaped: no zombies pile up under this process
    zombies = [p for p in os.listdir("/proc") if p.isdigit() and _is_zombie_child(int(p))]
    assert zombies == []


def _is_zombie_child(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] == "Z" and int(fields[1]) == os.getpid()


def test_the_helper_is_started_again_if_it_dies(tree):
    asuser.start_helper()
    old = asuser._helper._pid
    os.kill(old, 9)
    os.waitpid(old, 0)
    got = asuser.open_paths(USER, [str(tree / "mine")])
    assert isinstance(got[0], asuser.Opened) and stat.S_ISDIR(got[0].mode)
    got[0].close()
    assert asuser._helper._pid not in (0, old)
