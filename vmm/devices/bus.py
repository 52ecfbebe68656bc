"""Port-I/O bus: routes guest in/out to the device that owns the port.

Every value crossing it is cut to the access's size, both ways, whatever a device returns or the guest writes; a
device whose ``string_io`` is False (the function port) is absent for string I/O (``rep ins/outs``: ``count`` > 1).
"""
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

    def read(self, port: int, size: int, count: int = 1) -> int:
        """The value of one ``size``-byte read; ``count``: items in the exit (string I/O reads them one by one)."""
        mask = (1 << (8 * size)) - 1
        entry = self._devices.get(port)
        if entry is None or (count != 1 and not getattr(entry[0], "string_io", True)):
            return mask  # nothing there: the bus floats high, as on real hardware
        device, base = entry
        return device.io_read(port - base, size) & mask

    def write(self, port: int, size: int, value: int, count: int = 1) -> None:
        entry = self._devices.get(port)
        if entry is not None and (count == 1 or getattr(entry[0], "string_io", True)):
            device, base = entry
            device.io_write(port - base, size, value & ((1 << (8 * size)) - 1))
