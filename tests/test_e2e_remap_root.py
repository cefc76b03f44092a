"""`--oci-remap-root` (and pyxis' `--container-remap-root`): uid 0 inside the container
through a user namespace that maps only the user, over a writable layer; no privilege on
the host. On a real 2-node cluster with the real plugin, step client and daemons, as the
test user; every attack is one the user could try from inside.

How it works (runtime/nsbuild.py): the namespace builder has a child with the user's
credentials make the user namespace (so the kernel's own limits apply), maps 0 to the user
only, denies setgroups, and lays the image under the overlay through an idmapped mount
(the image's root-owned files are the user's, root inside); the tasks join the user
namespace as the user in task_init (plugin/task.c).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cluster_fixture import cluster_available
from daemon_proc import DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import start_site, stop_site
from ocibuild import Pusher
from stepclient import options, plugstack, run_step
from test_security import ensure_user

needs_cluster = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))

SECRET = "ROOT-ONLY-SECRET"
OTHER = "ociremapvictim"


@pytest.fixture(scope="module")
def rr(registry, installed):
    if cluster_available() is not None:
        pytest.skip(str(cluster_available()))
    site = start_site(installed, "oci-e2e-rr-", nodes=2, plugstack_args="pyxis_aliases=yes")
    try:
        Pusher(registry.url).image("e2e-rr/app", "v1", busybox_layers(os_id="remap"),
                                   config=IMAGE_CONFIG)
        site.ref = f"{registry.host}/e2e-rr/app:v1"
        site.user = pwd.getpwnam(site.cluster.user)

        def srun(*args, timeout=60):
            return site.cluster.run_as_user(["srun", *args], cwd="/tmp", timeout=timeout)
        site.srun = srun
        yield site
    finally:
        stop_site(site)


@pytest.fixture
def scratch(rr):
    """A directory of the user's, and next to it root's files the user may not touch."""
    d = Path(tempfile.mkdtemp(prefix="oci-rr-", dir="/tmp"))
    os.chmod(d, 0o755)
    mine = d / "mine"
    mine.mkdir()
    os.chown(mine, rr.user.pw_uid, rr.user.pw_gid)
    (d / "rootonly").write_text(SECRET + "\n")
    os.chmod(d / "rootonly", 0o600)
    (d / "rootfile").write_text("root's\n")
    os.chmod(d / "rootfile", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@needs_cluster
def test_root_inside_and_files_on_a_bind_belong_to_the_user(rr, scratch):
    r = rr.srun("-N2", f"--oci-image={rr.ref}", "--oci-remap-root",
                f"--oci-mounts={scratch}/mine:/work", "sh", "-c",
                'id -u; id -g; id -un; cat /proc/self/setgroups; '
                'echo made > /work/by-root-$SLURM_NODEID')
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n").count("0") == 4, r.stdout  # uid and gid 0 on both nodes
    assert r.stdout.count("root\n") == 2 and r.stdout.count("deny\n") == 2, r.stdout
    for node in ("0", "1"):
        st = os.stat(scratch / "mine" / f"by-root-{node}")
        assert (st.st_uid, st.st_gid) == (rr.user.pw_uid, rr.user.pw_gid)
    # without it: the user, as always
    r = rr.srun("-N1", f"--oci-image={rr.ref}", "id", "-u")
    assert r.returncode == 0 and r.stdout.strip() == str(rr.user.pw_uid), r.stderr


@needs_cluster
def test_the_image_is_roots_to_change_in_a_layer_of_the_step(rr):
    r = rr.srun("-N1", f"--oci-image={rr.ref}", "--container-remap-root", "sh", "-c",
                "stat -c '%u %U' /etc/os-release; echo ID=changed > /etc/os-release; "
                "mkdir /opt/new && echo x > /opt/new/f && chown 0:0 /opt/new/f && "
                "cat /etc/os-release && ls -ld / | cut -c1-10")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "0 root"                     # the image's root-owned files: root's here
    assert lines[1] == "ID=changed" and lines[2].startswith("drwx"), r.stdout
    # the layer was the step's: the next step has the image as it is
    r = rr.srun("-N1", f"--oci-image={rr.ref}", "--oci-remap-root", "sh", "-c",
                "grep ^ID= /etc/os-release; test -e /opt/new && echo leaked || echo clean")
    assert r.returncode == 0 and r.stdout == "ID=remap\nclean\n", (r.stdout, r.stderr)


@needs_cluster
def test_root_inside_is_no_privilege_on_the_host(rr, scratch):
    """Each command would succeed for the host's root; each must fail for the user's."""
    victim = ensure_user(OTHER)
    sleeper = subprocess.Popen(["runuser", "-u", OTHER, "--", "sleep", "120"])
    mine = scratch / "mine"
    (mine / "file").write_text("mine\n")
    os.chown(mine / "file", rr.user.pw_uid, rr.user.pw_gid)
    try:
        time.sleep(0.3)
        attacks = {
            "read": "cat /host/rootonly",
            "write": "echo x >> /host/rootfile",
            "chown": f"chown {victim.pw_uid} /work/file",
            "mount": "mount -t tmpfs none /mnt",
            "kill": f"kill -9 {sleeper.pid}",
            "proc-root": "ls /proc/1/root/",
            "mknod": "mknod /tmp/sda b 8 0",
            "hostname": "hostname pwned",
        }
        script = "; ".join(f'{cmd} >/dev/null 2>&1 && echo "{name}=ok" || echo "{name}=refused"'
                           for name, cmd in attacks.items())
        r = rr.srun("-N1", f"--oci-image={rr.ref}", "--oci-remap-root",
                    f"--oci-mounts={scratch}:/host,{mine}:/work", "sh", "-c",
                    "id -u; " + script)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "0"  # it really was root inside
        assert lines[1:] == [f"{n}=refused" for n in attacks], r.stdout
        assert sleeper.poll() is None  # the other user's process lives
        assert (scratch / "rootfile").read_text() == "root's\n"
        assert os.stat(mine / "file").st_uid == rr.user.pw_uid
        assert not os.path.exists("/mnt/pwned")
        assert os.uname().nodename != "pwned"
        # control: what the user may do, root inside may do too
        r = rr.srun("-N1", f"--oci-image={rr.ref}", "--oci-remap-root",
                    f"--oci-mounts={mine}:/work", "sh", "-c",
                    "chown 0:0 /work/file && chmod 600 /work/file && cat /work/file")
        assert r.returncode == 0 and r.stdout == "mine\n", r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_cluster
def test_the_namespace_holder_is_out_of_roots_reach(rr):
    """The holder keeps the user namespace open but never joins it: root in there may not
    signal or ptrace it (a root process the user could ptrace would be the host's root)."""
    r = rr.srun("-N1", "-w", "n1", f"--oci-image={rr.ref}", "--oci-remap-root", "sh", "-c",
                "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = oci-ns-holder ] "
                "&& echo ${p#/proc/}; done; true")
    assert r.returncode == 0, r.stderr
    holders = r.stdout.split()
    assert holders, "no holder seen from inside"
    r = rr.srun("-N1", "-w", "n1", f"--oci-image={rr.ref}", "--oci-remap-root", "sh", "-c",
                "; ".join(f"kill -STOP {p} 2>/dev/null && echo {p}=stopped || echo {p}=refused; "
                          f"cat /proc/{p}/environ >/dev/null 2>&1 && echo {p}=read || "
                          f"echo {p}=unreadable" for p in holders))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(
        [f"{p}=refused" for p in holders] + [f"{p}=unreadable" for p in holders]), r.stdout


# unshare(CLONE_NEWUSER) fails with ENOSPC, as under user.max_user_namespaces=0; everything
# else passes. (That sysctl is the real switch, but it is global and needs CAP_SYS_RESOURCE,
# which this test machine's root lacks; the filter sits in front of the real kernel.)
DENY_USERNS_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_unshare, 0, 3),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
		BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_NEWUSER, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSPC),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(f) / sizeof(f[0]), f };
	if (argc < 2 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
		return perror("seccomp"), 127;
	execv(argv[1], argv + 1);
	return perror("execv"), 127;
}
"""


class _DeniedDaemon(DaemonProcess):
    """A node's daemon whose every descendant the kernel refuses a user namespace."""

    def __init__(self, wrapper, *a, **kw):
        super().__init__(*a, **kw)
        self.wrapper = wrapper

    def argv(self):
        return [str(self.wrapper)] + super().argv()


