"""The parts of an ELF file a kernel loader reads: the entry point and the
program headers (PT_LOAD segments to copy, PT_NOTE contents to search).
Shared by the PVH and multiboot loaders; every offset and size is checked
against the file, so a truncated or hostile file gives a ConfigError, never
an exception from struct or a slice that silently comes up short.
"""

import struct
from dataclasses import dataclass, field

from ..config import ConfigError

PT_LOAD, PT_NOTE = 1, 4


@dataclass
class Segment:
    paddr: int
    vaddr: int
    data: bytes
    memsz: int


@dataclass
class ElfImage:
    bits: int                   # 32 or 64
    entry: int                  # e_entry, a virtual address
    segments: list[Segment] = field(default_factory=list)
    notes: list[bytes] = field(default_factory=list)

    def physical_entry(self) -> int:
        """e_entry through the segment that holds it (kernels linked high have
        vaddr != paddr); unchanged where no segment holds it."""
        for segment in self.segments:
            if segment.vaddr <= self.entry < segment.vaddr + segment.memsz:
                return segment.paddr + self.entry - segment.vaddr
        return self.entry


def is_elf(image: bytes) -> bool:
    return image[:4] == b"\x7fELF"


def read_elf(image: bytes, path: str) -> ElfImage:
    """The entry and program headers of a little-endian ELF32/ELF64 file."""
    if len(image) < 0x34 or image[4] not in (1, 2) or image[5] != 1:
        raise ConfigError(f"kernel {path}: an ELF file that is not little-endian ELF32/ELF64")
    is64 = image[4] == 2
    try:
        if is64:
            entry, phoff = struct.unpack_from("<QQ", image, 0x18)
            phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
            header = struct.Struct("<IIQQQQQQ")          # type flags off vaddr paddr filesz memsz
        else:
            entry, phoff = struct.unpack_from("<II", image, 0x18)
            phentsize, phnum = struct.unpack_from("<HH", image, 0x2A)
            header = struct.Struct("<IIIIIIII")          # type off vaddr paddr filesz memsz ...
        elf = ElfImage(64 if is64 else 32, entry)
        for index in range(phnum):
            fields = header.unpack_from(image, phoff + index * phentsize)
            if is64:
                kind, _, offset, vaddr, paddr, filesz, memsz, _ = fields
            else:
                kind, offset, vaddr, paddr, filesz, memsz, _, _ = fields
            if kind not in (PT_LOAD, PT_NOTE):
                continue
            if offset + filesz > len(image):
                raise ConfigError(f"kernel {path}: ELF segment {index} runs past the end "
                                  f"of the file")
            data = image[offset:offset + filesz]
            if kind == PT_LOAD:
                elf.segments.append(Segment(paddr, vaddr, data, max(memsz, filesz)))
            else:
                elf.notes.append(data)
    except struct.error:
        raise ConfigError(f"kernel {path}: truncated ELF headers") from None
    return elf


def find_note(notes: list[bytes], name: bytes, kind: int) -> bytes | None:
    """The descriptor of the first note with this name and type."""
    for block in notes:
        at = 0
        while at + 12 <= len(block):
            namesz, descsz, note_kind = struct.unpack_from("<III", block, at)
            name_at = at + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            if block[name_at:name_at + namesz].rstrip(b"\0") == name and note_kind == kind:
                return block[desc_at:desc_at + descsz]
            at = desc_at + ((descsz + 3) & ~3)
    return None
