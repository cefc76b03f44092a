"""A private mount namespace per job step, with the image as its root.

Layout on the host, per step, under state_dir/<job>.<step>/:
    mnt      a symlink to /proc/<holder>/ns/mnt: the process that built the
             namespace stays as its holder (asleep, in its own session) until
             the step is released; tasks enter with open(mnt) +
             setns(CLONE_NEWNS) + chdir(cwd)
    holder   "<pid> <ns inode>", so a holder is only ever killed or adopted
             after checking it still holds this namespace
    root/    the new root, rw/ the tmpfs for an overlay's upper layer: both
             stay empty on the host, their mounts exist only in the namespace
    passwd, group   the generated files bind-mounted over the image's

How the namespace is built: the parent (the daemon) plans everything first
(resolving paths, checking user mounts, generating passwd/group) into a flat
list of primitive operations; a forked child unshares, makes every mount
private (so nothing propagates back to the host or to other steps), runs
the operations, pivots into the new root and detaches the host's tree, then
stays asleep as the namespace's holder. (Pinning by bind-mounting the ns file
instead fails with EINVAL at random when the daemon itself runs in a nested
mount namespace, as in a container: the kernel refuses a bind that could loop
when namespace ids compare the wrong way.) The daemon is a multi-threaded gRPC server,
so the child runs nothing but system calls (no logging, no locks, no
allocation-heavy work) and reports failure through a pipe as one line.

The image root is read-only (a bind of the node's loop mount remounted
ro,nosuid,nodev). A mount target missing from the image cannot be created on
a read-only squashfs, so then — and when the step asked for a writable root —
the root is an overlay: the image as lowerdir, upper/work on a tmpfs that
lives and dies with the namespace. The missing mount points are created in
it, and unless the step is writable it is then remounted read-only, so the
user still gets EROFS. Missing mount points are never created in the user's
home or in a user mount's source on the host.

Paths inside the image are resolved by us, following symlinks relative to
the image root (an image's /etc/passwd -> /etc/shadow must not read the
host's shadow file as root).
"""

from __future__ import annotations

import grp
import logging
import os
import select
import shutil
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .. import asuser
from ..errors import AccessDenied, InvalidArgument, NotFound, OciImageError
from . import nsbuild
from . import syscalls as sc
from . import users
from .mounts import MountError, read_mountinfo

log = logging.getLogger("ociimage.runtime")

_CHILD_TIMEOUT = 60.0
_MAX_SYMLINKS = 40
NS_FILE = "mnt"
HOLDER_FILE = "holder"

# layer kinds for path resolution
_EMPTY = "\0empty"    # a fresh tmpfs: exists as a directory, holds nothing
_OPAQUE = "\0opaque"  # a host bind we never resolve into (/proc, /sys, /dev)


@dataclass
class StepSpec:
    job_id: str
    step_id: str
    uid: int
    gid: int
    user_name: str
    home: str
    rootfs: Path
    mounts: List[Tuple[str, str, bool]] = field(default_factory=list)  # (host src, dst, read_only)
    writable: bool = False
    mount_home: bool = True
    workdir: Optional[str] = None
    host_cwd: str = "/"
    image_workdir: Optional[str] = None
    group_name: Optional[str] = None  # default: the host's name for gid, else "group<gid>"
    groups: Tuple[int, ...] = ()      # supplementary groups (default: the host's for the user)

    def identity(self) -> asuser.Identity:
        if self.groups:
            return asuser.Identity(self.uid, self.gid, tuple(self.groups))
        return asuser.Identity.of_user(self.uid, self.gid)


@dataclass(frozen=True)
class StepNamespace:
    ns_path: Path
    cwd: str
    user_mounts: Tuple[str, ...] = ()  # container paths the user controls (home, --oci-mounts)
    placeholder: Optional[str] = None  # the submit directory, made empty (plan_submit_dir)
    submit_visible: bool = False       # the tasks start in the submit directory (or its bind)


# ---- path resolution inside the container ----------------------------------

