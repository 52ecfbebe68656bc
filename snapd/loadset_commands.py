"""`snapd loadset inspect|merge` (registered by snapd.cli). Recording needs a running VM: see
PageServer.serve(record=True) / stop_recording and docs/page-server.md."""
from __future__ import annotations


from snapd.cli import EXIT_FAILED, CliError, print_info


def register(subparsers) -> None:
    ls = subparsers.add_parser("loadset", help="inspect and merge loading sets (recorded working sets)")
    sub = ls.add_subparsers(dest="loadset_command", metavar="ACTION", required=True)

    i = sub.add_parser("inspect", help="show a loading set; with --image, check that it fits that image")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--image", default=None, help="image index to check the loading set against")
    i.add_argument("--json", action="store_true")
    i.add_argument("--chunks", action="store_true", help="list every chunk index, in order")
    i.set_defaults(func=_inspect)

    m = sub.add_parser("merge", help="union of loading sets of one image, each chunk at its earliest position")
    m.add_argument("files", metavar="FILE", nargs="+")
    m.add_argument("--out", required=True)
    m.set_defaults(func=_merge)


def _load(path: str):
    from snapd.loadset import LoadingSet, LoadingSetError
    try:
        return LoadingSet.load(path)
    except LoadingSetError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None


def _inspect(args) -> int:
    from snapd.image import BaseImage, ImageError
    from snapd.loadset import LoadingSetError
    ls = _load(args.file)
    info = {"file": args.file, "image_identity": ls.identity.hex(), "chunk_size": ls.chunk_size,
            "mem_size": ls.mem_size, "chunks": len(ls.chunks), "bytes": ls.bytes_covered(),
            "fraction_of_memory": round(ls.bytes_covered() / ls.mem_size, 4) if ls.mem_size else 0.0,
            "first_chunks": list(ls.chunks[:16])}
    if args.chunks:
        info["order"] = list(ls.chunks)
    if args.image:
        try:
            img = BaseImage.open(args.image)
        except ImageError as exc:
            raise CliError(str(exc), EXIT_FAILED) from None
        try:
            ls.check_image(img)
            info["fits_image"] = args.image
        except LoadingSetError as exc:
            raise CliError(str(exc), EXIT_FAILED) from None
        finally:
            img.close()
    print_info(info, args.json)
    return 0


def _merge(args) -> int:
    from snapd.loadset import LoadingSetError, merge
    sets = [_load(f) for f in args.files]
    try:
        merged = merge(sets)
    except LoadingSetError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    merged.save(args.out)
    print(f"{args.out}: {len(merged.chunks)} chunks from {len(sets)} loading sets")
    return 0
