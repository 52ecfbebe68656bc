"""The VMM behind the API: one microVM's configuration, lifecycle, invocations and snapshots.

No HTTP here: each method takes a validated JSON body (vmm.api.fields) and returns a JSON-ready dict or None,
or raises an ApiError. Lifecycle calls hold one lock so a pause cannot race a snapshot; invocations only hold
it to submit, never while they wait for the guest.
"""
import base64
import functools
import json
import logging
import threading
import time
from collections import OrderedDict

from vmm import snapshot as snapshots
from vmm.api.errors import BadRequest, GuestTimeout, NotFound
from vmm.api.fields import decode_base64
from vmm.config import DEFAULT_MEM_MIB, MachineConfig
from vmm.devices.fnport import Invocation
from vmm.devices.serial import stdout_sink
from vmm.errors import ConfigError, VmmError
from vmm.machine import NOT_STARTED, PAUSED, RUNNING, STOPPED, Microvm, shared_kvm

log = logging.getLogger("vmm.api")
APP_NAME = "vmm"
DEFAULT_INSTANCE_ID = "anonymous-instance"
DEFAULT_INVOKE_TIMEOUT_MS = 10_000
MAX_TRACKED_INVOCATIONS = 1024  # replies kept for /invocations/{seq}/wait after they arrived


@functools.cache
def vmm_version() -> str:
    try:
        from importlib.metadata import version
        return version("microvm-snap")
    except Exception:  # not installed (run from the source tree)
        return "0.1.0"


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unsupported(where: str, what: str) -> BadRequest:
    """A field Firecracker's API defines, with a value that asks for something this VMM cannot do."""
    return BadRequest(f"{where}: not supported by this VMM: {what}")


