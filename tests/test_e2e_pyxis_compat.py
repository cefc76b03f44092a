"""pyxis-style jobs end to end, and the ways into a job besides a plain srun: a real 2-node
Slurm with the real plugin (plugstack `pyxis_aliases=yes`), step client and daemons, the
real registry; every command runs as the ordinary test user.

- `--container-mounts` with pyxis' '+'-joined flags and `tmpfs:DST` items, and its refusals
- `salloc --oci-image=REF srun ...`: the allocation's steps run in the image
- `--oci-batch-in-image` and plugstack `batch_in_image=yes`: the batch script itself runs in
  the image (and without them on the host)
- `srun --chdir=DIR` in the container
- `--oci-entrypoint` with `srun --multi-prog`: refused at submit
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cluster_fixture import cluster_available
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import start_site, stop_site

pytestmark = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))

HOST_ID = [l for l in Path("/etc/os-release").read_text().splitlines() if l.startswith("ID=")][0]


@pytest.fixture(scope="module")
def site(registry, installed):
    from images import IMAGE_CONFIG, busybox_layers
    from ocibuild import Pusher
    s = start_site(installed, "oci-e2e-pyx-", nodes=2, plugstack_args="pyxis_aliases=yes")
    try:
        Pusher(registry.url).image("e2e-pyx/img", "v1", busybox_layers(os_id="pyximg"),
                                   config=IMAGE_CONFIG)
        s.ref = f"{registry.host}/e2e-pyx/img:v1"
        s.work = Path(tempfile.mkdtemp(prefix="oci-e2e-pyx-work-", dir="/var/tmp"))
        os.chmod(s.work, 0o777)
        yield s
    finally:
        stop_site(s)
        shutil.rmtree(getattr(s, "work", "/nonexistent"), ignore_errors=True)


def run(site, *argv, cwd="/tmp", timeout=120):
    return site.cluster.run_as_user(list(argv), cwd=cwd, timeout=timeout)


def one_line_error(r, words):
    """The command failed with exactly one line of ours naming the problem."""
    ours = [l for l in r.stderr.splitlines() if "oci-image: error: " in l]
    assert r.returncode != 0 and len(ours) == 1 and words in ours[0], r.stderr
    assert "Traceback" not in r.stderr


def wait_gone(site, job, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True,
                             env=site.cluster.env()).stdout.strip()
        if not out:
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job} still queued after {timeout}s")


def sbatch(site, body, *options):
    """A batch script run to its end; its output."""
    d = Path(tempfile.mkdtemp(prefix="job-", dir=site.work))
    os.chmod(d, 0o777)
    script = d / "job.sh"
    script.write_text("#!/bin/sh\n" + body)
    os.chmod(script, 0o755)
    r = run(site, "sbatch", "--parsable", "-o", str(d / "out"), *options, str(script), cwd=str(d))
    assert r.returncode == 0, r.stderr
    wait_gone(site, r.stdout.strip().split(";")[0])
    # without what srun's stderr adds there (our note: the job's directory is not in the image)
    return "".join(l for l in (d / "out").read_text().splitlines(True)
                   if not l.startswith("oci-image: note: "))


# ---- pyxis' --container-mounts -------------------------------------------------------

def test_pyxis_style_command_with_flags_and_tmpfs(site):
    data = site.work / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    os.chmod(data, 0o755)
    mounts = f"{data}:/data:ro+rprivate,{data}:/data-rw:rbind+x-create=dir,tmpfs:/scratch:size=8m"
    r = run(site, "srun", "-N2", f"--container-image={site.ref}", f"--container-mounts={mounts}",
            "sh", "-c", "cat /data/in.txt; touch /data/x 2>&1 | grep -c Read-only; "
                        "echo t > /scratch/t && cat /scratch/t; stat -c %a:%u /scratch; "
                        "grep ' /scratch ' /proc/self/mounts | grep -c 'nosuid,nodev'")
    assert r.returncode == 0, r.stderr
    uid = site.cluster.uid
    # two nodes' lines, interleaved
    assert sorted(r.stdout.splitlines()) == sorted(["from the host", "1", "t", f"700:{uid}",
                                                    "1"] * 2), r.stdout
    assert sorted(os.listdir(data)) == ["in.txt"]  # the tmpfs and the ro bind left nothing


def test_tmpfs_in_oci_mounts_with_mode_and_noexec(site):
    r = run(site, "srun", "-N1", f"--oci-image={site.ref}",
            "--oci-mounts=tmpfs:/tmp/w:mode=1777+noexec",
            "sh", "-c", "stat -c %a /tmp/w; cp /bin/busybox /tmp/w/b && /tmp/w/b true; echo $?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1777", "126"], (r.stdout, r.stderr)


def test_tmpfs_with_remap_root_is_roots_inside(site):
    """With --oci-remap-root the user is 0 inside: their tmpfs shows as root's, writable."""
    r = run(site, "srun", "-N1", f"--oci-image={site.ref}", "--oci-remap-root",
            "--oci-mounts=tmpfs:/scratch", "sh", "-c",
            "id -u; stat -c %u:%a /scratch; echo x > /scratch/f && cat /scratch/f")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["0", "0:700", "x"], (r.stdout, r.stderr)


