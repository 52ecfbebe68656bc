"""A 16550A UART (COM1): enough of it for Linux's 8250 driver (probe, loopback, FIFO, interrupts).

Output goes to a sink (the VMM's standard output by default, as Firecracker's serial console does).
Input is buffered: ``feed()`` queues bytes for the guest and raises the receive interrupt.
"""
import os
import time
from collections import deque
from dataclasses import dataclass

COM1_BASE, COM1_IRQ, UART_PORTS = 0x3F8, 4, 8
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NONE, IIR_THRI, IIR_RDI, IIR_FIFO_ENABLED = 0x01, 0x02, 0x04, 0xC0
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02
RX_FIFO_LIMIT = 64 * 1024
FLUSH_AT = 4096
# What a guest may write to the console: TX_BURST bytes at once, then TX_RATE bytes a second. Each byte is a VM
# exit (~25 us here) and a trip through this model, so a guest that floods the UART burns a CPU on exits; past
# its allowance its vCPU waits off the CPU (VcpuRunner._throttle) instead. A Linux boot log fits the burst.
TX_BURST = 256 * 1024
TX_RATE = 4 * 1024
TX_RESUME = 512  # a throttled guest goes on once this much allowance came back: a few wake-ups a second


@dataclass(frozen=True)
class SerialState:
    dll: int
    dlm: int
    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    thr_interrupt_pending: bool
    rx_buffer: bytes

    def __post_init__(self):
        """A state file's UART: 8-bit registers and a receive buffer no longer than the device keeps (snapd.snapfile
        turns the ValueError into a format error)."""
        if not all(0 <= r <= 0xFF for r in (self.dll, self.dlm, self.ier, self.lcr, self.mcr, self.scr, self.fcr)):
            raise ValueError("a UART register outside 0..255")
        if len(self.rx_buffer) > RX_FIFO_LIMIT:
            raise ValueError(f"a receive buffer longer than {RX_FIFO_LIMIT} bytes")


def stdout_sink(data: bytes) -> None:
    os.write(1, data)


class Serial:
    def __init__(self, irq_line=None, sink=stdout_sink):
        self.irq_line = irq_line  # callable(level) or None
        self.sink = sink
        self.rx = deque()
        self._out = bytearray()
        self._irq_level = 0
        self.dll, self.dlm, self.ier, self.lcr, self.mcr, self.scr, self.fcr = 0x0C, 0, 0, 0x03, MCR_OUT2, 0, 0
        self.thr_interrupt_pending = False
        self.tx_tokens = TX_BURST  # bytes the guest may still write before it waits (refilled at TX_RATE)
        self._tx_refilled = time.monotonic()
        self._tx_waiting = False

    # -- guest side
    def io_read(self, offset: int, size: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            self._update_irq()
            return value
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            return self._read_iir()
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if offset == MSR:
            return self._modem_status()
        return self.scr

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
            else:
                self._transmit(value)
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
                self.thr_interrupt_pending = bool(self.ier & IER_THRI)  # THR is always empty
        elif offset == IIR_FCR:
            self.fcr = value & 0xC9
            if value & FCR_CLEAR_RX:
                self.rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        self._update_irq()

    def tx_delay(self) -> float:
        """Seconds a guest that used up its allowance must wait before it writes again (TX_RESUME bytes come
        back by then); 0 when it has some left."""
        now = time.monotonic()
        self.tx_tokens = min(TX_BURST, self.tx_tokens + (now - self._tx_refilled) * TX_RATE)
        self._tx_refilled = now
        if self.tx_tokens > 0 and not self._tx_waiting:
            return 0.0
        self._tx_waiting = self.tx_tokens < TX_RESUME
        return (TX_RESUME - self.tx_tokens) / TX_RATE if self._tx_waiting else 0.0

    def _transmit(self, byte: int) -> None:
        self.tx_tokens -= 1  # refilled when it runs out (tx_delay), so the common path reads no clock
        if self.mcr & MCR_LOOP:
            self._push_rx(bytes([byte]))
        else:
            self._out.append(byte)
            if byte == 0x0A or len(self._out) >= FLUSH_AT:
                self.flush()
        self.thr_interrupt_pending = bool(self.ier & IER_THRI)

    def _read_iir(self) -> int:
        fifo_bits = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI | fifo_bits
        if self.ier & IER_THRI and self.thr_interrupt_pending:
            self.thr_interrupt_pending = False  # reading IIR acknowledges the THR-empty interrupt
            self._update_irq()
            return IIR_THRI | fifo_bits
        return IIR_NONE | fifo_bits

    def _modem_status(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return ((MSR_DCD if m & MCR_OUT2 else 0) | (MSR_RI if m & MCR_OUT1 else 0)
                    | (MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0))
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _update_irq(self) -> None:
        pending = bool((self.ier & IER_RDI and self.rx) or (self.ier & IER_THRI and self.thr_interrupt_pending))
        level = 1 if pending and self.mcr & MCR_OUT2 else 0
        if level != self._irq_level and self.irq_line is not None:
            self.irq_line(level)
        self._irq_level = level

    def _push_rx(self, data: bytes) -> None:
        room = RX_FIFO_LIMIT - len(self.rx)
        self.rx.extend(data[:max(room, 0)])

    # -- host side
    def feed(self, data: bytes) -> None:
        """Queue input for the guest (console input)."""
        self._push_rx(data)
        self._update_irq()

    def flush(self) -> None:
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            self.sink(data)

    # -- persistence
    def save(self) -> SerialState:
        return SerialState(self.dll, self.dlm, self.ier, self.lcr, self.mcr, self.scr, self.fcr,
                           self.thr_interrupt_pending, bytes(self.rx))

    @classmethod
    def restore(cls, state: SerialState, irq_line=None, sink=stdout_sink) -> "Serial":
        serial = cls(irq_line, sink)
        serial.dll, serial.dlm, serial.ier, serial.lcr = state.dll, state.dlm, state.ier, state.lcr
        serial.mcr, serial.scr, serial.fcr = state.mcr, state.scr, state.fcr
        serial.thr_interrupt_pending = state.thr_interrupt_pending
        serial.rx.extend(state.rx_buffer)
        return serial
