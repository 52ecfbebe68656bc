"""Guest memory: named regions of guest-physical space, each with its host mapping.

A region is backed by anonymous memory (a fresh guest), a memfd, or a file mapped MAP_PRIVATE (a snapshot's
memory file: reads share the page cache, writes are copied). ``remap`` slides a new backing under an existing
mapping with MAP_FIXED, so a VM can be built before the snapshot it will run is known.
"""
from dataclasses import dataclass

from vmm.errors import ConfigError
from vmm.native import check, ffi, lib

MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4096
# x86: guest RAM stops below the 32-bit MMIO hole (3-4 GiB) and continues above 4 GiB.
MMIO_HOLE_START = 3 * GiB
# Back anonymous guest memory with transparent huge pages (bench.boot --thp-ab measures it against 4 KiB pages).
TRANSPARENT_HUGE_PAGES = True
HIGH_RAM_START = 4 * GiB


@dataclass(frozen=True)
class RegionLayout:
    """Where a region sits: its name, guest-physical address, size, and offset in a memory file."""
    name: str
    guest_phys_addr: int
    size: int
    file_offset: int


def x86_layout(mem_size: int) -> list[RegionLayout]:
    """The guest-physical RAM layout for ``mem_size`` bytes; file offsets pack the regions back to back."""
    if mem_size <= 0 or mem_size % PAGE_SIZE:
        raise ConfigError(f"memory size must be a positive multiple of 4 KiB, not {mem_size} bytes")
    low = min(mem_size, MMIO_HOLE_START)
    layout = [RegionLayout("ram_low", 0, low, 0)]
    if mem_size > low:
        layout.append(RegionLayout("ram_high", HIGH_RAM_START, mem_size - low, low))
    return layout


class Region:
    """One mapped region. ``backing`` is 'anon', 'memfd' or 'file'; ``fd`` is the backing fd or -1."""

    def __init__(self, layout: RegionLayout, host_addr: int, backing: str, fd: int = -1):
        self.layout = layout
        self.host_addr = host_addr
        self.backing = backing
        self.fd = fd

    name = property(lambda self: self.layout.name)
    guest_phys_addr = property(lambda self: self.layout.guest_phys_addr)
    size = property(lambda self: self.layout.size)

    def buffer(self):
        return ffi.buffer(ffi.cast("char *", self.host_addr), self.size)


def _mmap(addr: int, size: int, prot: int, flags: int, fd: int, offset: int, what: str) -> int:
    err = ffi.new("long *")
    ptr = lib.vmm_mmap(ffi.cast("void *", addr), size, prot, flags, fd, offset, err)
    check(err[0], f"mmap({what})")
    return int(ffi.cast("uintptr_t", ptr))


RW = lib.PROT_READ | lib.PROT_WRITE


class GuestMemory:
    """All regions of one guest; translates guest-physical addresses to host memory."""

    def __init__(self, regions: list[Region]):
        self.regions = regions
        self.size = sum(r.size for r in regions)
        # Pages the VMM itself wrote (KVM's dirty log only sees guest writes); None when not tracking.
        self.host_dirty_pages = None
        self.backend = None  # a page-server backend (vmm.uffd_backend), closed before the memory is unmapped
        self.inaccessible_reason = ""  # set when the memory was made inaccessible (PROT_NONE): reads would crash

    @classmethod
    def anonymous(cls, mem_size: int, layouts: list[RegionLayout] | None = None) -> "GuestMemory":
        regions = []
        try:
            for layout in layouts or x86_layout(mem_size):
                addr = _mmap(0, layout.size, RW, lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE, -1, 0,
                             f"anonymous guest memory {layout.name}, {layout.size // MiB} MiB")
                regions.append(Region(layout, addr, "anon"))
                if TRANSPARENT_HUGE_PAGES:  # THP is "madvise" on these hosts; QEMU backs its RAM this way too
                    lib.vmm_madvise(ffi.cast("void *", addr), layout.size, lib.MADV_HUGEPAGE)
        except Exception:
            cls(regions).close()
            raise
        return cls(regions)

    @classmethod
    def from_file(cls, fd: int, layouts: list[RegionLayout], shared: bool = False) -> "GuestMemory":
        """Map a memory file (or memfd): MAP_PRIVATE so the guest's writes never reach the file."""
        flags = (lib.MAP_SHARED if shared else lib.MAP_PRIVATE) | lib.MAP_NORESERVE
        regions = []
        try:
            for layout in layouts:
                addr = _mmap(0, layout.size, RW, flags, fd, layout.file_offset, f"memory file region {layout.name}")
                regions.append(Region(layout, addr, "file", fd))
        except Exception:
            cls(regions).close()
            raise
        return cls(regions)

    def remap_file(self, fd: int, shared: bool = False) -> None:
        """Slide a memory file under the existing mappings (MAP_FIXED), keeping host addresses and KVM slots."""
        flags = (lib.MAP_SHARED if shared else lib.MAP_PRIVATE) | lib.MAP_NORESERVE | lib.MAP_FIXED
        for region in self.regions:
            _mmap(region.host_addr, region.size, RW, flags, fd, region.layout.file_offset, f"remap {region.name}")
            region.backing, region.fd = "file", fd

    def layouts(self) -> list[RegionLayout]:
        return [r.layout for r in self.regions]

    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        if self.inaccessible_reason:
            raise ConfigError(f"guest memory is no longer accessible: {self.inaccessible_reason}")
        for region in self.regions:
            start = region.guest_phys_addr
            if start <= gpa and gpa + length <= start + region.size:
                return region, gpa - start
        raise ConfigError(f"guest-physical range {gpa:#x}+{length:#x} is outside guest memory")

    def contains(self, gpa: int, length: int) -> bool:
        return any(r.guest_phys_addr <= gpa and gpa + length <= r.guest_phys_addr + r.size for r in self.regions)

    def host_pointer(self, gpa: int, length: int = 1):
        region, offset = self._locate(gpa, length)
        return ffi.cast("char *", region.host_addr + offset)

    def read(self, gpa: int, length: int) -> bytes:
        pointer = self.host_pointer(gpa, length)
        if self.backend is None:
            return ffi.unpack(pointer, length)
        # Served memory: copy through the kernel, so a page the server cannot give fails with an error
        # instead of a SIGSEGV in this process (see vmm_self_read).
        out = ffi.new("char[]", length)
        check(lib.vmm_self_read(out, pointer, length), f"read of guest memory at {gpa:#x}")
        return ffi.unpack(out, length)

    def write(self, gpa: int, data: bytes) -> None:
        pointer = self.host_pointer(gpa, len(data))
        if self.backend is None:
            ffi.memmove(pointer, data, len(data))
        else:
            check(lib.vmm_self_write(pointer, data, len(data)), f"write of guest memory at {gpa:#x}")
        self.note_host_write(gpa, len(data))

    def note_host_write(self, gpa: int, length: int) -> None:
        """Pages the VMM wrote (here, or in C through a host pointer): KVM's dirty log does not see them."""
        if self.host_dirty_pages is not None and length:
            self.host_dirty_pages.update(range(gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE + 1))

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        for region in self.regions:
            if region.host_addr:
                lib.vmm_munmap(ffi.cast("void *", region.host_addr), region.size)
                region.host_addr = 0
