"""Linux's boot protocols (Documentation/arch/x86/boot.rst), as QEMU, GRUB and
Firecracker load them without firmware:
  * a bzImage with a 64-bit entry: the protected-mode kernel at 1 MiB, a zero
    page (struct boot_params) with the setup header, e820 map, command line
    and initrd; the BSP at the 64-bit entry (load address + 0x200), RSI
    pointing at the zero page;
  * a bzImage without one (protocol 2.00 and later, e.g. ipxe.lkrn, memdisk):
    its setup code at 0x90000 and the protected-mode kernel at 1 MiB, the
    setup header filled in as a 16-bit boot loader (GRUB's linux16) fills it,
    and the BSP in real mode at setup segment + 0x20:0.  Such kernels may call
    BIOS services, which only a bootrom provides;
  * an uncompressed ELF kernel with a PVH entry (XEN_ELFNOTE_PHYS32_ENTRY),
    started in 32-bit protected mode without paging, EBX pointing at an
    hvm_start_info with the memory map, command line, modules and RSDP.
kexec.py tells the formats apart and sets the BSP's registers; with a bootrom,
firmwarekernel.py lays a bzImage out as for the 16-bit entry (realmode_image)
at QEMU's addresses, for QEMU's linuxboot ROM to load.
"""

import re
import struct
from dataclasses import dataclass

from ..layout import MiB
from ..memory import PAGE_SIZE
from .kexec import BootEntry

# Guest-physical addresses of what pyhyve builds (all below 1 MiB, like QEMU's).
PVH_START_INFO = 0x6000
ZERO_PAGE = 0x7000
CMDLINE_ADDR = 0x20000
KERNEL_ADDR = 1 * MiB
E820_MAX_ENTRIES = 128

# A 16-bit entry's setup area (boot.rst's "X"), where GRUB's linux16 puts it.
REALMODE_SETUP = 0x90000
REALMODE_SETUP_MAX = 0x8000     # boot sector and setup code; the heap follows
HEAP_END = 0xE000               # protocol 2.02+: heap and stack end, command line from here
HEAP_END_OLD = 0x9800           # before 2.02: the command line must lie in the setup segment
REALMODE_TOP = 0xA0000          # the end of low memory a real-mode kernel may use
OLD_CMDLINE_MAX = 255           # before 2.06, which added cmdline_size
OLD_INITRD_ADDR_MAX = 0x37FFFFFF    # before 2.03, which added initrd_addr_max

# boot_params / setup header offsets
SETUP_SECTS = 0x1F1
VID_MODE = 0x1FA
ACPI_RSDP_ADDR = 0x070          # boot_params.acpi_rsdp_addr, protocol 2.14+
CMD_LINE_MAGIC = 0x020          # before 2.02: 0xA33F, then the command line's offset
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
SETUP_MOVE_SIZE = 0x212
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
CMDLINE_SIZE = 0x238
PREF_ADDRESS = 0x258            # protocol 2.10+, as init_size
INIT_SIZE = 0x260
E820_ENTRIES = 0x1E8
E820_TABLE = 0x2D0
CAN_USE_HEAP = 0x80
LOADER_UNDEFINED = 0xFF         # type_of_loader: a loader with no assigned ID
VIDEO_MODES = {"normal": 0xFFFF, "ext": 0xFFFE, "ask": 0xFFFD}

HVM_START_MAGIC = 0x336EC578


def _initrd_address(memory, fmt, size: int, limit: int, top: int, kernel_end: int) -> int:
    """The highest page-aligned address below `limit` and `top` where `size`
    bytes of initrd fit in RAM above the kernel."""
    top = min(limit + 1, top)
    address = (top - size) & ~(PAGE_SIZE - 1)
    if address < kernel_end or not memory.is_ram(address, size):
        raise fmt.error(f"an initrd of {size} bytes does not fit in guest memory "
                        f"between the kernel's end {kernel_end:#x} and {top:#x} "
                        "(use a larger -m)")
    return address


def _place_initrd(memory, fmt, initrd: bytes, limit: int, kernel_end: int) -> int:
    """Write the initrd as high as it goes below `limit` in low memory; its address."""
    address = _initrd_address(memory, fmt, len(initrd), limit, memory.lowmem_size, kernel_end)
    memory.write(address, initrd)
    return address


def _protected_mode_kernel(memory, fmt, image: bytes) -> tuple[bytes, int]:
    """The part after the setup sectors, which goes at 1 MiB, and where the
    memory it needs ends (init_size from where it runs, protocol 2.10+: the
    initrd must stay clear of all of it, not just of the file's bytes)."""
    setup_sects = image[SETUP_SECTS] or 4
    kernel = image[(setup_sects + 1) * 512:]
    if not kernel:
        raise fmt.error("no protected-mode code after its setup sectors")
    kernel_end = KERNEL_ADDR + len(kernel)
    if fmt.version >= 0x020A and len(image) >= INIT_SIZE + 4:
        init_size = struct.unpack_from("<I", image, INIT_SIZE)[0]
        pref_address = struct.unpack_from("<Q", image, PREF_ADDRESS)[0]
        kernel_end = max(kernel_end, max(KERNEL_ADDR, pref_address) + init_size)
    if not memory.is_ram(KERNEL_ADDR, kernel_end - KERNEL_ADDR):
        raise fmt.error(f"it needs {kernel_end - KERNEL_ADDR} bytes at {KERNEL_ADDR:#x}, "
                        "more than guest memory holds")
    return kernel, kernel_end


def _initrd_limit(image: bytes, version: int) -> int:
    if version >= 0x0203:
        return struct.unpack_from("<I", image, INITRD_ADDR_MAX)[0]
    return OLD_INITRD_ADDR_MAX


def _cmdline_limit(image: bytes, version: int) -> int:
    if version >= 0x0206:
        return struct.unpack_from("<I", image, CMDLINE_SIZE)[0]
    return OLD_CMDLINE_MAX


