"""Planning a step's mount tree: what to mount where, as a flat list of primitive operations.

The daemon plans everything before anything is mounted: it resolves every mount point
inside the image (containerpaths.py), checks the user's mounts against what they
opened as themselves, decides where missing mount points are created, and plans the
submit directory's placeholder. The result is a Plan, whose operations the namespace
builder (nsbuild.py, in a child that runs nothing but system calls) only obeys, in order.

The image root is read-only (a bind of the node's loop mount remounted
ro,nosuid,nodev). A mount target missing from the image cannot be created on
a read-only squashfs, so then — and when the step asked for a writable root —
the root is an overlay: the image as lowerdir, upper/work on a tmpfs that
lives and dies with the namespace. The missing mount points are created in
it, and unless the step is writable it is then remounted read-only, so the
user still gets EROFS. Missing mount points are never created in the user's
home or in a user mount's source on the host.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

from .. import asuser, mountflags
from ..errors import AccessDenied, InvalidArgument, NotFound, OciImageError
from . import syscalls as sc
from .containerpaths import (EMPTY_LAYER, OPAQUE_LAYER, fd_layer, join_path, lstat_entry,
                             resolve_in_root, split_path)
from .mounts import read_mountinfo

log = logging.getLogger("ociimage.runtime")


@dataclass
class StepSpec:
    job_id: str
    step_id: str
    uid: int
    gid: int
    user_name: str
    home: str
    rootfs: Path
    # (host src, dst, read_only[, options]): options, from mountflags.py: ("noexec",) or ()
    mounts: List[Tuple] = field(default_factory=list)
    writable: bool = False
    mount_home: bool = True
    workdir: Optional[str] = None
    host_cwd: str = "/"
    image_workdir: Optional[str] = None
    group_name: Optional[str] = None  # default: the host's name for gid, else "group<gid>"
    groups: Tuple[int, ...] = ()      # supplementary groups (default: the host's for the user)
    # the job's named container (named.py): its overlay, mounted once on the host and shared
    # by the job's steps on the node, is the step's writable root; planning still reads the
    # image (rootfs), which no task can change under it
    shared_root: Optional[Path] = None
    remap_root: bool = False          # uid 0 inside through a user namespace mapping only the user
    tmpfs: List[Tuple[str, Tuple[str, ...]]] = field(default_factory=list)  # (dst, options)
    chdir_given: bool = False  # host_cwd is srun --chdir's: the tasks start there or not at all
    # CDI (cdiapply.py): device nodes the host's /dev lacks, made in the step's own /dev
    # (NodeToMake), and the specs' binds (cdi.Mount): the admin's, opened as root
    device_nodes: Tuple = ()
    device_mounts: Tuple = ()

    def identity(self) -> asuser.Identity:
        if self.groups:
            return asuser.Identity(self.uid, self.gid, tuple(self.groups))
        return asuser.Identity.of_user(self.uid, self.gid)


# ("mount", src, target, fstype, flags, data) | ("mkdir", path, mode) | ("mkfile", path)
# | ("bindfd", fd, target, read_only, canonical, legacy)
# | ("setattr", target, attrs, legacy_flags, name, legacy) | ("pivot", root)
# | ("userns", uid, gid) | ("idmap", source mount, target) | ("chown", path, uid, gid)
# (legacy: without the new mount API; decided when planning, the builder only obeys)
Op = tuple

#: Mount user binds with open_tree/mount_setattr/move_mount (Linux >= 5.12). Without
#: it a bind is non-recursive (its submounts, whose flags a remount would not change,
#: stay behind) and made from a descriptor reopened and checked to be the same file.
USE_MOUNT_API = sc.have_mount_api()


def describe_op(op: Op) -> str:
    if op[0] == "mount":
        return f"mount {op[1]} on {op[2]}"
    if op[0] == "bindfd":
        return f"bind {op[4]} on {op[2]}"
    return f"{op[0]} {op[1]}"


def _mem_total() -> int:
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def _check_abs(what: str, path: str) -> str:
    if not path or not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    return os.path.normpath(path)


def _overlay_safe(path: str) -> str:
    if any(c in path for c in ",:\\\n"):
        raise InvalidArgument(f"path {path!r} cannot be used in overlay options")
    return path


@dataclass(frozen=True)
class OverlayLayers:
    """An overlay's directories, in one place: the per-step tmpfs layer (here) and the named
    containers' host mounts (named.py) both mount from one; lower may be swapped for another
    view of the image (an idmapped one)."""
    lower: str
    upper: str
    work: str

    def options(self) -> str:
        return (f"lowerdir={_overlay_safe(self.lower)},upperdir={_overlay_safe(self.upper)},"
                f"workdir={_overlay_safe(self.work)}")


@dataclass
class Plan:
    ops: List[Op]
    cwd: str
    overlay: bool
    user_mounts: Tuple[str, ...] = ()
    placeholder: Optional[str] = None
    submit_visible: bool = False


Sources = Mapping[str, Union[asuser.Opened, OciImageError]]


class _Planner:
    """sources: what the user named, opened as the user ("home", "cwd", "mount:<i>")."""

    def __init__(self, spec: StepSpec, step_dir: Path, sources: Sources):
        self.spec = spec
        self.sources = sources
        self.step_dir = step_dir
        self.root = str(step_dir / "root")
        self.rootfs = str(spec.rootfs)
        self.layers: Dict[str, str] = {}
        self.image_create: List[Tuple[str, str]] = []  # (kind, container path) in the image
        self.tmp_create: List[Tuple[str, str]] = []    # (kind, container path) in a tmpfs
        self.system: List[Op] = []
        self.user: List[Op] = []
        self.visible: List[Tuple[str, str]] = []  # (host dir, container dir) for the cwd
        self.user_targets: List[str] = []
        self.system_targets: List[str] = []
        self.placeholder: Optional[str] = None
        self.submit_visible = False
        self.tmpfs_targets: List[str] = []

    def target(self, cpath: str, want_dir: bool, what: str) -> str:
        """Canonical container path of a mount point, arranging for it to be created if missing."""
        r = resolve_in_root(self.rootfs, cpath, self.layers)
        kind = "dir" if want_dir else "file"
        if r.exists:
            if r.host is not None:
                is_dir = stat.S_ISDIR(lstat_entry(r.host)[0].st_mode)
                if is_dir != want_dir:
                    raise InvalidArgument(f"{what}: {r.path} is {'a' if is_dir else 'not a'} "
                                          f"directory in the container, its source is "
                                          f"{'' if want_dir else 'not '}one")
            return r.path
        if r.layer and self.layers.get(r.layer) != EMPTY_LAYER:
            raise NotFound(f"{what}: mount target {r.full} does not exist in the directory "
                           f"mounted at {r.layer}",
                           hint="the directory must exist in the mounted host directory")
        todo = self.tmp_create if r.layer else self.image_create
        for i in range(1, len(r.missing) + 1):
            k = kind if i == len(r.missing) else "dir"
            todo.append((k, join_path(r.path, *r.missing[:i])))
        return r.full

    def host(self, cpath: str) -> str:
        return self.root + cpath if cpath != "/" else self.root

    def plan_system(self) -> None:
        for name in ("/proc", "/sys", "/dev"):
            t = self.target(name, True, name)
            self.layers[t] = OPAQUE_LAYER
            self.system_targets.append(t)  # where they really are (the image may link them)
            if name == "/proc":
                # a proc of our own, with the host's hidepid=/gid=/subset= (per mount since 5.8)
                self.system.append(("mount", "proc", self.host(t), "proc",
                                    sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, host_proc_options()))
            else:
                if name == "/dev" and self.spec.device_nodes:
                    self.plan_dev_overlay(t)  # CDI device nodes the host's /dev lacks
                else:
                    self.system.append(("mount", name, self.host(t), None,
                                        sc.MS_BIND | sc.MS_REC, None))
                # the host's submounts of /dev and /sys (pts, mqueue, cgroup, securityfs, ...)
                # come along: none of them may honour setuid bits in here
                attrs = sc.MOUNT_ATTR_NOSUID | (sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
                                                if name == "/sys" else 0)
                legacy = sc.MS_NOSUID | (sc.MS_NODEV | sc.MS_NOEXEC if name == "/sys" else 0)
                self.system.append(("setattr", self.host(t), attrs, legacy, name,
                                    not USE_MOUNT_API))
            if name == "/dev" and os.path.isdir("/dev/shm") and not os.path.islink("/dev/shm"):
                # a per-step /dev/shm: shared by the step's tasks, freed with the step
                self.system.append(("mount", "shm", self.host(t) + "/shm", "tmpfs",
                                    sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"))
        t = self.target("/tmp", True, "/tmp")
        self.layers[t] = EMPTY_LAYER
        self.system.append(("mount", "tmpfs", self.host(t), "tmpfs",
                            sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"))

    def plan_dev_overlay(self, t: str) -> None:
        """/dev for a step with CDI device nodes the host's /dev lacks: an overlay with the
        host's /dev as its lower layer and a tmpfs of the step's as its upper, the host's
        /dev submounts (pts, mqueue, hugepages, ...) bound again on top (an overlay shows
        the lower filesystem only), and the missing nodes made in it. They land in the
        tmpfs: nothing is ever created in the host's /dev."""
        rw = str(self.step_dir / "devrw")
        dev = self.host(t)
        # no nodev on the upper layer: the nodes made there are opened through it
        self.system += [("mkdir", rw, 0o700),
                        ("mount", "tmpfs", rw, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755"),
                        ("mkdir", rw + "/upper", 0o755), ("mkdir", rw + "/work", 0o700),
                        ("mount", "overlay", dev, "overlay", sc.MS_NOSUID,
                         f"lowerdir=/dev,upperdir={_overlay_safe(rw)}/upper,workdir={rw}/work")]
        tops: List[str] = []
        for e in read_mountinfo():
            mp = e.mount_point
            if mp.startswith("/dev/") and not any(mp.startswith(x + "/") for x in tops) \
                    and mp not in tops:
                tops.append(mp)
        for mp in tops:
            if os.path.lexists(mp) and not os.path.islink(mp):  # a directory, or a file
                self.system.append(("mount", mp, dev + mp[len("/dev"):], None,
                                    sc.MS_BIND | sc.MS_REC, None))
        made = set()
        for n in self.spec.device_nodes:
            parts = split_path(n.path[len("/dev"):])
            for i in range(1, len(parts)):
                d = join_path("/", *parts[:i])
                if d not in made and not os.path.isdir("/dev" + d):
                    self.system.append(("mkdir", dev + d, 0o755))
                    made.add(d)
            self.system.append(("mknod", dev + join_path("/", *parts), n.mode, n.rdev,
                                n.uid, n.gid))

    def _source(self, key: str, src: str) -> asuser.Opened:
        o = self.sources.get(key)
        if isinstance(o, asuser.Opened):
            return o
        if isinstance(o, NotFound):
            raise NotFound(f"mount source {src} does not exist")
        if isinstance(o, AccessDenied):
            raise AccessDenied(f"mount source {src}: {str(o).split(': ', 1)[-1]}")
        raise o if isinstance(o, OciImageError) else InvalidArgument(f"mount source {src}: not opened")

    def plan_binds(self) -> None:
        """The user's mounts: home, binds and tmpfs (tmpfs:DST), and the CDI specs' binds,
        parents before children so that a nested target resolves through its parent mount.
        A missing mount point in a tmpfs (/tmp, a user's) is made right before its mount;
        none may cover a tmpfs of the user's. A tmpfs is the user's, nosuid,nodev; its data
        is rebuilt from numbers."""
        spec = self.spec
        # (the opened source or None for a tmpfs, dst, read_only, what, options, the user's)
        items: List[tuple] = []
        home = _check_abs("home", spec.home) if spec.home else "/"
        if spec.mount_home and home != "/":
            o = self.sources.get("home")
            if isinstance(o, asuser.Opened) and o.is_dir:
                items.append((o, home, False, "home", (), True))
            else:
                log.warning("home directory not usable by its user, not mounted",
                            extra={"home": home, "job": spec.job_id, "error": str(o)})
        for i, m in enumerate(spec.mounts):
            src, dst, ro = m[:3]
            src = _check_abs("mount source", src)
            dst = _check_abs("mount target", dst)
            if dst == "/":
                raise InvalidArgument("cannot mount over the container's root")
            items.append((self._source(f"mount:{i}", src), dst, bool(ro), f"mount {src}:{dst}",
                          tuple(m[3]) if len(m) > 3 else (), True))
        if len(spec.mounts) + len(spec.tmpfs) > 2 * mountflags.MAX_ITEMS:  # site's + user's
            raise InvalidArgument(f"{len(spec.mounts) + len(spec.tmpfs)} mounts, more than a "
                                  f"step may have")
        unsized = mountflags.default_size([o for _d, o in spec.tmpfs])
        if spec.tmpfs:
            mountflags.check_tmpfs_total([o for _d, o in spec.tmpfs], _mem_total())
        for dst, options in spec.tmpfs:
            dst = _check_abs("tmpfs target", dst)
            if dst == "/":
                raise InvalidArgument("cannot mount over the container's root")
            items.append((None, dst, False, f"mount tmpfs:{dst}", tuple(options), True))
        for i, m in enumerate(spec.device_mounts):  # the CDI specs': opened as root
            dst = _check_abs("CDI mount target", m.container_path)
            if dst == "/":
                raise InvalidArgument("a CDI mount cannot mount over the container's root")
            items.append((self._source(f"cdi:{i}", m.host_path), dst, "ro" in m.options,
                          f"CDI mount {m.host_path}:{dst}", (), False))
        items.sort(key=lambda b: len(split_path(b[1])))
        for o, dst, ro, what, options, users in items:
            data = None if o else mountflags.tmpfs_data(options, spec.uid, spec.gid, unsized)
            planned = len(self.tmp_create)
            t = self.target(dst, o is None or o.is_dir, what)
            for protected in self.protected + self.tmpfs_targets:
                if protected == t or protected.startswith(t.rstrip("/") + "/"):
                    raise InvalidArgument(f"{what}: cannot mount over {protected}")
            if o is None and t in self.user_targets:
                raise InvalidArgument(f"{what}: cannot mount over {t}, mounted already")
            self.user += [("mkdir", self.host(c), 0o755) if k == "dir" else ("mkfile", self.host(c))
                          for k, c in self.tmp_create[planned:]]
            del self.tmp_create[planned:]
            if o is None:
                flags = sc.MS_NOSUID | sc.MS_NODEV | (sc.MS_NOEXEC if "noexec" in options else 0)
                self.user.append(("mount", "tmpfs", self.host(t), "tmpfs", flags, data))
                self.tmpfs_targets.append(t)
                self.user_targets.append(t)
                self.layers[t] = EMPTY_LAYER
                continue
            # from the descriptor the user opened: nothing can be swapped in after the check
            self.user.append(("bindfd", o.fd, self.host(t), ro, o.path, not USE_MOUNT_API))
            if "noexec" in options:  # the one flag a user may add to a bind (mountflags.py)
                self.user.append(("setattr", self.host(t), sc.MOUNT_ATTR_NOEXEC, sc.MS_NOEXEC,
                                  what, not USE_MOUNT_API))
            self.layers[t] = fd_layer(o.fd) if o.is_dir else OPAQUE_LAYER
            if not users:
                continue  # a CDI mount: not the user's, not where the tasks start
            self.user_targets.append(t)
            if o.is_dir:
                self.visible.append((o.path, t))

    def plan_submit_dir(self) -> None:
        """An empty placeholder at the submit directory when the container lacks it.

        slurmstepd changes each task to the submit directory (as the user, already in
        the container) before the plugin moves it to the working directory, and prints
        "couldn't chdir to ...: going to /tmp instead" on every node when it is missing.
        The placeholder (root's, empty, in the overlay or /tmp's tmpfs; never on the
        host, never inside a user's bind) lets that pass; the step client says once
        where the tasks run instead.
        """
        cwd = self.spec.host_cwd
        if not cwd or not cwd.startswith("/") or os.path.normpath(cwd) == "/":
            return
        if self.spec.chdir_given and not self.spec.workdir:
            return  # the tasks start there, or the step fails (working_dir)
        if len(os.fsencode(cwd)) >= 4000 or any(len(os.fsencode(c)) > 255 for c in split_path(cwd)):
            return  # the kernel would refuse it (ENAMETOOLONG): never fail a step for this
        planned = len(self.image_create) + len(self.tmp_create)
        try:
            t = self.target(os.path.normpath(cwd), True, "submit directory")
            if len(self.image_create) + len(self.tmp_create) > planned:
                self.placeholder = t  # missing: target() planned it (one resolution)
        except OciImageError as e:  # a file there, or inside a bind: Slurm's message stays
            log.debug("no placeholder for the submit directory",
                      extra={"cwd": cwd, "job": self.spec.job_id, "error": str(e)})

    def plan(self) -> Plan:
        spec = self.spec
        self.plan_system()
        passwd_t = self.target("/etc/passwd", False, "/etc/passwd")
        group_t = self.target("/etc/group", False, "/etc/group")
        self.protected = [passwd_t, group_t, "/proc", "/sys", "/dev"] + self.system_targets
        self.plan_binds()
        self.plan_submit_dir()
        ro_flags = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
        etc = [("mount", str(self.step_dir / "passwd"), self.host(passwd_t), None, sc.MS_BIND, None),
               ("mount", None, self.host(passwd_t), None, ro_flags, None),
               ("mount", str(self.step_dir / "group"), self.host(group_t), None, sc.MS_BIND, None),
               ("mount", None, self.host(group_t), None, ro_flags, None)]

        # --oci-remap-root is root over a writable layer: apt-get install is what it is for
        writable = spec.writable or spec.remap_root
        shared = spec.shared_root is not None
        overlay = not shared and (writable or bool(self.image_create))
        ops: List[Op] = []
        if spec.remap_root:
            ops.append(("userns", spec.uid, spec.gid))
        if shared:  # missing mount points are made in it, for the job's later steps too
            ops.append(("mount", str(spec.shared_root), self.root, None, sc.MS_BIND, None))
        elif overlay:
            rw = str(self.step_dir / "rw")
            layers = OverlayLayers(self.rootfs, rw + "/upper", rw + "/work")
            ops += [("mount", "tmpfs", rw, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755"),
                    ("mkdir", layers.upper, 0o755), ("mkdir", layers.work, 0o700)]
            if spec.remap_root:
                # the image's files, owned by root, seen as the user's (root inside): the
                # user namespace's root may then change them, in the upper layer only
                layers = OverlayLayers(rw + "/lower", layers.upper, layers.work)
                ops += [("mkdir", layers.lower, 0o755), ("idmap", self.rootfs, layers.lower),
                        ("chown", layers.upper, spec.uid, spec.gid)]
            ops.append(("mount", "overlay", self.root, "overlay", sc.MS_NOSUID | sc.MS_NODEV,
                        layers.options()))
        else:
            ops.append(("mount", self.rootfs, self.root, None, sc.MS_BIND, None))
        for kind, cpath in self.image_create:
            ops.append(("mkdir", self.host(cpath), 0o755) if kind == "dir"
                       else ("mkfile", self.host(cpath)))
        if not writable and not shared:
            ops.append(("mount", None, self.root, None,
                        ro_flags | (sc.mount_flags_of(self.rootfs) & ~sc.MS_RDONLY), None))
        ops += self.system
        ops += self.user  # (their mount points in a tmpfs made in place, plan_binds)
        for kind, cpath in self.tmp_create:  # the submit directory's placeholder
            ops.append(("mkdir", self.host(cpath), 0o755) if kind == "dir"
                       else ("mkfile", self.host(cpath)))
        ops += etc
        ops.append(("pivot", self.root))
        cwd = self.working_dir()
        return Plan(ops, cwd, overlay, tuple(self.user_targets), self.placeholder,
                    self.submit_visible)

    def working_dir(self) -> str:
        spec = self.spec
        if spec.workdir:
            return _check_abs("working directory", spec.workdir)
        cwd_src = self.sources.get("cwd")
        if isinstance(cwd_src, asuser.Opened):
            cwd = cwd_src.path  # resolved by the user: root's realpath could see more
            best = None
            for host, cont in self.visible:
                if cwd == host or cwd.startswith(host.rstrip("/") + "/"):
                    if best is None or len(host) > len(best[0]):
                        best = (host, cont)
            if best:
                self.submit_visible = True  # the tasks start in it (where a bind put it)
                rest = cwd[len(best[0]):].lstrip("/")
                return join_path(best[1], *split_path(rest))
        if spec.chdir_given:
            return self.chdir_in_container(os.path.normpath(spec.host_cwd))
        if spec.image_workdir and spec.image_workdir.startswith("/"):
            return os.path.normpath(spec.image_workdir)
        return "/"

    def chdir_in_container(self, cwd: str) -> str:
        """srun --chdir=DIR not under a bind: DIR as the container has it, or a clear error
        (slurmstepd would go to /tmp, and the tasks would write where nobody looks)."""
        r = resolve_in_root(self.rootfs, cwd, self.layers)
        if r.exists and (r.host is None or stat.S_ISDIR(lstat_entry(r.host)[0].st_mode)):
            return r.path
        raise NotFound(f"srun --chdir={cwd}: no such directory in the container",
                       hint=f"--oci-mounts={cwd} brings the host's in; --oci-workdir=DIR "
                            f"picks one of the image's")


def plan_step(spec: StepSpec, step_dir: Path, sources: Sources) -> Plan:
    """The operations that build the step's root under step_dir (no side effects)."""
    return _Planner(spec, Path(step_dir), sources).plan()


def open_sources(spec: StepSpec) -> Dict[str, Union[asuser.Opened, OciImageError]]:
    """Everything the step names on the host, opened as its user (one helper process)."""
    keys, paths = [], []
    if spec.mount_home and spec.home and spec.home != "/":
        keys.append("home")
        paths.append(spec.home)
    if spec.host_cwd and spec.host_cwd.startswith("/"):
        keys.append("cwd")
        paths.append(spec.host_cwd)
    for i, m in enumerate(spec.mounts):
        keys.append(f"mount:{i}")
        paths.append(_check_abs("mount source", m[0]))
    out = dict(zip(keys, asuser.open_paths(spec.identity(), paths)))
    try:
        for i, m in enumerate(spec.device_mounts):
            out[f"cdi:{i}"] = _open_as_root(_check_abs("CDI mount source", m.host_path))
    except BaseException:
        close_sources(out)
        raise
    return out


def _open_as_root(path: str) -> Union[asuser.Opened, OciImageError]:
    """A CDI mount's source: a host path of the admin's root-owned spec, opened as root."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return NotFound(f"{path} (a CDI spec's mount) does not exist on this node")
    except OSError as e:
        return OciImageError(f"{path} (a CDI spec's mount): {e.strerror}")
    return asuser.Opened(fd, os.fstat(fd).st_mode, os.readlink(f"/proc/self/fd/{fd}"))


def close_sources(sources: Sources) -> None:
    for o in sources.values():
        if isinstance(o, asuser.Opened):
            o.close()


def host_proc_options(entries: Optional[List] = None) -> Optional[str]:
    """The host /proc's hidepid=/gid=/subset= options, to give the container's proc the same."""
    proc = None
    for e in entries if entries is not None else read_mountinfo():
        if e.mount_point == "/proc" and e.fstype == "proc":
            proc = e
    if proc is None:
        return None
    keep = [o for o in proc.super_options.split(",")
            if o.split("=", 1)[0] in ("hidepid", "gid", "subset")]
    return ",".join(keep) or None

