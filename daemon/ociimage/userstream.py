"""Long requests on the user socket (publish): progress lines while the work runs, then the answer.

The user socket (usersock.py) answers most requests with one line. A request that
takes minutes (converting an image, uploading gigabytes) answers with a stream on
the same connection instead:

    {"progress": {"phase": ..., "message": ..., "current": N, "total": N}}   zero or more
    {"state": ..., ...} or {"error": "one line", "code": "<status name>"}    exactly one, last

The work runs on a thread of its own under a cancellation token (cancel.py), which
is cancelled, so that the work gives up at once (its downloads and uploads are cut,
nothing partial is kept), when:

* the caller goes away (the connection is closed or half-closed, or it sends
  anything more: one request per connection);
* the caller stops reading: a progress line that cannot be written within
  WRITE_TIMEOUT (a full socket buffer) ends the request, so a client that never
  reads cannot hold a thread of the daemon;
* the request's own deadline passes (the handler's `timeout`: [daemon] publish_timeout);
* the daemon stops.

Progress events are dropped rather than queued without bound (at most one line per
phase every PROGRESS_EVERY seconds, phase changes, retries and the end always).
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import threading
import time
from typing import Callable, Optional, Set

from . import cancel, errors
from .sockclient import line
from .progress import DONE, RETRY, ProgressEvent, Reporter

log = logging.getLogger("ociimage.usersock")

WRITE_TIMEOUT = 30.0
PROGRESS_EVERY = 0.5
#: after cancelling, how long the connection waits for the work to wind down before it
#: answers without it (the work's own limits, e.g. a publish slot, stay held until it ends)
WIND_DOWN = 30.0
CLIENT_GONE = "the client went away"
CLIENT_NOT_READING = "the client stopped reading its answer"
SHUTTING_DOWN = "oci-imaged is shutting down; try again when it is back"


class Streamed:
    """A handler's answer that takes long: run(report) -> the final reply (a dict).

    run raises typed errors for a failure; its progress goes out as lines meanwhile.
    """

    def __init__(self, run: Callable[[Reporter], dict], timeout: float, limit_name: str,
                 what: str = "the request"):
        self.run = run
        self.timeout = timeout
        self.limit_name = limit_name
        self.what = what


def _progress_line(ev: ProgressEvent) -> bytes:
    return line({"progress": {"phase": str(ev.phase), "message": str(ev.message)[:500],
                              "current": max(0, int(ev.current)),
                              "total": max(0, int(ev.total)),
                              "layer": max(0, int(ev.layer)), "layers": max(0, int(ev.layers))}})


def _hung_up(conn: socket.socket) -> bool:
    """The peer closed (or half-closed) its side, or sent more than its one request."""
    p = select.poll()
    p.register(conn, select.POLLIN | select.POLLRDHUP)
    for _fd, events in p.poll(0):
        if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        if events & select.POLLIN:
            return True  # EOF or a second request: either way, this one is over
    return False


def _send(conn: socket.socket, data: bytes, timeout: float) -> None:
    conn.settimeout(timeout)
    conn.sendall(data)


class Streams:
    """The streams in progress, so that the daemon's stop cancels them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: Set[cancel.CancelToken] = set()

    def cancel_all(self, reason: str = SHUTTING_DOWN) -> None:
        with self._lock:
            tokens = list(self._tokens)
        for t in tokens:
            t.cancel(reason)

    def serve(self, conn: socket.socket, job: Streamed, who: str,
              write_timeout: float = WRITE_TIMEOUT, poll: float = 0.25) -> None:
        token = cancel.CancelToken()
        with self._lock:
            self._tokens.add(token)
        try:
            self._serve(conn, job, token, who, write_timeout, poll)
        finally:
            with self._lock:
                self._tokens.discard(token)

    def _serve(self, conn, job: Streamed, token: cancel.CancelToken, who: str,
               write_timeout: float, poll: float) -> None:
        events: "queue.Queue" = queue.Queue(maxsize=64)
        finished = threading.Event()
        outcome: dict = {}
        woken = object()  # the work's end: answer now, not at the next poll

        def report(ev: ProgressEvent) -> None:
            try:
                events.put_nowait(ev)
            except queue.Full:  # a slow reader only misses intermediate progress
                pass

        def work() -> None:
            try:
                with cancel.scope(token):
                    outcome["reply"] = job.run(report)
            except errors.OciImageError as e:
                log.info("user request failed", extra={"who": who, "code": e.status,
                                                       "error": str(e)})
                outcome["reply"] = {"error": str(e), "code": e.status}
            except Exception:  # noqa: BLE001 - a bad request never takes the daemon down
                log.exception("user request failed", extra={"who": who})
                outcome["reply"] = {"error": "internal error in oci-imaged (see its log)",
                                    "code": "INTERNAL"}
            finally:
                finished.set()
                try:
                    events.put_nowait(woken)
                except queue.Full:  # the loop is draining a full queue: it sees `finished`
                    pass

        threading.Thread(target=work, daemon=True, name=f"user-stream-{who}").start()
        deadline = time.monotonic() + job.timeout
        timed_out = False
        talking = True           # False once the caller is gone or does not read
        sent_at = {}             # phase -> when its last line went out
        last_phase = ""
        cancelled_at: Optional[float] = None
        while not finished.is_set() or not events.empty():
            now = time.monotonic()
            if talking and _hung_up(conn):
                talking = False
                token.cancel(CLIENT_GONE)
            if now >= deadline and not token.cancelled:
                timed_out = True
                token.cancel(f"{job.what} did not finish within {job.limit_name} = "
                             f"{job.timeout:g} s")
            if token.cancelled:
                cancelled_at = cancelled_at or now
                if now - cancelled_at > WIND_DOWN and not finished.is_set():
                    log.warning("cancelled user request still winding down", extra={
                        "who": who, "reason": token.reason})
                    break
            try:
                ev = events.get(timeout=poll)
            except queue.Empty:
                continue
            if ev is woken or not talking:
                continue
            urgent = ev.phase != last_phase or ev.phase in (DONE, RETRY)
            if not urgent and now - sent_at.get(ev.phase, 0.0) < PROGRESS_EVERY:
                continue
            sent_at[ev.phase], last_phase = now, ev.phase
            try:
                _send(conn, _progress_line(ev), write_timeout)
            except OSError:  # socket.timeout included: a full buffer nobody empties
                talking = False
                token.cancel(CLIENT_NOT_READING)
        if not talking:
            log.info("user request abandoned", extra={"who": who, "reason": token.reason})
            return
        reply = outcome.get("reply")
        # what the deadline cut short says so (not "cancelled"); a success that came in
        # just before it stands
        if reply is None or (timed_out and "error" in reply):
            reply = {"error": f"{token.reason or 'the request was abandoned'}",
                     "code": "DEADLINE_EXCEEDED" if timed_out else "CANCELLED"}
        try:
            _send(conn, line(reply), write_timeout)
        except OSError:
            pass  # the caller went away at the last moment: nothing to tell it
