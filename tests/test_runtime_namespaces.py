"""Step namespaces against the real kernel, entered the way the SPANK plugin does.

enter() runs a helper that does exactly what the plugin does per task:
open(ns) + setns(CLONE_NEWNS) + chdir(cwd), then drops to the job's user and
execs a program of the image.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ociimage.errors import AccessDenied, InvalidArgument, NotFound
from ociimage.runtime import containerpaths, mountplan
from ociimage.runtime import namespaces as ns
from ociimage.runtime import users
from ociimage.runtime.mounts import NodeMounts, read_mountinfo

import rootfs

ROOT = Path(__file__).resolve().parent.parent
UID, GID, NAME, GROUP = 23456, 23457, "ocitester", "ocitesters"
DIGEST = "sha256:" + "4" * 64

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not rootfs.have_tools(),
                                reason="needs root, busybox and mksquashfs")

ENTER = r"""
import os, sys
from ociimage.runtime import syscalls
ns, cwd, uid, gid = sys.argv[1:5]
fd = os.open(ns, os.O_RDONLY | os.O_CLOEXEC)
syscalls.setns(fd, syscalls.CLONE_NEWNS)
os.close(fd)
os.chdir(cwd)
os.setgroups([])
os.setgid(int(gid))
os.setuid(int(uid))
os.execv(sys.argv[5], sys.argv[5:])
"""


def enter(step: ns.StepNamespace, script: str, uid: int = UID, gid: int = GID):
    env = {"PATH": "/bin:/usr/bin", "PYTHONPATH": str(ROOT / "daemon")}
    return subprocess.run([sys.executable, "-c", ENTER, str(step.ns_path), step.cwd, str(uid),
                           str(gid), "/bin/sh", "-c", script],
                          env=env, capture_output=True, text=True, timeout=30)


def mounts_under(path: Path):
    prefix = os.path.realpath(path)
    return [e.mount_point for e in read_mountinfo()
            if e.mount_point == prefix or e.mount_point.startswith(prefix + "/")]


def loops_for(path: Path):
    out = []
    for d in Path("/sys/block").glob("loop*"):
        try:
            if (d / "loop" / "backing_file").read_text().strip() == str(path):
                out.append(d.name)
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """The image mounted once for the module, like a node with one image in use."""
    if os.geteuid() != 0 or not rootfs.have_tools():
        pytest.skip("needs root, busybox and mksquashfs")
    base = tmp_path_factory.mktemp("node")
    image = rootfs.build_image(base)
    nm = NodeMounts(base / "run", idle=0)
    root = nm.acquire(DIGEST, image)
    yield root
    nm.release(DIGEST)
    nm.reap()
    left = mounts_under(base)
    for mp in reversed(left):
        subprocess.run(["umount", "-l", mp], check=False)
    assert not left, f"left mounted: {left}"
    deadline = time.monotonic() + 5
    while loops_for(image) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not loops_for(image)


@pytest.fixture
def host(tmp_path):
    """Host-side directories: the state dir, the user's home, mount sources (not under /tmp,
    so that the home does not land in the container's fresh /tmp)."""
    base = Path("/var/tmp") / f"ocins-{os.getpid()}-{tmp_path.name}"
    base.mkdir(parents=True)
    os.chmod(base, 0o755)
    home = base / "home" / NAME
    home.mkdir(parents=True)
    os.chown(home, UID, GID)
    (home / "hello.txt").write_text("from home\n")
    for d in ("src-ro", "src-rw"):
        (base / d).mkdir()
        os.chown(base / d, UID, GID)
        (base / d / "file").write_text(d + "\n")
    yield base
    left = mounts_under(base)
    for mp in reversed(left):
        subprocess.run(["umount", "-l", mp], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
    assert not left, f"left mounted: {left}"


def spec_for(node, host, **kw) -> ns.StepSpec:
    args = dict(job_id="100", step_id="0", uid=UID, gid=GID, user_name=NAME,
                home=str(host / "home" / NAME), rootfs=node, group_name=GROUP,
                host_cwd=str(host / "home" / NAME))
    args.update(kw)
    return ns.StepSpec(**args)


@pytest.fixture
def make(node, host):
    """create_step_namespace with cleanup; returns (spec -> StepNamespace)."""
    made = []

    def _make(**kw):
        step = ns.create_step_namespace(spec_for(node, host, **kw), host / "state")
        made.append(step)
        return step
    yield _make
    for step in made:
        ns.destroy_step_namespace(step.ns_path)


# ---- inside the container ------------------------------------------------------

@needs_root
def test_task_sees_image_user_and_readonly_root(make, host):
    step = make()
    assert step.ns_path == host / "state" / "100.0" / "mnt"
    assert step.cwd == str(host / "home" / NAME)
    r = enter(step, "cat /etc/os-release; id; pwd; cat hello.txt; touch /newfile")
    assert "ID=ocitest" in r.stdout
    assert f"uid={UID}({NAME}) gid={GID}({GROUP})" in r.stdout
    assert str(host / "home" / NAME) in r.stdout
    assert "from home" in r.stdout
    assert "Read-only file system" in r.stderr
    assert r.returncode != 0
    # even root in the container gets EROFS on the image
    r = enter(step, "touch /etc/x", uid=0, gid=0)
    assert "Read-only file system" in r.stderr


@needs_root
def test_root_is_nosuid_nodev_and_setuid_has_no_effect(make):
    step = make()
    r = enter(step, "cat /proc/self/mountinfo; /bin/busybox-suid id")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    root = [ln for ln in lines if ln.split()[4:5] == ["/"]]
    assert root and {"ro", "nosuid", "nodev"} <= set(root[-1].split()[5].split(","))
    for target in ("/tmp", "/etc/passwd", "/etc/group"):
        ln = [x for x in lines if x.split()[4:5] == [target]][-1]
        assert {"nosuid", "nodev"} <= set(ln.split()[5].split(",")), ln
    assert "euid=0" not in r.stdout and f"uid={UID}" in lines[-1]


@needs_root
def test_tmp_is_private_and_writable_proc_works(make):
    step = make()
    r = enter(step, "echo hi > /tmp/f && cat /tmp/f && ls -ld /tmp && ls /proc/self "
                    "&& readlink /proc/self/exe && ls /dev/null /dev/shm")
    assert r.returncode == 0, r.stderr
    out = r.stdout.split()
    assert "hi" in out and "drwxrwxrwt" in out
    assert "status" in out and "/bin/busybox" in out
    assert not os.path.exists("/tmp/f")
    r2 = make(step_id="1")
    assert "No such file" in enter(r2, "cat /tmp/f").stderr  # each step has its own /tmp


@needs_root
def test_home_is_mounted_writable_or_not_at_all(make, host):
    home = host / "home" / NAME
    step = make()
    r = enter(step, f"echo written > {home}/new.txt")
    assert r.returncode == 0, r.stderr
    assert (home / "new.txt").read_text() == "written\n"

    step2 = make(step_id="1", mount_home=False)
    assert step2.cwd == "/"  # host cwd (the home) is not visible
    # only an empty placeholder where slurmstepd will chdir first (plan_submit_dir)
    r = enter(step2, f"cat {home}/new.txt")
    assert r.returncode != 0 and "No such file" in r.stderr
    r = enter(step2, f"ls -A {home}")
    assert r.returncode == 0 and r.stdout == "", (r.stdout, r.stderr)


@needs_root
def test_missing_submit_dir_gets_an_empty_placeholder_in_the_container_only(make, host):
    """slurmstepd's chdir to the submit directory (as the user, in the container) must
    succeed; the directory is made empty in the container, never on the host, and the
    root stays read-only."""
    gone = host / "not-in-the-image" / "run1"
    step = make(mount_home=False, host_cwd=str(gone))
    assert step.placeholder == str(gone) and step.cwd == "/"
    r = enter(step, f"cd {gone} && ls -A && stat -c %u:%a . && touch x")
    assert r.stdout.splitlines() == ["0:755"], (r.stdout, r.stderr)
    assert "x: Read-only file system" in r.stderr, r.stderr   # (EROFS is checked before EACCES)
    assert not (host / "not-in-the-image").exists()
    # a submit directory the image has: nothing is made
    step = make(step_id="1", mount_home=False, host_cwd="/etc")
    assert step.placeholder is None
    # inside a user's bind, where nothing is ever created: Slurm's message stays
    step = make(step_id="2", mount_home=False, mounts=[(str(host / "src-rw"), "/data", False)],
                host_cwd="/data/missing")
    assert step.placeholder is None


@needs_root
def test_submit_dir_placeholder_never_fails_a_step_and_says_nothing_when_bound(make, host):
    # a name the kernel refuses: no placeholder (Slurm's own message stays), no failure
    step = make(mount_home=False, host_cwd="/scratch/" + "a" * 300)
    assert step.placeholder is None and step.cwd == "/"
    # the submit directory is in the container where a bind put it: the tasks start
    # there; a placeholder at the host path keeps slurmstepd quiet, and there is no note
    sub = host / "src-rw" / "run1"
    sub.mkdir(exist_ok=True)
    os.chown(sub, UID, GID)
    step = make(step_id="1", mount_home=False, mounts=[(str(host / "src-rw"), "/data", False)],
                host_cwd=str(sub))
    assert step.cwd == "/data/run1" and step.submit_visible
    assert step.placeholder == str(sub)


@needs_root
def test_user_mounts_read_only_and_read_write(make, host):
    step = make(mounts=[(str(host / "src-ro"), "/newdir/ro", True),
                        (str(host / "src-rw"), "/data", False)],
                host_cwd=str(host / "src-rw"))
    assert step.cwd == "/data"
    r = enter(step, "cat /newdir/ro/file /data/file && pwd && echo x > /data/out")
    assert r.returncode == 0, r.stderr
    assert "src-ro\nsrc-rw\n/data\n" == r.stdout
    assert (host / "src-rw" / "out").read_text() == "x\n"
    r = enter(step, "echo x > /newdir/ro/out")
    assert "Read-only file system" in r.stderr
    assert not (host / "src-ro" / "out").exists()
    # /newdir did not exist in the image: it was made in an overlay, still read-only
    r = enter(step, "touch /newfile", uid=0, gid=0)
    assert "Read-only file system" in r.stderr


@needs_root
def test_writable_root_writes_vanish_after_destroy(make, node):
    step = make(writable=True)
    r = enter(step, "echo scratch > /etc/scratch && cat /etc/scratch", uid=0, gid=0)
    assert r.returncode == 0 and r.stdout == "scratch\n", r.stderr
    assert not (node / "etc" / "scratch").exists()
    ns.destroy_step_namespace(step.ns_path)
    again = make(step_id="1", writable=True)
    assert "No such file" in enter(again, "cat /etc/scratch").stderr


@needs_root
def test_image_workdir_and_explicit_workdir(make, host):
    step = make(mount_home=False, image_workdir="/work")
    assert step.cwd == "/work"
    assert enter(step, "pwd; cat marker").stdout == "/work\nimage workdir\n"
    assert make(step_id="1", workdir="/bin").cwd == "/bin"


@needs_root
def test_destroy_is_idempotent_and_leaves_nothing(make, host):
    step = make()
    ns_dir = step.ns_path.parent
    assert ns.list_step_namespaces(host / "state") == {"100.0": step.ns_path}
    holder = ns.holder_of(step.ns_path)
    assert holder is not None and os.path.exists(f"/proc/{holder}")
    assert Path(f"/proc/{holder}/comm").read_text().strip() == "oci-ns-holder"
    ns.destroy_step_namespace(step.ns_path)
    ns.destroy_step_namespace(step.ns_path)
    assert not ns_dir.exists()
    assert not os.path.exists(f"/proc/{holder}")  # the holder process is gone, not a zombie
    assert mounts_under(host) == []
    assert ns.list_step_namespaces(host / "state") == {}


@needs_root
def test_cleanup_stale_keeps_listed_steps(make, host):
    a = make(step_id="0")
    b = make(step_id="1")
    (host / "state" / "99.0").mkdir()  # litter from a crash, never pinned
    removed = ns.cleanup_stale(host / "state", keep=["100.0"])
    assert sorted(removed) == ["100.1", "99.0"]
    assert ns.list_step_namespaces(host / "state") == {"100.0": a.ns_path}
    assert not b.ns_path.parent.exists()


@needs_root
def test_existing_step_is_refused(make):
    make()
    with pytest.raises(InvalidArgument, match="already has a namespace"):
        make()


@needs_root
def test_bad_mounts_fail_cleanly(make, host):
    with pytest.raises(NotFound, match="does not exist"):
        make(mounts=[(str(host / "nope"), "/data", False)])
    with pytest.raises(NotFound, match="mount target"):  # never created in the user's home
        make(mounts=[(str(host / "src-ro"), str(host / "home" / NAME / "missing"), True)])
    with pytest.raises(InvalidArgument):
        make(mounts=[(str(host / "src-ro"), "/proc/x", True)])
    with pytest.raises(InvalidArgument):
        make(mounts=[(str(host / "src-ro"), "/etc", True)])
    secret = host / "secret"
    secret.mkdir(mode=0o700)
    (secret / "inner").mkdir()
    with pytest.raises(AccessDenied):
        make(mounts=[(str(secret / "inner"), "/data", True)])
    assert not (host / "state" / "100.0").exists()
    assert mounts_under(host) == []


# ---- pure parts ------------------------------------------------------------

def test_resolve_in_root_follows_symlinks_inside_the_image(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "real").mkdir()
    (root / "secret").write_text("image's own file\n")
    os.symlink("/secret", root / "etc" / "passwd")       # absolute: relative to the image
    os.symlink("../../../../real", root / "etc" / "up")  # can't climb out of the image
    os.symlink("loop", root / "loop")
    assert containerpaths.read_image_file(root, "/etc/passwd") == "image's own file\n"
    r = containerpaths.resolve_in_root(root, "/etc/up/a/b")
    assert (r.path, r.missing) == ("/real", ("a", "b"))
    with pytest.raises(InvalidArgument, match="symbolic links"):
        containerpaths.resolve_in_root(root, "/loop/x")
    with pytest.raises(InvalidArgument):
        containerpaths.resolve_in_root(root, "relative")
    assert containerpaths.read_image_file(root, "/etc") is None  # not a regular file
    big = root / "big"
    big.write_bytes(b"a:b\n" * 1000)
    assert containerpaths.read_image_file(root, "/big", limit=10) == "a:b\na:b\n"


def test_make_passwd_replaces_clashes_and_tolerates_garbage():
    image = ("root:x:0:0:root:/root:/bin/sh\n"
             "garbage without colons\n"
             "x:y\n"
             f"{NAME}:x:1:1::/home/old:/bin/false\n"
             f"other:x:{UID}:5::/:/bin/sh\n"
             "+nis:::::: \n"
             "bin:x:2:2:bin:/bin:/usr/sbin/nologin")
    out = users.make_passwd(image, NAME, UID, GID, "/home/u")
    assert out.splitlines() == ["root:x:0:0:root:/root:/bin/sh",
                                "bin:x:2:2:bin:/bin:/usr/sbin/nologin",
                                f"{NAME}:x:{UID}:{GID}::/home/u:/bin/sh"]
    assert users.make_passwd(None, NAME, UID, GID, "/") == f"{NAME}:x:{UID}:{GID}::/:/bin/sh\n"
    for bad in ("a:b", "a\nb", ""):
        with pytest.raises(InvalidArgument):
            users.make_passwd("", bad, UID, GID, "/")
    with pytest.raises(InvalidArgument):
        users.make_passwd("", NAME, UID, GID, "/home:x")


def test_make_group_replaces_clashes():
    image = f"root:x:0:\nusers:x:{GID}:a,b\n{GROUP}:x:7:\nbroken\nvideo:x:44:{NAME}\n"
    out = users.make_group(image, GROUP, GID)
    assert out.splitlines() == ["root:x:0:", f"video:x:44:{NAME}", f"{GROUP}:x:{GID}:"]


def plan_of(spec, step_dir):
    sources = mountplan.open_sources(spec)
    try:
        return mountplan.plan_step(spec, step_dir, sources)
    finally:
        for o in sources.values():
            getattr(o, "close", lambda: None)()


def test_plan_working_directory_rules(tmp_path):
    root = tmp_path / "root"
    for d in ("etc", "proc", "sys", "dev", "tmp", "data", "work"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "passwd").write_text("")
    (root / "etc" / "group").write_text("")
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    spec = ns.StepSpec("1", "0", 0, 0, "root", str(home), root,
                       mounts=[(str(src), "/data", False)], host_cwd=str(src / "deep"),
                       image_workdir="/work")
    assert plan_of(spec, tmp_path / "st").cwd == "/data/deep"
    spec.host_cwd = str(home / "sub")
    plan = plan_of(spec, tmp_path / "st")
    assert plan.cwd == str(home / "sub")
    assert not plan.overlay  # the home is under /tmp: its mount point is made in the tmpfs
    spec.mounts.append((str(src), "/newdir/sub", True))
    assert plan_of(spec, tmp_path / "st").overlay  # /newdir is not in the image
    spec.mounts.pop()
    spec.mount_home = False
    plan = plan_of(spec, tmp_path / "st")
    assert plan.cwd == "/work" and not plan.overlay
    spec.image_workdir = None
    assert plan_of(spec, tmp_path / "st").cwd == "/"
    spec.workdir = "/data/x"
    assert plan_of(spec, tmp_path / "st").cwd == "/data/x"
    assert plan_of(spec, tmp_path / "st").ops[-1] == ("pivot", str(tmp_path / "st" / "root"))


@needs_root
def test_state_dir_on_a_shared_mount_works(node, host):
    from ociimage.runtime import syscalls as sc
    shared = host / "shared"
    shared.mkdir()
    sc.mount("tmpfs", shared, "tmpfs", 0, "mode=0755")
    try:
        sc.mount(None, shared, None, sc.MS_SHARED)
        state = shared / "state"
        step = ns.create_step_namespace(spec_for(node, host), state)
        assert "ID=ocitest" in enter(step, "cat /etc/os-release").stdout
        ns.destroy_step_namespace(step.ns_path)
        assert mounts_under(state) == []
    finally:
        sc.umount2(shared, sc.MNT_DETACH)


@needs_root
def test_create_from_a_threaded_process(node, host):
    """The daemon is a threaded gRPC server: fork from a worker thread while others run."""
    import threading
    stop = threading.Event()
    busy = [threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
            for _ in range(4)]
    for t in busy:
        t.start()
    result = {}

    def work():
        t0 = time.monotonic()
        step = ns.create_step_namespace(spec_for(node, host, step_id="7"), host / "state")
        result["seconds"] = time.monotonic() - t0
        result["step"] = step
    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join(30)
    finally:
        stop.set()
        for t in busy:
            t.join()
    step = result["step"]
    try:
        assert "ID=ocitest" in enter(step, "cat /etc/os-release").stdout
        assert result["seconds"] < 5
    finally:
        ns.destroy_step_namespace(step.ns_path)


@needs_root
@pytest.mark.parametrize("mount_api", [True, False], ids=["mount-api", "legacy"])
def test_user_bind_submounts_are_nosuid_or_left_behind(make, host, monkeypatch, mount_api):
    """A submount below a bind source (mounted suid by the site) either comes along
    nosuid,nodev (mount_setattr AT_RECURSIVE) or, without the new mount API, stays
    behind (a non-recursive bind): never as it is."""
    if mount_api and not mountplan.USE_MOUNT_API:
        pytest.skip("this kernel lacks open_tree/mount_setattr")
    monkeypatch.setattr(mountplan, "USE_MOUNT_API", mount_api)
    sub = host / "src-rw" / "sub"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(sub)], check=True)
    try:
        (sub / "marker").write_text("SUBMOUNT\n")
        step = make(mounts=[(str(host / "src-rw"), "/data", False)])
        r = enter(step, "cat /data/file; cat /data/sub/marker; grep ' /data' /proc/self/mountinfo")
        lines = r.stdout.splitlines()
        assert lines[0] == "src-rw", r.stderr
        binds = [l.split() for l in lines if " /data" in l]
        assert binds and all("nosuid" in b[5].split(",") and "nodev" in b[5].split(",")
                             for b in binds), binds
        if mount_api:
            assert "SUBMOUNT" in lines and {b[4] for b in binds} == {"/data", "/data/sub"}
        else:
            assert "SUBMOUNT" not in r.stdout and {b[4] for b in binds} == {"/data"}
    finally:
        subprocess.run(["umount", "-l", str(sub)], check=False)


