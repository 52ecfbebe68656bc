"""Snapshot create and load for one microVM: state file (snapd.snapfile) + raw memory file, one unit.

The memory file is guest memory followed by a 4 KiB identity trailer (a random memory id, the snapshot's id and
the memory's size); the state file names that identity (``MicrovmState.memory_file``), and a load reads the
trailer (one pread) and refuses a memory file that is not the state file's own. Both files are written under
temporary names in their own directories, fsynced, and published memory first, then state (snapd.atomic.AtomicPair;
docs/snapshot-format.md argues why every crash point is safe). A snapshot whose two paths name one file is refused.
"""
import dataclasses
import os
import re
import time
import uuid
from dataclasses import dataclass

from snapd.atomic import AtomicPair
from snapd.snapfile import (DEFAULT_MAX_SIZE, MEMORY_TRAILER_SIZE, SnapshotFormatError, decode_state, encode_state,
                            load_state, pack_memory_trailer, pack_state_file, read_memory_trailer, read_state_fd,
                            unpack_state_file)
from vmm.config import MiB, MachineConfig
from vmm.devices.fnport import FunctionPort
from vmm.devices.i8042 import I8042
from vmm.devices.serial import Serial, stdout_sink
from vmm.errors import ConfigError, VmmError
from vmm.machine import PAUSED, Microvm
from vmm.diff_snapshot import file_page_of, page_runs, rebase_memory, write_diff_memory
from vmm.memory import PAGE_SIZE, GuestMemory, RegionLayout, x86_layout
from vmm.native import check, ffi, lib
from vmm.persist import (SNAPSHOT_KIND, DeviceStates, MachineConfigState, MemoryFileState, MemoryRegionState,
                         MicrovmState, restore_vcpu, restore_vm, save_vcpu, save_vm)

COPY_PIECE = 1 << 20
_ID = re.compile(r"[0-9a-f]{32}")  # a 128-bit id in lowercase hex (snapshot ids, memory ids)


