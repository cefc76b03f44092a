"""Which lock kind the cache uses, and the mount checks made before a daemon uses it.

Part of cache.py. Every process that uses one cache must use the same kind: an
flock and a claim file do not exclude each other, so a converter in one mode
would sweep the temp files of a converter in the other. The first process
records the cluster's mode in the cache (locking.json) and every later one
must agree, or it refuses to start.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from pathlib import Path
from typing import Iterable, Tuple

from .cachefiles import (DIR_MODE, FILE_MODE, fsync_dir, fsync_file, read_small,
                         write_json_durably, write_new)
from .errors import ConfigError

MODE_RECORD = "locking.json"

#: one machine's own filesystems: an flock there is coherent (single-node sites, tests)
_LOCAL = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "overlay",
          "bcachefs", "jfs", "reiserfs", "ramfs"}
#: shared filesystems whose flock is cluster-wide
_COHERENT = {"gpfs", "ceph", "gfs2", "ocfs2"}


def _mount(path, mountinfo):
    from .runtime.mounts import mount_containing
    m = mount_containing(path, mountinfo)
    return m, set(m.options.split(",")) | set(m.super_options.split(","))


def detect_locking(path, mountinfo=None) -> Tuple[str, str]:
    """("flock" | "claim", why) for the filesystem holding path, from its mount options.

    flock only where it is known to be coherent across nodes; claim files work on
    every filesystem (link and rename), so anything unknown gets them."""
    m, opts = _mount(path, mountinfo)
    where = f"{m.fstype} at {m.mount_point}"
    if m.fstype in ("nfs", "nfs4"):
        local = {o.split("=", 1)[1] for o in opts if o.startswith("local_lock=")}
        if "nolock" in opts:
            return "claim", f"{where} is mounted nolock: flock is node-local"
        if local & {"flock", "all"}:
            return "claim", f"{where} has local_lock={local.pop()}: flock is node-local"
        return "flock", f"{where} forwards flock to the server"
    if m.fstype == "lustre":
        if "localflock" in opts:
            return "claim", f"{where} is mounted localflock: flock is node-local"
        if "flock" not in opts:
            return "claim", f"{where} is mounted without -o flock"
        return "flock", f"{where} is mounted with -o flock"
    if m.fstype == "beegfs":
        # tuneUseGlobalFileLocks (client config, default false) is not in the mount options
        return "claim", (f"{where}: BeeGFS flock is node-local unless the clients set "
                         f"tuneUseGlobalFileLocks=true")
    if m.fstype.startswith("fuse"):
        return "claim", f"{where}: a FUSE filesystem's flock is not known to be cluster-wide"
    if m.fstype in _LOCAL:
        return "flock", f"{where} is a local filesystem"
    if m.fstype in _COHERENT:
        return "flock", f"{where} has cluster-wide flock"
    return "claim", f"{where}: flock not known to be coherent across nodes"


def check_lookupcache(path, mountinfo=None) -> None:
    """Refuse an NFS cache mounted with the default lookupcache=all, or nocto.

    With it a client caches "does not exist" answers, so a node can see a
    just-published entry's metadata as absent, convert it again or treat the
    image as a leftover: existence checks across nodes need lookupcache=positive
    (the kernel shows it as lookupcache=pos) or none."""
    m, opts = _mount(path, mountinfo)
    if m.fstype not in ("nfs", "nfs4"):
        return
    if "nocto" in opts:
        raise ConfigError(f"the image cache {path} is on NFS ({m.source} at {m.mount_point}) "
                          f"mounted nocto, so directory listings (leases) may be acdirmax "
                          f"stale; remount it without -o nocto")
    if opts & {"lookupcache=pos", "lookupcache=positive", "lookupcache=none"}:
        return
    raise ConfigError(f"the image cache {path} is on NFS ({m.source} at {m.mount_point}) "
                      f"with lookupcache=all, so nodes may not see each other's new files; "
                      f"remount it with -o lookupcache=positive")


def agree_mode(root: Path, tmp: Path, mode: str, why: str, node: str,
               record: bool = True) -> None:
    """Refuse a lock kind other than the recorded one; with none recorded, record this
    one if `record` (the daemon does once its mount checks passed), else accept it."""
    record_path = Path(root) / MODE_RECORD
    for _ in range(3):
        try:
            data = json.loads(read_small(record_path))
            recorded, by = str(data["mode"]), str(data.get("node", "?"))
            break
        except FileNotFoundError:
            if not record:
                return
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read {record_path}: {e}; delete it to record this "
                              f"node's mode ({mode})") from None
        # link(2): atomic and never overwrites, so two first daemons agree on one record
        t = Path(tmp) / f"locking.{node}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            write_new(t, json.dumps({"mode": mode, "why": why, "node": node,
                                     "since": time.time()}).encode())
            fsync_file(t)  # a power loss must not leave an empty record blocking every start
            try:
                os.link(t, record_path)
                fsync_dir(Path(root))
            except FileExistsError:
                pass  # another node recorded first: read what it wrote
        except OSError as e:
            raise ConfigError(f"cannot record the cache's locking mode in {record_path}: "
                              f"{e.strerror or e}") from None
        finally:
            try:
                os.unlink(t)
            except OSError:
                pass
    else:
        raise ConfigError(f"cannot read back {record_path}")
    if recorded != mode:
        raise ConfigError(
            f"[cache] locking is {mode} here ({why}) but the cache {root} is in {recorded} "
            f"mode (recorded by {by}); set [cache] locking = {recorded}, or to switch the "
            f"cluster stop every oci-imaged, delete {record_path} and restart them")


def check_flock(root: Path, probe: Path) -> None:
    """Fail early where flock does not work at all (e.g. Lustre without -o flock)."""
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        raise ConfigError(f"cannot create files in {probe.parent}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as e:
        raise ConfigError(
            f"file locks do not work in {root} ({e.strerror}); set [cache] locking = claim, or "
            f"on Lustre mount with '-o flock', on NFS make sure lockd/NFSv4 locking works"
        ) from None
    finally:
        os.close(fd)
        try:
            probe.unlink()
        except OSError:
            pass



def make_layout(root: Path, tmp: Path, version: int, dirs: Iterable[Path]) -> None:
    """Create the cache's directories (0700) and its layout marker; refuse another layout."""
    marker = Path(root) / "layout.json"
    try:
        for d in dirs:
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if not marker.exists():
            t = Path(tmp) / f"layout.{os.getpid()}.{secrets.token_hex(4)}"
            write_json_durably(t, {"layout": version})
            os.replace(t, marker)
        layout = json.loads(marker.read_text()).get("layout")
    except PermissionError as e:
        raise ConfigError(f"cache directory {root} is not writable: {e.strerror}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot use cache directory {root}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    if layout != version:
        raise ConfigError(f"cache directory {root} has layout {layout}, "
                          f"this version understands {version}")
