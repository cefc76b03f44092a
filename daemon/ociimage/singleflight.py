"""Single flight: concurrent requests for the same key inside one process share one run.

Followers receive the leader's progress events while they wait, and the
leader's result or exception when it finishes. Across processes and nodes the
cache's file locks do the same job; this avoids even queueing on the lock.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List

from .progress import ProgressEvent, Reporter


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException = None
        self.listeners: List[Reporter] = []
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

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)

    def do(self, key: str, fn: Callable[[Reporter], Any], report: Reporter) -> Any:
        """Run fn(reporter) once for key; concurrent callers wait and share its outcome."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
            with flight.lock:
                flight.listeners.append(report)
        if not leader:
            flight.done.wait()
            with flight.lock:
                flight.listeners.remove(report)
            if flight.error is not None:
                raise flight.error
            return flight.result
        try:
            flight.result = fn(flight.broadcast)
            return flight.result
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
