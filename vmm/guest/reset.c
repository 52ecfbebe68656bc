/* Ending the guest: a reset request on the i8042's command port (the VMM stops the VM cleanly), or, where no
 * i8042 listens, a triple fault. Shared by the built-in guest and the test guests (tests/guests). */
#include "guest.h"
#include "io.h"

#define I8042_COMMAND 0x64
#define I8042_RESET   0xfe

void machine_reset(void)
{
    outb(I8042_COMMAND, I8042_RESET);
    /* Where no i8042 listens (QEMU microvm has none), fault: with no usable IDT that is a triple fault,
     * which resets the machine too. */
    __asm__ volatile("ud2");
    for (;;)
        ;
}

void guest_error(const char *what, const char *quoted)
{
    uart_write("vmguest: error: ");
    uart_write(what);
    if (quoted) {
        uart_write(" '");
        uart_write(quoted);
        uart_write("'");
    }
    uart_write("\n");
    machine_reset();
}
