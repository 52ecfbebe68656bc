"""Debian's cloud kernel for tests and benches: download once into .cache/linux, unpack, extract vmlinux.

`python -m tests.linux_kernel` (from the repository root) fetches it and prints the bzImage and vmlinux paths.
Also builds a tiny newc initramfs in Python (no cpio binary needed).
"""
import bz2
import glob
import gzip
import io
import lzma
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass

from tests.conftest import ROOT

CACHE_DIR = os.path.join(ROOT, ".cache", "linux")
METAPACKAGE = "linux-image-cloud-amd64"
APT_TIMEOUT_S = 300

# bzImage setup header fields used to find the compressed payload (Documentation/arch/x86/boot.rst).
HDR_SETUP_SECTS, HDR_MAGIC, HDR_VERSION, HDR_PAYLOAD_OFFSET = 0x1F1, 0x202, 0x206, 0x248
SECTOR = 512
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # every block but the last decompresses to exactly 8 MiB


class KernelUnavailable(Exception):
    """The kernel could not be downloaded or unpacked; the message says why (the tests skip with it)."""


@dataclass(frozen=True)
class KernelFiles:
    package: str
    bzimage: str
    vmlinux: str


def _run(cmd: list[str], cwd: str | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from None
    if done.returncode != 0:
        raise KernelUnavailable(f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return done.stdout


def resolve_kernel_package(metapackage: str = METAPACKAGE) -> str:
    """The real image package behind the metapackage (e.g. linux-image-6.1.0-56-cloud-amd64)."""
    for line in _run(["apt-cache", "depends", metapackage]).splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-") and name.endswith("-cloud-amd64"):
            return name
    raise KernelUnavailable(f"`apt-cache depends {metapackage}` names no linux-image-*-cloud-amd64 package")


def _lz4_legacy(payload: bytes) -> bytes:
    import lz4.block
    out, pos = [], 4
    while pos + 4 <= len(payload):
        size = struct.unpack_from("<I", payload, pos)[0]
        if size == LZ4_LEGACY_MAGIC:  # concatenated streams
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(payload):
            break  # the kernel appends the decompressed size (4 bytes) after the last block
        out.append(lz4.block.decompress(payload[pos + 4:pos + 4 + size], uncompressed_size=LZ4_LEGACY_BLOCK))
        pos += 4 + size
    return b"".join(out)


def _zstd(payload: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)).read()


# The compression magics scripts/extract-vmlinux looks for, with a Python decompressor for each.
DECOMPRESSORS = (
    (b"\x1f\x8b\x08", gzip.decompress),
    (b"\xfd7zXZ\x00", lambda data: lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)),
    (b"\x5d\x00\x00", lambda data: lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)),
    (b"\x28\xb5\x2f\xfd", _zstd),
    (b"\x02\x21\x4c\x18", _lz4_legacy),
    (b"BZh", bz2.decompress),
)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage: the payload the setup header points at (protocol 2.08+), decompressed."""
    if bzimage[HDR_MAGIC:HDR_MAGIC + 4] != b"HdrS" or struct.unpack_from("<H", bzimage, HDR_VERSION)[0] < 0x0208:
        raise KernelUnavailable("not a bzImage with boot protocol 2.08+ (no payload_offset field)")
    setup_sects = bzimage[HDR_SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", bzimage, HDR_PAYLOAD_OFFSET)
    start = (setup_sects + 1) * SECTOR + offset
    payload = bzimage[start:start + length]
    for magic, decompress in DECOMPRESSORS:
        if payload.startswith(magic):
            try:
                vmlinux = decompress(payload)
            except Exception as exc:
                raise KernelUnavailable(f"payload (magic {magic.hex()}) did not decompress: {exc}") from None
            if not vmlinux.startswith(b"\x7fELF"):
                raise KernelUnavailable(f"payload (magic {magic.hex()}) decompressed to something not ELF")
            return vmlinux
    raise KernelUnavailable(f"unknown compression in bzImage payload (starts {payload[:6].hex()})")


def debian_cloud_kernel(cache_dir: str = CACHE_DIR) -> KernelFiles:
    """Download (once) Debian's cloud kernel package, unpack it and extract vmlinux; return the paths."""
    try:
        package = resolve_kernel_package()
    except KernelUnavailable:
        cached = sorted(glob.glob(os.path.join(cache_dir, "linux-image-*-cloud-amd64", "vmlinux")))
        if not cached:
            raise
        package = os.path.basename(os.path.dirname(cached[-1]))  # apt cannot resolve now: use the last unpack
    unpacked = os.path.join(cache_dir, package)
    vmlinux_path = os.path.join(unpacked, "vmlinux")
    if not os.path.exists(vmlinux_path):
        os.makedirs(cache_dir, exist_ok=True)
        debs = glob.glob(os.path.join(cache_dir, f"{package}_*.deb"))
        if not debs:
            _run(["apt-get", "download", package], cwd=cache_dir)
            debs = glob.glob(os.path.join(cache_dir, f"{package}_*.deb"))
        if not debs:
            raise KernelUnavailable(f"apt-get download {package} left no .deb in {cache_dir}")
        staging = unpacked + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        _run(["dpkg-deb", "-x", debs[0], staging])
        with open(_one(staging, "boot/vmlinuz-*"), "rb") as bzimage:
            vmlinux = extract_vmlinux(bzimage.read())
        with open(os.path.join(staging, "vmlinux"), "wb") as out:
            out.write(vmlinux)
        for unused in ("lib", "usr"):  # ~90 MiB of modules and docs no test boots
            shutil.rmtree(os.path.join(staging, unused), ignore_errors=True)
        shutil.rmtree(unpacked, ignore_errors=True)
        os.rename(staging, unpacked)  # only a complete unpack gets the final name
    return KernelFiles(package, _one(unpacked, "boot/vmlinuz-*"), vmlinux_path)


def _one(directory: str, pattern: str) -> str:
    found = glob.glob(os.path.join(directory, pattern))
    if len(found) != 1:
        raise KernelUnavailable(f"expected one {pattern} in {directory}, found {len(found)}")
    return found[0]


def newc_archive(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A cpio 'newc' archive (the initramfs format) of {path: (mode, content)}, with the TRAILER!!! entry."""
    out = bytearray()
    for ino, (name, (mode, data)) in enumerate([*files.items(), ("TRAILER!!!", (0, b""))], start=1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += bytes(-len(out) % 4)  # the name and the data each end on a 4-byte boundary
        out += data + bytes(-len(data) % 4)
    return bytes(out)


INIT_SCRIPT = b"#!/bin/sh\necho init reached\n"
S_IFREG_0755 = 0o100755


def write_initrd(path: str) -> str:
    """A one-file initramfs: /init, a shell script (the kernel stops long before running it on PVM hosts)."""
    with open(path, "wb") as out:
        out.write(newc_archive({"init": (S_IFREG_0755, INIT_SCRIPT)}))
    return path


if __name__ == "__main__":
    try:
        files = debian_cloud_kernel()
    except KernelUnavailable as exc:
        print(f"kernel unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"package {files.package}\nbzImage {files.bzimage}\nvmlinux {files.vmlinux}")
