"""A kernel handed to the firmware (`-l bootrom` with `-f kexec`), as QEMU's
-kernel hands it to SeaBIOS: the kernel's parts go into numbered fw_cfg
items, and one of QEMU's option ROMs (Debian's qemu-system-data), offered
to the firmware as the fw_cfg file `genroms/NAME` and named first in
`bootorder`, reads them into memory at boot and starts the kernel with the
BIOS still there.  Kernels that call BIOS services (iPXE's ipxe.lkrn,
syslinux's memdisk) need that.

  * a bzImage (whatever its entry): linuxboot_dma.bin reads the setup code
    (boot sector and setup header, filled in as a 16-bit loader fills it)
    to FW_CFG_SETUP_ADDR, the initrd to FW_CFG_INITRD_ADDR (or, where that
    is not the kernel's initrd_addr_max, below the top of memory the BIOS
    reports, patching ramdisk_image), the protected-mode part to
    FW_CFG_KERNEL_ADDR and the command line to FW_CFG_CMDLINE_ADDR, then
    enters the setup code in real mode.  Addresses by protocol, as QEMU's:
    2.02+ the setup at 0x10000 and the command line at 0x20000, older ones
    the setup at 0x90000 and the command line below 0x9A000.
  * a multiboot kernel: multiboot_dma.bin reads the information block
    (FW_CFG_INITRD_*) to 0x9500, fills in its memory sizes and the memory map
    at 0x9000 from the BIOS (int 12h, int 15h E820), reads one image
    (FW_CFG_KERNEL_*: the kernel, its modules, module list and strings) to
    the kernel's load address, and jumps to FW_CFG_KERNEL_ENTRY.

The option ROMs come from the operator's directory (`kexec.romdir`), never
from anything the guest hands over; the items are rebuilt from the config
on every start, so a reboot boots the kernel again, as under QEMU.
"""

import os
import struct

from ..config import ConfigError, read_user_file
from ..layout import MiB
from .kexec import read_initrd, read_kernel
from .linux import KERNEL_ADDR, realmode_image
from .multiboot import multiboot_image

DEFAULT_ROM_DIR = "/usr/share/qemu"     # where QEMU looks for its option ROMs
LINUX_ROM = "linuxboot_dma.bin"
MULTIBOOT_ROM = "multiboot_dma.bin"
MAX_ROM_SIZE = 128 * 1024               # what fits the option ROM area 0xC0000-0xDFFFF

# QEMU's numbered fw_cfg items for a kernel (include/hw/nvram/fw_cfg_keys.h)
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18

# Where the 16-bit setup code and the command line go, by boot protocol (QEMU's choice).
SETUP_ADDR = 0x10000            # 2.02+: cmd_line_ptr lets the command line lie anywhere
CMDLINE_ADDR = 0x20000
CMDLINE_END = 0x90000
OLD_SETUP_ADDR = 0x90000        # before 2.02: the command line within the setup segment
OLD_CMDLINE_END = 0x9A000
# The BIOS keeps its tables at the top of low RAM (SeaBIOS: up to 256 KiB);
# an initrd placed below them keeps clear, and linuxboot_dma.bin then moves
# it to just below what the BIOS reports (E801) unless the kernel's own limit
# lies lower.
FIRMWARE_TOP_RESERVE = 256 * 1024
# multiboot_dma.bin's fixed places below 1 MiB: the memory map it writes and the
# information block's fixed structure after it (room for 53 map entries).
MULTIBOOT_MMAP = 0x9000
MULTIBOOT_INFO = MULTIBOOT_MMAP + 0x500


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def kernel_items(memory, config, e820: list[tuple[int, int, int]]) -> tuple[str, dict]:
    """The option ROM's name and the fw_cfg items for the kernel the config
    names; every file and address is checked here (ConfigError)."""
    kernel_path = config.get("kexec.kernel")
    initrd_path = config.get("kexec.initrd")
    cmdline = config.get("kexec.cmdline", "")
    image, fmt = read_kernel(memory, kernel_path, cmdline)
    if fmt.kind == "multiboot":
        return MULTIBOOT_ROM, _multiboot_items(memory, fmt, image, kernel_path, initrd_path,
                                               cmdline, e820)
    if fmt.kind == "pvh":
        raise fmt.error("with a bootrom pyhyve hands over only bzImages and multiboot "
                        "kernels (QEMU's pvh.bin is not supported); boot it without -l bootrom")
    return LINUX_ROM, _linux_items(memory, fmt, image, read_initrd(memory, initrd_path),
                                   cmdline)


