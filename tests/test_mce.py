"""Machine checks: KVM_X86_SETUP_MCE as QEMU calls it (pyhyve/mce.py).  A guest
(tests/guests/mceprobe.S) reads CPUID's MCE/MCA bits, MCG_CAP, MCG_STATUS,
MCG_CTL and every bank's registers under pyhyve and under QEMU, and the two
must print the same; the bank registers survive a snapshot."""

import pytest

from build import build_rom
from guestrun import run_qemu_debugcon, run_rom
from pyhyve import mce, snapshot
from pyhyve.config import Config
from pyhyve.kvm import Kvm
from pyhyve.vcpu import ExitStatus
from pyhyve.vm import VirtualMachine

needs_kvm = pytest.mark.usefixtures("needs_kvm")


def printed(text: str) -> dict[str, int]:
    """The guest's NAME=VALUE lines up to "done" (later ones win: MC2_CTL is read twice)."""
    values = {}
    for line in text.split("done\n")[0].splitlines():
        name, _, value = line.rpartition("=")
        values[name] = int(value, 16)
    return values


@needs_kvm
def test_guest_reads_the_machine_check_registers_qemu_gives_it(tmp_path):
    result = run_rom(tmp_path, "mceprobe")
    assert result.status == ExitStatus.POWEROFF, result.stderr
    seen = printed(result.debug)
    kvm = Kvm()
    try:
        expected_cap = (mce.WANTED_CAP & kvm.mce_cap_supported()) | mce.BANKS
    finally:
        kvm.close()
    assert seen["cpuid1.edx.mce_mca"] == mce.CPUID_MCE | mce.CPUID_MCA
    assert seen["179"] == expected_cap
    assert seen["17b"] == (1 << 64) - 1                  # MCG_CTL: all banks enabled
    banks = {index: seen[f"{index:x}"] for index in mce.bank_msrs(expected_cap)}
    assert len(banks) == 4 * 10
    assert all(value == ((1 << 64) - 1 if (index - mce.MC0_CTL) % 4 == 0 and index != 0x408
                         else 0) for index, value in banks.items())   # MC2_CTL was cleared
    reference = run_qemu_debugcon(tmp_path, ["-bios", str(build_rom("mceprobe"))])
    assert result.debug.split("done\n")[0] == reference.split("done\n")[0]


@needs_kvm
def test_hidden_mca_leaves_the_vcpus_without_banks():
    """As QEMU: no MCE and MCA in CPUID, no KVM_X86_SETUP_MCE."""
    vm = VirtualMachine(Config({"name": "mcehidden", "lpc.bootrom": str(build_rom("hello16")),
                                "cpu.features": "-mca"}))
    try:
        assert vm.mcg_cap == 0
    finally:
        vm.close()


@needs_kvm
def test_bank_registers_survive_a_snapshot(tmp_path):
    """A corrected error logged in bank 3 (as the host writes it), MCG_STATUS
    and a cleared MC1_CTL come back in a VM restored from the snapshot."""
    config = {"name": "mcesnap", "lpc.bootrom": str(build_rom("hello16"))}
    logged = {mce.MCG_STATUS: 0x1, mce.MC0_CTL + 4: 0,
              mce.MC0_CTL + 13: (1 << 63) | 0x17, mce.MC0_CTL + 14: 0xABC000,
              mce.MC0_CTL + 15: 0x86}
    vm = VirtualMachine(Config(config))
    try:
        assert vm.mcg_cap & 0xFF == mce.BANKS
        assert vm.vcpus[0].kvm_vcpu.set_msrs(logged) == len(logged)
        snapshot.save(vm, str(tmp_path / "mce.snap"))
    finally:
        vm.close()
    restored = VirtualMachine(Config(config))
    try:
        snapshot.restore_into(restored, str(tmp_path / "mce.snap"))
        assert restored.vcpus[0].kvm_vcpu.get_msrs(list(logged)) == logged
    finally:
        restored.close()
