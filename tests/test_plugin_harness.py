"""The plugin's C without a cluster: plugin/tests/harness.c (option callbacks, variable
fallbacks, record parser, plugstack parser, sanitiser, spawn_detached) must pass."""
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
    assert sum(ln.startswith("ok ") for ln in lines) >= 25, r.stdout
