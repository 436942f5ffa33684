"""A SCSI target whose logical units are disks on the shared block backend
(pyhyve.block): the commands of SPC-4 and SBC-3 that Linux's sd, the SCSI
scan and firmware send to a direct-access device, answered from the image.

    target = ScsiTarget({0: ScsiDisk(image, serial="X")}, warn)
    status, sense, count = target.execute(lun, cdb, data_out, data_in)

A transport (virtio-scsi today; any host bus adapter could carry it) decodes
its own LUN addressing and framing and hands over the CDB with the
initiator's buffers as memoryviews over guest memory: data_out what the
initiator sends (a write's blocks, an UNMAP list), data_in where replies go.
`count` is how many bytes went into data_in; `sense` is fixed-format sense
data for a CHECK CONDITION (autosense: the transport returns it with the
status, so nothing waits for a REQUEST SENSE).  A command whose buffers are
shorter than its transfer raises Overrun, which the transport reports in its
own terms.

Everything else a command can get wrong is answered as a real target would:
CHECK CONDITION with ILLEGAL REQUEST (an opcode we do not implement, a bad
field, an LBA past the end, a LUN that is not there), DATA PROTECT for a
write to a read-only LUN, MEDIUM ERROR for a host I/O error (logged once
through `warn`).  Nothing raises but Overrun and the GuestMemoryError of a
buffer outside guest memory, which the transport turns into its own error.

Commands complete before execute() returns, so there is never a task to
abort, and no unit attention is raised.
"""

import struct

from .block import BlockImage

BLOCK = 512

# SCSI status (SAM-5)
GOOD, CHECK_CONDITION = 0x00, 0x02

# sense keys
NO_SENSE, MEDIUM_ERROR, ILLEGAL_REQUEST, DATA_PROTECT = 0x0, 0x3, 0x5, 0x7
# (additional sense code, qualifier)
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
INVALID_OPCODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LUN_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)

# operation codes
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6, WRITE_6 = 0x08, 0x0A
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
READ_CAPACITY_10 = 0x25
READ_10, WRITE_10 = 0x28, 0x2A
SYNCHRONIZE_CACHE_10 = 0x35
UNMAP = 0x42
MODE_SENSE_10 = 0x5A
READ_16, WRITE_16 = 0x88, 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
SERVICE_ACTION_IN_16 = 0x9E
SA_READ_CAPACITY_16 = 0x10
REPORT_LUNS = 0xA0

VENDOR = "PYHYVE"
PRODUCT = "VIRTUAL DISK"
REVISION = "0001"
SPC_VERSION = 5                     # SPC-3: Linux then sends READ CAPACITY(16) first
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
MAX_TRANSFER_BLOCKS = 0xFFFF        # per READ/WRITE, in the Block Limits page
MAX_UNMAP_BLOCKS = 0x3FFFFF         # per UNMAP descriptor
MAX_UNMAP_DESCRIPTORS = 32
UNMAP_GRANULARITY = 8               # blocks: the host's holes are 4 KiB pages
MODE_CACHING, MODE_CONTROL, MODE_ALL = 0x08, 0x0A, 0x3F
CACHING_WCE = 0x04                  # a volatile write cache: Linux sends SYNCHRONIZE CACHE
DEVICE_SPECIFIC_WP = 0x80           # mode parameter header: write protected

_UNMAP_DESCRIPTOR = struct.Struct(">QI4x")


class Overrun(Exception):
    """The initiator's buffers are shorter than the transfer the CDB asks for."""


def sense_data(key: int, code: tuple[int, int]) -> bytes:
    """Fixed-format sense data (SPC-4 4.5.3), current error."""
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, code[0], code[1], 0, 0, 0, 0])


def _ascii(text: str, length: int) -> bytes:
    return text.encode("ascii", "replace")[:length].ljust(length, b" ")


def give(views: list[memoryview], payload: bytes, allocation: int) -> int:
    """Copy up to `allocation` bytes of a reply into the data-in buffers; the count."""
    payload = memoryview(payload)[:allocation]
    done = 0
    for view in views:
        if done == len(payload):
            break
        count = min(len(view), len(payload) - done)
        view[:count] = payload[done:done + count]
        done += count
    return done


