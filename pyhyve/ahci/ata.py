"""The ATA command set an AHCI port's drive answers (ACS-3), as bhyve's
pci_ahci offers it: IDENTIFY (PACKET) DEVICE, READ/WRITE DMA (EXT) and their
PIO forms, READ/WRITE FPDMA QUEUED (NCQ), FLUSH CACHE (EXT), DATA SET
MANAGEMENT TRIM, SET FEATURES, SET MULTIPLE MODE, READ LOG EXT (the NCQ
error log), the power commands that change nothing here, and PACKET, which
hands a CD's SCSI command to pyhyve.ahci.atapi.

A handler gets the port and the Command (pyhyve.ahci.protocol) and either
returns (success: the engine posts the completion the protocol asks for) or
raises AtaError with the Error register's bits; a range outside the image or
a PRDT outside guest memory is such an error, never an exception past the
engine.
"""

import struct

from . import atapi
from .protocol import ERROR_ABRT, ERROR_IDNF, ERROR_UNC, SECTOR, AtaError, Command, DmaError

# commands
NOP, DSM, READ_SECTORS_EXT, READ_DMA_EXT, READ_MULTIPLE_EXT = 0x00, 0x06, 0x24, 0x25, 0x29
READ_LOG_EXT, WRITE_SECTORS_EXT, WRITE_DMA_EXT, WRITE_MULTIPLE_EXT = 0x2F, 0x34, 0x35, 0x39
READ_SECTORS, WRITE_SECTORS = 0x20, 0x30
READ_VERIFY, READ_VERIFY_EXT = 0x40, 0x42
READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED = 0x60, 0x61
INITIALIZE_PARAMETERS, PACKET, IDENTIFY_PACKET_DEVICE = 0x91, 0xA0, 0xA1
READ_MULTIPLE, WRITE_MULTIPLE, SET_MULTIPLE_MODE = 0xC4, 0xC5, 0xC6
READ_DMA, WRITE_DMA = 0xC8, 0xCA
STANDBY_IMMEDIATE, IDLE_IMMEDIATE, STANDBY, IDLE = 0xE0, 0xE1, 0xE2, 0xE3
CHECK_POWER_MODE, FLUSH_CACHE, FLUSH_CACHE_EXT = 0xE5, 0xE7, 0xEA
IDENTIFY_DEVICE, SET_FEATURES, SECURITY_FREEZE_LOCK = 0xEC, 0xEF, 0xF5

# SET FEATURES subcommands (the Features register)
SF_WRITE_CACHE_ON, SF_TRANSFER_MODE, SF_SATA_ON = 0x02, 0x03, 0x10
SF_LOOKAHEAD_OFF, SF_WRITE_CACHE_OFF, SF_SATA_OFF, SF_LOOKAHEAD_ON = 0x55, 0x82, 0x90, 0xAA
UDMA6 = 0x46                                  # transfer mode after reset
LOG_NCQ_ERROR = 0x10
DSM_TRIM = 0x01
MAX_MULTIPLE = 128
QUEUE_DEPTH = 32
_RANGE_ENTRY = struct.Struct("<Q")            # DSM: LBA in bits 47:0, sector count above


def _string(text: str, length: int) -> bytes:
    """An IDENTIFY string field: space padded, the bytes of each word swapped."""
    raw = text.encode("ascii").ljust(length)[:length]
    return bytes(raw[i ^ 1] for i in range(length))


def _with_checksum(words: list[int]) -> bytes:
    """Word 255: the integrity word (A5h and a checksum making the bytes sum to 0)."""
    data = bytearray(struct.pack("<256H", *words))
    data[510] = 0xA5
    data[511] = -sum(data[:511]) & 0xFF
    return bytes(data)


def _common_words(words: list[int], strings, xfermode: int) -> None:
    serial, revision, model = strings
    raw = bytearray(struct.pack("<256H", *words))
    raw[20:40] = _string(serial, 20)
    raw[46:54] = _string(revision, 8)
    raw[54:94] = _string(model, 40)
    words[:] = struct.unpack("<256H", raw)
    words[53] = 0x0006                        # words 64-70 and 88 are valid
    words[63] = 0x0007 | ((1 << (xfermode & 7)) << 8 if xfermode & 0xF8 == 0x20 else 0)
    words[64] = 0x0003                        # PIO modes 3 and 4
    words[65:69] = [120, 120, 120, 120]
    words[76] = 0x000E                        # SATA Gen1, Gen2, Gen3
    words[80] = 0x01F0                        # ATA/ATAPI-4 to ACS (ATA8)
    words[81] = 0x0028
    words[88] = 0x007F | ((1 << (xfermode & 7)) << 8 if xfermode & 0xF8 == 0x40 else 0)