class SnapshotError(VmmError):
    """A snapshot cannot be created or loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class SnapshotTimings:
    state_ms: float
    memory_ms: float


def capture_state(machine: Microvm, parent_snapshot_id: str = "", diff_page_runs=()) -> MicrovmState:
    if machine.state != PAUSED:
        raise SnapshotError(f"the VM must be paused to snapshot it (it is {machine.state.lower()})")
    config = machine.config
    memory = tuple(MemoryRegionState(r.name, r.guest_phys_addr, r.size, r.layout.file_offset)
                   for r in machine.memory.regions)
    return MicrovmState(
        kind=SNAPSHOT_KIND,
        snapshot_id=uuid.uuid4().hex,
        parent_snapshot_id=parent_snapshot_id,
        diff_page_runs=tuple(diff_page_runs),
        config=MachineConfigState(config.vcpu_count, config.mem_size_mib, config.kernel_image, config.boot_args),
        memory=memory,
        memory_file=new_memory_identity(max(r.file_offset + r.size for r in memory)),
        vm=save_vm(machine.vm),
        vcpus=tuple(save_vcpu(machine.kvm, vcpu) for vcpu in machine.vcpus),
        devices=DeviceStates(machine.serial.save(), machine.i8042.save(), machine.fnport.save()),
    )


def new_memory_identity(data_size: int) -> MemoryFileState:
    """A fresh identity for a memory file holding ``data_size`` bytes of guest memory: a random 128-bit id."""
    return MemoryFileState(os.urandom(16).hex(), data_size)


def write_memory_trailer(out, state: MicrovmState) -> None:
    """The identity trailer at the end of ``out`` (a binary file holding the state's guest memory): written at
    offset ``data_size``, the file then ends right after it."""
    ident = state.memory_file
    out.seek(ident.data_size)
    out.write(pack_memory_trailer(bytes.fromhex(ident.id), bytes.fromhex(state.snapshot_id), ident.data_size))
    out.truncate(ident.data_size + MEMORY_TRAILER_SIZE)


def write_memory(memory: GuestMemory, out) -> None:
    """Guest memory into ``out`` (a binary file object, from its current position, which must be the start):
    regions back to back, all-zero MiBs skipped (holes), truncated at the end (the identity trailer is
    ``write_memory_trailer``'s)."""
    if memory.inaccessible_reason:
        raise SnapshotError(f"cannot snapshot guest memory: {memory.inaccessible_reason}")
    piece = None  # one buffer for memory served by a page server, reused piece after piece
    for region in memory.regions:
        view = memoryview(region.buffer())
        anonymous = 1 if region.backing == "anon" else 0
        for offset in range(0, region.size, COPY_PIECE):
            length = min(COPY_PIECE, region.size - offset)
            if region.backing == "uffd":  # untouched pages hold image data: read (and fault in) everything
                piece = piece if piece is not None else ffi.new("char[]", COPY_PIECE)
                check(lib.vmm_self_read(piece, ffi.cast("char *", region.host_addr + offset), length),
                      f"read of guest memory at {region.guest_phys_addr + offset:#x}")
                if lib.vmm_is_zero(piece, length):
                    out.seek(length, os.SEEK_CUR)  # a hole, as for the other backings
                else:
                    out.write(ffi.buffer(piece, length))
            elif not lib.vmm_range_has_data(ffi.cast("char *", region.host_addr + offset), length, anonymous):
                out.seek(length, os.SEEK_CUR)
            else:
                out.write(view[offset:offset + length])
    out.truncate(out.tell())


def _capture(machine: Microvm, snapshot_type: str) -> MicrovmState:
    """The state of a paused machine for a ``snapshot_type`` snapshot (its dirty log restarted)."""
    if machine.io_left_pending:  # a vCPU is mid-instruction: its saved state would not be resumable
        raise SnapshotError("the VM was paused with a port-I/O exit pending; resume it before a snapshot")
    if snapshot_type == "Diff":
        if not machine.config.track_dirty_pages:
            raise SnapshotError("a Diff snapshot needs dirty page tracking: boot or load with track_dirty_pages")
        if not machine.snapshot_id:
            raise SnapshotError("a Diff snapshot needs a parent: take a Full snapshot first (or load one)")
        runs = page_runs(sorted(file_page_of(machine.memory, p) for p in machine.take_dirty_pages()))
        return capture_state(machine, parent_snapshot_id=machine.snapshot_id, diff_page_runs=runs)
    if snapshot_type == "Full":
        state = capture_state(machine)
        if machine.config.track_dirty_pages:
            machine.take_dirty_pages()  # the next Diff is relative to this snapshot
        return state
    raise SnapshotError(f"snapshot_type must be 'Full' or 'Diff', not {snapshot_type!r}")


def check_snapshot_paths(snapshot_path: str, mem_file_path: str) -> None:
    """Refuse a state path and a memory path that name one file: the same final path (after resolving the
    directories), or two names of one existing file (a hard link, a symbolic link)."""
    def final(path: str) -> str:
        try:
            head, tail = os.path.split(os.path.abspath(path))
            head = os.path.realpath(head)
        except OSError:  # a jailed VMM may not ask for its working directory or read a link: the names as given
            head, tail = os.path.split(os.path.normpath(path))
        return os.path.join(head, tail)

    same = final(snapshot_path) == final(mem_file_path)
    if not same:
        try:
            same = os.path.samefile(snapshot_path, mem_file_path)
        except (OSError, ValueError):
            pass
    if same:
        raise SnapshotError(f"snapshot_path {snapshot_path!r} and mem_file_path {mem_file_path!r} name the same "
                            "file: a snapshot's state file and memory file are two files")


def _write_error(exc: OSError, snapshot_path: str, mem_file_path: str) -> SnapshotError:
    where = (f": {exc.filename}" if exc.filename
             else f" (snapshot_path {snapshot_path}, mem_file_path {mem_file_path})")
    return SnapshotError(f"cannot write snapshot: {exc.strerror or exc}{where}")


def create_snapshot(machine: Microvm, snapshot_path: str, mem_file_path: str,
                    snapshot_type: str = "Full") -> SnapshotTimings:
    """Full: all of guest memory. Diff: only pages written since the machine's last snapshot (or the snapshot it
    was restored from); needs track_dirty_pages.

    The two files are one unit (module doc): their temporary files are made first (a path that cannot be
    written fails before any memory is), then written, fsynced and published memory first, state last. On any
    failure neither is published and no temporary file is left."""
    check_snapshot_paths(snapshot_path, mem_file_path)
    try:
        pair = AtomicPair(mem_file_path, snapshot_path)
    except OSError as exc:
        raise _write_error(exc, snapshot_path, mem_file_path) from None
    try:
        t0 = time.perf_counter()
        state = _capture(machine, snapshot_type)
        t1 = time.perf_counter()
        write_snapshot_files(machine.memory, state, pair.files[1], pair.files[0])
        pair.publish()
    except OSError as exc:
        pair.discard()
        raise _write_error(exc, snapshot_path, mem_file_path) from None
    except BaseException:
        pair.discard()
        raise
    machine.snapshot_id = state.snapshot_id
    t2 = time.perf_counter()
    return SnapshotTimings(state_ms=(t1 - t0) * 1e3, memory_ms=(t2 - t1) * 1e3)


def write_snapshot_files(memory: GuestMemory, state: MicrovmState, state_out, mem_out) -> None:
    """A captured snapshot into two empty binary files: guest memory (all of it, or a Diff's pages) and its
    identity trailer into ``mem_out``, the state file into ``state_out``. Nothing is fsynced or renamed."""
    if memory.inaccessible_reason:
        raise SnapshotError(f"cannot snapshot guest memory: {memory.inaccessible_reason}")
    if state.parent_snapshot_id:
        write_diff_memory(memory, mem_out, list(state.diff_page_runs), state.memory_file.data_size)
    else:
        write_memory(memory, mem_out)
    write_memory_trailer(mem_out, state)
    state_out.write(pack_state_file(encode_state(state)))


def create_snapshot_fds(machine: Microvm, state_fd: int, mem_fd: int) -> SnapshotTimings:
    """A Full snapshot written into two open, empty files (from offset 0), for a process that may not open paths
    (a clone's worker: snapd's daemon creates the files beneath its snapshot root, hands the descriptors over,
    and fsyncs and renames them when both are complete). Nothing is fsynced or renamed here; the descriptors stay
    open (the caller's)."""
    t0 = time.perf_counter()
    state = _capture(machine, "Full")
    t1 = time.perf_counter()
    try:
        for fd in (state_fd, mem_fd):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(mem_fd, "wb", closefd=False) as mem_out, os.fdopen(state_fd, "wb", closefd=False) as out:
            write_snapshot_files(machine.memory, state, out, mem_out)
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot: {exc.strerror}") from None
    machine.snapshot_id = state.snapshot_id
    t2 = time.perf_counter()
    return SnapshotTimings(state_ms=(t1 - t0) * 1e3, memory_ms=(t2 - t1) * 1e3)


def read_snapshot(snapshot_path: str) -> MicrovmState:
    try:
        state = load_state(snapshot_path, MicrovmState)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot file {snapshot_path} does not exist") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot file {snapshot_path}: {exc.strerror}") from None
    except SnapshotFormatError as exc:
        raise SnapshotError(str(exc)) from None
    return check_snapshot(state, snapshot_path)


def read_snapshot_fd(fd: int, name: str) -> tuple[MicrovmState, bytes]:
    """(state, the file's bytes) of an open state file, read once from the descriptor (size bounded by the state
    file format's limit before anything is read); ``name`` is what messages call it. No message quotes the file's
    bytes."""
    try:
        data = read_state_fd(fd, name, DEFAULT_MAX_SIZE)
        _, body = unpack_state_file(data, name, DEFAULT_MAX_SIZE)
        state = decode_state(body, MicrovmState)
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot file {name}: {exc.strerror}") from None
    except SnapshotFormatError as exc:
        text = str(exc)
        raise SnapshotError(text if text.startswith(name) else f"{name}: {text}") from None
    return check_snapshot(state, name), data


def check_snapshot(state: MicrovmState, name: str) -> MicrovmState:
    if state.kind != SNAPSHOT_KIND:  # the kind it names is not quoted: it is the file's bytes
        raise SnapshotError(f"{name} is not a '{SNAPSHOT_KIND}' snapshot")
    if len(state.vcpus) != state.config.vcpu_count or not state.vcpus:
        raise SnapshotError(f"{name}: holds {len(state.vcpus)} vCPU states for a "
                            f"{state.config.vcpu_count}-vCPU machine")
    if not state.memory or any(r.size <= 0 or r.file_offset < 0 for r in state.memory):
        raise SnapshotError(f"{name}: its memory layout is empty or has a region of no size or before the file")
    if not _ID.fullmatch(state.snapshot_id) or not _ID.fullmatch(state.memory_file.id) or \
            not (state.parent_snapshot_id == "" or _ID.fullmatch(state.parent_snapshot_id)):
        raise SnapshotError(f"{name}: its snapshot, parent or memory file id is not a 128-bit id in hex")
    if state.memory_file.data_size != memory_file_size(state) or state.memory_file.data_size % PAGE_SIZE:
        raise SnapshotError(f"{name}: the memory file it names holds {state.memory_file.data_size} bytes of memory, "
                            f"its layout needs {memory_file_size(state)} (a whole number of pages)")
    # The layout is the one the VMM gives a machine of that size (vmm.memory.x86_layout; every snapshot is of such
    # a machine): regions, guest addresses and file offsets a load maps and hands to KVM as they are.
    try:
        expected = x86_layout(state.config.mem_size_mib * MiB)
    except ConfigError:
        expected = None
    if region_layouts(state) != expected:
        raise SnapshotError(f"{name}: its memory layout is not that of a {state.config.mem_size_mib}-MiB machine")
    _check_page_runs(state, name)
    return state


def _check_page_runs(state: MicrovmState, name: str) -> None:
    """A Diff's page runs: ascending, not overlapping, inside its memory file; a Full snapshot has none."""
    if not state.parent_snapshot_id:
        if state.diff_page_runs:
            raise SnapshotError(f"{name}: a Full snapshot with diff page runs")
        return
    pages, end = state.memory_file.data_size // PAGE_SIZE, 0
    for first, count in state.diff_page_runs:
        if first < end or count <= 0 or first + count > pages:
            raise SnapshotError(f"{name}: its diff page runs are not ascending runs of pages inside its "
                                f"{pages}-page memory file")
        end = first + count


def region_layouts(state: MicrovmState) -> list[RegionLayout]:
    return [RegionLayout(r.name, r.guest_phys_addr, r.size, r.file_offset) for r in state.memory]


def memory_file_size(state: MicrovmState) -> int:
    """The bytes of guest memory the snapshot's layout needs: where the memory file's identity trailer starts
    (the file is this plus MEMORY_TRAILER_SIZE bytes)."""
    return max(r.file_offset + r.size for r in state.memory)


def check_memory_file(fd: int, state: MicrovmState, state_name: str, mem_name: str) -> None:
    """Refuse (SnapshotError naming both files) an open memory file that is not the one the state file was
    written with: its identity trailer and its size (one fstat and one 4 KiB pread; guest memory is not read).
    A file without a trailer (shorter than the layout, written before format 2, not a memory file) is refused as
    such. No message quotes the memory file's bytes."""
    try:  # the trailer says how much memory precedes it, and read_memory_trailer checks the file's size with it
        trailer = read_memory_trailer(fd, f"memory file {mem_name}")
    except SnapshotFormatError as exc:
        raise SnapshotError(f"{exc}: it cannot be loaded with snapshot file {state_name}") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read memory file {mem_name}: {exc.strerror}") from None
    ident = state.memory_file
    if (trailer.memory_id != bytes.fromhex(ident.id) or trailer.snapshot_id != bytes.fromhex(state.snapshot_id)
            or trailer.data_size != ident.data_size):
        raise SnapshotError(f"memory file {mem_name} is not the memory file of snapshot file {state_name}: its "
                            "identity trailer names other memory (a snapshot's state and memory files are one unit: "
                            "load the two files written together)")


def open_memory_file(mem_file_path: str, state: MicrovmState, snapshot_name: str = "") -> int:
    """A descriptor of the memory file at ``mem_file_path``, checked to be the one ``state`` was written with
    (``check_memory_file``); ``snapshot_name`` is how messages call the state file."""
    try:
        fd = os.open(mem_file_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot open memory file {mem_file_path}: {exc.strerror}") from None
    try:
        check_memory_file(fd, state, snapshot_name or f"of snapshot {state.snapshot_id}", mem_file_path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def machine_config_of(state: MicrovmState, track_dirty_pages: bool = False) -> MachineConfig:
    c = state.config
    return MachineConfig(vcpu_count=c.vcpu_count, mem_size_mib=c.mem_size_mib, kernel_image="", boot_args=c.boot_args,
                         track_dirty_pages=track_dirty_pages)


def refuse_diff(state: MicrovmState, snapshot_path: str) -> None:
    if state.parent_snapshot_id:
        raise SnapshotError(f"{snapshot_path} is a Diff snapshot over {state.parent_snapshot_id}: its memory file "
                            "holds only changed pages; stack it on its base with `snapd image build --parent`")


def restore_into(machine: Microvm, state: MicrovmState, serial_sink=stdout_sink) -> None:
    """Write a snapshot's VM, vCPU and device state into a freshly built machine (memory already mapped)."""
    if len(machine.vcpus) != len(state.vcpus):
        raise SnapshotError(f"the snapshot has {len(state.vcpus)} vCPUs, this VM was built with {len(machine.vcpus)}")
    restore_vm(machine.vm, state.vm)
    for vcpu, vcpu_state in zip(machine.vcpus, state.vcpus):
        restore_vcpu(vcpu, vcpu_state)
    devices = state.devices
    machine.attach_devices(Serial.restore(devices.serial, machine._serial_irq, serial_sink),
                           I8042.restore(devices.i8042, machine._on_reset_request),
                           FunctionPort.restore(devices.fnport, machine.memory, machine._vcpus_must_yield))
    machine.fnport.new_generation()
    machine.snapshot_id = state.snapshot_id


def load_snapshot_file_backed(snapshot_path: str, mem_file_path: str, resume: bool = True,
                              serial_sink=stdout_sink, track_dirty_pages: bool = False) -> Microvm:
    """Restore with the File backend: the memory file mapped MAP_PRIVATE (guest writes never reach it)."""
    state = read_snapshot(snapshot_path)
    refuse_diff(state, snapshot_path)
    fd = open_memory_file(mem_file_path, state, snapshot_path)
    try:
        memory = GuestMemory.from_file(fd, region_layouts(state))
    finally:
        os.close(fd)  # the mapping keeps the file
    try:
        machine = Microvm(machine_config_of(state, track_dirty_pages), serial_sink=serial_sink, memory=memory)
    except ConfigError as exc:
        memory.close()
        raise SnapshotError(f"{snapshot_path}: {exc}") from None
    try:
        restore_into(machine, state, serial_sink)
    except Exception:
        machine.close()
        raise
    machine.state = PAUSED
    if resume:
        resume_restored(machine)
    return machine


def resume_restored(machine: Microvm) -> None:
    """Run a restored machine (starting its vCPU threads if they are not parked yet); each vCPU thread then
    tells kvmclock the guest was paused."""
    for runner in machine.runners:
        runner.kvmclock_ctrl_pending = True  # done by each vCPU thread: the ioctl waits for KVM_RUN to exit
    if machine.runners[0].thread is None:
        machine.start()
    else:
        machine.resume()


def rebase_snapshot(base_mem_path: str, diff_snapshot_path: str, diff_mem_path: str,
                    out_snapshot_path: str, out_mem_path: str) -> None:
    """Lay a Diff snapshot over its parent's memory file, giving a Full snapshot that loads on its own: the diff's
    memory file must be its own (identity trailer), the base's must be the memory of the diff's parent snapshot
    (its trailer names that snapshot). The result is a new pair (a new memory id), published as create_snapshot
    publishes."""
    state = read_snapshot(diff_snapshot_path)
    if not state.parent_snapshot_id:
        raise SnapshotError(f"{diff_snapshot_path} is a Full snapshot; there is nothing to rebase")
    check_snapshot_paths(out_snapshot_path, out_mem_path)
    out = dataclasses.replace(state, parent_snapshot_id="", diff_page_runs=(),
                              memory_file=new_memory_identity(state.memory_file.data_size))
    diff_fd = open_memory_file(diff_mem_path, state, diff_snapshot_path)
    try:
        base_fd = _open_base_memory(base_mem_path, state)
        try:
            pair = AtomicPair(out_mem_path, out_snapshot_path)
            try:
                rebase_memory(base_fd, diff_fd, state.diff_page_runs, pair.files[0], state.memory_file.data_size)
                write_memory_trailer(pair.files[0], out)
                pair.files[1].write(pack_state_file(encode_state(out)))
                pair.publish()
            except BaseException:
                pair.discard()
                raise
        finally:
            os.close(base_fd)
    except OSError as exc:
        raise _write_error(exc, out_snapshot_path, out_mem_path) from None
    finally:
        os.close(diff_fd)


def _open_base_memory(base_mem_path: str, diff: MicrovmState) -> int:
    """The parent's memory file of a Diff snapshot: its trailer names the diff's parent snapshot and its size."""
    try:
        fd = os.open(base_mem_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot open base memory file {base_mem_path}: {exc.strerror}") from None
    try:
        trailer = read_memory_trailer(fd, f"base memory file {base_mem_path}")
        if trailer.snapshot_id != bytes.fromhex(diff.parent_snapshot_id) or \
                trailer.data_size != diff.memory_file.data_size:
            raise SnapshotError(f"base memory file {base_mem_path} is not the memory of snapshot "
                                f"{diff.parent_snapshot_id}, the parent of the Diff snapshot")
    except SnapshotFormatError as exc:
        os.close(fd)
        raise SnapshotError(str(exc)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def load_snapshot_uffd_backed(snapshot_path: str, backend_path: str, resume: bool = True, serial_sink=stdout_sink,
                              track_dirty_pages: bool = False, ready_timeout: float = 30.0,
                              layered: bool = False) -> Microvm:
    """Restore with the Uffd backend: anonymous guest memory whose faults the page server at ``backend_path``
    resolves (lazily, or all before it says ready when it runs in eager mode).

    layered: the snapshot may be a Diff; the page server serves a diff layer stacked on the diff's base image
    (`snapd image build --parent`), so the memory it hands out is whole."""
    from vmm.uffd_backend import UffdBackend, UffdBackendError
    state = read_snapshot(snapshot_path)
    if not layered:
        refuse_diff(state, snapshot_path)
    layouts = region_layouts(state)
    memory = GuestMemory.anonymous(sum(layout.size for layout in layouts), layouts)
    try:
        backend = UffdBackend(memory, backend_path)
        machine = Microvm(machine_config_of(state, track_dirty_pages), serial_sink=serial_sink, memory=memory)
    except BaseException:
        memory.close()
        raise
    try:
        # In eager mode "ready" comes once every chunk is installed, and the guest runs only after it.
        backend.write_while_attaching(lambda: restore_into(machine, state, serial_sink), ready_timeout)
    except BaseException:
        machine.close()
        raise
    backend.set_failure_handler(lambda message: machine.fail(UffdBackendError(message)))
    machine.state = PAUSED
    if resume:
        resume_restored(machine)
    return machine


def snapshot_builtin_guest(directory: str, mem_mib: int, boot_args: str, name: str,
                           vcpus: int = 1, kernel_image: str = "") -> tuple[str, str]:
    """Boot the built-in guest (or ``kernel_image``, a guest that keeps its contract: tests/guests) with
    ``boot_args``, wait for its init phase and snapshot it as NAME.state and NAME.mem in ``directory``; returns
    their paths (the demo, bench/ and the tests start from this)."""
    state, mem = os.path.join(directory, f"{name}.state"), os.path.join(directory, f"{name}.mem")
    machine = Microvm(MachineConfig(vcpu_count=vcpus, mem_size_mib=mem_mib, boot_args=boot_args,
                                    kernel_image=kernel_image), serial_sink=lambda data: None)
    try:
        machine.boot()
        machine.wait_ready(30)
        machine.pause()
        create_snapshot(machine, state, mem)
    finally:
        machine.close()
    return state, mem
