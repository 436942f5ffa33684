"""Multiboot version 1 kernels (the Multiboot Specification 0.6.96), loaded
as GRUB and QEMU's -kernel load them.

The header (magic 0x1BADB002, flags, checksum) lies 4-byte aligned in the
file's first 8 KiB.  The kernel's bytes come from its ELF program headers,
or, where flag bit 16 is set, from the header's own address fields (the
"a.out kludge": the file from header_addr - load_addr before the header,
up to load_end_addr, then zeros up to bss_end_addr).  Modules follow the
kernel, each page-aligned; then the multiboot information block with the
memory sizes, the memory map (pyhyve's e820), the command line, the module
list and the boot loader's name.  The BSP starts in 32-bit protected mode
without paging, EAX = 0x2BADB002, EBX = the information block.  With a
bootrom, firmwarekernel.py hands the same layout (multiboot_image) to QEMU's
multiboot ROM, which takes the memory sizes and map from the BIOS.

Every address the file names is checked against the guest's RAM before
anything is written; problems are ConfigErrors with one line.
"""

import os
import struct
from dataclasses import dataclass

from ..config import ConfigError, read_user_file
from ..memory import PAGE_SIZE

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8 * 1024
FLAG_PAGE_ALIGN = 1 << 0        # modules on page boundaries (pyhyve always does so)
FLAG_MEMORY_INFO = 1 << 1       # mem_lower/mem_upper and the memory map
FLAG_VIDEO_MODE = 1 << 2        # a video mode: optional to honour; pyhyve has no display
FLAG_ADDRESSES = 1 << 16        # the a.out kludge's address fields are valid
REQUIRED_FLAGS = 0xFFFF         # bits a loader that cannot honour them must refuse
HONOURED_FLAGS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

INFO_MEMORY, INFO_CMDLINE, INFO_MODS, INFO_MMAP, INFO_LOADER_NAME = (
    1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9)
INFO_SIZE = 0x78                # through the framebuffer fields, all left zero
LOADER_NAME = b"pyhyve\0"
LOW_RESERVED = 0x1000           # page 0: real-mode IVT, and pyhyve's GDT at 0x500
FOUR_GIB = 1 << 32
E820_RAM = 1


