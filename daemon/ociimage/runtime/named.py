"""Named containers (--oci-name): a writable container per job and node, kept across the
job's steps that name it, removed when the job ends on the node.

Layout, all root's (directories 0700 up to the layers, made one level at a time with
mkdirat/openat and O_NOFOLLOW, each checked to be root's directory, so no user can plant a
symlink on the way):

    <containers_dir>/<job>/<name>/upper   the overlay's upper layer: what the tasks wrote,
                                          owned by whoever the tasks are
                                 /work    the overlay's work directory
                                 /root    the overlay, mounted once on the host
                                 /record.json   uid, gid, the image's digest and config

Each step naming the container binds /root as its root (mountplan: StepSpec.shared_root),
so steps running at once share one overlay: overlayfs refuses a second mount of one
upperdir. The overlay holds a reference to its image's node mount (NodeMounts) until the job
ends. The job is the scope: another job, the same user's or not, has another directory, and
a name is only ever looked up under the asking step's own job. Nothing lives in memory but
locks: the records and the kernel's mount table are what a restarted daemon finds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import AccessDenied, InvalidArgument, NoSpace, NotFound, RuntimeSetupError
from ..stepargs import parse_container_name
from . import syscalls as sc
from . import userns
from .mountplan import OverlayLayers
from .mounts import NodeMounts, mount_at

log = logging.getLogger("ociimage.runtime")

RECORD = "record.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Named:
    job_id: str
    name: str
    uid: int
    gid: int
    digest: str
    image: str      # the reference it was made from, for messages
    config: dict    # the image's config (Env, WorkingDir, Entrypoint): steps need no cache entry
    path: Path      # <containers_dir>/<job>/<name>
    remap_root: bool = False  # made with --oci-remap-root: its image seen through an idmap

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def lower(self) -> Path:
        """With remap_root: the image's idmapped mount (its root's files are the user's)."""
        return self.path / "lower"

    def layers(self, lower: str) -> OverlayLayers:
        return OverlayLayers(lower, str(self.path / "upper"), str(self.path / "work"))


