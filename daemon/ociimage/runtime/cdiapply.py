"""A step's CDI devices: which ones (--oci-devices, and the GPUs Slurm allocated when
[daemon] gpu_cdi_kind is set), resolved against this node's CDI specs (cdi.py) into
what the step's namespace needs: the device nodes to make in its /dev, the binds,
the tasks' environment, and the hooks (cdihooks.py runs those).

Everything here is the admin's: the spec files are root's (cdi.py refuses others),
so their host paths are stat'ed and opened as root. Only the device names are the
user's, and a name only selects among the devices the admin's specs define.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..errors import InvalidArgument, NotFound
from . import cdi
from .mounts import read_mountinfo

#: where Slurm's gres/gpu plugin puts the step's GPUs (the node's indices, gres.conf
#: order): a step's own; the batch script's are the job's. Not SLURM_JOB_GPUS for other
#: steps: the batch script's environment passes it on to steps that may have no GPUs.
#: Not CUDA_VISIBLE_DEVICES: renumbered from 0 in a step whose devices are constrained.
STEP_GPUS = "SLURM_STEP_GPUS"
JOB_GPUS = "SLURM_JOB_GPUS"

HOST_DEV = "/dev"

log = logging.getLogger("ociimage.runtime")


class NodeToMake(NamedTuple):
    """A CDI device node the host's /dev lacks (or has as another device): made in the
    step's own /dev (mountplan: an overlay over the host's), never on the host."""
    path: str       # in the container, below /dev
    mode: int       # S_IFCHR/S_IFBLK/S_IFIFO | permission bits
    rdev: int
    uid: int
    gid: int


class StepDevices(NamedTuple):
    edits: cdi.Edits
    make: Tuple[NodeToMake, ...] = ()   # device nodes missing from the host's /dev


def gpu_devices(env: Mapping[str, str], kind: str, batch: bool = False) -> List[str]:
    """KIND=INDEX for each GPU Slurm allocated to the step, from the job's environment."""
    if not kind:
        return []
    for name in (STEP_GPUS, JOB_GPUS) if batch else (STEP_GPUS,):
        value = env.get(name, "").strip()
        if not value:
            continue
        out = []
        for item in value.split(","):
            item = item.strip()
            if not item.isdigit():  # e.g. "N/A": not a list of indices
                return []
            if f"{kind}={int(item)}" not in out:
                out.append(f"{kind}={int(item)}")
        return out
    return []


def step_device_names(requested: Sequence[str], env: Mapping[str, str], kind: str,
                      batch: bool = False) -> List[str]:
    out: List[str] = []
    for name in list(requested) + gpu_devices(env, kind, batch):
        if name not in out:
            out.append(name)
    return out


def _dirs(dirs: Sequence[str]) -> str:
    return " ".join(dirs)


def resolve(names: Sequence[str], dirs: Sequence[str], node: str) -> StepDevices:
    """The edits of these devices on this node; one line naming the device, the node and
    the spec directories when one is unknown or unusable."""
    registry = cdi.Registry(dirs)
    for e in registry.errors:  # the admin's to fix; the user sees them only when it matters
        log.warning("CDI spec refused", extra={"error": str(e)})
    where = f"on node {node}" if node else "on this node"
    try:
        edits = registry.resolve(names)
    except cdi.InvalidDeviceName as e:
        raise InvalidArgument(f'--oci-devices: "{e.name}" is not a qualified CDI device name '
                              f"(vendor/class=name): {e.reason}") from None
    except cdi.UnknownDevice as e:
        broken = f"; unreadable specs: {registry.errors[0]}" if registry.errors else ""
        raise NotFound(f"--oci-devices: no CDI spec {where} defines {e.name} (spec dirs: "
                       f"{_dirs(registry.dirs)}{broken})",
                       hint="`oci-image devices` lists the devices this node defines") from None
    except cdi.DeviceConflict as e:
        raise InvalidArgument(f"--oci-devices: {e} {where}") from None
    if edits.intel_rdt is not None or edits.net_devices:
        raise InvalidArgument(f"--oci-devices: {', '.join(edits.devices)} {where} need "
                              f"intelRdt or netDevices, which oci-image does not provide")
    for h in edits.hooks:
        if h.hook_name not in ("prestart", "createRuntime", "createContainer", "startContainer"):
            raise InvalidArgument(f"--oci-devices: a CDI hook of {', '.join(edits.devices)} "
                                  f"{where} is a {h.hook_name} hook, which oci-image does not run")
    for m in edits.mounts:
        if m.type not in (None, "bind", "none") and not ({"bind", "rbind"} & set(m.options)):
            raise InvalidArgument(f"--oci-devices: CDI mount {m.container_path} {where} is of "
                                  f"type {m.type}: only bind mounts are supported")
    return StepDevices(edits, tuple(_nodes_to_make(edits.device_nodes, where)))


