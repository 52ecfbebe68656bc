/*
 * PVH entry (QEMU microvm and other PVH loaders): 32-bit protected mode, paging off, EBX = hvm_start_info.
 * Builds an identity map of the first 4 GiB (2 MiB pages, User + Writable), a GDT with 64-bit user segments
 * and a TSS, enters long mode and drops to CPL 3 at _start64 with RDI = command line, RSI = memory size:
 * the same state our VMM's direct 64-bit entry gives. Everything here runs at CPL 0, which is emulated on
 * the nested hosts we run on, so it is kept short.
 *
 * Port I/O at CPL 3: on real hardware IOPL 3 in the iretq frame suffices, but on PVM hosts the IOPL set by
 * an emulated iretq/sysretq does not survive (the hardware never runs the guest with IOPL > 0, and RFLAGS
 * is read back from it). The TSS therefore carries an I/O permission bitmap that allows ports 0-0xfff,
 * which the emulator does honour.
 */
#define CR0_PE      0x00000001
#define CR0_MP      0x00000002
#define CR0_EM      0x00000004
#define CR0_TS      0x00000008
#define CR0_NE      0x00000020
#define CR0_WP      0x00010000
#define CR0_NW      0x20000000
#define CR0_CD      0x40000000
#define CR0_PG      0x80000000
#define CR4_PAE     0x00000020
#define CR4_OSFXSR  0x00000200      /* SSE: gcc may emit it */
#define CR4_OSXMMEXCPT 0x00000400
#define MSR_EFER    0xc0000080
#define EFER_LME    0x00000100
#define PTE_PRESENT_RW_USER 0x7
#define PDE_2MIB_RW_USER    0x87    /* present, writable, user, page size */

#define KERNEL_CS   0x08
#define KERNEL_DS   0x10
#define USER_DS     0x18
#define USER_CS     0x20
#define TSS_SEL     0x28
#define RFLAGS_IOPL3 0x3002         /* IOPL 3 so in/out work at CPL 3; IF 0 */

#define IO_BITMAP_PORTS 0x1000
#define TSS_SIZE (104 + IO_BITMAP_PORTS / 8 + 1)
#define START_INFO_VERSION      4
#define START_INFO_CMDLINE      24
#define START_INFO_MEMMAP       40
#define START_INFO_MEMMAP_COUNT 48
#define MEMMAP_ENTRY_SIZE       24  /* u64 addr, u64 size, u32 type, u32 reserved */
#define MEMMAP_TYPE_RAM         1
#define IMAGE_BASE              0x100000

/* The note that tells a PVH loader where the 32-bit entry is (XEN_ELFNOTE_PHYS32_ENTRY). */
    .section .note.Xen, "a"
    .p2align 2
    .long 4                         /* name size: "Xen\0" */
    .long 4                         /* descriptor size */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32

    .section .text.pvh, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    mov %ebx, %esi                  /* keep hvm_start_info for the 64-bit part */

    /* PML4[0] -> PDPT; PDPT[0..3] -> four page directories; 2048 2 MiB pages cover 4 GiB. */
    movl $pvh_pdpt + PTE_PRESENT_RW_USER, pvh_pml4
    mov $pvh_pd + PTE_PRESENT_RW_USER, %eax
    mov $pvh_pdpt, %edi
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    dec %ecx
    jnz 1b
    mov $PDE_2MIB_RW_USER, %eax
    mov $pvh_pd, %edi
    mov $2048, %ecx
2:  mov %eax, (%edi)                /* high halves are zero: .bss */
    add $0x200000, %eax
    add $8, %edi
    dec %ecx
    jnz 2b

    mov %cr4, %eax
    or $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    mov %eax, %cr4
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    and $~(CR0_EM | CR0_TS | CR0_NW | CR0_CD), %eax
    or $(CR0_PG | CR0_WP | CR0_NE | CR0_MP | CR0_PE), %eax
    mov %eax, %cr0
    lgdt pvh_gdt_descriptor
    ljmp $KERNEL_CS, $pvh_start64

    .code64