HIDEPID = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from ociimage.runtime import namespaces as ns
from ociimage.runtime import syscalls as sc
subprocess.run(["mount", "-t", "proc", "-o", "hidepid=invisible", "proc", "/proc"], check=True)
spec = ns.StepSpec(**json.loads(sys.argv[2]))
spec.rootfs = __import__("pathlib").Path(spec.rootfs)
step = ns.create_step_namespace(spec, sys.argv[3])
try:
    pid = os.fork()
    if pid == 0:
        fd = os.open(str(step.ns_path), os.O_RDONLY)
        sc.setns(fd, sc.CLONE_NEWNS)
        os.chdir("/")
        os.setgroups([]); os.setgid(spec.gid); os.setuid(spec.uid)
        opts = [l.split()[-1] for l in open("/proc/self/mountinfo") if l.split()[4] == "/proc"]
        visible = os.path.exists("/proc/1")
        print(json.dumps({"opts": opts, "pid1": visible}), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
finally:
    ns.destroy_step_namespace(step.ns_path)
"""


@needs_root
def test_container_proc_keeps_the_hosts_hidepid(node, host):
    """With the host's /proc mounted hidepid=invisible, the container's /proc is too: a user
    sees only their own processes inside as outside (run in a private mount namespace with
    a proc of its own, so the machine's /proc is left alone)."""
    spec = dict(job_id="200", step_id="0", uid=UID, gid=GID, user_name=NAME, home="/",
                rootfs=str(node), group_name=GROUP, mount_home=False)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", HIDEPID,
                        str(ROOT / "daemon"), json.dumps(spec), str(host / "state")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(seen["opts"]) == 1 and "hidepid=invisible" in seen["opts"][0].split(","), seen
    assert seen["pid1"] is False  # init is root's: hidden from the user, as on the host


@pytest.mark.parametrize("mount_api", [True, False], ids=["mount-api", "legacy"])
def test_cdi_nodes_are_made_in_an_overlay_dev_never_on_the_host(make, monkeypatch, mount_api):
    """A CDI device node the host's /dev lacks (cdiapply.NodeToMake): made in the step's
    /dev (host /dev below, the step's tmpfs above), the host's /dev submounts bound
    again, nosuid; the host's /dev gets nothing."""
    import stat as st
    from ociimage.runtime.cdiapply import NodeToMake
    if mount_api and not mountplan.USE_MOUNT_API:
        pytest.skip("this kernel lacks open_tree/mount_setattr")
    monkeypatch.setattr(mountplan, "USE_MOUNT_API", mount_api)
    assert not os.path.lexists("/dev/oci-ns-test")
    nodes = (NodeToMake("/dev/oci-ns-test/sub/zero", st.S_IFCHR | 0o640, os.makedev(1, 5),
                        0, GID),
             NodeToMake("/dev/oci-ns-test/null", st.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0))
    step = make(device_nodes=nodes)
    r = enter(step, "stat -c '%n %F %t:%T %a %u:%g' /dev/oci-ns-test/sub/zero "
                    "/dev/oci-ns-test/null; echo x > /dev/oci-ns-test/null && echo wrote; "
                    "head -c 3 /dev/oci-ns-test/sub/zero | wc -c; ls /dev/null && "
                    "grep -E ' /dev(/pts|/shm)? ' /proc/self/mountinfo")
    lines = r.stdout.splitlines()
    assert lines[:5] == [f"/dev/oci-ns-test/sub/zero character special file 1:5 640 0:{GID}",
                         "/dev/oci-ns-test/null character special file 1:3 666 0:0",
                         "wrote", "3", "/dev/null"], (r.stdout, r.stderr)
    dev = [l.split() for l in lines[5:]]
    assert {d[4] for d in dev} >= {"/dev", "/dev/pts", "/dev/shm"}, dev
    assert [d for d in dev if d[4] == "/dev"][0][8] == "overlay", dev
    assert all("nosuid" in d[5].split(",") for d in dev), dev
    assert not os.path.lexists("/dev/oci-ns-test")
