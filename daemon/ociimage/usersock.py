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
from .userstream import Streamed, Streams, request_stream

log = logging.getLogger("ociimage.usersock")

MAX_REQUEST = 4096
MAX_REPLY = 65536
#: connections served at once, in all and per uid (more get "busy" and are closed)
MAX_CONNECTIONS = 64
MAX_CONNECTIONS_PER_UID = 8
DEFAULT_REQUEST_TIMEOUT = 5.0

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

_BY_CODE = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "NOT_FOUND": errors.NotFound,
    "UNAUTHENTICATED": errors.AuthenticationRequired,
    "PERMISSION_DENIED": errors.AccessDenied,
    "UNAVAILABLE": errors.RegistryUnavailable,
    "RESOURCE_EXHAUSTED": errors.LimitExceeded,
    "DEADLINE_EXCEEDED": errors.LockTimeout,
}


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
    """Accepts on the user socket; each connection is served by a short-lived thread."""

    def __init__(self, path: Path, handler: Handler, *,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_per_uid: int = MAX_CONNECTIONS_PER_UID):
        self.path = Path(path)
        self.handler = handler
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
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
        try:
            s.bind(str(self.path))
            # Every request is attributed to its caller's uid, so anyone may connect.
            # (bind made it 0777 less the umask, narrower unless the umask is 0; a
            # socket's x bits mean nothing.)
            os.chmod(self.path, 0o666)
            s.listen(128)
        except OSError as e:
            s.close()
            raise errors.ConfigError(f"cannot listen on {self.path}: {e.strerror}") from None
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="user-socket")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.streams.cancel_all()
        if self._thread:
            self._thread.join(timeout=5)
        if self._sock:
            self._sock.close()

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
            with self._lock:
                busy = (self._total >= self.max_connections
                        or self._active.get(caller.uid, 0) >= self.max_per_uid)
                if not busy:
                    self._total += 1
                    self._active[caller.uid] = self._active.get(caller.uid, 0) + 1
            if busy:
                # Never read from or wait on a refused connection: one line, if the
                # socket buffer takes it, and close.
                log.info("user socket busy, connection refused", extra={"uid": caller.uid})
                try:
                    conn.setblocking(False)
                    conn.send(_line({"error": "oci-imaged is busy with other requests from "
                                              "this user; try again later",
                                     "code": "RESOURCE_EXHAUSTED"}))
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, caller), daemon=True,
                             name=f"user-request-{caller.uid}").start()

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
                n = self._active.get(caller.uid, 1) - 1
                if n:
                    self._active[caller.uid] = n
                else:
                    self._active.pop(caller.uid, None)

    def _read_request(self, conn: socket.socket, deadline: float) -> dict:
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.InvalidArgument(f"request not complete within "
                                             f"{self.request_timeout:g} s")
            conn.settimeout(left)
            try:
                chunk = conn.recv(MAX_REQUEST + 1 - len(buf))
            except socket.timeout:
                continue  # the deadline check above answers
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REQUEST:
                raise errors.InvalidArgument(f"request larger than {MAX_REQUEST} bytes")
        line = buf.split(b"\n", 1)[0]
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise errors.InvalidArgument("request is not one line of JSON") from None
        if not isinstance(request, dict) or not isinstance(request.get("op"), str) \
                or not isinstance(request.get("image"), str):
            raise errors.InvalidArgument('request must be {"op": ..., "image": ...}')
        return request


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# ---- the daemon's side: what each op does ----------------------------------------------

class UserRequests:
    """The ops of the user socket, each with the caller's rights only."""

    def __init__(self, store, prefetcher, publisher=None, publish_timeout: float = 3600.0):
        self.store = store
        self.prefetcher = prefetcher
        self.publisher = publisher
        self.publish_timeout = publish_timeout

    def __call__(self, caller: Caller, request: dict) -> Tuple[dict, Optional[int]]:
        op, image = request["op"], request["image"]
        if len(image) > 1024:
            raise errors.InvalidArgument("image reference too long")
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
        raise errors.InvalidArgument(f"unknown op {op[:40]!r} (prefetch, open, publish)")

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


# ---- the client side (step client, pyxis importer) -------------------------------------

def _connect(path: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise errors.DaemonUnavailable(f"cannot reach oci-imaged at {path}: is the daemon "
                                       f"running? (systemctl status oci-imaged)") from None
    except PermissionError:
        s.close()
        raise errors.AccessDenied(f"permission denied on {path}") from None
    except OSError as e:
        s.close()
        raise errors.DaemonUnavailable(f"cannot reach oci-imaged at {path}: "
                                       f"{e.strerror or e}") from None
    return s


def stream(path: str, message: dict, on_progress, timeout: float) -> dict:
    """A long request (publish): on_progress(ProgressEvent) for each progress line, then the
    final reply; failures as typed errors. timeout bounds the whole request."""
    if len(_line(message)) > MAX_REQUEST:
        raise errors.InvalidArgument(f"request larger than {MAX_REQUEST} bytes")
    return request_stream(lambda: _connect(path, 10.0), message, on_progress, timeout, path,
                          _BY_CODE)


def request(path: str, message: dict, timeout: float = 10.0) -> Tuple[dict, Optional[int]]:
    """Send one request, return (reply, descriptor or None); failures as typed errors."""
    s = _connect(path, timeout)
    fds = []
    try:
        data = _line(message)
        if len(data) > MAX_REQUEST:
            raise errors.InvalidArgument(f"request larger than {MAX_REQUEST} bytes")
        buf = b""
        try:
            s.sendall(data)
            while b"\n" not in buf and len(buf) < MAX_REPLY:
                chunk, ancdata, _flags, _addr = s.recvmsg(MAX_REPLY, socket.CMSG_SPACE(4 * 4))
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        a = array.array("i")
                        a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                        fds.extend(a)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            raise errors.DaemonUnavailable(f"oci-imaged at {path} did not answer within "
                                           f"{timeout:g} s") from None
        except OSError as e:
            raise errors.DaemonUnavailable(f"oci-imaged at {path} went away during the request "
                                           f"({e.strerror or e})") from None
        try:
            reply = json.loads(buf.split(b"\n", 1)[0].decode("utf-8"))
            if not isinstance(reply, dict):
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            raise errors.OciImageError(f"oci-imaged at {path} answered something that is not "
                                       f"JSON") from None
        if "error" in reply:
            cls = _BY_CODE.get(reply.get("code"), errors.OciImageError)
            raise cls(str(reply["error"]))
        fd = fds.pop(0) if fds else None
        return reply, fd
    finally:
        for extra in fds:
            os.close(extra)
        s.close()
