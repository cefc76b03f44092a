"""The privilege boundary, attacked by ordinary users on the real cluster.

Each test is an attack that worked against the first version (the daemon and
the plugin are root on every node): it must fail now, and each checks that
the legitimate use next to it still works, so a test cannot pass by breaking
everything. The daemons, Slurm, the registry and the mounts are all real.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import bcrypt
import pytest

from cluster_fixture import cluster_available
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import start_site, stop_site
from ocibuild import Pusher
from registry_server import RegistryServer
import rootfs
from test_security import docker_login, ensure_user, euid_binary

needs_cluster = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))

VICTIM = "ocipriv"
SECRET = "TOPSECRET-of-the-victim"


class Site:
    def __init__(self, site, registry, pusher):
        self.site, self.cluster, self.registry, self.pusher = site, site.cluster, registry, pusher
        self.base = site.base

    def srun(self, *args, user=None, timeout=120):
        """srun as the cluster's test user (or another user), from /tmp."""
        if user is None:
            return self.cluster.run_as_user(["srun", *args], cwd="/tmp", timeout=timeout)
        pw = pwd.getpwnam(user)
        return subprocess.run(["runuser", "-u", user, "--", "env", f"SLURM_CONF={self.cluster.conf}",
                               f"HOME={pw.pw_dir}", f"USER={user}", "srun", *args],
                              capture_output=True, text=True, timeout=timeout, cwd="/tmp",
                              env=self.cluster.env())

    def as_user(self, argv, user=None, **kw):
        user = user or self.cluster.user
        return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True,
                              text=True, **kw)

    def loops_of(self, path: Path):
        """The loop devices backed by path (other tests' mounts come and go meanwhile)."""
        out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        return sorted(l.split(":", 1)[0] for l in out.splitlines()
                      if f"({os.path.realpath(path)})" in l)


@pytest.fixture(scope="module")
def pb_site(installed, tmp_path_factory):
    """3 daemons + 3 nodes (allow_sqfs=yes, to attack it) and a Basic-auth registry."""
    if cluster_available():
        pytest.skip(cluster_available())
    d = tmp_path_factory.mktemp("pb-reg")
    htpasswd = d / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"alice-pw-S3cret", bcrypt.gensalt(5)).decode() + "\n")
    with RegistryServer(d / "reg", auth=("htpasswd", str(htpasswd))) as reg:
        site = start_site(installed, "oci-pb-", nodes=3, plugstack_args="allow_sqfs=yes")
        try:
            p = Pusher(reg.url)
            p.s.auth = ("alice", "alice-pw-S3cret")
            yield Site(site, reg, p)
        finally:
            stop_site(site)


@pytest.fixture(scope="module")
def public_ref(pb_site):
    """An image the attacker may use (pushed to the same registry: logins are per registry,
    so anonymous pulls fail here; the test user gets a login of their own for it)."""
    img = pb_site.pusher.image("pub/app", "v1", busybox_layers(os_id="pub"), config=IMAGE_CONFIG)
    docker_login(pb_site.cluster.user, pb_site.registry.host, "alice", "alice-pw-S3cret")
    return f"{pb_site.registry.host}/pub/app:v1@{img.manifest_digest}"


@pytest.fixture(params=[False, True], ids=["as-user", "remap-root"])
def remap(request, monkeypatch, pb_site, public_ref):
    """The attack again with --oci-remap-root (through its variable: every srun of the test),
    which must not make root inside any stronger against the host."""
    if request.param:
        monkeypatch.setenv("OCI_REMAP_ROOT", "1")
        r = pb_site.srun("-N1", f"--oci-image={public_ref}", "id", "-u")
        assert r.returncode == 0 and r.stdout == "0\n", r.stderr  # it is on
    return request.param