def _container_dev_path(path: str, where: str) -> str:
    p = os.path.normpath(path)
    if not p.startswith(HOST_DEV + "/") or "/../" in path + "/":
        raise InvalidArgument(f"--oci-devices: CDI device node {path} {where} is not below "
                              f"/dev: oci-image makes device nodes in the container's /dev only")
    return p


def _nodes_to_make(nodes: Sequence[cdi.DeviceNode], where: str) -> List[NodeToMake]:
    out: List[NodeToMake] = []
    submounts = [e.mount_point for e in read_mountinfo()
                 if e.mount_point.startswith(HOST_DEV + "/")] if nodes else []
    for n in nodes:
        path = _container_dev_path(n.path, where)
        host = _lstat(n.host_path)
        dtype = n.type
        major, minor, mode = n.major, n.minor, n.file_mode
        if host is not None and (stat.S_ISCHR(host.st_mode) or stat.S_ISBLK(host.st_mode)
                                 or stat.S_ISFIFO(host.st_mode)):
            # the reference fills what the spec leaves out from the host's node
            if dtype is None:
                dtype = "b" if stat.S_ISBLK(host.st_mode) else \
                    "p" if stat.S_ISFIFO(host.st_mode) else "c"
            if major is None and minor is None and dtype != "p":
                major, minor = os.major(host.st_rdev), os.minor(host.st_rdev)
            if mode is None:
                mode = stat.S_IMODE(host.st_mode)
            # and its owner (a render node is root:render 0660: the group is what opens it)
            uid = host.st_uid if n.uid is None else n.uid
            gid = host.st_gid if n.gid is None else n.gid
        else:
            uid, gid = n.uid or 0, n.gid or 0
        if dtype is None:
            raise NotFound(f"--oci-devices: CDI device node {n.path} {where}: its host node "
                           f"{n.host_path} does not exist and the spec gives no type")
        if dtype != "p" and (major is None or minor is None):
            raise InvalidArgument(f"--oci-devices: CDI device node {n.path} {where}: no "
                                  f"major/minor in the spec and no host node {n.host_path}")
        fmt = stat.S_IFBLK if dtype == "b" else stat.S_IFIFO if dtype == "p" else stat.S_IFCHR
        rdev = os.makedev(major, minor) if dtype != "p" else 0
        if _present(path, fmt, rdev):
            continue  # the host's /dev has it already, the container's /dev is that
        for mp in submounts:
            if path == mp or path.startswith(mp + "/"):
                # bound into the step's /dev as it is: a node made there would be the host's
                raise InvalidArgument(f"--oci-devices: CDI device node {n.path} {where} is "
                                      f"inside {mp}, a mount of the host's /dev: oci-image "
                                      f"cannot make it there without making it on the host")
        out.append(NodeToMake(path, fmt | (0o666 if mode is None else mode), rdev, uid, gid))
    return out


def _lstat(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _present(path: str, fmt: int, rdev: int) -> bool:
    st = _lstat(path)
    return (st is not None and stat.S_IFMT(st.st_mode) == fmt
            and (fmt == stat.S_IFIFO or st.st_rdev == rdev))
