"""End to end with KVM: a snapshot of the hello workload restored into anonymous memory that the page
server fills on demand; the vCPU's faults are kernel-mode faults raised by KVM."""
import os

import pytest

from bench.fault_service import write_image
from snapd import uffd
from snapd import uffd_handshake as hs
from snapd.pageserver import PageServer
from tests.conftest import requires_kvm
from tests.vm_helpers import QUIET, snapshot_guest, snapshot_memory
from vmm import workloads
from vmm.machine import Microvm
from vmm.memory import GuestMemory
from vmm.snapshot import (machine_config_of, read_snapshot, region_layouts, restore_into,
                          resume_restored)

pytestmark = requires_kvm


@pytest.fixture
def hello_snapshot(tmp_path):
    return snapshot_guest(str(tmp_path), "workload=hello", invokes=2)


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_restored_vm_runs_on_served_memory(hello_snapshot, tmp_path, mode):
    state_path, mem_path = hello_snapshot
    state = read_snapshot(state_path)
    table = write_image(str(tmp_path), snapshot_memory(mem_path, state.memory_file.data_size), 64 << 10, name="hello")
    with PageServer() as server:
        listener = server.serve(str(tmp_path / "ps.sock"), server.add_image(table), mode)
        memory = GuestMemory.anonymous(table.mem_size)
        assert [r.layout for r in memory.regions] == region_layouts(state)
        fd = uffd.create_registered_uffd([(r.host_addr, r.size) for r in memory.regions])
        sock = hs.send_uffd(listener.sock_path, fd,
                            [(r.host_addr, r.size, r.layout.file_offset) for r in memory.regions])
        machine = None
        try:
            hs.ServerMessages(sock).wait_ready(30)
            machine = Microvm(machine_config_of(state), serial_sink=QUIET, memory=memory)
            restore_into(machine, state, QUIET)
            resume_restored(machine)
            reply = machine.invoke(b"after restore")
            workloads.verify_hello(b"after restore", reply, count=3)
            st = server.stats(listener.wait_for_vms(1)[0])
            assert st.errors == 0 and st.state == "active"
            assert st.faults > 0 if mode == "lazy" else st.eager_bytes > 0
            print(f"\n{mode}: {st.faults} faults, {st.bytes_installed >> 10} KiB installed, service p50 "
                  f"{st.percentile_ns(50) / 1e3:.1f} us p99 {st.percentile_ns(99) / 1e3:.1f} us, eager {st.eager_ns / 1e6:.2f} ms")
        finally:
            for r in memory.regions:  # before unmapping (see GuestMemory.close in bench.fault_service)
                uffd.unregister(fd, r.host_addr, r.size)
            if machine is not None:
                machine.close()
            else:
                memory.close()
            sock.close()
            os.close(fd)
