"""The flattener's memory of the paths it emitted: most of its memory, kept compact.

flatten.py claims every path once, top-most layer first; what it remembers
of each decides what lower layers may still add (and how a hardlink
resolves). At millions of files that table is the memory a flatten needs,
so it is laid out here for size.
"""

from __future__ import annotations

import tarfile
from typing import Dict, Optional, Tuple

REG = tarfile.REGTYPE

# A record per claimed path: (layer index from the top, type, meta). meta is
# None for a regular file already written, else the fields to write later.
Meta = Tuple[int, int, int, int, str, int, int, Optional[Dict[str, str]]]
Rec = Tuple[int, bytes, Optional[Meta]]


class Records:
    """path -> record, the flattener's memory of what it emitted: most of its memory.

    Written regular files (most entries) are kept by directory, {parent: {name:
    layer}}, the parent's path stored once, and share one record per layer;
    every other record (directories, links, ... written at the end) by path.
    The same mapping either way, in about half the memory of one dict by
    path at 200,000 files.
    """

    def __init__(self) -> None:
        self.files: Dict[str, Dict[str, int]] = {}
        self.other: Dict[str, Rec] = {}
        self.file_recs: Dict[int, Rec] = {}
        self.n_files = 0

    def get(self, path: str) -> Optional[Rec]:
        rec = self.other.get(path)
        if rec is None:
            cut = path.rfind("/")
            names = self.files.get(path[:cut] if cut > 0 else "")
            if names is not None:
                layer = names.get(path[cut + 1:])
                if layer is not None:
                    rec = self.file_recs[layer]
        return rec

    def __contains__(self, path: str) -> bool:
        return self.get(path) is not None

    def __setitem__(self, path: str, rec: Rec) -> None:
        layer, typ, meta = rec
        if typ != REG or meta is not None:
            self.other[path] = rec
            return
        self.other.pop(path, None)  # a link or the like that this layer's file replaces
        if layer not in self.file_recs:
            self.file_recs[layer] = rec
        cut = path.rfind("/")
        names = self.files.setdefault(path[:cut] if cut > 0 else "", {})
        if path[cut + 1:] not in names:
            self.n_files += 1
        names[path[cut + 1:]] = layer

    def __len__(self) -> int:
        return len(self.other) + self.n_files

    def items(self):
        """The records still to be written (everything but regular files)."""
        return self.other.items()