class VmmController:
    def __init__(self, instance_id: str = DEFAULT_INSTANCE_ID, serial_sink=stdout_sink, on_vm_stopped=None):
        self.instance_id = instance_id
        self.serial_sink = serial_sink
        self.on_vm_stopped = on_vm_stopped  # called from a watcher thread with the machine once it stopped
        self.lock = threading.Lock()
        self.machine: Microvm | None = None
        self.machine_config = {"vcpu_count": 1, "mem_size_mib": DEFAULT_MEM_MIB, "smt": False,
                               "track_dirty_pages": False, "huge_pages": "None"}
        self.boot_source = {"kernel_image_path": "", "boot_args": MachineConfig.boot_args, "initrd_path": ""}
        self.configured = False  # boot-specific resources were set: Firecracker then refuses a snapshot load
        self.restored = False
        self.restored_idle = False  # restored, vCPU threads not started yet
        self.tracked: OrderedDict[int, Invocation] = OrderedDict()
        self.adopted = threading.Event()
        threading.Thread(target=self._watch, name="vm-watch", daemon=True).start()

    # -- state
    @property
    def state(self) -> str:
        machine = self.machine
        return machine.state if machine is not None else NOT_STARTED

    def instance_info(self) -> dict:
        return {"id": self.instance_id, "state": self.state, "vmm_version": vmm_version(), "app_name": APP_NAME}

    def version(self) -> dict:
        """GET /version: Firecracker's clients read ``firecracker_version``; this project's version is the answer."""
        return {"firecracker_version": vmm_version()}

    def _require_machine(self) -> Microvm:
        machine = self.machine
        if machine is None:
            raise BadRequest("the VM is not started: PUT /actions InstanceStart or PUT /snapshot/load first")
        if machine.state == STOPPED:
            raise BadRequest(f"the VM is stopped ({machine.stop_reason})")
        return machine

    def _require_not_started(self, what: str) -> None:
        if self.machine is not None:
            raise BadRequest(f"{what} is only allowed before the VM starts (it is {self.state.lower()})")

    # -- configuration
    def _build_config(self, machine_config: dict, boot_source: dict) -> MachineConfig:
        if machine_config.get("smt"):
            raise unsupported("machine-config.smt", "simultaneous multithreading (smt: true); each vCPU is a "
                                                    "core of its own")
        template = machine_config.get("cpu_template", "None")
        if template != "None":
            raise unsupported("machine-config.cpu_template", f"CPU template {template} (only \"None\": the guest "
                                                             "sees the host's CPUID as KVM supports it)")
        if machine_config.get("huge_pages", "None") != "None":
            raise unsupported("machine-config.huge_pages", "\"2M\" (hugetlbfs pages); guest memory is anonymous "
                                                           "memory, on transparent huge pages where the host allows")
        config = MachineConfig(vcpu_count=machine_config["vcpu_count"], mem_size_mib=machine_config["mem_size_mib"],
                               kernel_image=boot_source["kernel_image_path"], boot_args=boot_source["boot_args"],
                               initrd_path=boot_source["initrd_path"],
                               track_dirty_pages=machine_config["track_dirty_pages"])
        return config.validate(shared_kvm().max_vcpus())  # ConfigError and GuestImageError become 400s

    def get_machine_config(self) -> dict:
        machine = self.machine
        if machine is not None:
            return dict(self.machine_config, vcpu_count=machine.config.vcpu_count,
                        mem_size_mib=machine.config.mem_size_mib, track_dirty_pages=machine.config.track_dirty_pages)
        return dict(self.machine_config)

    def put_machine_config(self, body: dict, partial: bool = False) -> None:
        if partial and not body:
            raise BadRequest("machine-config: empty PATCH request: give at least one field to change")
        with self.lock:
            self._require_not_started("machine-config")
            base = self.machine_config if partial else {"smt": False, "track_dirty_pages": False,
                                                        "huge_pages": "None"}
            merged = {**base, **body}
            self._build_config(merged, self.boot_source)
            merged.pop("cpu_template", None)  # only "None" gets here: Firecracker then reports no template
            self.machine_config = {**self.machine_config, **merged}
            self.configured = True

    def put_boot_source(self, body: dict) -> None:
        with self.lock:
            self._require_not_started("boot-source")
            source = {"kernel_image_path": body["kernel_image_path"],
                      "boot_args": body.get("boot_args", MachineConfig.boot_args),
                      "initrd_path": body.get("initrd_path", "")}
            self._build_config(self.machine_config, source)
            self.boot_source = source
            self.configured = True

    def vm_config(self) -> dict:
        machine = self.machine
        source = dict(self.boot_source)
        if machine is not None:
            source.update(kernel_image_path=machine.config.kernel_image, boot_args=machine.config.boot_args)
        source["kernel_image_path"] = source["kernel_image_path"] or _builtin_image_or_empty()
        return {"boot-source": source, "machine-config": self.get_machine_config()}

    # -- lifecycle
    def action(self, body: dict) -> None:
        kind = body["action_type"]
        if kind == "InstanceStart":
            self._instance_start()
        elif kind == "SendCtrlAltDel":
            raise BadRequest("SendCtrlAltDel is not supported: this VMM's i8042 has no keyboard to send it through")
        else:
            raise BadRequest(f"{kind} is not supported: this VMM keeps no metrics")

    def _instance_start(self) -> None:
        with self.lock:
            if self.machine is not None:
                what = "was restored from a snapshot" if self.restored else "is already started"
                raise BadRequest(f"InstanceStart: the VM {what}")
            config = self._build_config(self.machine_config, self.boot_source)
            t0 = time.perf_counter()
            machine = Microvm(config, serial_sink=self.serial_sink)
            try:
                machine.boot()
            except BaseException:
                machine.close()
                raise
            self._adopt(machine)
            self._took("InstanceStart", t0)

    def _took(self, what: str, t0: float) -> None:
        took_ms = (time.perf_counter() - t0) * 1e3
        log.info("%s took %.3f ms", what, took_ms)

    def _adopt(self, machine: Microvm) -> None:
        self.machine = machine
        self.adopted.set()

    def _watch(self) -> None:
        """Started with the controller, so that no thread start lands on the InstanceStart or load path."""
        self.adopted.wait()
        machine = self.machine
        machine.stopped.wait()
        if self.on_vm_stopped is not None:
            self.on_vm_stopped(machine)

    def patch_vm(self, body: dict) -> None:
        with self.lock:
            machine = self._require_machine()
            if body["state"] == "Paused":
                if machine.state != PAUSED:
                    machine.pause()
            elif self.restored_idle:
                snapshots.resume_restored(machine)
                self.restored_idle = False
            elif machine.state != RUNNING:
                machine.resume()

    def shutdown(self) -> None:
        with self.lock:
            machine, self.machine = self.machine, None
        if machine is not None:
            machine.close()

    # -- invocations
    def invoke(self, body: dict) -> dict:
        payload = decode_base64(body["payload"], "invoke.payload")
        timeout_ms = body.get("timeout_ms", DEFAULT_INVOKE_TIMEOUT_MS)
        machine = self._require_machine()
        t0 = time.perf_counter()
        invocation = machine.fnport.submit(payload)
        return self._reply(invocation, timeout_ms, t0)

    def _reply(self, invocation: Invocation, timeout_ms: int, t0: float) -> dict:
        if not invocation.done.wait(timeout_ms / 1e3):
            seq = self._track(invocation)
            raise GuestTimeout(f"invocation {seq} got no reply within {timeout_ms} ms; it stays pending "
                               f"(GET /invocations, PUT /invocations/{seq}/wait)")
        latency_us = (time.perf_counter() - t0) * 1e6
        if invocation.error is not None:
            raise BadRequest(f"invocation {invocation.seq} failed: {invocation.error}")
        return {"result": _encode(invocation.result), "seq": invocation.seq, "latency_us": round(latency_us, 1)}

    def _pending_with_seq(self) -> list[tuple[int, Invocation]]:
        """Pending invocations with their seq; a queued one gets the seq the guest will give it (FIFO)."""
        machine = self.machine
        if machine is None:
            return []
        port = machine.fnport
        with port.cond:
            pending, next_seq = port.pending(), port.seq + 1
        numbered = []
        for invocation in pending:
            if invocation.seq:
                numbered.append((invocation.seq, invocation))
            else:
                numbered.append((next_seq, invocation))
                next_seq += 1
        return numbered

    def _track(self, invocation: Invocation) -> int:
        for seq, pending in self._pending_with_seq():
            if pending is invocation:
                break
        else:
            seq = invocation.seq
        with self.lock:
            self.tracked[seq] = invocation
            while len(self.tracked) > MAX_TRACKED_INVOCATIONS:
                self.tracked.popitem(last=False)
        return seq

    def list_invocations(self) -> dict:
        with self.lock:
            entries = dict(self.tracked)
        for seq, invocation in self._pending_with_seq():
            entries[seq] = invocation
        return {"invocations": [{"seq": seq, "payload_size": len(inv.payload), "state": _invocation_state(inv)}
                                for seq, inv in sorted(entries.items())]}

    def wait_invocation(self, body: dict, seq: int) -> dict:
        timeout_ms = body.get("timeout_ms", DEFAULT_INVOKE_TIMEOUT_MS)
        with self.lock:
            invocation = self.tracked.get(seq)
        if invocation is None:
            invocation = dict(self._pending_with_seq()).get(seq)
        if invocation is None:
            raise NotFound(f"no pending or tracked invocation with seq {seq} (GET /invocations lists them)")
        if not invocation.done.is_set():
            self._track(invocation)
        return self._reply(invocation, timeout_ms, time.perf_counter())

    # -- snapshots
    def create_snapshot(self, body: dict) -> None:
        with self.lock:
            machine = self._require_machine()
            t0 = time.perf_counter()
            snapshots.create_snapshot(machine, body["snapshot_path"], body["mem_file_path"],
                                      body.get("snapshot_type", "Full"))
            self._took("snapshot/create", t0)

    def load_snapshot(self, body: dict) -> None:
        backend = body.get("mem_backend")
        if backend is not None and "mem_file_path" in body:
            raise BadRequest("snapshot/load: give mem_backend or the deprecated mem_file_path, not both")
        if backend is None:
            if "mem_file_path" not in body:
                raise BadRequest("snapshot/load: missing required field mem_backend")
            backend = {"backend_type": "File", "backend_path": body["mem_file_path"]}
        refuse_load_overrides(body)
        with self.lock:
            if self.machine is not None:
                what = "already loaded a snapshot" if self.restored else "already started its VM"
                raise BadRequest(f"snapshot/load is only allowed in a fresh VMM process (this one {what})")
            if self.configured:
                raise BadRequest("snapshot/load is not allowed after configuring boot-specific resources "
                                 "(machine-config, boot-source)")
            t0 = time.perf_counter()
            track = body.get("track_dirty_pages", False) or body.get("enable_diff_snapshots", False)
            try:
                machine = self._load(body["snapshot_path"], backend, track)
            except ConfigError as exc:  # the state file's machine is one the API would not configure (vCPUs, ...)
                raise BadRequest(f"snapshot/load: {body['snapshot_path']}: the machine it describes is refused: "
                                 f"{exc}") from None
            self.restored, self.restored_idle = True, True
            self._adopt(machine)
            for seq, invocation in self._pending_with_seq():
                self.tracked[seq] = invocation  # their callers were in the snapshotted process: keep the replies
            if body.get("resume_vm", False):
                snapshots.resume_restored(machine)
                self.restored_idle = False
            self._took("snapshot/load", t0)

    def _load(self, snapshot_path: str, backend: dict, track_dirty_pages: bool) -> Microvm:
        path = backend["backend_path"]
        if backend["backend_type"] == "File":
            return snapshots.load_snapshot_file_backed(snapshot_path, path, resume=False,
                                                       serial_sink=self.serial_sink,
                                                       track_dirty_pages=track_dirty_pages)
        return snapshots.load_snapshot_uffd_backed(snapshot_path, path, resume=False, serial_sink=self.serial_sink,
                                                   track_dirty_pages=track_dirty_pages)


