"""Shared records: small answers in the cache that every node reuses instead of asking again.

records/<kind>/<name>.json holds one answer: an access verdict, what a tag or index
resolved to, Slurm's job list, a conversion's progress for the nodes waiting for it.
A record only ever saves a question (to the registry, to Slurm), so it is written aside
and renamed into place, not fsynced: a crash may lose one, never leaves half of one.
Kinds and names are checked to be path-safe before they become paths.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import List, Optional

from .cachefiles import DIR_MODE, read_small, write_aside
from .errors import CacheError

#: kinds and names of shared records (path-safe by construction)
_RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class RecordMethods:
    """Cache's record API (a part of Cache: self.records, self.tmp and self.node are its)."""

    records: Path
    tmp: Path
    node: str

    def _record_path(self, kind: str, name: str) -> Path:
        for part in (kind, name):
            if not _RECORD_NAME.fullmatch(part or ""):
                raise CacheError(f"invalid record name {kind!r}/{name!r}")
        return self.records / kind / f"{name}.json"

    def write_record(self, kind: str, name: str, data: dict) -> None:
        """Publish a small answer for every node: written aside, then renamed into place.

        Not fsynced: a record only saves asking again (the registry, Slurm), so a
        crash may lose one but never leaves half of one for a reader.
        """
        path = self._record_path(kind, name)
        path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        write_aside(path, self.tmp / f"record.{kind}.{name}.{self.node}.{os.getpid()}."
                                     f"{secrets.token_hex(4)}",
                    json.dumps(data, sort_keys=True).encode())

    def read_record(self, kind: str, name: str) -> Optional[dict]:
        """The record, or None when there is none (or it cannot be read: ask again)."""
        try:
            data = json.loads(read_small(self._record_path(kind, name), 1 << 20))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def remove_record(self, kind: str, name: str) -> None:
        try:
            self._record_path(kind, name).unlink()
        except FileNotFoundError:
            pass

    def record_names(self, kind: str) -> List[str]:
        """The names of one kind's records (one directory listing)."""
        self._record_path(kind, "x")  # validates kind
        try:
            return [n[:-5] for n in os.listdir(self.records / kind)
                    if n.endswith(".json") and _RECORD_NAME.fullmatch(n[:-5])]
        except FileNotFoundError:
            return []
