"""Issue 9 end to end: the pyxis importer run exactly as pyxis runs it, pyxis option
aliases in the plugin, step hooks (a hook the task sees, a failing hook), and an MPI program from an image under
`srun --mpi=pmi2` on 2 nodes. Real 2-node Slurm, real daemons, real registry."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cluster_fixture import as_user, cluster_available
from localsite import start_site, stop_site
from install_fixture import installed  # noqa: F401 - a fixture
from images import IMAGE_CONFIG, busybox_layers
from ocibuild import Entry, Pusher

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "hooks"

pytestmark = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))

# what pyxis leaves out of the job environment it gives the importer (pyxis_slurmstepd.c)
PYXIS_DENY = ("PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "SLURM_PROCID", "SLURM_LOCALID",
              "SLURM_TASK_PID", "PMIX_RANK", "PMI_FD")


class Env:
    def __init__(self, base, cluster, daemons, registry, installed, hooks_dir, conf, plugstack):
        self.base, self.cluster, self.daemons, self.registry = base, cluster, daemons, registry
        self.installed, self.hooks_dir, self.conf, self.plugstack = (installed, hooks_dir, conf,
                                                                     plugstack)
        self.cache = base / "cache"
        self.pusher = Pusher(registry.url)

    def push(self, repo, layers=None, config=IMAGE_CONFIG, tag="v1"):
        self.pusher.image(repo, tag, layers or busybox_layers(os_id=repo.replace("/", "-")),
                          config=config)
        return f"{self.registry.host}/{repo}:{tag}"

    def srun(self, *args, env=None, timeout=120):
        argv = ["srun", *args]
        if env:
            argv = ["env", *[f"{k}={v}" for k, v in env.items()], *argv]
        return self.cluster.run_as_user(argv, cwd="/tmp", timeout=timeout)

    def hook(self, name, text):
        p = self.hooks_dir / name
        p.write_text(text)
        os.chmod(p, 0o755)
        return p

    def clear_hooks(self):
        for p in self.hooks_dir.iterdir():
            p.unlink()

    def leftovers(self):
        mounts = [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                  if l.split()[4].startswith(str(self.base)) and "/fake" not in l.split()[4]]
        steps = [p for d in self.daemons for p in (d.runtime_dir / "steps").glob("*")]
        return mounts, steps

    def wait_clean(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(self.leftovers()):
            time.sleep(0.25)
        assert not any(self.leftovers()), self.leftovers()


@pytest.fixture(scope="module")
def e2e(registry, installed):
    def conf(base):
        (base / "hooks.d").mkdir(mode=0o755)
        return (f"[daemon]\nmount_idle = 1\nhooks_dir = {base / 'hooks.d'}\nhooks_timeout = 20\n"
                f"socket = {base}/n1/oci-imaged.sock\n[cache]\nlease_ttl = 60\n"
                f"dir = {base}/cache\n")

    site = start_site(installed, "oci-e2e-p9-", nodes=2, plugstack_args="pyxis_aliases=yes",
                      daemon_conf=conf)
    try:
        yield Env(site.base, site.cluster, site.daemons, registry, installed,
                  site.base / "hooks.d", site.conf, site.plugstack)
    finally:
        stop_site(site)


# ---- the pyxis importer -----------------------------------------------------------------

def _pyxis_env(e2e) -> dict:
    """The environment pyxis gives its importer: PATH from slurmstepd, the job's environment
    minus pyxis' deny list, PYXIS_RUNTIME_PATH and PYXIS_VERSION. The job environment is
    taken from a real step of the test user (with the site config named in it)."""
    r = e2e.srun("-N1", "env", "-0", env={"OCI_IMAGE_CONFIG": str(e2e.conf)})
    assert r.returncode == 0, r.stderr
    job = dict(kv.split("=", 1) for kv in r.stdout.split("\0") if "=" in kv)
    env = {k: v for k, v in job.items() if k not in PYXIS_DENY and not k.startswith("ENROOT_")}
    env.update(PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               PYXIS_RUNTIME_PATH="/run/pyxis", PYXIS_VERSION="0.21.0")
    assert env["SLURM_JOB_UID"] == str(e2e.cluster.uid) and "SLURM_STEP_ID" in env
    return env


def _importer(e2e, env, *args, as_root=False):
    argv = [str(e2e.installed.bin / "oci-image-pyxis-importer"), *args]
    if not as_root:
        argv = as_user(argv, e2e.cluster.uid, e2e.cluster.gid)
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120, cwd="/")


def test_pyxis_importer_contract(e2e):
    e2e.push("p9/imported")
    env = _pyxis_env(e2e)
    uri = f"docker://{e2e.registry.host}#p9/imported:v1"        # pyxis' enroot URI form
    r = _importer(e2e, env, "get", uri)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    path = Path(r.stdout.strip())
    # the shared cache is root's alone: the user gets a private copy of their own
    # (made from a descriptor the daemon passed after the registry access check)
    assert path.is_absolute() and path.suffix == ".sqfs"
    assert path.parent == Path(f"/tmp/oci-image-pyxis.{e2e.cluster.uid}")
    assert path.stat().st_uid == e2e.cluster.uid and (path.stat().st_mode & 0o777) == 0o600
    # enroot create reads it as the user
    head = subprocess.run(as_user(["head", "-c", "4", str(path)], e2e.cluster.uid,
                                  e2e.cluster.gid), capture_output=True)
    assert head.stdout == b"hsqs"
    digest = path.name.split(".")[2]
    cached = [p for p in (e2e.cache / "images").glob(f"sha256-{digest}*.sqfs")]
    assert len(cached) == 1 and cached[0].read_bytes() == path.read_bytes()
    # converted once: a second get is a cache hit, same file
    r2 = _importer(e2e, env, "get", uri)
    assert r2.returncode == 0 and r2.stdout == r.stdout, r2.stderr
    # release: idempotent, nothing on stdout, called twice as pyxis does
    for _ in range(2):
        rel = _importer(e2e, env, "release")
        assert rel.returncode == 0 and rel.stdout == "", rel.stderr
    assert not path.exists()     # the step's copy is gone ...
    assert cached[0].exists()    # ... the shared cache entry is not the user's to delete
    # as root (an admin, a prolog): the daemon pulls with the job user's credentials and
    # root reads the cache itself
    root_env = dict(env, OCI_IMAGE_CONFIG=str(e2e.conf))
    rr = _importer(e2e, root_env, "get", uri, as_root=True)
    assert rr.returncode == 0 and rr.stdout == f"{cached[0]}\n", rr.stderr
    # failures: non-zero exit, one line on stderr, nothing on stdout
    for bad, why in ((f"docker://{e2e.registry.host}#p9/nothere:v1", "not found"),
                     ("dockerd://busybox", "not supported")):
        rb = _importer(e2e, env, "get", bad)
        assert rb.returncode != 0 and rb.stdout == "", rb
        assert why in rb.stderr.lower() and "Traceback" not in rb.stderr, rb.stderr


def test_enroot_uri_translation():
    from ociimage.pyxis_importer import enroot_uri_to_reference as t
    assert t("docker://nvcr.io#nvidia/pytorch:24.05-py3") == "nvcr.io/nvidia/pytorch:24.05-py3"
    assert t("docker://ubuntu:24.04") == "ubuntu:24.04"
    assert t("docker://alice@reg.example:5000#a/b:1") == "reg.example:5000/a/b:1"
    assert t("docker://ubuntu@sha256:" + "a" * 64) == "ubuntu@sha256:" + "a" * 64
    assert t("ubuntu") == "ubuntu"


# ---- pyxis option aliases ---------------------------------------------------------------

def test_pyxis_aliases(e2e, tmp_path):
    ref = e2e.push("p9/alias")
    host, _, rest = ref.partition("/")
    data = Path(tempfile.mkdtemp(prefix="oci-p9-data-", dir="/tmp"))
    os.chmod(data, 0o777)
    (data / "in.txt").write_text("host data\n")
    try:
        r = e2e.srun("-N1", f"--container-image={host}#{rest}", f"--container-mounts={data}:/data",
                     "--container-workdir=/data", "--container-writable", "--no-container-mount-home",
                     "sh", "-c", "grep ^ID= /etc/os-release; pwd; cat in.txt; "
                     "echo w > /opt/app/data/new && echo writable")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:4] == ["ID=p9-alias", "/data", "host data", "writable"]
        r = e2e.srun("-N1", f"--container-image={ref}", "--container-entrypoint", "a")
        assert r.returncode == 0 and r.stdout == "hello from the image a\n", r.stderr
        r = e2e.srun("-N1", f"--container-image={ref}", "--container-env=IMAGE_VAR", "sh", "-c",
                     'echo "$IMAGE_VAR"', env={"IMAGE_VAR": "host"})
        assert r.stdout == "host\n", r.stderr
    finally:
        shutil.rmtree(data)


FAKE_PYXIS = r"""
#include <stddef.h>
#include <slurm/spank.h>
SPANK_PLUGIN(pyxis, 1)
static int cb(int v, const char *a, int r) { (void)v; (void)a; (void)r; return 0; }
struct spank_option spank_options[] = {
  { "container-image", "IMG", "FAKE-PYXIS image option", 1, 0, cb },
  SPANK_OPTIONS_TABLE_END
};
int slurm_spank_init(spank_t sp, int ac, char **av) { (void)sp; (void)ac; (void)av; return 0; }
"""


def test_aliases_off_by_default_and_refused_next_to_pyxis(e2e):
    c = e2e.cluster
    fake = e2e.base / "spank_pyxis.so"
    src = e2e.base / "fake_pyxis.c"
    src.write_text(FAKE_PYXIS)
    r = subprocess.run(["cc", "-shared", "-fPIC", "-o", str(fake), str(src)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    os.chmod(fake, 0o755)
    try:
        c.set_plugstack(e2e.plugstack.replace(" pyxis_aliases=yes", ""))
        c.reconfigure()
        r = e2e.srun("--help")
        assert "--oci-image" in r.stdout and "--container-image" not in r.stdout
        r = e2e.srun("-N1", "--container-image=busybox", "true")
        assert r.returncode != 0 and "container-image" in r.stderr
        # pyxis loaded (listed after us: slurm loads every plugin before any init)
        c.set_plugstack(e2e.plugstack + f"optional {fake}\n")
        c.reconfigure()
        r = e2e.srun("--help")
        assert "FAKE-PYXIS" in r.stdout and "Alias of --oci-image" not in r.stdout, r.stdout
        log = "\n".join(c.node_log(n).read_text() for n in c.node_names)
        print("slurmd logged the refusal:", "pyxis_aliases=yes ignored: pyxis is loaded" in log)
    finally:
        c.set_plugstack(e2e.plugstack)
        c.reconfigure()
    assert "Alias of --oci-image" in e2e.srun("--help").stdout


# ---- hooks --------------------------------------------------------------------------------

def test_hook_output_is_seen_by_the_task(e2e):
    ref = e2e.push("p9/hooked")
    e2e.clear_hooks()
    e2e.hook("10-write", """#!/bin/sh
