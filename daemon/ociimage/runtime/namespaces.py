"""A private mount namespace per job step, with the image as its root.

Layout on the host, per step, under state_dir/<job>.<step>/:
    mnt      a symlink to /proc/<holder>/ns/mnt: the process that built the
             namespace stays as its holder (asleep, in its own session) until
             the step is released; tasks enter with open(mnt) +
             setns(CLONE_NEWNS) + chdir(cwd)
    holder   "<pid> <ns inode> <start time>", so a holder is only ever killed or
             adopted after checking it still holds this namespace (nsholder.py)
    root/    the new root, rw/ the tmpfs for an overlay's upper layer: both
             stay empty on the host, their mounts exist only in the namespace
    passwd, group   the generated files bind-mounted over the image's

How the namespace is built: the parent (the daemon) plans everything first
(mountplan.py: resolving paths, checking user mounts; here: generating passwd/group)
into a flat list of primitive operations; a forked child (nsbuild.py) unshares,
makes every mount private (so nothing propagates back to the host or to other
steps), runs the operations, pivots into the new root and detaches the host's
tree, then stays asleep as the namespace's holder. (Pinning by bind-mounting the ns file
instead fails with EINVAL at random when the daemon itself runs in a nested
mount namespace, as in a container: the kernel refuses a bind that could loop
when namespace ids compare the wrong way.) The daemon is a multi-threaded gRPC server,
so the child runs nothing but system calls (no logging, no locks, no
allocation-heavy work) and reports failure through a pipe as one line.
"""

from __future__ import annotations

import grp
import logging
import os
import select
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from .. import asuser
from ..errors import InvalidArgument, NotFound
from . import users
from .containerpaths import read_image_file
from .mountplan import Op, StepSpec, close_sources, describe_op, open_sources, plan_step
from .mounts import MountError, read_mountinfo
from .nsholder import holder_info, holder_of, kill_holder, kill_verified, record_holder

log = logging.getLogger("ociimage.runtime")

_CHILD_TIMEOUT = 60.0
NS_FILE = "mnt"

__all__ = ["NS_FILE", "StepSpec", "StepNamespace", "create_step_namespace",
           "destroy_step_namespace", "list_step_namespaces", "cleanup_stale", "holder_info",
           "holder_of"]


@dataclass(frozen=True)
class StepNamespace:
    ns_path: Path
    cwd: str
    user_mounts: Tuple[str, ...] = ()  # container paths the user controls (home, --oci-mounts)
    placeholder: Optional[str] = None  # the submit directory, made empty (plan_submit_dir)
    submit_visible: bool = False       # the tasks start in the submit directory (or its bind)
    userns_fd: int = -1                # --oci-remap-root: the holder's descriptor of it


# ---- the state dir ----------------------------------------------------------

def _step_dir(state_dir: Path, job_id: str, step_id: str) -> Path:
    name = f"{job_id}.{step_id}"
    if not job_id or not step_id or "/" in name or name.startswith(".") or "\0" in name:
        raise InvalidArgument(f"invalid job/step id {job_id!r}.{step_id!r}")
    return Path(state_dir) / name


# ---- create / destroy ---------------------------------------------------------

