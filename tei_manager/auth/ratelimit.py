"""Token buckets per (scope, client), pure: the caller passes ``now``.

A client is an identity's name, or its address when anonymous. Buckets live in an
LRU table bounded by ``max_tracked_clients`` (a flood of new addresses cannot grow
it); an evicted bucket is full again when it comes back, which only ever lets a
client through sooner, never refuses it wrongly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import msgspec

from tei_manager.auth.identity import Scope

__all__ = ["Bucket", "RateLimiter"]


class Bucket(msgspec.Struct, frozen=True):
    """``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: int


class RateLimiter:
    """Takes one token per request; says how long to wait when there is none."""

    def __init__(self, buckets: Mapping[Scope, Bucket], max_clients: int = 10000) -> None:
        self._buckets = dict(buckets)
        self._max_clients = max_clients
        # (scope, client) -> (tokens, time they were counted)
        self._state: OrderedDict[tuple[Scope, str], tuple[float, float]] = OrderedDict()
        self.refused = 0

    def __len__(self) -> int:
        return len(self._state)

    def limits(self, scope: Scope) -> bool:
        """Whether requests of ``scope`` are limited at all."""
        return scope in self._buckets

    def take(self, scope: Scope, client: str, now: float) -> float:
        """0.0 if the request may go now, else the seconds until it may."""
        bucket = self._buckets.get(scope)
        if bucket is None:
            return 0.0
        key = (scope, client)
        state = self._state.get(key)
        if state is None:
            tokens = float(bucket.burst)
            if len(self._state) >= self._max_clients:
                self._state.popitem(last=False)
        else:
            saved, at = state
            tokens = min(float(bucket.burst), saved + max(0.0, now - at) * bucket.rate)
            self._state.move_to_end(key)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return 0.0
        self._state[key] = (tokens, now)
        self.refused += 1
        return (1.0 - tokens) / bucket.rate
