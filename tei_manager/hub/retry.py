"""When to try a failed Hub request again: exponential backoff over consecutive failures.

Pure. A failure counts as consecutive only while no bytes arrive: a download that
made progress before the connection dropped starts its count afresh, so a flaky
link slows a large download down but does not fail it.
"""

from __future__ import annotations

import msgspec

__all__ = ["RetryPolicy", "RetryState"]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """``max_retries`` retries after the first attempt, waiting ``initial_delay_secs``,
    then twice as long each time, up to ``max_delay_secs``."""

    max_retries: int = 5
    initial_delay_secs: float = 1.0
    max_delay_secs: float = 30.0

    def delay(self, failures: int) -> float:
        """The wait before the retry that follows ``failures`` consecutive failures (>= 1)."""
        delay: float = self.initial_delay_secs * 2.0 ** (failures - 1)
        return min(self.max_delay_secs, delay)


class RetryState:
    """Consecutive failures of one request; :meth:`failed` says whether to retry."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def progressed(self) -> None:
        """Bytes arrived: earlier failures no longer count."""
        self.failures = 0

    def failed(self) -> float | None:
        """Count a transient failure; the delay before retrying, or None to give up."""
        self.failures += 1
        if self.failures > self.policy.max_retries:
            return None
        return self.policy.delay(self.failures)