def _linux_items(memory, fmt, image: bytes, initrd: bytes, cmdline: str) -> dict:
    if fmt.version >= 0x0202:
        setup_addr, cmdline_addr, cmdline_end = SETUP_ADDR, CMDLINE_ADDR, CMDLINE_END
    else:
        room = (len(cmdline) + 16) & ~15
        setup_addr, cmdline_addr, cmdline_end = (OLD_SETUP_ADDR, OLD_CMDLINE_END - room,
                                                 OLD_CMDLINE_END)
    layout = realmode_image(memory, fmt, image, len(initrd), cmdline, setup_addr, cmdline_addr,
                            cmdline_end, memory.lowmem_size - FIRMWARE_TOP_RESERVE)
    items = {
        FW_CFG_SETUP_ADDR: _u32(layout.setup_addr), FW_CFG_SETUP_SIZE: _u32(len(layout.setup)),
        FW_CFG_SETUP_DATA: layout.setup,
        FW_CFG_KERNEL_ADDR: _u32(KERNEL_ADDR), FW_CFG_KERNEL_SIZE: _u32(len(layout.kernel)),
        FW_CFG_KERNEL_DATA: layout.kernel,
        FW_CFG_CMDLINE_ADDR: _u32(layout.cmdline_addr),
        FW_CFG_CMDLINE_SIZE: _u32(len(layout.command)), FW_CFG_CMDLINE_DATA: layout.command,
    }
    if initrd:
        items.update({FW_CFG_INITRD_ADDR: _u32(layout.initrd_addr),
                      FW_CFG_INITRD_SIZE: _u32(len(initrd)), FW_CFG_INITRD_DATA: initrd})
    return items


def _multiboot_items(memory, fmt, image: bytes, kernel_path: str, modules_spec: str | None,
                     cmdline: str, e820: list) -> dict:
    layout = multiboot_image(memory, fmt, image, kernel_path, modules_spec, cmdline, e820,
                             firmware_mmap=MULTIBOOT_MMAP)
    low, high = layout.span()
    if low < 1 * MiB:
        raise fmt.error(f"it loads at {low:#x}, below 1 MiB, where the BIOS and the option "
                        "ROM's information block live: pyhyve hands such kernels to a bootrom "
                        "only from 1 MiB up")
    blob = bytearray(high - low)        # gaps between segments are zeros, as QEMU loads them
    for address, data, _ in layout.segments:
        blob[address - low:address - low + len(data)] = data
    for address, data in layout.modules:
        blob[address - low:address - low + len(data)] = data
    blob[layout.tail_addr - low:] = layout.tail
    return {
        FW_CFG_KERNEL_ENTRY: _u32(layout.entry),
        FW_CFG_KERNEL_ADDR: _u32(low), FW_CFG_KERNEL_SIZE: _u32(len(blob)),
        FW_CFG_KERNEL_DATA: bytes(blob),
        FW_CFG_INITRD_ADDR: _u32(MULTIBOOT_INFO),
        FW_CFG_INITRD_SIZE: _u32(len(layout.information)),
        FW_CFG_INITRD_DATA: layout.information,
    }


def read_option_rom(directory: str, name: str) -> bytes:
    """QEMU's option ROM `name` from the operator's directory: one clear
    ConfigError line when it is missing or is no option ROM."""
    path = os.path.join(directory, name)
    why = f"set kexec.romdir to the directory of QEMU's {name} (Debian: qemu-system-data)"
    try:
        rom = read_user_file(path, "option ROM", MAX_ROM_SIZE, "the option ROM area's size")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; {why}") from None
    if len(rom) < 512 or rom[:2] != b"\x55\xaa":
        raise ConfigError(f"option ROM {path} does not start with an option ROM "
                          f"signature (55 AA); {why}")
    return rom


def hand_to_firmware(fwcfg, memory, config, e820: list[tuple[int, int, int]]) -> None:
    """Put the kernel's items and the option ROM that boots it into fw_cfg,
    with that ROM first in the firmware's boot order."""
    rom_name, items = kernel_items(memory, config, e820)
    rom = read_option_rom(config.get("kexec.romdir", DEFAULT_ROM_DIR), rom_name)
    for key, data in items.items():
        fwcfg.add_bytes(key, data)
    fwcfg.add_file(f"genroms/{rom_name}", rom)
    fwcfg.add_file("bootorder", f"/rom@genroms/{rom_name}\0".encode())
