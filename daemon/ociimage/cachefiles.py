"""File primitives of the image cache: root's alone (0700/0600, created so, never via a symlink).

Part of cache.py (which owns the paths); shared by its lock and lease parts.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from .digests import validate_digest
from .errors import CacheError, ConfigError

log = logging.getLogger("ociimage.cache")

#: modes of everything the cache creates, and the umask its writers run with
DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077


def entry_name(digest: str) -> str:
    """File name stem for a digest: 'sha256:ab..' -> 'sha256-ab..' (validated, so path-safe)."""
    algo, _, hexpart = validate_digest(digest).partition(":")
    return f"{algo}-{hexpart}"


def open_private(path: Path, flags: int) -> int:
    """open(2) a cache file as root's alone: created 0600, never through a symlink."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        raise CacheError(f"cannot open {path}: {e.strerror}") from None


def create_private_file(path: Path) -> None:
    """Create an empty file 0600 (the producer then writes it, keeping the mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """Create path (it must not exist) 0600 holding data; not fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_small(path: Path, limit: int = 1 << 16) -> bytes:
    """The first `limit` bytes of a cache file (never through a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: Path, data: dict) -> None:
    # 0600 from the start: O_TRUNC on an existing temp file keeps its (0600) mode.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_aside(path: Path, tmp: Path, data: bytes) -> None:
    """Replace path with data, written to tmp first (a reader never sees half of it);
    not fsynced: for records that only save asking again."""
    try:
        write_new(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise CacheError(f"cannot write {path}: {e.strerror or e}") from None


def narrow_tree(root: Path) -> int:
    """Narrow a cache made by an older version (0755 dirs, 0644 files) to root's alone.

    The root directory first: from that instant no user can open anything
    below it by path, whatever the modes further down. Then every directory
    and file below (symlinks are never followed). Returns how many entries
    were narrowed. A descriptor a user opened before this keeps working until
    closed: which is why every lock wait has a deadline.
    """
    changed = 0

    def narrow(path: str, st: os.stat_result, mode: int) -> None:
        nonlocal changed
        if stat.S_IMODE(st.st_mode) & ~mode:
            # path is no symlink (lstat said so) and no user could have replaced
            # it since: the directories above were root's (0755) all along
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
            changed += 1
        if st.st_uid != 0 and os.geteuid() == 0:
            log.warning("cache file not owned by root", extra={"path": path, "uid": st.st_uid})

    try:
        narrow(str(root), os.lstat(root), DIR_MODE)
        for top, dirs, files in os.walk(root, followlinks=False):
            for name in dirs + files:
                path = os.path.join(top, name)
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    narrow(path, st, DIR_MODE)
                elif stat.S_ISREG(st.st_mode):
                    narrow(path, st, FILE_MODE)
    except OSError as e:
        raise ConfigError(f"cannot make the cache directory {root} root-only: "
                          f"{e.strerror or e}") from None
    if changed:
        log.warning("made the image cache root-only (left by an older version)",
                    extra={"cache": str(root), "narrowed": changed})
    return changed
