"""Time to first reply after a restore, four ways in one run, plus Diff-snapshot cost.

    PYTHONPATH=. .venv/bin/python -m bench.prefetch [--quick] [--reps N]

Modes (one kv or scan guest snapshot per case, one base image, 512 KiB lz4 chunks):
- resident_file: the memory file mapped MAP_PRIVATE (File backend), in the page cache, loaded and every page
  pre-faulted by the VMM before the clock starts; only resume + first reply are timed;
- resident_anon: anonymous memory fully installed (an eager restore, not timed); only resume + first reply
  are timed: the lower bound;
- lazy: page server, faults only;
- prefetch: page server with the loading set recorded on one earlier lazy restore (another request),
  streamed per VM (decompressed on the loop as the VM runs: serve(..., stage=False));
- staged: the same loading set staged ahead of the restore (serve(mode="prefetch", loading_set=...) decompresses
  it into a staging buffer when the image is served; the staging finishes before the clock, as it does when a
  scheduler registers the image ahead of requests) and installed from the buffer with large UFFDIO_COPY batches;
- eager: page server installs the whole image before ready.
Time to first reply = load_snapshot_* call + resume + first invoke; the reply is verified (not timed).
The page server and image (packs in the page cache) are set up before the clock starts, as a daemon holds them.

Shared-clone variant (the daemon's restore path, in-process as snapd/pool/worker.py does it): the image is
a shared memfd (add_image(shared=True)); a clone is a PrebuiltVm (built before the clock) whose memory is the
memfd mapped MAP_PRIVATE and registered MISSING with the page server; timed = PrebuiltVm.restore + uffd
handshake + resume + first reply. A fresh image (empty memfd) per restore, except where said:
- shared_resident: the memfd fully populated before the clock (every chunk pre-filled);
- shared_lazy: empty memfd, every chunk faulted by the clone;
- shared_prefill: the loading set pre-filled into the memfd before the clock (Image.prefill, as the daemon
  does when an image is registered with a loading set);
- shared_prefill_populate: shared_prefill, and the clone maps the set's pages into its page tables before
  resuming (populate_loading_set: MADV_POPULATE_READ, timed), as a warm worker could do ahead of a request;
- shared_prefill_race: the pre-fill started at the same moment as the restore (racing the clone's faults);
- shared_eager: the page server fills the whole image into the memfd before ready (timed).
The shared loading set is recorded on the memfd of one earlier lazy clone (Image.recorded_loading_set).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench.common import machine_line, table
from snapd.image.builder import build_image
from snapd.loadset import LoadingSet
from snapd.pageserver import ChunkTable, PageServer, populate_loading_set
from snapd.uffd import ffi as uffd_ffi
from snapd.uffd import lib as uffd_lib
from vmm import workloads
from vmm.config import MachineConfig
from vmm.machine import Microvm
from vmm.prebuilt import PrebuiltVm, VmShape
from vmm.snapshot import (create_snapshot, load_snapshot_file_backed, load_snapshot_uffd_backed, read_snapshot,
                          resume_restored)
from vmm.uffd_backend import UffdBackend

QUIET = lambda data: None  # noqa: E731
CHUNK = 512 << 10


def request_for(workload: str, mib: int, seed: int) -> bytes:
    if workload == "kv":  # random lookups; enough of them to touch every 512 KiB chunk of the table
        return workloads.kv_request(max(1000, mib * 64), seed)
    return workloads.scan_request(0, mib)  # the whole array


def verify(workload: str, mib: int, request: bytes, reply: bytes) -> None:
    if workload == "kv":
        workloads.verify_kv(1, mib, request, reply)
    else:
        workloads.verify_scan(1, mib, request, reply)


def prepare(workdir: str, workload: str, mib: int, mem_mib: int, chunk: int = CHUNK) -> str:
    d = os.path.join(workdir, f"{workload}{mib}-{mem_mib}-{chunk >> 10}k")
    os.makedirs(d)
    m = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args=f"workload={workload} {workload}_mib={mib}"),
                serial_sink=QUIET)
    try:
        m.boot()
        m.wait_ready(60)
        m.pause()
        create_snapshot(m, f"{d}/vm.state", f"{d}/vm.mem")
    finally:
        m.close()
    build_image(f"{d}/vm.mem", f"{d}/store", f"{d}/vm.img", chunk_size=chunk)
    return d


def prefault(machine) -> None:
    """Read every page from C (GIL released), so the page tables of the VMM's mapping are populated."""
    for r in machine.memory.regions:
        uffd_lib.snapd_touch(r.host_addr, r.size, 4096, 0, uffd_ffi.NULL)