def identify_device(blocks: int, strings, xfermode: int, mult_sectors: int, write_cache: bool,
                    trim: bool, rotation: int | None) -> bytes:
    """IDENTIFY DEVICE data for a disk of `blocks` 512-byte sectors."""
    words = [0] * 256
    words[0] = 0x0040                         # fixed, not removable
    words[1], words[3], words[6] = 16383, 16, 63        # the legacy geometry
    words[47] = 0x8000 | MAX_MULTIPLE
    words[49] = 0x0B00                        # IORDY, LBA, DMA
    words[50] = 0x4000
    words[59] = 0x0100 | mult_sectors
    words[60], words[61] = min(blocks, 0x0FFFFFFF) & 0xFFFF, min(blocks, 0x0FFFFFFF) >> 16
    words[69] = 0x4020 if trim else 0         # deterministic, zeroed reads after TRIM
    words[75] = QUEUE_DEPTH - 1
    _common_words(words, strings, xfermode)
    words[76] |= 0x0100                       # NCQ
    words[82] = 0x4068                        # NOP, look-ahead, write cache, power management
    words[83] = 0x7400                        # FLUSH CACHE (EXT), 48-bit addresses
    words[84] = 0x4000
    words[85] = 0x4048 | (0x20 if write_cache else 0)
    words[86] = 0x3400
    words[87] = 0x4000
    words[100:104] = [(blocks >> shift) & 0xFFFF for shift in (0, 16, 32, 48)]
    words[105] = 1 if trim else 0             # one 512-byte block of DSM ranges
    words[106] = 0x4000                       # 512-byte logical and physical sectors
    words[169] = 1 if trim else 0             # DATA SET MANAGEMENT TRIM
    words[217] = rotation or 0
    return _with_checksum(words)


def identify_packet_device(strings, xfermode: int) -> bytes:
    """IDENTIFY PACKET DEVICE data for a CD-ROM drive with 12-byte packets."""
    words = [0] * 256
    words[0] = 0x85C0                         # ATAPI, CD-ROM, removable, 50 us DRQ
    words[49] = 0x0B00                        # IORDY, LBA, DMA
    words[50] = 0x4000
    _common_words(words, strings, xfermode)
    words[82] = 0x4014                        # NOP, PACKET, removable media
    words[85] = 0x4014
    words[84] = words[87] = 0x4000
    return _with_checksum(words)


# --- handlers ---------------------------------------------------------------------------
def _lba28(cfis: bytes) -> tuple[int, int]:
    lba = cfis[4] | cfis[5] << 8 | cfis[6] << 16 | (cfis[7] & 0xF) << 24
    return lba, cfis[12] or 256


def _lba48(cfis: bytes) -> int:
    return cfis[4] | cfis[5] << 8 | cfis[6] << 16 | cfis[8] << 24 | cfis[9] << 32 | \
        cfis[10] << 40


def _range(command: Command) -> tuple[int, int]:
    """(first sector, sector count) of a read or write command."""
    cfis = command.cfis
    if command.opcode in (READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED):
        return _lba48(cfis), (cfis[3] | cfis[11] << 8) or 65536
    if command.opcode in (READ_DMA_EXT, WRITE_DMA_EXT, READ_SECTORS_EXT, WRITE_SECTORS_EXT,
                          READ_MULTIPLE_EXT, WRITE_MULTIPLE_EXT):
        return _lba48(cfis), (cfis[12] | cfis[13] << 8) or 65536
    return _lba28(cfis)


def read_write(port, command: Command) -> None:
    lba, count = _range(command)
    write = command.opcode in WRITES
    if lba + count > port.blocks:
        raise AtaError(ERROR_IDNF | ERROR_ABRT)
    if write and port.image.read_only:
        raise AtaError(ERROR_ABRT)
    views, aligned = port.guest_views(command, count * SECTOR, into_guest=not write)
    try:
        done = (port.image.writev if write else port.image.readv)(views, lba * SECTOR, aligned)
        if done and write and not port.write_cache:
            port.image.flush()
    except OSError as exc:
        port.warn_once(f"io-{write}", "%s of %s failed: %s", "write" if write else "read",
                       port.path, exc)
        done = False
    if not done:
        raise AtaError(ERROR_ABRT if write else ERROR_UNC)
    command.transferred = count * SECTOR


def flush(port, command: Command) -> None:
    try:
        port.image.flush()
    except OSError as exc:
        port.warn_once("flush", "flushing %s failed: %s", port.path, exc)
        raise AtaError(ERROR_ABRT) from None


def data_set_management(port, command: Command) -> None:
    """TRIM: each 8-byte entry a 48-bit LBA and a 16-bit count (0: unused)."""
    blocks = command.cfis[12] | command.cfis[13] << 8
    if not port.trim or not command.cfis[3] & DSM_TRIM or not blocks:
        raise AtaError(ERROR_ABRT)
    data = port.from_guest(command, blocks * SECTOR)
    ranges = []
    for (entry,) in _RANGE_ENTRY.iter_unpack(data):
        lba, count = entry & ((1 << 48) - 1), entry >> 48
        if count:
            if lba + count > port.blocks:
                raise AtaError(ERROR_IDNF | ERROR_ABRT)
            ranges.append((lba * SECTOR, count * SECTOR))
    try:
        for offset, length in ranges:
            port.image.clear(offset, length, unmap=True)
    except OSError as exc:
        port.warn_once("trim", "discarding blocks of %s failed: %s", port.path, exc)
        raise AtaError(ERROR_ABRT) from None


