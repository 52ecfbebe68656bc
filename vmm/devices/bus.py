"""Port-I/O bus: routes guest in/out to the device that owns the port."""
import logging

log = logging.getLogger("vmm.bus")


class PortIoBus:
    def __init__(self):
        self._devices = {}

    def register(self, device, base: int, count: int, offset_base: int | None = None) -> None:
        """Route ports [base, base+count) to ``device``, which sees them as offsets from ``offset_base``."""
        for port in range(base, base + count):
            if port in self._devices:
                raise ValueError(f"port {port:#x} is already taken by {self._devices[port][0]!r}")
            self._devices[port] = (device, base if offset_base is None else offset_base)

    def read(self, port: int, size: int) -> int:
        entry = self._devices.get(port)
        if entry is None:
            return (1 << (8 * size)) - 1  # nothing there: the bus floats high, as on real hardware
        device, base = entry
        return device.io_read(port - base, size)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self._devices.get(port)
        if entry is not None:
            device, base = entry
            device.io_write(port - base, size, value)
