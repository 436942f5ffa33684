"""The KVM userspace ABI (linux/kvm.h, asm/kvm.h for x86-64) as ctypes.

Everything pyhyve passes to or reads from a KVM file descriptor is declared
here and nowhere else; tests/test_kvm_abi.py compiles a C program against
the kernel headers and checks every size and ioctl number below.
"""

import ctypes
from ctypes import (Structure, Union, c_char, c_int32, c_uint8, c_uint16,
                    c_uint32, c_uint64)

u8, u16, u32, u64, s32 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32

# --- ioctl number encoding (asm-generic/ioctl.h) ---------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, ctype) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(ctype))


def _iow(nr: int, ctype) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(ctype))


def _iowr(nr: int, ctype) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(ctype))


# --- exit reasons -----------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

EXIT_REASON_NAMES = {v: k[len("KVM_EXIT_"):].lower()
                     for k, v in dict(globals()).items()
                     if k.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

# --- capabilities -----------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15      # the value is the ring's page in a vCPU's mmap
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_MCE = 31
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_COALESCED_PIO = 162

# --- memory -------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_userspace_memory_region(Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_dirty_log(Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0


# --- registers ----------------------------------------------------------------
class kvm_regs(Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")]


class kvm_segment(Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16),
                ("type", u8), ("present", u8), ("dpl", u8), ("db", u8),
                ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class kvm_dtable(Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64),
                ("cr8", u64), ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(Structure):
    _fields_ = [("fpr", u8 * 16 * 8), ("fcw", u16), ("fsw", u16),
                ("ftwx", u8), ("pad1", u8), ("last_opcode", u16),
                ("last_ip", u64), ("last_dp", u64), ("xmm", u8 * 16 * 16),
                ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(Structure):
    """Header of a variable-length MSR list; entries follow it."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(Structure):
    """Header of KVM_GET_MSR_INDEX_LIST; u32 indices follow it."""
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32),
                ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32),
                ("padding", u32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class kvm_cpuid2(Structure):
    """Header of a variable-length CPUID list; entries follow it."""
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_lapic_state(Structure):
    _fields_ = [("regs", c_char * 1024)]


class kvm_mp_state(Structure):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class _exception_events(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8),
                ("pending", u8), ("error_code", u32)]


class _interrupt_events(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _nmi_events(Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _smi_events(Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8),
                ("latched_init", u8)]


class kvm_vcpu_events(Structure):
    _fields_ = [("exception", _exception_events),
                ("interrupt", _interrupt_events), ("nmi", _nmi_events),
                ("sipi_vector", u32), ("flags", u32), ("smi", _smi_events),
                ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_xsave(Structure):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16),
                ("padding", u64 * 16)]


class kvm_translation(Structure):
    _fields_ = [("linear_address", u64), ("physical_address", u64),
                ("valid", u8), ("writeable", u8), ("usermode", u8),
                ("pad", u8 * 5)]


class kvm_interrupt(Structure):
    _fields_ = [("irq", u32)]


class kvm_signal_mask(Structure):
    """Header of KVM_SET_SIGNAL_MASK; the sigset bytes follow it."""
    _fields_ = [("len", u32)]


# --- guest debug --------------------------------------------------------------
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000


class kvm_guest_debug_arch(Structure):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(Structure):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_debug_exit_arch(Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64),
                ("dr7", u64)]


# --- interrupts ---------------------------------------------------------------
class kvm_irq_level(Structure):
    _fields_ = [("irq", u32), ("level", s32)]


class kvm_pic_state(Structure):
    _fields_ = [(name, u8) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base",
        "read_reg_select", "poll", "special_mask", "init_state", "auto_eoi",
        "rotate_on_auto_eoi", "special_fully_nested_mode", "init4",
        "elcr", "elcr_mask")]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(Structure):
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32),
                ("irr", u32), ("pad", u32),
                ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS)]


class _irqchip_union(Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state),
                ("ioapic", kvm_ioapic_state)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irqchip(Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_union)]


class kvm_pit_config(Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_pit_channel_state(Structure):
    _fields_ = [("count", u32), ("latched_count", u16),
                ("count_latched", u8), ("status_latched", u8), ("status", u8),
                ("read_state", u8), ("write_state", u8), ("write_latch", u8),
                ("rw_mode", u8), ("mode", u8), ("bcd", u8), ("gate", u8),
                ("count_load_time", ctypes.c_int64)]


KVM_PIT_FLAGS_HPET_LEGACY = 1     # the HPET's legacy route has taken IRQ 0: PIT channel 0 is silent


class kvm_pit_state2(Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32),
                ("reserved", u32 * 9)]


class kvm_clock_data(Structure):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32),
                ("realtime", u64), ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_msi(Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32),
                ("flags", u32), ("devid", u32), ("pad", u8 * 12)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2


class kvm_irq_routing_irqchip(Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32),
                ("devid", u32)]


class _routing_union(Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip),
                ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32),
                ("u", _routing_union)]


class kvm_irq_routing(Structure):
    """Header of KVM_SET_GSI_ROUTING; entries follow it."""
    _fields_ = [("nr", u32), ("flags", u32)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_irqfd(Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32),
                ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_ioeventfd(Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
                ("flags", u32), ("pad", u8 * 36)]


class kvm_coalesced_mmio_zone(Structure):
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class kvm_coalesced_mmio(Structure):
    """One queued write in the coalesced ring."""
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(Structure):
    """The ring page's header; kvm_coalesced_mmio entries follow it to the page's end."""
    _fields_ = [("first", u32), ("last", u32)]


class kvm_enable_cap(Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4),
                ("pad", u8 * 64)]


KVM_MSR_EXIT_REASON_ALL = (KVM_MSR_EXIT_REASON_INVAL |
                           KVM_MSR_EXIT_REASON_UNKNOWN |
                           KVM_MSR_EXIT_REASON_FILTER)


# --- struct kvm_run -----------------------------------------------------------
class _exit_hw(Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _exit_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _exit_ex(Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _exit_io(Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16),
                ("count", u32), ("data_offset", u64)]


class _exit_debug(Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _exit_mmio(Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32),
                ("is_write", u8)]


class _exit_hypercall(Structure):
    _fields_ = [("nr", u64), ("args", u64 * 6), ("ret", u64),
                ("longmode", u32), ("pad", u32)]


class _exit_internal(Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_system_event(Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_msr(Structure):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32),
                ("index", u32), ("data", u64)]


class _exit_union(Union):
    _fields_ = [("hw", _exit_hw), ("fail_entry", _exit_fail_entry),
                ("ex", _exit_ex), ("io", _exit_io), ("debug", _exit_debug),
                ("mmio", _exit_mmio), ("hypercall", _exit_hypercall),
                ("internal", _exit_internal),
                ("system_event", _exit_system_event), ("msr", _exit_msr),
                ("padding", c_char * 256)]


class kvm_run(Structure):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64),
                ("u", _exit_union), ("kvm_valid_regs", u64),
                ("kvm_dirty_regs", u64), ("s", c_char * 2048)]


# Byte offsets inside kvm_run that the vm_loop reads with struct.unpack_from.
RUN_OFFSET_IMMEDIATE_EXIT = kvm_run.immediate_exit.offset
RUN_OFFSET_EXIT_REASON = kvm_run.exit_reason.offset
RUN_OFFSET_EXIT_UNION = kvm_run.u.offset

# --- ioctl numbers ----------------------------------------------------------------
# system (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
KVM_X86_GET_MCE_CAP_SUPPORTED = _ior(0x9D, c_uint64)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _iowr(0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, kvm_irqchip)
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, kvm_coalesced_mmio_zone)
KVM_IRQ_LINE_STATUS = _iowr(0x67, kvm_irq_level)
KVM_SET_GSI_ROUTING = _iow(0x6A, kvm_irq_routing)
KVM_IRQFD = _iow(0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)
KVM_IOEVENTFD = _iow(0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _iow(0x7B, kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, kvm_pit_state2)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, kvm_clear_dirty_log)
KVM_SIGNAL_MSI = _iow(0xA5, kvm_msi)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_TRANSLATE = _iowr(0x85, kvm_translation)
KVM_INTERRUPT = _iow(0x86, kvm_interrupt)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_SET_SIGNAL_MASK = _iow(0x8B, kvm_signal_mask)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _iowr(0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_NMI = _io(0x9A)
KVM_X86_SETUP_MCE = _iow(0x9C, c_uint64)
KVM_SET_GUEST_DEBUG = _iow(0x9B, kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, kvm_xcrs)
