"""Single flight: concurrent requests for the same key inside one process share one run.

Followers receive the leader's progress events while they wait, and the
leader's result or exception when it finishes. Across processes and nodes the
cache's file locks do the same job; this avoids even queueing on the lock.

Each caller waits under its own cancellation token (cancel.current(), e.g.
cancelled when its gRPC client goes away). A caller whose token is cancelled
leaves at once with Cancelled. The run itself has a token of its own, current()
while fn runs: it is cancelled when the last caller has left, so work nobody
waits for any more is abandoned, while a run that another caller still waits
for goes on (even when the caller that started it has left).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List

from . import cancel
from .errors import Cancelled
from .progress import ProgressEvent, Reporter

NOBODY_WAITS = "every request waiting for this pull went away"


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException = None
        self.listeners: List[Reporter] = []
        self.waiters = 0
        #: events of waiting followers, set when the run ends
        self.wakers: List[threading.Event] = []
        self.token = cancel.CancelToken()
        self.lock = threading.Lock()

    def broadcast(self, ev: ProgressEvent) -> None:
        with self.lock:
            listeners = list(self.listeners)
        for fn in listeners:
            try:
                fn(ev)
            except Exception:  # a follower that went away must not break the leader
                pass


class SingleFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: Dict[str, _Flight] = {}
        # runs still executing, including abandoned ones no longer in _flights
        self._running = 0
        self._idle = threading.Condition(self._lock)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no run executes (an abandoned one may still be removing its files)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)

    def cancel_all(self, reason: str) -> None:
        """Abandon every run (daemon shutdown); their callers get Cancelled(reason)."""
        with self._lock:
            flights = list(self._flights.values())
        for f in flights:
            f.token.cancel(reason)

    def _leave(self, key: str, flight: _Flight, report: Reporter) -> None:
        with flight.lock:
            if report in flight.listeners:
                flight.listeners.remove(report)
            flight.waiters -= 1
            last = flight.waiters == 0 and not flight.done.is_set()
        if last:
            with self._lock:
                # a new request for the key starts afresh instead of joining a dying run
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.token.cancel(NOBODY_WAITS)

    def do(self, key: str, fn: Callable[[Reporter], Any], report: Reporter) -> Any:
        """Run fn(reporter) once for key; concurrent callers wait and share its outcome."""
        mine = cancel.current()
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
                self._running += 1
            with flight.lock:
                flight.listeners.append(report)
                flight.waiters += 1
        once = threading.Lock()  # leave() runs once, from whichever thread comes first

        def leave() -> None:
            if once.acquire(blocking=False):
                self._leave(key, flight, report)

        unregister = mine.on_cancel(leave)
        if not leader:
            woke = threading.Event()
            with flight.lock:
                flight.wakers.append(woke)
                finished = flight.done.is_set()
            undone = mine.on_cancel(woke.set)
            try:
                if not finished:
                    woke.wait()  # the run's end or this caller's cancellation
            finally:
                undone()
                unregister()
            if not flight.done.is_set():
                raise Cancelled(mine.reason)
            leave()
            if flight.error is not None:
                raise flight.error
            return flight.result
        try:
            with cancel.scope(flight.token):
                flight.result = fn(flight.broadcast)
            return flight.result
        except BaseException as e:
            flight.error = e
            raise
        finally:
            unregister()
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
                self._running -= 1
                self._idle.notify_all()
            with flight.lock:
                flight.done.set()
                wakers = list(flight.wakers)
            for w in wakers:
                w.set()
            leave()
