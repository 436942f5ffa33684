"""The data pages an NVMe controller returns (NVMe 1.4): Identify Controller,
Identify Namespace, the active namespace list, namespace identification
descriptors, and the error, SMART / health and firmware slot log pages.

Each builder takes what it reports as arguments and returns bytes; the
controller decides the values.  Offsets are the spec's byte offsets.
"""

import struct

IDENTIFY_SIZE = 4096
VERSION = 0x00010400            # 1.4.0, as the VS register says

# Identify Controller fields the controller chooses
ONCS_DSM = 1 << 2               # Dataset Management
ONCS_WRITE_ZEROES = 1 << 3
VWC_PRESENT = 1
FRMW_SLOT1_READ_ONLY = 0x03     # one firmware slot, read-only
ABORT_LIMIT = 3                 # ACL and AERL are 0's based: 4 of each
ASYNC_EVENT_LIMIT = 3
SQES = 0x66                     # submission entries: 64 bytes, min and max
CQES = 0x44                     # completion entries: 16 bytes

# Identify Namespace
NSFEAT_THIN = 1                 # deallocation (DSM) is supported
DLFEAT_READS_ZEROES = 0x01      # deallocated blocks read as zeroes
DLFEAT_WRITE_ZEROES_DEALLOCATES = 0x08
NSATTR_WRITE_PROTECTED = 0x01

# namespace identification descriptor types
NIDT_EUI64 = 1

ERROR_LOG_ENTRY = 64
SMART_LOG_SIZE = 512
FIRMWARE_LOG_SIZE = 512
KELVIN_ROOM = 296               # the temperature the SMART log reports


def _text(value: str, size: int) -> bytes:
    """ASCII, space padded, as the spec's string fields are."""
    return value.encode("ascii", "replace")[:size].ljust(size, b" ")


def identify_controller(*, vendor: int, serial: str, model: str, firmware: str,
                        oui: int, mdts: int, namespaces: int, oncs: int,
                        max_commands: int, subnqn: str) -> bytes:
    page = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH20s40s8sB3sBB", page, 0, vendor, vendor, _text(serial, 20),
                     _text(model, 40), _text(firmware, 8), 0, oui.to_bytes(3, "little"),
                     0, mdts)
    struct.pack_into("<HI", page, 78, 0, VERSION)              # CNTLID, VER
    page[111] = 1                                               # CNTRLTYPE: I/O controller
    struct.pack_into("<HBBBBBB", page, 256, 0, ABORT_LIMIT, ASYNC_EVENT_LIMIT,
                     FRMW_SLOT1_READ_ONLY, 0, 0, 0)             # OACS .. NPSS
    struct.pack_into("<HH", page, 266, 0x157, 0x175)            # WCTEMP, CCTEMP (kelvin)
    struct.pack_into("<BBHIH", page, 512, SQES, CQES, max_commands, namespaces, oncs)
    page[525] = VWC_PRESENT
    subnqn_bytes = subnqn.encode("ascii", "replace")[:255]
    page[768:768 + len(subnqn_bytes)] = subnqn_bytes
    struct.pack_into("<H", page, 2048, 2500)                   # power state 0: 25 W
    return bytes(page)


def identify_namespace(*, blocks: int, block_size: int, eui64: int, deallocate: bool,
                       write_zeroes: bool, read_only: bool) -> bytes:
    page = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQBBB", page, 0, blocks, blocks, blocks,
                     NSFEAT_THIN if deallocate else 0, 0, 0)    # NSZE NCAP NUSE NSFEAT NLBAF FLBAS
    page[33] = (DLFEAT_READS_ZEROES | DLFEAT_WRITE_ZEROES_DEALLOCATES) if write_zeroes else 0
    page[99] = NSATTR_WRITE_PROTECTED if read_only else 0
    struct.pack_into(">Q", page, 120, eui64)                    # EUI64, big-endian as IEEE
    struct.pack_into("<I", page, 128, (block_size.bit_length() - 1) << 16)   # LBAF0: LBADS
    return bytes(page)


def namespace_list(active: list[int]) -> bytes:
    return struct.pack(f"<{len(active)}I", *active).ljust(IDENTIFY_SIZE, b"\0")


def namespace_descriptors(eui64: int) -> bytes:
    return struct.pack(">BBxxQ", NIDT_EUI64, 8, eui64).ljust(IDENTIFY_SIZE, b"\0")


def error_log() -> bytes:
    """One entry (ELPE is 0), empty: no error has been logged."""
    return bytes(ERROR_LOG_ENTRY)


def smart_log(*, units_read: int, units_written: int, reads: int, writes: int) -> bytes:
    """SMART / health: no critical warning, a room temperature, all spare left,
    and the I/O the guest did (data units of 1000 512-byte units)."""
    page = bytearray(SMART_LOG_SIZE)
    struct.pack_into("<HBB", page, 1, KELVIN_ROOM, 100, 10)
    for offset, value in ((32, units_read), (48, units_written), (64, reads), (80, writes)):
        page[offset:offset + 16] = min(value, (1 << 128) - 1).to_bytes(16, "little")
    page[112] = 1                                # power cycles
    return bytes(page)


def firmware_log(firmware: str) -> bytes:
    """Slot 1 active, holding the revision Identify Controller reports."""
    page = bytearray(FIRMWARE_LOG_SIZE)
    page[0] = 1
    page[8:16] = _text(firmware, 8)
    return bytes(page)
