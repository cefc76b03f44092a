"""One read-only loop mount per image per node, shared by every step.

Loop devices are a scarce node resource and mounting costs time, so an image
is mounted once at <runtime_dir>/images/<hex> and refcounted by the steps
using it; it is unmounted only after it has been unused for `idle` seconds, so
back-to-back steps of a job don't remount. The kernel's mount table is the
record that survives a daemon restart: recover() adopts what it finds there.

The mount is `ro,nosuid,nodev` and made with mount(8)'s `-o loop`, which sets
LO_FLAGS_AUTOCLEAR: the loop device is freed by the kernel when the last
user of the filesystem (the node mount or any step namespace's bind of it)
goes away, so no code path here has to remember to detach it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Union

from ..errors import CacheError, InvalidArgument, RuntimeSetupError
from . import loop, syscalls

log = logging.getLogger("ociimage.runtime")

_DIGEST = re.compile(r"^(sha256|sha512):([0-9a-f]{64}|[0-9a-f]{128})$")
_MOUNT_TIMEOUT = 60.0


# Mount failures are runtime setup errors; the alias keeps this module's vocabulary.
MountError = RuntimeSetupError


# ---- /proc/self/mountinfo ---------------------------------------------------

@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    options: str
    optional: str  # e.g. "shared:1 master:2"
    fstype: str
    source: str
    super_options: str

    @property
    def propagation(self) -> str:
        tags = self.optional.split()
        if any(t.startswith("shared:") for t in tags):
            return "shared"
        if any(t.startswith("master:") for t in tags):
            return "slave"
        if "unbindable" in tags:
            return "unbindable"
        return "private"


def _unescape(field: str) -> str:
    # mountinfo octal-escapes space, tab, newline and backslash
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mountinfo(pid: Union[int, str] = "self") -> List[MountEntry]:
    out = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(), right.split()
            if not sep or len(a) < 6 or len(b) < 2:
                continue
            out.append(MountEntry(int(a[0]), int(a[1]), _unescape(a[3]), _unescape(a[4]),
                                  a[5], " ".join(a[6:]), b[0], _unescape(b[1]),
                                  b[2] if len(b) > 2 else ""))
    return out


def mount_at(path: Union[str, Path], entries: Optional[List[MountEntry]] = None) -> Optional[MountEntry]:
    """The top-most mount whose mount point is exactly path, or None."""
    target = os.path.abspath(path)
    found = None
    for e in entries if entries is not None else read_mountinfo():
        if e.mount_point == target:
            found = e  # later lines are mounted on top
    return found


def mount_containing(path: Union[str, Path], entries: Optional[List[MountEntry]] = None) -> MountEntry:
    """The mount that holds path (longest mount point prefix, top-most)."""
    target = os.path.realpath(path)
    best = None
    for e in entries if entries is not None else read_mountinfo():
        mp = e.mount_point
        if target == mp or target.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mount_point):
                best = e
    assert best is not None, "no mount holds /"
    return best


def loop_backing_file(device: str) -> Optional[str]:
    """The file behind /dev/loopN, from sysfs; None if it is no (bound) loop device."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8",
                  errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


# ---- the node mounts ----------------------------------------------------------

@dataclass
class _Image:
    digest: str
    path: Path
    source: str  # the .sqfs file (or "" when adopted and sysfs did not say)
    refs: int = 0
    idle_since: Optional[float] = None


def _hex(digest: str) -> str:
    m = _DIGEST.match(digest or "")
    if not m:
        raise InvalidArgument(f"invalid image digest {digest!r}")
    return m.group(2)


