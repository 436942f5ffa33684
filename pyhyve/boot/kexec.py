"""Direct kernel boot (`-f kexec,KERNEL[,INITRD[,"CMDLINE"]]`): read the files,
tell the kernel's format (kernelformat.py), hand it to its loader, and put
the BSP in the state that format's entry expects:
  * a bzImage with a 64-bit entry: long mode, identity-mapped 4 GiB, RSI =
    the zero page (linux.py);
  * a bzImage without one: real mode at its setup code, CS:IP =
    setup segment + 0x20:0 (linux.py);
  * a PVH ELF kernel: 32-bit protected mode, EBX = hvm_start_info (linux.py);
  * a multiboot kernel: 32-bit protected mode, EAX = 0x2BADB002, EBX = the
    multiboot information (multiboot.py).
Everything about the files is checked before any vCPU runs.
"""

import struct
from dataclasses import dataclass, field

from ..config import ConfigError, read_user_file
from ..memory import PAGE_SIZE
from .kernelformat import identify

GDT_ADDR = 0x500
PAGE_TABLES = 0x9000            # PML4, PDPT and four PDs: identity map of 4 GiB
CMDLINE_MAX = 0x10000


@dataclass
class BootEntry:
    """Where and how the BSP starts."""
    mode: str                   # "long", "protected" or "real"
    entry: int                  # RIP (in real mode, IP within the code segment)
    registers: dict[str, int] = field(default_factory=dict)    # e.g. {"rsi": zero page}
    segment: int = 0            # real mode: DS = ES = FS = GS = SS; CS = segment + 0x20


FITS = "the guest's memory size: it cannot fit"


def read_kernel(memory, kernel_path: str, cmdline: str):
    """The kernel file's bytes and format (kernelformat.KernelFormat), with the
    command line's length checked: ConfigError for anything pyhyve cannot boot."""
    image = read_user_file(kernel_path, "kernel", memory.size, FITS)
    if len(cmdline) + 1 > CMDLINE_MAX:
        raise ConfigError(f"kernel command line is {len(cmdline)} bytes, more than "
                          f"pyhyve's {CMDLINE_MAX - 1}")
    return image, identify(image, kernel_path)


def read_initrd(memory, initrd_path: str | None) -> bytes:
    return read_user_file(initrd_path, "initrd", memory.size, FITS) if initrd_path else b""


def load_kernel(memory, kernel_path: str, initrd_path: str | None, cmdline: str,
                e820: list[tuple[int, int, int]], rsdp: int = 0) -> BootEntry:
    """Load the kernel (and its initrd or multiboot modules) into guest memory;
    returns the BSP's entry."""
    from .linux import load_bzimage, load_pvh, load_realmode_bzimage
    from .multiboot import load_multiboot
    image, fmt = read_kernel(memory, kernel_path, cmdline)
    if fmt.kind == "multiboot":
        return load_multiboot(memory, fmt, image, kernel_path, initrd_path, cmdline, e820)
    initrd = read_initrd(memory, initrd_path)
    command = cmdline.encode() + b"\0"
    if fmt.kind == "pvh":
        return load_pvh(memory, fmt, initrd, command, e820, rsdp)
    if fmt.kind == "bzimage64":
        return load_bzimage(memory, fmt, image, initrd, command, e820, rsdp)
    return load_realmode_bzimage(memory, fmt, image, initrd, cmdline)


def set_boot_state(memory, vcpu, entry: BootEntry) -> None:
    """Registers for the BSP at a kernel entry: flat segments, long mode with
    identity-mapped 4 GiB (64-bit bzImage), 32-bit protected mode without
    paging (PVH, multiboot), or real mode at a bzImage's setup code."""
    sregs = vcpu.get_sregs()
    if entry.mode == "real":
        _real_mode(sregs, entry.segment)
    else:
        # GDT: null, null, 0x10 code (64-bit or 32-bit), 0x18 data (Linux's __BOOT_CS/DS)
        code = 0x00AF9B000000FFFF if entry.mode == "long" else 0x00CF9B000000FFFF
        memory.write(GDT_ADDR, struct.pack("<QQQQ", 0, 0, code, 0x00CF93000000FFFF))
        for name in ("ds", "es", "fs", "gs", "ss"):
            _flat(getattr(sregs, name), 0x18, 3, long_mode=False)
        _flat(sregs.cs, 0x10, 11, long_mode=entry.mode == "long")
        sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 4 * 8 - 1
        sregs.idt.base, sregs.idt.limit = 0, 0
        sregs.cr0 = 0x11 | 0x20                    # PE, ET, NE
    if entry.mode == "long":
        _identity_page_tables(memory)
        sregs.cr3 = PAGE_TABLES
        sregs.cr4 = 1 << 5                     # PAE
        sregs.efer = (1 << 8) | (1 << 10)      # LME, LMA
        sregs.cr0 |= 1 << 31                   # PG
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = entry.entry
    regs.rflags = 0x2                          # interrupts off
    for name, value in entry.registers.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)


def _real_mode(sregs, segment: int) -> None:
    """Real mode, as a 16-bit boot loader leaves it: DS = ES = FS = GS = SS =
    the setup segment, CS = segment + 0x20 (the code after the boot sector)."""
    for name in ("ds", "es", "fs", "gs", "ss"):
        _real_segment(getattr(sregs, name), segment, 3)
    _real_segment(sregs.cs, segment + 0x20, 11)
    sregs.idt.base, sregs.idt.limit = 0, 0x3FF     # the real-mode interrupt vector table
    sregs.cr0 = 0x60000010                         # CD, NW, ET: the reset value, PE off
    sregs.cr4, sregs.efer = 0, 0


def _real_segment(segment, selector: int, kind: int) -> None:
    segment.selector, segment.base, segment.limit = selector, selector << 4, 0xFFFF
    segment.type, segment.present, segment.dpl, segment.s = kind, 1, 0, 1
    segment.l, segment.db, segment.g = 0, 0, 0


def _flat(segment, selector: int, kind: int, long_mode: bool) -> None:
    segment.base, segment.limit, segment.selector = 0, 0xFFFFFFFF, selector
    segment.type, segment.present, segment.dpl, segment.s = kind, 1, 0, 1
    segment.l = 1 if long_mode else 0
    segment.db = 0 if long_mode else 1
    segment.g = 1


def _identity_page_tables(memory) -> None:
    """PML4 -> PDPT -> 4 PDs of 2 MiB pages: the first 4 GiB mapped 1:1."""
    pml4, pdpt = PAGE_TABLES, PAGE_TABLES + PAGE_SIZE
    memory.write(pml4, struct.pack("<Q", pdpt | 3).ljust(PAGE_SIZE, b"\0"))
    directories = [pdpt + PAGE_SIZE * (1 + i) for i in range(4)]
    memory.write(pdpt, struct.pack("<4Q", *(d | 3 for d in directories)).ljust(PAGE_SIZE, b"\0"))
    for gib, directory in enumerate(directories):
        entries = [((gib << 30) + (i << 21)) | 0x83 for i in range(512)]
        memory.write(directory, struct.pack("<512Q", *entries))
