"""Boot a Linux kernel (vmlinux ELF or bzImage) through the x86 64-bit boot protocol.

Facts used, from the kernel's Documentation/arch/x86/boot.rst ("64-bit Boot Protocol", "The Real-Mode Kernel
Header", "Details of Header Fields") and arch/x86/include/uapi/asm/bootparam.h:
- The loader fills a `struct boot_params` (the "zero page"), passes its address in RSI and jumps to the 64-bit
  entry with paging on, interrupts off, CS = __BOOT_CS (0x10) and DS/ES/SS = __BOOT_DS (0x18), both flat 4 GiB
  segments in the loader's GDT, and the range holding the kernel, zero page and command line identity-mapped.
- A bzImage carries a setup header at 0x1f1 ("HdrS" magic at 0x202). The protected-mode kernel starts at file
  offset (setup_sects + 1) * 512 (setup_sects 0 means 4); with XLF_KERNEL_64 set in xloadflags its 64-bit entry
  is 0x200 past its load address. The header (0x1f1 up to 0x202 + the byte at 0x201) is copied into the zero
  page, and the loader sets type_of_loader, cmd_line_ptr, ramdisk_image/size and loadflags.
- The initrd goes as high as possible below initrd_addr_max (protocol 2.03+), page aligned.
- A vmlinux is an ELF whose PT_LOAD segments go to their physical addresses (p_paddr); its e_entry is the
  physical address of startup_64, the same 64-bit entry (checked: Debian's 6.1 cloud vmlinux has e_entry
  0x1000000 = the p_paddr of .text).

Which images count as Linux (``is_linux_kernel``): a file with the bzImage magic, or an x86-64 ELF that has a
note owned by "Linux" (the build-salt note every kernel since 4.18 emits, and LTO info) or a PT_LOAD segment linked in
the kernel's text mapping (__START_KERNEL_map, 0xffffffff80000000). The built-in guest is an ELF linked at
1 MiB whose only note is owned by "Xen" (PVH entry): it matches neither rule and keeps its direct CPL 3 entry.

On PVM hosts the kernel runs at CPL 0, which KVM emulates (see ../shared/FACTS.md): expect early boot output,
then an emulation failure that the vCPU loop reports as a GuestFault.
"""
import struct
from dataclasses import dataclass

from vmm.errors import GuestImageError
from vmm.loader import EHDR, ELF_MAGIC, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PHDR, PT_LOAD, load_elf
from vmm.memory import GiB, MiB, PAGE_SIZE, GuestMemory
from vmm.x86 import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, PML4_ADDR, RFLAGS_RESERVED,
                     segment_descriptor, set_flat_segment, write_page_tables)

# Guest-physical layout of what the VMM writes below 1 MiB (all inside usable RAM: the kernel copies the zero
# page and command line early and builds its own page tables and GDT).
BOOT_GDT_ADDR = 0x500
BOOT_TSS_ADDR = 0x1000
BOOT_STACK_TOP = 0x8FF0
ZERO_PAGE_ADDR = 0x7000
IDENTITY_MAPPED_GIB = 4  # identity page tables at vmm.x86's PML4_ADDR (0x9000-0xefff for 4 GiB)
CMDLINE_ADDR = 0x20000
EBDA_START = 0x9FC00  # e820: RAM stops at the Extended BIOS Data Area ...
HIGH_MEMORY_START = 0x100000  # ... and resumes at 1 MiB

# struct boot_params offsets (bootparam.h).
BP_EXT_RAMDISK_IMAGE, BP_EXT_RAMDISK_SIZE, BP_EXT_CMD_LINE_PTR = 0x0C0, 0x0C4, 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")
E820_RAM, E820_RESERVED = 1, 2
# struct setup_header fields, as offsets in the zero page and in a bzImage file alike.
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP_OFFSET = 0x201  # the byte after the 2-byte jump at 0x200: the header ends at 0x202 + this
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260
BOOT_FLAG = 0xAA55
BZIMAGE_MAGIC = b"HdrS"
SECTOR = 512
DEFAULT_SETUP_SECTS = 4
ENTRY_64_OFFSET = 0x200
LOADER_UNDEFINED = 0xFF  # type_of_loader for a boot loader without an assigned ID
LOADFLAG_LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
PROTOCOL_FOR_VMLINUX = 0x020F  # the header version we fill in for a vmlinux (no header of its own)
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF
DEFAULT_CMDLINE_MAX = 2047  # COMMAND_LINE_SIZE (2048) minus the NUL
DEFAULT_LOAD_ADDR = 0x1000000  # CONFIG_PHYSICAL_START's default, for protocols before pref_address (2.10)

