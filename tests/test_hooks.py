"""Step hooks without a cluster: the [daemon] hooks_dir/hooks_timeout keys, which files
run and in what order, the environment they get, failures and timeouts."""

import json
import os
import time
from pathlib import Path

import pytest

from ociimage.config import load_config
from ociimage.errors import ConfigError
from ociimage.runtime.hooks import HookFailed, hook_environment, list_hooks, run_hooks


def test_config_keys(tmp_path):
    c = tmp_path / "c.conf"
    c.write_text("[daemon]\n")
    assert load_config(c).hooks_dir == Path("/etc/oci-image/hooks.d")
    c.write_text("[daemon]\nhooks_dir = /srv/hooks\nhooks_timeout = 5\n")
    cfg = load_config(c)
    assert cfg.hooks_dir == Path("/srv/hooks") and cfg.hooks_timeout == 5.0
    c.write_text("[daemon]\nhooks_dir = relative/dir\n")
    with pytest.raises(ConfigError, match="hooks_dir"):
        load_config(c)
    c.write_text("[daemon]\nhooks_timeout = 0\n")
    with pytest.raises(ConfigError, match="hooks_timeout"):
        load_config(c)


def _hook(d: Path, name: str, text: str, mode=0o755) -> Path:
    p = d / name
    p.write_text(text)
    os.chmod(p, mode)
    return p


@pytest.mark.skipif(os.geteuid() != 0, reason="hooks must be owned by root")
def test_which_hooks_run_in_order(tmp_path):
    d = tmp_path / "hooks.d"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    out = tmp_path / "out"
    for name in ("20-b", "10-a", "10-a~", ".hidden", "x.rpmnew", "30-c.dpkg-old"):
        _hook(d, name, f"#!/bin/sh\necho {name} >> {out}\n")
    _hook(d, "lib.py", "not executable\n", 0o644)
    assert [p.name for p in list_hooks(d)] == ["10-a", "20-b"]
    run_hooks(list_hooks(d), {"PATH": "/usr/bin:/bin"}, 10)
    assert out.read_text() == "10-a\n20-b\n"
    assert list_hooks(tmp_path / "missing") == []
    os.chmod(d / "20-b", 0o775)
    with pytest.raises(HookFailed, match="20-b: refused"):
        list_hooks(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="hooks must be owned by root")
def test_failure_and_timeout_messages(tmp_path):
    d = tmp_path
    os.chmod(d, 0o755)
    bad = _hook(d, "bad", "#!/bin/sh\necho one >&2\necho 'the real reason' >&2\nexit 4\n")
    with pytest.raises(HookFailed) as e:
        run_hooks([bad], {}, 10)
    assert str(e.value) == "step hook bad: the real reason"
    quiet = _hook(d, "quiet", "#!/bin/sh\nexit 5\n")
    with pytest.raises(HookFailed, match="quiet: exited with status 5"):
        run_hooks([quiet], {}, 10)
    slow = _hook(d, "slow", "#!/bin/sh\nsleep 30 &\nsleep 30\n")
    t0 = time.monotonic()
    with pytest.raises(HookFailed, match="slow: timed out after 1 s"):
        run_hooks([slow], {}, 1)
    assert time.monotonic() - t0 < 5  # the whole process group is killed


def test_environment_passes_only_what_hooks_need(tmp_path):
    env = hook_environment(pid=42, job_id="7", step_id="0", uid=1000, gid=1000, user="alice",
                           home="/home/alice", node="n1", digest="sha256:ab",
                           config_path=tmp_path / "c.json", job_env_path=tmp_path / "e",
                           state_dir=tmp_path, job_env={
                               "SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1",
                               "PMI_FD": "5", "PMIX_RANK": "0", "LD_PRELOAD": "/evil.so",
                               "PATH": "/evil", "PYTHONPATH": "/evil", "HOME": "/x",
                               "SLURM_CONF": "/home/alice/evil.conf"},
                           user_mounts=["/home/alice", "/data"])
    assert env["OCI_HOOK_NS"] == "/proc/42/ns/mnt" and env["OCI_HOOK_ROOTFS"] == "/proc/42/root"
    assert env["OCI_HOOK_PID"] == "42" and env["OCI_HOOK_USER"] == "alice"
    assert env["SLURM_JOB_GPUS"] == "0,1" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["PMI_FD"] == "5" and env["PMIX_RANK"] == "0"
    assert "LD_PRELOAD" not in env and "PYTHONPATH" not in env and "HOME" not in env
    assert not env["PATH"].startswith("/evil")
    assert "SLURM_CONF" not in env  # a root hook must not use the user's Slurm configuration
    assert json.loads(env["OCI_HOOK_USER_MOUNTS"]) == ["/home/alice", "/data"]
