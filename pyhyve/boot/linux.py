"""Direct kernel boot (`-f kexec,KERNEL[,INITRD[,"CMDLINE"]]`).

Two formats, as Firecracker and QEMU load them without firmware:
  * a bzImage, per the Linux x86 boot protocol (Documentation/arch/x86/boot.rst):
    the protected-mode kernel at 1 MiB, a zero page (struct boot_params) with
    the setup header, e820 map, command line and initrd, and the BSP at the
    64-bit entry (load address + 0x200) in long mode with identity page
    tables and a flat GDT built by pyhyve, RSI pointing at the zero page;
  * an uncompressed ELF kernel with a PVH entry (XEN_ELFNOTE_PHYS32_ENTRY),
    started in 32-bit protected mode without paging, EBX pointing at an
    hvm_start_info with the memory map, command line, modules and RSDP.
Everything about the files is checked before any vCPU runs; problems are
ConfigErrors with one clear line.
"""

import struct
from dataclasses import dataclass

from ..config import ConfigError, read_user_file
from ..layout import MiB
from ..memory import PAGE_SIZE

# Guest-physical addresses of what pyhyve builds (all below 1 MiB, like QEMU's).
GDT_ADDR = 0x500
PVH_START_INFO = 0x6000
ZERO_PAGE = 0x7000
PAGE_TABLES = 0x9000            # PML4, PDPT and four PDs: identity map of 4 GiB
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
KERNEL_ADDR = 1 * MiB
E820_MAX_ENTRIES = 128

# boot_params / setup header offsets
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
ACPI_RSDP_ADDR = 0x070          # boot_params.acpi_rsdp_addr, protocol 2.14+
HEADER_MAGIC = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
PREF_ADDRESS = 0x258            # protocol 2.10+, as init_size
INIT_SIZE = 0x260
E820_ENTRIES = 0x1E8
E820_TABLE = 0x2D0
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
MIN_PROTOCOL = 0x0206

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
E820_RAM, E820_RESERVED = 1, 2


@dataclass
class BootEntry:
    """Where and how the BSP starts."""
    mode: str                  # "long" (bzImage) or "protected" (PVH)
    entry: int
    argument: int              # RSI for bzImage, EBX for PVH


def load_kernel(memory, kernel_path: str, initrd_path: str | None, cmdline: str,
                e820: list[tuple[int, int, int]], rsdp: int = 0) -> BootEntry:
    """Load a bzImage or PVH ELF kernel into guest memory; returns the BSP's entry."""
    fits = "the guest's memory size: it cannot fit"
    image = read_user_file(kernel_path, "kernel", memory.size, fits)
    initrd = read_user_file(initrd_path, "initrd", memory.size, fits) if initrd_path else b""
    command = cmdline.encode() + b"\0"
    if len(command) > CMDLINE_MAX:
        raise ConfigError(f"kernel command line is {len(command) - 1} bytes, more than "
                          f"pyhyve's {CMDLINE_MAX - 1}")
    if image[:4] == b"\x7fELF":
        return _load_pvh(memory, kernel_path, image, initrd, command, e820, rsdp)
    if len(image) > HEADER_MAGIC + 4 and image[HEADER_MAGIC:HEADER_MAGIC + 4] == b"HdrS":
        return _load_bzimage(memory, kernel_path, image, initrd, command, e820, rsdp)
    raise ConfigError(f"kernel {kernel_path} is neither a bzImage nor an ELF file")


def _place_initrd(memory, initrd: bytes, limit: int, kernel_end: int) -> int:
    """The highest page-aligned address below `limit` where the initrd fits in RAM."""
    top = min(limit + 1, memory.lowmem_size)
    address = (top - len(initrd)) & ~(PAGE_SIZE - 1)
    if address < kernel_end or not memory.is_ram(address, len(initrd)):
        raise ConfigError(f"initrd of {len(initrd)} bytes does not fit in guest memory "
                          f"below {top:#x} (use a larger -m)")
    memory.write(address, initrd)
    return address


