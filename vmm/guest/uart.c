/* COM1 output. We write the transmit register without polling the line status: every port access is a
 * VM exit (~25 us), and both QEMU's 16550 and our VMM's take each byte synchronously. */
#include "guest.h"
#include "io.h"

#define COM1_THR 0x3f8

void uart_write(const char *text)
{
    while (*text)
        outb(COM1_THR, (uint8_t)*text++);
}

void uart_write_u64(uint64_t value)
{
    char digits[21];
    char *p = digits + sizeof(digits) - 1;
    *p = '\0';
    do {
        *--p = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    uart_write(p);
}

static const char hex_digits[] = "0123456789abcdef";

void uart_write_hex64(uint64_t value)
{
    char text[17];
    for (int i = 15; i >= 0; i--) {
        text[i] = hex_digits[value & 15];
        value >>= 4;
    }
    text[16] = '\0';
    uart_write(text);
}

void uart_write_hex_bytes(const uint8_t *bytes, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        outb(COM1_THR, (uint8_t)hex_digits[bytes[i] >> 4]);
        outb(COM1_THR, (uint8_t)hex_digits[bytes[i] & 15]);
    }
}
