"""The user socket ([daemon] prefetch_socket, mode 0666): a tiny protocol that knows its caller.

Every request on a socket an ordinary user can reach must be served with that
user's rights only, so the daemon must know who is calling. gRPC's Python server
cannot say (context.peer() is just "unix:"), so this socket is not gRPC: it is a
plain Unix stream socket served by the daemon itself, and the caller's uid comes
from the kernel, getsockopt(SO_PEERCRED) on the accepted connection (the
credentials the client had when it called connect(2); a client cannot choose them).

Protocol, deliberately small: the client sends ONE JSON object on one line (at
most MAX_REQUEST bytes, complete within the request timeout, default 5 s, counted
from accept: a client that sends nothing or trickles is cut off by then), the
daemon answers one JSON line and closes the connection:

    {"op": "resolve", "image": "NAME[:TAG]",
     ["env": {"HOME"|"REGISTRY_AUTH_FILE"|"DOCKER_CONFIG"|"XDG_RUNTIME_DIR": "/path"}]}
        -> {"state": "resolved", "digest": "sha256:...", ["pinned": true]}: the tag's
           digest at the registry now, with the CALLER's registry credentials (srun/sbatch at submit)
    {"op": "prefetch", "image": "NAME@sha256:..."}
        -> {"state": "cached"|"started"|"running"|"skipped", "digest": ..., ["reason": ...]}
           a pull in the background with the CALLER's registry credentials
    {"op": "open", "image": "NAME@sha256:..."}
        -> {"state": "ready", "digest": ..., "size": N} and, as SCM_RIGHTS ancillary
           data on the same message, a read-only descriptor of the cached SquashFS,
           handed out only after the registry confirmed the caller may pull it;
           or {"state": "missing", "digest": ...}
    {"op": "publish", "image": REF, "target": "REGISTRY/REPO[:TAG]", ["platform": ...,
     "chunk_size": N, "mount_from": [REPO, ...]]}
        -> progress lines, then {"state": "published", "reference": ..., "digest": ...}:
           `oci-image publish` with the CALLER's credentials (publisher.py); a stream of
           lines on the same connection (userstream.py)
    any failure -> {"error": "one line", "code": "<grpc-style status name>"}

Connections are bounded per uid and in all (a refused one gets a one-line "busy"
answer without being read), so one user's idle or slow connections never stop
another user's requests.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from . import errors
from .sockclient import MAX_REQUEST, line as _line
from .userstream import Streamed, Streams

log = logging.getLogger("ociimage.usersock")

#: connections served at once, in all and per uid (more get "busy" and are closed)
MAX_CONNECTIONS = 64
MAX_CONNECTIONS_PER_UID = 8
DEFAULT_REQUEST_TIMEOUT = 5.0

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

class Caller:
    """Who is on the other end, as the kernel says."""

    __slots__ = ("pid", "uid", "gid")

    def __init__(self, pid: int, uid: int, gid: int):
        self.pid, self.uid, self.gid = pid, uid, gid


def peer_credentials(conn: socket.socket) -> Caller:
    pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _CRED.size))
    return Caller(pid, uid, gid)


Handler = Callable[[Caller, dict], Tuple[dict, Optional[int]]]


class UserSocketServer:
    """Accepts on a local socket; each connection is served by a short-lived thread.

    The user socket (mode 0666, anyone) and the step socket (stepsock.py: mode 0600,
    root only) are both this server with different limits; only_uid refuses every
    other caller before a byte is read, whatever the socket's mode says.
    """

    def __init__(self, path: Path, handler: Handler, *,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_per_uid: int = MAX_CONNECTIONS_PER_UID,
                 max_request: int = MAX_REQUEST, mode: int = 0o666,
                 only_uid: Optional[int] = None):
        self.path = Path(path)
        self.handler = handler
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        self.max_request = max_request
        self.mode = mode
        self.only_uid = only_uid
        self._lock = threading.Lock()
        self._active: Dict[int, int] = {}
        self._total = 0
        self._stop = threading.Event()
        #: long requests (publish) in progress: the daemon's stop cancels them
        self.streams = Streams()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # never wider than its mode, not even between bind and chmod
        old_umask = os.umask(0o777 & ~self.mode)
        try:
            s.bind(str(self.path))
            # The user socket: every request is attributed to its caller's uid, so anyone
            # may connect. (A socket's x bits mean nothing.)
            os.chmod(self.path, self.mode)
            # as deep as the kernel allows: a node's steps may all start at once
            s.listen(socket.SOMAXCONN)
        except OSError as e:
            s.close()
            raise errors.ConfigError(f"cannot listen on {self.path}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="user-socket")
        self._thread.start()

    def stop(self, wait: float = 0.0) -> None:
        """Stop accepting, cancel the long requests, then give the short ones under way
        (a step's release) up to `wait` seconds to finish."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._sock:
            self._sock.close()
        self.streams.cancel_all()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._lock:
                if self._total == 0:
                    return
            time.sleep(0.02)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.5)
                if not ready:
                    continue
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("user socket accept failed", extra={"error": str(e)})
                time.sleep(0.1)
                continue
            try:
                caller = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            if self.only_uid is not None and caller.uid != self.only_uid:
                log.warning("refused a caller on a root-only socket",
                            extra={"uid": caller.uid, "pid": caller.pid, "socket": str(self.path)})
                conn.close()
                continue
            with self._lock:
                busy = (self._total >= self.max_connections
                        or self._active.get(caller.uid, 0) >= self.max_per_uid)
                if not busy:
                    self._total += 1
                    self._active[caller.uid] = self._active.get(caller.uid, 0) + 1
            if busy:
                self._refuse(conn, caller)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, caller), daemon=True,
                                 name=f"user-request-{caller.uid}").start()
            except RuntimeError:  # no thread to be had: refuse this one, keep accepting
                self._refuse(conn, caller)
                with self._lock:
                    self._total -= 1
                    self._release_uid(caller.uid)

    def _serve(self, conn: socket.socket, caller: Caller) -> None:
        deadline = time.monotonic() + self.request_timeout
        fd: Optional[int] = None
        try:
            try:
                request = self._read_request(conn, deadline)
                reply, fd = self.handler(caller, request)
                if isinstance(reply, Streamed):
                    # a long request: its own deadline, progress lines, then the answer
                    self.streams.serve(conn, reply, who=str(caller.uid))
                    return
            except errors.OciImageError as e:
                reply = {"error": str(e), "code": e.status}
            except Exception:  # noqa: BLE001 - a bad request never takes the daemon down
                log.exception("user request failed", extra={"uid": caller.uid})
                reply = {"error": "internal error in oci-imaged (see its log)",
                         "code": "INTERNAL"}
            try:
                conn.settimeout(max(0.5, deadline - time.monotonic()))
                data = _line(reply)
                if fd is not None:
                    conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", [fd]))])
                else:
                    conn.sendall(data)
            except OSError:
                pass  # the caller went away: nothing to tell it
        finally:
            if fd is not None:
                os.close(fd)
            conn.close()
            with self._lock:
                self._total -= 1
                self._release_uid(caller.uid)

    def _release_uid(self, uid: int) -> None:
        n = self._active.get(uid, 1) - 1
        if n:
            self._active[uid] = n
        else:
            self._active.pop(uid, None)

    @staticmethod
    def _refuse(conn: socket.socket, caller: Caller) -> None:
        """Never read from or wait on a refused connection: one line, if the socket
        buffer takes it, and close."""
        log.info("local socket busy, connection refused", extra={"uid": caller.uid})
        try:
            conn.setblocking(False)
            conn.send(_line({"error": "oci-imaged is busy with other requests from this user; "
                                      "try again later", "code": "RESOURCE_EXHAUSTED"}))
        except OSError:
            pass
        conn.close()

    def _read_request(self, conn: socket.socket, deadline: float) -> dict:
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.InvalidArgument(f"request not complete within "
                                             f"{self.request_timeout:g} s")
            conn.settimeout(left)
            try:
                chunk = conn.recv(min(1 << 20, self.max_request + 1 - len(buf)))
            except socket.timeout:
                continue  # the deadline check above answers
            if not chunk:
                break
            buf += chunk
            if len(buf) > self.max_request:
                raise errors.InvalidArgument(f"request larger than {self.max_request} bytes")
        line = buf.split(b"\n", 1)[0]
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise errors.InvalidArgument("request is not one line of JSON") from None
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            raise errors.InvalidArgument('request must be {"op": ..., ...}')
        return request


