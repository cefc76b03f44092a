"""The daemon's gRPC server: grpc.aio on an event loop of its own thread.

With the synchronous server every call crossed from gRPC's completion queue to a
pool thread and back, about a millisecond of CPU under the GIL per call; with 64
steps asking at once the queue, not the work, was the latency. Here a handler
written as a coroutine (a cache hit, the health service) runs on the loop with no
thread at all, and everything that blocks (a pull, building a step's namespace,
reading the cache for a listing) runs in a thread: the coroutine handlers hand it to
`work` themselves (service.py), plain methods go to `pool`, grpc.aio's
migration_thread_pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent import futures
from typing import Callable, Optional

import grpc

from .errors import ConfigError
from .v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("ociimage.daemon")

#: blocked requests (a pull waiting for a conversion) hold a thread each; [daemon]
#: max_requests_per_uid keeps one user to a fraction of these
POOL_THREADS = 256


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health (the standard service; Debian packages no grpcio-health-checking):
    SERVING until shutdown begins; Watch streams every change until the caller hangs up."""

    SERVICES = ("", "ociimage.v1.Images", "ociimage.v1.Containers")

    def __init__(self) -> None:
        self.serving = True
        self._changed: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._changed = asyncio.Event()

    def set_serving(self, serving: bool) -> None:
        """From any thread."""
        self.serving = serving
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        # every Watch waiting on this event sees the change, then waits on a fresh one
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _status(self, service: str):
        R = health_pb2.HealthCheckResponse
        if service not in self.SERVICES:
            return R.SERVICE_UNKNOWN
        return R.SERVING if self.serving else R.NOT_SERVING

    async def Check(self, request, context):
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        # the standard's Watch: the status now, then each change (SERVICE_UNKNOWN for a
        # service not served, which may appear later), until the caller cancels
        last = None
        while True:
            changed = self._changed
            status = self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if last == health_pb2.HealthCheckResponse.NOT_SERVING:
                return  # said NOT_SERVING: the stop must not wait for this stream
            await changed.wait()


class GrpcServer:
    """grpc.aio server on a Unix socket, its loop on a thread; start/stop from any thread."""

    def __init__(self, address: str, register: Callable[[grpc.aio.Server], None],
                 health: HealthServicer, options=()):
        self.address = address
        self.register = register
        self.health = health
        self.options = list(options)
        # plain methods (List, Remove, Prune, ReleaseStep, ...) and the coroutines' work
        # (pulls that may wait an hour for a conversion) in pools of their own, so that
        # waiting pulls never starve the rest
        self.pool = futures.ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="rpc")
        self.work = futures.ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="pull")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.work)
        self._server: Optional[grpc.aio.Server] = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="grpc-aio")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self) -> None:
        server = grpc.aio.server(migration_thread_pool=self.pool, options=self.options)
        self.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health.bind(self.loop)
        if not server.add_insecure_port(self.address):
            raise ConfigError(f"cannot listen on {self.address}")
        await server.start()
        self._server = server

    def start(self, umask: int = 0o177) -> None:
        """Serve; the socket never exists wider than umask allows, even for an instant."""
        self._thread.start()
        old = os.umask(umask)
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        finally:
            os.umask(old)

    def stop(self, grace: float, wait: float) -> None:
        """Refuse new calls; those under way get `grace` seconds, then are cancelled."""
        self.health.set_serving(False)
        if self._server is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._server.stop(grace), self.loop).result(wait)
            except (futures.TimeoutError, RuntimeError) as e:
                log.warning("gRPC server did not stop in time", extra={"error": str(e)})
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.pool.shutdown(wait=False)
        self.work.shutdown(wait=False)
