"""Backoff between retries of failed Hub requests."""

from __future__ import annotations

from tei_manager.hub.retry import RetryPolicy, RetryState


def test_delays_double_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retries=8, initial_delay_secs=1.0, max_delay_secs=30.0)
    state = RetryState(policy)
    assert [state.failed() for _ in range(9)] == [1, 2, 4, 8, 16, 30, 30, 30, None]


def test_progress_forgives_earlier_failures() -> None:
    state = RetryState(RetryPolicy(max_retries=2, initial_delay_secs=0.5))
    assert state.failed() == 0.5
    assert state.failed() == 1.0
    state.progressed()
    assert state.failed() == 0.5
    assert state.failed() == 1.0
    assert state.failed() is None


def test_no_retries() -> None:
    assert RetryState(RetryPolicy(max_retries=0)).failed() is None
