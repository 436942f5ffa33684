"""The SCSI commands (SPC, MMC) a CD-ROM drive on an AHCI port answers
through the ATA PACKET command, as bhyve's pci_ahci offers them: INQUIRY,
TEST UNIT READY, REQUEST SENSE, READ CAPACITY, READ(10) and READ(12) of
2048-byte blocks, READ TOC (formats 0, 1 and 2: what Linux and SeaBIOS ask
for), GET CONFIGURATION, GET EVENT STATUS NOTIFICATION, MODE SENSE(10),
START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL.

A command that fails is a CHECK CONDITION: its sense key, additional sense
code and qualifier are kept for the REQUEST SENSE the driver sends next, and
the PACKET command ends with ERR and the sense key in the Error register's
high nibble (as ATAPI drives report it).  The medium is always present:
the image the operator named (there is no way to change it while running).
"""

import struct

from .protocol import AtaError, Command

BLOCK = 2048
LEAD_IN = 150                                 # an MSF address counts the 2 s lead-in

TEST_UNIT_READY, REQUEST_SENSE, INQUIRY, START_STOP_UNIT = 0x00, 0x03, 0x12, 0x1B
PREVENT_ALLOW, READ_CAPACITY, READ_10, READ_TOC = 0x1E, 0x25, 0x28, 0x43
GET_CONFIGURATION, GET_EVENT_STATUS, MODE_SENSE_10, READ_12 = 0x46, 0x4A, 0x5A, 0xA8

NO_SENSE, MEDIUM_ERROR, ILLEGAL_REQUEST = 0x0, 0x3, 0x5
INVALID_OPCODE, LBA_OUT_OF_RANGE, INVALID_FIELD = 0x20, 0x21, 0x24
UNRECOVERED_READ, SAVING_NOT_SUPPORTED = 0x11, 0x39

PROFILE_CD_ROM = 0x0008
LEAD_OUT_TRACK = 0xAA
DATA_TRACK = 0x14                             # ADR 1 (position), control 4 (data)
EVENT_CLASS_MEDIA = 0x10
MEDIA_PRESENT = 0x02
PAGE_ERROR_RECOVERY, PAGE_CAPABILITIES, ALL_PAGES = 0x01, 0x2A, 0x3F
# the INQUIRY vendor field; product and revision come from the port's model and rev
VENDOR = "PYHYVE"
INTERRUPT_REASON_DONE = 0x03                  # Count register: I/O and C/D, status phase


class CheckCondition(Exception):
    def __init__(self, key: int, asc: int, ascq: int = 0):
        super().__init__(f"sense {key:x}/{asc:02x}/{ascq:02x}")
        self.key, self.asc, self.ascq = key, asc, ascq


def _be16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 2], "big")


def _be32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 4], "big")


def _reply(port, command: Command, data: bytes, allocation: int) -> None:
    port.to_guest(command, data[:allocation])


def _msf(lba: int) -> bytes:
    lba += LEAD_IN
    return bytes((lba // (75 * 60), lba // 75 % 60, lba % 75))


def _address(lba: int, msf: bool) -> bytes:
    return b"\0" + _msf(lba) if msf else lba.to_bytes(4, "big")


# --- commands ----------------------------------------------------------------------------
def test_unit_ready(port, command: Command, cdb: bytes) -> None:
    """The medium is always there."""


def request_sense(port, command: Command, cdb: bytes) -> None:
    key, asc, ascq = port.sense
    data = bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))
    _reply(port, command, data, cdb[4])


def inquiry(port, command: Command, cdb: bytes) -> None:
    if cdb[1] & 1 or cdb[2]:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD)    # no vital product data
    model, revision = port.strings[2], port.strings[1]
    data = bytes((0x05, 0x80, 0x00, 0x02, 31, 0, 0, 0)) + VENDOR.encode().ljust(8) + \
        model.encode()[:16].ljust(16) + revision.encode()[:4].ljust(4)
    _reply(port, command, data, _be16(cdb, 3))


def read_capacity(port, command: Command, cdb: bytes) -> None:
    _reply(port, command, struct.pack(">II", port.blocks - 1, BLOCK), 8)


def read(port, command: Command, cdb: bytes) -> None:
    lba = _be32(cdb, 2)
    count = _be16(cdb, 7) if cdb[0] == READ_10 else _be32(cdb, 6)
    if lba + count > port.blocks:
        raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    if not count:
        return
    views, aligned = port.guest_views(command, count * BLOCK, into_guest=True)
    try:
        done = port.image.readv(views, lba * BLOCK, aligned)
    except OSError as exc:
        port.warn_once("io-read", "read of %s failed: %s", port.path, exc)
        done = False
    if not done:
        raise CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ)
    command.transferred = count * BLOCK


def _toc(port, msf: bool, start: int) -> bytes:
    if start > 1 and start != LEAD_OUT_TRACK:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD)
    tracks = [(1, 0)] if start <= 1 else []
    tracks.append((LEAD_OUT_TRACK, port.blocks))
    return b"".join(bytes((0, DATA_TRACK, number, 0)) + _address(lba, msf)
                    for number, lba in tracks)


