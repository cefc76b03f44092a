"""pyxis' mount syntax (ociimage/mountflags.py): `SRC:DST:FLAGS` with '+'-joined flags and
`tmpfs:DST[:FLAGS]`, parsed at submit and again by the daemon; then what the flags do in a
real step namespace against the real kernel (as root here: the namespace builder's part)."""

from __future__ import annotations

import os

import pytest

from ociimage import mountflags, stepargs
from ociimage.errors import InvalidArgument
from ociimage.runtime import mountplan

from ociimage.errors import NotFound
from test_runtime_namespaces import (GID, NAME, UID, enter, host, make,  # noqa: F401
                                     needs_root, node, spec_for)

M = mountflags.MountItem


def parse(text):
    return stepargs.parse_mounts(text, "--container-mounts")


def test_pyxis_flags_that_mean_something_here():
    assert parse("/a:/b:ro+rprivate,/c:/d:rbind+nosuid+nodev+x-create=dir+rw") == [
        M("/a", "/b", True, "bind", ()), M("/c", "/d", False, "bind", ())]
    assert parse("/a:/b:noexec+ro") == [M("/a", "/b", True, "bind", ("noexec",))]
    assert parse("/a:/b:private+x-create=auto+x-create=file") == [M("/a", "/b", False, "bind", ())]
    # the old forms are unchanged
    assert parse("/a,/b:/c:ro,/d:/e:rw") == [M("/a", "/a", False, "bind", ()),
                                             M("/b", "/c", True, "bind", ()),
                                             M("/d", "/e", False, "bind", ())]


def test_tmpfs_items():
    assert parse("tmpfs:/scratch") == [M("", "/scratch", False, "tmpfs", ())]
    assert parse("tmpfs:/s/./x/:size=64m+mode=1777+nr_inodes=10k+noexec+x-create=dir") == [
        M("", "/s/x", False, "tmpfs", ("size=64m", "mode=1777", "nr_inodes=10k", "noexec"))]
    assert parse("tmpfs:/s:size=50%+size=1g") == [M("", "/s", False, "tmpfs", ("size=1g",))]


@pytest.mark.parametrize("text, words", [
    ("/a:/b:rslave", "'rslave': binds are private: host mounts made later"),
    ("/a:/b:ro+shared", "'shared': binds are private"),
    ("/a:/b:bind", "'bind': every bind here is recursive"),
    ("/a:/b:exec", "the flags here can only add restrictions"),
    ("/a:/b:suid", "always nosuid"),
    ("/a:/b:x-move", "x-move has no equivalent"),
    ("/a:/b:size=1g", "only a tmpfs takes it"),
    ("/a:/b:sync", "'sync': not supported; binds take ro, rw, noexec"),
    ("tmpfs:/s:uid=0", "'uid=0': not supported; a tmpfs takes size=, nr_inodes=, mode=, noexec"),
    ("tmpfs:/s:size=1g,x", "must be an absolute path"),     # ',' separates items
    ("tmpfs:/s:size=1t", "size= must be a number of bytes with k, m or g"),
    ("tmpfs:/s:size=1g;mode=777", "size= must be"),
    ("tmpfs:/s:mode=4777", "mode= must be octal, at most 1777"),
    ("tmpfs:/s:size=0", "size= must be"),          # for a tmpfs, 0 is no limit at all
    ("tmpfs:/s:nr_inodes=0", "nr_inodes= must be"),
    ("tmpfs:/s:size=007g", "size= must be"),
    ("tmpfs:/s:mode=0x1ff", "mode= must be octal"),
    ("tmpfs:/s:nr_inodes=-1", "nr_inodes= must be a number"),
    ("tmpfs:/s:ro", "a read-only tmpfs would stay empty"),
    ("tmpfs", "a tmpfs needs its target"),
    ("tmpfs:", "a tmpfs needs its target"),
    ("tmpfs:/", "cannot mount over the container's root"),
    ("tmpfs:rel", "must be an absolute path"),
    ("tmpfs:/a/../etc", "must be an absolute path without '..'"),
    ("umount:/etc", "umount: sources have no equivalent"),
    ("./data:/data", "write $PWD/data"),
    ("/a:/b:", "is not SRC:DST[:FLAGS]"),
])
def test_refused_with_one_line_naming_it(text, words):
    with pytest.raises(InvalidArgument) as e:
        parse(text)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("--container-mounts: "), msg