def _load_bzimage(memory, path: str, image: bytes, initrd: bytes, command: bytes,
                  e820: list, rsdp: int) -> BootEntry:
    if len(image) < INIT_SIZE + 4:
        # Too short to hold the header fields read below.
        raise ConfigError(f"kernel {path}: truncated bzImage ({len(image)} bytes)")
    version = struct.unpack_from("<H", image, VERSION)[0]
    if struct.unpack_from("<H", image, BOOT_FLAG)[0] != 0xAA55:
        raise ConfigError(f"kernel {path}: bad boot sector signature")
    if version < MIN_PROTOCOL:
        raise ConfigError(f"kernel {path} speaks boot protocol {version >> 8}.{version & 0xFF:02d};"
                          " pyhyve needs 2.06 or later")
    if not image[LOADFLAGS] & LOADED_HIGH:
        raise ConfigError(f"kernel {path} is a zImage (not loaded high); use a bzImage")
    if not struct.unpack_from("<H", image, XLOADFLAGS)[0] & XLF_KERNEL_64:
        raise ConfigError(f"kernel {path} has no 64-bit entry point (XLF_KERNEL_64)")
    cmdline_size = struct.unpack_from("<I", image, CMDLINE_SIZE)[0]
    if len(command) - 1 > cmdline_size:
        raise ConfigError(f"kernel command line is {len(command) - 1} bytes; this kernel "
                          f"takes at most {cmdline_size}")
    setup_sects = image[SETUP_SECTS] or 4
    kernel = image[(setup_sects + 1) * 512:]
    if not kernel:
        raise ConfigError(f"kernel {path}: no protected-mode code after the setup sectors")
    # The kernel needs init_size bytes from where it runs (the load address, or
    # pref_address where a relocatable kernel decompresses itself), not just
    # the file's bytes: the initrd must stay clear of all of it.
    kernel_end = KERNEL_ADDR + len(kernel)
    if version >= 0x020A:
        init_size = struct.unpack_from("<I", image, INIT_SIZE)[0]
        pref_address = struct.unpack_from("<Q", image, PREF_ADDRESS)[0]
        kernel_end = max(kernel_end, max(KERNEL_ADDR, pref_address) + init_size)
    if not memory.is_ram(KERNEL_ADDR, kernel_end - KERNEL_ADDR):
        raise ConfigError(f"kernel {path} needs {kernel_end - KERNEL_ADDR} bytes at "
                          f"{KERNEL_ADDR:#x}, more than guest memory holds")
    memory.write(KERNEL_ADDR, kernel)

    header_end = 0x202 + image[0x201]          # the jump at 0x200 gives the header's length
    zero_page = bytearray(PAGE_SIZE)
    zero_page[SETUP_SECTS:header_end] = image[SETUP_SECTS:header_end]
    zero_page[TYPE_OF_LOADER] = 0xFF
    struct.pack_into("<I", zero_page, CMD_LINE_PTR, CMDLINE_ADDR)
    memory.write(CMDLINE_ADDR, command)
    if initrd:
        limit = struct.unpack_from("<I", image, INITRD_ADDR_MAX)[0]
        address = _place_initrd(memory, initrd, limit, kernel_end)
        struct.pack_into("<II", zero_page, RAMDISK_IMAGE, address, len(initrd))
    if rsdp and version >= 0x020E:
        struct.pack_into("<Q", zero_page, ACPI_RSDP_ADDR, rsdp)
    entries = e820[:E820_MAX_ENTRIES]
    zero_page[E820_ENTRIES] = len(entries)
    for index, (address, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", zero_page, E820_TABLE + 20 * index, address, size, kind)
    memory.write(ZERO_PAGE, bytes(zero_page))
    return BootEntry("long", KERNEL_ADDR + 0x200, ZERO_PAGE)


def _elf_entry_note(image: bytes, path: str) -> tuple[list, int]:
    """PT_LOAD segments and the PVH entry of an ELF32/ELF64 kernel."""
    if len(image) < 0x34 or image[4] not in (1, 2) or image[5] != 1:
        raise ConfigError(f"kernel {path}: not a little-endian ELF32/ELF64 file")
    is64 = image[4] == 2
    try:
        if is64:
            phoff, = struct.unpack_from("<Q", image, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
            header = struct.Struct("<IIQQQQQQ")          # type flags off vaddr paddr filesz memsz
        else:
            phoff, = struct.unpack_from("<I", image, 0x1C)
            phentsize, phnum = struct.unpack_from("<HH", image, 0x2A)
            header = struct.Struct("<IIIIIIII")          # type off vaddr paddr filesz memsz ...
        segments, entry = [], None
        for index in range(phnum):
            fields = header.unpack_from(image, phoff + index * phentsize)
            if is64:
                kind, _, offset, _, paddr, filesz, memsz, _ = fields
            else:
                kind, offset, _, paddr, filesz, memsz, _, _ = fields
            if kind == 1:
                segments.append((paddr, image[offset:offset + filesz], memsz))
            elif kind == 4:
                entry = entry or _find_pvh_note(image[offset:offset + filesz])
    except struct.error:
        raise ConfigError(f"kernel {path}: truncated ELF headers") from None
    if entry is None:
        raise ConfigError(f"kernel {path} is an ELF file without a PVH entry point "
                          "(XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH")
    return segments, entry


def _find_pvh_note(notes: bytes) -> int | None:
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, at)
        name_at = at + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        if notes[name_at:name_at + namesz].rstrip(b"\0") == b"Xen" and \
                kind == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
            return int.from_bytes(notes[desc_at:desc_at + descsz], "little") & 0xFFFFFFFF
        at = desc_at + ((descsz + 3) & ~3)
    return None


def _load_pvh(memory, path: str, image: bytes, initrd: bytes, command: bytes, e820: list,
              rsdp: int) -> BootEntry:
    segments, entry = _elf_entry_note(image, path)
    kernel_end = 0
    for paddr, data, memsz in segments:
        if not memory.is_ram(paddr, max(memsz, len(data))):
            raise ConfigError(f"kernel {path}: segment at {paddr:#x} is outside guest memory")
        memory.write(paddr, data)
        memory.write(paddr + len(data), bytes(max(memsz - len(data), 0)))
        kernel_end = max(kernel_end, paddr + memsz)
    memory.write(CMDLINE_ADDR, command)
    memmap_at = PVH_START_INFO + 0x100
    modules_at = memmap_at + 24 * len(e820)
    for index, (address, size, kind) in enumerate(e820):
        struct.pack_into("<QQII", memory.view(memmap_at + 24 * index, 24, write=True), 0,
                         address, size, kind, 0)
    modules = 0
    if initrd:
        address = _place_initrd(memory, initrd, memory.lowmem_size - 1, kernel_end)
        memory.write(modules_at, struct.pack("<QQQQ", address, len(initrd), 0, 0))
        modules = 1
    start_info = struct.pack("<IIIIQQQQII", HVM_START_MAGIC, 1, 0, modules,
                             modules_at if modules else 0, CMDLINE_ADDR, rsdp,
                             memmap_at, len(e820), 0)
    memory.write(PVH_START_INFO, start_info)
    return BootEntry("protected", entry, PVH_START_INFO)


def set_boot_state(memory, vcpu, entry: BootEntry) -> None:
    """Registers for the BSP at a kernel entry: flat segments, long mode with
    identity-mapped 4 GiB for a bzImage, 32-bit protected mode for PVH."""
    # GDT: null, null, 0x10 code (64-bit or 32-bit), 0x18 data (Linux's __BOOT_CS/DS)
    code = 0x00AF9B000000FFFF if entry.mode == "long" else 0x00CF9B000000FFFF
    memory.write(GDT_ADDR, struct.pack("<QQQQ", 0, 0, code, 0x00CF93000000FFFF))
    sregs = vcpu.get_sregs()
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
    regs.rflags = 0x2
    if entry.mode == "long":
        regs.rsi = entry.argument
    else:
        regs.rbx = entry.argument
    vcpu.set_regs(regs)


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
