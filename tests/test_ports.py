from __future__ import annotations

import socket

import pytest

from tei_manager.core.ports import PortAllocator, probe_bindable
from tei_manager.errors import ErrorCode, LimitError


class FakeHost:
    """Ports something else on the host is bound to."""

    def __init__(self, busy: set[int] | None = None) -> None:
        self.busy = busy or set()
        self.probed: list[int] = []

    def probe(self, port: int) -> bool:
        self.probed.append(port)
        return port not in self.busy


def allocator(host: FakeHost, start: int = 8080, end: int = 8089) -> PortAllocator:
    return PortAllocator(start, end, probe=host.probe)


def test_lowest_free_port_first() -> None:
    assert allocator(FakeHost()).allocate() == 8080


def test_skips_ports_in_use_without_probing_them() -> None:
    host = FakeHost()
    assert allocator(host).allocate({8080, 8081}) == 8082
    assert host.probed == [8082]


def test_skips_ports_busy_on_the_host() -> None:
    host = FakeHost(busy={8080, 8082})
    assert allocator(host).allocate({8081}) == 8083
    assert host.probed == [8080, 8082, 8083]


def test_released_ports_are_tried_last_oldest_first() -> None:
    host = FakeHost()
    ports = allocator(host, 8080, 8084)
    ports.release(8081)
    ports.release(8080)
    assert ports.order() == [8082, 8083, 8084, 8081, 8080]
    assert ports.allocate({8082, 8083, 8084}) == 8081
    ports.release(8081)  # released again: back of the line
    assert ports.order() == [8082, 8083, 8084, 8080, 8081]
    ports.release(9999)  # outside the range: ignored
    assert len(ports.order()) == 5


def test_a_released_port_is_reused_rather_than_refused() -> None:
    host = FakeHost()
    ports = allocator(host, 8080, 8080)
    ports.release(8080)
    assert ports.allocate() == 8080


def test_a_released_port_the_host_still_holds_is_skipped() -> None:
    host = FakeHost(busy={8080})
    ports = allocator(host, 8080, 8081)
    ports.release(8080)
    assert ports.allocate() == 8081
    assert host.probed == [8081]
    with pytest.raises(LimitError):
        ports.allocate({8081})


def test_exhausted_range_says_why() -> None:
    host = FakeHost(busy={8083})
    ports = allocator(host, 8080, 8083)
    ports.release(8082)  # released recently: still tried
    with pytest.raises(LimitError) as info:
        ports.allocate({8080, 8081, 8082, 9000})
    assert info.value.code is ErrorCode.PORT_ALLOCATION_FAILED
    assert info.value.http_status == 422
    assert str(info.value) == (
        "no free port in 8080-8083: 3 used by instances or the manager, 1 busy on the host"
    )


def test_single_port_range() -> None:
    host = FakeHost()
    ports = allocator(host, 9500, 9500)
    assert ports.allocate() == 9500
    with pytest.raises(LimitError):
        ports.allocate({9500})


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (80, 8080, "privileged"),
        (1023, 2000, "privileged"),
        (9000, 8000, "invalid"),
        (60000, 70000, "invalid"),
    ],
)
def test_invalid_ranges_are_refused(start: int, end: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PortAllocator(start, end, probe=FakeHost().probe)


def test_real_probe_sees_a_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert probe_bindable(port) is False


def test_real_probe_sees_a_wildcard_bound_socket() -> None:
    with socket.socket() as bound:
        bound.bind(("0.0.0.0", 0))
        port = bound.getsockname()[1]
        assert probe_bindable(port) is False


def test_real_probe_accepts_a_free_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Freed just now without ever listening: no TIME_WAIT, so it is bindable again.
    assert probe_bindable(port) is True


def _time_wait_port() -> int:
    """A port whose listener is gone but whose server side of a connection is in
    TIME_WAIT, as after an instance that served a client was stopped."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port: int = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server closes first: its side goes to TIME_WAIT
        client.recv(1)  # sees the FIN
        client.close()
    return port


def test_real_probe_accepts_a_port_in_time_wait() -> None:
    port = _time_wait_port()
    # A plain bind is refused, as an instance's SO_REUSEADDR bind is not.
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    assert probe_bindable(port) is True
