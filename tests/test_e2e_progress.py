"""What a user sees in srun's stderr while the step waits for its image, on the real cluster.

The downloads go through a tarpit (tests/registry_proxy.py in front of the real registry)
so that a conversion takes about ten seconds; each line of srun's stderr is stamped as it
arrives, so a test can tell lines printed during the wait from lines printed after it.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cluster_fixture import as_user, cluster_available
from daemon_proc import BIN
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import start_site, stop_site
from ocibuild import Pusher
from registry_proxy import RegistryProxy

pytestmark = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))

# ~128 KiB/s a connection: the 3 MiB layer takes about 24 s (layers download side by side)
TARPIT = dict(tarpit=True, tarpit_over=256 << 10, tarpit_bytes=32 << 10, tarpit_interval=0.25)
PROGRESS = re.compile(r"^oci-image: (n\d): (converting|waiting for node (\S+) converting this "
                      r"image): +(\d+)% \S+ \S+ of \S+ \S+")


class Site:
    def __init__(self, site, registry, proxy):
        self.site, self.cluster, self.registry, self.proxy = site, site.cluster, registry, proxy
        self.pusher = Pusher(registry.url)
        self.n = 0

    def new_image(self) -> str:
        """A never-seen image (its own random layer), by the tarpit's address."""
        self.n += 1
        repo = f"progress/app{self.n}"
        self.pusher.image(repo, "v1", busybox_layers(os_id=f"p{self.n}", extra_mb=3),
                          config=IMAGE_CONFIG)
        return f"{self.proxy.host}/{repo}:v1"

    def srun_timed(self, *args, wrap=None, timeout=180):
        """srun as the user; returns (rc, stdout lines, [(seconds since start, stderr line)])."""
        argv = ["srun", *args]
        if wrap:
            argv = wrap(argv)
        p = subprocess.Popen(as_user(argv, self.cluster.uid, self.cluster.gid), cwd="/tmp",
                             env=self.cluster.user_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, errors="replace")
        start = time.monotonic()
        err = []
        out = []

        def read_err():
            for line in p.stderr:
                err.append((time.monotonic() - start, line.rstrip("\n")))

        def read_out():
            for line in p.stdout:
                out.append((time.monotonic() - start, line.rstrip("\n")))

        threads = [threading.Thread(target=read_err), threading.Thread(target=read_out)]
        for t in threads:
            t.start()
        try:
            rc = p.wait(timeout)
        finally:
            p.kill()
            for t in threads:
                t.join(10)
        return rc, out, err


@pytest.fixture(scope="module")
def ps(registry, installed):
    with RegistryProxy(registry.url, **TARPIT) as proxy:
        site = start_site(installed, "oci-prog-", nodes=3)
        try:
            yield Site(site, registry, proxy)
        finally:
            stop_site(site)


def _progress(err):
    return [(t, PROGRESS.match(l)) for t, l in err if PROGRESS.match(l)]


def test_progress_is_shown_live_while_converting(ps):
    ref = ps.new_image()
    rc, out, err = ps.srun_timed("-N3", f"--oci-image={ref}", "echo", "RAN")
    assert rc == 0, err
    assert [l for _, l in out] == ["RAN"] * 3
    tasks_at = min(t for t, _ in out)
    lines = _progress(err)
    assert len(lines) >= 3, err
    # during the conversion, not all at once after it: the first line came long before the
    # tasks ran, and the percentages went up line by line
    assert tasks_at - lines[0][0] >= 5, err
    pct = [int(m.group(4)) for _, m in lines]
    assert pct == sorted(pct) and pct[0] < pct[-1], err
    # one node of the step speaks (the first), and it says how fast and how long
    assert {m.group(1) for _, m in lines} == {"n1"}, err
    assert any(re.search(r", \S+ \S?B/s, .* left", l) for _, l in err), err
    # never silent for long while it waits (a timer repeats the line when no event comes)
    stamps = [t for t, _ in err if t < tasks_at]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 10, err
    assert "Traceback" not in "\n".join(l for _, l in err)
    assert not any("\x1b" in l for _, l in err), "escape sequences in a pipe"

    # the image is cached now: the next step says nothing at all
    rc, out, err = ps.srun_timed("-N3", f"--oci-image={ref}", "echo", "RAN")
    assert rc == 0 and [l for _, l in out] == ["RAN"] * 3
    assert err == [], err


