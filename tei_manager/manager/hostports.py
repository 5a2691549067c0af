"""Whether a port an instance asks for is free on this host (not only in our table)."""

from __future__ import annotations

import socket
from collections.abc import Collection

from tei_manager.config import InstanceConfig
from tei_manager.core.ports import PortProbe
from tei_manager.errors import ConflictError, ErrorCode

__all__ = ["check_host_ports", "port_free_for_instance"]


def port_free_for_instance(port: int) -> bool:
    """Whether an instance could listen on ``port`` of 127.0.0.1 right now.

    SO_REUSEADDR as the instance servers set it: a socket of a deleted instance left
    in TIME_WAIT does not count as busy, a live listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def check_host_ports(cfg: InstanceConfig, *, taken: Collection[int], probe: PortProbe) -> None:
    """A requested port that another program on this host holds is a conflict.

    Ports in ``taken`` (our instances' and the manager's) are left to the instance
    table, whose message names who holds them.
    """
    for field in ("port", "prometheus_port"):
        port = getattr(cfg, field)
        if port and port not in taken and not probe(port):
            raise ConflictError(ErrorCode.PORT_CONFLICT, f"{field}: {port} is in use on this host")