@pytest.mark.parametrize("mounts, words", [
    ("/tmp:/x:ro+rslave", "mount flag 'rslave': binds are private"),
    ("/tmp:/x:bind", "mount flag 'bind': every bind here is recursive"),
    ("tmpfs:/x:uid=0", "mount flag 'uid=0': not supported; a tmpfs takes size="),
    ("tmpfs:/x:size=1t", "size= must be a number of bytes"),
    ("umount:/etc", "umount: sources have no equivalent"),
    ("./rel:/x", "must be an absolute path"),
])
def test_refused_at_submit_in_one_line(site, mounts, words):
    r = run(site, "srun", "-N1", f"--container-image={site.ref}", f"--container-mounts={mounts}",
            "true")
    one_line_error(r, words)
    assert "--container-mounts" in r.stderr or "--oci-mounts" in r.stderr


def test_tmpfs_through_a_symlink_of_the_users_is_resolved_in_the_container(site):
    """The user's own symlink in their home, to /etc: the target is resolved in the
    container (its /etc, guarded), never followed on the host."""
    home = Path(site.cluster.home)
    link = home / "pyx-link"
    run(site, "ln", "-sfn", "/etc", str(link))
    try:
        r = run(site, "srun", "-N1", f"--oci-image={site.ref}", f"--oci-mounts=tmpfs:{link}",
                "true")
        one_line_error(r, f"mount tmpfs:{link}: cannot mount over /etc/passwd")
        run(site, "ln", "-sfn", "/opt/app", str(link))  # into the image: a tmpfs there, in here only
        r = run(site, "srun", "-N1", f"--oci-image={site.ref}", f"--oci-mounts=tmpfs:{link}",
                "sh", "-c", "ls -A /opt/app; stat -c %U /opt/app")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [site.cluster.user], r.stdout
    finally:
        run(site, "rm", "-f", str(link))


# ---- salloc ---------------------------------------------------------------------------

def test_salloc_steps_run_in_the_image(site):
    r = run(site, "salloc", "-N2", f"--oci-image={site.ref}", "srun", "-N2", "grep", "^ID=",
            "/etc/os-release")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ID=pyximg"] * 2, (r.stdout, r.stderr)


def test_salloc_with_a_bad_option_is_refused_before_the_allocation(site):
    r = run(site, "salloc", "-N1", f"--oci-image={site.ref}", "--oci-mounts=/tmp:/x:rslave",
            "true")
    one_line_error(r, "mount flag 'rslave'")
    assert "Granted job allocation" not in r.stderr


# ---- the batch script in the image ------------------------------------------------------

BATCH = ('grep ^ID= /etc/os-release | sed "s/^/script /"\n'
         'command -v srun >/dev/null && srun -N1 grep ^ID= /etc/os-release || echo no-srun\n')


def test_batch_script_on_the_host_by_default(site):
    out = sbatch(site, BATCH, f"--oci-image={site.ref}")
    assert out.splitlines() == [f"script {HOST_ID}", "ID=pyximg"], out


def test_sbatch_flags_reach_the_jobs_sruns(site):
    """sbatch's flag options reach every srun of the job again (Slurm passes them with a
    value there): --oci-writable here (the root writable: root's directory refuses the
    user, where the read-only image says so)."""
    body = "srun -N1 touch /new-file 2>&1 | grep -o 'Permission denied\\|Read-only file system'\n"
    out = sbatch(site, body, f"--oci-image={site.ref}", "--oci-writable")
    assert out.splitlines() == ["Permission denied"], out
    out = sbatch(site, body, f"--oci-image={site.ref}")
    assert out.splitlines() == ["Read-only file system"], out