def take(views: list[memoryview], length: int) -> list[memoryview]:
    """The first `length` bytes of the buffers, as views; Overrun if there are fewer."""
    taken = []
    for view in views:
        if length == 0:
            break
        taken.append(view[:length])
        length -= len(taken[-1])
    if length:
        raise Overrun(f"{length} bytes short")
    return taken


class CheckCondition(Exception):
    """Raised inside a command: CHECK CONDITION with this sense."""

    def __init__(self, key: int, code: tuple[int, int]):
        super().__init__(key, code)
        self.sense = sense_data(key, code)


def _illegal(code: tuple[int, int] = INVALID_FIELD_IN_CDB) -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, code)


class ScsiDisk:
    """One direct-access logical unit (peripheral device type 0) on an image."""

    def __init__(self, image: BlockImage, serial: str):
        self.image = image
        self.serial = serial
        self.blocks = image.size // BLOCK
        self.read_only = image.read_only
        self.can_unmap = image.can_punch

    # --- INQUIRY ----------------------------------------------------------------------
    def inquiry(self, cdb: bytes) -> bytes:
        if cdb[1] & 1:
            return self._vpd(cdb[2])
        if cdb[2]:
            raise _illegal()
        return bytes([0x00, 0x00, SPC_VERSION, 0x02, 31, 0, 0, 0x02]) + \
            _ascii(VENDOR, 8) + _ascii(PRODUCT, 16) + _ascii(REVISION, 4)

    def _vpd(self, page: int) -> bytes:
        if page == 0x00:
            body = bytes(VPD_PAGES)
        elif page == 0x80:
            body = _ascii(self.serial, len(self.serial))
        elif page == 0x83:               # one designator: T10 vendor ID, ASCII
            identifier = _ascii(VENDOR, 8) + _ascii(self.serial, len(self.serial))
            body = bytes([0x02, 0x01, 0, len(identifier)]) + identifier
        elif page == 0xB0:               # Block Limits
            body = bytearray(0x3C)
            struct.pack_into(">I", body, 4, MAX_TRANSFER_BLOCKS)
            if self.can_unmap:
                struct.pack_into(">II", body, 16, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS)
                struct.pack_into(">I", body, 24, UNMAP_GRANULARITY)
        elif page == 0xB1:               # Block Device Characteristics: not rotating
            body = bytearray(0x3C)
            struct.pack_into(">H", body, 0, 1)
        elif page == 0xB2:               # Logical Block Provisioning
            # LBPU: UNMAP works; LBPRZ 1: unmapped blocks read as zeros; thin provisioned
            body = bytes([0, 0x84, 0x02, 0]) if self.can_unmap else bytes(4)
        else:
            raise _illegal()
        return bytes([0x00, page]) + struct.pack(">H", len(body)) + bytes(body)

    # --- capacity and modes --------------------------------------------------------------
    def read_capacity_10(self) -> bytes:
        return struct.pack(">II", min(self.blocks - 1, 0xFFFFFFFF), BLOCK)

    def read_capacity_16(self) -> bytes:
        provisioning = 0xC000 if self.can_unmap else 0        # LBPME, LBPRZ
        return struct.pack(">QIBBH16x", self.blocks - 1, BLOCK, 0, 0, provisioning)

    def mode_sense(self, cdb: bytes, ten: bool) -> bytes:
        page, subpage, control = cdb[2] & 0x3F, cdb[3], cdb[2] >> 6
        if control == 3:
            raise _illegal(SAVING_PARAMETERS_NOT_SUPPORTED)
        if subpage and not (page == MODE_ALL and subpage == 0xFF):
            raise _illegal()
        changeable = control == 1
        pages = {MODE_CACHING: bytes([MODE_CACHING, 0x12, 0 if changeable else CACHING_WCE])
                 + bytes(17),
                 MODE_CONTROL: bytes([MODE_CONTROL, 0x0A]) + bytes(10)}
        if page == MODE_ALL:
            body = b"".join(pages.values())
        elif page in pages:
            body = pages[page]
        else:
            raise _illegal()
        descriptor = b"" if cdb[1] & 0x08 else struct.pack(
            ">IxBH", min(self.blocks, 0xFFFFFFFF), BLOCK >> 16, BLOCK & 0xFFFF)
        flags = DEVICE_SPECIFIC_WP if self.read_only else 0
        if ten:
            length = 6 + len(descriptor) + len(body)
            header = struct.pack(">HBBxxH", length, 0, flags, len(descriptor))
        else:
            length = 3 + len(descriptor) + len(body)
            header = bytes([length, 0, flags, len(descriptor)])
        return header + descriptor + body

    # --- data ------------------------------------------------------------------------------
    def _range(self, lba: int, count: int) -> None:
        if lba + count > self.blocks:
            raise _illegal(LBA_OUT_OF_RANGE)

    def read(self, lba: int, count: int, data_in: list[memoryview]) -> int:
        self._range(lba, count)
        views = take(data_in, count * BLOCK)
        if count and not self.image.readv(views, lba * BLOCK):
            raise CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
        return count * BLOCK

    def write(self, lba: int, count: int, data_out: list[memoryview]) -> None:
        if self.read_only:
            raise CheckCondition(DATA_PROTECT, WRITE_PROTECTED)
        self._range(lba, count)
        views = take(data_out, count * BLOCK)
        if count and not self.image.writev(views, lba * BLOCK):
            raise CheckCondition(MEDIUM_ERROR, WRITE_ERROR)

    def unmap(self, cdb: bytes, data_out: list[memoryview]) -> None:
        """UNMAP's parameter list: an 8-byte header, then (LBA, count) descriptors."""
        if self.read_only:
            raise CheckCondition(DATA_PROTECT, WRITE_PROTECTED)
        if not self.can_unmap or cdb[1] & 0x01:          # ANCHOR: no anchored state here
            raise _illegal()
        length = struct.unpack_from(">H", cdb, 7)[0]
        if length == 0:
            return
        if length < 8:
            raise _illegal(PARAMETER_LIST_LENGTH_ERROR)
        data = b"".join(take(data_out, length))
        descriptors = struct.unpack_from(">H", data, 2)[0]
        if descriptors % 16 or 8 + descriptors > length:
            raise _illegal(PARAMETER_LIST_LENGTH_ERROR)
        if descriptors // 16 > MAX_UNMAP_DESCRIPTORS:
            raise _illegal(INVALID_FIELD_IN_PARAMETER_LIST)
        ranges = list(_UNMAP_DESCRIPTOR.iter_unpack(data[8:8 + descriptors]))
        for lba, count in ranges:
            if count > MAX_UNMAP_BLOCKS:
                raise _illegal(INVALID_FIELD_IN_PARAMETER_LIST)
            self._range(lba, count)
        for lba, count in ranges:
            if count:
                self.image.clear(lba * BLOCK, count * BLOCK, True)


