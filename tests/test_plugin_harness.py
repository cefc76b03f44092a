"""The plugin's C without a cluster: plugin/tests/harness.c (opt_cb and the options'
registration, plug_arg, asked, add_args, each_record, run_step_client with real children and
SCM_RIGHTS, local.c's and remote.c's records and checksum, spawn_detached, the job epilog's
cleanup-job) must pass."""
import shutil
import subprocess
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parent.parent / "plugin"


@pytest.mark.skipif(shutil.which("cc") is None or not Path("/usr/include/slurm/spank.h").exists(),
                    reason="needs a C compiler and libslurm-dev")
def test_c_harness_passes():
    r = subprocess.run(["make", "-s", "-C", str(PLUGIN), "check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "PASSED" and not [ln for ln in lines if ln.startswith("FAIL")], r.stdout
    assert sum(ln.startswith("ok ") for ln in lines) >= 95, r.stdout
