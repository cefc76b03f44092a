"""gRPC servicers for the ociimage.v1 contract: translate requests to the image store and the
step runtime, and typed errors to status codes. No logic of its own beyond that."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import threading
from typing import Deque

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

#: progress events queued for a slow reader before the oldest are dropped
PROGRESS_QUEUE = 256


async def stream_with_progress(work, context, wrap_progress, wrap_result, executor=None):
    """Run work(report) in the pool, yielding progress messages as they come, then the result.

    The work runs under a cancellation token that is cancelled when the RPC ends
    early (the client cancelled, disconnected or timed out, or the server is
    stopping): grpc.aio cancels this coroutine, and the work gives up at its next
    waiting point, unless it is a pull another request still waits for (SingleFlight
    keeps that one going). The loop is woken at most once per batch of events.
    """
    loop = asyncio.get_running_loop()
    token = cancel.CancelToken()
    pending: Deque[ProgressEvent] = collections.deque(maxlen=PROGRESS_QUEUE)
    lock = threading.Lock()
    woken = asyncio.Event()
    scheduled = [False]

    def wake() -> None:
        scheduled[0] = False
        woken.set()

    def report(ev: ProgressEvent) -> None:  # on the worker's thread
        with lock:
            pending.append(ev)  # a slow reader only misses intermediate progress
            if scheduled[0]:
                return
            scheduled[0] = True
        loop.call_soon_threadsafe(wake)

    def run():
        with cancel.scope(token):
            return work(report)

    fut = loop.run_in_executor(executor, run)
    waiter = None
    try:
        while True:
            waiter = asyncio.ensure_future(woken.wait())
            await asyncio.wait({fut, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            woken.clear()
            with lock:
                batch = list(pending)
                pending.clear()
            for ev in batch:
                yield wrap_progress(progress_pb(ev))
            if fut.done():
                break
    finally:
        if waiter is not None:
            waiter.cancel()
        if not fut.done():  # cancelled by grpc.aio, or closed: nobody waits any more
            token.cancel(CLIENT_GONE)
            # its end (Cancelled, most likely) is nobody's news: not a logged traceback
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        result = fut.result()
    except Exception as e:  # noqa: BLE001 - every failure becomes a status code
        _fail(context, e)
        return
    yield wrap_result(result)


class ImagesServicer(pbg.ImagesServicer):
    """Pull is a coroutine (grpcserver.py says why); the others are plain methods, which
    grpc.aio runs in its pool."""

    def __init__(self, store: ImageStore):
        self.store = store
        self._answers: dict = {}

    def _users(self):
        users = {}
        for le in self.store.cache.iter_leases():
            users.setdefault(le.digest, []).append(f"{le.holder}@{le.node}")
        return users

    def _jobs(self):
        from .slurm import describe
        needed = self.store.jobs_by_digest() or {}
        return {d: describe(jobs) for d, jobs in needed.items()}

    async def Pull(self, request, context):
        uid = request.uid if request.HasField("uid") else None
        # A hit by digest (every step of a pinned job) is answered here, on the loop:
        # one stat and what this daemon already knows, no thread.
        try:
            entry = self.store.lookup_known(request.reference, uid)
        except Exception as e:  # noqa: BLE001
            _fail(context, e)
            return
        if entry is not None:
            self.store.metrics.cache_hits.inc()
            if self.store.cache.use_due(entry.digest):  # a write, every 30 s: off the loop
                asyncio.get_running_loop().run_in_executor(None, self.store.cache.record_use,
                                                           entry.digest)
            yield pb.PullEvent(image=self._image_pb(entry))
            return
        async for event in stream_with_progress(
                lambda report: self.store.pull(request.reference, request.platform, uid, report),
                context, lambda p: pb.PullEvent(progress=p),
                lambda e: pb.PullEvent(image=self._image_pb(e))):
            yield event

    def _image_pb(self, entry: CacheEntry) -> pb.Image:
        """image_pb for a Pull's answer, made once per version of the entry's metadata."""
        key = (entry.digest, id(entry.meta), str(entry.path), entry.size)
        cached = self._answers.get(entry.digest)
        if cached is None or cached[0] != key:
            # the metadata dict is kept with its answer, so that its id is not reused
            cached = (key, image_pb(entry), entry.meta)
            if len(self._answers) >= 1024:
                self._answers.clear()
            self._answers[entry.digest] = cached
        out = pb.Image()
        out.CopyFrom(cached[1])
        out.last_used = entry.last_used
        return out

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

    async def PrepareStep(self, request, context):
        async for event in stream_with_progress(
                lambda report: self.steps.prepare(request, report), context,
                lambda p: pb.PrepareStepEvent(progress=p),
                lambda c: pb.PrepareStepEvent(container=c)):
            yield event

    @unary
    def ReleaseStep(self, request, context):
        self.steps.release(request.job_id, request.step_id)
        return pb.ReleaseStepResponse()

    @unary
    def ReleaseJob(self, request, context):
        steps, leases = self.steps.release_job(request.job_id)
        return pb.ReleaseJobResponse(steps=steps, leases=leases)