set -e
echo "job=$OCI_HOOK_JOB_ID step=$OCI_HOOK_STEP_ID user=$OCI_HOOK_USER uid=$OCI_HOOK_UID node=$OCI_HOOK_NODE digest=$OCI_HOOK_IMAGE_DIGEST" > "$OCI_HOOK_ROOTFS/tmp/hooked"
grep -q WorkingDir "$OCI_HOOK_IMAGE_CONFIG"
tr '\\0' '\\n' < "$OCI_HOOK_JOB_ENV" | grep -q "^HOOK_TEST_VAR=from-job$"
# inside the namespace: the image's own /etc/os-release
nsenter --mount="$OCI_HOOK_NS" /bin/sh -c 'grep ^ID= /etc/os-release > /tmp/seen-inside'
""")
    e2e.hook("20-order", '#!/bin/sh\nls "$OCI_HOOK_ROOTFS/tmp" > "$OCI_HOOK_ROOTFS/tmp/order"\n')
    e2e.hook("README", "not a hook: not executable\n")
    os.chmod(e2e.hooks_dir / "README", 0o644)
    try:
        r = e2e.srun("-N2", "-l", f"--oci-image={ref}", "sh", "-c",
                     'cat /tmp/hooked /tmp/seen-inside /tmp/order; echo "job=$SLURM_JOB_ID"',
                     env={"HOOK_TEST_VAR": "from-job"})
        assert r.returncode == 0, r.stderr
        for node, n in (("n1", "0"), ("n2", "1")):
            lines = [l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith(n + ":")]
            job = lines[-1].split("=")[1]
            assert lines[0].startswith(f"job={job} step=0 user={e2e.cluster.user} "
                                       f"uid={e2e.cluster.uid} node={node} digest=sha256:"), lines
            assert "ID=p9-hooked" in lines and "hooked" in lines and "seen-inside" in lines
    finally:
        e2e.clear_hooks()


def test_failing_hook_fails_the_step_and_leaves_nothing(e2e):
    ref = e2e.push("p9/hooked")
    e2e.clear_hooks()
    e2e.hook("10-ok", "#!/bin/sh\ntouch \"$OCI_HOOK_ROOTFS/tmp/ok\"\n")
    e2e.hook("20-fail", "#!/bin/sh\necho noise >&2\necho 'GPU 3 is on fire' >&2\nexit 3\n")
    e2e.hook("30-never", "#!/bin/sh\ntouch /tmp/oci-p9-hook-30-ran\n")
    try:
        r = e2e.srun("-N2", f"--oci-image={ref}", "echo", "SHOULD-NOT-RUN")
        assert r.returncode != 0 and "SHOULD-NOT-RUN" not in r.stdout
        assert "step hook 20-fail: GPU 3 is on fire" in r.stderr, r.stderr
        assert not os.path.exists("/tmp/oci-p9-hook-30-ran")
        e2e.wait_clean()
    finally:
        e2e.clear_hooks()
    assert not list(e2e.cache.glob("leases/*/*.json"))


def test_hook_owned_by_others_is_refused(e2e):
    ref = e2e.push("p9/hooked")
    e2e.clear_hooks()
    h = e2e.hook("10-evil", "#!/bin/sh\nexit 0\n")
    os.chmod(h, 0o777)
    try:
        r = e2e.srun("-N1", f"--oci-image={ref}", "true")
        assert r.returncode != 0 and "must be owned by root and not writable" in r.stderr
    finally:
        e2e.clear_hooks()
    e2e.wait_clean()


# ---- MPI: srun --mpi=pmi2 runs an MPICH program from the image on 2 nodes -----------------

MPI_HELLO = r"""
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
  int rank, size, sum = 0;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  printf("rank %d of %d sum %d\n", rank, size, sum);
  MPI_Finalize();
  return 0;
}
"""


def _mpi_layers(tmp: Path):
    """busybox + the program + every shared library ldd names, at their real paths."""
    src = tmp / "hello.c"
    src.write_text(MPI_HELLO)
    prog = tmp / "mpihello"
    subprocess.run(["mpicc", "-o", str(prog), str(src)], check=True)
    libs = set()
    for line in subprocess.run(["ldd", str(prog)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.add(path)
    entries, dirs = [], set()
    for path in sorted(libs):
        real = os.path.realpath(path)
        alias = os.path.abspath(path)
        for p in (real,) + ((alias,) if alias != real and not alias.startswith("/lib/") else ()):
            d = os.path.dirname(p).lstrip("/")
            while d and d not in dirs:
                dirs.add(d)
                d = os.path.dirname(d)
        entries.append(Entry(real.lstrip("/"), data=Path(real).read_bytes(), mode=0o755))
        if alias.startswith("/lib/"):  # merged /usr: the name ldd found, in /usr/lib
            alias = "/usr" + alias
        if alias != real:
            entries.append(Entry(alias.lstrip("/"), "symlink", linkname=real))
    dirs.discard("lib")  # Debian's merged /usr: lib -> usr/lib
    top = [Entry(d + "/", "dir", mode=0o755) for d in sorted(dirs)]
    top += [Entry("lib", "symlink", linkname="usr/lib")]
    top += entries + [Entry("opt/mpihello", data=prog.read_bytes(), mode=0o755)]
    return busybox_layers(os_id="mpi") + [top]


@pytest.mark.skipif(shutil.which("mpicc") is None, reason="mpicc (Debian's mpich) not installed")
def test_mpi_pmi2_across_two_nodes(e2e, tmp_path):
    r = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True,
                       env=e2e.cluster.env())
    assert "pmi2" in r.stdout + r.stderr
    ref = e2e.push("p9/mpi", layers=_mpi_layers(tmp_path))
    e2e.clear_hooks()
    e2e.hook("60-pmi", f"#!/bin/sh\nexec {HOOKS}/pmi\n")
    try:
        r = e2e.srun("-N2", "-n2", "--mpi=pmi2", f"--container-image={ref}", "/opt/mpihello",
                     timeout=180)
    finally:
        e2e.clear_hooks()
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["rank 0 of 2 sum 1", "rank 1 of 2 sum 1"], r.stdout
    assert "pmi hook: --mpi=pmi2" in "\n".join(d.log() for d in e2e.daemons)
