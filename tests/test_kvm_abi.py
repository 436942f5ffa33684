"""The ctypes KVM ABI checked against the kernel headers, compiled with gcc."""

import ctypes
import shutil
import subprocess

import pytest

from pyhyve.kvm import abi

STRUCTS = [
    "kvm_run", "kvm_regs", "kvm_sregs", "kvm_segment", "kvm_dtable", "kvm_fpu",
    "kvm_msr_entry", "kvm_msrs", "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2",
    "kvm_lapic_state", "kvm_mp_state", "kvm_userspace_memory_region",
    "kvm_dirty_log", "kvm_clear_dirty_log", "kvm_irq_level", "kvm_irqchip", "kvm_pic_state",
    "kvm_ioapic_state", "kvm_pit_config", "kvm_pit_channel_state", "kvm_pit_state2",
    "kvm_clock_data", "kvm_msi", "kvm_irq_routing_entry", "kvm_irq_routing",
    "kvm_irq_routing_irqchip", "kvm_irq_routing_msi", "kvm_irqfd", "kvm_ioeventfd",
    "kvm_enable_cap", "kvm_coalesced_mmio_zone", "kvm_coalesced_mmio",
    "kvm_coalesced_mmio_ring", "kvm_guest_debug", "kvm_guest_debug_arch",
    "kvm_debug_exit_arch", "kvm_vcpu_events", "kvm_xsave", "kvm_xcrs",
    "kvm_translation", "kvm_interrupt", "kvm_signal_mask",
]

IOCTLS = sorted({
              "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST",
              "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID",
              "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG", "KVM_CLEAR_DIRTY_LOG", "KVM_SET_USER_MEMORY_REGION",
              "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP",
              "KVM_IRQ_LINE", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_IRQ_LINE_STATUS",
              "KVM_SET_GSI_ROUTING", "KVM_REGISTER_COALESCED_MMIO",
              "KVM_UNREGISTER_COALESCED_MMIO", "KVM_IRQFD", "KVM_CREATE_PIT2", "KVM_IOEVENTFD",
              "KVM_SET_CLOCK", "KVM_GET_CLOCK", "KVM_GET_PIT2", "KVM_SET_PIT2",
              "KVM_ENABLE_CAP", "KVM_SIGNAL_MSI", "KVM_RUN", "KVM_GET_REGS",
              "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_TRANSLATE",
              "KVM_INTERRUPT", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_SET_SIGNAL_MASK",
              "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC",
              "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE",
              "KVM_NMI", "KVM_SET_GUEST_DEBUG", "KVM_GET_VCPU_EVENTS",
              "KVM_SET_VCPU_EVENTS", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XCRS",
              "KVM_SET_XCRS", "KVM_X86_GET_MCE_CAP_SUPPORTED", "KVM_X86_SETUP_MCE"})

# Field offsets the vm_loop reads directly from the kvm_run page.
OFFSETS = {
    "kvm_run.immediate_exit": "offsetof(struct kvm_run, immediate_exit)",
    "kvm_run.exit_reason": "offsetof(struct kvm_run, exit_reason)",
    "kvm_run.u": "offsetof(struct kvm_run, io)",
    "kvm_run.kvm_valid_regs": "offsetof(struct kvm_run, kvm_valid_regs)",
    "kvm_vcpu_events.exception_payload": "offsetof(struct kvm_vcpu_events, exception_payload)",
    "kvm_sregs.interrupt_bitmap": "offsetof(struct kvm_sregs, interrupt_bitmap)",
}


@pytest.fixture(scope="module")
def kernel_abi(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    for name in STRUCTS:
        lines.append(f'printf("size {name} %zu\\n", sizeof(struct {name}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    for name, expr in OFFSETS.items():
        lines.append(f'printf("offset {name} %zu\\n", (size_t)({expr}));')
    lines += ["return 0; }"]
    work = tmp_path_factory.mktemp("abi")
    (work / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(work / "abi"), str(work / "abi.c")], check=True)
    output = subprocess.run([str(work / "abi")], check=True, capture_output=True,
                            text=True).stdout
    table = {}
    for line in output.splitlines():
        kind, name, value = line.split()
        table[(kind, name)] = int(value)
    return table


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_size_matches_kernel(kernel_abi, name):
    assert ctypes.sizeof(getattr(abi, name)) == kernel_abi[("size", name)]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_kernel(kernel_abi, name):
    assert getattr(abi, name) == kernel_abi[("ioctl", name)]


def test_kvm_run_offsets_match_kernel(kernel_abi):
    assert abi.RUN_OFFSET_IMMEDIATE_EXIT == kernel_abi[("offset", "kvm_run.immediate_exit")]
    assert abi.RUN_OFFSET_EXIT_REASON == kernel_abi[("offset", "kvm_run.exit_reason")]
    assert abi.RUN_OFFSET_EXIT_UNION == kernel_abi[("offset", "kvm_run.u")]
    assert abi.kvm_run.kvm_valid_regs.offset == kernel_abi[("offset", "kvm_run.kvm_valid_regs")]
    assert abi.kvm_vcpu_events.exception_payload.offset == \
        kernel_abi[("offset", "kvm_vcpu_events.exception_payload")]
    assert abi.kvm_sregs.interrupt_bitmap.offset == \
        kernel_abi[("offset", "kvm_sregs.interrupt_bitmap")]


def test_coalesced_ring_layout_is_the_abis():
    """pyhyve.coalesced reads the ring with struct formats: the same layout as
    the ctypes structures checked against the kernel above."""
    from pyhyve import coalesced
    assert coalesced._HEADER.size == ctypes.sizeof(abi.kvm_coalesced_mmio_ring)
    assert coalesced._ENTRY.size == ctypes.sizeof(abi.kvm_coalesced_mmio)
    assert abi.kvm_coalesced_mmio.data.offset == coalesced._ENTRY.size - 8


def test_every_ioctl_is_checked():
    """Every ioctl number abi.py declares appears in the list checked above."""
    declared = {name for name in dir(abi) if name.startswith("KVM_")
                and isinstance(getattr(abi, name), int)
                and (getattr(abi, name) >> 8) & 0xFF == abi.KVMIO}
    assert declared <= set(IOCTLS)
