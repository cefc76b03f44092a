"""`oci-imaged`: the per-node daemon serving the ociimage.v1 contract on a root-only Unix socket."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket as socketlib
import stat
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional


from . import __version__, logs
from .cache import Cache
from .config import Config, load_config, parse_listen, parse_size, prefetch_path, validate
from .errors import ConfigError, OciImageError
from .eviction import sweep_claims_if_due
from .images import ImageStore, Prefetcher
from .metrics import Metrics
from .service import ContainersServicer, ImagesServicer
from . import stepsock
from .stepsock import step_socket_path
from .usersock import UserRequests, UserSocketServer
from .verdicts import SharedAnswers
from .grpcserver import GrpcServer, HealthServicer
from .v1 import ociimage_pb2_grpc as pbg

log = logging.getLogger("ociimage.daemon")


def _socket_in_use(path: Path) -> bool:
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.cache = Cache.from_config(config)
        self.cache.secure()  # a cache from an older version was world-readable
        self.cache.check_locking()
        # which coordination converts once per cluster here, and why (auto: the mount's options)
        log.warning("cache locking", extra={"mode": self.cache.locking,
                                            "why": self.cache.locking_reason,
                                            "cache": str(config.cache_dir)})
        self.store = ImageStore(self.cache, config, self.metrics)
        from .slurm import SlurmJobs, make_backend
        self.store.slurm = SlurmJobs(make_backend(config.slurm_jobs, config.slurm_conf),
                                     ttl=config.slurm_refresh, shared=self.cache)
        self.prefetcher = Prefetcher(self.store, rate=config.prefetch_rate,
                                     max_running=config.prefetch_running,
                                     rate_per_user=config.prefetch_rate_per_user,
                                     running_per_user=config.prefetch_running_per_user)
        from .publisher import Publisher
        self.publisher = Publisher(self.store, running=config.publish_running,
                                   running_per_user=config.publish_running_per_user)
        self.prefetch_server: Optional[UserSocketServer] = None
        self.step_server: Optional[UserSocketServer] = None
        from .runtime.steps import StepManager
        self.steps = StepManager(config, self.cache, self.store)
        self.metrics.bind(self.steps.mount_count, self.steps.lease_count, self.steps.step_count)
        self.health = HealthServicer()
        self.server: Optional[GrpcServer] = None
        self._stop = threading.Event()
        self._housekeeper: Optional[threading.Thread] = None

    @staticmethod
    def _claim(sock: Path) -> None:
        sock.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if sock.exists() or sock.is_symlink():
            if _socket_in_use(sock):
                raise ConfigError(f"another oci-imaged is already listening on {sock}")
            sock.unlink()  # left by a daemon that died

    def start(self) -> None:
        sock = self.config.socket
        self._claim(sock)
        ssock = Path(step_socket_path(sock))
        self._claim(ssock)
        psock = prefetch_path(self.config)
        if psock is not None:
            self._claim(psock)
        # before any gRPC thread: the helper that opens what users name, as them
        from .asuser import start_helper
        start_helper()
        self.steps.recover()
        images, containers = ImagesServicer(self.store), ContainersServicer(self.steps)

        def register(server) -> None:
            pbg.add_ImagesServicer_to_server(images, server)
            pbg.add_ContainersServicer_to_server(containers, server)

        self.server = GrpcServer(f"unix:{sock}", register, self.health,
                                 options=[("grpc.max_receive_message_length", 4 << 20),
                                          ("grpc.max_send_message_length", 16 << 20)])
        # the other sockets first: once the main socket answers, all are ready
        self.step_server = stepsock.serve(ssock, self.steps, self.config)
        if psock is not None:
            self._start_prefetch_server(psock)
        self.server.start(umask=0o177)
        os.chmod(sock, stat.S_IRUSR | stat.S_IWUSR)
        self.metrics.serve(self.config.metrics)
        self._housekeeper = threading.Thread(target=self._housekeeping, daemon=True,
                                             name="housekeeping")
        self._housekeeper.start()
        log.warning("oci-imaged started", extra={"version": __version__, "socket": str(sock),
                                                 "cache": str(self.config.cache_dir),
                                                 "node": self.config.node})

    def _start_prefetch_server(self, psock: Path) -> None:
        """The world-writable user socket: not gRPC, which cannot say who is calling.

        usersock.py serves it: each connection's uid comes from SO_PEERCRED and
        every request (prefetch, open for the pyxis importer, publish) runs with that
        uid's rights only; connections are bounded per uid and in all, requests in size
        and time (a publish by [daemon] publish_timeout and publish_running*).
        """
        self.prefetch_server = UserSocketServer(
            psock, UserRequests(self.store, self.prefetcher, self.publisher,
                                publish_timeout=self.config.publish_timeout),
            request_timeout=self.config.prefetch_request_timeout)
        self.prefetch_server.start()

    def _housekeeping(self) -> None:
        interval = max(1.0, min(30.0, self.config.lease_ttl / 4, self.config.mount_idle / 2 or 1.0))
        while not self._stop.wait(interval):
            try:
                # one heartbeat for all of this node's leases; no other node's are read
                self.steps.housekeeping()
                # one record read; hourly, one node of the cluster sweeps the records
                SharedAnswers(self.cache).sweep_if_due()
                # claim mode: take over dead nodes' claims, every claim_stale/2
                sweep_claims_if_due(self.cache)
            except Exception:  # housekeeping must never take the daemon down
                log.exception("housekeeping failed")

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop serving within grace seconds ([daemon] stop_timeout); in-flight pulls are
        abandoned cleanly (sockets shut, temporary files removed, nothing partial published).

        Step namespaces and image mounts stay: running steps keep working and
        a restarted daemon adopts them.
        """
        budget = self.config.stop_timeout if grace is None else grace
        deadline = time.monotonic() + budget
        self._stop.set()
        self.health.set_serving(False)
        self.store.stop()
        if self.prefetch_server:
            self.prefetch_server.stop()
        if self.server:
            # other requests (release, prune) get most of the budget to finish; then their
            # RPCs are cancelled, which cancels what they wait for
            self.server.stop(budget * 0.6, budget)
        if self.step_server:  # a prepare under way is cancelled, a release may finish
            self.step_server.stop(wait=max(0.1, deadline - time.monotonic()))
        if not self.store.wait_idle(max(0.1, deadline - time.monotonic())):
            log.warning("an abandoned pull is still winding down at exit")
        self.remove_sockets()
        log.warning("oci-imaged stopped")

    def remove_sockets(self) -> None:
        for sock in (self.config.socket, Path(step_socket_path(self.config.socket)),
                     prefetch_path(self.config)):
            try:
                if sock is not None:
                    sock.unlink()
            except FileNotFoundError:
                pass

    def wait(self) -> None:
        self._stop.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oci-imaged",
                                description="Per-node daemon of slurm-oci-image (runs as root).")
    p.add_argument("--version", action="version", version=f"oci-imaged {__version__}")
    p.add_argument("--config", help="config file (default /etc/oci-image/oci-image.conf)")
    p.add_argument("--socket", help="override [daemon] socket")
    p.add_argument("--prefetch-socket", help="override [daemon] prefetch_socket ('off': none)")
    p.add_argument("--runtime-dir", help="override [daemon] runtime_dir")
    p.add_argument("--cache-dir", help="override [cache] dir")
    p.add_argument("--node", help="override [daemon] node (the name used for leases)")
    p.add_argument("--quota", help="override [cache] quota, e.g. 200G")
    p.add_argument("--metrics", help="override [daemon] metrics listen address HOST:PORT")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    return p