def first_reply(load, workload, mib, seed) -> float:
    """ms from load() (timed; it returns the running machine) to the verified first reply; closes the machine."""
    request = request_for(workload, mib, seed)
    t0 = time.perf_counter()
    machine = load()
    try:
        reply = machine.invoke(request, timeout=60)
        t = time.perf_counter() - t0
        verify(workload, mib, request, reply)
    finally:
        machine.close()
    return t * 1e3


def resumed_first_reply(machine, workload: str, mib: int, seed: int) -> float:
    """ms from resuming a machine restored (paused) before the clock to its verified first reply; closes it."""
    def resume():
        resume_restored(machine)
        return machine
    return first_reply(resume, workload, mib, seed)


def measure_case(server: PageServer, d: str, workload: str, mib: int, reps: int) -> dict:
    table_ = ChunkTable.from_base_image(f"{d}/vm.img")
    image = server.add_image(table_)
    state = f"{d}/vm.state"
    # Record: one lazy restore up to the first reply.
    rec = server.serve(f"{d}/rec.sock", image, "lazy", record=True)
    first_reply(lambda: load_snapshot_uffd_backed(state, rec.sock_path, serial_sink=QUIET), workload, mib, 1)
    loading_set = server.stop_recording(rec.wait_for_vms(1)[0])
    loading_set.save(f"{d}/vm.img.loadset")
    sockets = {mode: server.serve(f"{d}/{mode}.sock", image, mode,
                                  loading_set=f"{d}/vm.img.loadset" if mode == "prefetch" else None, stage=False)
               for mode in ("lazy", "prefetch", "eager")}
    sockets["staged"] = server.serve(f"{d}/staged.sock", image, "prefetch", loading_set=f"{d}/vm.img.loadset")
    stage = sockets["staged"].stage.wait(120)  # ahead of the restore

    def resident():
        fd_mem = f"{d}/vm.mem"
        with open(fd_mem, "rb") as f:  # page cache warm
            while f.read(8 << 20):
                pass
        m = load_snapshot_file_backed(state, fd_mem, resume=False, serial_sink=QUIET)
        prefault(m)
        return m

    times: dict[str, list[float]] = {k: [] for k in ("resident", "resident_anon", "lazy", "prefetch", "staged",
                                                     "eager")}
    staged_stats = []
    for rep in range(reps):
        seed = 100 + rep
        # resident_anon: anonymous memory fully installed (eager) before the clock; resume + first reply only
        times["resident_anon"].append(resumed_first_reply(
            load_snapshot_uffd_backed(state, sockets["eager"].sock_path, resume=False, serial_sink=QUIET),
            workload, mib, seed))
        # resident: the File backend, loaded and pre-faulted before the clock; resume + first reply only
        times["resident"].append(resumed_first_reply(resident(), workload, mib, seed))
        for mode, listener in sockets.items():
            n_before = len(listener.vm_ids)
            times[mode].append(first_reply(
                lambda: load_snapshot_uffd_backed(state, listener.sock_path, serial_sink=QUIET), workload, mib, seed))
            if mode == "staged":
                staged_stats.append(server.stats(listener.wait_for_vms(n_before + 1)[-1]))
    for listener in sockets.values():
        listener.close()  # frees the staging buffer
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"loadset_chunks": len(loading_set.chunks), "loadset_mib": loading_set.bytes_covered() / (1 << 20),
            "stage_ms": stage.ns / 1e6,
            "stage_faults": statistics.median(s.stage_faults for s in staged_stats),
            "stage_ioctls": statistics.median(s.stage_ioctls for s in staged_stats),
            **med}


SHARED_MODES = ("shared_resident", "shared_lazy", "shared_prefill", "shared_prefill_populate", "shared_prefill_race",
                "shared_eager")


