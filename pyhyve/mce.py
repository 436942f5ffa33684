"""Machine-check architecture for a vCPU, set up as QEMU sets it up.

KVM keeps a vCPU's machine-check registers (MCG_CAP, MCG_STATUS, MCG_CTL
and each bank's MCi_CTL/STATUS/ADDR/MISC) and answers the guest's RDMSR and
WRMSR of them, but only once userspace has said how many banks there are
and which MCG_CAP bits the guest sees (KVM_X86_SETUP_MCE); before that a
guest that finds MCE and MCA in CPUID reads no banks.  QEMU gives every
vCPU whose CPUID offers both (family 6 or later) 10 banks with MCG_CTL_P
and MCG_SER_P, less what KVM_X86_GET_MCE_CAP_SUPPORTED lacks; pyhyve does
the same, so the guest reads the same values under both.  KVM fills in
MCG_CTL and every MCi_CTL with all ones when it sets the banks up.

The bank MSRs are not in KVM_GET_MSR_INDEX_LIST (MCG_STATUS and MCG_CTL
are), so a snapshot adds them (bank_msrs) to what it saves.  A machine
reset puts back the MSRs of that list as they were at power-on and leaves
the banks alone: what they logged survives a warm reset, as it does on
hardware and under QEMU.
"""

from .kvm import abi

MCG_CAP = 0x179
MCG_STATUS = 0x17A
MCG_CTL = 0x17B
MC0_CTL = 0x400                 # bank i: MC0_CTL + 4 i + (CTL, STATUS, ADDR, MISC)
REGISTERS_PER_BANK = 4
BANKS = 10                      # QEMU's MCE_BANKS_DEF
MCG_CAP_COUNT = 0xFF            # the bank count, in MCG_CAP's low byte
MCG_CTL_P = 1 << 8              # MCG_CTL is present
MCG_SER_P = 1 << 24             # software error recovery
WANTED_CAP = MCG_CTL_P | MCG_SER_P
CPUID_MCE = 1 << 7              # leaf 1 EDX
CPUID_MCA = 1 << 14
MIN_FAMILY = 6


def offered(cpuid_entries: list) -> bool:
    """Whether CPUID leaf 1 offers MCE and MCA on family 6 or later (QEMU's test)."""
    leaf1 = next((entry for entry in cpuid_entries
                  if entry.function == 1 and entry.index == 0), None)
    return leaf1 is not None and (leaf1.eax >> 8) & 0xF >= MIN_FAMILY and \
        leaf1.edx & (CPUID_MCE | CPUID_MCA) == CPUID_MCE | CPUID_MCA


def mcg_cap(kvm, cpuid_entries: list, log) -> int:
    """The MCG_CAP every vCPU gets (KVM_X86_SETUP_MCE), or 0 for none: the
    CPUID does not offer machine checks, or this KVM cannot give QEMU's banks
    (QEMU refuses to start then; pyhyve says so and runs without them)."""
    if not offered(cpuid_entries):
        return 0
    kvm_banks = kvm.check_extension(abi.KVM_CAP_MCE)
    if kvm_banks < BANKS:
        log.warning("this host's KVM has %d machine-check banks, not the %d QEMU gives "
                    "a vCPU: the guest gets none", kvm_banks, BANKS)
        return 0
    return (WANTED_CAP & kvm.mce_cap_supported()) | BANKS


def bank_msrs(mcg_cap: int) -> list[int]:
    """MCi_CTL, MCi_STATUS, MCi_ADDR and MCi_MISC of every bank MCG_CAP counts."""
    return list(range(MC0_CTL, MC0_CTL + REGISTERS_PER_BANK * (mcg_cap & MCG_CAP_COUNT)))
