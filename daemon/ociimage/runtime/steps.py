"""Step containers on one node: image ready + leased + mounted once, then a namespace per step.

State that must survive a daemon restart lives in the filesystem: the
leases in the shared cache, the pinned namespace files and a small record per
step under <runtime_dir>/steps/<job>.<step>/, the loop mounts in the kernel's
mount table. recover() rebuilds the in-memory view from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from .. import asuser
from ..cache import Cache, DEFAULT_LEASE_TTL
from ..config import Config, containers_path
from ..errors import AccessDenied, CacheError, InvalidArgument, NotFound, OciImageError
from ..images import ImageStore
from ..mountflags import request_options
from ..progress import MOUNT, NOTE, ProgressEvent, Reporter
from ..reference import parse_reference
from ..v1 import ociimage_pb2 as pb
from . import cdiapply, cdihooks, environment, hooks
from .mounts import NodeMounts
from .named import NamedContainers
from .namespaces import (NS_FILE, StepSpec, cleanup_stale, create_step_namespace,
                         destroy_step_namespace, holder_info, holder_of)

log = logging.getLogger("ociimage.runtime")

_BATCH_IDS = ("batch", str(0xFFFFFFFB))  # Slurm's SLURM_BATCH_SCRIPT, as the plugin sends it
_ID = re.compile(r"^[0-9]{1,12}$|^(batch|extern|interactive)$|^[0-9]{1,12}\+[0-9]{1,6}$")


@dataclass
class StepRecord:
    job_id: str
    step_id: str
    digest: str
    ns_path: str
    lease_id: Optional[str]
    cwd: str
    userns_fd: int = -1  # --oci-remap-root: the holder's descriptor of the user namespace
    cdi_env: Tuple[str, ...] = ()  # NAME=VALUE of the step's CDI devices (--oci-devices)

    @property
    def key(self) -> Tuple[str, str]:
        return (self.job_id, self.step_id)


def _check_ids(job_id: str, step_id: str) -> None:
    if not re.fullmatch(r"[0-9]{1,12}", job_id or "") or not _ID.match(step_id or ""):
        raise InvalidArgument(f"invalid job/step id {job_id!r}.{step_id!r}")


class StepManager:
    def __init__(self, config: Config, cache: Cache, store: ImageStore):
        self.config = config
        self.cache = cache
        self.store = store
        self.mounts = NodeMounts(config.runtime_dir, idle=config.mount_idle)
        self.named = NamedContainers(containers_path(config), self.mounts,
                                     config.containers_min_free, config.containers_per_job)
        self.state_dir = config.runtime_dir / "steps"
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._steps: Dict[Tuple[str, str], StepRecord] = {}
        self._ttl = config.lease_ttl or DEFAULT_LEASE_TTL
        # leases of this node no step owns, seen by the last sweep (dropped when seen again)
        self._unowned: set = set()
        self._pending: set = set()  # leases taken by prepares still under way
        self._swept_at = time.monotonic()

    # ---- accounting for metrics -----------------------------------------

    def mount_count(self) -> int:
        return len(self.mounts.mounted())

    def lease_count(self) -> int:
        with self._lock:
            return sum(1 for r in self._steps.values() if r.lease_id)

    def step_count(self) -> int:
        with self._lock:
            return len(self._steps)

    # ---- prepare / release -----------------------------------------------

    def _record_path(self, job_id: str, step_id: str) -> Path:
        return self.state_dir / f"{job_id}.{step_id}" / "record.json"

    def _local_image(self, request) -> Tuple[str, asuser.Opened, dict]:
        """A user's own .sqfs: allowed only by plugstack allow_sqfs, and only if they can read it.

        Opened as the user, and mounted from that descriptor: a symlink into
        another user's directory, or a file swapped in after a check, gets nothing.
        """
        if not request.allow_sqfs:
            raise AccessDenied("this site does not allow --oci-image with a local .sqfs file; "
                               "use an image reference instead")
        if not os.path.isabs(request.image):
            raise InvalidArgument(f"image file {request.image} must be an absolute path")
        [opened] = asuser.open_paths(asuser.Identity.of_user(request.uid, request.gid),
                                     [request.image], flags=os.O_RDONLY | os.O_NONBLOCK)
        if isinstance(opened, NotFound):
            raise NotFound(f"image file {request.image} does not exist")
        if isinstance(opened, OciImageError):
            raise AccessDenied(f"you cannot read {request.image}")
        if not stat.S_ISREG(opened.mode):
            opened.close()
            raise InvalidArgument(f"image file {request.image} is not a regular file")
        st = os.fstat(opened.fd)
        ident = f"{opened.path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        digest = "sha256:" + hashlib.sha256(ident.encode()).hexdigest()
        return digest, opened, {}

    def _pull_and_lease(self, request, report: Reporter, attempts: int = 3):
        """Pull, leased: the lease is taken BEFORE the pull whenever the digest is known, so
        no prune (on any node) can evict the image between its pull and its use.

        A pinned reference names its digest up front; for a tag (or an index, whose entry
        is its platform manifest's) the first pull teaches the digest, and if a prune got
        in before the lease, the next attempt reserves that digest first.
        """
        holder = f"job {request.job_id}.{request.step_id}"
        hint = parse_reference(request.image).digest
        for attempt in range(attempts):
            reserved = self._pend(self.cache.reserve(hint, holder, ttl=self._ttl)) if hint \
                else None
            entry = None
            try:
                entry = self.store.pull(request.image, uid=request.uid, report=report)
                if reserved is not None and reserved.digest == entry.digest:
                    lease_id, reserved = reserved.id, None
                    return entry, lease_id
                return entry, self._pend(self.cache.add_lease(entry.digest, holder,
                                                              ttl=self._ttl)).id
            except NotFound:
                if entry is None or attempt == attempts - 1 or hint == entry.digest:
                    raise  # not in the registry, or evicted although leased first
                hint = entry.digest
                log.info("image evicted between pull and lease, pulling again, leased first",
                         extra={"digest": entry.digest, "holder": holder})
            finally:
                if reserved is not None:
                    with self._lock:
                        self._pending.discard(reserved.id)
                    self.cache.drop_lease(reserved)
        raise AssertionError("unreachable")

    def _pend(self, lease):
        """A lease of a prepare still under way (a pull may take an hour): the leak sweep
        must not take it for one no step holds. prepare() discards it once recorded."""
        with self._lock:
            self._pending.add(lease.id)
        return lease

    def prepare(self, request, report: Reporter) -> pb.StepContainer:
        _check_ids(request.job_id, request.step_id)
        key = (request.job_id, request.step_id)
        with self._lock:
            existing = self._steps.get(key)
        if existing:  # a retried prepare for the same step gets the same container
            return self._container(existing, request)
        # the CDI devices first: a device this node lacks fails the step before any pull
        names = cdiapply.step_device_names(list(request.devices), request.environment,
                                           self.config.gpu_cdi_kind,
                                           batch=request.step_id in _BATCH_IDS)
        devices = cdiapply.resolve(names, self.config.cdi_spec_dirs,
                                   request.node or getattr(self.config, "node", "")) \
            if names else None
        lease_id = None
        local = None
        named = None
        if not request.image:  # the name alone: the job's container of that name, its image
            if not request.container_name:
                raise InvalidArgument("no image given (--oci-image)")
            named = self.named.ready(self.named.lookup(request.job_id, request.container_name,
                                                       request.uid, request.node,
                                                       request.remap_root), request.node)
            digest, sqfs, config = named.digest, Path(""), named.config
        elif request.image.startswith("/"):
            digest, local, config = self._local_image(request)
            sqfs = Path(local.path)
        else:
            entry, lease_id = self._pull_and_lease(request, report)
            digest, sqfs, config = entry.digest, entry.path, entry.meta.get("config", {})
        try:
            report(ProgressEvent(MOUNT, message="mounting the image"))
            try:
                rootfs = self.mounts.acquire(digest, sqfs, fd=local.fd if local else None)
            finally:
                if local:
                    local.close()
            try:
                if request.container_name and devices and devices.edits.hooks:
                    raise InvalidArgument(
                        f"--oci-devices: {','.join(devices.edits.devices)}: the site's CDI "
                        f"spec runs hooks, which cannot run in a named container (--oci-name): "
                        f"the job's other steps may change its root while they run; use these "
                        f"devices without --oci-name")
                if request.container_name and named is None:
                    named = self.named.use(request.job_id, request.container_name, request.uid,
                                           request.gid, digest, request.image, config, rootfs,
                                           request.node, request.remap_root)
                spec = StepSpec(
                    job_id=request.job_id, step_id=request.step_id, uid=request.uid,
                    gid=request.gid, user_name=request.user_name or f"user{request.uid}",
                    home=request.home or "/", rootfs=rootfs,
                    mounts=[(m.source, m.target, m.read_only,
                             request_options(m.kind, m.options))
                            for m in request.mounts if not m.kind],
                    tmpfs=[(m.target, request_options(m.kind, m.options))
                           for m in request.mounts if m.kind],
                    writable=request.writable, mount_home=request.mount_home,
                    remap_root=request.remap_root,
                    workdir=request.workdir or None, host_cwd=request.cwd or "/",
                    chdir_given=bool(request.cwd) and
                    request.environment.get("OCI_SUBMIT_CHDIR") == request.cwd,
                    image_workdir=config.get("WorkingDir") or None,
                    shared_root=named.root if named else None,
                    device_nodes=devices.make if devices else (),
                    device_mounts=devices.edits.mounts if devices else ())
                ns = create_step_namespace(spec, self.state_dir)
                if devices and devices.edits.hooks:
                    self._run_cdi_hooks(ns, request, devices, config)
                if ns.placeholder and not spec.workdir and not ns.submit_visible:
                    # in place of slurmstepd's "couldn't chdir" on every node
                    report(ProgressEvent(NOTE, message=(
                        f"{spec.host_cwd} is not in the container; the tasks start in "
                        f"{ns.cwd} (--oci-mounts={spec.host_cwd} brings it in, "
                        f"--oci-workdir=DIR picks another)")))
                # site hooks (GPUs, MPI, ...); on failure the namespace is destroyed
                # in a named container the whole root is the user's, and the job's other
                # steps may be changing it while the hooks run: root must write nothing there
                hooks.run_for_step(self.config, ns.ns_path, request, digest, config,
                                   user_mounts=(("/",) if named else ()) + tuple(ns.user_mounts))
            except BaseException:
                self.mounts.release(digest)
                raise
        except BaseException:
            if lease_id:
                self._pending.discard(lease_id)
                self.cache.drop_lease(lease_id)
            raise
        record = StepRecord(request.job_id, request.step_id, digest, str(ns.ns_path), lease_id,
                            str(ns.cwd), ns.userns_fd,
                            tuple(devices.edits.env) if devices else ())
        if devices:
            log.info("CDI devices", extra={"job": request.job_id, "step": request.step_id,
                                           "devices": ",".join(devices.edits.devices),
                                           "nodes_made": len(devices.make)})
        rp = self._record_path(*key)
        rp.parent.mkdir(parents=True, exist_ok=True)
        rp.write_text(json.dumps(vars(record)))
        with self._lock:
            self._steps[key] = record
            self._pending.discard(lease_id)
        log.info("step prepared", extra={"job": request.job_id, "step": request.step_id,
                                         "digest": digest, "ns": record.ns_path})
        return self._container(record, request, config)

    def _run_cdi_hooks(self, ns, request, devices, config: dict) -> None:
        """The CDI specs' hooks (cdihooks.py); on failure the namespace is destroyed."""
        try:
            pid = holder_of(ns.ns_path)
            if pid is None:
                raise hooks.HookFailed("the step's namespace went away before its CDI hooks ran")
            state_dir = Path(ns.ns_path).parent / "hooks"
            state_dir.mkdir(mode=0o700, exist_ok=True)
            env = list(config.get("Env") or []) + list(devices.edits.env)
            state = cdihooks.write_bundle(
                state_dir, pid=pid, container_id=f"{request.job_id}.{request.step_id}",
                env=env, cwd=ns.cwd, uid=request.uid, gid=request.gid,
                annotations={"oci-image.devices": ",".join(devices.edits.devices)},
                readonly=not (request.writable or request.remap_root))
            cdihooks.run(devices.edits.hooks, state, float(self.config.hooks_timeout),
                         job=request.job_id, step=request.step_id)
        except BaseException:
            try:
                destroy_step_namespace(Path(ns.ns_path))
            except Exception:  # noqa: BLE001 - the hook's error is the one to report
                log.exception("cannot destroy the namespace of a step whose CDI hook failed")
            raise

    def _container(self, record: StepRecord, request, config: Optional[dict] = None) -> pb.StepContainer:
        if config is None:
            entry = self.cache.get(record.digest)
            config = entry.meta.get("config", {}) if entry else {}
        to_set, to_unset = environment.merge(config.get("Env") or [], dict(request.environment),
                                             list(request.env_names))
        for kv in record.cdi_env:  # the CDI specs' variables: the admin's, they win
            name, _eq, value = kv.partition("=")
            to_set[name] = value
            to_unset = [n for n in to_unset if n != name]
        argv_prefix = []
        if request.entrypoint:  # --oci-entrypoint: a no-op for an image without one
            ep = config.get("Entrypoint") or []
            if isinstance(ep, str):  # not what the OCI spec allows, but seen in the wild
                ep = [ep]
            if not isinstance(ep, list) or not all(isinstance(a, str) for a in ep):
                raise InvalidArgument("--oci-entrypoint: the image's Entrypoint is not a list "
                                      "of strings")
            argv_prefix = list(ep)
        holder = holder_info(record.ns_path)
        if holder is None:
            raise NotFound(f"the namespace of step {record.job_id}.{record.step_id} is gone",
                           hint="start the step again")
        userns = {}
        if record.userns_fd >= 0:  # --oci-remap-root
            st = os.stat(f"/proc/{holder.pid}/fd/{record.userns_fd}")
            userns = {"userns_fd": record.userns_fd, "userns_inode": st.st_ino}
        return pb.StepContainer(ns_path=f"/proc/{holder.pid}/ns/mnt", cwd=record.cwd,
                                set_env=[f"{k}={v}" for k, v in sorted(to_set.items())],
                                unset_env=to_unset, digest=record.digest, argv_prefix=argv_prefix,
                                holder_pid=holder.pid, holder_start=holder.start,
                                ns_inode=holder.ns_inode, **userns)

    def release(self, job_id: str, step_id: str) -> None:
        _check_ids(job_id, step_id)
        with self._lock:
            record = self._steps.pop((job_id, step_id), None)
        if record is None:
            # Unknown here, e.g. built by a daemon that died before recording it:
            # whatever is left of it must still go.
            self._destroy_unrecorded(f"{job_id}.{step_id}")
            return
        try:
            destroy_step_namespace(Path(record.ns_path))
        finally:
            self.mounts.release(record.digest)
            if record.lease_id:
                self.cache.drop_lease(record.lease_id)
            rp = self._record_path(job_id, step_id)
            for p in (rp,):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            try:
                rp.parent.rmdir()
            except OSError:
                pass
        log.info("step released", extra={"job": job_id, "step": step_id})

    def _destroy_unrecorded(self, name: str) -> None:
        ns_path = self.state_dir / name / NS_FILE
        if (self.state_dir / name).is_dir():
            destroy_step_namespace(ns_path)
            log.warning("released an unrecorded step", extra={"step": name})

    def release_job(self, job_id: str) -> Tuple[int, int]:
        """Release every step of the job on this node and any lease it still holds here.

        The safety net for steps whose slurmstepd died before spank_exit (SIGKILL,
        node trouble): called when the job ends on the node (the plugin's
        slurm_spank_job_epilog). Returns (steps released, orphaned leases dropped).
        """
        _check_ids(job_id, "batch")
        with self._lock:
            keys = [k for k in self._steps if k[0] == job_id]
        for k in keys:
            try:
                self.release(*k)
            except Exception:  # noqa: BLE001 - release the others all the same
                log.exception("releasing a step of an ended job failed",
                              extra={"job": job_id, "step": k[1]})
        prefix = f"job {job_id}."
        dropped = 0
        for lease_id, lease in self.cache.node_leases().items():
            if lease.holder.startswith(prefix):
                self.cache.drop_lease(lease_id)
                dropped += 1
        # step directories of the job that no record describes (a crash mid-prepare)
        for d in self.state_dir.glob(f"{job_id}.*"):
            if (d.name.split(".", 1)[0] == job_id and not (d / "record.json").exists()):
                try:
                    destroy_step_namespace(d / NS_FILE)
                except Exception:  # noqa: BLE001
                    pass
                try:
                    d.rmdir()
                except OSError:
                    pass
        named = self.named.remove_job(job_id)  # last: no namespace of the job binds them now
        if keys or dropped:
            log.warning("released what an ended job left on this node",
                        extra={"job": job_id, "steps": len(keys), "leases": dropped,
                               "containers": named})
        else:
            log.info("job ended, nothing left on this node", extra={"job": job_id})
        return len(keys), dropped

    # ---- restart and housekeeping ---------------------------------------

    def recover(self) -> None:
        """Adopt the steps, mounts and leases a previous daemon on this node left running."""
        leases = self.cache.node_leases()
        for rp in self.state_dir.glob("*/record.json"):
            try:
                record = StepRecord(**json.loads(rp.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if holder_of(record.ns_path) is None:
                continue
            self._steps[record.key] = record
        # Steps a dying daemon built but never recorded: nobody will release them.
        for name in cleanup_stale(self.state_dir, keep=[f"{j}.{s}" for j, s in self._steps]):
            log.warning("removed an unrecorded step left by a crash", extra={"step": name})
        refs = self.named.recover()  # the image references of the named containers
        for r in self._steps.values():
            refs[r.digest] = refs.get(r.digest, 0) + 1
        self.mounts.recover(refs)
        live = {r.lease_id for r in self._steps.values() if r.lease_id}
        self.cache.heartbeat(self._ttl)  # the adopted steps' leases stay live
        for r in self._steps.values():
            if r.lease_id and r.lease_id not in leases:
                # deleted by another node's prune while this daemon was down (its heartbeat
                # stopped): the step still runs on the image, so it needs its lease back
                try:
                    self.cache.restore_lease(r.lease_id, f"job {r.job_id}.{r.step_id}")
                    log.warning("restored the lease of an adopted step",
                                extra={"step": f"{r.job_id}.{r.step_id}", "lease": r.lease_id})
                except NotFound:
                    log.error("an adopted step's image was evicted while the daemon was down",
                              extra={"step": f"{r.job_id}.{r.step_id}", "digest": r.digest})
                except CacheError as e:  # a lease id of an older version: nothing to go by
                    log.warning("cannot restore a lease", extra={"lease": r.lease_id,
                                                                 "error": str(e)})
        for lease_id in leases:
            if lease_id not in live:
                self.cache.drop_lease(lease_id)
        if self._steps:
            log.warning("adopted running steps", extra={"steps": len(self._steps)})

    def housekeeping(self) -> None:
        """Keep this node's leases live (one heartbeat, whatever their number), drop the
        leases no step of this node owns, and unmount idle images.

        Reads only this node's lease directory, never another node's (a dead node's
        leases are deleted by prune and remove, once its heartbeat has passed).
        """
        self.cache.heartbeat(self._ttl)
        now = time.monotonic()
        if now - self._swept_at >= self._ttl / 2:
            self._swept_at = now
            self._sweep_leases()
        self.mounts.reap()

    def _sweep_leases(self) -> None:
        """Leases a step leaked (its release never came): one listing of this node's directory;
        a lease no step owns in two sweeps (lease_ttl/2 apart) is dropped, as it would have
        expired when each lease was renewed on its own."""
        with self._lock:
            steps = {r.lease_id: f"job {r.job_id}.{r.step_id}" for r in self._steps.values()
                     if r.lease_id}
            owned = set(steps) | self._pending
        listed = self.cache.own_lease_ids()
        unowned = listed - owned
        # and the reverse: another node's prune deleted leases of ours while our heartbeat
        # had lapsed (a stall, a partition), from a listing older than our return
        for lease_id in owned - listed:
            self._restore(lease_id, steps.get(lease_id, "a step being prepared"))
        for lease_id in unowned & self._unowned:
            log.warning("dropping a lease no step holds", extra={"lease": lease_id})
            self.cache.drop_lease(lease_id)
        self._unowned = unowned - self._unowned

    def _restore(self, lease_id: str, holder: str) -> None:
        with self._lock:  # released meanwhile: nothing to restore
            if lease_id not in self._pending and not any(
                    r.lease_id == lease_id for r in self._steps.values()):
                return
        try:
            self.cache.restore_lease(lease_id, holder)
            log.warning("restored a lease another node deleted", extra={"lease": lease_id,
                                                                       "holder": holder})
        except NotFound:
            log.error("a running step's image was evicted", extra={"lease": lease_id})
        except CacheError as e:
            log.warning("cannot restore a lease", extra={"lease": lease_id, "error": str(e)})
