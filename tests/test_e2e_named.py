"""Named containers (`--oci-name`, pyxis' `--container-name`): a writable container per job
and node, kept across the job's steps that name it, gone when the job ends.

On a real 2-node cluster with the real plugin, step client and daemons, as the test user
(and a second user). n1's named containers live on a small real tmpfs, so that a task can
fill it: the full-disk case is a real full filesystem.
"""

import os
import pwd
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ociimage.errors import InvalidArgument
from ociimage.stepargs import parse_container_name

from cluster_fixture import cluster_available
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import start_site, stop_site

OTHER_USER = "ocinamed2"
DATA = "/opt/app/data"  # 0777 in the test image: a user may write there
TMPFS_SIZE = 24 << 20
MIN_FREE = 4 << 20


# ---- the name, where submit and every node check it ---------------------------------------

def test_names_and_flags():
    assert parse_container_name("env") == ("env", "auto")
    assert parse_container_name("my.env-2_x:no_create") == ("my.env-2_x", "no_create")
    assert parse_container_name("a:create") == ("a", "create")
    for bad in ("../x", "..", ".", ".hidden", "a/b", "", "x" * 65, "a b", "é", "-x", "a:exec",
                "a:nope", "a:b:c"):
        with pytest.raises(InvalidArgument):
            parse_container_name(bad)


# ---- end to end -------------------------------------------------------------------------

class Named:
    def __init__(self, site, refs):
        self.site, self.cluster, self.refs = site, site.cluster, refs
        self.containers = {d.node: d.runtime_dir / "containers" for d in site.daemons}

    def srun(self, *args, user=None, timeout=120):
        if user is None:
            return self.cluster.run_as_user(["srun", *args], cwd="/tmp", timeout=timeout)
        pw = pwd.getpwnam(user)
        return subprocess.run(["runuser", "-u", user, "--", "env",
                               f"SLURM_CONF={self.cluster.conf}", f"HOME={pw.pw_dir}",
                               f"USER={user}", "srun", *args], capture_output=True, text=True,
                              timeout=timeout, cwd="/tmp", env=self.cluster.env())

    def submit(self, body: str, nodes: str = "n1", user=None, ntasks: int = 1):
        """An sbatch job running body on nodes; returns (job id, output file, its directory)."""
        go = Path(tempfile.mkdtemp(prefix="oci-named-", dir="/tmp"))
        os.chmod(go, 0o777)
        out, script = go / "out", go / "job.sh"
        script.write_text(f"#!/bin/sh\n#SBATCH -o {out}\n#SBATCH -w {nodes}\n"
                          f"#SBATCH -N{len(nodes.split(','))}\n#SBATCH -n{ntasks}\n{body}")
        os.chmod(script, 0o755)
        argv = ["sbatch", "--parsable", str(script)]
        if user is None:
            r = self.cluster.run_as_user(argv, cwd=str(go))
        else:
            r = subprocess.run(["runuser", "-u", user, "--", "env",
                                f"SLURM_CONF={self.cluster.conf}", *argv], capture_output=True,
                               text=True, cwd=str(go), env=self.cluster.env())
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0], out, go

    def wait_gone(self, job: str, timeout=90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True,
                                env=self.cluster.env()).stdout.strip()
            if not st:
                return
            time.sleep(0.2)
        raise AssertionError(f"job {job} still queued after {timeout}s")

    def run_job(self, body: str, nodes: str = "n1", user=None, ntasks: int = 1) -> (str, str):
        job, out, _go = self.submit(body, nodes, user, ntasks)
        self.wait_gone(job)
        return job, out.read_text() if out.exists() else ""

    def wait_file(self, path: Path, out: Path, timeout=90) -> None:
        deadline = time.time() + timeout
        while not path.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert path.exists(), out.read_text() if out.exists() else "no output"

    def wait_removed(self, node: str, job: str, timeout=30) -> None:
        """cleanup-job runs detached from the job's epilog: the directory goes soon after."""
        d = self.containers[node] / job
        deadline = time.time() + timeout
        while d.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert not d.exists(), sorted(str(p) for p in d.rglob("*"))
        mounts = Path("/proc/self/mountinfo").read_text()
        assert f"{d}/" not in mounts and f" {d} " not in mounts


