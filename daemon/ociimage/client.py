"""Client side of the daemon contract, for the CLI and the step client.

Imports only grpc and the generated stubs: the step client runs on the
per-step hot path. Status codes come back as the typed errors they were.
"""

from __future__ import annotations

import json
from typing import Callable, List, Optional

import grpc

from . import errors
from .v1 import ociimage_pb2 as pb
from .v1 import ociimage_pb2_grpc as pbg

_BY_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationRequired,
    grpc.StatusCode.PERMISSION_DENIED: errors.AccessDenied,
    grpc.StatusCode.UNAVAILABLE: errors.RegistryUnavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.NoSpace,
    grpc.StatusCode.FAILED_PRECONDITION: errors.InUse,
    grpc.StatusCode.DATA_LOSS: errors.DigestMismatch,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
}


def image_dict(img) -> dict:
    return {"digest": img.digest, "path": img.path, "size": img.size, "reference": img.reference,
            "last_used": img.last_used, "users": list(img.users), "jobs": list(img.jobs),
            "meta": json.loads(img.metadata_json) if img.metadata_json else {}}


class DaemonClient:
    def __init__(self, socket_path: str, timeout: Optional[float] = None):
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            "unix:" + socket_path,
            options=[("grpc.max_receive_message_length", 16 << 20),
                     ("grpc.enable_retries", 0)])
        self.images = pbg.ImagesStub(self._channel)
        self.containers = pbg.ContainersStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _error(self, e: grpc.RpcError) -> errors.OciImageError:
        code, details = e.code(), e.details() or ""
        # Only a transport failure names the socket; the daemon's own UNAVAILABLE
        # answers (an unreachable registry) never do.
        transport = "failed to connect to all addresses" in details or \
            f"unix:{self.socket_path}" in details
        if code == grpc.StatusCode.UNAVAILABLE and transport:
            if "Permission denied" in details:
                return errors.AccessDenied(f"permission denied on {self.socket_path}: "
                                           f"only root may use the oci-imaged socket")
            return errors.DaemonUnavailable(
                f"cannot reach oci-imaged at {self.socket_path}: is the daemon running? "
                f"(systemctl status oci-imaged)")
        # the daemon closed the connection mid-call; how gRPC words it depends on the moment
        # (and on the release: "Broken pipe" seen with Debian unstable's grpcio)
        if code == grpc.StatusCode.UNAVAILABLE and any(
                m in details for m in ("Socket closed", "Stream removed", "Broken pipe",
                                       "Connection reset by peer")):
            return errors.DaemonUnavailable(
                f"oci-imaged at {self.socket_path} went away during the request "
                f"(restarted or crashed?); run the command again")
        cls = _BY_STATUS.get(code, errors.OciImageError)
        err = cls(details or code.name)
        err.status = code.name
        return err

    def _call(self, fn, request):
        try:
            return fn(request, timeout=self.timeout, wait_for_ready=False)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _stream(self, fn, request, on_progress: Optional[Callable], field: str):
        try:
            for ev in fn(request, timeout=self.timeout, wait_for_ready=False):
                which = ev.WhichOneof("event")
                if which == "progress":
                    if on_progress:
                        on_progress(ev.progress)
                elif which == field:
                    return getattr(ev, field)
        except grpc.RpcError as e:
            raise self._error(e) from None
        raise errors.OciImageError("oci-imaged ended the stream without a result")

    # ---- images ----------------------------------------------------------

    def pull(self, reference: str, platform: Optional[str] = None, uid: Optional[int] = None,
             progress: Optional[Callable] = None) -> dict:
        from .progress import ProgressEvent
        req = pb.PullRequest(reference=reference, platform=platform or "")
        if uid is not None:
            req.uid = uid

        def relay(p):
            if progress:
                progress(ProgressEvent(p.phase, p.message, p.current, p.total, p.layer, p.layers))
        return image_dict(self._stream(self.images.Pull, req, relay, "image"))

    def resolve(self, reference: str, platform: str = "", uid: Optional[int] = None) -> dict:
        req = pb.ResolveRequest(reference=reference, platform=platform)
        if uid is not None:
            req.uid = uid
        r = self._call(self.images.Resolve, req)
        return {"digest": r.digest, "reference": r.reference, "index_digest": r.index_digest}

    def list(self) -> List[dict]:
        return [image_dict(i) for i in self._call(self.images.List, pb.ListRequest()).images]

    def inspect(self, digest: str) -> dict:
        return image_dict(self._call(self.images.Inspect, pb.InspectRequest(digest=digest)))

    def remove(self, digest: str) -> None:
        self._call(self.images.Remove, pb.RemoveRequest(digest=digest))

    def prune(self, quota: Optional[int] = None) -> List[dict]:
        return self.prune_detail(quota)[0]

    def prune_detail(self, quota: Optional[int] = None):
        """(removed images, digests spared because Slurm jobs need them)."""
        req = pb.PruneRequest()
        if quota is not None:
            req.quota = quota
        r = self._call(self.images.Prune, req)
        return [image_dict(i) for i in r.removed], list(r.kept_for_jobs)

    # ---- containers ------------------------------------------------------

    def prepare_step(self, request, on_progress: Optional[Callable] = None):
        return self._stream(self.containers.PrepareStep, request, on_progress, "container")

    def release_step(self, job_id: str, step_id: str) -> None:
        self._call(self.containers.ReleaseStep, pb.ReleaseStepRequest(job_id=job_id, step_id=step_id))

    def release_job(self, job_id: str) -> dict:
        r = self._call(self.containers.ReleaseJob, pb.ReleaseJobRequest(job_id=job_id))
        return {"steps": r.steps, "leases": r.leases}