@pytest.fixture
def scratch():
    """A directory under /tmp that ordinary users can traverse; removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="oci-pb-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mp = line.split()[4]
        if mp.startswith(str(d)):
            subprocess.run(["umount", "-l", mp], check=False)
    shutil.rmtree(d, ignore_errors=True)


def _setuid_probe_on_submount(scratch: Path, owner: pwd.struct_passwd) -> Path:
    """scratch/data (the user's) with a tmpfs *submount* at data/sub holding a setuid-root
    probe: the kind of thing a site has (a scratch or apps filesystem mounted suid)."""
    data = scratch / "data"
    (data / "sub").mkdir(parents=True)
    os.chown(data, owner.pw_uid, owner.pw_gid)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(data / "sub")], check=True)
    probe = data / "sub" / "euid"
    probe.write_bytes(euid_binary(scratch))
    os.chmod(probe, 0o4755)
    (scratch / "euid.c").unlink()
    (scratch / "euid").unlink()
    return probe


@needs_cluster
def test_setuid_program_on_a_bind_submount_gains_nothing(pb_site, public_ref, scratch):
    user = pwd.getpwnam(pb_site.cluster.user)
    probe = _setuid_probe_on_submount(scratch, user)
    # control: on the host the probe really is setuid root for this user
    r = pb_site.as_user([str(probe)])
    assert r.stdout.strip() == "euid=0", r.stderr
    data = scratch / "data"
    r = pb_site.srun("-N2", f"--oci-image={public_ref}", f"--oci-mounts={data}:/data",
                     "sh", "-c", "ls -l /data/sub/euid; /data/sub/euid; grep NoNewPrivs /proc/self/status")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("-rwsr-xr-x") == 2  # the bit is there ...
    assert r.stdout.count(f"euid={user.pw_uid}") == 2 and "euid=0" not in r.stdout  # ... and void
    assert r.stdout.count("NoNewPrivs:\t1") == 2


@needs_cluster
def test_host_root_bound_into_the_container_is_nosuid_everywhere(pb_site, public_ref, scratch):
    """--oci-mounts=/:/host brings the host's /proc, /sys, cgroups and every other submount;
    none may honour a setuid bit or a device node."""
    user = pwd.getpwnam(pb_site.cluster.user)
    probe = _setuid_probe_on_submount(scratch, user)
    r = pb_site.srun("-N1", f"--oci-image={public_ref}", "--oci-mounts=/:/host",
                     "sh", "-c", f"/host{probe}; cat /proc/self/mountinfo")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"euid={user.pw_uid}"
    host_mounts = [l.split() for l in lines[1:] if l.split()[4].startswith("/host")]
    points = {m[4] for m in host_mounts}
    # the host's tree really came along, submounts and all
    assert {"/host", "/host/proc", "/host/sys", f"/host{probe.parent}"} <= points, points
    for m in host_mounts:
        opts = m[5].split(",")
        assert "nosuid" in opts and "nodev" in opts, f"{m[4]} mounted {m[5]}"


@needs_cluster
def test_bind_source_swapped_for_a_symlink_never_binds_the_target(pb_site, public_ref, scratch):
    """The attacker swaps their bind source between a directory and a symlink to a directory
    only root can reach, while steps start: a check-then-mount-by-path would bind the target."""
    user = pwd.getpwnam(pb_site.cluster.user)
    locked = scratch / "locked"          # 0700 root: the user cannot get past it
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "marker").write_text(SECRET + "\n")
    os.chmod(locked, 0o700)
    os.chmod(locked / "inner", 0o755)
    os.chmod(locked / "inner" / "marker", 0o644)
    play = scratch / "play"
    play.mkdir()
    os.chown(play, user.pw_uid, user.pw_gid)
    swapper = textwrap.dedent(f"""
        import os, time
        os.chdir({str(play)!r})
        os.mkdir("src.dir"); open("src.dir/marker", "w").write("MINE\\n")
        os.symlink({str(locked / "inner")!r}, "src.lnk")
        os.rename("src.dir", "src")
        end = time.monotonic() + 120
        while time.monotonic() < end and not os.path.exists("stop"):
            os.rename("src", "src.dir"); os.symlink({str(locked / "inner")!r}, "src")
            os.unlink("src"); os.rename("src.dir", "src")
    """)
    attacker = subprocess.Popen(["runuser", "-u", user.pw_name, "--", "/usr/bin/python3", "-c", swapper])
    try:
        time.sleep(0.5)
        outcomes = []
        for _ in range(25):
            r = pb_site.srun("-N1", f"--oci-image={public_ref}", f"--oci-mounts={play}/src:/data",
                             "cat", "/data/marker", timeout=60)
            outcomes.append(r.stdout + r.stderr)
    finally:
        (play / "stop").touch()
        attacker.wait(timeout=30)
    assert not any(SECRET in o for o in outcomes), [o for o in outcomes if SECRET in o][:1]
    mine = sum("MINE" in o for o in outcomes)
    assert mine >= 1, outcomes[:3]  # the race ran: steps did start with the user's directory
    for o in outcomes:
        if "MINE" not in o:  # refused outright: one line that says why, never a traceback
            assert "Traceback" not in o and ("does not exist" in o or "denied" in o or
                                             "changed while" in o), o


def _victim_sqfs(scratch: Path, name: str, mode: int) -> Path:
    """A SquashFS of the victim's, holding SECRET, in their 0700 private-images directory."""
    victim = ensure_user(VICTIM)
    vdir = Path(victim.pw_dir) / "private-images"
    vdir.mkdir(exist_ok=True)
    os.chown(vdir, victim.pw_uid, victim.pw_gid)
    os.chmod(vdir, 0o700)
    content = rootfs.make_rootfs(scratch / f"content-{name}")
    (content / "etc" / "os-release").write_text(f"ID={SECRET}\n")
    img = rootfs.make_squashfs(content, vdir / name)
    os.chown(img, victim.pw_uid, victim.pw_gid)
    os.chmod(img, mode)
    return img


@needs_cluster
def test_sqfs_symlink_into_another_users_private_directory(pb_site, scratch, remap):
    attacker = pwd.getpwnam(pb_site.cluster.user)
    # readable in itself: only the 0700 directory protects it
    # a new file each time: the last run's loop mount of the victim's may not have idled out
    img = _victim_sqfs(scratch, f"victim-{time.monotonic_ns()}.sqfs", 0o644)
    mine = scratch / "mine"
    mine.mkdir()
    os.chown(mine, attacker.pw_uid, attacker.pw_gid)
    pb_site.as_user(["ln", "-s", str(img), str(mine / "img.sqfs")], check=True)
    # control: the attacker's own .sqfs is allowed here and works
    own = mine / "own.sqfs"
    shutil.copy(img, own)
    os.chown(own, attacker.pw_uid, attacker.pw_gid)
    r = pb_site.srun("-N1", f"--oci-image={own}", "cat", "/etc/os-release")
    assert r.returncode == 0 and SECRET in r.stdout, r.stderr
    r = pb_site.srun("-N1", f"--oci-image={mine / 'img.sqfs'}", "cat", "/etc/os-release")
    assert r.returncode != 0 and SECRET not in r.stdout
    assert "cannot read" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert pb_site.loops_of(img) == []          # refused before anything was mounted
    # the victim themself may
    r = pb_site.srun("-N1", f"--oci-image={img}", "cat", "/etc/os-release", user=VICTIM)
    assert r.returncode == 0 and SECRET in r.stdout, r.stderr
    assert len(pb_site.loops_of(img)) <= 1      # (it may have idled out already)


@pytest.fixture
def victim_login(pb_site):
    """The victim's docker login (alice) and a private image only a login can pull."""
    ensure_user(VICTIM)
    cfg = docker_login(VICTIM, pb_site.registry.host, "alice", "alice-pw-S3cret")
    # a new image each time: uncached, so each attack meets the pull's own check
    tag = f"v{time.monotonic_ns()}"
    img = pb_site.pusher.image("priv/app", tag, busybox_layers(os_id="private-victim",
                                                               version=tag),
                               config=IMAGE_CONFIG)
    return cfg, f"{pb_site.registry.host}/priv/app:{tag}@{img.manifest_digest}"


def _attacker_docker_dir(pb_site) -> Path:
    pw = pwd.getpwnam(pb_site.cluster.user)
    d = Path(pw.pw_dir) / ".docker"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


@needs_cluster
def test_another_users_credentials_through_a_symlink(pb_site, public_ref, victim_login, remap):
    cfg, private = victim_login
    d = _attacker_docker_dir(pb_site)
    try:
        pb_site.as_user(["ln", "-s", str(cfg), str(d / "config.json")], check=True)
        r = pb_site.srun("-N1", f"--oci-image={private}", "cat", "/etc/os-release")
        assert r.returncode != 0 and "private-victim" not in r.stdout
        assert "authentication required" in r.stderr and "Traceback" not in r.stderr, r.stderr
        # the victim, with the same file as their own, may
        r = pb_site.srun("-N1", f"--oci-image={private}", "cat", "/etc/os-release", user=VICTIM)
        assert r.returncode == 0 and "private-victim" in r.stdout, r.stderr
    finally:
        shutil.rmtree(d)
        docker_login(pb_site.cluster.user, pb_site.registry.host, "alice", "alice-pw-S3cret")


@needs_cluster
def test_a_cached_private_image_without_credentials_is_a_refusal_not_an_outage(
        pb_site, public_ref, victim_login):
    """The victim's pull caches it; a user without any login then asks for it: the
    registry refuses the anonymous check before answering (Basic auth), which is a refusal
    to log in for, not "its registry cannot be reached; try again later"."""
    _cfg, private = victim_login
    r = pb_site.srun("-N1", f"--oci-image={private}", "true", user=VICTIM)
    assert r.returncode == 0, r.stderr
    d = _attacker_docker_dir(pb_site)  # empty: no login at all
    try:
        r = pb_site.srun("-N1", f"--oci-image={private}", "cat", "/etc/os-release")
        assert r.returncode != 0 and "private-victim" not in r.stdout
        lines = [l for l in r.stderr.splitlines() if l.startswith("oci-image: error:")]
        assert len(lines) == 1 and "does not let you pull it (HTTP 401)" in lines[0], r.stderr
    finally:
        shutil.rmtree(d)
        docker_login(pb_site.cluster.user, pb_site.registry.host, "alice", "alice-pw-S3cret")


@needs_cluster
def test_fifo_or_huge_credentials_file_neither_hangs_nor_exhausts_the_daemon(pb_site, public_ref):
    img = pb_site.pusher.image("priv/other", "v1", busybox_layers(os_id="private-other"),
                               config=IMAGE_CONFIG)
    private = f"{pb_site.registry.host}/priv/other:v1@{img.manifest_digest}"
    d = _attacker_docker_dir(pb_site)
    daemon = pb_site.site.daemons[0]
    try:
        for make, what in ((["mkfifo", str(d / "config.json")], "fifo"),
                           (["truncate", "-s", "8G", str(d / "config.json")], "sparse")):
            pb_site.as_user(make, check=True)
            t0 = time.monotonic()
            r = pb_site.srun("-N1", "-w", "n1", f"--oci-image={private}", "true", timeout=90)
            took = time.monotonic() - t0
            assert r.returncode != 0 and "authentication required" in r.stderr, (what, r.stderr)
            assert took < 30, (what, took)
            rss_kb = int(next(l.split()[1] for l in Path(f"/proc/{daemon.proc.pid}/status").read_text()
                              .splitlines() if l.startswith("VmRSS:")))
            assert rss_kb < 512 * 1024, (what, rss_kb)
            os.unlink(d / "config.json")
        # the daemon still serves this user (with a working login again) and others
        docker_login(pb_site.cluster.user, pb_site.registry.host, "alice", "alice-pw-S3cret")
        r = pb_site.srun("-N1", "-w", "n1", f"--oci-image={public_ref}", "echo", "OK")
        assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)
        docker_login(pb_site.cluster.user, pb_site.registry.host, "alice", "alice-pw-S3cret")