def test_tmpfs_data_is_rebuilt_from_numbers_only():
    assert mountflags.tmpfs_data((), 1000, 1001) == "mode=0700,size=50%,uid=1000,gid=1001"
    assert mountflags.tmpfs_data((), 1000, 1001, "25%") == "mode=0700,size=25%,uid=1000,gid=1001"
    assert mountflags.tmpfs_data(("size=1g", "mode=1777", "noexec"), 5, 6) == \
        "mode=1777,size=1g,uid=5,gid=6"
    for bad in ("uid=0", "size=1g,uid=0", "mode=777,gid=0", "context=x"):
        with pytest.raises(InvalidArgument):
            mountflags.tmpfs_data((bad,), 5, 6)


def test_daemon_parses_the_request_again():
    assert mountflags.request_options("", "noexec") == ("noexec",)
    assert mountflags.request_options("tmpfs", "size=1m+mode=0755") == ("size=1m", "mode=0755")
    for kind, options in (("tmpfs", "uid=0"), ("", "size=1m"), ("overlay", ""),
                          ("tmpfs", "size=1m,uid=0")):
        with pytest.raises(InvalidArgument):
            mountflags.request_options(kind, options)


# ---- in a real step namespace ------------------------------------------------------

@needs_root
def test_tmpfs_is_the_users_private_scratch(make, host):
    step = make(tmpfs=[("/scratch", ("size=4m",)), ("/tmp/deep/er", ("mode=1777", "noexec")),
                       ("/opt/app", ())],
                mounts=[(str(host / "src-rw"), "/scratch/in", False, ())])
    r = enter(step, "stat -c '%u:%g %a' /scratch /tmp/deep/er; cat /scratch/in/file; "
                    "echo x > /scratch/f && cat /scratch/f; ls -A /opt/app; "
                    "grep -E ' /(scratch|tmp/deep/er) ' /proc/self/mounts")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == [f"{UID}:{GID} 700", f"{UID}:{GID} 1777", "src-rw", "x"], r.stdout
    mounts = {l.split()[1]: l.split()[3].split(",") for l in lines if " tmpfs " in l}
    assert {"nosuid", "nodev", "size=4096k"} <= set(mounts["/scratch"]), mounts
    assert {"nosuid", "nodev", "noexec"} <= set(mounts["/tmp/deep/er"]), mounts
    assert "noexec" not in mounts["/scratch"]
    # the image's /opt/app is hidden by an empty tmpfs; nothing reached the host
    assert "hello.sh" not in r.stdout
    assert os.listdir(host / "src-rw") == ["file"]


