"""What kind of kernel a file is, named in words for every message about it.

`-f kexec` takes four formats, tried in QEMU's order: an ELF file with a PVH
note, a bzImage (its 64-bit entry where it has one, else its 16-bit setup
code), then a multiboot kernel (ELF, or any file whose multiboot header gives
load addresses).  Whatever a file is, the description says what pyhyve found
("a bzImage with boot protocol 2.03 and no 64-bit entry", "an ELF64 file
without a PVH note or multiboot header"), so a refusal tells the operator
what they gave as well as what is wrong with it.
"""

import struct
from dataclasses import dataclass

from ..config import ConfigError
from . import multiboot
from .elf import find_note, is_elf, read_elf

HEADER_MAGIC = 0x202            # "HdrS": a Linux setup header
VERSION = 0x206
BOOT_FLAG = 0x1FE
LOADFLAGS = 0x211
XLOADFLAGS = 0x236
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
XEN_ELFNOTE_PHYS32_ENTRY = 18

# Files people give by mistake, by their first bytes.
KNOWN_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"\xfd7zXZ\0", "xz-compressed data"),
    (b"BZh", "bzip2-compressed data"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (b"070701", "a cpio archive (an initramfs?)"),
    (b"070702", "a cpio archive (an initramfs?)"),
    (b"MZ", "a PE/EFI executable without a Linux setup header"),
    (b"#!", "a script"),
)


@dataclass
class KernelFormat:
    kind: str                   # "bzimage64", "bzimage16", "pvh" or "multiboot"
    description: str
    path: str
    version: int = 0            # a bzImage's boot protocol
    elf: object = None          # the parsed ELF file (PVH, multiboot ELF)
    pvh_entry: int = 0
    header: object = None       # a multiboot header

    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"kernel {self.path}: {self.description}: {problem}")


def _protocol_name(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def identify(image: bytes, path: str) -> KernelFormat:
    """The format of a kernel file; ConfigError naming what it is where pyhyve
    cannot boot it."""
    if is_elf(image):
        return _identify_elf(image, path)
    if len(image) >= HEADER_MAGIC + 4 and image[HEADER_MAGIC:HEADER_MAGIC + 4] == b"HdrS":
        return _identify_bzimage(image, path)
    header = multiboot.find_header(image, path, "a file")
    if header is not None:
        return KernelFormat("multiboot", "a multiboot kernel", path, header=header)
    raise ConfigError(f"kernel {path}: {_describe_unknown(image)}, not a kernel pyhyve boots "
                      "(neither a bzImage, a PVH or multiboot ELF, nor a multiboot image)")


def _identify_elf(image: bytes, path: str) -> KernelFormat:
    elf = read_elf(image, path)
    what = f"an ELF{elf.bits} file"
    note = find_note(elf.notes, b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)
    if note is not None and len(note) in (4, 8):
        entry = int.from_bytes(note, "little") & 0xFFFFFFFF
        return KernelFormat("pvh", f"{what} with a PVH entry", path, elf=elf, pvh_entry=entry)
    header = multiboot.find_header(image, path, what)
    if header is not None:
        return KernelFormat("multiboot", f"{what} with a multiboot header", path, elf=elf,
                            header=header)
    raise ConfigError(f"kernel {path}: {what} without a PVH note (XEN_ELFNOTE_PHYS32_ENTRY, "
                      "CONFIG_PVH for Linux) or multiboot header")


def _identify_bzimage(image: bytes, path: str) -> KernelFormat:
    if len(image) < XLOADFLAGS + 2:
        raise ConfigError(f"kernel {path}: a truncated bzImage ({len(image)} bytes)")
    version = struct.unpack_from("<H", image, VERSION)[0]
    what = f"a bzImage with boot protocol {_protocol_name(version)}"
    if struct.unpack_from("<H", image, BOOT_FLAG)[0] != 0xAA55:
        raise ConfigError(f"kernel {path}: {what} and a bad boot sector signature "
                          "(no 55 AA at byte 510)")
    if version < 0x0200:
        raise ConfigError(f"kernel {path}: {what}: pyhyve needs 2.00 or later")
    if not image[LOADFLAGS] & LOADED_HIGH:
        raise ConfigError(f"kernel {path}: {what}, a zImage (not loaded high): "
                          "pyhyve loads only bzImages")
    if version >= 0x020C and struct.unpack_from("<H", image, XLOADFLAGS)[0] & XLF_KERNEL_64:
        return KernelFormat("bzimage64", f"{what} and a 64-bit entry", path, version=version)
    return KernelFormat("bzimage16", f"{what} and no 64-bit entry", path, version=version)


def _describe_unknown(image: bytes) -> str:
    if not image:
        return "an empty file"
    for magic, name in KNOWN_MAGIC:
        if image.startswith(magic):
            return name
    if len(image) >= 512 and image[510:512] == b"\x55\xaa":
        return "a boot sector (55 AA at byte 510) without a Linux setup header"
    return "a file starting with bytes " + " ".join(f"{b:02x}" for b in image[:8])
