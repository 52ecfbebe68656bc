"""The zygote: a process that imported the VMM, opened /dev/kvm and warmed every once-per-process cost, and
then only forks warm workers (snapd.pool.worker) on the daemon's request.

    python -m snapd.pool.zygote --control-fd N      (started by the daemon, never by hand)

Forking copies a process that is already warm (~1 ms, FACTS.md) instead of starting Python (~90 ms).
Rules that keep the children sound and small:
- No threads, ever: a fork copies only the calling thread, so a lock held by another thread would stay locked
  in every child. The loop is single-threaded; children are reaped from SIGCHLD.
- gc.freeze() before forking: objects in the permanent generation are never scanned, so a collection in a
  worker does not write their headers and copy the zygote's pages.
- Parsed snapshot states of registered images live here ("preload"), so a worker forked later inherits them
  and its restore parses nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import signal
import socket
import sys
import threading

from snapd.pool import protocol

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """The daemon started us: when it dies we go too (workers notice their channel's EOF on their own)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(0)


def warm_up() -> None:
    """Every cost a worker would otherwise pay on its first VM or first restore."""
    from snapd.snapfile import SnapshotFormatError, decode_state
    from vmm.config import MachineConfig
    from vmm.machine import Microvm, shared_kvm
    from vmm.persist import MicrovmState
    from vmm.vcpu_runner import install_kick_handler
    import snapd.pool.worker  # noqa: F401  (imports the restore path: prebuilt, snapshot, uffd backend)

    shared_kvm().supported_cpuid()
    install_kick_handler()
    try:
        decode_state(b"", MicrovmState)  # builds and caches the state decoder
    except SnapshotFormatError:
        pass
    # One VM built and closed (no vCPU thread is started): cffi types, ioctl wrappers and allocator arenas
    # are then warm in every worker.
    Microvm(MachineConfig(mem_size_mib=2, boot_args=""), serial_sink=lambda data: None).close()


def reap_children(signum, frame) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def jail_settings(settings: dict) -> dict:
    """The daemon's jail settings, with what every child would otherwise make for itself made once here: the
    jail's modules imported and the worker's seccomp program compiled (pid 1: each worker is pid 1 of its own
    pid namespace). What a child builds after the fork is memory of its own, in every worker."""
    if settings.get("mode", "off") == "off":
        return settings
    import vmm.jail.cgroups  # noqa: F401
    from vmm.jail import namespaces, seccomp
    shared = settings["mode"] == "root"  # (an unprivileged zygote would need a user namespace of its own first)
    if shared:
        namespaces.enter_shared_namespaces("vmm")
    return dict(settings, seccomp_program=seccomp.compile("worker", 1), shared_namespaces=shared)


def confine(settings: dict, header: dict, channel_fd: int) -> None:
    """Jail a just-forked child before it becomes a worker (vmm.jail): join the cgroup the daemon made for it,
    then namespaces, an empty root, its own uid, no capabilities, the worker's seccomp allow-list. It keeps only
    its channel and /dev/kvm (already open: the VM is created from that descriptor)."""
    from vmm.jail import JailSpec, enter
    from vmm.jail import cgroups
    from vmm.machine import shared_kvm

    from snapd import uffd

    cgroups.add_to(0, header.get("cgroup_dirs") or ())
    keep = (channel_fd, shared_kvm().fd) + ((uffd.device_fd(),) if uffd.use_device() else ())
    enter(JailSpec(root=settings["root"], uid=header.get("uid"), gid=header.get("gid"), seccomp="worker",
                   seccomp_program=settings.get("seccomp_program"),
                   shared_namespaces=settings.get("shared_namespaces", False), keep_fds=keep))


class Zygote:
    def __init__(self, control: socket.socket, jail: dict):
        self.control = control
        self.jail = jail  # snapd.pool.jail.WorkerJail.zygote_settings()
        self.states: dict = {}

    def run(self) -> None:
        from snapd.pool.worker import run_worker
        from vmm.prebuilt import VmShape
        from vmm.snapshot import read_snapshot

        while True:
            try:
                header, _data, fds = protocol.recv(self.control)
            except protocol.PeerGone:
                return
            op = header.get("op")
            if op == "fork" and len(fds) == 1:
                shape = VmShape(int(header["vcpu_count"]), int(header["mem_size_mib"]))
                self.fork(fds[0], shape, run_worker, header)
            elif op == "preload":
                try:
                    self.states[header["image"]] = read_snapshot(header["state_path"])
                except Exception as exc:  # the daemon validated it; a worker will parse (and report) itself
                    print(f"snapd zygote: cannot preload {header.get('image')}: {exc}", file=sys.stderr)
                gc.collect()
                gc.freeze()
            elif op == "forget":
                self.states.pop(header.get("image"), None)
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def fork(self, channel_fd: int, shape, run_worker, header: dict) -> None:
        assert threading.active_count() == 1, "the zygote must not fork with other threads alive"
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.control.close()
            if self.jail.get("mode", "off") != "off":
                try:
                    confine(self.jail, header, channel_fd)
                except Exception as exc:  # noqa: BLE001 (reported to the daemon, which counts the failure)
                    from vmm.jail import host_pid
                    protocol.send(socket.socket(fileno=channel_fd), {
                        "event": "error", "pid": host_pid(), "error": f"the worker could not be jailed: {exc}"})
                    os._exit(1)
            run_worker(socket.socket(fileno=channel_fd), shape, self.states)  # never returns
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapd.pool.zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--jail", default='{"mode": "off"}', help="JSON: snapd.pool.jail.WorkerJail settings")
    args = parser.parse_args(argv)
    die_with_parent()
    control = socket.socket(fileno=args.control_fd)
    os.set_inheritable(args.control_fd, False)
    warm_up()
    jail = jail_settings(json.loads(args.jail))
    signal.signal(signal.SIGCHLD, reap_children)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the daemon, which stops us
    protocol.send(control, {"event": "ready", "pid": os.getpid()})
    gc.collect()
    gc.freeze()
    Zygote(control, jail).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
