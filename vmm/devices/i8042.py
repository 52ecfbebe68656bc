"""The i8042 keyboard controller, reduced to what a microVM needs: the CPU reset line (command 0xFE).

A guest that asks for a reset ends the VM cleanly, as Firecracker does. Port 0x61 (system control port B)
is answered too, since Linux reads it while calibrating its timers.
"""
from dataclasses import dataclass

I8042_DATA, I8042_COMMAND = 0x60, 0x64
CMD_RESET_CPU = 0xFE
STATUS_SYSTEM_FLAG = 0x04


@dataclass(frozen=True)
class I8042State:
    last_command: int

    def __post_init__(self):
        if not 0 <= self.last_command <= 0xFF:
            raise ValueError("an i8042 command outside 0..255")


class I8042:
    """Registered at 0x60..0x64; offset 4 is the status/command port."""

    def __init__(self, on_reset):
        self.on_reset = on_reset
        self.last_command = 0

    def io_read(self, offset: int, size: int) -> int:
        if offset == I8042_COMMAND - I8042_DATA:
            return STATUS_SYSTEM_FLAG  # output buffer empty, input buffer empty
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == I8042_COMMAND - I8042_DATA:
            self.last_command = value & 0xFF
            if self.last_command == CMD_RESET_CPU:
                self.on_reset()

    def save(self) -> I8042State:
        return I8042State(self.last_command)

    @classmethod
    def restore(cls, state: I8042State, on_reset) -> "I8042":
        device = cls(on_reset)
        device.last_command = state.last_command
        return device


class SystemControlPortB:
    """Port 0x61: the refresh bit toggles on each read so timer-calibration loops make progress."""

    def __init__(self):
        self.value = 0

    def io_read(self, offset: int, size: int) -> int:
        self.value ^= 0x10
        return self.value

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.value = (self.value & 0x10) | (value & 0x0F)