def clone_first_reply(state, shape: VmShape, image, sock_path: str, workload: str, mib: int, seed: int,
                      before=None, populate: LoadingSet | None = None, prepared: bool = False) -> float:
    """One clone of a shared image, as a warm worker restores it: ms from restore to the verified first reply.
    before(): called right before the clock starts (e.g. start a pre-fill). populate: map that loading set's
    pre-filled pages into the clone's page tables before resuming (timed unless prepared). prepared: as snapd's
    prepared workers serve a clone, the restore, populate and the guest's way to FN_NEXT happen before the
    clock, which then times the request's invocation only."""
    prebuilt = PrebuiltVm(shape, serial_sink=QUIET)  # built before the clock, as the warm pool does
    request = request_for(workload, mib, seed)
    backend = []
    try:
        if before is not None:
            before()
        t0 = time.perf_counter()
        machine = prebuilt.restore(state, image.memfd, shared=False,
                                   before_state=lambda m: backend.append(UffdBackend(m.memory, sock_path)),
                                   resume=False)
        if populate is not None:
            for r in machine.memory.regions:
                populate_loading_set(r.host_addr, r.size, populate, r.layout.file_offset)
        machine.fnport.ready.clear()
        resume_restored(machine)
        if prepared:
            if not machine.fnport.ready.wait(60):
                raise RuntimeError("the prepared clone did not reach FN_NEXT")
            t0 = time.perf_counter()
        reply = machine.invoke(request, timeout=60)
        t = time.perf_counter() - t0
        verify(workload, mib, request, reply)
    finally:
        prebuilt.close()
        for b in backend:
            b.close()
    return t * 1e3


def measure_shared(d: str, workload: str, mib: int, reps: int, huge_dir: str | None = None) -> dict:
    state = read_snapshot(f"{d}/vm.state")
    shape = VmShape(state.config.vcpu_count, state.config.mem_size_mib)
    table_ = ChunkTable.from_base_image(f"{d}/vm.img")
    table_.loading_set = ""  # no automatic pre-fill from IMAGE.loadset here: each mode decides
    everything = LoadingSet(table_.identity, table_.chunk_size, table_.mem_size, tuple(range(len(table_.chunks))))
    times: dict[str, list[float]] = {k: [] for k in SHARED_MODES}
    faults: dict[str, list[int]] = {k: [] for k in SHARED_MODES}
    with PageServer() as server:
        # Record on the memfd of one lazy clone (another request than the timed ones).
        image = server.add_image(table_, shared=True, huge_dir=huge_dir)
        rec = server.serve(f"{d}/shrec.sock", image, "lazy")
        clone_first_reply(state, shape, image, rec.sock_path, workload, mib, 1)
        loading_set = image.recorded_loading_set()
    for rep in range(reps):
        seed = 100 + rep
        for mode in SHARED_MODES:
            with PageServer() as server:  # a fresh memfd per restore; freed with the server
                image = server.add_image(table_, shared=True, huge_dir=huge_dir)
                before = None
                if mode == "shared_resident":
                    image.prefill(everything, wait=True)
                elif mode in ("shared_prefill", "shared_prefill_populate"):
                    image.prefill(loading_set, wait=True)
                elif mode == "shared_prefill_race":
                    before = lambda: image.prefill(loading_set)  # noqa: E731
                listener = server.serve(f"{d}/{mode}.sock", image, "eager" if mode == "shared_eager" else "lazy")
                times[mode].append(clone_first_reply(
                    state, shape, image, listener.sock_path, workload, mib, seed, before,
                    loading_set if mode == "shared_prefill_populate" else None))
                faults[mode].append(server.stats(listener.wait_for_vms(1)[0]).faults)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"loadset_chunks": len(loading_set.chunks), "loadset_mib": loading_set.bytes_covered() / (1 << 20),
            **med, **{f"{k}_faults": statistics.median(v) for k, v in faults.items()}}


PREPARED_MODES = ("prepared_resident", "prepared_lazy", "prepared_prefetch")