def _read_line(fd: int, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise MountError("building the step namespace timed out")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace").strip()


def create_step_namespace(spec: StepSpec, state_dir: Path) -> StepNamespace:
    """Build and pin the step's mount namespace; returns its ns file and the task cwd."""
    t0 = time.monotonic()
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # canonical, so the builder can refuse any symlink below it (RESOLVE_NO_SYMLINKS)
    state_dir = Path(os.path.realpath(state_dir))
    step_dir = _step_dir(state_dir, spec.job_id, spec.step_id)
    ns_path = step_dir / NS_FILE
    if step_dir.exists():
        if holder_of(ns_path) is not None:
            raise InvalidArgument(f"step {spec.job_id}.{spec.step_id} already has a namespace")
        _remove_step_dir(step_dir)
    if not os.path.isdir(spec.rootfs):
        raise NotFound(f"image root {spec.rootfs} is not mounted")

    group_name = spec.group_name
    if not group_name:
        try:
            group_name = grp.getgrgid(spec.gid).gr_name
        except (KeyError, OverflowError):
            group_name = f"group{spec.gid}"
    if spec.remap_root:  # the user is uid 0 in there: root, as the image names it
        passwd = users.make_passwd(read_image_file(spec.rootfs, "/etc/passwd"), "root", 0, 0,
                                   "/root")
        group = users.make_group(read_image_file(spec.rootfs, "/etc/group"), "root", 0)
    else:
        passwd = users.make_passwd(read_image_file(spec.rootfs, "/etc/passwd"), spec.user_name,
                                   spec.uid, spec.gid, spec.home or "/")
        group = users.make_group(read_image_file(spec.rootfs, "/etc/group"), group_name,
                                 spec.gid)
    sources = open_sources(spec)
    try:
        plan = plan_step(spec, step_dir, sources)
        step_dir.mkdir(mode=0o700)
        try:
            (step_dir / "root").mkdir(mode=0o755)
            (step_dir / "rw").mkdir(mode=0o700)
            for name, text in (("passwd", passwd), ("group", group)):
                p = step_dir / name
                p.write_bytes(text.encode("utf-8", "surrogateescape"))
                os.chmod(p, 0o644)
            userns_fd = _build(plan.ops, ns_path)
        except BaseException:
            _remove_step_dir(step_dir)
            raise
    finally:
        close_sources(sources)
    log.info("step namespace created",
             extra={"job": spec.job_id, "step": spec.step_id, "ns": str(ns_path),
                    "cwd": plan.cwd, "overlay": plan.overlay,
                    "seconds": round(time.monotonic() - t0, 3)})
    return StepNamespace(ns_path, plan.cwd, plan.user_mounts, plan.placeholder,
                         plan.submit_visible, userns_fd)


#: the operations whose failures are the user's to read as they are (--oci-remap-root's)
_SAID_AS_IS = ("userns", "idmap")


def _build(ops: List[Op], ns_path: Path) -> int:
    """Run the builder; returns the holder's descriptor of the user namespace, or -1."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        # forked by the single-threaded as-user helper: cheap, and no fork from a gRPC
        # thread (which hangs with Debian 13's grpcio)
        asuser.spawn_builder(ops, report_w, go_r)
    except BaseException:
        for fd in (report_r, report_w, go_r, go_w):
            os.close(fd)
        raise
    os.close(report_w)
    os.close(go_r)
    pid = 0
    try:
        try:
            line = _read_line(report_r, _CHILD_TIMEOUT)
        finally:
            os.close(report_r)
        word, _, rest = line.partition(" ")
        pid_s, _, userns_s = rest.partition(" ")
        if word == "OK" and pid_s.isdigit() and userns_s.lstrip("-").isdigit():
            pid = int(pid_s)
        else:
            _, _, rest = line.partition(" ")
            idx, _, rest = rest.partition(" ")
            err, _, msg = rest.partition(" ")
            where = ops[int(idx)] if idx.lstrip("-").isdigit() and 0 <= int(idx) < len(ops) else None
            hint = f"while doing: {describe_op(where)}" if where else ""
            if not line:
                msg = "the namespace builder died"
            if where and where[0] in _SAID_AS_IS and msg.startswith("--oci-remap-root:"):
                raise MountError(msg)  # userns.UserNamespaceRefused: the user's line as it is
            raise MountError(f"cannot build the step namespace: {msg}", hint=hint)
        record_holder(ns_path.parent, pid)
        os.symlink(f"/proc/{pid}/ns/mnt", ns_path)
        # Only now, recorded, may it hold the namespace: had we died before this
        # byte, it would see EOF and exit rather than hold it for nobody.
        os.write(go_w, b"x")
        return int(userns_s)
    except BaseException:
        if pid:
            kill_holder(pid)
        raise
    finally:
        os.close(go_w)



def destroy_step_namespace(ns_path: Union[str, Path]) -> None:
    """Let the step's namespace go and remove its state; safe to call twice.

    Tasks still inside keep the namespace alive until they exit; the mounts in
    it (overlay, tmpfs) go away with the last of them.
    """
    ns_path = Path(ns_path)
    if ns_path.name != NS_FILE:
        raise InvalidArgument(f"{ns_path} is not a step namespace file")
    holder = holder_info(ns_path)
    if holder is not None:
        kill_verified(ns_path, holder)
    _remove_step_dir(ns_path.parent)
    log.info("step namespace destroyed", extra={"ns": str(ns_path)})


def _remove_step_dir(step_dir: Path) -> None:
    if not step_dir.exists():
        return
    prefix = os.path.realpath(step_dir) + "/"
    busy = [e.mount_point for e in read_mountinfo() if e.mount_point.startswith(prefix)
            or e.mount_point == prefix[:-1]]
    if busy:
        raise MountError(f"cannot remove {step_dir}: still mounted: {', '.join(busy)}")
    shutil.rmtree(step_dir, ignore_errors=True)


def list_step_namespaces(state_dir: Union[str, Path]) -> Dict[str, Path]:
    """'<job>.<step>' -> ns file, for every step under state_dir whose namespace is held."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return {}
    return {d.name: d / NS_FILE for d in sorted(state_dir.iterdir())
            if d.is_dir() and holder_of(d / NS_FILE) is not None}


def cleanup_stale(state_dir: Union[str, Path], keep: Iterable[Union[str, Path]]) -> List[str]:
    """Destroy every step state under state_dir not named in keep ('<job>.<step>' or ns paths)."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    names = set()
    for k in keep:
        p = Path(k)
        names.add(p.parent.name if p.name == NS_FILE else str(k))
    removed = []
    for d in sorted(state_dir.iterdir()):
        if d.name in names or not d.is_dir() or d.is_symlink():
            continue
        try:
            destroy_step_namespace(d / NS_FILE)
            removed.append(d.name)
        except MountError as e:
            log.warning("cannot clean up stale step", extra={"step": d.name, "error": str(e)})
    return removed
