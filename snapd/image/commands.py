"""`snapd image build|inspect|verify|squash` (registered by snapd.cli)."""
from __future__ import annotations

import argparse
import contextlib
import os

from snapd.cli import EXIT_FAILED, EXIT_USAGE, CliError, print_info

_UNITS = {"k": 1 << 10, "m": 1 << 20}


def _size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512K, 2M, 65536)") from None


@contextlib.contextmanager
def _build_errors():
    """An image or layer build's errors as one-line CLI errors: bad parameters exit as usage errors, a build
    that failed (I/O, a corrupt parent) with EXIT_FAILED."""
    from snapd.image import ImageError
    from snapd.image.codecs import CodecError
    try:
        yield
    except (ValueError, CodecError) as exc:
        raise CliError(str(exc)) from None
    except ImageError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None


def register(subparsers) -> None:
    image = subparsers.add_parser("image", help="build, inspect and verify compressed base images")
    sub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="build a base image from a snapshot memory file, or (--parent) a diff layer "
                                     "from a Diff snapshot's state and memory files")
    b.add_argument("mem_file", metavar="SNAPSHOT_MEM_FILE | DIFF_STATE")
    b.add_argument("diff_mem", metavar="DIFF_MEM", nargs="?", default=None,
                   help="with --parent: the Diff snapshot's memory file")
    b.add_argument("--parent", default=None, metavar="BASE_IMAGE",
                   help="build a diff layer over this image (its identity is recorded and checked on use)")
    b.add_argument("--store", default=None, help="chunk store directory (default: ./chunks next to the image)")
    b.add_argument("--out", default=None, help="image index path (default: SNAPSHOT_MEM_FILE.img)")
    b.add_argument("--chunk-size", type=_size, default=None, help="power of two, 4K..2M (default 512K)")
    b.add_argument("--codec", choices=("lz4", "zstd", "raw"), default=None)
    b.add_argument("--level", type=int, default=None, help="codec level (lz4: >=3 is HC; zstd: 1..22)")
    b.add_argument("--source-id", default="", help="name of the snapshot, recorded in the image")
    b.add_argument("--state", default=None, metavar="STATE_FILE",
                   help="the snapshot's state file: the memory file must be its own (identity trailer), and its "
                        "snapshot id is recorded as the source id")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    i = sub.add_parser("inspect", help="show size, compression ratio, zero and duplicate fractions")
    i.add_argument("image")
    i.add_argument("--store", default=None, help="chunk store directory, if moved")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)

    v = sub.add_parser("verify", help="check every chunk's checksum and content hash")
    v.add_argument("image")
    v.add_argument("--store", default=None, help="chunk store directory, if moved")
    v.set_defaults(func=_verify)

    q = sub.add_parser("squash", help="merge a diff layer and its parents into one base image")
    q.add_argument("image", metavar="TOP_IMAGE")
    q.add_argument("--out", required=True, help="the new base image's index path")
    q.add_argument("--store", default=None, help="chunk store of the result (default: the top layer's)")
    q.set_defaults(func=_squash)


def _build(args) -> int:
    from tqdm import tqdm

    from snapd.image import DEFAULT_CHUNK_SIZE, DEFAULT_CODEC, build_image

    if args.parent is not None:
        return _build_layer(args)
    if args.diff_mem is not None:
        raise CliError("a second input file (DIFF_MEM) only goes with --parent BASE_IMAGE")
    if not os.path.isfile(args.mem_file):
        raise CliError(f"{args.mem_file}: no such file")
    if args.state is not None:
        state = _checked_pair(args.state, args.mem_file)
        if state.parent_snapshot_id:
            raise CliError(f"{args.state} is a Diff snapshot: build a layer with --parent BASE_IMAGE")
        args.source_id = args.source_id or state.snapshot_id
    out = args.out or args.mem_file + ".img"
    store = args.store or os.path.join(os.path.dirname(os.path.abspath(out)), "chunks")
    total = os.path.getsize(args.mem_file)
    with tqdm(total=total, unit="B", unit_scale=True, desc="build", disable=args.quiet or None) as bar:
        def progress(done: int, _total: int) -> None:
            bar.update(done - bar.n)
        with _build_errors():
            r = build_image(args.mem_file, store, out, chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
                            codec=args.codec or DEFAULT_CODEC, level=args.level, progress=progress,
                            source_id=args.source_id)
    print(f"{r.image_path}: {r.nchunks} chunks, {r.zero_chunks} zero, {r.dup_chunks} already stored, "
          f"{r.new_chunks} new ({r.new_stored_bytes} bytes added to {store})")
    return 0


