"""Kvm / Vm / Vcpu: the only code that issues ioctls on KVM file descriptors.

This plays the role of bhyve's libvmmapi: typed calls over the kernel ABI,
with errors that say which operation failed.
"""

import ctypes
import errno
import fcntl
import mmap
import os

from . import abi

API_VERSION = 12


class KvmError(Exception):
    """A KVM operation failed; the message is fit for a user."""


class KvmUnavailable(KvmError):
    """/dev/kvm is missing or not usable by this user."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg, what: str) -> int:
    """ioctl with a struct (read back in place) or an unsigned long argument."""
    if isinstance(arg, int):
        result = _libc.ioctl(fd, request, arg)
        if result < 0:
            code = ctypes.get_errno()
            raise KvmError(f"{what} failed: {os.strerror(code)}")
        return result
    try:
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as exc:
        raise KvmError(f"{what} failed: {os.strerror(exc.errno)}") from exc


def _variable(header_type, header_fields: dict, entry_type, entries):
    """A KVM variable-length argument: a header followed by an entry array."""
    count = len(entries)

    class Variable(ctypes.Structure):
        _fields_ = [("header", header_type), ("entries", entry_type * count)]

    value = Variable()
    for name, field in header_fields.items():
        setattr(value.header, name, field)
    for i, entry in enumerate(entries):
        value.entries[i] = entry
    return value


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: this host has no KVM "
                                 "(load kvm_intel or kvm_amd, or enable "
                                 "nested virtualization)") from None
        except PermissionError:
            raise KvmUnavailable(f"{path}: permission denied (run as root or "
                                 "join the 'kvm' group)") from None
        except OSError as exc:
            raise KvmUnavailable(f"{path}: {exc.strerror}") from None
        version = _ioctl(self.fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} speaks KVM API {version}, "
                                 f"pyhyve needs {API_VERSION}")
        self.vcpu_mmap_size = _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0,
                                     "KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> list:
        """KVM_GET_SUPPORTED_CPUID, as a list of kvm_cpuid_entry2."""
        for count in (128, 256, 1024):
            arg = _variable(abi.kvm_cpuid2, {"nent": count},
                            abi.kvm_cpuid_entry2, [abi.kvm_cpuid_entry2()] * count)
            try:
                fcntl.ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, arg, True)
            except OSError as exc:
                if exc.errno == errno.E2BIG:
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {exc.strerror}") from exc
            return [abi.kvm_cpuid_entry2.from_buffer_copy(arg.entries[i])
                    for i in range(arg.header.nent)]
        raise KvmError("KVM_GET_SUPPORTED_CPUID: too many entries")

    def mce_cap_supported(self) -> int:
        """The MCG_CAP bits KVM can give a vCPU (KVM_X86_GET_MCE_CAP_SUPPORTED)."""
        value = ctypes.c_uint64()
        _ioctl(self.fd, abi.KVM_X86_GET_MCE_CAP_SUPPORTED, value,
               "KVM_X86_GET_MCE_CAP_SUPPORTED")
        return value.value

    def msr_index_list(self) -> list[int]:
        buf = (ctypes.c_uint32 * 1025)(1024)
        _ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
        return list(buf[1:1 + buf[0]])

    def create_vm(self) -> "Vm":
        fd = _ioctl(self.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A KVM virtual machine file descriptor."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def set_user_memory_region(self, slot: int, gpa: int, size: int,
                               host_addr: int, flags: int = 0) -> None:
        region = abi.kvm_userspace_memory_region(slot, flags, gpa, size, host_addr)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region,
               f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {gpa:#x}, size {size:#x})")

    def get_dirty_log(self, slot: int, bitmap) -> None:
        """Fill BITMAP (a writable ctypes buffer, one bit per page of the slot)
        with the pages written since logging began or was last cleared."""
        _ioctl(self.fd, abi.KVM_GET_DIRTY_LOG,
               abi.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap)),
               f"KVM_GET_DIRTY_LOG(slot {slot})")

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap) -> None:
        """Write-protect again the pages set in BITMAP (its bit 0 is FIRST_PAGE,
        a multiple of 64), so that the next write to them is logged."""
        _ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG,
               abi.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                       dirty_bitmap=ctypes.addressof(bitmap)),
               f"KVM_CLEAR_DIRTY_LOG(slot {slot}, pages {first_page}+{num_pages})")

    def set_tss_addr(self, gpa: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_TSS_ADDR, gpa, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, gpa: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(gpa),
               "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_PIT2,
               abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY), "KVM_CREATE_PIT2")

    def enable_cap(self, cap: int, *args: int) -> None:
        arg = abi.kvm_enable_cap(cap=cap)
        for i, value in enumerate(args):
            arg.args[i] = value
        _ioctl(self.fd, abi.KVM_ENABLE_CAP, arg, f"KVM_ENABLE_CAP({cap})")

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq, level), "KVM_IRQ_LINE")

    def signal_msi(self, address: int, data: int) -> int:
        """Inject an MSI; returns >0 if delivered, 0 if the guest blocked it."""
        msi = abi.kvm_msi(address_lo=address & 0xFFFFFFFF,
                          address_hi=address >> 32, data=data)
        return _ioctl(self.fd, abi.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    def set_gsi_routing(self, entries: list) -> None:
        arg = _variable(abi.kvm_irq_routing, {"nr": len(entries)},
                        abi.kvm_irq_routing_entry, entries)
        _ioctl(self.fd, abi.KVM_SET_GSI_ROUTING, arg, "KVM_SET_GSI_ROUTING")

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None,
              deassign: bool = False) -> None:
        flags = abi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None:
            flags |= abi.KVM_IRQFD_FLAG_RESAMPLE
        arg = abi.kvm_irqfd(fd=fd, gsi=gsi, flags=flags,
                            resamplefd=resample_fd or 0)
        _ioctl(self.fd, abi.KVM_IRQFD, arg, "KVM_IRQFD")

    def ioeventfd(self, fd: int, addr: int, length: int, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        flags = abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length,
                                fd=fd, flags=flags)
        _ioctl(self.fd, abi.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def coalesce_writes(self, addr: int, size: int, pio: bool, remove: bool = False) -> None:
        """Writes to the zone go to the coalesced ring instead of exiting
        (KVM_REGISTER_COALESCED_MMIO), or, with remove, exit again."""
        request = abi.KVM_UNREGISTER_COALESCED_MMIO if remove else abi.KVM_REGISTER_COALESCED_MMIO
        arg = abi.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        _ioctl(self.fd, request, arg, "KVM_UNREGISTER_COALESCED_MMIO" if remove
               else "KVM_REGISTER_COALESCED_MMIO")

    def get_clock(self) -> abi.kvm_clock_data:
        clock = abi.kvm_clock_data()
        _ioctl(self.fd, abi.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        return clock

    def set_clock(self, clock: abi.kvm_clock_data) -> None:
        _ioctl(self.fd, abi.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        chip = abi.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        _ioctl(self.fd, abi.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> abi.kvm_pit_state2:
        state = abi.kvm_pit_state2()
        _ioctl(self.fd, abi.KVM_GET_PIT2, state, "KVM_GET_PIT2")
        return state

    def set_pit2(self, state: abi.kvm_pit_state2) -> None:
        _ioctl(self.fd, abi.KVM_SET_PIT2, state, "KVM_SET_PIT2")

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        return Vcpu(self, vcpu_id, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A KVM vCPU file descriptor and its mmap'd kvm_run page."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self.run_page = mmap.mmap(fd, vm.kvm.vcpu_mmap_size,
                                  mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_state = abi.kvm_run.from_buffer(self.run_page)

    def run(self) -> None:
        """KVM_RUN once; raises InterruptedError when kicked by a signal."""
        fcntl.ioctl(self.fd, abi.KVM_RUN)   # no argument: see vcpu._vm_loop

    def _get(self, request: int, ctype, what: str):
        value = ctype()
        _ioctl(self.fd, request, value, what)
        return value

    def get_regs(self) -> abi.kvm_regs:
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs, "KVM_GET_REGS")

    def set_regs(self, regs: abi.kvm_regs) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs, "KVM_GET_SREGS")

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get(abi.KVM_GET_FPU, abi.kvm_fpu, "KVM_GET_FPU")

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_lapic(self) -> abi.kvm_lapic_state:
        return self._get(abi.KVM_GET_LAPIC, abi.kvm_lapic_state, "KVM_GET_LAPIC")

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        _ioctl(self.fd, abi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        return self._get(abi.KVM_GET_MP_STATE, abi.kvm_mp_state,
                         "KVM_GET_MP_STATE").mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(state), "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        return self._get(abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events,
                         "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        _ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_xsave(self) -> abi.kvm_xsave:
        return self._get(abi.KVM_GET_XSAVE, abi.kvm_xsave, "KVM_GET_XSAVE")

    def set_xsave(self, xsave: abi.kvm_xsave) -> None:
        _ioctl(self.fd, abi.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> abi.kvm_xcrs:
        return self._get(abi.KVM_GET_XCRS, abi.kvm_xcrs, "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        _ioctl(self.fd, abi.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        entries = [abi.kvm_msr_entry(index=i) for i in indices]
        arg = _variable(abi.kvm_msrs, {"nmsrs": len(entries)}, abi.kvm_msr_entry, entries)
        done = _ioctl(self.fd, abi.KVM_GET_MSRS, arg, "KVM_GET_MSRS")
        return {arg.entries[i].index: arg.entries[i].data for i in range(done)}

    def set_msrs(self, values: dict[int, int]) -> int:
        entries = [abi.kvm_msr_entry(index=i, data=v) for i, v in values.items()]
        arg = _variable(abi.kvm_msrs, {"nmsrs": len(entries)}, abi.kvm_msr_entry, entries)
        return _ioctl(self.fd, abi.KVM_SET_MSRS, arg, "KVM_SET_MSRS")

    def set_cpuid2(self, entries: list) -> None:
        arg = _variable(abi.kvm_cpuid2, {"nent": len(entries)},
                        abi.kvm_cpuid_entry2, entries)
        _ioctl(self.fd, abi.KVM_SET_CPUID2, arg, "KVM_SET_CPUID2")

    def get_cpuid2(self) -> list:
        """The CPUID table KVM keeps for this vCPU, which is what the guest sees
        (a host module may have changed what KVM_SET_CPUID2 gave it)."""
        count = 256
        arg = _variable(abi.kvm_cpuid2, {"nent": count}, abi.kvm_cpuid_entry2,
                        [abi.kvm_cpuid_entry2()] * count)
        _ioctl(self.fd, abi.KVM_GET_CPUID2, arg, "KVM_GET_CPUID2")
        return [abi.kvm_cpuid_entry2.from_buffer_copy(arg.entries[i])
                for i in range(arg.header.nent)]

    def set_guest_debug(self, control: int, debugregs: list[int] | None = None) -> None:
        arg = abi.kvm_guest_debug(control=control)
        for i, value in enumerate(debugregs or []):
            arg.arch.debugreg[i] = value
        _ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, arg, "KVM_SET_GUEST_DEBUG")

    def translate(self, linear: int) -> abi.kvm_translation:
        arg = abi.kvm_translation(linear_address=linear)
        _ioctl(self.fd, abi.KVM_TRANSLATE, arg, "KVM_TRANSLATE")
        return arg

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE: the machine-check banks and MCG_CAP the guest reads."""
        _ioctl(self.fd, abi.KVM_X86_SETUP_MCE, ctypes.c_uint64(mcg_cap), "KVM_X86_SETUP_MCE")

    def nmi(self) -> None:
        _ioctl(self.fd, abi.KVM_NMI, 0, "KVM_NMI")

    def close(self) -> None:
        """Close the vCPU fd; the kvm_run mapping goes with its last reference."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
