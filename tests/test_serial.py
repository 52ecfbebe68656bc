"""The 16550 UART as Linux's 8250 driver probes and uses it: scratch, loopback, divisor latch, IIR, interrupts,
buffered input, and save/restore of every register."""
from vmm.devices import serial as uart
from vmm.devices.serial import Serial


class Line:
    def __init__(self):
        self.levels = []

    def __call__(self, level):
        self.levels.append(level)


def make():
    out, line = bytearray(), Line()
    return Serial(irq_line=line, sink=out.extend), out, line


def test_scratch_register_and_divisor_latch_hold_values():
    dev, _, _ = make()
    dev.io_write(uart.SCR, 1, 0xA5)
    assert dev.io_read(uart.SCR, 1) == 0xA5
    dev.io_write(uart.LCR, 1, uart.LCR_DLAB | 0x03)
    dev.io_write(uart.RBR_THR_DLL, 1, 0x01)  # 115200 baud
    dev.io_write(uart.IER_DLM, 1, 0x00)
    assert (dev.io_read(uart.RBR_THR_DLL, 1), dev.io_read(uart.IER_DLM, 1)) == (0x01, 0x00)
    dev.io_write(uart.LCR, 1, 0x03)
    assert dev.io_read(uart.IER_DLM, 1) == 0  # IER again, not DLM


def test_loopback_reflects_modem_lines_and_echoes_bytes_without_output():
    dev, out, _ = make()
    dev.io_write(uart.MCR, 1, uart.MCR_LOOP | uart.MCR_OUT2 | uart.MCR_RTS)
    assert dev.io_read(uart.MSR, 1) & 0xF0 == uart.MSR_DCD | uart.MSR_CTS  # what autoconfig checks
    dev.io_write(uart.RBR_THR_DLL, 1, ord("x"))
    assert dev.io_read(uart.LSR, 1) & uart.LSR_DR
    assert dev.io_read(uart.RBR_THR_DLL, 1) == ord("x")
    assert not dev.io_read(uart.LSR, 1) & uart.LSR_DR
    dev.flush()
    assert out == b""  # loopback bytes never reach the console


def test_transmit_reaches_the_sink_and_thr_is_always_empty():
    dev, out, _ = make()
    for byte in b"hello\n":
        dev.io_write(uart.RBR_THR_DLL, 1, byte)
    assert out == b"hello\n"
    assert dev.io_read(uart.LSR, 1) & (uart.LSR_THRE | uart.LSR_TEMT) == uart.LSR_THRE | uart.LSR_TEMT


def test_interrupts_follow_ier_and_iir_acknowledges_thr_empty():
    dev, _, line = make()
    dev.io_write(uart.MCR, 1, uart.MCR_OUT2)
    dev.io_write(uart.IER_DLM, 1, uart.IER_THRI)
    assert line.levels[-1] == 1
    assert dev.io_read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_THRI
    assert line.levels[-1] == 0  # reading IIR acknowledged it
    assert dev.io_read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_NONE
    dev.io_write(uart.IER_DLM, 1, uart.IER_RDI)
    dev.feed(b"ab")
    assert line.levels[-1] == 1 and dev.io_read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_RDI
    assert bytes([dev.io_read(uart.RBR_THR_DLL, 1), dev.io_read(uart.RBR_THR_DLL, 1)]) == b"ab"
    assert line.levels[-1] == 0


def test_fifo_enable_shows_in_iir_and_clear_empties_input():
    dev, _, _ = make()
    dev.io_write(uart.IIR_FCR, 1, uart.FCR_ENABLE)
    assert dev.io_read(uart.IIR_FCR, 1) & 0xC0 == 0xC0
    dev.feed(b"pending")
    dev.io_write(uart.IIR_FCR, 1, uart.FCR_ENABLE | uart.FCR_CLEAR_RX)
    assert not dev.io_read(uart.LSR, 1) & uart.LSR_DR


def test_save_and_restore_keep_registers_and_unread_input():
    dev, _, _ = make()
    dev.io_write(uart.LCR, 1, 0x1B)
    dev.io_write(uart.SCR, 1, 0x42)
    dev.io_write(uart.IER_DLM, 1, uart.IER_RDI)
    dev.feed(b"typed")
    state = dev.save()
    restored = Serial.restore(state, sink=lambda data: None)
    assert restored.save() == state
    assert bytes(restored.io_read(uart.RBR_THR_DLL, 1) for _ in range(5)) == b"typed"