def identify(port, command: Command) -> None:
    if port.atapi:
        raise AtaError(ERROR_ABRT)            # an ATAPI drive answers with its signature
    port.to_guest(command, port.identify_data())


def identify_packet(port, command: Command) -> None:
    if not port.atapi:
        raise AtaError(ERROR_ABRT)
    port.to_guest(command, port.identify_data())


def set_features(port, command: Command) -> None:
    feature, count = command.cfis[3], command.cfis[12]
    if feature == SF_TRANSFER_MODE:
        kind = count & 0xF8
        if not ((kind == 0x40 and count & 7 <= 6) or (kind == 0x20 and count & 7 <= 2) or
                kind in (0x00, 0x08)):
            raise AtaError(ERROR_ABRT)
        port.xfermode = count
    elif feature in (SF_WRITE_CACHE_ON, SF_WRITE_CACHE_OFF) and not port.atapi:
        port.write_cache = feature == SF_WRITE_CACHE_ON
    elif feature not in (SF_SATA_ON, SF_SATA_OFF, SF_LOOKAHEAD_ON, SF_LOOKAHEAD_OFF):
        raise AtaError(ERROR_ABRT)


def set_multiple(port, command: Command) -> None:
    count = command.cfis[12]
    if port.atapi or not count or count > MAX_MULTIPLE or count & (count - 1):
        raise AtaError(ERROR_ABRT)
    port.mult_sectors = count


def read_log(port, command: Command) -> None:
    """READ LOG EXT of the NCQ command error log (page 10h), which a driver
    reads after a queued command failed; the log is then cleared."""
    page, count = command.cfis[4], command.cfis[12] | command.cfis[13] << 8
    if port.atapi or page != LOG_NCQ_ERROR or count != 1 or command.cfis[5]:
        raise AtaError(ERROR_ABRT)
    log = bytearray(SECTOR)
    log[:len(port.ncq_error)] = port.ncq_error
    log[511] = -sum(log[:511]) & 0xFF
    port.ncq_error = b""
    port.to_guest(command, bytes(log))


def check_power_mode(port, command: Command) -> None:
    command.result_count = 0xFF               # active or idle


def succeed(port, command: Command) -> None:
    """Commands with nothing to do here (power states, verify, freeze lock)."""
    if port.atapi:
        raise AtaError(ERROR_ABRT)


def packet(port, command: Command) -> None:
    if not port.atapi:
        raise AtaError(ERROR_ABRT)
    atapi.execute(port, command)


READS = {READ_DMA, READ_DMA_EXT, READ_SECTORS, READ_SECTORS_EXT, READ_MULTIPLE,
         READ_MULTIPLE_EXT, READ_FPDMA_QUEUED}
WRITES = {WRITE_DMA, WRITE_DMA_EXT, WRITE_SECTORS, WRITE_SECTORS_EXT, WRITE_MULTIPLE,
          WRITE_MULTIPLE_EXT, WRITE_FPDMA_QUEUED}
# commands that move data by PIO: the device sends a PIO Setup FIS first
PIO_DATA = {READ_SECTORS, READ_SECTORS_EXT, READ_MULTIPLE, READ_MULTIPLE_EXT, WRITE_SECTORS,
            WRITE_SECTORS_EXT, WRITE_MULTIPLE, WRITE_MULTIPLE_EXT, IDENTIFY_DEVICE,
            IDENTIFY_PACKET_DEVICE, READ_LOG_EXT}
QUEUED = {READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED}


def _disk_only(handler):
    def run(port, command: Command) -> None:
        if port.atapi:
            raise AtaError(ERROR_ABRT)
        handler(port, command)
    run.__name__ = handler.__name__
    return run


COMMANDS = {
    **{opcode: _disk_only(read_write) for opcode in READS | WRITES},
    DSM: _disk_only(data_set_management),
    FLUSH_CACHE: _disk_only(flush), FLUSH_CACHE_EXT: _disk_only(flush),
    IDENTIFY_DEVICE: identify, IDENTIFY_PACKET_DEVICE: identify_packet,
    SET_FEATURES: set_features, SET_MULTIPLE_MODE: set_multiple, READ_LOG_EXT: read_log,
    CHECK_POWER_MODE: check_power_mode, PACKET: packet,
    **{opcode: succeed for opcode in (STANDBY_IMMEDIATE, IDLE_IMMEDIATE, STANDBY, IDLE,
                                       READ_VERIFY, READ_VERIFY_EXT, INITIALIZE_PARAMETERS,
                                       SECURITY_FREEZE_LOCK)},
}


def execute(port, command: Command) -> None:
    """Run one command; AtaError for the guest (unknown opcodes: ABRT)."""
    handler = COMMANDS.get(command.opcode)
    if handler is None:
        raise AtaError(ERROR_ABRT)
    try:
        handler(port, command)
    except DmaError as exc:
        port.warn_once("prdt", "%s", exc)
        raise AtaError(ERROR_ABRT) from None