class NodeMounts:
    def __init__(self, runtime_dir: Path, idle: float = 60):
        self.runtime_dir = Path(runtime_dir)
        self.images_dir = self.runtime_dir / "images"
        self.idle = float(idle)
        self._lock = threading.Lock()
        self._images: Dict[str, _Image] = {}
        self._mounting: Dict[str, threading.Lock] = {}  # per image, while its mount is made

    def _mountpoint(self, digest: str) -> Path:
        return self.images_dir / _hex(digest)

    def _ensure_dirs(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        # 0700: a host user must not browse a private image through the node mount;
        # steps see it through their own bind, which does not walk this path.
        self.images_dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.images_dir, 0o700)

    # ---- public API -------------------------------------------------------

    def acquire(self, digest: str, sqfs_path: Union[str, Path], fd: Optional[int] = None) -> Path:
        """Mount the image if needed and take a reference; returns the mount point.

        fd: the file opened already (a user's own .sqfs, opened as the user):
        its loop device is set up from that descriptor, never from a path.
        The node-wide lock is never held across a mount: only this image's
        first users wait for it, never steps of images already mounted.
        """
        target = self._mountpoint(digest)
        with self._lock:
            if self._take(digest, target):
                return target
            mounting = self._mounting.setdefault(digest, threading.Lock())
        with mounting:
            with self._lock:
                if self._take(digest, target):
                    return target
            source = str(sqfs_path)
            if fd is None and not os.path.isfile(source):
                raise CacheError(f"image file {source} for {digest} does not exist")
            self._ensure_dirs()
            if mount_at(target) is None:  # not even by an earlier daemon
                self._mount(source, target, fd)
            with self._lock:
                img = self._images.get(digest)
                refs = img.refs if img else 0
                img = self._images[digest] = _Image(digest, target, source, refs + 1)
                self._mounting.pop(digest, None)
        log.debug("image acquired", extra={"digest": digest, "refs": img.refs})
        return target

    def _take(self, digest: str, target: Path) -> bool:
        """With the lock held: a reference to an image that is mounted already."""
        img = self._images.get(digest)
        if img is None or mount_at(target) is None:
            return False
        img.refs += 1
        img.idle_since = None
        log.debug("image acquired", extra={"digest": digest, "refs": img.refs})
        return True

    def release(self, digest: str) -> None:
        with self._lock:
            img = self._images.get(digest)
            if img is None or img.refs == 0:
                log.warning("release of an image not held", extra={"digest": digest})
                return
            img.refs -= 1
            if img.refs == 0:
                img.idle_since = time.monotonic()
        log.debug("image released", extra={"digest": digest, "refs": img.refs})

    def reap(self, now: Optional[float] = None) -> List[str]:
        """Unmount images unused for longer than `idle`; returns their digests.

        The unmount runs outside the node lock (an unmount can block on a hung
        filesystem), under the image's own lock, which a new user of that image
        waits for (acquire); an image taken again in between is left mounted.
        """
        now = time.monotonic() if now is None else now
        done = []
        with self._lock:
            idle = [d for d, img in self._images.items()
                    if not img.refs and img.idle_since is not None and now - img.idle_since >= self.idle]
        for digest in idle:
            with self._lock:
                gate = self._mounting.setdefault(digest, threading.Lock())
            with gate:
                with self._lock:
                    img = self._images.get(digest)
                    if img is None or img.refs or img.idle_since is None:
                        continue
                    del self._images[digest]  # acquire() now waits for the gate
                if self._unmount(img):
                    done.append(digest)
                else:
                    with self._lock:
                        self._images.setdefault(digest, img)  # busy: try at the next reap
                with self._lock:
                    self._mounting.pop(digest, None)
        return done

    def recover(self, active_digests: Union[Mapping[str, int], Iterable[str]] = ()) -> List[str]:
        """Adopt image mounts a previous daemon left under images_dir.

        active_digests: the digests running steps still use (a mapping gives
        their reference counts; an iterable counts 1 each). The others are
        adopted idle, so reap() unmounts them after `idle` seconds.
        """
        if isinstance(active_digests, Mapping):
            counts = {d: int(n) for d, n in active_digests.items()}
        else:
            counts = {}
            for d in active_digests:
                counts[d] = counts.get(d, 0) + 1
        adopted = []
        prefix = str(self.images_dir.resolve() if self.images_dir.exists() else self.images_dir) + "/"
        now = time.monotonic()
        with self._lock:
            for e in read_mountinfo():
                if not e.mount_point.startswith(prefix) or e.fstype != "squashfs":
                    continue
                name = e.mount_point[len(prefix):]
                digest = next((f"{algo}:{name}" for algo, n in (("sha256", 64), ("sha512", 128))
                               if len(name) == n and re.fullmatch(r"[0-9a-f]+", name)), None)
                if digest is None or digest in self._images:
                    continue
                refs = counts.get(digest, 0)
                self._images[digest] = _Image(digest, Path(e.mount_point),
                                              loop_backing_file(e.source) or "", refs,
                                              None if refs else now)
                adopted.append(digest)
            # mount points whose mount is gone are litter from a crash
            if self.images_dir.is_dir():
                for child in self.images_dir.iterdir():
                    if f"sha256:{child.name}" not in self._images and \
                            f"sha512:{child.name}" not in self._images:
                        try:
                            child.rmdir()
                        except OSError:
                            pass
        if adopted:
            log.info("adopted image mounts", extra={"images": len(adopted)})
        return adopted

    def shutdown(self) -> None:
        """Unmount idle images; images in use stay mounted for the next daemon to adopt."""
        with self._lock:
            for digest, img in list(self._images.items()):
                if img.refs == 0 and self._unmount(img):
                    del self._images[digest]

    def mounted(self) -> Dict[str, dict]:
        with self._lock:
            return {d: {"path": str(i.path), "source": i.source, "refs": i.refs,
                        "idle_since": i.idle_since} for d, i in self._images.items()}

    # ---- helpers (called with the lock held) ------------------------------

    def _mount(self, source: str, target: Path, fd: Optional[int] = None) -> None:
        target.mkdir(exist_ok=True, mode=0o755)
        if fd is not None:
            self._mount_fd(fd, source, target)
            return
        cmd = ["mount", "-t", "squashfs", "-o", "loop,ro,nosuid,nodev", "--", source, str(target)]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=_MOUNT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            self._rmdir(target)
            raise MountError(f"cannot mount image {source}: {e}") from None
        entry = mount_at(target)
        if proc.returncode != 0 or entry is None or entry.fstype != "squashfs":
            self._rmdir(target)
            msg = proc.stderr.decode(errors="replace").strip() or f"mount exited {proc.returncode}"
            raise MountError(f"cannot mount image {source} on {target}: {msg}",
                             hint="is the squashfs module loaded and a loop device free?")
        log.info("image mounted", extra={"source": source, "target": str(target),
                                         "device": entry.source,
                                         "seconds": round(time.monotonic() - t0, 3)})

    def _mount_fd(self, fd: int, source: str, target: Path) -> None:
        """A loop device on the open file itself, then the mount (mount(8) would reopen by path)."""
        t0 = time.monotonic()
        try:
            device = loop.attach(fd)
        except OSError as e:
            self._rmdir(target)
            raise MountError(f"cannot set up a loop device for {source}: {e.strerror or e}",
                             hint="is a loop device free?") from None
        try:
            syscalls.mount(device.path, target, "squashfs",
                           syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV)
        except OSError as e:
            self._rmdir(target)
            raise MountError(f"cannot mount image {source}: {e.strerror}",
                             hint="is it a SquashFS file?") from None
        finally:
            device.close()  # autoclear: the mount holds it now, or nothing does
        log.info("image mounted", extra={"source": source, "target": str(target),
                                         "device": device.path,
                                         "seconds": round(time.monotonic() - t0, 3)})

    def _unmount(self, img: _Image) -> bool:
        try:
            syscalls.umount2(img.path, syscalls.UMOUNT_NOFOLLOW)
        except OSError as e:
            if e.errno == errno.EINVAL and mount_at(img.path) is None:
                pass  # someone else unmounted it
            else:
                # EBUSY: a host process sits in it; try again at the next reap
                log.warning("cannot unmount image", extra={"digest": img.digest,
                                                           "error": str(e)})
                return False
        self._rmdir(img.path)
        log.info("image unmounted", extra={"digest": img.digest})
        return True

    @staticmethod
    def _rmdir(path: Path) -> None:
        try:
            path.rmdir()
        except OSError:
            pass