@needs_root
def test_noexec_bind(make, host):
    (host / "src-rw" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(host / "src-rw" / "run.sh", 0o755)
    step = make(mounts=[(str(host / "src-rw"), "/x", False, ("noexec",)),
                        (str(host / "src-ro"), "/y", True, ())])
    r = enter(step, "/x/run.sh; echo rc=$?; grep -E ' /(x|y) ' /proc/self/mounts")
    assert "Permission denied" in r.stderr and "rc=126" in r.stdout, (r.stdout, r.stderr)
    opts = {l.split()[1]: l.split()[3].split(",") for l in r.stdout.splitlines() if " /" in l}
    assert "noexec" in opts["/x"] and "noexec" not in opts["/y"], opts


@needs_root
def test_tmpfs_refusals(make, host):
    for tmpfs, words in (([("/proc/x", ())], "cannot mount inside /proc"),
                         ([("/proc", ())], "mount tmpfs:/proc: cannot mount over /proc"),
                         ([("/etc", ())], "mount tmpfs:/etc: cannot mount over /etc/passwd"),
                         ([("/dev", ())], "mount tmpfs:/dev: cannot mount over /dev"),
                         ([("/data", ()), ("/data", ())],
                          "mount tmpfs:/data: cannot mount over /data")):
        with pytest.raises(InvalidArgument, match=words):
            make(tmpfs=tmpfs)
    # parents first: a tmpfs inside a bind needs its mount point in the host directory
    with pytest.raises(NotFound, match="/data/t does not exist in the directory mounted at /data"):
        make(tmpfs=[("/data/t", ())], mounts=[(str(host / "src-rw"), "/data", False, ())])
    # a bind at the same place as a tmpfs
    with pytest.raises(InvalidArgument, match="cannot mount over /data, mounted already"):
        make(tmpfs=[("/data", ())], mounts=[(str(host / "src-rw"), "/data", False, ())])
    # inside a bind, the mount point must exist in the host directory (never made there)
    with pytest.raises(NotFound, match="does not exist in the directory mounted at"):
        make(tmpfs=[(str(host / "home" / NAME / "nope"), ())])
    assert not (host / "state" / "100.0").exists()


@needs_root
def test_tmpfs_inside_the_home_bind(make, host):
    scratch = host / "home" / NAME / "scratch"
    scratch.mkdir()
    (scratch / "on-host").write_text("x")
    step = make(tmpfs=[(str(scratch), ("size=1m",))])
    r = enter(step, f"ls -A {scratch}; echo y > {scratch}/f && cat {scratch}/f")
    assert r.returncode == 0 and r.stdout == "y\n", (r.stdout, r.stderr)
    assert sorted(os.listdir(scratch)) == ["on-host"]  # the host directory is untouched


def test_plan_orders_a_tmpfs_mount_point_inside_tmp_before_its_mount(node, tmp_path):
    spec = spec_for(node, tmp_path, mount_home=False, host_cwd="/",
                    tmpfs=[("/tmp/a/b", ())])
    plan = mountplan.plan_step(spec, tmp_path / "s", {})
    root = str(tmp_path / "s" / "root")
    i_tmp = [k for k, op in enumerate(plan.ops) if op[0] == "mount" and op[2] == root + "/tmp"][0]
    i_a = [k for k, op in enumerate(plan.ops) if op[:2] == ("mkdir", root + "/tmp/a")][0]
    i_b = [k for k, op in enumerate(plan.ops) if op[:2] == ("mkdir", root + "/tmp/a/b")][0]
    i_m = [k for k, op in enumerate(plan.ops) if op[0] == "mount" and op[2] == root + "/tmp/a/b"][0]
    assert i_tmp < i_a < i_b < i_m, plan.ops
    assert plan.ops[i_m][5] == f"mode=0700,size=50%,uid={UID},gid={GID}"
    assert "/tmp/a/b" in plan.user_mounts


def test_a_step_lists_at_most_64_mounts():
    """The daemon plans each mount against the others: 10,000 tmpfs items took it 51 s."""
    assert len(parse(",".join(f"tmpfs:/t{i}" for i in range(64)))) == 64
    with pytest.raises(InvalidArgument, match="65 mounts, more than the 64 one step may have"):
        parse(",".join(f"tmpfs:/t{i}" for i in range(65)))


def test_tmpfs_mounts_together_promise_no_more_than_the_nodes_memory():
    gib = 1 << 30
    # the unsized ones share half of it (the kernel's default for one)
    assert mountflags.default_size([("size=1g",), (), ()]) == "25%"
    assert mountflags.default_size([()]) == "50%"
    assert mountflags.default_size([()] * 64) == "1%"
    mountflags.check_tmpfs_total([("size=2g",), (), ("size=25%",)], 8 * gib)  # 2+4+2: fits
    for options in ([("size=100%",), ("size=1k",)], [("size=9g",)], [("size=100%",)] * 8):
        with pytest.raises(InvalidArgument, match="more than this node's memory"):
            mountflags.check_tmpfs_total(options, 8 * gib)
