"""Token buckets per (scope, client), pure: the caller passes ``now``.

A client is an identity's name, or its address when anonymous: an IPv4 address
itself, an IPv6 address by its network prefix (``ipv6_prefix_bits``, a /64 by
default: one subscriber's or host's allocation, which its holder can rotate through
freely, as nginx's and Cloudflare's limiters assume). Buckets live in an LRU table
bounded by ``max_tracked_clients`` (a flood of new addresses cannot grow it); an
evicted bucket is full again when it comes back, which only ever lets a client
through sooner, never refuses it wrongly.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Mapping

import msgspec

from tei_manager.auth.identity import Address, Scope, unmapped

__all__ = ["DEFAULT_IPV6_PREFIX_BITS", "Bucket", "RateLimiter"]

#: A /64 is the smallest IPv6 allocation to a subscriber or a LAN (RFC 6177, and
#: SLAAC needs it), so an attacker holding one has 2^64 addresses to rotate through.
DEFAULT_IPV6_PREFIX_BITS = 64


class Bucket(msgspec.Struct, frozen=True):
    """``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: int


class RateLimiter:
    """Takes one token per request; says how long to wait when there is none."""

    def __init__(
        self,
        buckets: Mapping[Scope, Bucket],
        max_clients: int = 10000,
        *,
        ipv6_prefix_bits: int = DEFAULT_IPV6_PREFIX_BITS,
    ) -> None:
        self._buckets = dict(buckets)
        self._max_clients = max_clients
        self._ipv6_prefix_bits = ipv6_prefix_bits
        # (scope, client) -> (tokens, time they were counted)
        self._state: OrderedDict[tuple[Scope, str], tuple[float, float]] = OrderedDict()
        self.refused = 0

    def __len__(self) -> int:
        return len(self._state)

    def limits(self, scope: Scope) -> bool:
        """Whether requests of ``scope`` are limited at all."""
        return scope in self._buckets

    def address_client(self, address: Address | None) -> str:
        """The client an anonymous request from ``address`` counts as."""
        if address is not None:
            address = unmapped(address)  # a dual-stack listener's IPv4 client
        if isinstance(address, ipaddress.IPv6Address):
            network = ipaddress.IPv6Network((address, self._ipv6_prefix_bits), strict=False)
            return f"network {network}"
        return f"address {address}"

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