@pytest.fixture(scope="module")
def named(registry, installed):
    if cluster_available() is not None:
        pytest.skip(str(cluster_available()))
    from images import IMAGE_CONFIG, busybox_layers
    from ocibuild import Pusher
    from test_security import ensure_user

    ensure_user(OTHER_USER)
    pusher = Pusher(registry.url)
    refs = {}
    for name, os_id in (("img", "named"), ("other", "othernamed")):
        pusher.image(f"named/{name}", "v1", busybox_layers(os_id=os_id), config=IMAGE_CONFIG)
        refs[name] = f"{registry.host}/named/{name}:v1"
    conf = ("[daemon]\nmount_idle = 1\ncontainers_per_job = 3\n"
            f"containers_min_free = {MIN_FREE}\n[cache]\nlease_ttl = 60\n")
    site = start_site(installed, "oci-named-", nodes=2, plugstack_args="pyxis_aliases=yes",
                      daemon_conf=conf)
    small = site.daemons[0].runtime_dir / "containers"  # n1's, on a small real tmpfs
    try:
        small.mkdir(mode=0o700)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700",
                        "oci-named-test", str(small)], check=True)
        yield Named(site, refs)
    finally:
        stop_site(site)


def section(text: str, start: str, end: str = "") -> str:
    part = text.split(start + "\n", 1)[1]
    return part.split(end + "\n", 1)[0] if end else part


def one_error_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.startswith("oci-image: error:")]
    assert len(lines) == 1, text
    return lines[0]


def test_steps_share_the_container_and_later_steps_give_the_name_alone(named):
    img = named.refs["img"]
    go = Path(tempfile.mkdtemp(prefix="oci-named-go-", dir="/tmp"))
    os.chmod(go, 0o777)
    body = f"""
srun -N1 -n1 -w n1 --oci-image={img} --oci-name=env sh -c 'echo from-step-1 > {DATA}/state'
srun -N1 -n1 -w n1 --oci-name=env sh -c 'cat {DATA}/state; echo "var=$IMAGE_VAR pwd=$(pwd)"'
srun -N1 -n1 -w n1 --container-name=env sh -c 'echo from-step-3 >> {DATA}/state'
srun -N1 -n1 -w n1 --oci-image={img} --oci-name=env:no_create cat {DATA}/state
echo "other image:"
srun -N1 -n1 -w n1 --oci-image={named.refs['other']} --oci-name=env true
echo "name alone on n2:"
srun -N1 -n1 -w n2 --oci-name=env true
echo "create again:"
srun -N1 -n1 -w n1 --oci-image={img} --oci-name=env:create true
touch {go}/ready
while [ ! -f {go}/go ]; do sleep 0.2; done
"""
    job, out, _ = named.submit(body, nodes="n1,n2", ntasks=2)
    named.wait_file(go / "ready", out)
    text = out.read_text()
    # step 2 (no image) read what step 1 wrote, with the image's environment and workdir
    assert "from-step-1\nvar=from-image pwd=/opt/app\n" in text, text
    assert "from-step-1\nfrom-step-3\n" in text, text  # the alias, and :no_create
    other = one_error_line(section(text, "other image:", "name alone on n2:"))
    n2 = one_error_line(section(text, "name alone on n2:", "create again:"))
    again = one_error_line(section(text, "create again:"))
    assert "--oci-name=env: the container was made from" in other and "not from" in other
    assert f"job {job} has no container env on node n2; give --oci-image too" in n2
    assert f"--oci-name=env:create: job {job} already has a container env on node n1" in again
    # on the host: root's directories, 0700, the task's file the user's
    user = pwd.getpwnam(named.cluster.user)
    base = named.containers["n1"]
    for d in (base / job, base / job / "env"):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    f = base / job / "env" / "upper" / DATA.lstrip("/") / "state"
    assert f.read_text() == "from-step-1\nfrom-step-3\n"
    assert (os.lstat(f).st_uid, os.lstat(f).st_gid) == (user.pw_uid, user.pw_gid)
    (go / "go").touch()
    named.wait_gone(job)
    named.wait_removed("n1", job)
    assert not (named.containers["n2"] / job).exists()