def load_bzimage(memory, fmt, image: bytes, initrd: bytes, command: bytes,
                 e820: list, rsdp: int) -> BootEntry:
    """A bzImage entered at its 64-bit entry, with a zero page built here."""
    if len(image) < INIT_SIZE + 4:
        # Too short to hold the header fields read below.
        raise fmt.error(f"truncated ({len(image)} bytes)")
    cmdline_size = _cmdline_limit(image, fmt.version)
    if len(command) - 1 > cmdline_size:
        raise fmt.error(f"the command line is {len(command) - 1} bytes; this kernel takes "
                        f"at most {cmdline_size}")
    kernel, kernel_end = _protected_mode_kernel(memory, fmt, image)
    memory.write(KERNEL_ADDR, kernel)

    header_end = 0x202 + image[0x201]          # the jump at 0x200 gives the header's length
    zero_page = bytearray(PAGE_SIZE)
    zero_page[SETUP_SECTS:header_end] = image[SETUP_SECTS:header_end]
    zero_page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    struct.pack_into("<I", zero_page, CMD_LINE_PTR, CMDLINE_ADDR)
    memory.write(CMDLINE_ADDR, command)
    if initrd:
        address = _place_initrd(memory, fmt, initrd, _initrd_limit(image, fmt.version),
                                kernel_end)
        struct.pack_into("<II", zero_page, RAMDISK_IMAGE, address, len(initrd))
    if rsdp and fmt.version >= 0x020E:
        struct.pack_into("<Q", zero_page, ACPI_RSDP_ADDR, rsdp)
    entries = e820[:E820_MAX_ENTRIES]
    zero_page[E820_ENTRIES] = len(entries)
    for index, (address, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", zero_page, E820_TABLE + 20 * index, address, size, kind)
    memory.write(ZERO_PAGE, bytes(zero_page))
    return BootEntry("long", KERNEL_ADDR + 0x200, {"rsi": ZERO_PAGE})


@dataclass
class RealModeImage:
    """A bzImage laid out for its 16-bit entry, as a 16-bit loader places it:
    the boot sector and setup code with the header filled in, the heap and
    stack after them up to the command line, the protected-mode part at
    1 MiB, the initrd high in low memory."""
    setup_addr: int
    setup: bytes
    cmdline_addr: int
    command: bytes              # NUL-terminated
    kernel: bytes
    initrd_addr: int            # 0 without an initrd

    def entry(self) -> BootEntry:
        """Real mode with DS = ES = FS = GS = SS = the setup segment, SP at
        the heap's end, CS:IP = segment + 0x20:0."""
        return BootEntry("real", 0, {"rsp": self.cmdline_addr - self.setup_addr},
                         segment=self.setup_addr >> 4)


def realmode_image(memory, fmt, image: bytes, initrd_size: int, cmdline: str,
                   setup_addr: int, cmdline_addr: int, cmdline_end: int,
                   initrd_top: int) -> RealModeImage:
    """Lay the kernel out with its setup code at `setup_addr` and its command
    line at `cmdline_addr` (before `cmdline_end`); the heap between them.  The
    initrd goes as high below `initrd_top` as the kernel allows.  Checks all
    of it against the kernel's limits and the guest's RAM (ConfigError)."""
    setup_size = ((image[SETUP_SECTS] or 4) + 1) * 512
    room = min(REALMODE_SETUP_MAX, cmdline_addr - setup_addr, len(image))
    if setup_size > room:
        raise fmt.error(f"its setup code is {setup_size} bytes, more than the "
                        f"{room} a 16-bit loader can give it")
    command = cmdline.encode() + b"\0"
    limit = min(_cmdline_limit(image, fmt.version), cmdline_end - cmdline_addr - 1)
    if len(command) - 1 > limit:
        raise fmt.error(f"the command line is {len(command) - 1} bytes; this kernel takes "
                        f"at most {limit}")
    kernel, kernel_end = _protected_mode_kernel(memory, fmt, image)

    setup = bytearray(image[:setup_size])
    setup[TYPE_OF_LOADER] = LOADER_UNDEFINED
    vid_mode = _vga_mode(cmdline)
    if vid_mode is not None:
        struct.pack_into("<H", setup, VID_MODE, vid_mode)
    heap_end = cmdline_addr - setup_addr
    if fmt.version >= 0x0201:
        struct.pack_into("<H", setup, HEAP_END_PTR, heap_end - 0x200)
        setup[LOADFLAGS] |= CAN_USE_HEAP
    if fmt.version >= 0x0202:                  # cmd_line_ptr: the command line anywhere
        struct.pack_into("<I", setup, CMD_LINE_PTR, cmdline_addr)
    else:                                      # its offset in the setup segment
        struct.pack_into("<HH", setup, CMD_LINE_MAGIC, 0xA33F, heap_end)
        struct.pack_into("<H", setup, SETUP_MOVE_SIZE, heap_end + len(command))
    initrd_addr = 0
    if initrd_size:
        initrd_addr = _initrd_address(memory, fmt, initrd_size,
                                      _initrd_limit(image, fmt.version), initrd_top, kernel_end)
        struct.pack_into("<II", setup, RAMDISK_IMAGE, initrd_addr, initrd_size)
    return RealModeImage(setup_addr, bytes(setup), cmdline_addr, command, kernel, initrd_addr)


def load_realmode_bzimage(memory, fmt, image: bytes, initrd: bytes, cmdline: str) -> BootEntry:
    """A bzImage entered through its 16-bit setup code, as GRUB's linux16
    starts it: the setup at 0x90000, the heap to 0xE000 (0x9800 before
    protocol 2.02, whose command line must lie in the setup segment), the
    command line at the heap's end.  The setup code finds memory and the rest
    through the BIOS, and then enters the protected-mode kernel itself."""
    heap_end = HEAP_END if fmt.version >= 0x0202 else HEAP_END_OLD
    layout = realmode_image(memory, fmt, image, len(initrd), cmdline, REALMODE_SETUP,
                            REALMODE_SETUP + heap_end, REALMODE_TOP, memory.lowmem_size)
    memory.write(KERNEL_ADDR, layout.kernel)
    if initrd:
        memory.write(layout.initrd_addr, initrd)
    memory.write(layout.setup_addr, layout.setup)
    memory.write(layout.setup_addr + len(layout.setup),
                 bytes(layout.cmdline_addr - layout.setup_addr - len(layout.setup)))
    memory.write(layout.cmdline_addr, layout.command)
    return layout.entry()


def _vga_mode(cmdline: str) -> int | None:
    """vid_mode from a vga= option, as boot loaders read it ("normal", "ext",
    "ask" or a number); None to keep the kernel's default."""
    match = re.search(r"(?:^| )vga=(\S+)", cmdline)
    if not match:
        return None
    value = match.group(1)
    if value in VIDEO_MODES:
        return VIDEO_MODES[value]
    try:
        return int(value, 0) & 0xFFFF
    except ValueError:
        return None


def load_pvh(memory, fmt, initrd: bytes, command: bytes, e820: list, rsdp: int) -> BootEntry:
    """A PVH ELF kernel's segments, and an hvm_start_info for its 32-bit entry."""
    kernel_end = 0
    for segment in fmt.elf.segments:
        if not memory.is_ram(segment.paddr, segment.memsz):
            raise fmt.error(f"its segment at {segment.paddr:#x} is outside guest memory")
        memory.write(segment.paddr, segment.data)
        memory.write(segment.paddr + len(segment.data), bytes(segment.memsz - len(segment.data)))
        kernel_end = max(kernel_end, segment.paddr + segment.memsz)
    memory.write(CMDLINE_ADDR, command)
    memmap_at = PVH_START_INFO + 0x100
    modules_at = memmap_at + 24 * len(e820)
    for index, (address, size, kind) in enumerate(e820):
        struct.pack_into("<QQII", memory.view(memmap_at + 24 * index, 24, write=True), 0,
                         address, size, kind, 0)
    modules = 0
    if initrd:
        address = _place_initrd(memory, fmt, initrd, memory.lowmem_size - 1, kernel_end)
        memory.write(modules_at, struct.pack("<QQQQ", address, len(initrd), 0, 0))
        modules = 1
    start_info = struct.pack("<IIIIQQQQII", HVM_START_MAGIC, 1, 0, modules,
                             modules_at if modules else 0, CMDLINE_ADDR, rsdp,
                             memmap_at, len(e820), 0)
    memory.write(PVH_START_INFO, start_info)
    return BootEntry("protected", fmt.pvh_entry, {"rbx": PVH_START_INFO})
