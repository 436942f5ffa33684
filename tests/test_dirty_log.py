"""KVM's dirty log through GuestMemory: the pages a real vCPU writes, and only
those, are reported once each, and logged again after they were collected."""

import pytest

from pyhyve.kvm import Kvm, abi
from pyhyve.layout import MiB
from pyhyve.memory import GuestMemory

CODE = 0x1000
# mov byte [0x5000], 1 ; mov byte [0x9000], 1 ; mov byte [si], 1 ; hlt   (real mode)
PROGRAM = bytes([0xC6, 0x06, 0x00, 0x50, 0x01,
                 0xC6, 0x06, 0x00, 0x90, 0x01,
                 0xC6, 0x04, 0x01,
                 0xF4])


def dirty_pages(bitmap: bytes) -> list[int]:
    return [n for n in range(len(bitmap) * 8) if bitmap[n // 8] >> (n % 8) & 1]


@pytest.fixture
def machine():
    kvm = Kvm()
    vm = kvm.create_vm()
    memory = GuestMemory(vm, 2 * MiB)
    memory.write(CODE, PROGRAM)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    for segment in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        segment.base, segment.selector = 0, 0
    vcpu.set_sregs(sregs)

    def run(si: int) -> None:
        regs = vcpu.get_regs()
        regs.rip, regs.rsi, regs.rflags = CODE, si, 2
        vcpu.set_regs(regs)
        vcpu.run()
        assert vcpu.run_state.exit_reason == abi.KVM_EXIT_HLT

    yield memory, run
    memory.close()
    vm.close()
    kvm.close()


@pytest.mark.usefixtures("needs_kvm")
def test_written_pages_are_reported_once_and_logged_again(machine):
    memory, run = machine
    run(0x7000)                                     # before logging: not reported
    memory.log_dirty(True)
    (ram,) = memory.logged_regions()
    assert dirty_pages(memory.collect_dirty(ram)) == []
    run(0xF000)
    assert dirty_pages(memory.collect_dirty(ram)) == [0x5, 0x9, 0xF]
    assert dirty_pages(memory.collect_dirty(ram)) == []
    memory.write(0xA000, b"host")                   # the host's writes are not the guest's
    run(0x3000)
    assert dirty_pages(memory.collect_dirty(ram)) == [0x3, 0x5, 0x9]
    memory.log_dirty(False)
    assert memory.logged_regions() == []


@pytest.mark.usefixtures("needs_kvm")
def test_one_region_alone_is_logged(machine):
    memory, run = machine
    memory.log_dirty(True, gpa=0)
    run(0x4000)
    (ram,) = memory.logged_regions()
    assert dirty_pages(memory.collect_dirty(ram)) == [0x4, 0x5, 0x9]