@needs_cluster
def test_tarpit_registry_steps_killed_while_another_users_steps_start(pb_site, public_ref):
    """A user points steps at a loopback registry that trickles its blobs (a tarpit), then
    aborts them: the node's daemon keeps serving another user meanwhile, and once the
    steps are gone their downloads are abandoned (not left holding the daemon's threads)."""
    import random
    import signal

    from ocibuild import Entry
    from registry_proxy import RegistryProxy
    rnd = random.Random(13)
    refs = []
    with RegistryProxy(pb_site.registry.url, tarpit=True, tarpit_over=16 << 10) as tarpit:
        for i in range(3):
            img = pb_site.pusher.image(f"tarpit/t{i}", "v1", busybox_layers(os_id=f"tar{i}") +
                                       [[Entry("opt/", "dir", mode=0o755),
                                         Entry("opt/blob", data=rnd.randbytes(256 << 10))]],
                                       config=IMAGE_CONFIG)
            refs.append(f"{tarpit.host}/tarpit/t{i}:v1@{img.manifest_digest}")
        # the attacker may log in to both (the tarpit forwards to the same registry)
        user = pwd.getpwnam(pb_site.cluster.user)
        cfg = Path(user.pw_dir) / ".docker" / "config.json"
        auth = {"auth": __import__("base64").b64encode(b"alice:alice-pw-S3cret").decode()}
        cfg.write_text(__import__("json").dumps({"auths": {pb_site.registry.host: auth,
                                                            tarpit.host: auth}}))
        env = pb_site.cluster.env()
        sruns = [subprocess.Popen(pb_site.cluster.user_cmd(["srun", "-N1", "-w", "n1",
                                                            f"--oci-image={ref}", "true"]),
                                  env=env, cwd="/tmp", stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for ref in refs]  # 3 of n1's 4 CPUs: the fourth is for the other user
        try:
            deadline = time.monotonic() + 60
            while tarpit.trickling < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            if tarpit.trickling < 3:
                for p in sruns:
                    p.kill()
                raise AssertionError(f"the steps never reached the tarpit: {sruns[0].communicate()}")
            # another user's step on the same node starts while those hang
            t0 = time.monotonic()
            ensure_user(VICTIM)
            docker_login(VICTIM, pb_site.registry.host, "alice", "alice-pw-S3cret")
            r = pb_site.srun("-N1", "-w", "n1", f"--oci-image={public_ref}", "echo", "OK",
                             user=VICTIM, timeout=60)
            assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr
            assert time.monotonic() - t0 < 30
            assert tarpit.trickle_ended == 0  # (still hanging in there)
        finally:
            for p in sruns:  # the user aborts: Ctrl-C twice
                p.send_signal(signal.SIGINT)
            time.sleep(0.5)
            for p in sruns:
                p.send_signal(signal.SIGINT)
            for p in sruns:
                try:
                    p.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
            docker_login(pb_site.cluster.user, pb_site.registry.host, "alice", "alice-pw-S3cret")
        deadline = time.monotonic() + 60
        while tarpit.trickle_ended < tarpit.trickling and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tarpit.trickling >= 3 and tarpit.trickle_ended == tarpit.trickling, \
            (tarpit.trickling, tarpit.trickle_ended)


@needs_cluster
def test_sqfs_swapped_for_a_symlink_never_mounts_the_target(pb_site, scratch, remap):
    """The user keeps exchanging their own .sqfs with a symlink to another user's private
    image (renameat2 RENAME_EXCHANGE) while steps start: mount(8) reopening the file by
    path as root would mount the victim's image; the loop device must come from the
    descriptor the user's own open returned."""
    attacker = pwd.getpwnam(pb_site.cluster.user)
    img = _victim_sqfs(scratch, "victim-race.sqfs", 0o600)
    own = rootfs.make_rootfs(scratch / "own")
    (own / "etc" / "os-release").write_text("ID=MINE\n")
    mine = scratch / "mine"
    mine.mkdir()
    rootfs.make_squashfs(own, mine / "img.sqfs")
    os.symlink(img, mine / "link")
    subprocess.run(["chown", "-hR", f"{attacker.pw_uid}:{attacker.pw_gid}", str(mine)], check=True)
    flipper = textwrap.dedent(f"""
        import ctypes, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        end = time.monotonic() + 180
        while time.monotonic() < end and not os.path.exists({str(mine / 'stop')!r}):
            libc.renameat2(-100, b"{mine}/img.sqfs", -100, b"{mine}/link", 2)  # RENAME_EXCHANGE
    """)
    flip = subprocess.Popen(["runuser", "-u", attacker.pw_name, "--", "/usr/bin/python3", "-c", flipper])
    outcomes = []
    try:
        for _ in range(15):
            r = pb_site.srun("-N1", f"--oci-image={mine}/img.sqfs", "cat", "/etc/os-release",
                             timeout=60)
            outcomes.append(r.stdout + r.stderr)
            # a new identity (mtime) each time, so each try sets up a loop device anew
            pb_site.as_user(["sh", "-c", f"for f in {mine}/img.sqfs {mine}/link; do "
                                         f"[ -L $f ] || touch $f; done"])
    finally:
        (mine / "stop").touch()
        flip.wait(timeout=30)
    assert not any(SECRET in o for o in outcomes), [o for o in outcomes if SECRET in o][:1]
    assert sum("ID=MINE" in o for o in outcomes) >= 1, outcomes[:3]


@pytest.fixture
def member_group(pb_site):
    """A system group ocigrp-<random> with the test user as a *supplementary* member only
    (their primary group stays theirs); removed afterwards. The cluster's NSS is Debian's
    files-only default (no nscd/sssd cache), so the daemon's getgrouplist() sees the new
    /etc/group line at once; with a caching NSS the group could stay invisible for the
    cache's lifetime and this test would fail for that reason, not the daemon's."""
    import secrets
    name = f"ocigrp-{secrets.token_hex(4)}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    try:
        subprocess.run(["gpasswd", "-a", pb_site.cluster.user, name], check=True, capture_output=True)
        yield __import__("grp").getgrnam(name)
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@needs_cluster
def test_supplementary_group_is_honoured_for_mounts_and_cwd(pb_site, public_ref, scratch, member_group):
    """Issue #17: the runtime once computed a user's groups twice (asuser.Identity.of_user
    and namespaces.py), and the two could disagree. One walk remains (Identity.of_user,
    used by mountplan for every path a user names): a directory the user may enter only
    through a supplementary group is bindable and usable as the working directory; one
    whose group they are not in is refused with one line naming the mount.

    Why this fails if the daemon ignored supplementary groups: d1 is 0750 root:<group>,
    the user is neither its owner nor has <group> as primary group, so only the
    supplementary membership lets them search it (the setpriv --clear-groups control shows
    exactly that on the host). Bind sources and the cwd are opened O_PATH as the user,
    and O_PATH checks search permission on the directories *above* the last component
    only, so the paths that depend on the daemon's group walk are d1/inner (bind) and
    d1/inner as the cwd: without the group their open gets EACCES, the step fails with
    "mount source .../d1/inner: permission denied", and the cwd falls back to the image's.
    (What the tasks may read is decided by their own groups, which Slurm sets and caches:
    the test keeps them out of it.)"""
    user = pwd.getpwnam(pb_site.cluster.user)
    assert member_group.gr_gid != user.pw_gid and user.pw_name in member_group.gr_mem
    d1, d2 = scratch / "d1", scratch / "d2"
    # Only d1 itself (0750 root:<group>) is gated by the group; what lies below it is
    # anyone's to read. So the tasks, whose groups Slurm sets (and caches: slurmd's
    # group cache may predate the group), never need it; the daemon's opens, as the user,
    # do: a bind source below d1 and a working directory below d1.
    for d, gid, content in ((d1, member_group.gr_gid, "GROUP-MEMBER-CONTENT"), (d2, 0, SECRET)):
        (d / "inner").mkdir(parents=True)
        (d / "inner" / "file").write_text(content + "\n")
        os.chmod(d / "inner" / "file", 0o644)
        os.chmod(d / "inner", 0o755)
        os.chown(d, 0, gid)
        os.chmod(d, 0o750)
    # controls on the host: the group (and only the group) lets the user in, d2 keeps them out
    r = pb_site.as_user(["cat", str(d1 / "inner" / "file")])
    assert r.returncode == 0 and r.stdout == "GROUP-MEMBER-CONTENT\n", r.stderr
    r = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                        "--clear-groups", "cat", str(d1 / "inner" / "file")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "GROUP-MEMBER-CONTENT" not in r.stdout
    r = pb_site.as_user(["cat", str(d2 / "inner" / "file")])
    assert r.returncode != 0 and SECRET not in r.stdout

    # a supplementary group is honoured by the daemon: a bind source below d1 ...
    r = pb_site.srun("-N1", f"--oci-image={public_ref}", f"--oci-mounts={d1}/inner:/g",
                     "cat", "/g/file")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "GROUP-MEMBER-CONTENT\n", (r.stdout, r.stderr)
    # ... and the working directory: srun in d1/inner, bound at /w, starts its tasks there
    # (without the group the daemon could not open it and they would start elsewhere)
    r = pb_site.cluster.run_as_user(["srun", "-N1", f"--oci-image={public_ref}",
                                     f"--oci-mounts={d1}/inner:/w", "sh", "-c",
                                     "pwd; cat file"], cwd=str(d1 / "inner"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "/w\nGROUP-MEMBER-CONTENT\n", (r.stdout, r.stderr)

    # a group the user is not in is not: refused before the step, in one line naming the
    # mount, nothing read
    r = pb_site.srun("-N1", f"--oci-image={public_ref}", f"--oci-mounts={d2}/inner:/g",
                     "cat", "/g/file")
    assert r.returncode != 0
    assert SECRET not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    naming = [l for l in r.stderr.splitlines() if str(d2) in l]
    assert len(naming) == 1, r.stderr
    assert f"mount source {d2}/inner" in naming[0] and "permission denied" in naming[0], r.stderr
    # d2 itself is bound (O_PATH does not check its last component) but its tasks,
    # without the group, cannot read in it
    r = pb_site.srun("-N1", f"--oci-image={public_ref}", f"--oci-mounts={d2}:/g", "cat",
                     "/g/inner/file")
    assert r.returncode != 0
    assert SECRET not in r.stdout + r.stderr
    assert "can't open '/g/inner/file': Permission denied" in r.stderr, r.stderr
