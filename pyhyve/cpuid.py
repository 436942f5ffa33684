"""The CPUID a vCPU sees: what KVM supports, with pyhyve's topology.

bhyve describes sockets/cores/threads through leaves 0x1, 0x4, 0xB (and
AMD's 0x8000001E); guests derive each CPU's place from its APIC ID, which
packs thread, core and socket numbers into bit fields.
"""

from typing import NamedTuple

from .kvm import abi

CPUID_HYPERVISOR = 1 << 31          # leaf 1 ECX
CPUID_X2APIC = 1 << 21              # leaf 1 ECX
CPUID_HTT = 1 << 28                 # leaf 1 EDX
LEVEL_SMT, LEVEL_CORE = 1, 2


def _bits_for(count: int) -> int:
    return (count - 1).bit_length()


class Topology(NamedTuple):
    sockets: int = 1
    cores: int = 1
    threads: int = 1

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def thread_shift(self) -> int:
        return _bits_for(self.threads)

    @property
    def core_shift(self) -> int:
        return self.thread_shift + _bits_for(self.cores)

    def apic_id(self, vcpu: int) -> int:
        thread = vcpu % self.threads
        core = (vcpu // self.threads) % self.cores
        socket = vcpu // (self.threads * self.cores)
        return (socket << self.core_shift) | (core << self.thread_shift) | thread


def vcpu_cpuid(supported: list, topology: Topology, vcpu: int, x2apic: bool = False) -> list:
    """The CPUID entries for one vCPU; x2APIC is offered only when asked (bhyve's -x)."""
    apic_id = topology.apic_id(vcpu)
    per_package = topology.cores * topology.threads
    entries = []
    for source in supported:
        entry = abi.kvm_cpuid_entry2.from_buffer_copy(source)
        fn, index = entry.function, entry.index
        if fn == 1:
            entry.ebx = (entry.ebx & 0x0000FFFF) | (apic_id << 24) | \
                (min(1 << topology.core_shift, 255) << 16)
            entry.ecx |= CPUID_HYPERVISOR
            entry.ecx = entry.ecx | CPUID_X2APIC if x2apic else entry.ecx & ~CPUID_X2APIC
            entry.edx = entry.edx | CPUID_HTT if per_package > 1 else entry.edx & ~CPUID_HTT
        elif fn == 4:
            cache_level = (entry.eax >> 5) & 7
            sharing = topology.threads if cache_level < 3 else per_package
            entry.eax = (entry.eax & 0x3FFF) | ((max(topology.cores, 1) - 1) << 26) | \
                ((min(sharing, 4096) - 1) << 14)
        elif fn in (0xB, 0x1F):
            if index == 0:      # KVM offers one template entry; describe every level
                entries.extend(_extended_topology(fn, topology, apic_id))
            continue
        elif fn == 0x80000008:
            entry.ecx = (entry.ecx & ~0xF0FF) | (_bits_for(per_package) << 12) | \
                ((per_package - 1) & 0xFF)
        elif fn == 0x8000001E:
            entry.eax = apic_id
            entry.ebx = ((topology.threads - 1) << 8) | ((apic_id >> topology.thread_shift) & 0xFF)
            entry.ecx = apic_id >> topology.core_shift
        entries.append(entry)
    return entries


def _extended_topology(function: int, topology: Topology, apic_id: int) -> list:
    """Leaf 0xB/0x1F subleaves: SMT level, core level, then the terminating level."""
    levels = [(topology.thread_shift, topology.threads, LEVEL_SMT),
              (topology.core_shift, topology.threads * topology.cores, LEVEL_CORE),
              (0, 0, 0)]
    entries = []
    for index, (shift, count, level_type) in enumerate(levels):
        entry = abi.kvm_cpuid_entry2(function=function, index=index,
                                     flags=abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                                     eax=shift, ebx=count, ecx=(level_type << 8) | index,
                                     edx=apic_id)
        entries.append(entry)
    return entries
