"""Slurm-aware cache on the real 3-node cluster, as the unprivileged test user (issue 7):
prefetch at submit, eviction that spares what pending jobs need, and the job-epilog safety
net after a slurmstepd killed with SIGKILL.

Four real daemons share one cache: n1..n3 (the compute nodes) and "login", whose prefetch
socket the plugin uses (srun/sbatch run on the "login node"). What each daemon did is read
from its metrics and logs."""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cluster_fixture import as_user, cluster_available, start_cluster, stop_cluster
from daemon_proc import DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from ocibuild import Pusher

from ociimage.client import DaemonClient
from ociimage.slurm import CliBackend, SlurmJobs, job_comment, parse_squeue_json
from registry_server import RegistryServer
from stepclient import options, plugstack, run_step
from token_issuer import TokenIssuer

pytestmark = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))


class Env:
    def __init__(self, base, cluster, nodes, login, registry, installed=None):
        self.base, self.cluster, self.nodes, self.login, self.registry = (
            base, cluster, nodes, login, registry)
        self.installed = installed
        self.cache = base / "cache"
        self.pusher = Pusher(registry.url)

    @property
    def daemons(self):
        return [*self.nodes, self.login]

    def push(self, repo, **kw):
        return self.pusher.image(repo, "v1", busybox_layers(**kw), config=IMAGE_CONFIG)

    def ref(self, repo):
        return f"{self.registry.host}/{repo}:v1"

    def conversions(self, d) -> int:
        import requests
        text = requests.get(f"http://127.0.0.1:{d.metrics_port}/metrics").text
        return int(sum(float(l.split()[-1]) for l in text.splitlines()
                       if l.startswith('ociimage_conversions_total{result="ok"}')))

    def entry(self, digest) -> Path:
        return self.cache / "images" / (digest.replace(":", "-") + ".json")

    def squeue(self, job) -> str:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True,
                           text=True, env=self.cluster.env())
        return r.stdout.strip()

    def wait_gone(self, job, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.squeue(job):
                return
            time.sleep(0.2)
        raise AssertionError(f"job {job} still queued: {self.squeue(job)}")

    def sbatch(self, *args, cwd="/tmp") -> str:
        r = self.cluster.run_as_user(["sbatch", "--parsable", *args], cwd=cwd)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def leftovers(self):
        mounts = [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                  if l.split()[4].startswith(str(self.base))]
        leases = sorted(str(p.relative_to(self.cache)) for p in self.cache.glob("leases/*/*.json"))
        steps = [p for d in self.nodes for p in (d.runtime_dir / "steps").glob("*/record.json")]
        return mounts, leases, steps


@pytest.fixture(scope="module")
def sa(registry, installed):
    base = Path(tempfile.mkdtemp(prefix="oci-sa-", dir="/tmp"))
    os.chmod(base, 0o755)
    plugstack = (f"required {installed.plugin} step_client={installed.step_client} "
                 f"socket={base}/%n/oci-imaged.sock "
                 f"prefetch_socket={base}/login/oci-imaged-prefetch.sock\n")
    cluster = start_cluster(nodes=3, plugstack_text=plugstack, prefix="oci-sa-slurm-")
    conf = base / "oci-image.conf"
    conf.write_text("[daemon]\nmount_idle = 1\n[cache]\nlease_ttl = 60\n"
                    f"[slurm]\njobs = cli\nconf = {cluster.conf}\nrefresh = 0\n")
    daemons = []
    try:
        for n in ("n1", "n2", "n3", "login"):
            daemons.append(DaemonProcess(base, base / "cache", node=n,
                                         extra=["--config", str(conf)]).start())
        yield Env(base, cluster, daemons[:3], daemons[3], registry, installed)
    finally:
        stop_cluster(cluster)
        for d in daemons:
            d.stop()
        for m in sorted(Env(base, cluster, daemons[:3], None, registry).leftovers()[0], reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        if not os.environ.get("OCI_KEEP_CLUSTER"):
            shutil.rmtree(base, ignore_errors=True)


def test_prefetch_socket_is_world_writable_and_serves_only_prefetch(sa):
    sock = sa.login.socket.parent / "oci-imaged-prefetch.sock"
    assert (sock.stat().st_mode & 0o777) == 0o666
    assert (sa.login.socket.stat().st_mode & 0o777) == 0o600
    from ociimage.client import DaemonClient
    from ociimage.errors import InvalidArgument, OciImageError
    from ociimage.sockclient import request
    with pytest.raises(InvalidArgument, match="digest-pinned"):
        request(str(sock), {"op": "prefetch", "image": sa.ref("sa/whatever")})  # a tag: refused
    with pytest.raises(InvalidArgument, match="unknown op"):
        request(str(sock), {"op": "list", "image": ""})     # nothing else is served there
    c = DaemonClient(str(sock), timeout=10)
    with pytest.raises(OciImageError):
        c.list()                                            # and it speaks no gRPC
    c.close()
    # the unprivileged user reaches it through the step client
    pushed = sa.push("sa/direct", os_id="direct")
    pinned = f"{sa.ref('sa/direct')}@{pushed.manifest_digest}"
    r = sa.cluster.run_as_user([str(sa.installed.step_client), "prefetch", "--socket",
                                str(sock), "--image", pinned])
    # a new image nobody asked for yet: this request starts its pull
    assert r.returncode == 0 and r.stdout.split()[0] == "started", (r.stdout, r.stderr)
    deadline = time.monotonic() + 30
    while not sa.entry(pushed.manifest_digest).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sa.entry(pushed.manifest_digest).exists()
    # pulled as the user who asked (the daemon knows the caller from SO_PEERCRED)
    line = f'"prefetch done" reference="{pinned}" uid={sa.cluster.uid}'
    deadline = time.monotonic() + 10      # logged just after the entry is published
    while line not in sa.login.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line in sa.login.log()
    r = sa.cluster.run_as_user([str(sa.installed.step_client), "prefetch", "--socket",
                                str(sock), "--image", pinned])
    assert r.stdout.split()[0] == "cached", r.stderr


def test_sbatch_hold_prefetches_then_runs_without_converting(sa):
    pushed = sa.push("sa/held", os_id="held")
    digest = pushed.manifest_digest
    out = Path(tempfile.mkdtemp(prefix="oci-sa-out-", dir="/tmp"))
    os.chmod(out, 0o777)
    before = {d.node: sa.conversions(d) for d in sa.daemons}
    t0 = time.monotonic()
    job = sa.sbatch("--hold", "-N2", "-o", str(out / "out"), f"--oci-image={sa.ref('sa/held')}",
                    "--comment=mine", "--wrap", "srun -N2 grep ^ID= /etc/os-release")
    submit_s = time.monotonic() - t0
    # the conversion happens while the job is held
    deadline = time.monotonic() + 60
    while not sa.entry(digest).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sa.entry(digest).exists(), sa.login.log()[-2000:]
    assert sa.squeue(job).startswith("PENDING"), sa.squeue(job)
    after_prefetch = {d.node: sa.conversions(d) for d in sa.daemons}
    assert after_prefetch["login"] - before["login"] == 1
    assert "prefetch done" in sa.login.log()
    # the job records its pinned image's digest in its comment, after the user's own; only
    # the digest: squeue shows comments to everyone, and names can be private
    raw = CliBackend(str(sa.cluster.conf)).raw()
    if os.environ.get("OCI_SAVE_SQUEUE_JSON"):  # how tests/data/squeue-*-recorded.json are made
        meta = json.loads(raw)["meta"]
        release = (meta.get("Slurm") or meta.get("slurm"))["version"]   # 22.05: "Slurm"
        name = f"squeue-{int(release['major'])}.{int(release['minor']):02d}-recorded.json"
        Path(os.environ["OCI_SAVE_SQUEUE_JSON"], name).write_text(raw)
    jobs = {j.job_id: j for j in parse_squeue_json(raw)}
    assert jobs[job].claimed == [digest]
    assert jobs[job].comment == f"mine oci-image={digest}"
    assert jobs[job].user_id == sa.cluster.uid
    assert jobs[job].state == "PENDING"
    # released, it runs on two nodes without converting again
    r = subprocess.run(["scontrol", "release", job], capture_output=True, text=True,
                       env=sa.cluster.env())
    assert r.returncode == 0, r.stderr
    sa.wait_gone(job)
    text = (out / "out").read_text()
    assert text.count("ID=held") == 2, text
    after = {d.node: sa.conversions(d) for d in sa.daemons}
    assert after == after_prefetch
    for d in sa.nodes:   # the nodes found it in the cache
        assert "prefetch" not in d.log()
    print(f"\nsbatch --hold with prefetch: submit {submit_s * 1000:.0f} ms")
    shutil.rmtree(out)


class SlowBlobs:
    """A proxy in front of the test registry that holds every blob GET for `delay` seconds,
    so that a conversion is still running when the job's nodes ask for the same digest."""

    def __init__(self, upstream: str, delay: float):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import requests

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _go(self, head=False):
                if "/blobs/" in self.path and not head:
                    time.sleep(delay)
                r = requests.request(self.command, upstream + self.path, stream=False,
                                     headers={k: v for k, v in self.headers.items()
                                              if k.lower() in ("accept", "authorization", "range")})
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length",
                                         "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                if not head:
                    self.wfile.write(r.content)

            def do_GET(self):
                self._go()

            def do_HEAD(self):
                self._go(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        import threading
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def test_nodes_wait_for_the_prefetch_conversion(sa):
    """A job that starts while its image is still being prefetched: the nodes wait on the
    digest's cache lock for that conversion instead of starting their own."""
    pushed = sa.push("sa/race", os_id="race")
    slow = SlowBlobs(sa.registry.url, delay=3.0)
    try:
        pinned = f"{slow.host}/sa/race:v1@{pushed.manifest_digest}"
        before = sum(sa.conversions(d) for d in sa.daemons)
        sock = sa.login.socket.parent / "oci-imaged-prefetch.sock"
        r = sa.cluster.run_as_user([str(sa.installed.step_client), "prefetch", "--socket",
                                    str(sock), "--image", pinned])
        assert r.stdout.split()[0] == "started", r.stderr
        r = sa.cluster.run_as_user(["srun", "-N3", f"--oci-image={pinned}", "grep", "^ID=",
                                    "/etc/os-release"], cwd="/tmp", timeout=180)
        assert r.returncode == 0 and r.stdout.split() == ["ID=race"] * 3, r.stderr
        assert sum(sa.conversions(d) for d in sa.daemons) - before == 1
        assert sa.conversions(sa.login) >= 1
        assert "waiting for node login converting this image" in r.stderr, r.stderr
    finally:
        slow.stop()


def test_prune_spares_images_of_pending_jobs(sa):
    needed = sa.push("sa/needed", os_id="needed")
    unused = sa.push("sa/unused", os_id="unused")
    job = sa.sbatch("--hold", f"--oci-image={sa.ref('sa/needed')}", "--wrap", "srun true")
    n1 = sa.nodes[0]
    try:
        deadline = time.monotonic() + 60
        while not sa.entry(needed.manifest_digest).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        n1.cli("pull", sa.ref("sa/unused"), check=True)
        listing = {i["digest"]: i for i in json.loads(n1.cli("--json", "ls", check=True).stdout)}
        assert any(j.startswith(f"{job} ") for j in listing[needed.manifest_digest]["jobs"])
        assert listing[unused.manifest_digest]["jobs"] == []
        table = n1.cli("ls", check=True).stdout
        assert "JOBS" in table and job in table
        r = n1.cli("prune", "--quota", "1", check=True)
        assert f"removed {unused.manifest_digest}" in r.stdout
        assert f"kept {needed.manifest_digest}" in r.stdout
        assert sa.entry(needed.manifest_digest).exists()
        assert not sa.entry(unused.manifest_digest).exists()
    finally:
        subprocess.run(["scancel", job], env=sa.cluster.env(), check=False)
    sa.wait_gone(job)
    # the job is gone: now nothing holds the image
    r = n1.cli("--json", "prune", "--quota", "1", check=True)
    assert needed.manifest_digest in r.stdout


OWNER = "ocisaown"           # has the login that may pull the private image
OWNER_PW = "sa-0wner-pw:x"


@pytest.fixture(scope="module")
def private_image(tmp_path_factory):
    """A private image: only the registry user "sa-owner" may pull it (token auth)."""
    d = tmp_path_factory.mktemp("sa-token")
    issuer = TokenIssuer(d / "issuer", {"sa-owner": OWNER_PW},
                         {"sa-owner": {"sa-priv/*": ["pull"]}, "": {}})
    with issuer:
        with RegistryServer(d / "reg", auth=issuer.registry_auth()) as reg:
            p = Pusher(reg.url)
            p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
                {"type": "repository", "name": "sa-priv/app", "actions": ["pull", "push"]}])
            img = p.image("sa-priv/app", "v1", busybox_layers(os_id="sa-private"),
                          config=IMAGE_CONFIG)
            yield reg, img


def _owner_with_login(host: str):
    import base64
    import pwd
    try:
        pw = pwd.getpwnam(OWNER)
    except KeyError:
        subprocess.run(["useradd", "-m", OWNER], check=True, capture_output=True)
        pw = pwd.getpwnam(OWNER)
    d = Path(pw.pw_dir) / ".docker"
    d.mkdir(exist_ok=True)
    auth = base64.b64encode(f"sa-owner:{OWNER_PW}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    for p in (d, d / "config.json"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(d / "config.json", 0o600)
    return pw


def test_a_comment_naming_an_image_its_owner_may_not_pull_spares_nothing(sa, private_image):
    """Comments are the users' to write: a job of the test user whose comment names the digest
    of someone else's private image must not keep it in the cache (or anyone could make the
    quota unenforceable); the same marker from a job of a user who may pull it does."""
    reg, img = private_image
    digest = img.manifest_digest
    owner = _owner_with_login(reg.host)
    n1 = sa.nodes[0]
    pinned = f"{reg.host}/sa-priv/app:v1@{digest}"
    DaemonClient(str(n1.socket)).pull(pinned, uid=owner.pw_uid)   # cached, as its owner
    assert sa.entry(digest).exists()
    legit_img = sa.push("sa/legit", os_id="legit")
    forged = sa.sbatch("--hold", f"--comment=oci-image={digest}", "--wrap", "true")
    legit = sa.sbatch("--hold", f"--oci-image={sa.ref('sa/legit')}", "--wrap", "srun true")
    jobs = [forged, legit]
    try:
        n1.cli("pull", sa.ref("sa/legit"), check=True)
        assert job_comment(forged, runner=_as_root(sa)) == f"oci-image={digest}"
        listing = {i["digest"]: i for i in json.loads(n1.cli("--json", "ls", check=True).stdout)}
        assert listing[digest]["jobs"] == []
        assert any(j.startswith(f"{legit} ") for j in listing[legit_img.manifest_digest]["jobs"])
        r = n1.cli("prune", "--quota", "1", check=True)
        assert f"removed {digest}" in r.stdout, r.stdout
        assert f"kept {legit_img.manifest_digest}" in r.stdout, r.stdout
        assert not sa.entry(digest).exists()
        # the owner's own job, submitted with the private image: recorded by digest only
        DaemonClient(str(n1.socket)).pull(pinned, uid=owner.pw_uid)
        r = subprocess.run(["runuser", "-u", OWNER, "--", "env", f"SLURM_CONF={sa.cluster.conf}",
                            f"HOME={owner.pw_dir}", f"USER={OWNER}", "sbatch", "--parsable",
                            "--hold", f"--oci-image={reg.host}/sa-priv/app:v1", "--wrap",
                            "srun true"], capture_output=True, text=True, cwd="/tmp", timeout=60)
        assert r.returncode == 0, r.stderr
        own = r.stdout.strip().split(";")[0]
        jobs.append(own)
        comment = job_comment(own, runner=_as_root(sa))
        assert comment == f"oci-image={digest}"
        assert reg.host not in comment and "sa-priv" not in comment
        r = n1.cli("prune", "--quota", "1", check=True)
        assert f"kept {digest}" in r.stdout, r.stdout
        assert sa.entry(digest).exists()
    finally:
        subprocess.run(["scancel", *jobs], env=sa.cluster.env(), check=False)
    for j in jobs:
        sa.wait_gone(j)


def _as_root(sa):
    """A runner for ociimage.slurm's CLI helpers that talks to the test cluster."""
    def run(argv, **kw):
        kw["env"] = {**kw.get("env", {}), "SLURM_CONF": str(sa.cluster.conf)}
        return subprocess.run(argv, **kw)
    return run


def test_prune_spares_everything_when_slurm_cannot_be_asked(sa, tmp_path):
    sa.push("sa/spared", os_id="spared")
    n1 = sa.nodes[0]
    n1.cli("pull", sa.ref("sa/spared"), check=True)
    bad = tmp_path / "oci.conf"
    bad.write_text(f"[slurm]\njobs = cli\nconf = {tmp_path}/no-such-slurm.conf\n")
    os.chmod(tmp_path, 0o755)
    # a job list another node shared within [slurm] refresh would answer for this node:
    # none here, so this node must ask its own (broken) Slurm
    (sa.cache / "records" / "slurm" / "jobs.json").unlink(missing_ok=True)
    d = DaemonProcess(sa.base, sa.cache, node="broken", extra=["--config", str(bad)]).start()
    try:
        r = d.cli("--json", "prune", "--quota", "1", check=True)
        assert json.loads(r.stdout) == []
        assert "evicting nothing" in d.log()
    finally:
        d.stop()


def _stepd_pid(job: str, step: str = "0") -> int:
    want = f"slurmstepd: [{job}.{step}]"
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().replace(b"\0", b" ").decode().startswith(want):
                    return int(p.name)
            except OSError:
                continue
    raise AssertionError(f"no {want}")


def _children(pid: int) -> list:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def test_sigkill_of_slurmstepd_leaves_nothing_after_the_job(sa):
    sa.push("sa/killed", os_id="killed")
    p = subprocess.Popen(as_user(["srun", "-N2", f"--oci-image={sa.ref('sa/killed')}", "sh", "-c",
                                  'echo "started $SLURM_JOB_ID"; exec sleep 8'],
                                 sa.cluster.uid, sa.cluster.gid),
                         cwd="/tmp", env=sa.cluster.user_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    got = b""
    deadline = time.monotonic() + 60
    while got.count(b"started") < 2 and time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 0.2)[0]:
            got += os.read(p.stdout.fileno(), 4096)
    assert got.count(b"started") == 2, (got, p.poll())
    job = got.split()[1].decode()
    mounts, leases, steps = sa.leftovers()
    assert len(leases) == 2 and len(steps) == 2
    pid = _stepd_pid(job)
    tasks = _children(pid)
    os.kill(pid, signal.SIGKILL)          # spank_exit never runs in that slurmstepd
    try:
        p.wait(40)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job], env=sa.cluster.env(), check=False)
        p.wait(30)
    sa.wait_gone(job)
    deadline = time.monotonic() + 30
    while any(sa.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert sa.leftovers() == ([], [], []), sa.leftovers()
    logs = "".join(d.log() for d in sa.nodes)
    assert re.search(rf'released what an ended job left on this node.*job="?{job}\b', logs), \
        logs[-3000:]
    # the killed step's task may outlive its slurmstepd (no longer tracked): end it
    for t in tasks:
        try:
            os.kill(t, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_job_list_is_asked_once_for_the_whole_cluster(sa, tmp_path):
    """slurmctld's cost does not grow with the nodes (issue 15): eight nodes that all need the
    job list (e.g. pruning at once) cause one real squeue query; the shared record keeps only
    the jobs that name an image; a node asks again only once the record is older than ttl."""
    from ociimage.cache import Cache

    digest = "sha256:" + "ab" * 32
    marked = sa.sbatch("--hold", f"--comment=mine oci-image={digest}", "--wrap", "true")
    plain = sa.sbatch("--hold", "--comment=nothing to see", "--wrap", "true")
    calls = []

    def counting(argv, **kw):
        calls.append(argv[:2])
        return subprocess.run(argv, **kw)

    try:
        root = tmp_path / "shared-cache"
        nodes = [SlurmJobs(CliBackend(str(sa.cluster.conf), runner=counting), ttl=30,
                           shared=Cache(root, node=f"n{i}")) for i in range(8)]
        for n in nodes:
            needed = n.needed()
            assert [j.job_id for j in needed[digest]] == [marked]
        assert calls == [["squeue", "--json"]]
        assert [n.queries for n in nodes] == [1] + [0] * 7
        record = json.loads((root / "records" / "slurm" / "jobs.json").read_text())
        ids = [j["id"] for j in record["jobs"]]
        assert marked in ids and plain not in ids   # only jobs that name an image are kept
        assert all(set(j) == {"id", "state", "uid", "claimed", "admin"} for j in record["jobs"])
        # older than ttl (seen from a node whose clock is 31 s later): asked again, once
        late = SlurmJobs(CliBackend(str(sa.cluster.conf), runner=counting), ttl=30,
                         shared=Cache(root, node="late"), wall=lambda: time.time() + 31)
        assert [j.job_id for j in late.needed()[digest]] == [marked]
        # a record from a clock ahead of ours is not trusted either
        early = SlurmJobs(CliBackend(str(sa.cluster.conf), runner=counting), ttl=30,
                          shared=Cache(root, node="early"), wall=lambda: time.time() - 3600)
        early.needed()
        assert calls == [["squeue", "--json"]] * 3
    finally:
        subprocess.run(["scancel", marked, plain], env=sa.cluster.env(), check=False)
    sa.wait_gone(marked)
    sa.wait_gone(plain)


def test_srun_resolves_a_tag_at_submit_through_the_login_daemon(sa):
    """#19: srun's tag lookup is asked of this host's warm daemon (no registry client to
    import in every srun), as the user, and it is the registry's answer of now each time."""
    first = sa.push("sa/resolve", os_id="resolve-one")
    r = sa.cluster.run_as_user(["srun", "-N1", f"--oci-image={sa.ref('sa/resolve')}", "cat",
                                "/etc/os-release"], cwd="/tmp", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ID=resolve-one" in r.stdout
    resolved = re.compile(rf'"tag resolved for a user" uid={sa.cluster.uid} pid=\d+ '
                          rf'reference="{re.escape(sa.ref("sa/resolve"))}" digest="([^"]+)"')
    assert resolved.findall(sa.login.log()) == [first.manifest_digest]
    # the tag moves: the next srun runs the new image (no answer is kept for a tag)
    second = sa.push("sa/resolve", os_id="resolve-two")
    assert second.manifest_digest != first.manifest_digest
    r = sa.cluster.run_as_user(["srun", "-N1", f"--oci-image={sa.ref('sa/resolve')}", "cat",
                                "/etc/os-release"], cwd="/tmp", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ID=resolve-two" in r.stdout
    assert resolved.findall(sa.login.log()) == [first.manifest_digest, second.manifest_digest]


def test_resolve_at_submit_reads_only_the_callers_own_credentials(sa, private_image):
    """The attacker names the owner's credential file (REGISTRY_AUTH_FILE, honoured at submit):
    the login daemon reads it as the attacker, who cannot, so the private tag stays unknown
    to them; the owner, asking the same way, gets its digest."""
    reg, img = private_image
    owner = _owner_with_login(reg.host)
    sock = str(sa.login.socket.parent / "oci-imaged-prefetch.sock")
    step = str(sa.installed.step_client)
    tag = f"{reg.host}/sa-priv/app:v1"
    submit = [step, "submit", *plugstack(f"step_client={step}", f"prefetch_socket={sock}"),
              *options(oci_image=tag)]
    r = run_step(["runuser", "-u", OWNER, "--", "env", f"HOME={owner.pw_dir}", *submit],
                 timeout=60, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert r.pinned == f"{tag}@{img.manifest_digest}"
    assert re.search(rf'"tag resolved for a user" uid={owner.pw_uid} pid=\d+ '
                     rf'reference="{re.escape(tag)}"', sa.login.log())
    stolen = f"{owner.pw_dir}/.docker/config.json"
    r = run_step(sa.cluster.user_cmd(["env", f"REGISTRY_AUTH_FILE={stolen}", *submit]),
                 env=sa.cluster.env(), cwd="/tmp", timeout=60)
    assert r.returncode == 1
    assert r.records == []
    assert img.manifest_digest not in r.stdout + r.stderr
    [err] = r.stderr.strip().splitlines()
    assert err.startswith(f"oci-image: error: --oci-image={tag}: ") and "authentication" in err, err
    assert not re.search(rf'"tag resolved for a user" uid={sa.cluster.uid} pid=\d+ '
                         rf'reference="{re.escape(tag)}"', sa.login.log())
