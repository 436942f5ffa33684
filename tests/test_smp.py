"""SMP: APs woken by the guest through INIT/SIPI, and the CPUID topology."""

import pytest

from guestrun import run_rom
from pyhyve.cpuid import Topology, vcpu_cpuid
from pyhyve.kvm import Kvm
from pyhyve.vcpu import ExitStatus

pytestmark = pytest.mark.usefixtures("needs_kvm")


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_bsp_wakes_every_ap(tmp_path, cpus):
    result = run_rom(tmp_path, "smp", "-c", str(cpus), timeout=120)
    *aps, last = result.debug.splitlines()
    assert sorted(aps) == [f"ap {i}" for i in range(1, cpus)]      # any order: they race
    assert last == f"all {cpus} cpus up"
    assert result.status == ExitStatus.POWEROFF, result.stderr


def test_apic_ids_follow_the_topology(tmp_path):
    # 3 cores need 2 bits, so socket 1's cores are APIC IDs 4, 5 and 6.
    result = run_rom(tmp_path, "smp", "-c", "cpus=6,sockets=2,cores=3,threads=1", timeout=120)
    *aps, last = result.debug.splitlines()
    assert sorted(aps) == ["ap 1", "ap 2", "ap 4", "ap 5", "ap 6"]
    assert last == "all 6 cpus up"
    assert result.status == ExitStatus.POWEROFF


def _leaf(entries, function, index=0):
    return next(e for e in entries if e.function == function and e.index == index)


def test_cpuid_describes_sockets_cores_threads():
    supported = Kvm().supported_cpuid()
    topology = Topology(sockets=2, cores=2, threads=2)
    for vcpu in range(topology.cpus):
        entries = vcpu_cpuid(supported, topology, vcpu)
        apic_id = topology.apic_id(vcpu)
        leaf1 = _leaf(entries, 1)
        assert leaf1.ebx >> 24 == apic_id
        assert (leaf1.ebx >> 16) & 0xFF == 4          # logical CPUs per package
        assert leaf1.edx & (1 << 28)                  # HTT
        assert leaf1.ecx & (1 << 31)                  # running under a hypervisor
        if any(e.function == 0xB for e in entries):
            smt, core = _leaf(entries, 0xB, 0), _leaf(entries, 0xB, 1)
            assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, (smt.ecx >> 8) & 0xFF) == (1, 2, 1)
            assert (core.eax & 0x1F, core.ebx & 0xFFFF, (core.ecx >> 8) & 0xFF) == (2, 4, 2)
            assert smt.edx == core.edx == apic_id
        if any(e.function == 4 for e in entries):
            assert _leaf(entries, 4).eax >> 26 == 1    # cores per package - 1
    assert [topology.apic_id(i) for i in range(8)] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_single_socket_has_no_htt():
    entries = vcpu_cpuid(Kvm().supported_cpuid(), Topology(), 0)
    assert not _leaf(entries, 1).edx & (1 << 28)
