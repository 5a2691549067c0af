"""A device table and process memory the tests set by hand, for the on-demand controller."""

from __future__ import annotations

from collections.abc import Iterable

from tei_manager.config import InstanceConfig
from tei_manager.supervisor.devices import DeviceReading

__all__ = ["GIB", "MIB", "FakeDevices"]

MIB = 1 << 20
GIB = 1 << 30


class FakeDevices:
    """What a host reports: ``readings`` per device, ``rss``/``gpu`` per pid, and an
    estimate per model (``sizes``; ``default_size`` otherwise)."""

    def __init__(self, *, cpu_bytes: int = 64 * GIB, gpus: Iterable[int] = ()) -> None:
        self.readings = [DeviceReading(device="cpu", total_bytes=cpu_bytes, free_bytes=cpu_bytes)]
        self.readings += [
            DeviceReading(device=f"gpu:{i}", total_bytes=size, free_bytes=size)
            for i, size in enumerate(gpus)
        ]
        self.rss: dict[int, int] = {}
        self.gpu: dict[int, int] = {}
        self.sizes: dict[str, int] = {}
        self.default_size = 100 * MIB
        self.reads = 0

    def read_devices(self) -> list[DeviceReading]:
        self.reads += 1
        return list(self.readings)

    def estimate(self, config: InstanceConfig, gpu: bool) -> int:
        return self.sizes.get(config.model_id, self.default_size)

    def read_memory(self, pid: int) -> int:
        return self.rss.get(pid, 0)

    def gpu_memory(self, pids: Iterable[int]) -> dict[int, int]:
        return {pid: self.gpu[pid] for pid in pids if pid in self.gpu}
