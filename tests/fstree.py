"""Walk a directory tree into comparable records; loop-mount SquashFS images.

Used to check a flattened image against what is expected, or against the
rootfs another tool (umoci) unpacked from the same layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, List, Optional, Set


@dataclass
class Node:
    kind: str                  # file, dir, symlink, char, block, fifo, socket
    mode: int                  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime: int
    sha256: str = ""
    target: bytes = b""        # symlink target
    rdev: int = 0
    ino: int = 0
    nlink: int = 1
    xattrs: Dict[str, bytes] = field(default_factory=dict)


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo")):
        if test(m):
            return name
    return "socket"


def _xattrs(path: bytes) -> Dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def walk(root) -> Dict[bytes, Node]:
    """Every entry below root (root itself as b""), keyed by its relative path in bytes."""
    root_b = os.fsencode(root)
    out: Dict[bytes, Node] = {}

    def visit(rel: bytes) -> None:
        full = os.path.join(root_b, rel) if rel else root_b
        st = os.lstat(full)
        kind = _kind(st)
        node = Node(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime),
                    ino=st.st_ino, nlink=st.st_nlink, xattrs=_xattrs(full))
        if kind == "file":
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            node.sha256 = h.hexdigest()
        elif kind == "symlink":
            node.target = os.readlink(full)
        elif kind in ("char", "block"):
            node.rdev = st.st_rdev
        out[rel] = node
        if kind == "dir":
            for name in sorted(os.listdir(full)):
                visit(os.path.join(rel, name) if rel else name)

    visit(b"")
    return out


def hardlink_groups(tree: Dict[bytes, Node]) -> Set[FrozenSet[bytes]]:
    """Sets of paths sharing an inode (only groups of two or more)."""
    by_ino: Dict[int, List[bytes]] = {}
    for p, n in tree.items():
        if n.kind == "file":
            by_ino.setdefault(n.ino, []).append(p)
    return {frozenset(v) for v in by_ino.values() if len(v) > 1}


@contextlib.contextmanager
def mounted(image) -> Iterator[str]:
    """Loop-mount a SquashFS image read-only; always unmounted afterwards."""
    mnt = tempfile.mkdtemp(prefix="sqfs-mnt-")
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)


def tree_of(image) -> Dict[bytes, Node]:
    with mounted(image) as mnt:
        return walk(mnt)


def names(tree: Dict[bytes, Node]) -> Set[bytes]:
    return set(tree) - {b""}


def find(tree: Dict[bytes, Node], path: str) -> Optional[Node]:
    return tree.get(os.fsencode(path))
