/* Tiny test guests, entered like the built-in guest (64-bit, CPL 3). Selected by the FAULT macro. */
.section .text
.globl _start
.code64
_start:
    mov $0x3f8, %dx
    lea msg(%rip), %rsi
1:  movb (%rsi), %al
    test %al, %al
    jz 2f
    outb %al, %dx
    inc %rsi
    jmp 1b
2:
#if FAULT == 1
    ud2                         /* invalid instruction */
#elif FAULT == 2
    movq $0, %rax
    movq (%rax), %rax           /* fine: page 0 is mapped; then jump to a non-canonical address */
    movabs $0x8000000000000000, %rax
    jmp *%rax
#else
    mov $0xfe, %al              /* reset request: the VM stops cleanly */
    outb %al, $0x64
#endif
3:  jmp 3b
msg: .asciz "tiny guest\n"