pvh_start64:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lea guest_stack_top(%rip), %rsp /* only for the iretq frame; _start64 sets it again */

    /* 64-bit TSS descriptor: the base is a link-time address, split across fields at run time. */
    lea pvh_tss(%rip), %rax
    mov %rax, %rdx
    and $0xffffff, %edx
    shl $16, %rdx                   /* base[23:0] -> bits 16..39 */
    mov %rax, %rcx
    shr $24, %rcx
    shl $56, %rcx                   /* base[31:24] -> bits 56..63 */
    or %rcx, %rdx
    movabs $(0x89 << 40 | (TSS_SIZE - 1)), %rcx    /* present, available 64-bit TSS */
    or %rcx, %rdx
    mov %rdx, pvh_gdt + TSS_SEL(%rip)
    shr $32, %rax
    mov %rax, pvh_gdt + TSS_SEL + 8(%rip)
    mov $TSS_SEL, %eax
    ltr %ax
    lidt pvh_null_idt(%rip)         /* any exception now triple-faults: a reset, not a stray handler */

    /* RDI = command line (0 if the loader gave none); RSI = end of the RAM range holding the image. */
    mov %esi, %ebx
    xor %edi, %edi
    xor %esi, %esi
    cmpl $0x336ec578, (%rbx)        /* hvm_start_info magic */
    jne 5f
    mov START_INFO_CMDLINE(%rbx), %rdi
    cmpl $1, START_INFO_VERSION(%rbx)   /* the memory map exists from version 1 */
    jb 5f
    mov START_INFO_MEMMAP(%rbx), %r8
    mov START_INFO_MEMMAP_COUNT(%rbx), %ecx
    test %ecx, %ecx
    jz 5f
3:  cmpl $MEMMAP_TYPE_RAM, 16(%r8)
    jne 4f
    mov (%r8), %rax
    cmp $IMAGE_BASE, %rax
    ja 4f
    add 8(%r8), %rax
    cmp $IMAGE_BASE, %rax
    jbe 4f
    mov %rax, %rsi
4:  add $MEMMAP_ENTRY_SIZE, %r8
    dec %ecx
    jnz 3b
    movabs $0x100000000, %rax       /* only the first 4 GiB are mapped */
    cmp %rax, %rsi
    cmova %rax, %rsi
5:
    push $(USER_DS | 3)
    push $0                         /* RSP = 0, as on direct entry */
    push $RFLAGS_IOPL3
    push $(USER_CS | 3)
    lea _start64(%rip), %rax
    push %rax
    iretq

    .section .data                  /* written: the TSS descriptor, and ltr marks it busy */
    .p2align 3
pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* KERNEL_CS: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff        /* KERNEL_DS: data, DPL 0 */
    .quad 0x00cff2000000ffff        /* USER_DS: data, DPL 3 */
    .quad 0x00affa000000ffff        /* USER_CS: 64-bit code, DPL 3 */
    .quad 0, 0                      /* TSS_SEL: filled in at run time */
pvh_gdt_end:
pvh_gdt_descriptor:
    .word pvh_gdt_end - pvh_gdt - 1
    .long pvh_gdt
pvh_null_idt:
    .word 0
    .quad 0

    .p2align 4
pvh_tss:
    .skip 102
    .word 104                       /* I/O permission bitmap offset */
    .skip IO_BITMAP_PORTS / 8       /* all zero: ports 0..IO_BITMAP_PORTS-1 allowed at CPL 3 */
    .byte 0xff                      /* the bitmap's terminating byte */

    .section .bss.pvh, "aw", @nobits
    .p2align 12
pvh_pml4:   .skip 4096
pvh_pdpt:   .skip 4096
pvh_pd:     .skip 4 * 4096