def test_a_waiting_node_shows_the_builders_progress(ps):
    """n1 (the step's first node) waits for n3, which converts: n1 says so, with n3's bytes."""
    ref = ps.new_image()
    n3 = ps.site.daemons[2]
    builder = subprocess.Popen([str(BIN / "oci-image"), "--socket",
                                str(n3.socket), "pull", ref],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list((ps.site.cache / "tmp").glob("sha256-*")):
            time.sleep(0.05)
        assert list((ps.site.cache / "tmp").glob("sha256-*")), "n3 never started converting"
        rc, out, err = ps.srun_timed("-N3", f"--oci-image={ref}", "echo", "RAN")
        assert rc == 0 and [l for _, l in out] == ["RAN"] * 3, err
    finally:
        builder.wait(120)
    waits = [(t, m) for t, m in _progress(err) if m.group(3)]
    assert len(waits) >= 2 and {m.group(1) for _, m in waits} == {"n1"}, err
    assert {m.group(3) for _, m in waits} == {"n3"}, err
    assert waits[-1][0] - waits[0][0] >= 3, err      # spread over the wait
    assert int(waits[-1][1].group(4)) > int(waits[0][1].group(4)), err


def test_progress_on_a_terminal_is_redrawn_in_place(ps):
    """srun on a terminal (script(1) gives it one): each update replaces the one before it,
    still one line each (srun passes task output on line by line)."""
    ref = ps.new_image()

    def on_a_tty(argv):
        return ["script", "-qefc", " ".join(argv), "/dev/null"]

    rc, out, err = ps.srun_timed("-N1", f"--oci-image={ref}", "echo", "RAN", wrap=on_a_tty)
    assert rc == 0, (out, err)
    text = "\n".join(l for _, l in out)   # script(1) puts the terminal's output on stdout
    assert "RAN" in text
    redrawn = [l for l in text.split("\n") if l.startswith("\x1b[1A\x1b[2Koci-image: n1: ")]
    assert len(redrawn) >= 2, repr(text)


def test_batch_error_file_gets_the_progress(ps):
    ref = ps.new_image()
    d = Path(tempfile.mkdtemp(prefix="oci-prog-batch-", dir="/tmp"))
    os.chmod(d, 0o777)
    try:
        script = d / "job.sh"
        script.write_text(f"#!/bin/sh\n#SBATCH --oci-image={ref}\nsrun -N1 echo RAN\n")
        os.chmod(script, 0o755)
        r = ps.cluster.run_as_user(["sbatch", "--wait", "-N1", "-o", str(d / "out"),
                                    "-e", str(d / "err"), str(script)], cwd=str(d), timeout=180)
        assert r.returncode == 0, r.stderr
        assert (d / "out").read_text().split() == ["RAN"]
        lines = (d / "err").read_text().splitlines()
        assert sum(1 for l in lines if re.match(
            r"^oci-image: n1: (converting|waiting for node \S+ converting this image): +\d+% ",
            l)) >= 2, lines
    finally:
        subprocess.run(["rm", "-rf", str(d)])


UP = "\x1b[1A\x1b[2K"


def _on_a_tty(argv):
    return ["script", "-qefc", " ".join(argv), "/dev/null"]


def _node_log(ps, node="n1"):
    return ps.cluster.node_log(node).read_text(errors="replace").splitlines()


def test_srun_l_on_a_terminal_gets_plain_lines(ps):
    """srun -l labels every line: a redraw would scramble them (srun sets SLURM_LABELIO in
    the job's environment only, which is where the plugin looks)."""
    ref = ps.new_image()
    rc, out, err = ps.srun_timed("-l", "-N1", f"--oci-image={ref}", "echo", "RAN", wrap=_on_a_tty)
    text = "\n".join(l for _, l in out)
    assert rc == 0 and "0: RAN" in text, text
    assert UP not in text and re.search(r"0: oci-image: n1: converting: +\d+% ", text), text


def test_progress_stays_out_of_the_slurmd_log(ps):
    """Progress is for the user: none of it (and no escape sequence) in the node's log."""
    before = len(_node_log(ps))
    ref = ps.new_image()
    rc, out, err = ps.srun_timed("-N1", f"--oci-image={ref}", "echo", "RAN", wrap=_on_a_tty)
    assert rc == 0 and UP in "\n".join(l for _, l in out)   # it was shown, redrawn
    logged = _node_log(ps)[before:]
    assert not [l for l in logged if "oci-image: n1: " in l or "\x1b" in l], logged


def test_control_bytes_a_user_chose_reach_nobody_raw(ps):
    """A submit directory named with a newline, a forged log line and a terminal escape:
    the note shows it with '?' for each control byte, on one line."""
    ref = ps.new_image()
    assert ps.srun_timed("-N1", f"--oci-image={ref}", "true")[0] == 0   # cached from now on
    base = Path(tempfile.mkdtemp(prefix="oci-prog-odd-", dir="/var/tmp"))
    os.chmod(base, 0o777)
    odd = base / "x\n[2030-01-01T00:00:00.000] error: forged\x1b]0;pwned\x07"
    odd.mkdir()
    os.chmod(odd, 0o777)
    before = len(_node_log(ps))
    try:
        c = ps.cluster
        r = subprocess.run(as_user(["srun", "-N1", f"--oci-image={ref}", "true"], c.uid, c.gid),
                           cwd=str(odd), env=c.user_env(), capture_output=True, text=True,
                           errors="replace", timeout=120)
        assert r.returncode == 0, r.stderr
        notes = [l for l in r.stderr.splitlines() if "is not in the container" in l]
        assert len(notes) == 1 and "x?[2030-01-01T00:00:00.000] error: forged?]0;pwned?" \
            in notes[0], r.stderr
        assert not any(l.startswith("[2030") for l in r.stderr.splitlines())
        assert "\x1b" not in r.stderr and "\x07" not in r.stderr
        assert not any("\x1b" in l or "\x07" in l or "forged" in l
                       for l in _node_log(ps)[before:])
    finally:
        subprocess.run(["rm", "-rf", str(base)])
