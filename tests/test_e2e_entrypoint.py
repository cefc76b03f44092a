"""`srun --oci-entrypoint`: the image's Entrypoint runs with the step's command as its
arguments (plugin/oci-image-launch.c, the shim's task_init_privileged, the step client's
`entrypoint` record).

First the launcher on its own (run directly with crafted environments), then end to end
on a real 2-node cluster with the real plugin, step client and daemons, as the test user.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ociimage.step import encode_entrypoint

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "plugin"
LAUNCHER = PLUGIN_DIR / "oci-image-launch"

# prints every argument it gets as <arg>, $0 included, then whether the launcher's
# variables leaked into the task
ARGV_SCRIPT = ('printf "<%s>" "$0" "$@"; echo; '
               'echo "leak=${OCI_IMAGE_ENTRYPOINT-none},${OCI_IMAGE_ARGV0-none}"')
NASTY = ["a b", "q'u\"ote", "new\nline", "", "%41,", "$HOME", "back\\slash", "tab\there",
         "ünïcode", "--", ",", "%", "-c"]


@pytest.fixture(scope="module")
def launcher():
    r = subprocess.run(["make", "-C", str(PLUGIN_DIR)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(LAUNCHER)


def run_launcher(launcher, entrypoint, argv0, *args, raw=None, env_extra=None):
    env = {"PATH": "/usr/bin:/bin"}
    if entrypoint is not None or raw is not None:
        env["OCI_IMAGE_ENTRYPOINT"] = raw if raw is not None else os.fsdecode(
            encode_entrypoint(entrypoint))
    if argv0 is not None:
        env["OCI_IMAGE_ARGV0"] = argv0
    env.update(env_extra or {})
    # argv[0] of the launcher itself is ignored (in a step it is /proc/self/fd/N)
    return subprocess.run(["/proc/self/fd/ignored", *args], executable=launcher, env=env,
                          capture_output=True)


PY_ARGV = [sys.executable, "-c",
           "import os, sys; sys.stdout.buffer.write(b'\\0'.join(os.fsencode(a) for a in "
           "sys.argv[1:]) + b'|' + repr(sorted(k for k in os.environ if "
           "k.startswith('OCI_IMAGE_'))).encode())"]


def test_launcher_round_trips_every_byte(launcher):
    weird = "".join(chr(c) for c in range(1, 128)) + "é" + os.fsdecode(b"\xff\x80")
    r = run_launcher(launcher, PY_ARGV + [weird, "", " x "], "the argv0 \n'\"", *NASTY)
    assert r.returncode == 0, r.stderr
    out, _, env = r.stdout.rpartition(b"|")
    assert out.split(b"\0") == [os.fsencode(a) for a in
                                [weird, "", " x ", "the argv0 \n'\"", *NASTY]]
    assert env == b"[]"  # both variables are gone from the entrypoint's environment


def test_launcher_encoding_is_the_documented_one():
    assert encode_entrypoint(["/opt/app/run.sh"]) == b"/opt/app/run.sh,"
    assert encode_entrypoint(["sh", "-c", "echo $0"]) == b"sh,-c,echo%20%240,"
    assert encode_entrypoint(["a,b", ""]) == b"a%2Cb,,"


def test_launcher_path_lookup_and_case_insensitive_hex(launcher):
    r = run_launcher(launcher, None, "x", "y", raw="printf,%3c%25s%3E,")
    assert r.returncode == 0 and r.stdout == b"<x><y>", r.stderr


@pytest.mark.parametrize("raw, why", [
    ("", "it is empty"),
    ("/bin/echo", "does not end with ','"),
    ("/bin/echo x,", "must be %-encoded"),
    ("/bin/echo%2,", "two hex digits"),
    ("/bin/echo%zz,", "two hex digits"),
    ("/bin/echo,%00,", "NUL"),
    (",", "empty program name"),
])
def test_launcher_rejects_bad_encodings(launcher, raw, why):
    r = run_launcher(launcher, None, "x", raw=raw)
    assert r.returncode == 127 and r.stdout == b""
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oci-image: entrypoint: ") and why in lines[0]


def test_launcher_exec_errors(launcher, tmp_path):
    r = run_launcher(launcher, None, None)
    assert r.returncode == 127 and b"OCI_IMAGE_ENTRYPOINT and OCI_IMAGE_ARGV0 must be set" in r.stderr
    r = run_launcher(launcher, ["no-such-program-anywhere"], "x")
    assert r.returncode == 127
    assert r.stderr == (b"oci-image: entrypoint: cannot run the image's Entrypoint "
                        b"no-such-program-anywhere: No such file or directory\n")
    f = tmp_path / "not-exec"
    f.write_text("#!/bin/sh\n")
    r = run_launcher(launcher, [str(f)], "x")
    assert r.returncode == 126 and b"Permission denied" in r.stderr


def test_launcher_is_static(launcher):
    out = subprocess.run(["file", "-L", launcher], capture_output=True, text=True).stdout
    assert "static" in out and "dynamically linked" not in out, out


# ---- end to end -------------------------------------------------------------------------

from cluster_fixture import cluster_available  # noqa: E402
from install_fixture import installed  # noqa: E402,F401 - a fixture
from localsite import start_site, stop_site  # noqa: E402


@pytest.fixture(scope="module")
def e2e(registry, installed):
    if cluster_available() is not None:
        pytest.skip(str(cluster_available()))
    from images import IMAGE_CONFIG, busybox_layers
    from ocibuild import Pusher

    # the launcher is found next to the installed step client, as in the RPM layout
    site = start_site(installed, "oci-e2e-ep-", nodes=2)
    try:
        cluster = site.cluster
        pusher = Pusher(registry.url)
        layers = busybox_layers()
        refs = {}
        for name, config in {
            "hello": IMAGE_CONFIG,  # Entrypoint ["/opt/app/hello.sh"]
            "argv": dict(IMAGE_CONFIG, Entrypoint=["/bin/sh", "-c", ARGV_SCRIPT,
                                                   "ep $0 \n'%41,\""]),
            "noep": {k: v for k, v in IMAGE_CONFIG.items() if k != "Entrypoint"},
            "missing": dict(IMAGE_CONFIG, Entrypoint=["/no/such/entrypoint"]),
            "shell": dict(IMAGE_CONFIG, Entrypoint=["sh", "-c"]),  # found through the image's PATH
        }.items():
            pusher.image(f"e2e-ep/{name}", "v1", layers, config=config)
            refs[name] = f"{registry.host}/e2e-ep/{name}:v1"

        def srun(*args, env=None, shell=None):
            argv = ["srun", *args]
            if env:
                argv = ["env", *[f"{k}={v}" for k, v in env.items()], *argv]
            if shell:
                argv = ["sh", "-c", shell + '; exec "$@"', "sh", *argv]
            return cluster.run_as_user(argv, cwd="/tmp", timeout=60)

        yield srun, refs
    finally:
        stop_site(site)


def test_entrypoint_gets_the_command_as_arguments(e2e):
    srun, refs = e2e
    r = srun("-N2", f"--oci-image={refs['hello']}", "--oci-entrypoint", "a", "b")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from the image a b\n" * 2


def test_without_the_flag_the_command_runs_directly(e2e):
    srun, refs = e2e
    r = srun("-N1", f"--oci-image={refs['hello']}", "echo", "x")
    assert r.returncode == 0 and r.stdout == "x\n", r.stderr
    # argv[0] is slurmstepd's usual PATH lookup and nothing of the launcher is in the environment
    r = srun("-N1", f"--oci-image={refs['hello']}", "sh", "-c",
             'echo "$0 ${OCI_IMAGE_ENTRYPOINT-none} ${OCI_IMAGE_ARGV0-none}"')
    assert r.stdout == "/bin/sh none none\n", r.stderr


def test_oci_entrypoint_env(e2e):
    srun, refs = e2e
    r = srun("-N1", f"--oci-image={refs['hello']}", "a", "b", env={"OCI_ENTRYPOINT": "1"})
    assert r.returncode == 0 and r.stdout == "hello from the image a b\n", r.stderr
    r = srun("-N1", f"--oci-image={refs['hello']}", "echo", "x", env={"OCI_ENTRYPOINT": "0"})
    assert r.returncode == 0 and r.stdout == "x\n", r.stderr


def test_arguments_round_trip(e2e):
    srun, refs = e2e
    r = srun("-N1", f"--oci-image={refs['argv']}", "--oci-entrypoint", "my cmd", *NASTY)
    assert r.returncode == 0, r.stderr
    want = "".join(f"<{a}>" for a in ["ep $0 \n'%41,\"", "my cmd", *NASTY])
    assert r.stdout == want + "\nleak=none,none\n"


def test_slurmstepd_still_does_its_part(e2e):
    """The launcher is what slurmstepd execs, so rlimit propagation, TMPDIR and Slurm's
    variables still happen (an exec from the plugin would have skipped them)."""
    srun, refs = e2e
    r = srun("-N1", f"--oci-image={refs['shell']}", "--oci-entrypoint",
             'echo "tmp=${TMPDIR-unset} nofile=$(ulimit -n) rank=$SLURM_PROCID pwd=$(pwd)"',
             shell="ulimit -n 777; unset TMPDIR")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "tmp=/tmp nofile=777 rank=0 pwd=/opt/app\n"


def test_image_without_entrypoint_runs_the_command(e2e):
    srun, refs = e2e
    r = srun("-N1", f"--oci-image={refs['noep']}", "--oci-entrypoint", "echo", "x")
    assert r.returncode == 0 and r.stdout == "x\n", r.stderr


def test_missing_entrypoint_is_reported(e2e):
    srun, refs = e2e
    r = srun("-N1", f"--oci-image={refs['missing']}", "--oci-entrypoint", "x")
    assert r.returncode != 0
    assert ("oci-image: entrypoint: cannot run the image's Entrypoint /no/such/entrypoint: "
            "No such file or directory") in r.stderr


def test_help_text(e2e):
    srun, _ = e2e
    r = srun("--help")
    assert "--oci-entrypoint" in r.stdout and "like docker run IMAGE CMD" in r.stdout
