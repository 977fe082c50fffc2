"""Delivery ids seen recently, so that a captured delivery cannot be replayed within the freshness window.

A delivery id is `reserve`d before the delivery is handled (so a concurrent duplicate is refused at once) and
`release`d again when handling failed, so that MLflow's retry of the same delivery (same id) is accepted. Entries expire
after `ttl` seconds; older deliveries are refused by their timestamp anyway, so the cache needs to outlive only the
freshness window, and its size is bounded.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class ReplayCache:
    """A bounded, thread-safe set of delivery ids with expiry."""

    def __init__(self, ttl: float = 600.0, max_entries: int = 100_000):
        self.ttl, self.max_entries = ttl, max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # id -> expiry, oldest first
        self._lock = threading.Lock()

    def reserve(self, delivery_id: str, now: float | None = None) -> bool:
        """Record `delivery_id`; returns False when it was seen (or is in flight) within the last `ttl` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now + self.ttl
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)
            return True

    def release(self, delivery_id: str) -> None:
        """Forget a reserved id whose handling failed, so that a retry of the same delivery is accepted."""
        with self._lock:
            self._seen.pop(delivery_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def _expire(self, now: float) -> None:
        while self._seen:
            oldest, expiry = next(iter(self._seen.items()))
            if expiry > now:
                return
            del self._seen[oldest]
