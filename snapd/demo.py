"""`snapd demo`: the whole snapshot-and-restore path on the built-in hello guest, as `make demo` runs it.

    snapd demo [--mem-mib 256] [--clones 5] [--work-dir DIR]

Boots the guest and takes a Full snapshot; starts `snapd serve` in its own process (as a scheduler sees it);
registers the snapshot (a compressed, deduplicated base image); restores clones one request each, every one
answering its first invocation in the restore's reply; invokes them again; shows what the clones share and what
each one costs; deletes everything. Every reply is verified (request hash, count, a generation per clone), and
the run fails if any is wrong.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

from snapd.cli import CliError, EXIT_FAILED

MIB = 1 << 20
GAP_S = 0.02  # between restores: the pool refills its prepared worker, as it would between a scheduler's requests


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive.__name__ = "whole number >= 1"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="snapshot the built-in guest, serve it as an image, restore clones")
    p.add_argument("--mem-mib", type=_positive, default=256, help="guest memory (default 256)")
    p.add_argument("--clones", type=_positive, default=5, help="clones to restore (default 5, at most 64)")
    p.add_argument("--work-dir", default=None,
                   help="keep the snapshot, image and daemon state here (default: a temporary directory, removed)")
    p.set_defaults(func=_demo)


def _interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does: the daemon stopped, the work directory removed


def _demo(args) -> int:
    signal.signal(signal.SIGTERM, _interrupted)
    if args.clones > 64:
        raise CliError(f"--clones {args.clones}: at most 64 (the demo's daemon is started with that limit)")
    if args.work_dir is not None:
        if os.path.exists(args.work_dir) and os.listdir(args.work_dir):
            raise CliError(f"--work-dir {args.work_dir}: not empty (the demo writes a snapshot and an image there)")
        os.makedirs(args.work_dir, exist_ok=True)
        return _run(args, args.work_dir)
    work = tempfile.mkdtemp(prefix="snapd-demo-")
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: str) -> int:
    from snapd.client import SnapdError
    from snapd.daemon_process import DaemonProcess, DaemonStartError, PoolNotWarmError
    from vmm.errors import VmmError
    from vmm.snapshot import snapshot_builtin_guest

    print(f"snapd demo: the built-in hello guest, {args.mem_mib} MiB, 1 vCPU (work directory {work})")
    t0 = time.perf_counter()
    try:
        state, mem = snapshot_builtin_guest(work, args.mem_mib, "workload=hello", "hello")
    except VmmError as exc:
        raise CliError(f"booting and snapshotting the guest failed: {exc}", EXIT_FAILED) from None
    print(f"1. booted the guest and took a Full snapshot in {(time.perf_counter() - t0) * 1e3:.0f} ms: "
          f"{os.path.getsize(mem) / MIB:.0f} MiB memory file, {os.path.getsize(state) / 1024:.1f} KiB state file")
    try:
        with DaemonProcess(os.path.join(work, "state"), "--pool-size", "1", "--max-clones", "64",
                           "--log-level", "error", prepared=1, import_roots=[work]) as daemon:
            print(f"2. started `snapd serve` (pid {daemon.process.pid}, API on {daemon.socket_path})")
            return _with_daemon(args, daemon.client, state, mem)
    except (DaemonStartError, PoolNotWarmError) as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    except SnapdError as exc:
        raise CliError(f"the daemon refused: {exc}", EXIT_FAILED) from None


def _with_daemon(args, client, state: str, mem: str) -> int:
    from snapd.client import SnapdError
    from snapd.daemon_process import wait_pool
    from snapd.image import BaseImage
    from vmm import workloads

    t0 = time.perf_counter()
    record = client.register_image(state, mem)
    image = record["id"]
    stats = BaseImage.open(record["image_path"]).stats()
    print(f"3. registered the snapshot as image {image} in {(time.perf_counter() - t0) * 1e3:.0f} ms:")
    print(f"   {stats.nchunks} {record['codec']} chunks of {stats.chunk_size // 1024} KiB, "
          f"{stats.mem_size / MIB:.0f} MiB stored in {_size(stats.stored_bytes)} "
          f"({stats.zero_fraction:.1%} zero chunks, {stats.dup_fraction:.1%} duplicates)")
    wait_pool(client, 1, prepared=1)
    print(f"4. restored {args.clones} clones, one POST /v1/clones each, {GAP_S * 1e3:.0f} ms apart "
          f"(each answers its first invocation in the same reply):")
    print(f"   {'clone':<18} {'pid':>7} {'request':>10} {'daemon':>9}  first reply (verified)")
    clones, generations, failures = [], set(), 0
    try:
        for i in range(args.clones):
            request = workloads.hello_request(f"demo clone {i}")
            t1 = time.perf_counter()
            try:
                (clone,) = client.create_clones(image, payload=request)
            except SnapdError as exc:
                raise CliError(f"restoring clone {i} failed: {exc}", EXIT_FAILED) from None
            elapsed_ms = (time.perf_counter() - t1) * 1e3
            clones.append(clone)
            reply = workloads.verify_hello(request, clone["result"], 1)
            generations.add(reply.generation)
            print(f"   {clone['id']:<18} {clone['pid']:>7} {elapsed_ms:>7.2f} ms {clone['restore_us'] / 1e3:>6.2f} ms"
                  f"  hello #{reply.count} generation={reply.generation:016x} random={reply.random:016x}")
            time.sleep(GAP_S)
        if len(generations) != len(clones):
            print("   error: two clones got the same generation id")
            failures += 1
        for clone in clones:
            request = workloads.hello_request(f"again {clone['id']}")
            workloads.verify_hello(request, client.invoke(clone["id"], request), 2)
        print(f"5. invoked every clone again through POST /v1/clones/ID/invoke: {len(clones)} verified replies "
              f"(hello #2), {len(generations)} distinct generations")
        _print_memory(client.metric_samples(), image, len(clones), stats.mem_size)
    except workloads.ReplyMismatch as exc:
        raise CliError(f"a clone answered wrongly: {exc}", EXIT_FAILED) from None
    finally:
        for clone in clones:
            try:
                client.delete_clone(clone["id"])
            except SnapdError:  # best effort: the daemon stops them all as it exits
                pass
    client.delete_image(image)
    print(f"7. deleted the {len(clones)} clones and the image; stopping the daemon")
    return EXIT_FAILED if failures else 0


def _size(n: float) -> str:
    return f"{n / MIB:.2f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB"


def _print_memory(samples: dict[str, float], image: str, n: int, mem_size: int) -> None:
    shared = samples.get(f'snapd_shared_bytes{{image="{image}"}}', 0)
    faults = samples.get(f'snapd_page_faults{{image="{image}",kind="faults"}}', 0)
    lane = samples.get("snapd_lane_restores_total", 0)
    invocations = samples.get("snapd_lane_invocations_total", 0)
    pss = samples.get("snapd_clone_pss_bytes", 0) / n
    private = samples.get("snapd_clone_private_bytes", 0) / n
    print(f"6. memory: the {n} clones share one copy of the image, {_size(shared)} of {mem_size / MIB:.0f} MiB paged "
          f"in on first touch")
    print(f"   (userfaultfd faults served: {faults:.0f}); per clone {_size(pss)} proportional set size, {_size(private)} "
          f"private")
    print(f"   (its own writes and the VMM's heap). Answered in C by the lane: {lane:.0f} of {n} restores, "
          f"{invocations:.0f} of {n} later invocations")
