"""What an AHCI port and its drive say to each other (SATA 3.x and AHCI 1.3.1):
the FIS types and layouts, the command header and table, the ATA Status and
Error bits, and a fetched command as the handlers see it.  No behaviour
lives here: the engine (pyhyve.ahci.engine) runs commands, pyhyve.ahci.ata
and pyhyve.ahci.atapi answer them."""

import struct

SECTOR = 512

# FIS types, and where the port's receive area keeps each (AHCI 4.2.1)
FIS_REGISTER_H2D, FIS_REGISTER_D2H = 0x27, 0x34
FIS_PIO_SETUP, FIS_SET_DEVICE_BITS = 0x5F, 0xA1
RX_PIO_SETUP, RX_REGISTER_D2H, RX_SET_DEVICE_BITS = 0x20, 0x40, 0x58
RX_AREA_SIZE = 256
FIS_INTERRUPT = 0x40                  # the I bit in byte 1 of a device-to-host FIS
H2D_COMMAND = 0x80                    # the C bit: a command, else a Device Control update
CONTROL_SRST = 0x04                   # software reset, in the Device Control byte

# ATA Status and Error register bits
STATUS_ERR, STATUS_DRQ, STATUS_DSC, STATUS_DF, STATUS_DRDY, STATUS_BSY = \
    0x01, 0x08, 0x10, 0x20, 0x40, 0x80
ERROR_ABRT, ERROR_IDNF, ERROR_UNC = 0x04, 0x10, 0x40
READY = STATUS_DRDY | STATUS_DSC

# the command list (AHCI 4.2.2) and table (4.2.3)
HEADER_SIZE, SLOTS = 32, 32
HEADER_ATAPI, HEADER_WRITE = 1 << 5, 1 << 6
TABLE_ACMD, TABLE_PRDT = 0x40, 0x80
PRD_SIZE, PRD_BYTES = 16, 0x3FFFFF            # byte count - 1 in bits 21:0
_HEADER = struct.Struct("<HHIQ")              # flags, PRDT length, bytes moved, table


class DmaError(Exception):
    """A command list, command table or PRDT that guest memory does not hold."""


class AtaError(Exception):
    """A command that ends with ERR in Status and `error` in the Error register."""

    def __init__(self, error: int = ERROR_ABRT):
        super().__init__(f"ATA error {error:#x}")
        self.error = error


def table_address(header: bytes) -> int:
    """Where a command header's table is: 128-byte aligned (bits 6:0 reserved)."""
    return _HEADER.unpack_from(header)[3] & ~0x7F


class Command:
    """One issued command slot: its header fields, the command FIS and
    ATAPI packet from its table, and what the handler reports back."""

    __slots__ = ("slot", "flags", "prdt_length", "table", "cfis", "acmd", "transferred",
                 "result_count")

    def __init__(self, slot: int, header: bytes, table: bytes):
        self.slot = slot
        self.flags, self.prdt_length, _, _ = _HEADER.unpack_from(header)
        self.table = table_address(header)
        self.cfis, self.acmd = table[:20], table[TABLE_ACMD:TABLE_ACMD + 16]
        self.transferred = 0                  # bytes, for the header's PRDBC
        self.result_count = None              # a Count register value to report

    @property
    def opcode(self) -> int:
        return self.cfis[2]

    @property
    def is_command(self) -> bool:
        return bool(self.cfis[1] & H2D_COMMAND)


def register_d2h(status: int, error: int, cfis: bytes, count: int | None,
                 interrupt: bool) -> bytes:
    """A Register Device-to-Host FIS ending a command: the command's address
    fields echoed, the Count register `count` where the command reports one."""
    fis = bytearray(20)
    fis[0], fis[1], fis[2], fis[3] = FIS_REGISTER_D2H, FIS_INTERRUPT if interrupt else 0, \
        status, error
    fis[4:14] = cfis[4:14]
    if count is not None:
        fis[12], fis[13] = count & 0xFF, count >> 8 & 0xFF
    return bytes(fis)


def signature_d2h(atapi: bool) -> bytes:
    """The Register FIS a drive sends after a reset: its signature in the LBA
    and Count registers (ATA 01h/01h/00h/00h, ATAPI 01h/01h/14h/EBh)."""
    fis = bytearray(20)
    fis[0], fis[2], fis[3], fis[4], fis[12] = FIS_REGISTER_D2H, READY if not atapi else 0, \
        1, 1, 1
    if atapi:
        fis[5], fis[6] = 0x14, 0xEB
    return bytes(fis)


def pio_setup(status: int, length: int) -> bytes:
    """The PIO Setup FIS before a PIO data-in transfer; byte 15 (E_Status) is
    the status the command ends with, which drivers read instead of a Register FIS."""
    fis = bytearray(20)
    fis[0], fis[1], fis[2], fis[15] = FIS_PIO_SETUP, 0x20, status | STATUS_DRQ, status
    fis[16:18] = min(length, 0xFFFF).to_bytes(2, "little")
    return bytes(fis)


def set_device_bits(status: int, error: int, finished: int) -> bytes:
    """A Set Device Bits FIS: queued commands `finished` (SActive bits) or an error."""
    return struct.pack("<BBBBI", FIS_SET_DEVICE_BITS, FIS_INTERRUPT, status & 0x77, error,
                       finished)
