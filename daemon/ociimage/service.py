"""gRPC servicers for the ociimage.v1 contract: translate requests to the image store and the
step runtime, and typed errors to status codes. No logic of its own beyond that."""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
from typing import Iterator

import grpc

from . import cancel
from .cache import CacheEntry
from .errors import OciImageError
from .images import ImageStore
from .progress import ProgressEvent
from .v1 import ociimage_pb2 as pb
from .v1 import ociimage_pb2_grpc as pbg

log = logging.getLogger("ociimage.service")


def _fail(context: grpc.ServicerContext, e: BaseException) -> None:
    """Set the status for a failed request (set, not abort, so it works inside generators)."""
    if isinstance(e, OciImageError):
        code = getattr(grpc.StatusCode, e.status, grpc.StatusCode.INTERNAL)
        log.info("request failed", extra={"code": e.status, "error": str(e)})
        context.set_code(code)
        context.set_details(str(e))
        return
    log.error("internal error", exc_info=e)
    context.set_code(grpc.StatusCode.INTERNAL)
    context.set_details(f"internal error in oci-imaged: {type(e).__name__}: {e}")


def unary(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status code
            _fail(context, e)
            return None
    return wrapper


def progress_pb(ev: ProgressEvent) -> pb.Progress:
    return pb.Progress(phase=ev.phase, message=ev.message, current=max(0, int(ev.current)),
                       total=max(0, int(ev.total)), layer=ev.layer, layers=ev.layers)


def image_pb(e: CacheEntry, users=(), jobs=()) -> pb.Image:
    cfg = e.meta.get("config", {})
    return pb.Image(
        digest=e.digest, path=str(e.path), size=e.size, reference=e.reference,
        last_used=e.last_used, users=list(users), jobs=list(jobs),
        metadata_json=json.dumps(e.meta, sort_keys=True),
        config=pb.ImageConfig(env=cfg.get("Env") or [], entrypoint=cfg.get("Entrypoint") or [],
                              cmd=cfg.get("Cmd") or [], working_dir=cfg.get("WorkingDir") or "",
                              user=cfg.get("User") or ""))


CLIENT_GONE = "the client went away"


def rpc_token(context: grpc.ServicerContext) -> cancel.CancelToken:
    """A token cancelled when the RPC ends: the client cancelled, disconnected or timed out,
    or the server is stopping. (It fires after a normal end too, when nothing listens.)"""
    token = cancel.CancelToken()
    if not context.add_callback(lambda: token.cancel(CLIENT_GONE)):
        token.cancel(CLIENT_GONE)  # already over
    return token


def stream_with_progress(work, context, wrap_progress, wrap_result,
                         token: "cancel.CancelToken" = None) -> Iterator:
    """Run work(report) in a thread, yielding progress messages as they come, then the result.

    The work runs under the RPC's cancellation token: when the client goes
    away, this handler returns at once and the work gives up at its next
    waiting point, unless it is a pull another request still waits for
    (SingleFlight keeps that one going).
    """
    q: "queue.Queue" = queue.Queue(maxsize=256)
    done = object()
    gone = object()
    outcome = {}
    token = token or rpc_token(context)

    def report(ev: ProgressEvent) -> None:
        try:
            q.put_nowait(ev)
        except queue.Full:  # a slow reader only misses intermediate progress
            pass

    def run():
        try:
            with cancel.scope(token):
                outcome["result"] = work(report)
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e
        finally:
            # once the handler has gone nobody drains the queue: never block on it then
            while True:
                try:
                    q.put(done, timeout=0.5)
                    break
                except queue.Full:
                    if token.cancelled:
                        break

    def wake() -> None:
        try:
            q.put_nowait(gone)
        except queue.Full:  # the handler is not blocked on an empty queue then
            pass

    threading.Thread(target=run, daemon=True, name="pull-worker").start()
    unregister = token.on_cancel(wake)
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if item is gone or token.cancelled:
                if "error" in outcome or "result" in outcome:
                    continue  # finished meanwhile: drain to `done`
                return  # nobody to answer: free this thread, the work winds down by itself
            if context.is_active():
                yield wrap_progress(progress_pb(item))
    finally:
        unregister()
    if "error" in outcome:
        _fail(context, outcome["error"])
        return
    yield wrap_result(outcome["result"])


class ImagesServicer(pbg.ImagesServicer):
    def __init__(self, store: ImageStore):
        self.store = store

    def _users(self):
        users = {}
        for le in self.store.cache.iter_leases():
            users.setdefault(le.digest, []).append(f"{le.holder}@{le.node}")
        return users

    def _jobs(self):
        from .slurm import describe
        needed = self.store.jobs_by_digest() or {}
        return {d: describe(jobs) for d, jobs in needed.items()}

    def Pull(self, request, context):
        uid = request.uid if request.HasField("uid") else None
        token = rpc_token(context)
        # A hit by digest (every step of a pinned job) needs no worker thread.
        try:
            with cancel.scope(token):  # the access check may ask the registry
                entry = self.store.lookup(request.reference, uid)
        except Exception as e:  # noqa: BLE001
            _fail(context, e)
            return
        if entry is not None:
            self.store.metrics.cache_hits.inc()
            self.store.cache.touch(entry.digest)
            yield pb.PullEvent(image=image_pb(entry))
            return
        yield from stream_with_progress(
            lambda report: self.store.pull(request.reference, request.platform, uid, report),
            context, lambda p: pb.PullEvent(progress=p), lambda e: pb.PullEvent(image=image_pb(e)),
            token)

    @unary
    def Resolve(self, request, context):
        uid = request.uid if request.HasField("uid") else None
        r = self.store.resolve(request.reference, request.platform, uid)
        return pb.ResolveResponse(digest=r.manifest.digest, reference=str(r.reference),
                                  index_digest=r.index_digest or "")

    @unary
    def Inspect(self, request, context):
        from .digests import validate_digest
        from .errors import NotFound
        e = self.store.cache.get(validate_digest(request.digest))
        if e is None:
            raise NotFound(f"image {request.digest} is not in the cache")
        return image_pb(e, self._users().get(e.digest, []), self._jobs().get(e.digest, []))

    @unary
    def List(self, request, context):
        users, jobs = self._users(), self._jobs()
        return pb.ListResponse(images=[image_pb(e, users.get(e.digest, []), jobs.get(e.digest, []))
                                       for e in self.store.cache.list()])

    @unary
    def Remove(self, request, context):
        from .digests import validate_digest
        self.store.cache.remove(validate_digest(request.digest))
        return pb.RemoveResponse()

    @unary
    def Prune(self, request, context):
        quota = request.quota if request.HasField("quota") else None
        removed, kept = self.store.prune(quota=quota)
        return pb.PruneResponse(removed=[image_pb(e) for e in removed], kept_for_jobs=kept)


class ContainersServicer(pbg.ContainersServicer):
    def __init__(self, steps):
        self.steps = steps

    def PrepareStep(self, request, context):
        yield from stream_with_progress(
            lambda report: self.steps.prepare(request, report), context,
            lambda p: pb.PrepareStepEvent(progress=p),
            lambda c: pb.PrepareStepEvent(container=c))

    @unary
    def ReleaseStep(self, request, context):
        self.steps.release(request.job_id, request.step_id)
        return pb.ReleaseStepResponse()

    @unary
    def ReleaseJob(self, request, context):
        steps, leases = self.steps.release_job(request.job_id)
        return pb.ReleaseJobResponse(steps=steps, leases=leases)
