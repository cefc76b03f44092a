"""pytest fixtures for a real local multi-node Slurm cluster (scripts/localcluster.py).

Use from any test module (conftest.py is not involved):

    from cluster_fixture import local_cluster          # default: 3 nodes, empty plugstack

    def test_x(local_cluster):
        r = local_cluster.run_as_user(["srun", "-N3", "hostname"])

or build a cluster of your own (e.g. with a plugstack.conf that loads the plugin):

    from cluster_fixture import cluster_fixture
    my_cluster = cluster_fixture(nodes=3, plugstack_text="required /x.so step_client=/y\n")

Each fixture is session-scoped: started once in a fresh directory under /tmp
(the unprivileged test user must be able to read it, which pytest's own
0700 tmp dirs do not allow), stopped at the end of the session and its
directory removed (set OCI_KEEP_CLUSTER=1 to keep it for debugging).
Tests are skipped when not root or when Slurm is not installed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import localcluster  # noqa: E402
from localcluster import LocalCluster  # noqa: E402,F401


def cluster_available() -> Optional[str]:
    """None when a local cluster can run here, else the reason to skip."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root"
    for b in ("slurmctld", "slurmd", "munged", "srun", "runuser"):
        if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}"):
            return f"{b} not installed"
    return None


def start_cluster(nodes: int = 3, plugstack_text: Union[str, Callable[[Path], str], None] = None,
                  prolog: Optional[str] = None, epilog: Optional[str] = None,
                  extra_conf: Sequence[str] = (), prefix: str = "oci-lc-",
                  **cluster_kw) -> LocalCluster:
    """Start a cluster in a fresh /tmp dir.  plugstack_text may be a callable
    taking the state dir (to place files there) and returning the text."""
    reason = cluster_available()
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(state, 0o755)
    c = LocalCluster(state, nodes=nodes, prolog=prolog, epilog=epilog, extra_conf=extra_conf,
                     **cluster_kw)
    if plugstack_text is not None:
        text = plugstack_text(state) if callable(plugstack_text) else plugstack_text
        c.set_plugstack(text)
    try:
        c.start()
    except Exception:
        c.stop(quiet=True)
        raise
    return c


def stop_cluster(c: LocalCluster) -> None:
    c.stop(quiet=True)
    if not os.environ.get("OCI_KEEP_CLUSTER"):
        shutil.rmtree(c.state_dir, ignore_errors=True)


def cluster_fixture(nodes: int = 3, plugstack_text=None, scope: str = "session", **kw):
    """A pytest fixture yielding a started LocalCluster; stopped at teardown."""

    @pytest.fixture(scope=scope)
    def _fixture():
        c = start_cluster(nodes=nodes, plugstack_text=plugstack_text, **kw)
        try:
            yield c
        finally:
            stop_cluster(c)

    return _fixture


local_cluster = cluster_fixture()


def as_user(argv: Sequence[str], uid: int, gid: int) -> list:
    """argv to run as uid:gid with no supplementary groups (setpriv execs it: same pid).

    Not subprocess's user=/group=/extra_groups=: with those CPython fork()s instead of
    vfork()ing, and in a test process that has talked gRPC to a daemon, Debian 13's and
    unstable's grpcio make that fork() wait for ever in gRPC's fork handler ("Waiting for
    thread pool to idle before forking")."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]
