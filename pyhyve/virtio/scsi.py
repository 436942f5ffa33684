"""`virtio-scsi`: a SCSI host bus adapter (virtio 1.2, 5.6) with disk LUNs on
image files, served by pyhyve.scsi's target.

    -s SLOT,virtio-scsi,lun0=PATH[,ro][,ser=ID][,lock=off][,lun1=PATH...][,num_queues=N]

bhyve's virtio-scsi hands commands to the host's CAM Target Layer; pyhyve
answers them itself.  Each `lunN=PATH` puts a disk at LUN N (0 to 16383) of
target 0, the only target; `ro`, `ser` and `lock` after it apply to that
LUN (read-only: writes fail with DATA PROTECT and MODE SENSE reports write
protection; the serial of VPD pages 0x80 and 0x83, default SCSI-SLOT-FUNC-N;
lock=off leaves the image unlocked, as virtio-blk's).  As config keys they
are lun.N.path, lun.N.ro, lun.N.ser and lun.N.lock.  `num_queues`
request queues (default 1) follow the control and event queues.

Queues: request queues carry commands (struct virtio_scsi_req_cmd, then data
out; the response, then data in), served whole under the device lock, so
a command is complete before the next is looked at.  The control queue
answers task management with FUNCTION COMPLETE (there is never a task left
to abort or query) and asynchronous-notification queries and subscriptions
with no events supported.  The event queue keeps the driver's buffers: with
no hot plug and no notifications there is nothing to put in them.

The driver may change sense_size and cdb_size in config space; requests are
laid out by the values at the time.  A snapshot keeps those two (requests
are all done by then, and the images synced, as virtio-blk's).
"""

import contextlib
import struct

from ..block import BlockImage
from ..config import Config, ConfigError
from ..lifecycle import expect_keys, uint
from ..scsi import BLOCK, Overrun, ScsiDisk, ScsiTarget
from .device import Transport, VirtioDevice
from .queue import Chain, SplitQueue, VirtqueueError, split_buffers

VIRTIO_ID_SCSI = 8

CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE = 0, 1, 2
QUEUE_SIZE = 256
MAX_REQUEST_QUEUES = 16
MAX_LUN = 16383                  # flat space addressing reaches this far
MAX_SERIAL = 64
SEG_MAX = QUEUE_SIZE - 2
MAX_SECTORS = 0xFFFF
CMD_PER_LUN = 128
EVENT_INFO_SIZE = 16             # struct virtio_scsi_event
DEFAULT_SENSE_SIZE, DEFAULT_CDB_SIZE = 96, 32
CDB_USED = 16                    # the longest CDB pyhyve.scsi reads
SENSE_SIZE_OFFSET, CDB_SIZE_OFFSET = 20, 24

# response codes (5.6.6.1)
S_OK, S_OVERRUN, S_BAD_TARGET, S_FAILURE = 0, 1, 3, 9
S_FUNCTION_COMPLETE, S_FUNCTION_SUCCEEDED, S_FUNCTION_REJECTED, S_INCORRECT_LUN = 0, 10, 11, 12
# control requests (5.6.6.2)
T_TMF, T_AN_QUERY, T_AN_SUBSCRIBE = 0, 1, 2
(TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_ACA, TMF_CLEAR_TASK_SET, TMF_I_T_NEXUS_RESET,
 TMF_LOGICAL_UNIT_RESET, TMF_QUERY_TASK, TMF_QUERY_TASK_SET) = range(8)

# struct virtio_scsi_config (5.6.4)
_CONFIG = struct.Struct("<IIIIIIIHHI")
# struct virtio_scsi_req_cmd up to the CDB: lun, id, task_attr, prio, crn
_CMD_HEADER = struct.Struct("<8sQBBB")
# struct virtio_scsi_resp_cmd up to the sense: sense_len, residual, status_qualifier,
# status, response
_CMD_RESPONSE = struct.Struct("<IIHBB")
_TMF_REQUEST = struct.Struct("<II8sQ")          # type, subtype, lun, id
_AN_REQUEST = struct.Struct("<I8sI")            # type, lun, event_requested
_AN_RESPONSE = struct.Struct("<IB")             # event_actual, response


