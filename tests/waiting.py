"""Waiting for state that Trio cannot signal: other processes, files they write."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


async def wait_for(probe: Callable[[], T | None], *, within: float, what: str) -> T:
    """Poll ``probe`` until it returns something truthy, and return that.

    Polling, because another process changes what is probed: there is no event to
    wait on. Fails the test with ``what`` after ``within`` seconds.
    """
    with trio.move_on_after(within):
        while not (value := probe()):  # noqa: ASYNC110 - no event to wait on, see above
            await trio.sleep(0.02)
        return value
    raise AssertionError(f"{what}: not within {within:g} s")
