"""Paths inside a step's container, resolved the way the kernel would resolve them there.

Symlinks are followed relative to the image root, never the host's (an image's
/etc/passwd -> /etc/shadow must not read the host's shadow file as root), and through
what the step mounts on top of the image (a tmpfs, a host bind, a user's bind source
looked into from its descriptor). Planning a step's mount tree (mountplan.py) asks
this module where each mount point is, and whether it must be created.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Tuple, Union

from ..errors import InvalidArgument
from . import syscalls as sc
from . import users

_MAX_SYMLINKS = 40

# layer kinds for path resolution (a layer is what is mounted at a container path)
EMPTY_LAYER = "\0empty"    # a fresh tmpfs: exists as a directory, holds nothing
OPAQUE_LAYER = "\0opaque"  # a host bind we never resolve into (/proc, /sys, /dev)


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
        return join_path(self.path, *self.missing)


def join_path(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p
    return out or "/"


def split_path(path: str) -> List[str]:
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
    mounted there (a host directory, or EMPTY_LAYER / OPAQUE_LAYER). Symlinks are
    followed relative to the container root, never the host's.
    """
    if not path.startswith("/"):
        raise InvalidArgument(f"container path {path!r} must be absolute")
    if "\0" in path:
        raise InvalidArgument("container path contains a NUL byte")
    layers = layers or {}
    root = str(root).rstrip("/")
    todo = split_path(path)
    cur: List[str] = []
    hops = 0
    while todo:
        c = todo.pop(0)
        if c == "..":
            if cur:
                cur.pop()
            continue
        cand = join_path("/", *cur, c)
        layer, rest = _layer_of(cand, layers)
        base = layers.get(layer, root) if layer else root
        if base in (EMPTY_LAYER, OPAQUE_LAYER):
            if rest == "":
                cur.append(c)
                continue
            if base == OPAQUE_LAYER:
                raise InvalidArgument(f"{path}: cannot mount inside {layer}")
            return _missing(join_path("/", *cur), None, layer, [c] + todo, path)
        host = base + rest
        try:
            st, link = lstat_entry(host)
        except FileNotFoundError:
            if any(k.startswith(cand + "/") for k in layers):
                cur.append(c)  # created as the way to an earlier mount point
                continue
            cpath = join_path("/", *cur)
            return _missing(cpath, _host_of(cpath, root, layers), layer, [c] + todo, path)
        except NotADirectoryError:
            raise InvalidArgument(f"{path}: {join_path('/', *cur)} is not a directory") from None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise InvalidArgument(f"{path}: too many levels of symbolic links")
            target = link
            if target.startswith("/"):
                cur = []
            todo = split_path(target) + todo
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{path}: {cand} is not a directory")
        cur.append(c)
    cpath = join_path("/", *cur)
    layer, _ = _layer_of(cpath, layers)
    return Resolved(cpath, _host_of(cpath, root, layers), layer, ())


FD_LAYER_PREFIX = "/proc/self/fd/"


def fd_layer(fd: int) -> str:
    """A layer that is a user's bind source: looked into from its descriptor, never its path."""
    return f"{FD_LAYER_PREFIX}{fd}"


def lstat_entry(host: str) -> Tuple[os.stat_result, str]:
    """lstat (and the link's target) of a host path; below a user's bind source (a fd
    layer), each component is looked up from the descriptor with no symlink followed, so
    a directory swapped for a symlink on the way cannot take root's lookup elsewhere."""
    if not host.startswith(FD_LAYER_PREFIX):
        st = os.lstat(host)
        return st, os.readlink(host) if stat.S_ISLNK(st.st_mode) else ""
    fd_s, _, rest = host[len(FD_LAYER_PREFIX):].partition("/")
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
    return None if base in (EMPTY_LAYER, OPAQUE_LAYER) else (base + rest if rest else base) or "/"


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