def measure_prepared(d: str, workload: str, mib: int, reps: int, huge_dir: str | None = None) -> dict:
    """resident: the whole image in the shared file; lazy: empty file, faults through the page server;
    prefetch: the loading set pre-filled into the file. All three with the clone prepared ahead as snapd's
    prepared workers do it (restored, run to FN_NEXT; nothing mapped ahead: mapping the set into the clone's
    page tables first measured the same); modes interleaved rep by rep."""
    state = read_snapshot(f"{d}/vm.state")
    shape = VmShape(state.config.vcpu_count, state.config.mem_size_mib)
    table_ = ChunkTable.from_base_image(f"{d}/vm.img")
    table_.loading_set = ""
    everything = LoadingSet(table_.identity, table_.chunk_size, table_.mem_size, tuple(range(len(table_.chunks))))
    with PageServer() as server:
        image = server.add_image(table_, shared=True, huge_dir=huge_dir)
        rec = server.serve(f"{d}/prec.sock", image, "lazy")
        clone_first_reply(state, shape, image, rec.sock_path, workload, mib, 1)
        loading_set = image.recorded_loading_set()
    times: dict[str, list[float]] = {k: [] for k in PREPARED_MODES}
    for rep in range(reps):
        for mode in PREPARED_MODES:
            with PageServer() as server:
                image = server.add_image(table_, shared=True, huge_dir=huge_dir)
                fill = {"prepared_resident": everything, "prepared_prefetch": loading_set}.get(mode)
                if fill is not None:
                    image.prefill(fill, wait=True)
                listener = server.serve(f"{d}/{mode}.sock", image, "lazy")
                times[mode].append(clone_first_reply(state, shape, image, listener.sock_path, workload, mib,
                                                     200 + rep, prepared=True))
    return {k: statistics.median(v) for k, v in times.items()}


