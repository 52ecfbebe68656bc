"""Diff snapshots: only the pages written since a parent snapshot, in a sparse file the size of guest memory
(Firecracker's layout), and ``rebase_memory`` to lay such a diff over its parent's memory file.

These write guest memory only; the identity trailer that ends every memory file and the publishing of the state
and memory files as one unit are vmm.snapshot's."""
import os

from vmm.errors import VmmError
from vmm.memory import PAGE_SIZE, GuestMemory

COPY_PIECE = 1 << 20
_ZERO_PIECE = bytes(COPY_PIECE)


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


def write_diff_memory(memory: GuestMemory, out, file_runs: list[tuple[int, int]], data_size: int) -> None:
    """Into ``out`` (a binary file, empty): ``data_size`` bytes holding only the given runs of pages (holes
    elsewhere)."""
    by_offset = {r.layout.file_offset: r for r in memory.regions}
    for first, count in file_runs:
        offset = first * PAGE_SIZE
        region = next(r for base, r in by_offset.items() if base <= offset < base + r.size)
        gpa = region.guest_phys_addr + offset - region.layout.file_offset
        out.seek(offset)
        out.write(memoryview(memory.read(gpa, count * PAGE_SIZE)))
    out.truncate(data_size)


def rebase_memory(base_fd: int, diff_fd: int, diff_page_runs, out, data_size: int) -> None:
    """Into ``out`` (a binary file, empty): the first ``data_size`` bytes of the base memory file with the diff's
    pages laid over them (all-zero MiBs of the base stay holes)."""
    for offset in range(0, data_size, COPY_PIECE):
        length = min(COPY_PIECE, data_size - offset)
        piece = os.pread(base_fd, length, offset)
        if len(piece) != length:
            raise VmmError(f"the base memory file ended at byte {offset + len(piece)} while it was read")
        if piece == _ZERO_PIECE[:length]:
            out.seek(length, os.SEEK_CUR)
        else:
            out.write(piece)
    for first, count in diff_page_runs:
        start, length = first * PAGE_SIZE, count * PAGE_SIZE
        if count <= 0 or start + length > data_size:
            raise VmmError(f"diff page run ({first}, {count}) is outside {data_size} bytes of memory")
        data = os.pread(diff_fd, length, start)
        if len(data) != length:
            raise VmmError(f"the diff memory file ended at byte {start + len(data)} while it was read")
        out.seek(start)
        out.write(data)
    out.truncate(data_size)
