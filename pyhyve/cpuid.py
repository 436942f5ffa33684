"""The CPUID a vCPU sees: what KVM supports, with pyhyve's topology.

bhyve describes sockets/cores/threads through leaves 0x1, 0x4, 0xB (and
AMD's 0x8000001E); guests derive each CPU's place from its APIC ID, which
packs thread, core and socket numbers into bit fields.
"""

from .kvm import abi
from .record import record

CPUID_HYPERVISOR = 1 << 31          # leaf 1 ECX
CPUID_X2APIC = 1 << 21              # leaf 1 ECX
CPUID_HTT = 1 << 28                 # leaf 1 EDX
LEVEL_SMT, LEVEL_CORE = 1, 2


def _bits_for(count: int) -> int:
    return (count - 1).bit_length()


@record
class Topology:
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

    def location(self, vcpu: int) -> tuple[int, int, int]:
        """(socket, core, thread) of vCPU number VCPU."""
        return (vcpu // (self.threads * self.cores), (vcpu // self.threads) % self.cores,
                vcpu % self.threads)

    def apic_id(self, vcpu: int) -> int:
        socket, core, thread = self.location(vcpu)
        return (socket << self.core_shift) | (core << self.thread_shift) | thread


# Feature flags a user may take away (QEMU's -cpu ...,-feature), by the names Linux
# prints in /proc/cpuinfo: (leaf, register, bit).
LEAF1, LEAF7, EXT1 = 1, 7, 0x80000001
FEATURES = {
    **{name: (LEAF1, "ecx", bit) for bit, name in (
        (0, "pni"), (1, "pclmulqdq"), (3, "monitor"), (9, "ssse3"), (12, "fma"), (13, "cx16"),
        (17, "pcid"), (19, "sse4_1"), (20, "sse4_2"), (21, "x2apic"), (22, "movbe"),
        (23, "popcnt"), (24, "tsc_deadline_timer"), (25, "aes"), (26, "xsave"), (28, "avx"),
        (29, "f16c"), (30, "rdrand"))},
    **{name: (LEAF1, "edx", bit) for bit, name in (
        (1, "vme"), (2, "de"), (3, "pse"), (7, "mce"), (12, "mtrr"), (13, "pge"), (14, "mca"),
        (16, "pat"), (17, "pse36"), (19, "clflush"), (23, "mmx"), (28, "ht"))},
    **{name: (LEAF7, "ebx", bit) for bit, name in (
        (0, "fsgsbase"), (1, "tsc_adjust"), (3, "bmi1"), (4, "hle"), (5, "avx2"), (7, "smep"),
        (8, "bmi2"), (9, "erms"), (10, "invpcid"), (11, "rtm"), (16, "avx512f"),
        (18, "rdseed"), (19, "adx"), (20, "smap"), (23, "clflushopt"), (24, "clwb"),
        (29, "sha_ni"))},
    **{name: (LEAF7, "ecx", bit) for bit, name in (
        (2, "umip"), (3, "pku"), (9, "vaes"), (10, "vpclmulqdq"), (22, "rdpid"))},
    **{name: (LEAF7, "edx", bit) for bit, name in ((4, "fsrm"), (10, "md_clear"))},
    **{name: (EXT1, "ecx", bit) for bit, name in (
        (0, "lahf_lm"), (1, "cmp_legacy"), (3, "extapic"), (4, "cr8_legacy"), (5, "abm"),
        (6, "sse4a"), (7, "misalignsse"), (8, "3dnowprefetch"), (9, "osvw"), (22, "topoext"))},
    **{name: (EXT1, "edx", bit) for bit, name in (
        (20, "nx"), (22, "mmxext"), (25, "fxsr_opt"), (26, "pdpe1gb"), (27, "rdtscp"))},
}
ALIASES = {"sse3": "pni", "tsc_deadline": "tsc_deadline_timer", "sha": "sha_ni"}
XSAVE_LEAF = 0xD


class FeatureError(ValueError):
    """A cpu.features value that names no known feature; the message is for a user."""


def feature_mask(text: str) -> frozenset[str]:
    """Parse cpu.features ("-xsave,-smap", QEMU's spellings such as "-sse4.1" too)
    into the Linux names of the features to hide."""
    hidden = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        if not item.startswith("-"):
            raise FeatureError(f"cpu.features: '{item}' must start with '-' (features can "
                               "only be taken away)")
        name = item[1:].lower().replace("-", "_").replace(".", "_")
        name = ALIASES.get(name, name)
        if name not in FEATURES:
            raise FeatureError(f"cpu.features: unknown feature '{item[1:]}' (known: "
                               f"{', '.join(sorted(FEATURES))})")
        hidden.add(name)
    return frozenset(hidden)


def visible(entries: list, feature: str) -> bool:
    """Whether the CPUID entries offer the feature."""
    leaf, register, bit = FEATURES[feature]
    return any(entry.function == leaf and entry.index == 0 and
               getattr(entry, register) >> bit & 1 for entry in entries)


def _hide(entries: list, hidden: frozenset[str]) -> list:
    for name in hidden:
        leaf, register, bit = FEATURES[name]
        for entry in entries:
            if entry.function == leaf and entry.index == 0:
                setattr(entry, register, getattr(entry, register) & ~(1 << bit))
    if "xsave" in hidden:               # no XSAVE: no state components to describe
        entries = [entry for entry in entries if entry.function != XSAVE_LEAF]
    return entries


def vcpu_cpuid(supported: list, topology: Topology, vcpu: int, x2apic: bool = False,
               hidden: frozenset[str] = frozenset()) -> list:
    """The CPUID entries for one vCPU; x2APIC is offered only when asked (bhyve's -x),
    and the features named in `hidden` are taken away."""
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
    return _hide(entries, hidden)


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
