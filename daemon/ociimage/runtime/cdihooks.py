"""The CDI specs' hooks (createRuntime, createContainer, startContainer; prestart, their
old name), run for a step once its namespace is built, before the site's hooks.

They run like the site's step hooks (hooks.py): as root, from the host, with stdin,
cwd /, a timeout (the hook's own, else [daemon] hooks_timeout) and a failure that
fails the step with one line. As an OCI runtime would, each gets exactly the
environment the spec gives it (nothing of the daemon's, nothing of the user's) and
the container's state as JSON on stdin. The state's bundle is a directory in the
step's hook state dir whose config.json names the container's root as seen from the
host (/proc/<holder>/root), which is what tools such as `nvidia-ctk hook
update-ldcache` and `create-symlinks` read. All of them run from the host, the
createContainer and startContainer ones too (an OCI runtime would run those in the
container's mount namespace): a hook that must act inside uses that root, or
nsenter --mount=/proc/<pid>/ns/mnt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Sequence

from . import cdi
from .hooks import HookFailed, outcome


#: the order an OCI runtime runs them in
ORDER = ("prestart", "createRuntime", "createContainer", "startContainer")


def write_bundle(state_dir: Path, *, pid: int, container_id: str, env: Sequence[str],
                 cwd: str, uid: int, gid: int, annotations: Dict[str, str],
                 readonly: bool = True) -> Dict[str, object]:
    """A minimal OCI bundle (config.json) and the state an OCI runtime gives its hooks."""
    bundle = state_dir / "bundle"
    bundle.mkdir(mode=0o700, exist_ok=True)
    config = {"ociVersion": "1.0.2",
              "root": {"path": f"/proc/{pid}/root", "readonly": readonly},
              "process": {"user": {"uid": uid, "gid": gid}, "cwd": cwd or "/",
                          "env": list(env), "args": []},
              "hostname": os.uname().nodename, "annotations": annotations,
              "linux": {"namespaces": [{"type": "mount", "path": f"/proc/{pid}/ns/mnt"}]}}
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    return {"ociVersion": "1.0.2", "id": container_id, "status": "created", "pid": pid,
            "bundle": str(bundle), "annotations": annotations}


def run(hooks: Sequence[cdi.Hook], state: Dict[str, object], default_timeout: float, *,
        job: str = "", step: str = "") -> None:
    for kind in ORDER:
        # the OCI runtime spec's state: "creating" during create, "created" once started
        stdin = json.dumps(dict(state, status="created" if kind == "startContainer"
                                else "creating")).encode()
        for h in (h for h in hooks if h.hook_name == kind):
            _run_one(h, stdin, float(h.timeout or default_timeout), job, step)


def _run_one(h: cdi.Hook, stdin: bytes, timeout: float, job: str, step: str) -> None:
    argv = list(h.args) or [h.path]
    name = f"{h.hook_name} {os.path.basename(h.path)}" + (
        f" {argv[1]}" if len(argv) > 1 and not argv[1].startswith("-") else "")
    env = dict(e.split("=", 1) for e in h.env)
    t0 = time.monotonic()
    try:
        p = subprocess.Popen(argv, executable=h.path, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                             start_new_session=True, close_fds=True)
    except OSError as e:
        raise HookFailed(f"CDI hook {name}: cannot run {h.path}: {e.strerror}") from None
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.communicate()
        raise HookFailed(f"CDI hook {name}: timed out after {timeout:.0f} s") from None
    outcome("CDI hook", name, p.returncode, out, err, t0, job, step)