def refuse_load_overrides(body: dict) -> None:
    """Firecracker's restore-time overrides: each names a device of the snapshot (a network interface, the vsock
    device) or asks KVM to advance the guest's clock by the wall-clock time since the snapshot. Asking for
    nothing is accepted; asking for something is refused, as Firecracker refuses an override naming a device the
    snapshot does not have."""
    overrides = body.get("network_overrides", [])
    if overrides:
        names = ", ".join(sorted({json.dumps(o["iface_id"]) for o in overrides}))
        raise unsupported("snapshot/load.network_overrides", f"this VMM has no network devices, so no interface "
                                                             f"{names} to override (give [] or leave it out)")
    if "vsock_override" in body:
        raise unsupported("snapshot/load.vsock_override", "this VMM has no vsock device to override (leave it out)")
    if body.get("clock_realtime", False):
        raise unsupported("snapshot/load.clock_realtime", "true (KVM_CLOCK_REALTIME): the state file does not "
                                                          "record the host's wall-clock time at the snapshot, so "
                                                          "kvmclock resumes where it stopped (give false)")


def _invocation_state(invocation: Invocation) -> str:
    if invocation.done.is_set():
        return "failed" if invocation.error is not None else "answered"
    return "in_flight" if invocation.seq else "queued"


def _builtin_image_or_empty() -> str:
    from vmm.config import builtin_guest_image
    try:
        return builtin_guest_image()
    except VmmError:
        return ""