def decode_lun(lun: bytes) -> int | None:
    """The LUN of target 0 that virtio-scsi's 8-byte address names (5.6.6.1:
    1, target, then a single-level LUN, peripheral or flat space), or None
    where it addresses another target or is not in that form."""
    if lun[0] != 1 or lun[1] != 0 or any(lun[4:]) or lun[2] >> 6 > 1:
        return None
    return (lun[2] & 0x3F) << 8 | lun[3]


def parse_luns(options: dict[str, str]) -> dict[int, dict[str, str]]:
    """{LUN: {"path", "ro", "ser", "lock"}} from the lun.N.* options (their names checked
    against the declaration already); ConfigError naming the problem."""
    luns: dict[int, dict[str, str]] = {}
    for key, value in options.items():
        parts = key.split(".")
        if parts[0] != "lun":
            continue
        number = int(parts[1])
        if number > MAX_LUN:
            raise ConfigError(f"LUN {number} is above {MAX_LUN}")
        luns.setdefault(number, {})[parts[2]] = value
    for number, lun in luns.items():
        if not lun.get("path"):
            raise ConfigError(f"LUN {number} has no image (lun{number}=PATH)")
    return luns


class VirtioScsi(VirtioDevice):
    """virtio SCSI host: the model, built from its options (config keys)"""

    device_type = VIRTIO_ID_SCSI
    name = "virtio-scsi"

    def __init__(self, transport: Transport, options: dict[str, str]):
        try:
            request_queues = Config(options).get_int("num_queues", 1, 1, MAX_REQUEST_QUEUES)
            luns = {number: (Config(lun).get_bool("ro"), Config(lun).get_bool("lock", True), lun)
                    for number, lun in parse_luns(options).items()}
        except ConfigError as exc:
            raise ConfigError(f"virtio-scsi: {exc}") from None
        self.disks: dict[int, ScsiDisk] = {}
        try:
            for number, (read_only, lock, lun) in sorted(luns.items()):
                serial = lun.get("ser", f"SCSI-{transport.instance}-{number}")
                if not (serial.isascii() and serial.isprintable() and
                        0 < len(serial) <= MAX_SERIAL):
                    raise ConfigError(f"virtio-scsi: LUN {number}'s serial '{serial}' is not 1 "
                                      f"to {MAX_SERIAL} printable ASCII characters")
                image = BlockImage(f"virtio-scsi LUN {number}", lun["path"], read_only,
                                   lock=lock)
                self.disks[number] = ScsiDisk(image, serial)
                if image.size < BLOCK:
                    raise ConfigError(f"virtio-scsi: {lun['path']} is smaller than one "
                                      f"{BLOCK}-byte block")
            super().__init__(transport, [QUEUE_SIZE] * (FIRST_REQUEST_QUEUE + request_queues),
                             0, _CONFIG.size)
        except BaseException:
            self.close()
            raise
        self.request_queues = request_queues
        self.target = ScsiTarget(self.disks, transport.warn_once)
        self.reset()

    def reset(self) -> None:
        """The sizes the driver may have written go back to their defaults."""
        self.sense_size, self.cdb_size = DEFAULT_SENSE_SIZE, DEFAULT_CDB_SIZE
        self._write_config()

    def _write_config(self) -> None:
        _CONFIG.pack_into(self.config, 0, self.request_queues, SEG_MAX, MAX_SECTORS,
                          CMD_PER_LUN, EVENT_INFO_SIZE, self.sense_size, self.cdb_size,
                          0, 0, MAX_LUN)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """sense_size and cdb_size are the driver's to set (whole 32-bit writes)."""
        if size != 4 or offset not in (SENSE_SIZE_OFFSET, CDB_SIZE_OFFSET):
            self.transport.warn_once("config-write", "ignored a %d-byte config write at %#x",
                                     size, offset)
            return
        if offset == SENSE_SIZE_OFFSET:
            self.sense_size = value
        else:
            self.cdb_size = value
        self._write_config()

    def close(self) -> None:
        for disk in self.disks.values():
            disk.image.close()

    @contextlib.contextmanager
    def quiesce(self):
        """Commands are served whole under the device lock; what they wrote goes to
        stable storage before the snapshot that counts them as done."""
        for disk in self.disks.values():
            disk.image.flush()
        yield

    def save_state(self) -> dict:
        return {"sense_size": self.sense_size, "cdb_size": self.cdb_size}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("sense_size", "cdb_size"), self.name)
        sense_size = uint(state["sense_size"], 0xFFFFFFFF, f"{self.name} sense_size")
        cdb_size = uint(state["cdb_size"], 0xFFFFFFFF, f"{self.name} cdb_size")
        self.sense_size, self.cdb_size = sense_size, cdb_size
        self._write_config()

    # --- queues --------------------------------------------------------------------------
    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        """The event queue holds its buffers for events that never come; the
        others are served at once."""
        if index != EVENT_QUEUE:
            super().queue_notified(index, queue)

    def handle_request(self, index: int, chain: Chain) -> int:
        if index == CONTROL_QUEUE:
            return self._control(chain)
        return self._command(chain)

    def _command(self, chain: Chain) -> int:
        """One SCSI command: header and CDB, data out; response and sense, data in."""
        memory = self.transport.memory
        response_size = _CMD_RESPONSE.size + self.sense_size
        room = sum(n for _, n in chain.writable)
        if room < _CMD_RESPONSE.size:
            raise VirtqueueError("SCSI command without room for its response")
        header_size = _CMD_HEADER.size + self.cdb_size
        header_pairs, data_out_pairs = split_buffers(chain.readable, header_size)
        # only the part of the header pyhyve reads is copied out of the guest
        wanted = _CMD_HEADER.size + min(self.cdb_size, CDB_USED)
        header = b"".join(memory.view(g, n) for g, n in split_buffers(header_pairs, wanted)[0])
        _, data_in_pairs = split_buffers(chain.writable, response_size)
        data_in = [memory.view(g, n, write=True) for g, n in data_in_pairs]
        data_in_length = sum(map(len, data_in))
        status = count = 0
        sense = b""
        if len(header) < wanted or sum(n for _, n in header_pairs) < header_size:
            response = S_FAILURE
        elif (lun := decode_lun(header[:8])) is None:
            response = S_BAD_TARGET
        else:
            cdb = header[_CMD_HEADER.size:].ljust(CDB_USED, b"\0")
            data_out = [memory.view(g, n) for g, n in data_out_pairs]
            try:
                status, sense, count = self.target.execute(lun, cdb, data_out, data_in)
                response = S_OK
            except Overrun:
                response = S_OVERRUN
        sense = sense[:self.sense_size]
        chain.write(memory, _CMD_RESPONSE.pack(len(sense), data_in_length - count, 0, status,
                                               response) + sense)
        return min(room, response_size) + count

    def _control(self, chain: Chain) -> int:
        """Task management and asynchronous notification requests."""
        request = chain.read_all(self.transport.memory)
        if len(request) < 4:
            raise VirtqueueError("control request without a type")
        kind = struct.unpack_from("<I", request)[0]
        if kind == T_TMF and len(request) >= _TMF_REQUEST.size:
            _, subtype, lun, _ = _TMF_REQUEST.unpack_from(request)
            reply = bytes([self._task_management(subtype, lun)])
        elif kind in (T_AN_QUERY, T_AN_SUBSCRIBE) and len(request) >= _AN_REQUEST.size:
            _, lun, _ = _AN_REQUEST.unpack_from(request)
            # no asynchronous events are supported: none requested is granted
            reply = _AN_RESPONSE.pack(0, S_OK if decode_lun(lun) is not None else S_BAD_TARGET)
        else:
            raise VirtqueueError(f"control request of type {kind} and {len(request)} bytes")
        if sum(n for _, n in chain.writable) < len(reply):
            raise VirtqueueError("control request without room for its response")
        return chain.write(self.transport.memory, reply)

    def _task_management(self, subtype: int, lun_address: bytes) -> int:
        """Every command completed before this request was looked at: nothing to
        abort, clear or find, and a reset has nothing to undo."""
        lun = decode_lun(lun_address)
        if lun is None:
            return S_BAD_TARGET
        if subtype == TMF_I_T_NEXUS_RESET:
            return S_FUNCTION_COMPLETE
        if lun not in self.disks:
            return S_INCORRECT_LUN
        if subtype in (TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET,
                       TMF_LOGICAL_UNIT_RESET, TMF_QUERY_TASK, TMF_QUERY_TASK_SET):
            return S_FUNCTION_COMPLETE
        return S_FUNCTION_REJECTED
