/* Port I/O at CPL 3 (IOPL 3). Every access is a VM exit (~25 us here), so callers keep them few.
 * The "memory" clobber orders the access against memory: the VMM reads and writes the mailbox while the
 * vCPU is stopped in one of these instructions. */
#ifndef GUEST_IO_H
#define GUEST_IO_H
#include <stdint.h>

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port) : "memory");
    return value;
}

#endif