@needs_cluster
def test_refused_where_the_node_disables_user_namespaces(rr, tmp_path):
    wrapper = tmp_path / "deny-userns"
    (tmp_path / "deny.c").write_text(DENY_USERNS_C)
    subprocess.run(["gcc", "-O2", "-o", str(wrapper), str(tmp_path / "deny.c")], check=True)
    os.chmod(tmp_path, 0o755)
    n2 = rr.daemons[1]
    n2.stop()
    rr.daemons[1] = _DeniedDaemon(wrapper, rr.base, rr.cache, node="n2",
                                  extra=["--config", str(rr.conf)]).start()
    try:
        r = rr.srun("-N1", "-w", "n2", f"--oci-image={rr.ref}", "--oci-remap-root", "id", "-u")
        assert r.returncode != 0 and r.stdout == ""
        lines = [l for l in r.stderr.splitlines() if "does not allow user namespaces" in l]
        assert lines == ["oci-image: error: --oci-remap-root: this node does not allow user "
                         "namespaces (user.max_user_namespaces is 0 or reached): ask the site's "
                         "admins, or run without --oci-remap-root"], r.stderr
        assert "Traceback" not in r.stderr
        # the node is fine for everything else
        r = rr.srun("-N1", "-w", "n2", f"--oci-image={rr.ref}", "id", "-u")
        assert r.returncode == 0 and r.stdout.strip() == str(rr.user.pw_uid), r.stderr
    finally:
        rr.daemons[1].stop()
        rr.daemons[1] = DaemonProcess(rr.base, rr.cache, node="n2",
                                      extra=["--config", str(rr.conf)]).start()
    r = rr.srun("-N1", "-w", "n2", f"--oci-image={rr.ref}", "--oci-remap-root", "id", "-u")
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr


@needs_cluster
def test_refused_where_the_users_own_context_may_not_have_one(rr, tmp_path):
    """The daemon makes the user namespace, so an LSM's or a seccomp filter's refusal that
    applies to the job (not to the daemon) must still stop it: each task checks in its own
    context first. Here n2's slurmd, and so every job on n2, runs under the filter."""
    wrapper = tmp_path / "deny-userns"
    (tmp_path / "deny.c").write_text(DENY_USERNS_C)
    subprocess.run(["gcc", "-O2", "-o", str(wrapper), str(tmp_path / "deny.c")], check=True)
    os.chmod(tmp_path, 0o755)
    rr.cluster.restart_slurmd("n2", [str(wrapper)])
    try:
        r = rr.srun("-N1", "-w", "n2", f"--oci-image={rr.ref}", "--oci-remap-root", "id", "-u")
        assert r.returncode != 0 and r.stdout == ""
        lines = [l for l in r.stderr.splitlines() if "may not have user namespaces" in l]
        assert len(lines) == 1 and lines[0].endswith(
            "oci-image: --oci-remap-root: you may not have user namespaces here (No space left "
            "on device): run without it"), r.stderr
        r = rr.srun("-N1", "-w", "n2", f"--oci-image={rr.ref}", "id", "-u")
        assert r.returncode == 0 and r.stdout.strip() == str(rr.user.pw_uid), r.stderr
    finally:
        rr.cluster.restart_slurmd("n2")
    r = rr.srun("-N1", "-w", "n2", f"--oci-image={rr.ref}", "--oci-remap-root", "id", "-u")
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr


def test_site_may_switch_it_off_at_submit(installed):
    """plugstack allow_remap_root=no: submit refuses it, before anything is pinned."""
    r = run_step([str(installed.step_client), "submit",
                  *plugstack(f"step_client={installed.step_client}", "allow_remap_root=no",
                             "prefetch_socket=none"),
                  *options(oci_image="localhost:1/x:1", oci_remap_root="")],
                 env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.records == [], r.stderr
    assert r.stderr.strip().splitlines() == [
        "oci-image: error: --oci-remap-root: this site does not allow it (plugstack.conf "
        "allow_remap_root=no); run without it"]
    # the variable is the option too
    r = run_step([str(installed.step_client), "submit",
                  *plugstack(f"step_client={installed.step_client}", "allow_remap_root=no",
                             "prefetch_socket=none"),
                  *options(oci_image="localhost:1/x:1")],
                 env={"PATH": "/usr/bin:/bin", "OCI_REMAP_ROOT": "1"})
    assert r.returncode == 2 and "allow_remap_root=no" in r.stderr, r.stderr