@dataclass(frozen=True)
class Resolved:
    path: str           # canonical container path of the part that exists
    host: Optional[str]  # where that part is on the host (None in a tmpfs/opaque layer)
    layer: str          # "" for the image, else the layer's container path
    missing: Tuple[str, ...]  # components below `path` that don't exist

    @property
    def exists(self) -> bool:
        return not self.missing

    @property
    def full(self) -> str:
        return _join(self.path, *self.missing)


def _join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p
    return out or "/"


def _split(path: str) -> List[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _layer_of(cpath: str, layers: Mapping[str, str]) -> Tuple[str, str]:
    best = ""
    for k in layers:
        if (cpath == k or cpath.startswith(k + "/")) and len(k) > len(best):
            best = k
    return best, cpath[len(best):]


def resolve_in_root(root: Union[str, Path], path: str,
                    layers: Optional[Mapping[str, str]] = None) -> Resolved:
    """Resolve a container path the way the kernel would inside the container.

    root is the image on the host; layers maps container paths to what is
    mounted there (a host directory, or _EMPTY / _OPAQUE). Symlinks are
    followed relative to the container root, never the host's.
    """
    if not path.startswith("/"):
        raise InvalidArgument(f"container path {path!r} must be absolute")
    if "\0" in path:
        raise InvalidArgument("container path contains a NUL byte")
    layers = layers or {}
    root = str(root).rstrip("/")
    todo = _split(path)
    cur: List[str] = []
    hops = 0
    while todo:
        c = todo.pop(0)
        if c == "..":
            if cur:
                cur.pop()
            continue
        cand = _join("/", *cur, c)
        layer, rest = _layer_of(cand, layers)
        base = layers.get(layer, root) if layer else root
        if base in (_EMPTY, _OPAQUE):
            if rest == "":
                cur.append(c)
                continue
            if base == _OPAQUE:
                raise InvalidArgument(f"{path}: cannot mount inside {layer}")
            return _missing(_join("/", *cur), None, layer, [c] + todo, path)
        host = base + rest
        try:
            st, link = _lstat(host)
        except FileNotFoundError:
            if any(k.startswith(cand + "/") for k in layers):
                cur.append(c)  # created as the way to an earlier mount point
                continue
            cpath = _join("/", *cur)
            return _missing(cpath, _host_of(cpath, root, layers), layer, [c] + todo, path)
        except NotADirectoryError:
            raise InvalidArgument(f"{path}: {_join('/', *cur)} is not a directory") from None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise InvalidArgument(f"{path}: too many levels of symbolic links")
            target = link
            if target.startswith("/"):
                cur = []
            todo = _split(target) + todo
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{path}: {cand} is not a directory")
        cur.append(c)
    cpath = _join("/", *cur)
    layer, _ = _layer_of(cpath, layers)
    return Resolved(cpath, _host_of(cpath, root, layers), layer, ())


_FD_LAYER = "/proc/self/fd/"


def fd_layer(fd: int) -> str:
    """A layer that is a user's bind source: looked into from its descriptor, never its path."""
    return f"{_FD_LAYER}{fd}"


def _lstat(host: str) -> Tuple[os.stat_result, str]:
    """lstat (and the link's target) of a host path; below a user's bind source (a fd
    layer), each component is looked up from the descriptor with no symlink followed, so
    a directory swapped for a symlink on the way cannot take root's lookup elsewhere."""
    if not host.startswith(_FD_LAYER):
        st = os.lstat(host)
        return st, os.readlink(host) if stat.S_ISLNK(st.st_mode) else ""
    fd_s, _, rest = host[len(_FD_LAYER):].partition("/")
    if not rest:
        return os.fstat(int(fd_s)), ""
    try:
        fd = sc.openat2(rest, sc.O_PATH | os.O_NOFOLLOW, sc.RESOLVE_BENEATH |
                        sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS, dirfd=int(fd_s))
    except OSError as e:
        if e.errno == 40:  # ELOOP: a component became a symlink since it was looked at
            raise InvalidArgument(f"a directory of your mount source changed while the step "
                                  f"started: {rest}") from None
        raise
    try:
        st = os.fstat(fd)
        return st, os.readlink("", dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
    finally:
        os.close(fd)


def _host_of(cpath: str, root: str, layers: Mapping[str, str]) -> Optional[str]:
    layer, rest = _layer_of(cpath, layers)
    base = layers.get(layer, root) if layer else root
    return None if base in (_EMPTY, _OPAQUE) else (base + rest if rest else base) or "/"


def _missing(cpath: str, host: Optional[str], layer: str, rest: List[str], path: str) -> Resolved:
    if ".." in rest:
        raise InvalidArgument(f"{path}: '..' below a missing directory")
    return Resolved(cpath, host, layer, tuple(rest))


def read_image_file(rootfs: Union[str, Path], path: str,
                    limit: int = users.MAX_FILE_BYTES) -> Optional[str]:
    """A regular file of the image as text (at most limit bytes), or None if absent/unusable."""
    try:
        r = resolve_in_root(rootfs, path)
    except InvalidArgument:
        return None
    if not r.exists or r.layer or r.host is None:
        return None
    try:
        fd = os.open(r.host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit)
    finally:
        os.close(fd)
    if len(data) == limit:  # cut at the last whole line
        data = data[:data.rfind(b"\n") + 1]
    return data.decode("utf-8", errors="surrogateescape")


# ---- planning ----------------------------------------------------------------

# ("mount", src, target, fstype, flags, data) | ("mkdir", path, mode) | ("mkfile", path)
# | ("bindfd", fd, target, read_only, canonical, legacy)
# | ("setattr", target, attrs, legacy_flags, name, legacy) | ("pivot", root)
# (legacy: without the new mount API; decided when planning, the builder only obeys)
Op = tuple

#: Mount user binds with open_tree/mount_setattr/move_mount (Linux >= 5.12). Without
#: it a bind is non-recursive (its submounts, whose flags a remount would not change,
#: stay behind) and made from a descriptor reopened and checked to be the same file.
USE_MOUNT_API = sc.have_mount_api()


def _describe(op: Op) -> str:
    if op[0] == "mount":
        return f"mount {op[1]} on {op[2]}"
    if op[0] == "bindfd":
        return f"bind {op[4]} on {op[2]}"
    return f"{op[0]} {op[1]}"


def _check_abs(what: str, path: str) -> str:
    if not path or not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    return os.path.normpath(path)


def _overlay_safe(path: str) -> str:
    if any(c in path for c in ",:\\\n"):
        raise InvalidArgument(f"path {path!r} cannot be used in overlay options")
    return path


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

    def target(self, cpath: str, want_dir: bool, what: str) -> str:
        """Canonical container path of a mount point, arranging for it to be created if missing."""
        r = resolve_in_root(self.rootfs, cpath, self.layers)
        kind = "dir" if want_dir else "file"
        if r.exists:
            if r.host is not None:
                is_dir = stat.S_ISDIR(_lstat(r.host)[0].st_mode)
                if is_dir != want_dir:
                    raise InvalidArgument(f"{what}: {r.path} is {'a' if is_dir else 'not a'} "
                                          f"directory in the container, its source is "
                                          f"{'' if want_dir else 'not '}one")
            return r.path
        if r.layer and self.layers.get(r.layer) != _EMPTY:
            raise NotFound(f"{what}: mount target {r.full} does not exist in the directory "
                           f"mounted at {r.layer}",
                           hint="the directory must exist in the mounted host directory")
        todo = self.tmp_create if r.layer else self.image_create
        for i in range(1, len(r.missing) + 1):
            k = kind if i == len(r.missing) else "dir"
            todo.append((k, _join(r.path, *r.missing[:i])))
        return r.full

    def host(self, cpath: str) -> str:
        return self.root + cpath if cpath != "/" else self.root

    def plan_system(self) -> None:
        for name in ("/proc", "/sys", "/dev"):
            t = self.target(name, True, name)
            self.layers[t] = _OPAQUE
            self.system_targets.append(t)  # where they really are (the image may link them)
            if name == "/proc":
                # a proc of our own, with the host's hidepid=/gid=/subset= (per mount since 5.8)
                self.system.append(("mount", "proc", self.host(t), "proc",
                                    sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, host_proc_options()))
            else:
                self.system.append(("mount", name, self.host(t), None, sc.MS_BIND | sc.MS_REC, None))
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
        self.layers[t] = _EMPTY
        self.system.append(("mount", "tmpfs", self.host(t), "tmpfs",
                            sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"))

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
        spec = self.spec
        binds: List[Tuple[asuser.Opened, str, bool, str]] = []
        home = _check_abs("home", spec.home) if spec.home else "/"
        if spec.mount_home and home != "/":
            o = self.sources.get("home")
            if isinstance(o, asuser.Opened) and o.is_dir:
                binds.append((o, home, False, "home"))
            else:
                log.warning("home directory not usable by its user, not mounted",
                            extra={"home": home, "job": spec.job_id, "error": str(o)})
        for i, (src, dst, ro) in enumerate(spec.mounts):
            src = _check_abs("mount source", src)
            dst = _check_abs("mount target", dst)
            if dst == "/":
                raise InvalidArgument("cannot mount over the container's root")
            binds.append((self._source(f"mount:{i}", src), dst, bool(ro), f"mount {src}:{dst}"))
        # parents before children, so a nested target resolves through its parent mount
        binds.sort(key=lambda b: len(_split(b[1])))
        for o, dst, ro, what in binds:
            t = self.target(dst, o.is_dir, what)
            for protected in self.protected:
                if protected == t or protected.startswith(t.rstrip("/") + "/"):
                    raise InvalidArgument(f"{what}: cannot mount over {protected}")
            # from the descriptor the user opened: nothing can be swapped in after the check
            self.user.append(("bindfd", o.fd, self.host(t), ro, o.path, not USE_MOUNT_API))
            self.user_targets.append(t)
            self.layers[t] = fd_layer(o.fd) if o.is_dir else _OPAQUE
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
        if len(os.fsencode(cwd)) >= 4000 or any(len(os.fsencode(c)) > 255 for c in _split(cwd)):
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

        overlay = spec.writable or bool(self.image_create)
        ops: List[Op] = []
        if overlay:
            rw = str(self.step_dir / "rw")
            ops += [("mount", "tmpfs", rw, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755"),
                    ("mkdir", rw + "/upper", 0o755), ("mkdir", rw + "/work", 0o700),
                    ("mount", "overlay", self.root, "overlay", sc.MS_NOSUID | sc.MS_NODEV,
                     f"lowerdir={_overlay_safe(self.rootfs)},upperdir={_overlay_safe(rw)}/upper,"
                     f"workdir={rw}/work")]
        else:
            ops.append(("mount", self.rootfs, self.root, None, sc.MS_BIND, None))
        for kind, cpath in self.image_create:
            ops.append(("mkdir", self.host(cpath), 0o755) if kind == "dir"
                       else ("mkfile", self.host(cpath)))
        if not spec.writable:
            ops.append(("mount", None, self.root, None,
                        ro_flags | (sc.mount_flags_of(self.rootfs) & ~sc.MS_RDONLY), None))
        ops += self.system
        for kind, cpath in self.tmp_create:
            ops.append(("mkdir", self.host(cpath), 0o755) if kind == "dir"
                       else ("mkfile", self.host(cpath)))
        ops += self.user
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
                return _join(best[1], *_split(rest))
        if spec.image_workdir and spec.image_workdir.startswith("/"):
            return os.path.normpath(spec.image_workdir)
        return "/"


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
    for i, (src, _dst, _ro) in enumerate(spec.mounts):
        keys.append(f"mount:{i}")
        paths.append(_check_abs("mount source", src))
    return dict(zip(keys, asuser.open_paths(spec.identity(), paths)))


def _close_sources(sources: Sources) -> None:
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


# ---- the state dir ----------------------------------------------------------

def _step_dir(state_dir: Path, job_id: str, step_id: str) -> Path:
    name = f"{job_id}.{step_id}"
    if not job_id or not step_id or "/" in name or name.startswith(".") or "\0" in name:
        raise InvalidArgument(f"invalid job/step id {job_id!r}.{step_id!r}")
    return Path(state_dir) / name


# ---- create / destroy ---------------------------------------------------------

_take_namespace_root = nsbuild.take_namespace_root


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
    passwd = users.make_passwd(read_image_file(spec.rootfs, "/etc/passwd"), spec.user_name,
                               spec.uid, spec.gid, spec.home or "/")
    group = users.make_group(read_image_file(spec.rootfs, "/etc/group"), group_name, spec.gid)
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
            _build(plan.ops, ns_path)
        except BaseException:
            _remove_step_dir(step_dir)
            raise
    finally:
        _close_sources(sources)
    log.info("step namespace created",
             extra={"job": spec.job_id, "step": spec.step_id, "ns": str(ns_path),
                    "cwd": plan.cwd, "overlay": plan.overlay,
                    "seconds": round(time.monotonic() - t0, 3)})
    return StepNamespace(ns_path, plan.cwd, plan.user_mounts, plan.placeholder,
                         plan.submit_visible)


def _build(ops: List[Op], ns_path: Path) -> None:
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
        word, _, pid_s = line.partition(" ")
        if word == "OK" and pid_s.isdigit():
            pid = int(pid_s)
        else:
            _, _, rest = line.partition(" ")
            idx, _, rest = rest.partition(" ")
            err, _, msg = rest.partition(" ")
            where = ops[int(idx)] if idx.lstrip("-").isdigit() and 0 <= int(idx) < len(ops) else None
            hint = f"while doing: {_describe(where)}" if where else ""
            if not line:
                msg = "the namespace builder died"
            raise MountError(f"cannot build the step namespace: {msg}", hint=hint)
        inode = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        (ns_path.parent / HOLDER_FILE).write_text(f"{pid} {inode} {process_start(pid)}\n")
        os.symlink(f"/proc/{pid}/ns/mnt", ns_path)
        # Only now, recorded, may it hold the namespace: had we died before this
        # byte, it would see EOF and exit rather than hold it for nobody.
        os.write(go_w, b"x")
    except BaseException:
        if pid:
            _kill_holder(pid)
        raise
    finally:
        os.close(go_w)


def _kill_verified(ns_path: Path, holder: "Holder") -> None:
    """SIGKILL the holder through a pidfd taken while it is still the holder: a holder
    adopted from an earlier daemon is no child of ours, and its pid, once it is gone, may
    be another process's by the time a plain kill() would run."""
    try:
        pidfd = os.pidfd_open(holder.pid)
    except (AttributeError, OSError):  # Linux < 5.3, or already gone
        if holder_info(ns_path) == holder:
            _kill_holder(holder.pid)
        return
    try:
        if holder_info(ns_path) != holder:
            return  # gone between the two looks: the pidfd may name someone else
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    finally:
        os.close(pidfd)
    try:
        os.waitpid(holder.pid, 0)
    except ChildProcessError:
        _wait_gone(holder.pid)  # the helper's child, or init's: they reap it


def _wait_gone(pid: int, timeout: float = 2.0) -> None:
    """Until the killed holder is reaped (by the helper whose child it is), briefly."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.002)


def _kill_holder(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:  # the helper's child (or init's, for an earlier daemon's helper): it reaps it
        os.waitpid(pid, 0)
    except ChildProcessError:
        _wait_gone(pid)


def process_start(pid: int) -> int:
    """A process's start time (field 22 of /proc/PID/stat): with the pid, names it for good."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat_line = f.read()
    return int(stat_line[stat_line.rindex(b")") + 2:].split()[19])


@dataclass(frozen=True)
class Holder:
    pid: int
    ns_inode: int
    start: int


def holder_info(ns_path: Union[str, Path]) -> Optional[Holder]:
    """The process holding this step's namespace, if it still does (pid, ns inode, start)."""
    try:
        fields = (Path(ns_path).parent / HOLDER_FILE).read_text().split()
        pid, inode = int(fields[0]), int(fields[1])
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino != inode:
            return None
        start = process_start(pid)
        # a holder recorded by an older daemon has no start time: the inode must do
        if len(fields) > 2 and int(fields[2]) != start:
            return None
        return Holder(pid, inode, start)
    except (OSError, ValueError, IndexError):
        return None


def holder_of(ns_path: Union[str, Path]) -> Optional[int]:
    """The pid of the process holding this step's namespace, if it still does."""
    h = holder_info(ns_path)
    return h.pid if h else None


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
        _kill_verified(ns_path, holder)
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
