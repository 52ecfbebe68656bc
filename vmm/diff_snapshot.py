"""Diff snapshots: only the pages written since a parent snapshot, in a sparse file the size of guest memory
(Firecracker's layout), and ``rebase`` to lay such a diff over its parent's memory file."""
import os

from snapd.atomic import atomic_file
from vmm.errors import VmmError
from vmm.memory import PAGE_SIZE, GuestMemory


def page_runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs."""
    runs = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1][1] += 1
        else:
            runs.append([page, 1])
    return [(first, count) for first, count in runs]


def file_page_of(memory: GuestMemory, guest_page: int) -> int:
    gpa = guest_page * PAGE_SIZE
    for region in memory.regions:
        if region.guest_phys_addr <= gpa < region.guest_phys_addr + region.size:
            return (region.layout.file_offset + gpa - region.guest_phys_addr) // PAGE_SIZE
    raise VmmError(f"dirty page {guest_page:#x} is outside guest memory")


def write_diff_memory_file(memory: GuestMemory, path: str, file_runs: list[tuple[int, int]]) -> None:
    """A sparse file the size of guest memory holding only the given runs of pages (holes elsewhere)."""
    by_offset = {r.layout.file_offset: r for r in memory.regions}
    total = sum(r.size for r in memory.regions)
    with atomic_file(path) as out:
        for first, count in file_runs:
            offset = first * PAGE_SIZE
            region = next(r for base, r in by_offset.items() if base <= offset < base + r.size)
            gpa = region.guest_phys_addr + offset - region.layout.file_offset
            out.seek(offset)
            out.write(memoryview(memory.read(gpa, count * PAGE_SIZE)))
        out.truncate(total)


def rebase(base_mem_path: str, diff_mem_path: str, diff_page_runs, out_path: str) -> None:
    """Write base memory with the diff's pages laid over it (the result loads with the diff's state file)."""
    with open(base_mem_path, "rb") as base, open(diff_mem_path, "rb") as diff, atomic_file(out_path) as out:
        size = os.fstat(base.fileno()).st_size
        if os.fstat(diff.fileno()).st_size != size:
            raise VmmError(f"diff memory file {diff_mem_path} and base {base_mem_path} differ in size")
        while True:
            piece = base.read(1 << 20)
            if not piece:
                break
            out.write(piece)
        for first, count in diff_page_runs:
            diff.seek(first * PAGE_SIZE)
            out.seek(first * PAGE_SIZE)
            out.write(diff.read(count * PAGE_SIZE))
        out.truncate(size)
