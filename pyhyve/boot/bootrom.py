"""Bootrom loading (bhyve's -l bootrom,FILE[,VARS]) and the x86 reset state.

The image is mapped read-only so that it ends at 4 GiB, and a variable file,
when given, just below it (devices/bootvars.py); as in bhyve, both fit in
the 16 MiB below 4 GiB, clear of the I/O APIC, HPET and local APIC
windows.  The BSP starts where a real CPU does after reset: CS selector
0xF000 with base 0xFFFF0000 and RIP 0xFFF0, i.e. 16 bytes below 4 GiB.
"""

import mmap
import os

from ..config import ConfigError
from ..layout import MiB
from ..memory import PAGE_SIZE

MAX_BOOTROM_SIZE = 16 * MiB        # bhyve's ROM region: bootrom and variables together


def load_bootrom(path: str) -> mmap.mmap:
    """Read a bootrom image into an anonymous mapping; errors are user errors."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise ConfigError(f"bootrom {path} is empty")
            if size > MAX_BOOTROM_SIZE:
                raise ConfigError(f"bootrom {path} is {size} bytes, more than the "
                                  f"{MAX_BOOTROM_SIZE // MiB} MiB limit")
            if size % PAGE_SIZE:
                raise ConfigError(f"bootrom {path} is {size} bytes, not a multiple "
                                  f"of the {PAGE_SIZE}-byte page size")
            rom = mmap.mmap(-1, size)
            rom[:] = file.read(size)
            return rom
    except OSError as exc:
        raise ConfigError(f"cannot read bootrom {path}: {exc.strerror}") from None


def open_bootvars(path: str, rom_size: int):
    """The variable file, open for reading and writing and mapped shared (the
    guest's writes reach it through the mapping); sizes are checked as bhyve
    does, and every problem is a user error."""
    try:
        file = open(path, "r+b")
    except OSError as exc:
        raise ConfigError(f"cannot open bootrom variable file {path}: {exc.strerror}") from None
    try:
        size = os.fstat(file.fileno()).st_size
        if size == 0 or size % PAGE_SIZE:
            raise ConfigError(f"bootrom variable file {path} is {size} bytes, not a "
                              f"non-zero multiple of the {PAGE_SIZE}-byte page size")
        if rom_size + size > MAX_BOOTROM_SIZE:
            raise ConfigError(f"bootrom and variable file {path} are {rom_size + size} "
                              f"bytes together, more than the {MAX_BOOTROM_SIZE // MiB} MiB "
                              "ROM region")
        backing = mmap.mmap(file.fileno(), size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        file.close()
        raise ConfigError(f"cannot map bootrom variable file {path}: {exc.strerror}") from None
    except ConfigError:
        file.close()
        raise
    return file, backing


CODE_SEGMENT, DATA_SEGMENT = 0xB, 0x3     # execute/read and read/write, accessed


def set_reset_state(vcpu) -> None:
    """Put a vCPU in the architectural reset state (real mode, reset vector)."""
    set_real_mode_entry(vcpu, 0xF000, 0xFFF0, cs_base=0xFFFF0000)


def set_real_mode_entry(vcpu, segment: int, offset: int, cs_base: int | None = None) -> None:
    """A vCPU in real mode as at reset, paging and long mode off whatever it
    ran before, but starting at SEGMENT:OFFSET (CS's base SEGMENT << 4 unless
    given: the reset vector's is 0xFFFF0000)."""
    sregs = vcpu.get_sregs()
    for register, selector, kind in ((sregs.cs, segment, CODE_SEGMENT),
                                     *((data, 0, DATA_SEGMENT) for data in (
                                         sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss))):
        register.selector, register.base, register.limit = selector, selector << 4, 0xFFFF
        register.type, register.present, register.s = kind, 1, 1
        register.dpl = register.db = register.l = register.g = register.avl = 0
        register.unusable = 0
    if cs_base is not None:
        sregs.cs.base = cs_base
    for table in (sregs.gdt, sregs.idt):
        table.base, table.limit = 0, 0xFFFF
    sregs.cr0 = 0x60000010
    sregs.cr3 = sregs.cr4 = sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = offset
    regs.rflags = 0x2
    regs.rdx = 0x600        # family 6 in the reset signature, as QEMU reports
    vcpu.set_regs(regs)
