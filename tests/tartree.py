"""Read a flattened tar stream into the records fstree.walk() gives for a mounted image.

So the same assertions check flatten() tar to tar, without root or a loop
mount: each member becomes the Node a SquashFS made by tar2sqfs would show
(implicit directories and a root without an entry get tar2sqfs' defaults,
mode 0755, owner 0, mtime 0; hardlinks share their target's inode). What
tar2sqfs would refuse (a path twice, an entry below a non-directory, a
hardlink to nothing earlier) fails here too, so those are checked as well.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import Dict

from fstree import Node

_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir",
          tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
          tarfile.FIFOTYPE: "fifo"}
_XATTR = "SCHILY.xattr."


def _implicit_dir() -> Node:
    return Node("dir", 0o755, 0, 0, 0)


def tree_of_tar(data: bytes) -> Dict[bytes, Node]:
    """Every entry of the tar (root as b""), keyed by its path in bytes, like fstree.walk."""
    tree: Dict[bytes, Node] = {b"": _implicit_dir()}
    explicit = set()
    next_ino = [1]

    def ino() -> int:
        next_ino[0] += 1
        return next_ino[0]

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", encoding="utf-8",
                      errors="surrogateescape") as tf:
        for m in tf:
            path = b"" if m.name in (".", "./") else os.fsencode(m.name.rstrip("/"))
            assert path not in explicit, f"{path!r} is in the tar twice"
            explicit.add(path)
            parts = path.split(b"/") if path else []
            for i in range(1, len(parts)):
                parent = b"/".join(parts[:i])
                node = tree.setdefault(parent, _implicit_dir())
                if node.ino == 0:
                    node.ino = ino()
                assert node.kind == "dir", f"{path!r} is below the non-directory {parent!r}"
            if m.islnk():
                target = tree.get(os.fsencode(m.linkname))
                assert target is not None and target.kind == "file", \
                    f"hardlink {path!r} to {m.linkname!r}, which is no file before it"
                target.nlink += 1
                tree[path] = target
                continue
            kind = _KINDS[m.type]
            xattrs = {k[len(_XATTR):]: v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith(_XATTR)}
            node = Node(kind, m.mode & 0o7777, m.uid, m.gid, int(m.mtime), ino=ino(),
                        xattrs=xattrs)
            if kind == "file":
                node.sha256 = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
            elif kind == "symlink":
                node.target = os.fsencode(m.linkname)
            elif kind in ("char", "block"):
                node.rdev = os.makedev(m.devmajor, m.devminor)
            # already there: a directory made implicit by an earlier child
            assert path not in tree or kind == "dir", \
                f"{path!r} has entries below it but is a {kind}"
            tree[path] = node
    return tree