def config_from_args(args) -> Config:
    cfg = load_config(args.config)
    if args.socket:
        cfg.socket = Path(args.socket)
    if args.prefetch_socket:
        if args.prefetch_socket.lower() in ("off", "no", "none"):
            cfg.prefetch_enabled = False
        else:
            cfg.prefetch_enabled, cfg.prefetch_socket = True, Path(args.prefetch_socket)
    if args.runtime_dir:
        cfg.runtime_dir = Path(args.runtime_dir)
    if args.cache_dir:
        cfg.cache_dir = Path(args.cache_dir)
    if args.node:
        cfg.node = args.node
    if args.quota:
        cfg.quota = parse_size(args.quota, "--quota")
    if args.metrics:
        cfg.metrics = parse_listen(args.metrics)
    if args.log_level:
        cfg.log_level = args.log_level
    cfg.insecure_registries += args.insecure_registry
    validate(cfg)
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.warning("signal received, stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    # Before start(): once the socket answers, a SIGTERM must be a clean stop, not the
    # default action (it killed a daemon that was still finishing its start).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cfg = config_from_args(args)
        logs.setup(cfg.log_level, json_lines=args.log_json)
        if os.geteuid() != 0:
            raise ConfigError("oci-imaged must run as root (it mounts images and builds namespaces)")
        daemon = Daemon(cfg)
        daemon.start()
    except OciImageError as e:
        print(f"oci-imaged: error: {e}", file=sys.stderr)
        return e.exit_code
    # A process-directed signal may land on any thread (gRPC's, a request's); Python runs
    # its handler only when the main thread next runs bytecode, so never sleep long here:
    # waiting an hour at a time made a SIGTERM wait up to an hour.
    while not stop.wait(0.5):
        pass

    def backstop() -> None:
        # stop() itself is bounded; this is for whatever is not
        time.sleep(cfg.stop_timeout + 5)
        log.error("stopping takes too long; exiting now")
        daemon.remove_sockets()
        _exit(1)

    threading.Thread(target=backstop, daemon=True, name="stop-backstop").start()
    daemon.stop()
    # A request thread stuck where no cancellation reaches (the interpreter would join it
    # at exit) must not keep a stopped daemon alive.
    _exit(0)
    return 0


def _exit(code: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