# ELF notes and the kernel text mapping, for recognising a vmlinux.
PT_NOTE = 4
LINUX_NOTE_OWNER = b"Linux"
START_KERNEL_MAP = 0xFFFFFFFF80000000
MAX_NOTES_BYTES = 1 << 20

# Segments and control registers for the CPL 0 entry.
BOOT_CS, BOOT_DS, BOOT_TSS_SEL = 0x10, 0x18, 0x20
MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING = 0x1A0, 0x1


@dataclass(frozen=True)
class LoadedKernel:
    entry: int  # guest-physical 64-bit entry
    end: int  # first byte after the memory the kernel needs (init_size for a bzImage)
    setup_header: bytes  # bzImage: the header copied into the zero page; vmlinux: b""
    initrd_addr_max: int
    cmdline_max: int


# -- recognising images
def _read_head(path: str, size: int) -> bytes:
    try:
        with open(path, "rb") as image:
            return image.read(size)
    except OSError as exc:
        raise GuestImageError(f"cannot read guest image {path}: {exc.strerror}") from None


def _is_bzimage(head: bytes) -> bool:
    return head[HDR_MAGIC:HDR_MAGIC + 4] == BZIMAGE_MAGIC


def _elf_program_headers(path: str, head: bytes) -> list[tuple] | None:
    """The program headers of a little-endian x86-64 ELF64 file, or None if it is not one."""
    if len(head) < EHDR.size or head[:4] != ELF_MAGIC:
        return None
    ident, _type, machine, _ver, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = EHDR.unpack_from(head)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64 or phentsize != PHDR.size:
        return None
    table = head[phoff:phoff + phnum * PHDR.size]
    if len(table) < phnum * PHDR.size:
        table = _read_at(path, phoff, phnum * PHDR.size)
    return [PHDR.unpack_from(table, i * PHDR.size) for i in range(phnum)]


def _read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as image:
        image.seek(offset)
        return image.read(size)


