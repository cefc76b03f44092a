"""Retry with exponential backoff: the one place that decides how often and how long.

Every retry in the registry layer counts its tries with an Attempts from
here: requests the transport chain repeats (chain.py), a blob read resumed
with Range (blobstream.py), a chunked upload resumed from the registry's
Range or started over (push.py). So `[registries] retries` means one thing
everywhere, and a registry's Retry-After is honoured, capped, in one place.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Optional

#: answers worth repeating the request for: rate limiting and server trouble
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF = 30.0


class Backoff:
    """How many tries (`retries` after the first) and how long to wait before each."""

    def __init__(self, retries: int = 5, base: float = 0.5, max_retry_after: float = 60.0):
        self.retries = max(0, int(retries))
        self.base = base
        self.max_retry_after = max_retry_after

    def delay(self, attempt: int) -> float:
        """Seconds before retry number attempt+1: doubling from base, capped, with jitter."""
        base = min(MAX_BACKOFF, self.base * (2 ** attempt))
        return base + random.uniform(0, base / 2)

    def retry_after(self, resp) -> Optional[float]:
        """The delay a response's Retry-After asks for (seconds or an HTTP date), capped."""
        value = resp.headers.get("Retry-After")
        if not value:
            return None
        value = value.strip()
        if value.isdigit():
            delay = float(value)
        else:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None:
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            delay = (when - datetime.now(timezone.utc)).total_seconds()
        # a registry asking for an hour should fail the pull rather than hang it
        return max(0.0, min(delay, self.max_retry_after))

    def attempts(self, limit: Optional[int] = None) -> "Attempts":
        return Attempts(self, self.retries if limit is None else max(0, limit))


class Attempts:
    """The failures of one retried thing, and the delay before the next try."""

    def __init__(self, backoff: Backoff, limit: int):
        self.backoff = backoff
        self.limit = limit
        self.failures = 0

    def next_delay(self, asked: Optional[float] = None) -> Optional[float]:
        """Count a failure; the seconds to wait before trying again (`asked` when the
        server said), or None when the tries are used up."""
        if self.failures >= self.limit:
            return None
        delay = asked if asked is not None else self.backoff.delay(self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        """The thing made progress: its next failure starts the count afresh."""
        self.failures = 0