# READ and WRITE CDBs: (LBA offset, LBA format, length offset, length format); the
# 6-byte ones hold a 21-bit LBA in bytes 1-3, read here with the opcode and masked
_TRANSFER = {READ_6: (0, ">I", 4, "B"), WRITE_6: (0, ">I", 4, "B"),
             READ_10: (2, ">I", 7, ">H"), WRITE_10: (2, ">I", 7, ">H"),
             READ_16: (2, ">Q", 10, ">I"), WRITE_16: (2, ">Q", 10, ">I")}


class ScsiTarget:
    """The logical units of one target, by LUN, and the target's own commands
    (REPORT LUNS, and what a LUN that is not there answers)."""

    def __init__(self, luns: dict[int, ScsiDisk], warn):
        """`warn(key, message, *args)` logs once per key (the device's warn_once)."""
        self.luns = luns
        self.warn = warn

    def execute(self, lun: int, cdb: bytes, data_out: list[memoryview],
                data_in: list[memoryview]) -> tuple[int, bytes, int]:
        """(status, sense, bytes put in data_in) for one command; `cdb` is at
        least 16 bytes (padded with zeros where the initiator's was shorter)."""
        try:
            disk = self.luns.get(lun)
            if disk is None:
                return GOOD, b"", self._absent(cdb, data_in)
            return GOOD, b"", self._command(disk, cdb, data_out, data_in)
        except CheckCondition as condition:
            return CHECK_CONDITION, condition.sense, 0
        except OSError as exc:
            self.warn(f"io-{exc.errno}", "I/O error on LUN %d: %s", lun, exc.strerror)
            code = UNRECOVERED_READ_ERROR if cdb[0] in (READ_6, READ_10, READ_16) else WRITE_ERROR
            return CHECK_CONDITION, sense_data(MEDIUM_ERROR, code), 0

    def _absent(self, cdb: bytes, data_in: list[memoryview]) -> int:
        """SPC-4 for a LUN with no logical unit: INQUIRY says so (peripheral
        qualifier 3, type 0x1F), REQUEST SENSE and REPORT LUNS work, the rest fail."""
        opcode = cdb[0]
        if opcode == INQUIRY and not cdb[1] & 1 and not cdb[2]:
            reply = bytes([0x7F, 0, SPC_VERSION, 0x02, 31]) + bytes(31)
            return give(data_in, reply, struct.unpack_from(">H", cdb, 3)[0])
        if opcode == REQUEST_SENSE:
            return give(data_in, sense_data(ILLEGAL_REQUEST, LUN_NOT_SUPPORTED), cdb[4])
        if opcode == REPORT_LUNS:
            return self._report_luns(cdb, data_in)
        raise _illegal(LUN_NOT_SUPPORTED)

    def _report_luns(self, cdb: bytes, data_in: list[memoryview]) -> int:
        allocation = struct.unpack_from(">I", cdb, 6)[0]
        if cdb[2] > 2 or allocation < 16:
            raise _illegal()
        # single-level LUNs: peripheral addressing below 256, flat space above
        entries = b"" if cdb[2] == 1 else b"".join(
            struct.pack(">H6x", lun if lun < 256 else 0x4000 | lun) for lun in sorted(self.luns))
        return give(data_in, struct.pack(">I4x", len(entries)) + entries, allocation)

    def _command(self, disk: ScsiDisk, cdb: bytes, data_out: list[memoryview],
                 data_in: list[memoryview]) -> int:
        opcode = cdb[0]
        if opcode in _TRANSFER:
            lba_at, lba_format, count_at, count_format = _TRANSFER[opcode]
            lba = struct.unpack_from(lba_format, cdb, lba_at)[0]
            count = struct.unpack_from(count_format, cdb, count_at)[0]
            if opcode in (READ_6, WRITE_6):
                lba &= 0x1FFFFF
                count = count or 256
            if opcode in (READ_6, READ_10, READ_16):
                return disk.read(lba, count, data_in)
            disk.write(lba, count, data_out)
            return 0
        if opcode == INQUIRY:
            return give(data_in, disk.inquiry(cdb), struct.unpack_from(">H", cdb, 3)[0])
        if opcode in (TEST_UNIT_READY, START_STOP_UNIT):
            return 0
        if opcode == REQUEST_SENSE:              # autosense: nothing is left pending
            descriptor_format = bytes([0x72]) + bytes(7)
            reply = descriptor_format if cdb[1] & 1 else sense_data(NO_SENSE, (0, 0))
            return give(data_in, reply, cdb[4])
        if opcode == READ_CAPACITY_10:
            return give(data_in, disk.read_capacity_10(), 8)
        if opcode == SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == SA_READ_CAPACITY_16:
            return give(data_in, disk.read_capacity_16(), struct.unpack_from(">I", cdb, 10)[0])
        if opcode in (MODE_SENSE_6, MODE_SENSE_10):
            ten = opcode == MODE_SENSE_10
            allocation = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
            return give(data_in, disk.mode_sense(cdb, ten), allocation)
        if opcode in (SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16):
            disk.image.flush()
            return 0
        if opcode == UNMAP:
            disk.unmap(cdb, data_out)
            return 0
        if opcode == REPORT_LUNS:
            return self._report_luns(cdb, data_in)
        raise _illegal(INVALID_OPCODE)
