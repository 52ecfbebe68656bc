/*
 * 64-bit entry at CPL 3 (e_entry). Our VMM enters here directly; the PVH stub (pvh.S) arrives here too.
 * RDI = command line address, RSI = memory size in bytes (0 if unknown), RSP = 0: set our own stack.
 */
    .section .text
    .globl _start64
_start64:
    lea guest_stack_top(%rip), %rsp
    cld
    call guest_main                 /* guest_main(cmdline, mem_size) does not return */
    call machine_reset

    .section .bss.stack, "aw", @nobits
    .p2align 12
    .globl guest_stack_top
guest_stack:
    .skip 32768
guest_stack_top:
