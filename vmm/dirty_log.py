"""Dirty-page logging for Diff snapshots, two ways KVM offers: the per-slot bitmap (KVM_GET_DIRTY_LOG) and the
per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING). Both give guest page numbers written since the last ``take()``;
bench/dirty_log.py measures which is faster here and MachineConfig.dirty_log picks one.
"""
import threading

from vmm.memory import PAGE_SIZE
from vmm.native import check, ffi, ioctl_ptr, ioctl_val, lib

RING_ENTRIES = 4096  # 64 KiB per vCPU; a full ring exits to the VMM, which harvests it and goes on
GFN_BYTES = 16  # sizeof(struct kvm_dirty_gfn)
SLOT_SHIFT = 48


def _pages_from_bitmap(bitmap: bytes, first_page: int) -> list[int]:
    words = len(bitmap) // 8
    out = ffi.new("uint64_t[]", words * 64)
    n = lib.vmm_bitmap_to_pages(ffi.from_buffer("uint64_t[]", bitmap), words, first_page, out, words * 64)
    return list(ffi.unpack(out, n))


class BitmapDirtyLog:
    """KVM_GET_DIRTY_LOG per memory slot (which also write-protects the pages again)."""
    kind = "bitmap"

    def __init__(self, vm, memory):
        self.vm, self.memory = vm, memory

    def close(self) -> None:
        """Nothing of its own to free (the ring's close unmaps its rings)."""

    def take(self) -> set[int]:
        pages = set()
        for slot, region in enumerate(self.memory.regions):
            bitmap = self.vm.get_dirty_log(slot, region.size // PAGE_SIZE)
            pages.update(_pages_from_bitmap(bitmap, region.guest_phys_addr // PAGE_SIZE))
        return pages


class RingDirtyLog:
    """Per-vCPU rings of dirty GFNs, shared with the kernel; harvested entries are reset with
    KVM_RESET_DIRTY_RINGS. Must be enabled on the VM before its first vCPU exists (``enable``)."""
    kind = "ring"

    @staticmethod
    def enable(vm) -> None:
        cap = ffi.new("struct kvm_enable_cap *")
        cap.cap, cap.args[0] = lib.KVM_CAP_DIRTY_LOG_RING, RING_ENTRIES * GFN_BYTES
        ioctl_ptr(vm.fd, lib.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)")

    def __init__(self, vm, vcpus, memory):
        self.vm, self.memory = vm, memory
        self.lock = threading.Lock()
        self.pending = set()  # harvested on a ring-full exit, not yet taken
        self.rings = []
        err = ffi.new("long *")
        for vcpu in vcpus:
            ptr = lib.vmm_mmap(ffi.NULL, RING_ENTRIES * GFN_BYTES, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED,
                               vcpu.fd, lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE, err)
            check(err[0], f"mmap(dirty ring of vCPU {vcpu.index})")
            self.rings.append((ffi.cast("struct kvm_dirty_gfn *", ptr), ffi.new("uint32_t *")))
        self.region_first_page = [r.guest_phys_addr // PAGE_SIZE for r in memory.regions]

    def harvest(self) -> None:
        """Collect every ring's dirty entries into ``pending`` and hand the entries back to KVM (any thread)."""
        out = ffi.new("uint64_t[]", RING_ENTRIES)
        with self.lock:
            for ring, fetch_index in self.rings:
                while True:
                    n = lib.vmm_harvest_dirty_ring(ring, RING_ENTRIES, fetch_index, out, RING_ENTRIES)
                    for entry in ffi.unpack(out, n):
                        slot = entry >> SLOT_SHIFT
                        self.pending.add(self.region_first_page[slot] + (entry & ((1 << SLOT_SHIFT) - 1)))
                    if n < RING_ENTRIES:
                        break
            ioctl_val(self.vm.fd, lib.KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")

    def take(self) -> set[int]:
        self.harvest()
        with self.lock:
            pages, self.pending = self.pending, set()
        return pages

    def close(self) -> None:
        for ring, _ in self.rings:
            lib.vmm_munmap(ring, RING_ENTRIES * GFN_BYTES)
        self.rings = []


__all__ = ["BitmapDirtyLog", "RingDirtyLog"]
