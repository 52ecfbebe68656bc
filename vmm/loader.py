"""ELF64 guest loader: copies PT_LOAD segments to their physical addresses and returns the entry point."""
import struct
from dataclasses import dataclass

from vmm.errors import GuestImageError
from vmm.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EM_X86_64, PT_LOAD = 2, 1, 62, 1
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
MAX_IMAGE_SIZE = 256 << 20


@dataclass(frozen=True)
class LoadedImage:
    entry: int
    end: int  # first guest-physical byte after the highest segment


def load_elf(path: str, memory: GuestMemory) -> LoadedImage:
    try:
        with open(path, "rb") as image_file:
            image = image_file.read(MAX_IMAGE_SIZE + 1)
    except OSError as exc:
        raise GuestImageError(f"cannot read guest image {path}: {exc.strerror}") from None
    if len(image) > MAX_IMAGE_SIZE:
        raise GuestImageError(f"guest image {path} is larger than {MAX_IMAGE_SIZE >> 20} MiB")
    if len(image) < EHDR.size or image[:4] != ELF_MAGIC:
        raise GuestImageError(f"guest image {path} is not an ELF file")
    ident, _type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = EHDR.unpack_from(image)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise GuestImageError(f"guest image {path} is not a little-endian x86-64 ELF64 file")
    if phentsize != PHDR.size or phoff + phnum * PHDR.size > len(image):
        raise GuestImageError(f"guest image {path} has a damaged program header table")
    end = 0
    for i in range(phnum):
        p_type, _pflags, offset, _vaddr, paddr, filesz, memsz, _align = PHDR.unpack_from(image, phoff + i * PHDR.size)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(image):
            raise GuestImageError(f"guest image {path}: segment {i} points outside the file")
        if not memory.contains(paddr, memsz):
            raise GuestImageError(
                f"guest image {path}: segment {i} at {paddr:#x}+{memsz:#x} does not fit in "
                f"{memory.size >> 20} MiB of guest memory")
        memory.write(paddr, image[offset:offset + filesz])
        end = max(end, paddr + memsz)
    if end == 0:
        raise GuestImageError(f"guest image {path} has no loadable segment")
    return LoadedImage(entry=entry, end=end)