def test_oci_batch_in_image_runs_the_script_in_the_image(site):
    out = sbatch(site, BATCH, f"--oci-image={site.ref}", "--oci-batch-in-image")
    # in the image: its os-release, and no srun there (as with pyxis)
    assert out.splitlines() == ["script ID=pyximg", "no-srun"], out


# ---- srun --chdir -----------------------------------------------------------------------

def test_chdir_into_a_directory_of_the_image(site):
    r = run(site, "srun", "-N2", "--chdir=/etc", f"--oci-image={site.ref}", "pwd")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/etc"] * 2, (r.stdout, r.stderr)


def test_slurm_working_dir_is_srun_chdir_too(site):
    """srun takes SLURM_WORKING_DIR as -D when its command line has none."""
    r = run(site, "env", "SLURM_WORKING_DIR=/etc", "srun", "-N1", f"--oci-image={site.ref}",
            "pwd")
    assert r.returncode == 0 and r.stdout == "/etc\n", (r.stdout, r.stderr)


def test_chdir_into_a_bound_directory(site):
    d = site.work / "bound"
    (d / "sub").mkdir(parents=True)
    os.chmod(d, 0o777)
    os.chmod(d / "sub", 0o777)
    r = run(site, "srun", "-N1", "-D", f"{d}/sub", f"--oci-image={site.ref}",
            f"--oci-mounts={d}", "sh", "-c", "pwd; touch here")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"{d}/sub"], (r.stdout, r.stderr)
    assert (d / "sub" / "here").exists()


def test_chdir_missing_in_the_container(site):
    d = site.work / "host-only"
    d.mkdir()
    os.chmod(d, 0o777)
    r = run(site, "srun", "-N1", f"--chdir={d}", f"--oci-image={site.ref}", "pwd")
    one_line_error(r, f"srun --chdir={d}: no such directory in the container "
                      f"(--oci-mounts={d} brings the host's in")
    assert r.stdout == "" and "couldn't chdir" not in r.stderr
    # without --chdir, srun's own directory missing there: the tasks start in the image's
    r = run(site, "srun", "-N1", f"--oci-image={site.ref}", "pwd", cwd=str(d))
    assert r.returncode == 0 and r.stdout == "/opt/app\n", r.stderr


# ---- --multi-prog -----------------------------------------------------------------------

def test_multi_prog_with_entrypoint_refused_at_submit(site):
    conf = site.work / "multi.conf"
    conf.write_text("0 echo zero\n* echo other\n")
    os.chmod(conf, 0o644)
    r = run(site, "srun", "-n2", f"--oci-image={site.ref}", "--oci-entrypoint", "-l",
            "--multi-prog", str(conf))
    one_line_error(r, "cannot be used with srun --multi-prog")
    # without the entrypoint, --multi-prog runs in the image
    r = run(site, "srun", "-n2", "-N1", f"--oci-image={site.ref}", "--multi-prog", str(conf))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == ["other", "zero"], r.stderr
    # the command's own --multi-prog is not srun's
    r = run(site, "srun", "-N1", f"--oci-image={site.ref}", "--oci-entrypoint", "x",
            "--multi-prog")
    assert r.returncode == 0 and r.stdout == "hello from the image x --multi-prog\n", r.stderr


def test_multi_prog_with_entrypoint_refused_inside_a_job(site):
    conf = site.work / "multi2.conf"
    conf.write_text("* echo task\n")
    os.chmod(conf, 0o644)
    out = sbatch(site, f"srun -n1 --multi-prog {conf} 2>&1; echo rc=$?\n",
                 f"--oci-image={site.ref}", "--oci-entrypoint")
    lines = [l for l in out.splitlines() if "oci-image: error: " in l]
    assert len(lines) == 1 and "cannot be used with srun --multi-prog" in lines[0], out
    assert out.splitlines()[-1] == "rc=1" and "task" not in out.splitlines(), out


# ---- plugstack batch_in_image=yes (last: it changes the site's plugstack) -----------------

def test_plugstack_batch_in_image(site):
    site.cluster.set_plugstack(site.plugstack.rstrip("\n") + " batch_in_image=yes\n")
    try:
        out = sbatch(site, BATCH, f"--oci-image={site.ref}")
        assert out.splitlines() == ["script ID=pyximg", "no-srun"], out
        # a batch job without an image stays on the host
        out = sbatch(site, 'grep ^ID= /etc/os-release | sed "s/^/script /"\n')
        assert out.splitlines() == [f"script {HOST_ID}"], out
    finally:
        site.cluster.set_plugstack(site.plugstack)