def measure_diff(workdir: str, mem_mib: int, dirty_fraction: float) -> dict:
    """Full vs Diff snapshot of a guest with `dirty_fraction` of its memory dirtied since the last one."""
    d = os.path.join(workdir, f"diff-{mem_mib}")
    os.makedirs(d)
    m = Microvm(MachineConfig(mem_size_mib=mem_mib, boot_args="workload=scan scan_mib=64", track_dirty_pages=True),
                serial_sink=QUIET)
    try:
        m.boot()
        m.wait_ready(60)
        m.pause()
        full = create_snapshot(m, f"{d}/full.state", f"{d}/full.mem")
        npages = int(mem_mib * 256 * dirty_fraction)
        step = (mem_mib * 256) // npages
        page = os.urandom(4096)
        for k in range(npages):  # scattered over all of memory (the VMM writes; tracked like guest writes)
            m.memory.write(k * step * 4096, page)
        t0 = time.perf_counter()
        diff = create_snapshot(m, f"{d}/diff.state", f"{d}/diff.mem", snapshot_type="Diff")
        diff_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        create_snapshot(m, f"{d}/full2.state", f"{d}/full2.mem")
        full_ms = (time.perf_counter() - t0) * 1e3
    finally:
        m.close()
    used = lambda p: os.stat(p).st_blocks * 512  # noqa: E731  allocated bytes (files are sparse)
    return {"mem_mib": mem_mib, "dirty_pages": npages, "full_ms": full_ms, "diff_ms": diff_ms,
            "full_mib": used(f"{d}/full2.mem") / (1 << 20), "diff_mib": used(f"{d}/diff.mem") / (1 << 20),
            "first_full_ms": full.memory_ms + full.state_ms, "diff_memory_ms": diff.memory_ms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefetch", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small cases only")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-kib", type=int, action="append", help="image chunk size(s) in KiB (default 512)")
    p.add_argument("--no-diff", action="store_true", help="skip the Diff snapshot measurement")
    p.add_argument("--no-single", action="store_true", help="skip the single-VM (private memory) modes")
    p.add_argument("--no-shared", action="store_true", help="skip the shared-clone modes")
    p.add_argument("--no-prepared", action="store_true", help="skip the prepared-clone modes")
    p.add_argument("--huge", action="store_true",
                   help="shared and prepared modes also with the image on 2 MiB pages (snapd.hugetmpfs; needs "
                        "root and --chunk-kib a multiple of 2048), each case run both ways in one run")
    args = p.parse_args(argv)
    backings = [("memfd", None)]
    if args.huge:  # before any thread: the private mount namespace must be every thread's
        from snapd.hugetmpfs import HugeTmpfsError, mount_private_huge_tmpfs
        if any(kib % 2048 for kib in args.chunk_kib or [CHUNK >> 10]):
            p.error("--huge needs --chunk-kib multiples of 2048: an image of smaller chunks is never put on huge "
                    "pages, so its 'huge' rows would measure a memfd")
        try:
            backings.append(("huge", mount_private_huge_tmpfs(tempfile.mkdtemp(prefix="bench-huge-"))))
        except HugeTmpfsError as exc:
            p.error(f"--huge: {exc}")
    cases = ([("kv", 8, 256), ("scan", 8, 256)] if args.quick else
             [("kv", 8, 256), ("kv", 64, 1024), ("scan", 16, 512), ("scan", 64, 1024)])
    rows, shared_rows, prepared_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-prefetch-", dir=os.environ.get("BENCH_TMP")) as workdir, \
            PageServer() as server:
        for (workload, mib, mem_mib), chunk_kib in [(c, k) for c in cases for k in (args.chunk_kib or [512])]:
            d = prepare(workdir, workload, mib, mem_mib, chunk_kib << 10)
            case = [workload, f"{mib} MiB / {mem_mib} MiB", chunk_kib]
            if not args.no_single:
                r = measure_case(server, d, workload, mib, args.reps)
                rows.append([*case, r["loadset_chunks"], round(r["loadset_mib"], 1),
                             r["resident"], r["resident_anon"], r["lazy"], r["prefetch"], r["staged"], r["eager"],
                             r["prefetch"] / r["resident_anon"], r["staged"] / r["resident_anon"],
                             r["lazy"] / r["prefetch"], r["lazy"] / r["staged"],
                             r["stage_ms"], f'{int(r["stage_ioctls"])}/{int(r["stage_faults"])}'])
                print(rows[-1], flush=True)
            for backing, huge_dir in backings if not args.no_shared else ():
                r = measure_shared(d, workload, mib, args.reps, huge_dir)
                shared_rows.append([*case, backing, r["loadset_chunks"], round(r["loadset_mib"], 1),
                                    *(r[m] for m in SHARED_MODES),
                                    r["shared_prefill"] / r["shared_resident"], r["shared_lazy"] / r["shared_prefill"],
                                    r["shared_lazy"] / r["shared_prefill_populate"],
                                    r["shared_lazy"] / r["shared_prefill_race"],
                                    "/".join(str(int(r[f"{m}_faults"])) for m in SHARED_MODES)])
                print(shared_rows[-1], flush=True)
            for backing, huge_dir in backings if not args.no_prepared else ():
                r = measure_prepared(d, workload, mib, args.reps, huge_dir)
                prepared_rows.append([*case, backing, *(r[m] for m in PREPARED_MODES),
                                      r["prepared_prefetch"] / r["prepared_resident"],
                                      r["prepared_lazy"] / r["prepared_prefetch"]])
                print(prepared_rows[-1], flush=True)
        print(f"\n{machine_line()}; median of {args.reps}; ms to the first verified reply\n")
        if rows:
            print(table(["workload", "working set / guest", "chunk KiB", "loadset chunks", "loadset MiB",
                         "resident_file_ms", "resident_anon_ms", "lazy_ms", "prefetch_ms", "staged_ms", "eager_ms",
                         "prefetch/resident_anon", "staged/resident_anon", "lazy/prefetch", "lazy/staged",
                         "staging_ms (untimed)", "staged ioctls/faults"], rows))
            print()
        if shared_rows:
            print(table(["workload", "working set / guest", "chunk KiB", "backing", "loadset chunks", "loadset MiB",
                         *(f"{m}_ms" for m in SHARED_MODES), "prefill/resident", "lazy/prefill",
                         "lazy/prefill_populate", "lazy/prefill_race", "uffd faults (same order)"], shared_rows))
        if prepared_rows:
            print("\nPrepared clones (snapd's prepared workers): ms from the request to the first verified reply "
                  "(the restore itself was done ahead, off the clock)\n")
            print(table(["workload", "working set / guest", "chunk KiB", "backing", *(f"{m}_ms" for m in PREPARED_MODES),
                         "prefetch/resident", "lazy/prefetch"], prepared_rows))
        if args.no_diff:
            return 0
        diff = measure_diff(workdir, 256 if args.quick else 1024, 0.01)
        print()
        print(table(list(diff), [list(diff.values())]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
