import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from registry_server import RegistryServer  # noqa: E402


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A plain (no auth) docker-registry on loopback shared by the session."""
    with RegistryServer(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture
def fresh_registry(tmp_path):
    """A registry of its own, for tests that count requests."""
    with RegistryServer(tmp_path / "registry") as reg:
        yield reg