def _note_owners(notes: bytes):
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, _type = struct.unpack_from("<III", notes, pos)
        yield notes[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        pos += 12 + (namesz + 3 & ~3) + (descsz + 3 & ~3)


def _is_vmlinux(path: str, head: bytes) -> bool:
    phdrs = _elf_program_headers(path, head)
    if phdrs is None:
        return False
    for p_type, _flags, offset, vaddr, _paddr, filesz, _memsz, _align in phdrs:
        if p_type == PT_LOAD and vaddr >= START_KERNEL_MAP:
            return True
        if p_type == PT_NOTE and filesz <= MAX_NOTES_BYTES:
            if LINUX_NOTE_OWNER in _note_owners(_read_at(path, offset, filesz)):
                return True
    return False


def is_linux_kernel(path: str) -> bool:
    """True for a bzImage or a vmlinux ELF (rules in the module docstring)."""
    head = _read_head(path, 4096)
    return _is_bzimage(head) or _is_vmlinux(path, head)


# -- loading
def load_vmlinux(path: str, memory: GuestMemory) -> LoadedKernel:
    image = load_elf(path, memory)
    entry = image.entry
    if entry >= START_KERNEL_MAP:  # a virtual e_entry: translate it through the segment that holds it
        phdrs = _elf_program_headers(path, _read_head(path, 4096))
        for p_type, _flags, _offset, vaddr, paddr, _filesz, memsz, _align in phdrs:
            if p_type == PT_LOAD and vaddr <= entry < vaddr + memsz:
                entry = entry - vaddr + paddr
                break
        else:
            raise GuestImageError(f"{path}: entry point {entry:#x} lies in no loadable segment")
    return LoadedKernel(entry, image.end, b"", DEFAULT_INITRD_ADDR_MAX, DEFAULT_CMDLINE_MAX)


def load_bzimage(path: str, memory: GuestMemory) -> LoadedKernel:
    with open(path, "rb") as image_file:
        image = image_file.read()
    u8 = lambda off: image[off]  # noqa: E731
    u16 = lambda off: struct.unpack_from("<H", image, off)[0]  # noqa: E731
    u32 = lambda off: struct.unpack_from("<I", image, off)[0]  # noqa: E731
    version = u16(HDR_VERSION)
    if version < 0x020C or not u16(HDR_XLOADFLAGS) & XLF_KERNEL_64:
        raise GuestImageError(f"{path}: boot protocol {version >> 8}.{version & 0xFF} kernel without a 64-bit "
                              f"entry (XLF_KERNEL_64); only 64-bit bzImages are supported")
    setup_sects = u8(HDR_SETUP_SECTS) or DEFAULT_SETUP_SECTS
    kernel = image[(setup_sects + 1) * SECTOR:]
    load_addr = struct.unpack_from("<Q", image, HDR_PREF_ADDRESS)[0] if version >= 0x020A else DEFAULT_LOAD_ADDR
    alignment = u32(HDR_KERNEL_ALIGNMENT) or 1
    load_addr = -(-load_addr // alignment) * alignment
    init_size = max(u32(HDR_INIT_SIZE), len(kernel))
    if not memory.contains(load_addr, init_size):
        raise GuestImageError(f"{path}: the kernel needs {load_addr:#x}+{init_size:#x}, beyond "
                              f"{memory.size // MiB} MiB of guest memory")
    memory.write(load_addr, kernel)
    header_end = HDR_MAGIC + u8(HDR_JUMP_OFFSET)
    return LoadedKernel(load_addr + ENTRY_64_OFFSET, load_addr + init_size, image[BP_SETUP_HEADER:header_end],
                        u32(HDR_INITRD_ADDR_MAX), u32(HDR_CMDLINE_SIZE) or DEFAULT_CMDLINE_MAX)


def load_initrd(path: str, memory: GuestMemory, kernel: LoadedKernel) -> tuple[int, int]:
    """Copy the initrd to the highest page-aligned spot below initrd_addr_max in low RAM, above the kernel."""
    with open(path, "rb") as initrd_file:
        data = initrd_file.read()
    low_ram_end = memory.regions[0].guest_phys_addr + memory.regions[0].size
    top = min(kernel.initrd_addr_max + 1, low_ram_end)
    addr = (top - len(data)) & ~(PAGE_SIZE - 1)
    if addr < kernel.end:
        raise GuestImageError(f"initrd {path} ({len(data)} bytes) does not fit between the kernel's end "
                              f"{kernel.end:#x} and {top:#x}")
    memory.write(addr, data)
    return addr, len(data)


# -- the zero page and the CPU state
def e820_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(address, size, type) for each range: RAM below the EBDA, the BIOS area reserved, RAM from 1 MiB on."""
    entries = []
    for region in memory.regions:
        start, end = region.guest_phys_addr, region.guest_phys_addr + region.size
        if start < HIGH_MEMORY_START:
            entries.append((start, EBDA_START - start, E820_RAM))
            entries.append((EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED))
            start = HIGH_MEMORY_START
        if end > start:
            entries.append((start, end - start, E820_RAM))
    return entries


def build_zero_page(kernel: LoadedKernel, cmdline_addr: int, initrd: tuple[int, int],
                    e820: list[tuple[int, int, int]]) -> bytes:
    page = bytearray(PAGE_SIZE)
    if kernel.setup_header:
        page[BP_SETUP_HEADER:BP_SETUP_HEADER + len(kernel.setup_header)] = kernel.setup_header
    else:
        struct.pack_into("<H", page, HDR_BOOT_FLAG, BOOT_FLAG)
        page[HDR_MAGIC:HDR_MAGIC + 4] = BZIMAGE_MAGIC
        struct.pack_into("<H", page, HDR_VERSION, PROTOCOL_FOR_VMLINUX)
        struct.pack_into("<I", page, HDR_CMDLINE_SIZE, kernel.cmdline_max)
    page[HDR_TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[HDR_LOADFLAGS] |= LOADFLAG_LOADED_HIGH
    initrd_addr, initrd_size = initrd
    struct.pack_into("<I", page, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", page, HDR_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", page, HDR_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    if len(e820) > E820_MAX_ENTRIES:
        raise GuestImageError(f"{len(e820)} e820 entries, the zero page holds {E820_MAX_ENTRIES}")
    page[BP_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        E820_ENTRY.pack_into(page, BP_E820_TABLE + i * E820_ENTRY.size, *entry)
    return bytes(page)


TSS_LIMIT = 0x67  # a bare 64-bit TSS, no I/O bitmap: only there so TR is valid until the kernel loads its own


def write_boot_gdt(memory: GuestMemory) -> int:
    """The boot GDT: null, null, __BOOT_CS (flat 64-bit code, DPL 0), __BOOT_DS (flat data), a TSS. Returns limit."""
    entries = [0, 0,
               segment_descriptor(0, 0xFFFFF, 0x9B, 0xA),  # present, DPL 0, code exec/read accessed; G, L
               segment_descriptor(0, 0xFFFFF, 0x93, 0xC),  # present, DPL 0, data read/write accessed; G, D/B
               segment_descriptor(BOOT_TSS_ADDR, TSS_LIMIT, 0x8B, 0x0), 0]  # busy 64-bit TSS (two slots)
    memory.write(BOOT_GDT_ADDR, struct.pack(f"<{len(entries)}Q", *entries))
    memory.write(BOOT_TSS_ADDR, bytes(TSS_LIMIT + 1))
    return len(entries) * 8 - 1


def setup_long_mode_kernel(sregs, gdt_limit: int) -> None:
    """64-bit mode at CPL 0 over the boot GDT and identity map: CR0 PE|PG, CR4 PAE, EFER LME|LMA."""
    set_flat_segment(sregs.cs, BOOT_CS, code=True)  # DPL 0: the selectors' RPL
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        set_flat_segment(seg, BOOT_DS, code=False)
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type, tr.present, tr.dpl, tr.s, tr.g, tr.l, tr.db, tr.avl, tr.unusable = \
        BOOT_TSS_ADDR, TSS_LIMIT, BOOT_TSS_SEL, 0xB, 1, 0, 0, 0, 0, 0, 0, 0
    sregs.ldt.unusable = 1
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT_ADDR, gdt_limit
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def boot_linux(machine) -> None:
    """Load the configured kernel (and initrd), build the zero page, enter the kernel on vCPU 0, start."""
    config, memory = machine.config, machine.memory
    path = config.image_path()
    kernel = load_bzimage(path, memory) if _is_bzimage(_read_head(path, 4096)) else load_vmlinux(path, memory)
    cmdline = config.boot_args.encode()
    if len(cmdline) > kernel.cmdline_max:
        raise GuestImageError(f"command line is {len(cmdline)} bytes, this kernel takes at most {kernel.cmdline_max}")
    memory.write(CMDLINE_ADDR, cmdline + b"\0")
    initrd = load_initrd(config.initrd_path, memory, kernel) if config.initrd_path else (0, 0)
    memory.write(ZERO_PAGE_ADDR, build_zero_page(kernel, CMDLINE_ADDR, initrd, e820_map(memory)))
    gdt_limit = write_boot_gdt(memory)
    write_page_tables(memory, IDENTITY_MAPPED_GIB * GiB, user=False)  # the kernel replaces them in startup_64

    bsp = machine.vcpus[0]
    sregs = bsp.get_sregs()
    setup_long_mode_kernel(sregs, gdt_limit)
    bsp.set_sregs(sregs)
    regs = bsp.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rip, regs.rsi, regs.rflags = kernel.entry, ZERO_PAGE_ADDR, RFLAGS_RESERVED
    regs.rsp = regs.rbp = BOOT_STACK_TOP
    bsp.set_regs(regs)
    # Fast strings on, as firmware leaves it (Linux reads IA32_MISC_ENABLE early; not required to boot).
    bsp.set_msrs([(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING)])
    machine.start()


__all__ = ["is_linux_kernel", "boot_linux", "load_vmlinux", "load_bzimage", "e820_map", "build_zero_page"]
