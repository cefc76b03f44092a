"""This checkout installed where ordinary users can reach it (scripts/install-local.sh).

The end-to-end tests run srun as an unprivileged user, whose srun loads the
plugin and execs the step client: a checkout under /root would be unreadable
to them, as on a fresh machine.
"""

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Installed:
    prefix: Path

    @property
    def bin(self) -> Path:
        return self.prefix / "venv" / "bin"

    @property
    def plugin(self) -> Path:
        return self.prefix / "lib" / "spank_oci_image.so"

    @property
    def step_client(self) -> Path:
        return self.bin / "oci-image-step"

    @property
    def launcher(self) -> Path:
        return self.bin / "oci-image-launch"


@pytest.fixture(scope="session")
def installed():
    prefix = Path(tempfile.mkdtemp(prefix="oci-install-", dir="/tmp"))
    os.chmod(prefix, 0o755)
    subprocess.run([str(ROOT / "scripts" / "install-local.sh"), str(prefix)], check=True,
                   capture_output=True)
    yield Installed(prefix)
    shutil.rmtree(prefix, ignore_errors=True)
