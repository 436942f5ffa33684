"""Where an NVMe command's data lies in guest memory: its PRP entries
(NVMe 1.4, section 4.3), as bounds-checked views of guest RAM.

    views = prp_views(memory, prp1, prp2, length, write=True)

PRP1 points at the first byte, at any dword offset in a memory page; the
data runs to the end of that page and then on through whole pages: PRP2
itself when one more page finishes it, else PRP2 points at a list of 8-byte
entries whose last slot, when a list page is full and more entries remain,
points at the next list page.  Every data entry after the first must be page
aligned (PRP Offset Invalid otherwise), and every address is checked by
GuestMemory.view (Data Transfer Error where it is not RAM), so a malformed
command gets a status and host memory outside the guest is never reached.
The walk reads exactly as many entries as `length` needs: a list that points
at itself ends when the data does.
"""

import struct

from ..memory import GuestMemoryError

PAGE = 4096                     # CAP.MPSMIN = CAP.MPSMAX: 4 KiB memory pages only
ENTRY = 8

# generic command status values (NVMe 1.4 figure 127) a walk may end with
DATA_TRANSFER_ERROR = 0x04
PRP_OFFSET_INVALID = 0x13


class PrpError(Exception):
    """A data pointer the command cannot be served through; `status` is the
    generic status code its completion carries."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _entries(memory, address: int, count: int) -> list[int]:
    """`count` PRP entries of the list at `address`, following list pages."""
    if address % ENTRY:
        raise PrpError(PRP_OFFSET_INVALID, f"PRP list at {address:#x} is not 8-byte aligned")
    entries: list[int] = []
    while True:
        slots = (PAGE - address % PAGE) // ENTRY
        left = count - len(entries)
        take = left if left <= slots else slots
        try:
            raw = memory.read(address, take * ENTRY)
        except GuestMemoryError:
            raise PrpError(DATA_TRANSFER_ERROR, f"PRP list at {address:#x} is not in "
                           "guest memory") from None
        found = struct.unpack(f"<{take}Q", raw)
        if left <= slots:
            return entries + list(found)
        entries += found[:-1]
        address = found[-1]              # the last slot chains to the next list page
        if address % ENTRY:
            raise PrpError(PRP_OFFSET_INVALID, f"PRP list at {address:#x} is not "
                           "8-byte aligned")


def prp_pages(memory, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
    """(guest address, byte count) of each piece of a `length`-byte transfer."""
    if prp1 % 4:
        raise PrpError(PRP_OFFSET_INVALID, f"PRP1 {prp1:#x} is not dword aligned")
    first = min(length, PAGE - prp1 % PAGE)
    pieces = [(prp1, first)]
    rest = length - first
    if not rest:
        return pieces
    count = (rest + PAGE - 1) // PAGE
    addresses = [prp2] if count == 1 else _entries(memory, prp2, count)
    for address in addresses:
        if address % PAGE:
            raise PrpError(PRP_OFFSET_INVALID, f"PRP entry {address:#x} is not page aligned")
        pieces.append((address, min(rest, PAGE)))
        rest -= PAGE
    return pieces


def prp_views(memory, prp1: int, prp2: int, length: int, write: bool) -> list[memoryview]:
    """Views of guest memory for a `length`-byte transfer (writable ones if the
    device writes into them); PrpError for a pointer that does not fit."""
    views = []
    for address, count in prp_pages(memory, prp1, prp2, length):
        try:
            views.append(memory.view(address, count, write))
        except GuestMemoryError:
            raise PrpError(DATA_TRANSFER_ERROR, f"data at {address:#x}+{count:#x} is not "
                           "in guest memory") from None
    return views