def test_other_jobs_and_users_never_see_it(named):
    img = named.refs["img"]
    go = Path(tempfile.mkdtemp(prefix="oci-named-go-", dir="/tmp"))
    os.chmod(go, 0o777)
    holder, out, _ = named.submit(f"""
srun --oci-image={img} --oci-name=env sh -c 'echo secret-of-$SLURM_JOB_ID > {DATA}/state'
touch {go}/ready
while [ ! -f {go}/go ]; do sleep 0.2; done
srun --oci-name=env cat {DATA}/state
""")
    try:
        named.wait_file(go / "ready", out)
        probe = f"""
echo "alone:"
srun --oci-name=env cat {DATA}/state
echo "with image:"
srun --oci-image={img} --oci-name=env sh -c 'ls {DATA}; echo listed'
"""
        for user in (None, OTHER_USER):  # the same user's next job, another user's job
            job, text = named.run_job(probe, user=user)
            alone, with_image = text.split("alone:\n", 1)[1].split("with image:\n", 1)
            assert f"job {job} has no container env on node n1; give --oci-image too" in \
                one_error_line(alone)
            listing = [l for l in with_image.splitlines() if not l.startswith("oci-image: ")]
            assert listing == ["listed"], text  # a fresh one: empty, its own
            named.wait_removed("n1", job)
        # a daemon restart loses nothing: the holder's next step still reads its state
        d = named.site.daemons[0]
        d.stop()
        d.start()
    finally:
        (go / "go").touch()
    named.wait_gone(holder)
    assert out.read_text().rstrip().endswith(f"secret-of-{holder}"), out.read_text()
    named.wait_removed("n1", holder)


def test_steps_at_once_share_one_overlay(named):
    """Both steps start at once naming a new container: one overlay, mounted once on the
    node (a second overlay on the same upper would be refused), bound into both."""
    img = named.refs["img"]
    step = ("srun -n1 --overlap --oci-image={img} --oci-name=env sh -c "
            "'touch {d}/{me}; i=0; while [ ! -f {d}/{peer} ] && [ $i -lt 300 ]; do sleep 0.1; "
            "i=$((i+1)); done; ls {d}' > {go}/{me}.out 2> {go}/{me}.err &")
    go = Path(tempfile.mkdtemp(prefix="oci-named-go-", dir="/tmp"))
    os.chmod(go, 0o777)
    body = (step.format(img=img, d=DATA, me="a", peer="b", go=go) + "\n"
            + step.format(img=img, d=DATA, me="b", peer="a", go=go) + "\nwait\n"
            + "echo done\n")
    job, text = named.run_job(body, ntasks=2)
    for me in ("a", "b"):
        assert (go / f"{me}.out").read_text().split() == ["a", "b"], \
            (go / f"{me}.err").read_text() + text
    named.wait_removed("n1", job)


def test_a_full_disk_is_enospc_then_one_clear_line(named):
    img = named.refs["img"]
    job, text = named.run_job(f"""
srun --oci-image={img} --oci-name=big sh -c 'dd if=/dev/zero of={DATA}/fill bs=1M 2>&1; echo "dd=$?"'
echo "next:"
srun --oci-name=big true
echo "next rc=$?"
""")
    first, nxt = text.split("next:\n", 1)
    assert "No space left on device" in first and "dd=1" in first, text
    line = one_error_line(nxt)
    assert "--oci-name=big: node n1 has only 0 MiB free for named containers" in line, line
    assert "end the job" in line
    assert "next rc=0" not in nxt
    named.wait_removed("n1", job)
    vfs = os.statvfs(named.containers["n1"])  # all of it free again
    assert vfs.f_bavail * vfs.f_frsize > TMPFS_SIZE - (1 << 20)


@pytest.mark.parametrize("value, says", [
    ("../x", "--oci-name=../x: a container name is 1 to 64 letters"),
    ("a/b", "--oci-name=a/b: a container name is 1 to 64 letters"),
    ("x:exec", "the exec flag (joining a running container) is not supported"),
    ("x:sometimes", "unknown flag 'sometimes'"),
])
def test_bad_names_are_refused_at_submit(named, value, says):
    r = named.srun(f"--oci-image={named.refs['img']}", f"--oci-name={value}", "true")
    assert r.returncode != 0
    assert says in one_error_line(r.stderr), r.stderr


def test_create_needs_an_image(named):
    r = named.srun("--oci-name=x:create", "true")
    assert r.returncode != 0
    assert "--oci-name=x:create needs --oci-image" in one_error_line(r.stderr)


