"""x86-64 set-up done by the VMM: identity page tables, a GDT with user segments, long-mode sregs, CPUID.

The built-in guest is entered directly in 64-bit mode at CPL 3 (see docs/function-port.md): on nested PVM
hosts CPL 0 code is emulated thousands of times slower, CPL 3 code runs natively.
"""
import struct

from vmm.memory import GiB, GuestMemory

GDT_ADDR = 0x500
TSS_ADDR = 0x1000
CMDLINE_ADDR = 0x4000
CMDLINE_MAX = 4095
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
MAX_MAPPED_GIB = 64  # PDs from 0xb000 stay below 0x4b000

# Page-table entry bits.
PTE_PRESENT, PTE_WRITABLE, PTE_USER, PTE_HUGE = 1, 2, 4, 0x80
# Control-register bits.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_SCE, EFER_LME, EFER_LMA = 0x1, 0x100, 0x400
RFLAGS_RESERVED, RFLAGS_IOPL3 = 0x2, 0x3000

# GDT: 0 null, 1 kernel code, 2 kernel data, 3 user code, 4 user data, 5-6 TSS (16-byte descriptor).
SEL_USER_CODE = (3 << 3) | 3
SEL_USER_DATA = (4 << 3) | 3
SEL_TSS = 5 << 3
# The TSS carries a full I/O permission bitmap that allows every port: PVM checks the bitmap (not only
# RFLAGS.IOPL) before letting CPL 3 code execute in/out, so without it the guest's first `out` faults.
TSS_IOMAP_OFFSET = 0x68
IOMAP_BYTES = 65536 // 8
TSS_LIMIT = TSS_IOMAP_OFFSET + IOMAP_BYTES  # includes the 0xff terminator byte


def segment_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40) | (((limit >> 16) & 0xF) << 48)
            | (flags << 52) | (((base >> 24) & 0xFF) << 56))


def write_gdt(memory: GuestMemory) -> None:
    entries = [
        0,
        segment_descriptor(0, 0xFFFFF, 0x9B, 0xA),  # kernel code, L=1
        segment_descriptor(0, 0xFFFFF, 0x93, 0xC),  # kernel data
        segment_descriptor(0, 0xFFFFF, 0xFB, 0xA),  # user code, DPL 3, L=1
        segment_descriptor(0, 0xFFFFF, 0xF3, 0xC),  # user data, DPL 3
        segment_descriptor(TSS_ADDR, TSS_LIMIT, 0x8B, 0x0),  # 64-bit TSS (busy), low half
        TSS_ADDR >> 32,  # TSS descriptor, high half
    ]
    memory.write(GDT_ADDR, struct.pack(f"<{len(entries)}Q", *entries))


def write_tss(memory: GuestMemory) -> None:
    """A 64-bit TSS whose I/O bitmap (all zero bits) grants every port to CPL 3."""
    memory.write(TSS_ADDR, bytes(TSS_IOMAP_OFFSET - 2) + struct.pack("<H", TSS_IOMAP_OFFSET)
                 + bytes(IOMAP_BYTES) + b"\xff")


def write_page_tables(memory: GuestMemory, mapped_bytes: int, user: bool = True) -> None:
    """Identity-map [0, mapped_bytes) with 2 MiB writable pages; ``user``: reachable at CPL 3 (the built-in
    guest), else supervisor pages (a Linux kernel's entry, which builds its own tables at once)."""
    gib = min(max(1, -(-mapped_bytes // GiB)), MAX_MAPPED_GIB)
    flags = PTE_PRESENT | PTE_WRITABLE | (PTE_USER if user else 0)
    memory.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | flags) + bytes(4088))
    memory.write(PDPT_ADDR, struct.pack(f"<{gib}Q", *(PD_ADDR + i * 4096 | flags for i in range(gib))) + bytes(4096 - 8 * gib))
    for i in range(gib):
        pdes = struct.pack("<512Q", *(((i * 512 + j) << 21) | flags | PTE_HUGE for j in range(512)))
        memory.write(PD_ADDR + i * 4096, pdes)


def write_cmdline(memory: GuestMemory, cmdline: str) -> None:
    data = cmdline.encode()
    if len(data) > CMDLINE_MAX:
        raise ValueError(f"command line is {len(data)} bytes, at most {CMDLINE_MAX} fit")
    memory.write(CMDLINE_ADDR, data + b"\0")


def set_flat_segment(seg, selector: int, code: bool) -> None:
    """A flat 4 GiB segment (64-bit code, or data), its DPL the selector's RPL."""
    seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
    seg.type = 0xB if code else 0x3
    seg.present, seg.dpl, seg.s, seg.g = 1, selector & 3, 1, 1
    seg.l, seg.db = (1, 0) if code else (0, 1)
    seg.avl, seg.unusable = 0, 0


def setup_long_mode_user(sregs) -> None:
    """Fill ``sregs`` for 64-bit long mode with CS/SS at DPL 3 over the VMM-built GDT and page tables."""
    set_flat_segment(sregs.cs, SEL_USER_CODE, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        set_flat_segment(seg, SEL_USER_DATA, code=False)
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type, tr.present, tr.dpl, tr.s, tr.g, tr.l, tr.db = \
        TSS_ADDR, TSS_LIMIT, SEL_TSS, 0xB, 1, 0, 0, 0, 0, 0
    tr.unusable = 0
    sregs.ldt.unusable = 1
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 7 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0  # no IDT: a guest exception ends in a triple fault (SHUTDOWN exit)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA


def vcpu_cpuid(supported: list[tuple], vcpu_index: int, vcpu_count: int) -> list[tuple]:
    """KVM's supported CPUID with this vCPU's APIC ID and the topology leaves filled in."""
    result = []
    for function, index, flags, eax, ebx, ecx, edx in supported:
        if function == 1:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processor count.
            ebx = (ebx & 0x0000FFFF) | (vcpu_index << 24) | (max(vcpu_count, 1) << 16)
        elif function == 0xB:
            edx = vcpu_index  # x2APIC ID
        result.append((function, index, flags, eax, ebx, ecx, edx))
    return result