# ---- the daemon's side: what each op does ----------------------------------------------

class UserRequests:
    """The ops of the user socket, each with the caller's rights only."""

    def __init__(self, store, prefetcher, publisher=None, publish_timeout: float = 3600.0):
        self.store = store
        self.prefetcher = prefetcher
        self.publisher = publisher
        self.publish_timeout = publish_timeout

    def __call__(self, caller: Caller, request: dict) -> Tuple[dict, Optional[int]]:
        op, image = request["op"], request.get("image")
        if not isinstance(image, str):
            raise errors.InvalidArgument('request must be {"op": ..., "image": ...}')
        if len(image) > 1024:
            raise errors.InvalidArgument("image reference too long")
        if op == "resolve":
            return self._resolve(caller, request), None
        if op == "prefetch":
            state, digest, reason = self.prefetcher.request(image, caller.uid)
            reply = {"state": state, "digest": digest}
            if reason:
                reply["reason"] = reason
            return reply, None
        if op == "open":
            return self._open(caller, image)
        if op == "publish" and self.publisher is not None:
            publisher = self.publisher
            return Streamed(lambda report: publisher.publish(caller.uid, request, report),
                            self.publish_timeout, "[daemon] publish_timeout",
                            "the publish"), None
        raise errors.InvalidArgument(f"unknown op {op[:40]!r} (resolve, prefetch, open, publish)")

    #: the user's variables that say where their registry credentials are (credentials.py)
    RESOLVE_ENV = ("HOME", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR")

    def _resolve(self, caller: Caller, request: dict) -> dict:
        """srun/sbatch's tag lookup at submit, asked of this host's warm daemon (no
        registry client to import in every srun).

        Always the registry's answer of now, with the caller's own credential files
        (read as the caller, where the caller's environment says they are): never a
        cached answer, never anyone else's credentials. Only the site's network policy
        applies: a registry the user reaches over plain HTTP is theirs to ask themselves
        (the step client does, in-process).
        """
        from .reference import parse_reference
        unknown = set(request) - {"op", "image", "env"}
        if unknown:
            raise errors.InvalidArgument(f"resolve: unknown fields {', '.join(sorted(unknown))}")
        environ = request.get("env") or {}
        if not isinstance(environ, dict) or not all(
                k in self.RESOLVE_ENV and isinstance(v, str) and v.startswith("/")
                and len(v) < 4096 and "\0" not in v for k, v in environ.items()):
            raise errors.InvalidArgument(f"env may only hold {', '.join(self.RESOLVE_ENV)} "
                                         f"as absolute paths")
        ref = parse_reference(request["image"])
        if ref.digest:
            return {"state": "resolved", "digest": ref.digest, "pinned": True}
        digest = self.store.resolve_tag(ref, caller.uid, environ)
        log.info("tag resolved for a user", extra={"uid": caller.uid, "pid": caller.pid,
                                                   "reference": str(ref), "digest": digest})
        return {"state": "resolved", "digest": digest}

    def _open(self, caller: Caller, image: str) -> Tuple[dict, Optional[int]]:
        from .reference import parse_reference
        ref = parse_reference(image)
        if not ref.digest or not ref.digest.startswith("sha256:"):
            raise errors.InvalidArgument("open needs a digest-pinned reference (NAME@sha256:...)")
        # raises AccessDenied unless the registry lets the caller pull it
        entry = self.store.lookup(image, caller.uid)
        if entry is None:
            return {"state": "missing", "digest": ref.digest}, None
        fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size != entry.size:
                raise errors.CacheError(f"image {ref.digest} changed in the cache; try again")
        except BaseException:
            os.close(fd)
            raise
        self.store.cache.touch(entry.digest)
        log.info("image handed to a user", extra={"uid": caller.uid, "pid": caller.pid,
                                                  "digest": entry.digest})
        return {"state": "ready", "digest": entry.digest, "size": entry.size}, fd
