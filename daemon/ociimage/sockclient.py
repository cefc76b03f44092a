"""The client half of the daemon's local sockets (usersock.py, stepsock.py): the step
client, the CLI and the pyxis importer call the daemon through these.

Kept to the standard library's socket and json: the step client runs once per node per
job step, and every module imported here is start-up time of every step.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time

from . import errors

#: the user socket's limits (usersock.py serves them)
MAX_REQUEST = 4096
MAX_REPLY = 65536

#: an answer's "code" -> the typed error it was in the daemon
BY_CODE = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "CANCELLED": errors.Cancelled,
    "FAILED_PRECONDITION": errors.InUse,
    "DATA_LOSS": errors.DigestMismatch,
    "NOT_FOUND": errors.NotFound,
    "UNAUTHENTICATED": errors.AuthenticationRequired,
    "PERMISSION_DENIED": errors.AccessDenied,
    "UNAVAILABLE": errors.RegistryUnavailable,
    "RESOURCE_EXHAUSTED": errors.LimitExceeded,
    "DEADLINE_EXCEEDED": errors.LockTimeout,
}


def line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def connect(path: str, timeout: float) -> socket.socket:
    """A connection to the daemon's socket at path, made within timeout seconds.

    A full listen queue (many steps starting at once on a node) answers EAGAIN at once
    on a Unix socket instead of waiting: that is retried until the timeout. The peer
    must be root: a socket someone else made in the daemon's place pins nothing."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            s.connect(path)
            break
        except BlockingIOError:
            s.close()
            if time.monotonic() + delay >= deadline:
                raise errors.DaemonUnavailable(f"oci-imaged at {path} is too busy to take the "
                                               f"connection within {timeout:g} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
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
    _pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != 0:
        s.close()
        raise errors.DaemonUnavailable(f"{path} is not oci-imaged's socket (its listener is "
                                       f"uid {uid}, not root)")
    s.settimeout(timeout)
    return s


def _lost(e: OSError, where: str, timeout: float) -> errors.DaemonUnavailable:
    """A request's connection failed after it was made: the deadline, or the daemon gone."""
    if isinstance(e, socket.timeout):
        return errors.DaemonUnavailable(f"oci-imaged at {where} did not answer within "
                                        f"{timeout:g} s")
    return errors.DaemonUnavailable(f"oci-imaged at {where} went away during the request "
                                    f"({e.strerror or e})")


def stream(path: str, message: dict, on_progress, timeout: float) -> dict:
    """A long request (publish): on_progress(ProgressEvent) for each progress line, then the
    final reply; failures as typed errors. timeout bounds the whole request."""
    if len(line(message)) > MAX_REQUEST:
        raise errors.InvalidArgument(f"request larger than {MAX_REQUEST} bytes")
    return request_stream(lambda: connect(path, 10.0), message, on_progress, timeout, path,
                          BY_CODE)


def request(path: str, message: dict, timeout: float = 10.0) -> "tuple[dict, int | None]":
    """Send one request, return (reply, descriptor or None); failures as typed errors."""
    s = connect(path, timeout)
    fds = []
    try:
        data = line(message)
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
        except OSError as e:
            raise _lost(e, path, timeout) from None
        try:
            reply = json.loads(buf.split(b"\n", 1)[0].decode("utf-8"))
            if not isinstance(reply, dict):
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            raise errors.OciImageError(f"oci-imaged at {path} answered something that is not "
                                       f"JSON") from None
        if "error" in reply:
            cls = BY_CODE.get(reply.get("code"), errors.OciImageError)
            raise cls(str(reply["error"]))
        fd = fds.pop(0) if fds else None
        return reply, fd
    finally:
        for extra in fds:
            os.close(extra)
        s.close()


def request_stream(opener, message: dict, on_progress, timeout: float, where: str,
                   by_code: dict = BY_CODE, max_line: int = MAX_REPLY) -> dict:
    """Send one request on opener()'s socket, give each progress line to on_progress (a
    ProgressEvent; None: drop them), return the final reply; failures as typed errors."""
    s = opener()
    try:
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            s.sendall(line(message))
            while True:
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    obj = _parse(raw, where)
                    p = obj.get("progress")
                    if isinstance(p, dict):
                        if on_progress is None:  # nobody shows it: no progress module either
                            continue
                        from .progress import ProgressEvent
                        on_progress(ProgressEvent(
                            str(p.get("phase", "")), str(p.get("message", "")),
                            int(p.get("current") or 0), int(p.get("total") or 0),
                            int(p.get("layer") or 0), int(p.get("layers") or 0)))
                        continue
                    if "error" in obj:
                        cls = by_code.get(obj.get("code"), errors.OciImageError)
                        raise cls(str(obj["error"]))
                    return obj
                if len(buf) > max_line:
                    raise errors.OciImageError(f"oci-imaged at {where} answered a line longer "
                                               f"than {max_line} bytes")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    raise errors.DaemonUnavailable(f"oci-imaged at {where} ended the request "
                                                   f"without an answer (restarted?)")
                buf += chunk
        except OSError as e:
            raise _lost(e, where, timeout) from None
    finally:
        s.close()


def _parse(raw: bytes, where: str) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError
        return obj
    except (UnicodeDecodeError, ValueError):
        raise errors.OciImageError(f"oci-imaged at {where} answered something that is not "
                                   f"JSON") from None
