"""Cancellation tokens: how work learns that nobody wants its result any more.

A token is cancelled once, with a reason (a client went away, the daemon is
stopping, nobody waits for a pull). Work checks it at its waiting points
(backoff sleeps, lock waits, progress events); the registry transport also
aborts the sockets of a cancelled token's transfers, so a read blocked on a
slow server ends at once instead of at its next byte.

The token of the work running on a thread is found with current(), so layers
between a gRPC handler and the registry client need not pass it along.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from .errors import Cancelled


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: List[Callable[[], None]] = []
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # one listener's failure must not keep the others uninformed
                pass

    def on_cancel(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call fn when cancelled (at once if already); returns a function that unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)

                def remove() -> None:
                    with self._lock:
                        if fn in self._callbacks:
                            self._callbacks.remove(fn)
                return remove
        fn()
        return lambda: None

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)

    def wait(self, timeout: Optional[float]) -> bool:
        """Sleep up to timeout seconds; True (early) when cancelled."""
        return self._event.wait(timeout)


#: the token of work that nobody can cancel (CLI commands, tests)
NEVER = CancelToken()

_local = threading.local()


def current() -> CancelToken:
    return getattr(_local, "token", None) or NEVER


@contextmanager
def scope(token: CancelToken) -> Iterator[CancelToken]:
    """Make token current() on this thread for the duration."""
    previous = getattr(_local, "token", None)
    _local.token = token
    try:
        yield token
    finally:
        _local.token = previous