@dataclass
class Header:
    offset: int                 # in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(image: bytes, path: str, what: str) -> Header | None:
    """The multiboot header within the first 8 KiB, None if the file has none;
    ConfigError for one that is there but broken (bad checksum, too late)."""
    bad = None
    for offset in _magic_offsets(image, 0, min(len(image), SEARCH_LIMIT)):
        flags, checksum = struct.unpack_from("<II", image, offset + 4)
        if (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
            return _read_header(image, offset, flags, path, what)
        bad = bad or (offset, checksum, -(HEADER_MAGIC + flags) & 0xFFFFFFFF)
    if bad:
        offset, checksum, expected = bad
        raise ConfigError(f"kernel {path}: {what} with a multiboot header at offset {offset:#x} "
                          f"whose checksum is {checksum:#x}, not {expected:#x}")
    for offset in _magic_offsets(image, SEARCH_LIMIT, len(image)):
        flags, checksum = struct.unpack_from("<II", image, offset + 4)
        if (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
            raise ConfigError(f"kernel {path}: {what} with a multiboot header at offset "
                              f"{offset:#x}, beyond the first 8 KiB where loaders look for it")
    return None


def _magic_offsets(image: bytes, start: int, end: int):
    """4-byte aligned offsets of the header magic with room for flags and checksum."""
    magic = struct.pack("<I", HEADER_MAGIC)
    at = image.find(magic, start, end)
    while at >= 0:
        if at % 4 == 0 and at + 12 <= len(image):
            yield at
        at = image.find(magic, at + 1, end)


def _read_header(image: bytes, offset: int, flags: int, path: str, what: str) -> Header:
    header = Header(offset, flags)
    if flags & FLAG_ADDRESSES:
        if offset + 32 > len(image):
            raise ConfigError(f"kernel {path}: {what} whose multiboot header at {offset:#x} "
                              "is cut short before its address fields")
        (header.header_addr, header.load_addr, header.load_end_addr, header.bss_end_addr,
         header.entry_addr) = struct.unpack_from("<5I", image, offset + 12)
    return header


def parse_modules(spec: str) -> list[tuple[str, str]]:
    """QEMU's -initrd for multiboot: modules separated by ',' (',,' for a comma
    in an argument), each its path then, after a space, its arguments.  Returns
    (path, the module's string: path and arguments, as GRUB and QEMU pass it)."""
    modules = []
    for item in spec.replace(",,", "\0").split(","):
        item = item.replace("\0", ",")
        path = item.split(" ", 1)[0]
        if not path:
            raise ConfigError(f"multiboot modules '{spec}': an empty module path "
                              "(modules are 'PATH [ARGS],PATH [ARGS]', ',,' for a comma)")
        modules.append((path, item))
    return modules


@dataclass
class MultibootImage:
    """A multiboot kernel laid out in guest memory: its segments, its modules
    (each page-aligned after the kernel), and the information block: the
    fixed structure and its tail (module list, memory map, strings), which
    follows the modules."""
    segments: list[tuple[int, bytes, int]]      # (address, bytes, size in memory)
    entry: int
    modules: list[tuple[int, bytes]]            # (address, bytes)
    information: bytes                          # the fixed structure
    tail_addr: int
    tail: bytes

    def span(self) -> tuple[int, int]:
        """The lowest address of the image and where its tail ends."""
        return min(address for address, _, _ in self.segments), self.tail_addr + len(self.tail)


def multiboot_image(memory, fmt, image: bytes, kernel_path: str, modules_spec: str | None,
                    cmdline: str, e820: list[tuple[int, int, int]],
                    firmware_mmap: int | None = None) -> MultibootImage:
    """Lay out a multiboot kernel, its modules and the information block,
    checking every address against the RAM in `e820` (ConfigError).  The
    memory map is `e820`, in the tail; or, with `firmware_mmap`, the one
    firmware writes there (QEMU's multiboot ROM asks the BIOS for it), and
    the fixed structure goes apart from the tail, wherever the caller puts it."""
    header = fmt.header
    unsupported = header.flags & REQUIRED_FLAGS & ~HONOURED_FLAGS
    if unsupported:
        bits = ", ".join(str(bit) for bit in range(16) if unsupported >> bit & 1)
        raise fmt.error(f"its header requires features pyhyve does not provide "
                        f"(flags {header.flags:#x}: bit {bits})")
    ram = [(max(start, LOW_RESERVED), min(start + size, FOUR_GIB))
           for start, size, kind in e820 if kind == E820_RAM]
    ram = [(start, end) for start, end in ram if start < end]
    segments, entry = _segments(fmt, image)
    for address, data, memsz in segments:
        if not _inside(ram, address, memsz):
            raise fmt.error(f"it loads {memsz:#x} bytes at {address:#x}, outside the guest's "
                            f"RAM ({_ranges(ram)})")
    if not any(address <= entry < address + memsz for address, _, memsz in segments):
        raise fmt.error(f"its entry point {entry:#x} is outside the loaded image")
    kernel_end = max(address + memsz for address, _, memsz in segments)

    fits = "the guest's memory size: it cannot fit"
    modules = [(read_user_file(path, "multiboot module", memory.size, fits), string)
               for path, string in (parse_modules(modules_spec) if modules_spec else [])]
    command = os.fsencode(f"{kernel_path} {cmdline}" if cmdline else kernel_path) + b"\0"
    strings = [command, LOADER_NAME, *(os.fsencode(string) + b"\0" for _, string in modules)]
    mmap = e820 if firmware_mmap is None else []
    fixed_size = INFO_SIZE if firmware_mmap is None else 0
    tail_size = 16 * len(modules) + 24 * len(mmap) + sum(map(len, strings))

    placed, cursor = [], kernel_end
    for data, _ in modules:
        address = _place(ram, cursor, len(data))
        if address is None:
            raise fmt.error(_no_room(modules, kernel_end, fixed_size + tail_size))
        placed.append(address)
        cursor = address + len(data)
    info = _place(ram, cursor, fixed_size + tail_size)
    if info is None:
        raise fmt.error(_no_room(modules, kernel_end, fixed_size + tail_size))
    tail_addr = info + fixed_size
    mmap_at = tail_addr + 16 * len(modules) if firmware_mmap is None else firmware_mmap
    information, tail = _information(tail_addr, mmap_at, mmap, e820, strings, placed, modules)
    return MultibootImage(segments, entry, [(address, data) for address, (data, _)
                                            in zip(placed, modules)],
                          information, tail_addr, tail)


def load_multiboot(memory, fmt, image: bytes, kernel_path: str, modules_spec: str | None,
                   cmdline: str, e820: list[tuple[int, int, int]]):
    """Load a multiboot kernel, its modules and the information block; returns
    the BSP's BootEntry."""
    from .kexec import BootEntry
    layout = multiboot_image(memory, fmt, image, kernel_path, modules_spec, cmdline, e820)
    for address, data, memsz in layout.segments:
        memory.write(address, data)
        memory.write(address + len(data), bytes(memsz - len(data)))
    for address, data in layout.modules:
        memory.write(address, data)
    info = layout.tail_addr - len(layout.information)
    memory.write(info, layout.information + layout.tail)
    return BootEntry("protected", layout.entry, {"rax": BOOTLOADER_MAGIC, "rbx": info})


def _segments(fmt, image: bytes) -> tuple[list[tuple[int, bytes, int]], int]:
    """(address, bytes, size in memory) of what the kernel loads, and its entry."""
    header = fmt.header
    if header.flags & FLAG_ADDRESSES:
        start = header.offset - (header.header_addr - header.load_addr)
        if header.load_addr > header.header_addr or start < 0:
            raise fmt.error(f"its load_addr {header.load_addr:#x} and header_addr "
                            f"{header.header_addr:#x} put the load start before the file's")
        load_end = header.load_end_addr or header.load_addr + len(image) - start
        if not header.load_addr < load_end <= header.load_addr + len(image) - start:
            raise fmt.error(f"its load_end_addr {load_end:#x} is not between load_addr "
                            f"{header.load_addr:#x} and the end of the file")
        bss_end = header.bss_end_addr or load_end
        if bss_end < load_end:
            raise fmt.error(f"its bss_end_addr {bss_end:#x} is below load_end_addr "
                            f"{load_end:#x}")
        data = image[start:start + load_end - header.load_addr]
        return [(header.load_addr, data, bss_end - header.load_addr)], header.entry_addr
    if fmt.elf is None:
        raise fmt.error("not an ELF file and no load addresses in its header (flag bit 16): "
                        "pyhyve cannot tell where it goes")
    segments = [(s.paddr, s.data, s.memsz) for s in fmt.elf.segments if s.memsz]
    if not segments:
        raise fmt.error("no loadable segments (PT_LOAD)")
    return segments, fmt.elf.physical_entry()


def _inside(ram: list[tuple[int, int]], address: int, size: int) -> bool:
    return any(start <= address and address + size <= end for start, end in ram)


def _place(ram: list[tuple[int, int]], after: int, size: int) -> int | None:
    """The first page-aligned address at or above `after` where `size` bytes lie in RAM."""
    for start, end in ram:
        address = (max(start, after) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if address + size <= end:
            return address
    return None


def _ranges(ram: list[tuple[int, int]]) -> str:
    return ", ".join(f"{start:#x}-{end - 1:#x}" for start, end in ram)


def _no_room(modules: list, kernel_end: int, info_size: int) -> str:
    total = sum(len(data) for data, _ in modules)
    return (f"{len(modules)} modules of {total} bytes and {info_size} bytes of boot "
            f"information do not fit in the guest's RAM after the kernel (which ends at "
            f"{kernel_end:#x}); use a larger -m")


def _information(tail_addr: int, mmap_at: int, mmap: list, e820: list, strings: list[bytes],
                 placed: list[int], modules: list) -> tuple[bytes, bytes]:
    """The fixed structure, and the tail at `tail_addr`: the module list, the
    memory map `mmap` (when the loader writes it there; it lies at `mmap_at`
    either way), then the strings.  The memory sizes come from `e820`."""
    mods_at = tail_addr
    strings_at, string_addresses = mods_at + 16 * len(modules) + 24 * len(mmap), []
    for string in strings:
        string_addresses.append(strings_at)
        strings_at += len(string)
    command_at, loader_at, *module_strings = string_addresses
    mem_lower = next((size for start, size, kind in e820 if start == 0 and kind == E820_RAM), 0)
    mem_upper = next((size for start, size, kind in e820
                      if start == 0x100000 and kind == E820_RAM), 0)
    fixed = bytearray(INFO_SIZE)
    struct.pack_into("<IIIIIIII", fixed, 0,
                     INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
                     min(mem_lower, 640 * 1024) // 1024, mem_upper // 1024, 0, command_at,
                     len(modules), mods_at, 0)
    struct.pack_into("<II", fixed, 44, 24 * len(mmap), mmap_at)
    struct.pack_into("<I", fixed, 64, loader_at)
    mods = b"".join(struct.pack("<IIII", address, address + len(data), string_at, 0)
                    for address, (data, _), string_at in zip(placed, modules, module_strings))
    entries = b"".join(struct.pack("<IQQI", 20, start, size, kind) for start, size, kind in mmap)
    return bytes(fixed), mods + entries + b"".join(strings)
