"""Deadlines and cancellation of registry operations (the budgets of transport.py).

An operation (a manifest request, a token request, an upload step) runs
under request_timeout, retries included; a blob download under
request_timeout plus its size at min_rate. Both also end when the work that
asked is cancelled (cancel.py). A backoff sleep ends early for the same
reasons, and whatever an abandoned operation raised (a reset socket, a short
body) is replaced by the reason it was abandoned.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import requests
import urllib3

from ..cancel import CancelToken, current as current_token
from ..errors import Cancelled, OciImageError, RegistryUnavailable
from ..reference import Reference
from .transport import NetLimits, Transfer, active_transfers, watching

# Errors raised by requests/urllib3/sockets while a response body streams.
STREAM_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class Deadlines:
    def __init__(self, limits: NetLimits, cancel: Optional[CancelToken] = None):
        self.limits = limits
        #: None: the token current() on the thread doing each operation
        self._cancel = cancel

    def token(self) -> CancelToken:
        return self._cancel or current_token()

    def transfer(self, what: str, deadline: Optional[float] = None, *,
                 blob_size: Optional[int] = None) -> Transfer:
        lim = self.limits
        if blob_size is not None:
            return Transfer(what, lim.blob_deadline(blob_size), min_rate=lim.min_rate,
                            window=lim.rate_window, cancel=self.token(),
                            limit_name="[registries] request_timeout plus the size at min_rate")
        return Transfer(what, deadline or lim.request, cancel=self.token(),
                        limit_name="[registries] request_timeout")

    @staticmethod
    def abort_error(t: Transfer) -> OciImageError:
        if t.cancelled:
            return Cancelled(t.reason)
        return RegistryUnavailable(f"{t.what} was abandoned: {t.reason}",
                                   hint="the registry is too slow or stalling; try again later")

    def raise_if_aborted(self, *extra: Transfer) -> None:
        """Raise the typed error of an operation on this thread that ran out or was cancelled."""
        token = self.token()
        for t in list(extra) + active_transfers():
            if t.expired():
                raise self.abort_error(t) from None
        token.check()

    @contextlib.contextmanager
    def operation(self, what: str, deadline: Optional[float] = None):
        """One registry operation, retries included, bounded by request_timeout (or deadline)."""
        t = self.transfer(what, deadline)
        t.expired()
        with watching(t):
            try:
                yield t
            except (OciImageError,) + STREAM_ERRORS:
                if t.reason is not None:
                    raise self.abort_error(t) from None
                raise
            if t.reason is not None:
                raise self.abort_error(t)

    def sleep(self, delay: float, *extra: Transfer) -> None:
        """A backoff that ends early when the work is cancelled or out of time."""
        limit = delay
        for t in list(extra) + active_transfers():
            left = t.remaining()
            if left is not None:
                limit = min(limit, max(0.0, left) + 0.01)
        self.token().wait(limit)
        self.raise_if_aborted(*extra)


def registry_op(kind: str):
    """Run a method of an object with .deadlines as one registry operation."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, target, *args, **kwargs):
            name = target.familiar() if isinstance(target, Reference) else str(target)
            with self.deadlines.operation(f"{kind} ({name})"):
                return fn(self, target, *args, **kwargs)
        return wrapper
    return deco