def _open(args):
    from snapd.image import BaseImage, ImageError
    try:
        return BaseImage.open(args.image, store=args.store)
    except ImageError as exc:
        raise CliError(str(exc), EXIT_USAGE if "not found" in exc.detail else EXIT_FAILED) from None


def _inspect(args) -> int:
    from snapd.image.codecs import NAMES
    img = _open(args)
    s = img.stats()
    h = img.header
    info = {"image": img.path, "store": img.store_dir, "version": "%d.%d" % h.version,
            "source_id": h.source_id, "content_id": h.content_id.hex(), "mem_size": s.mem_size,
            "chunk_size": s.chunk_size, "nchunks": s.nchunks, "codec": NAMES.get(h.codec, str(h.codec)),
            "level": h.level, "stored_bytes": s.stored_bytes, "ratio": round(s.ratio, 3) if s.stored_bytes else None,
            "zero_fraction": round(s.zero_fraction, 4), "duplicate_fraction": round(s.dup_fraction, 4),
            "unique_chunks": s.unique_chunks, "chunks_per_codec": s.codecs}
    if h.is_layer:
        info["parent"] = img.parent.path
        info["parent_content_id"] = h.parent_id.hex()
        info["layers"] = len(img.chain())
    print_info(info, args.json)
    return 0


def _verify(args) -> int:
    from snapd.image import ImageError
    img = _open(args)
    try:
        img.verify()
    except ImageError as exc:
        raise CliError(f"verify failed: {exc}", EXIT_FAILED) from None
    finally:
        img.close()
    print(f"{img.path}: OK ({img.nchunks} chunks)")
    return 0


def _build_layer(args) -> int:
    from snapd.image import DEFAULT_CODEC
    from snapd.image.layers import build_layer

    if args.diff_mem is None:
        raise CliError("--parent needs two inputs: DIFF_STATE DIFF_MEM")
    if args.chunk_size is not None:
        raise CliError("a layer has its parent's chunk size; drop --chunk-size")
    for path in (args.parent, args.mem_file, args.diff_mem):
        if not os.path.isfile(path):
            raise CliError(f"{path}: no such file")
    state = _checked_pair(args.mem_file, args.diff_mem)
    if not state.parent_snapshot_id:
        raise CliError(f"{args.mem_file} is a Full snapshot: build a base image from its memory file instead")
    out = args.out or args.diff_mem + ".img"
    store = args.store or os.path.join(os.path.dirname(os.path.abspath(out)), "chunks")
    with _build_errors():
        r = build_layer(args.parent, args.diff_mem, state.diff_page_runs, store, out,
                        source_id=args.source_id or state.snapshot_id, parent_snapshot_id=state.parent_snapshot_id,
                        codec=args.codec or DEFAULT_CODEC, level=args.level)
    print(f"{r.image_path}: layer over {args.parent}: {r.changed_chunks} chunks changed, {r.stored_chunks} "
          f"differ from the parent, {r.new_chunks} new ({r.new_stored_bytes} bytes added to {store})")
    return 0


def _checked_pair(state_path: str, mem_path: str):
    """The snapshot at ``state_path``, its memory file at ``mem_path`` checked to be its own."""
    from vmm.snapshot import SnapshotError, open_memory_file, read_snapshot
    try:
        state = read_snapshot(state_path)
        os.close(open_memory_file(mem_path, state, state_path))
    except SnapshotError as exc:
        raise CliError(str(exc)) from None
    return state


def _squash(args) -> int:
    from snapd.image import ImageError
    from snapd.image.layers import squash_image
    if not os.path.isfile(args.image):
        raise CliError(f"{args.image}: no such file")
    try:
        r = squash_image(args.image, args.out, args.store)
    except ImageError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    print(f"{r.image_path}: {r.nchunks} chunks from {r.layers} images, {r.copied_chunks} copied between stores")
    return 0