def _mount_idmapped(rootfs: Path, target: Path, uid: int, gid: int) -> None:
    """The image at target, its root's files the user's (root in their user namespace)."""
    try:
        ns = userns.create(uid, gid)
        try:
            tree = userns.idmapped_copy(str(rootfs), ns)
        finally:
            os.close(ns)  # the mount keeps the mapping
    except userns.UserNamespaceRefused as e:
        raise RuntimeSetupError(str(e)) from None
    try:
        sc.move_mount(tree, "", sc.AT_FDCWD, str(target), sc.MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(tree)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


class NamedContainers:
    def __init__(self, base: Path, mounts: NodeMounts, min_free: int = 0, per_job: int = 16):
        self.base = Path(os.path.realpath(base))  # as the mount table shows it
        self.mounts = mounts
        self.min_free = int(min_free)
        self.per_job = int(per_job)
        self._lock = threading.Lock()
        self._locks: Dict[Tuple[str, str], threading.Lock] = {}

    # ---- the directories ---------------------------------------------------

    def _open_base(self) -> int:
        """The base directory, made if missing; refused unless root's and only root's to write."""
        try:
            self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.base, _DIR_FLAGS)
        except OSError as e:
            raise RuntimeSetupError(f"{self.base} ([daemon] containers_dir): {e.strerror}",
                                    hint="the site's admins must fix it") from None
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            os.close(fd)
            raise RuntimeSetupError(f"{self.base} ([daemon] containers_dir) must be root's and "
                                    f"not writable by others",
                                    hint="the site's admins must fix its owner or mode")
        return fd

    @staticmethod
    def _subdir(parent: int, name: str, create: bool, mode: int = 0o700) -> int:
        """parent/name as a descriptor: root's directory, never through a symlink."""
        if create:
            try:
                os.mkdir(name, mode, dir_fd=parent)
            except FileExistsError:
                pass
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        st = os.fstat(fd)
        if st.st_uid != 0 or not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise RuntimeSetupError(f"{name}: not root's directory")
        return fd

    def _dir(self, job_id: str, name: str) -> Path:
        return self.base / job_id / name

    def _key_lock(self, job_id: str, name: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault((job_id, name), threading.Lock())

    # ---- lookup ------------------------------------------------------------

    def find(self, job_id: str, name: str) -> Optional[Named]:
        """The job's container of that name on this node, or None."""
        path = self._dir(job_id, name)
        try:
            with open(path / RECORD, encoding="utf-8") as f:
                r = json.load(f)
            return Named(job_id, name, int(r["uid"]), int(r["gid"]), str(r["digest"]),
                         str(r.get("image", "")), dict(r.get("config") or {}), path,
                         bool(r.get("remap_root", False)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RuntimeSetupError(f"the record of named container {name} is unreadable: {e}")

    def lookup(self, job_id: str, text: str, uid: int, node: str,
               remap_root: bool = False) -> Named:
        """A step that gives the name alone: the container must exist here, and be the user's."""
        name, _flag = parse_container_name(text)
        nc = self.find(job_id, name)
        if nc is None:
            raise NotFound(f"--oci-name={name}: job {job_id} has no container {name} on node "
                           f"{node}; give --oci-image too, to make it there")
        self._check_owner(nc, uid)
        self._check_remap(nc, remap_root)
        return nc

    @staticmethod
    def _check_remap(nc: Named, remap_root: bool) -> None:
        # the image's owners are decided when the container is made: without an idmap its
        # files stay the host root's, which root in the user namespace may not change
        if remap_root and not nc.remap_root:
            raise InvalidArgument(f"--oci-remap-root: container {nc.name} was made without it "
                                  f"(its image's files stay root's); make it with "
                                  f"--oci-remap-root (another name, or its first step)")

    @staticmethod
    def _check_owner(nc: Named, uid: int) -> None:
        if nc.uid != uid:  # a job is one user's; never another's container
            raise AccessDenied(f"--oci-name={nc.name}: not your container")

    def _check_count(self, job_id: str, name: str, node: str) -> None:
        try:
            have = len(os.listdir(self.base / job_id))
        except FileNotFoundError:
            return
        if have >= self.per_job:  # each is a host mount, copied into every later step
            raise InvalidArgument(f"--oci-name={name}: job {job_id} has {have} named containers "
                                  f"on node {node}, the site's limit (containers_per_job); "
                                  f"reuse one of them")

    def _check_space(self, node: str, name: str) -> None:
        if self.min_free <= 0:
            return
        fd = self._open_base()
        try:
            vfs = os.fstatvfs(fd)
        finally:
            os.close(fd)
        free = vfs.f_bavail * vfs.f_frsize
        if free < self.min_free:
            raise NoSpace(f"--oci-name={name}: node {node} has only {_mib(free)} free for named "
                          f"containers (the site asks for {_mib(self.min_free)}); end the job "
                          f"to free them, or run without --oci-name, or ask the site's admins")

    # ---- use ---------------------------------------------------------------

    def use(self, job_id: str, text: str, uid: int, gid: int, digest: str, image: str,
            config: dict, rootfs: Path, node: str, remap_root: bool = False) -> Named:
        """The container for a step that gave its image (digest, mounted at rootfs): made and
        mounted if new (unless NAME:no_create), else checked to be of that image."""
        name, flag = parse_container_name(text)
        with self._key_lock(job_id, name):
            nc = self.find(job_id, name)
            if nc is not None:
                self._check_owner(nc, uid)
                if flag == "create":
                    raise InvalidArgument(f"--oci-name={name}:create: job {job_id} already has "
                                          f"a container {name} on node {node}; drop :create to "
                                          f"use it")
                if nc.digest != digest:
                    raise InvalidArgument(
                        f"--oci-name={name}: the container was made from {nc.image or nc.digest}"
                        f" ({nc.digest[:19]}), not from {image} ({digest[:19]}); give the same "
                        f"image, or the name alone, or another name")
                self._check_remap(nc, remap_root)
                self._check_space(node, name)
                self._ensure_mounted(nc, rootfs)
                return nc
            if flag == "no_create":
                raise NotFound(f"--oci-name={name}:no_create: job {job_id} has no container "
                               f"{name} on node {node}")
            self._check_space(node, name)
            self._check_count(job_id, name, node)
            return self._create(job_id, name, uid, gid, digest, image, config, rootfs,
                                remap_root)

    def ready(self, nc: Named, node: str) -> Named:
        """A name-only step: the container's overlay, mounted (again, after a reboot)."""
        with self._key_lock(nc.job_id, nc.name):
            self._check_space(node, nc.name)
            if mount_at(nc.root) is None:
                raise NotFound(f"--oci-name={nc.name}: the container on node {node} is not "
                               f"mounted any more; give --oci-image too")
        return nc

    def _create(self, job_id: str, name: str, uid: int, gid: int, digest: str, image: str,
                config: dict, rootfs: Path, remap_root: bool = False) -> Named:
        fds: List[int] = [self._open_base()]
        try:
            fds.append(self._subdir(fds[-1], job_id, True))
            fds.append(self._subdir(fds[-1], name, True))
            for sub, mode in (("upper", 0o755), ("work", 0o700), ("root", 0o755),
                              ("lower", 0o700)):
                os.close(self._subdir(fds[-1], sub, True, mode))
        except OSError as e:  # a symlink or a file on the way: nothing is made through it
            raise RuntimeSetupError(f"cannot make named container {name} in {self.base}: "
                                    f"{e.strerror}") from None
        finally:
            for fd in fds:
                os.close(fd)
        path = self._dir(job_id, name)
        nc = Named(job_id, name, uid, gid, digest, image, dict(config or {}), path, remap_root)
        self.mounts.acquire(digest, "")  # mounted by the step: the container's own reference
        try:
            self._mount(nc, rootfs)
            tmp = path / (RECORD + ".tmp")
            tmp.write_text(json.dumps({"uid": uid, "gid": gid, "digest": digest, "image": image,
                                       "config": nc.config, "remap_root": remap_root}))
            os.replace(tmp, path / RECORD)  # recorded: from now on the job's end removes it
        except BaseException:
            self._unmount(nc.root)
            self._unmount(nc.lower)
            self.mounts.release(digest)
            shutil.rmtree(path, ignore_errors=True)
            raise
        log.info("named container created", extra={"job": job_id, "container": name,
                                                   "digest": digest})
        return nc

    def _ensure_mounted(self, nc: Named, rootfs: Path) -> None:
        if mount_at(nc.root) is not None:
            return
        # its record outlived its mount (a reboot with containers_dir on disk): mount again
        self.mounts.acquire(nc.digest, "")
        try:
            self._mount(nc, rootfs)
        except BaseException:
            self.mounts.release(nc.digest)
            raise

    @staticmethod
    def _mount(nc: Named, rootfs: Path) -> None:
        lower = rootfs
        if nc.remap_root:
            lower = nc.lower
            if mount_at(lower) is None:
                _mount_idmapped(rootfs, lower, nc.uid, nc.gid)
            os.chown(nc.path / "upper", nc.uid, nc.gid)  # its root directory: root's inside
        try:
            sc.mount("overlay", str(nc.root), "overlay", sc.MS_NOSUID | sc.MS_NODEV,
                     nc.layers(str(lower)).options())
        except OSError as e:
            raise RuntimeSetupError(f"cannot mount named container {nc.name}: {e.strerror}")

    @staticmethod
    def _unmount(root: Path) -> None:
        if mount_at(root) is None:
            return
        try:
            sc.umount2(str(root), sc.UMOUNT_NOFOLLOW)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            # a process still inside (a task that outlived its step): the layers go when it does
            sc.umount2(str(root), sc.UMOUNT_NOFOLLOW | sc.MNT_DETACH)

    # ---- the job's end, restarts -------------------------------------------

    def remove_job(self, job_id: str) -> int:
        """Unmount and delete the job's containers on this node; returns how many."""
        job_dir = self.base / job_id
        if not job_dir.is_dir() or job_dir.is_symlink():
            return 0
        count = 0
        for d in sorted(job_dir.iterdir()):
            with self._key_lock(job_id, d.name):
                nc = None
                try:
                    nc = self.find(job_id, d.name)
                except RuntimeSetupError:
                    pass
                mounted = mount_at(d / "root") is not None
                self._unmount(d / "root")
                self._unmount(d / "lower")  # before the tree goes: never into the image
                if nc is not None and mounted:
                    self.mounts.release(nc.digest)
                shutil.rmtree(d, ignore_errors=True)  # fd-based: no symlink is followed
                count += 1
            with self._lock:
                self._locks.pop((job_id, d.name), None)
        try:
            job_dir.rmdir()
        except OSError:
            pass
        if count:
            log.info("named containers removed", extra={"job": job_id, "containers": count})
        return count

    def recover(self) -> Dict[str, int]:
        """After a restart: {digest: mounted containers}, the image references they hold.
        A container mounted but never recorded (a crash while it was made) is removed."""
        refs: Dict[str, int] = {}
        if not self.base.is_dir():
            return refs
        for job_dir in sorted(self.base.iterdir()):
            if not job_dir.is_dir() or job_dir.is_symlink():
                continue
            for d in sorted(job_dir.iterdir()):
                try:
                    nc = self.find(job_dir.name, d.name)
                except RuntimeSetupError:
                    nc = None
                mounted = mount_at(d / "root") is not None
                if nc is None:
                    self._unmount(d / "root")
                    self._unmount(d / "lower")
                    shutil.rmtree(d, ignore_errors=True)
                    log.warning("removed an unrecorded named container",
                                extra={"job": job_dir.name, "container": d.name})
                elif mounted:
                    refs[nc.digest] = refs.get(nc.digest, 0) + 1
        return refs
