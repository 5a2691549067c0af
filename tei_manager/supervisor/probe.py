"""Is an instance answering? One tei.v1 ``Info`` call says so, for TEI and the worker alike.

The same call serves readiness (poll until it answers) and liveness (a check every
``health_check_interval_secs``). The caller puts the deadline around it: timeouts
belong where the policy lives, and a test's fake prober can then simply hang.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.config import InstanceConfig
from tei_manager.grpc.channel import open_channel
from tei_manager.grpc.rpc import GrpcError
from tei_manager.supervisor.launch import INSTANCE_HOST

__all__ = ["ProbeError", "Prober", "info_probe"]


class ProbeError(Exception):
    """The instance did not answer properly; ``str()`` says how."""


Prober = Callable[[InstanceConfig], Awaitable[None]]
"""Checks one instance once; returns if it answered, raises :class:`ProbeError` if not."""


async def info_probe(config: InstanceConfig) -> None:
    """Call ``tei.v1.Info/Info`` on the instance's port over a fresh connection."""
    try:
        async with open_channel(INSTANCE_HOST, config.port or 0) as channel:
            await channel.unary_unary(tei_grpc.Info.Info, tei_pb2.InfoRequest())
    except GrpcError as e:
        raise ProbeError(f"Info: {e}") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
        raise ProbeError(f"Info: connection failed: {e}") from None