def test_a_symlink_planted_in_the_container_is_never_followed(named):
    """A task makes a mount target of a later step a symlink to the container's /etc: the
    daemon plans from the image, the namespace builder refuses any symlink on the way, so
    the user's directory never lands on /etc (where it would replace the generated passwd)."""
    img = named.refs["img"]
    src = Path(tempfile.mkdtemp(prefix="oci-named-src-", dir="/tmp"))
    os.chmod(src, 0o755)
    (src / "passwd").write_text("root::0:0:evil:/:/bin/sh\n")
    os.chmod(src / "passwd", 0o644)
    job, text = named.run_job(f"""
srun --oci-image={img} --oci-name=env busybox ln -s ../../../etc {DATA}/mnt
echo "bind:"
srun --oci-name=env --oci-mounts={src}:{DATA}/mnt cat /etc/passwd
echo "after:"
srun --oci-name=env sh -c 'busybox readlink {DATA}/mnt; grep -c evil /etc/passwd; true'
""")
    one_error_line(section(text, "bind:", "after:"))
    assert "evil:" not in text, text
    assert section(text, "after:").split()[-2:] == ["../../../etc", "0"], text
    named.wait_removed("n1", job)


def test_a_fifo_planted_at_a_mount_point_fails_the_step_at_once(named):
    """A file mount point a task replaced by a FIFO: the builder's open does not wait for a
    reader (it would hold the step for the builder's whole timeout)."""
    img = named.refs["img"]
    src = Path(tempfile.mkdtemp(prefix="oci-named-src-", dir="/tmp"))
    os.chmod(src, 0o755)
    (src / "f").write_text("host file\n")
    os.chmod(src / "f", 0o644)
    job, out, _go = named.submit(f"""
srun --oci-image={img} --oci-name=env busybox mkfifo {DATA}/f
echo "bind:"
srun --oci-name=env --oci-mounts={src}/f:{DATA}/f cat {DATA}/f
""")
    t0 = time.monotonic()
    named.wait_gone(job)
    assert time.monotonic() - t0 < 30
    text = out.read_text()
    one_error_line(section(text, "bind:"))
    assert "host file" not in text, text
    named.wait_removed("n1", job)


def test_a_container_made_with_remap_root_keeps_roots_changes(named):
    """pyxis' apt-get-then-run: step 1 is root in it and installs, step 2 (the name alone,
    as the user) finds the files, the user's on the host; remap-root on a container made
    without it is one line (its image's files stay the host root's)."""
    img = named.refs["img"]
    body = f"""
srun -N1 -n1 -w n2 --oci-image={img} --oci-name=sys --container-remap-root sh -c 'id -u; echo pkg > /etc/installed && chown 0:0 /etc/installed && echo ok'
srun -N1 -n1 -w n2 --oci-name=sys sh -c 'id -u; cat /etc/installed'
echo "remap on a plain one:"
srun -N1 -n1 -w n2 --oci-image={img} --oci-name=plain true
srun -N1 -n1 -w n2 --oci-name=plain --oci-remap-root true
"""
    job, text = named.run_job(body, nodes="n2")
    user = pwd.getpwnam(named.cluster.user)
    out = [l for l in text.splitlines() if not l.startswith("oci-image: note:")]
    assert out[:4] == ["0", "ok", str(user.pw_uid), "pkg"], text
    line = one_error_line(section(text, "remap on a plain one:"))
    assert ("--oci-remap-root: container plain was made without it (its image's files stay "
            "root's)") in line, line
    named.wait_removed("n2", job)  # the idmapped image mount went with it


def test_a_job_has_at_most_the_sites_number_of_containers(named):
    """Each named container is a host mount copied into every later step: a job making
    thousands would grow every step's mount table on the node (containers_per_job = 3 here)."""
    img = named.refs["img"]
    body = "".join(f"srun -N1 -n1 -w n2 --oci-image={img} --oci-name=c{i} true && echo made-c{i}\n"
                   for i in range(4))
    job, text = named.run_job(body, nodes="n2")
    assert [l for l in text.splitlines() if l.startswith("made-")] == ["made-c0", "made-c1",
                                                                        "made-c2"], text
    line = one_error_line(text)
    assert (f"--oci-name=c3: job {job} has 3 named containers on node n2, the site's limit "
            f"(containers_per_job); reuse one of them") in line, line