def _raw_toc(port) -> bytes:
    """Format 2: the Q sub-channel entries of session 1 (points A0, A1, A2, track 1)."""
    entries = ((0xA0, bytes((1, 0, 0))), (0xA1, bytes((1, 0, 0))),
               (0xA2, _msf(port.blocks)), (1, _msf(0)))
    return b"".join(bytes((1, DATA_TRACK, 0, point, 0, 0, 0, 0)) + where
                    for point, where in entries)


def read_toc(port, command: Command, cdb: bytes) -> None:
    msf, form = bool(cdb[1] & 2), cdb[2] & 0xF or cdb[9] >> 6
    if form == 0:
        body = _toc(port, msf, cdb[6])
    elif form == 1:                           # the last session's first track
        body = bytes((0, DATA_TRACK, 1, 0)) + _address(0, msf)
    elif form == 2:
        body = _raw_toc(port)
    else:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD)
    data = (len(body) + 2).to_bytes(2, "big") + bytes((1, 1)) + body
    _reply(port, command, data, _be16(cdb, 7))


def _feature(code: int, current: bool, version: int, body: bytes) -> tuple[int, bool, bytes]:
    head = code.to_bytes(2, "big") + bytes((version << 2 | 0x02 | current, len(body)))
    return code, current, head + body


FEATURES = (
    _feature(0x0000, True, 0, PROFILE_CD_ROM.to_bytes(2, "big") + b"\x01\x00"),  # profiles
    _feature(0x0001, True, 0, struct.pack(">IBxxx", 2, 0)),       # core: ATAPI
    _feature(0x0003, True, 0, bytes((0x29, 0, 0, 0))),            # removable: tray, eject
    _feature(0x0010, True, 0, struct.pack(">IHBx", BLOCK, 1, 0)),  # random readable
    _feature(0x001E, True, 2, bytes(4)),                          # CD read
)


def get_configuration(port, command: Command, cdb: bytes) -> None:
    requested, start = cdb[1] & 3, _be16(cdb, 2)
    if requested == 3:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD)
    chosen = [data for code, current, data in FEATURES
              if (code == start if requested == 2 else code >= start) and
              (current or requested != 1)]
    body = b"".join(chosen)
    data = (len(body) + 4).to_bytes(4, "big") + b"\0\0" + \
        PROFILE_CD_ROM.to_bytes(2, "big") + body
    _reply(port, command, data, _be16(cdb, 7))


def get_event_status(port, command: Command, cdb: bytes) -> None:
    if not cdb[1] & 1:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD)      # polled only
    if cdb[4] & EVENT_CLASS_MEDIA:            # no event; the medium is present
        data = struct.pack(">HBB", 6, 0x04, EVENT_CLASS_MEDIA) + bytes((0, MEDIA_PRESENT, 0, 0))
    else:                                     # no event available for what was asked
        data = struct.pack(">HBB", 2, 0x80, EVENT_CLASS_MEDIA)
    _reply(port, command, data, _be16(cdb, 7))


def _mode_page(page: int, changeable: bool) -> bytes:
    if page == PAGE_ERROR_RECOVERY:
        body = bytes((0, 5)) + bytes(8)      # read retry count 5
    else:
        body = bytes((0x03, 0, 0x70, 0, 0x29, 0)) + struct.pack(">HHHH", 706, 0, 512, 706) + \
            bytes(4)                          # CD-R/RW read; mode 2, multi-session; tray
    return bytes((page, len(body))) + (bytes(len(body)) if changeable else body)


def mode_sense(port, command: Command, cdb: bytes) -> None:
    control, page = cdb[2] >> 6, cdb[2] & 0x3F
    if control == 3:
        raise CheckCondition(ILLEGAL_REQUEST, SAVING_NOT_SUPPORTED)
    if page == ALL_PAGES:
        pages = (PAGE_ERROR_RECOVERY, PAGE_CAPABILITIES)
    elif page in (PAGE_ERROR_RECOVERY, PAGE_CAPABILITIES):
        pages = (page,)
    else:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD)
    body = b"".join(_mode_page(number, control == 1) for number in pages)
    data = (len(body) + 6).to_bytes(2, "big") + bytes(6) + body
    _reply(port, command, data, _be16(cdb, 7))


def no_action(port, command: Command, cdb: bytes) -> None:
    """START STOP UNIT and PREVENT ALLOW: the medium cannot leave."""


COMMANDS = {
    TEST_UNIT_READY: test_unit_ready, REQUEST_SENSE: request_sense, INQUIRY: inquiry,
    START_STOP_UNIT: no_action, PREVENT_ALLOW: no_action, READ_CAPACITY: read_capacity,
    READ_10: read, READ_12: read, READ_TOC: read_toc, GET_CONFIGURATION: get_configuration,
    GET_EVENT_STATUS: get_event_status, MODE_SENSE_10: mode_sense,
}


def execute(port, command: Command) -> None:
    """Run the packet in the command table; a CHECK CONDITION becomes the
    port's sense data and an AtaError with the sense key."""
    cdb = bytes(command.acmd)
    handler = COMMANDS.get(cdb[0])
    try:
        if handler is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_OPCODE)
        handler(port, command, cdb)
    except CheckCondition as condition:
        port.sense = (condition.key, condition.asc, condition.ascq)
        raise AtaError(condition.key << 4) from None
    port.sense = (NO_SENSE, 0, 0)             # REQUEST SENSE reported it already
    command.result_count = INTERRUPT_REASON_DONE
