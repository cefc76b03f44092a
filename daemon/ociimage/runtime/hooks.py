"""Step hooks: admin-provided executables run for each step after its mount
namespace is built and before any task enters it ([daemon] hooks_dir, default
/etc/oci-image/hooks.d). See docs/hooks.md for the contract; in short:

- Every regular, executable file in hooks_dir whose name does not start with
  '.' nor end with '~', '.rpmnew', '.rpmsave', '.dpkg-*' runs, in sorted
  (byte) order, as root, with stdin /dev/null, cwd /, and ONLY this environment:

    PATH, LC_ALL                  fixed values
    OCI_HOOK_PID                  the process holding the step's mount namespace
    OCI_HOOK_NS                   /proc/<pid>/ns/mnt: `nsenter --mount=$OCI_HOOK_NS ...`
                                  or setns() to act inside the container
    OCI_HOOK_ROOTFS               /proc/<pid>/root: the container's root seen from
                                  the host (read or write files; mounts need the ns)
    OCI_HOOK_JOB_ID OCI_HOOK_STEP_ID OCI_HOOK_UID OCI_HOOK_GID OCI_HOOK_USER
    OCI_HOOK_HOME OCI_HOOK_NODE
    OCI_HOOK_IMAGE_DIGEST         the image's manifest digest
    OCI_HOOK_IMAGE_CONFIG         a JSON file: the image's config (Env, Entrypoint, ...)
    OCI_HOOK_JOB_ENV              a file: the job's environment, NUL-separated NAME=VALUE
    OCI_HOOK_STATE_DIR            a root-only directory for this step, removed with it
    OCI_HOOK_USER_MOUNTS          JSON list of the container paths the user controls
                                  (home, --oci-mounts): never write below them as root
    plus the job's variables a hook needs directly: SLURM_* (not SLURM_CONF: a
    root hook must not run Slurm commands against a configuration the user chose), CUDA_VISIBLE_DEVICES,
    GPU_DEVICE_ORDINAL, ROCR_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES,
    NVIDIA_DRIVER_CAPABILITIES, PMI_*, PMIX_* (never PATH, LD_* or the like:
    hooks run as root and the job's environment is the user's to set).

- A hook that exits non-zero, or runs longer than [daemon] hooks_timeout
  (default 60 s; its process group is then killed), fails the step: the user
  sees "step hook NAME: <last line of its stderr>", the namespace is destroyed
  and no task runs. The remaining hooks are not run. stdout and stderr go to
  the daemon's log.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..errors import RuntimeSetupError

log = logging.getLogger("ociimage.runtime")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PASS_EXACT = frozenset(("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES",
                         "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"))
_PASS_PREFIX = ("SLURM_", "PMI_", "PMIX_")
_NEVER = frozenset(("SLURM_CONF",))
_SKIP_SUFFIX = ("~", ".rpmnew", ".rpmsave", ".rpmorig", ".swp", ".bak")


class HookFailed(RuntimeSetupError):
    pass


def list_hooks(hooks_dir: Path) -> List[Path]:
    """The hooks that run, in order. A hook others could modify is refused (it runs as root)."""
    try:
        names = sorted(os.listdir(hooks_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        if name.startswith(".") or name.endswith(_SKIP_SUFFIX) or ".dpkg-" in name:
            continue
        p = Path(hooks_dir) / name
        try:
            st = os.stat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            continue  # helper files (e.g. a shared module) and disabled hooks
        for q, s in ((p, st), (Path(hooks_dir), os.stat(hooks_dir))):
            if s.st_uid != 0 or s.st_mode & 0o022:
                raise HookFailed(f"step hook {name}: refused: {q} must be owned by root and "
                                 f"not writable by group or others")
        out.append(p)
    return out


def hook_environment(*, pid: int, job_id: str, step_id: str, uid: int, gid: int, user: str,
                     home: str, node: str, digest: str, config_path: Path, job_env_path: Path,
                     state_dir: Path, job_env: Mapping[str, str],
                     user_mounts: Sequence[str] = ()) -> Dict[str, str]:
    env = {k: v for k, v in job_env.items()
           if (k in _PASS_EXACT or k.startswith(_PASS_PREFIX)) and k not in _NEVER
           and "\0" not in v}
    env.update({
        "PATH": SAFE_PATH, "LC_ALL": "C.UTF-8",
        "OCI_HOOK_PID": str(pid), "OCI_HOOK_NS": f"/proc/{pid}/ns/mnt",
        "OCI_HOOK_ROOTFS": f"/proc/{pid}/root",
        "OCI_HOOK_JOB_ID": job_id, "OCI_HOOK_STEP_ID": step_id,
        "OCI_HOOK_UID": str(uid), "OCI_HOOK_GID": str(gid), "OCI_HOOK_USER": user,
        "OCI_HOOK_HOME": home, "OCI_HOOK_NODE": node, "OCI_HOOK_IMAGE_DIGEST": digest,
        "OCI_HOOK_IMAGE_CONFIG": str(config_path), "OCI_HOOK_JOB_ENV": str(job_env_path),
        "OCI_HOOK_STATE_DIR": str(state_dir),
        "OCI_HOOK_USER_MOUNTS": json.dumps(list(user_mounts)),
    })
    return env


def _last_line(data: bytes) -> str:
    lines = [l.strip() for l in data.decode("utf-8", "replace").splitlines() if l.strip()]
    return lines[-1][:500] if lines else ""


def run_hooks(hooks: List[Path], env: Dict[str, str], timeout: float, *, job: str = "",
              step: str = "") -> None:
    for hook in hooks:
        t0 = time.monotonic()
        p = subprocess.Popen([str(hook)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd="/", start_new_session=True,
                             close_fds=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = p.communicate()
            log.warning("step hook timed out", extra={"hook": hook.name, "job": job, "step": step,
                                                      "stderr": err.decode(errors="replace")[-2000:]})
            raise HookFailed(f"step hook {hook.name}: timed out after {timeout:.0f} s") from None
        outcome("step hook", hook.name, p.returncode, out, err, t0, job, step)


def outcome(kind: str, name: str, status: int, out: bytes, err: bytes, t0: float, job: str,
            step: str) -> None:
    """Log a finished hook (a site's or a CDI spec's); HookFailed with its stderr's last line
    if it failed."""
    extra = {"hook": name, "job": job, "step": step, "status": status,
             "seconds": round(time.monotonic() - t0, 3)}
    if out.strip():
        extra["stdout"] = out.decode(errors="replace")[-2000:]
    if err.strip():
        extra["stderr"] = err.decode(errors="replace")[-2000:]
    if status != 0:
        log.warning(f"{kind} failed", extra=extra)
        why = _last_line(err) or (f"killed by signal {-status}" if status < 0
                                  else f"exited with status {status}")
        raise HookFailed(f"{kind} {name}: {why}")
    log.info(f"{kind} ran", extra=extra)


def run_for_step(config, ns_path, request, digest: str, image_config: Optional[dict],
                 user_mounts: Sequence[str] = ()) -> None:
    """Run the site's hooks for a freshly built step namespace; on failure destroy it and raise."""
    hooks_dir = Path(getattr(config, "hooks_dir", "/etc/oci-image/hooks.d"))
    from .namespaces import destroy_step_namespace, holder_of
    ns_path = Path(ns_path)
    try:
        hooks = list_hooks(hooks_dir)
        if not hooks:
            return
        pid = holder_of(ns_path)
        if pid is None:
            raise HookFailed("the step's namespace went away before its hooks ran")
        state = ns_path.parent / "hooks"
        state.mkdir(mode=0o700, exist_ok=True)
        cfg_path = state / "image-config.json"
        cfg_path.write_text(json.dumps(image_config or {}, sort_keys=True))
        env_path = state / "job-env"
        job_env = dict(request.environment)
        env_path.write_bytes(b"".join(f"{k}={v}".encode("utf-8", "surrogateescape") + b"\0"
                                      for k, v in sorted(job_env.items())))
        env = hook_environment(
            pid=pid, job_id=request.job_id, step_id=request.step_id, uid=request.uid,
            gid=request.gid, user=request.user_name or f"user{request.uid}",
            home=request.home or "/", node=request.node or getattr(config, "node", ""),
            digest=digest, config_path=cfg_path, job_env_path=env_path, state_dir=state,
            job_env=job_env, user_mounts=user_mounts)
        run_hooks(hooks, env, float(getattr(config, "hooks_timeout", 60.0)),
                  job=request.job_id, step=request.step_id)
    except BaseException:
        try:
            destroy_step_namespace(ns_path)
        except Exception:  # noqa: BLE001 - the hook's error is the one to report
            log.exception("cannot destroy the namespace of a step whose hook failed")
        raise
