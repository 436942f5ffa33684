"""`nvme`: an NVM Express 1.4 controller with one namespace on a disk image,
as bhyve's pci_nvme offers it.

    -s SLOT,nvme,PATH[,maxq=N][,qsz=N][,ioslots=N][,sectsz=512|4096][,ser=SERIAL]
                     [,eui64=N][,dsm=auto|enable|disable][,ro][,nocache][,direct]
                     [,lock=off]

`maxq` I/O queue pairs (default 16), each of up to `qsz` entries (CAP.MQES + 1,
default 2048); `ioslots` commands served from one submission queue before
the next queue is looked at (default 8); `sectsz` the logical block size;
`ser` the 20-character serial (default NVME-SLOT-FUNC, as bhyve); `eui64`
the namespace's EUI-64 (default from the VM name and the slot); `dsm`
whether Dataset Management deallocates (auto: where the image can punch
holes, enable: always, zeroing where it cannot, disable: never); `ro` makes
the namespace write protected; `nocache`, `direct` and `lock` are the block
backend's (pyhyve.block), as for virtio-blk.

The PCI function: class 01/08/02, 64-bit memory BAR 0 with the controller
registers and the doorbells (stride 4 bytes, CAP.DSTRD 0), MSI-X (one vector
per queue pair, admin included) in memory BAR 4, and INTx for drivers that
use no MSI-X (masked through INTMS/INTMC, asserted while an interrupt-enabled
completion queue holds entries the host has not consumed).

Commands are served on the vCPU thread whose doorbell write names new
entries (a doorbell carries a value, so it cannot be a KVM ioeventfd):
every submission queue with work is drained while its completion queue has
room, under the device lock, with preadv/pwritev straight between the image
and guest memory.  Nothing is ever in flight between two register accesses
but held Asynchronous Event Requests, so a snapshot needs no quiesce beyond
syncing the disk, and saves the registers, the queues' positions and the
held requests.

Every number the guest gives is checked: queue bases and sizes against
guest RAM and CAP.MQES when the queue is made, each PRP against guest memory
(pyhyve.nvme.prp), LBA ranges against the namespace.  A bad command
completes with the spec's status; a bad register or doorbell write is
logged once and ignored; the guest never raises out of a register access.
"""

import contextlib
import struct
import threading
import zlib

from ..block import BlockImage
from ..config import Config, ConfigError
from ..lifecycle import StateError, bits, expect_keys, flag, uint
from ..pci import BAR_MEM64, PciDevice, emulation
from ..pci.device import DwordRegisters, disk_legacy_options
from ..pci.options import Option
from . import pages
from ..log import getLogger
from .prp import PAGE, PrpError, prp_views

log = getLogger(__name__)

VENDOR_ID, DEVICE_ID = 0xFB5D, 0x0A0A         # bhyve's (FreeBSD's vendor ID)
CLASS_NVME = 0x010802                         # mass storage, NVM, NVM Express
MSIX_BAR = 4
MODEL, FIRMWARE = "pyhyve-NVMe", "1.0"
OUI = 0x589CFC                                # FreeBSD's, as bhyve's EUI-64s use
MAX_QUEUES = 64
MDTS = 8                                      # 2^8 pages: 1 MiB per command
MAX_TRANSFER = PAGE << MDTS
NAMESPACE = 1
ALL_NAMESPACES = 0xFFFFFFFF

# --- registers (NVMe 1.4, 3.1) ----------------------------------------------------------
REG_CAP, REG_VS, REG_INTMS, REG_INTMC, REG_CC = 0x00, 0x08, 0x0C, 0x10, 0x14
REG_CSTS, REG_NSSR, REG_AQA, REG_ASQ, REG_ACQ = 0x1C, 0x20, 0x24, 0x28, 0x30
DOORBELLS = 0x1000
BAR0_SIZE = 0x4000

CAP_CQR = 1 << 16                             # queues must be physically contiguous
CAP_TIMEOUT = 30                              # CAP.TO: 15 s, in 500 ms units
CAP_CSS_NVM = 1 << 37

CC_EN = 1 << 0
CC_CSS, CC_MPS, CC_AMS = 0x7 << 4, 0xF << 7, 0x7 << 11
CC_SHN = 0x3 << 14
CC_IOSQES_SHIFT, CC_IOCQES_SHIFT = 16, 20
CC_WRITABLE = 0x00FFFFF1
CSTS_RDY, CSTS_CFS = 1 << 0, 1 << 1
CSTS_SHST_COMPLETE = 2 << 2
CSTS_BITS = CSTS_RDY | CSTS_CFS | (3 << 2)
AQA_MASK = 0x0FFF0FFF
QUEUE_BASE_MASK = ((1 << 64) - 1) & ~(PAGE - 1)
SQ_ENTRY, CQ_ENTRY = 64, 16
ADMIN_QUEUE_MAX = 4096

# --- commands ------------------------------------------------------------------------------
ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_GET_LOG_PAGE = 0x00, 0x01, 0x02
ADMIN_DELETE_CQ, ADMIN_CREATE_CQ, ADMIN_IDENTIFY = 0x04, 0x05, 0x06
ADMIN_ABORT, ADMIN_SET_FEATURES, ADMIN_GET_FEATURES = 0x08, 0x09, 0x0A
ADMIN_ASYNC_EVENT, ADMIN_KEEP_ALIVE = 0x0C, 0x18
IO_FLUSH, IO_WRITE, IO_READ, IO_WRITE_ZEROES, IO_DSM = 0x00, 0x01, 0x02, 0x08, 0x09

CNS_NAMESPACE, CNS_CONTROLLER, CNS_ACTIVE_LIST, CNS_DESCRIPTORS = 0, 1, 2, 3
LOG_ERROR, LOG_SMART, LOG_FIRMWARE = 0x01, 0x02, 0x03

FEATURE_ARBITRATION, FEATURE_POWER, FEATURE_TEMPERATURE = 0x01, 0x02, 0x04
FEATURE_ERROR_RECOVERY, FEATURE_WRITE_CACHE, FEATURE_QUEUES = 0x05, 0x06, 0x07
FEATURE_COALESCING, FEATURE_VECTOR_CONFIG, FEATURE_ATOMICITY = 0x08, 0x09, 0x0A
FEATURE_ASYNC_EVENTS = 0x0B
FEATURE_CHANGEABLE = 1 << 2                   # Get Features SEL 3: capabilities

DSM_DEALLOCATE = 1 << 2                       # CDW11.AD
WRITE_ZEROES_DEALLOCATE = 1 << 25             # CDW12.DEAC
FUA = 1 << 30

# --- status: (status code type << 8) | status code (figures 126-128) ---------------------
SUCCESS = 0x000
INVALID_OPCODE = 0x001
INVALID_FIELD = 0x002
INTERNAL_ERROR = 0x006
ABORT_REQUESTED = 0x007
INVALID_NAMESPACE = 0x00B
LBA_OUT_OF_RANGE = 0x080
WRITE_PROTECTED = 0x020
INVALID_CQ = 0x100
INVALID_QUEUE_ID = 0x101
INVALID_QUEUE_SIZE = 0x102
ASYNC_EVENT_LIMIT = 0x105
INVALID_VECTOR = 0x108
INVALID_LOG_PAGE = 0x109
INVALID_QUEUE_DELETION = 0x10C
NOT_SAVEABLE = 0x10D
WRITE_FAULT = 0x280
UNRECOVERED_READ = 0x281
DNR = 1 << 15                                 # in the completion's status half-word

_SQE = struct.Struct("<BBHI16xQQ6I")          # opcode, flags, CID, NSID, PRP1, PRP2, CDW10-15
_CQE_HEAD = struct.Struct("<IIHH")            # DW0, DW1, SQ head, SQ ID
_CQE_TAIL = struct.Struct("<HH")              # CID, phase and status
_RANGE = struct.Struct("<IIQ")                # DSM range: attributes, blocks, starting LBA


class Command:
    """One submission queue entry, as the handlers read it."""

    __slots__ = ("opcode", "flags", "cid", "nsid", "prp1", "prp2", "cdw10", "cdw11",
                 "cdw12", "cdw13", "cdw14", "cdw15")

    def __init__(self, raw: bytes):
        (self.opcode, self.flags, self.cid, self.nsid, self.prp1, self.prp2, self.cdw10,
         self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15) = _SQE.unpack(raw)

    @property
    def lba_range(self) -> tuple[int, int]:
        """(starting LBA, number of blocks) of a Read, Write or Write Zeroes."""
        return self.cdw10 | (self.cdw11 << 32), (self.cdw12 & 0xFFFF) + 1


class SubmissionQueue:
    __slots__ = ("qid", "base", "size", "head", "tail", "cqid")

    def __init__(self, qid: int, base: int, size: int, cqid: int, head: int = 0,
                 tail: int = 0):
        self.qid, self.base, self.size, self.cqid = qid, base, size, cqid
        self.head, self.tail = head, tail

    def save(self) -> list:
        return [self.qid, self.base, self.size, self.head, self.tail, self.cqid]


class CompletionQueue:
    __slots__ = ("qid", "base", "size", "head", "tail", "phase", "vector", "ien")

    def __init__(self, qid: int, base: int, size: int, vector: int, ien: bool,
                 head: int = 0, tail: int = 0, phase: int = 1):
        self.qid, self.base, self.size, self.vector, self.ien = qid, base, size, vector, ien
        self.head, self.tail, self.phase = head, tail, phase

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    def save(self) -> list:
        return [self.qid, self.base, self.size, self.head, self.tail, self.phase,
                self.vector, self.ien]


def _default_eui64(vm_name: str, slot: int, func: int) -> int:
    """bhyve's shape: the OUI, a checksum of the VM name, then slot and function."""
    return (OUI << 40) | ((zlib.crc32(vm_name.encode()) & 0xFFFF) << 16) | (slot << 8) | func


@emulation("nvme")
class NvmeController(DwordRegisters, PciDevice):
    """NVM Express controller on a disk image: PATH[,OPTION...]"""

    savable = True
    options = (
        Option("path", "path", None, "the disk image (the first word after the name)"),
        Option("maxq", "number", "16", f"I/O queue pairs offered, 1 to {MAX_QUEUES}"),
        Option("qsz", "number", "2048", "entries per I/O queue at most, 2 to 65536"),
        Option("ioslots", "number", "8", "commands served from one queue before the "
               "next is looked at"),
        Option("sectsz", "number", "512", "logical block size: 512 or 4096"),
        Option("ser", "text", None, "serial number, up to 20 characters "
               "(default NVME-SLOT-FUNC)"),
        Option("eui64", "number", None, "the namespace's EUI-64 (default from the VM "
               "name and slot)"),
        Option("dsm", "text", "auto", "Dataset Management deallocate: auto (where the "
               "image punches holes), enable or disable"),
        Option("ro", "flag", "false", "read-only: the namespace is write protected"),
        Option("nocache", "flag", "false", "O_DIRECT: bypass the host's page cache"),
        Option("direct", "flag", "false", "O_SYNC: each write is on the disk when done"),
        Option("lock", "flag", "true", "lock the image (shared if ro) against other VMs"),
    )

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """bhyve's blockif_legacy_config: the first word is the path."""
        return disk_legacy_options(text)

    # --- building ---------------------------------------------------------------------
    def init(self, options: dict[str, str]) -> None:
        self._read_options(options)
        self.image = BlockImage("nvme", self.path, self.read_only, self._nocache,
                                self._sync, lock=self._lock_image)
        try:
            self.blocks = self.image.size // self.block_size
            if not self.blocks:
                raise ConfigError(f"nvme: {self.path} is smaller than one "
                                  f"{self.block_size}-byte block")
            self.write_zeroes = not self.read_only
            self.deallocate = not self.read_only and (
                self._dsm == "enable" or (self._dsm == "auto" and self.image.can_punch))
            self._declare()
        except BaseException:
            self.image.close()
            raise

    def _read_options(self, options: dict[str, str]) -> None:
        keys = Config(options)
        self.path = options.get("path")
        if not self.path:
            raise ConfigError("nvme: no disk path given (-s SLOT,nvme,PATH)")
        try:
            self.max_queues = keys.get_int("maxq", 16, 1, MAX_QUEUES)
            self.queue_entries = keys.get_int("qsz", 2048, 2, 65536)
            self.io_slots = keys.get_int("ioslots", 8, 1, 65536)
            self.block_size = keys.get_int("sectsz", 512)
            self.eui64 = keys.get_int("eui64", _default_eui64(self.context.vm_name, self.slot,
                                                              self.func), 0, (1 << 64) - 1)
            self.read_only = keys.get_bool("ro")
            self._nocache = keys.get_bool("nocache")
            self._sync = keys.get_bool("direct")
            self._lock_image = keys.get_bool("lock", True)
        except ConfigError as exc:
            raise ConfigError(f"nvme: {exc}") from None
        if self.block_size not in (512, 4096):
            raise ConfigError(f"nvme: sectsz {self.block_size} is not 512 or 4096")
        self._dsm = options.get("dsm", "auto")
        if self._dsm not in ("auto", "enable", "disable"):
            raise ConfigError(f"nvme: dsm '{self._dsm}' is not auto, enable or disable")
        self.serial = options.get("ser", f"NVME-{self.slot}-{self.func}")
        if len(self.serial) > 20 or not self.serial.isascii() or not self.serial.isprintable():
            raise ConfigError("nvme: ser must be at most 20 printable ASCII characters")

    def _declare(self) -> None:
        self.lock = threading.RLock()
        self.set_ids(VENDOR_ID, DEVICE_ID, CLASS_NVME, subsystem_vendor=VENDOR_ID,
                     subsystem=DEVICE_ID)
        self.set_interrupt_pin(1)
        self.add_bar(0, BAR_MEM64, BAR0_SIZE)
        self.add_msix(self.max_queues + 1, MSIX_BAR)
        self.cap = (self.queue_entries - 1) | CAP_CQR | (CAP_TIMEOUT << 24) | CAP_CSS_NVM
        oncs = (pages.ONCS_DSM if self.deallocate else 0) | \
            (pages.ONCS_WRITE_ZEROES if self.write_zeroes else 0)
        self.identify_controller = pages.identify_controller(
            vendor=VENDOR_ID, serial=self.serial, model=MODEL, firmware=FIRMWARE, oui=OUI,
            mdts=MDTS, namespaces=1, oncs=oncs, max_commands=self.queue_entries,
            subnqn=f"nqn.2014-08.org.nvmexpress:{VENDOR_ID:04x}{VENDOR_ID:04x}"
                   f"{self.serial}{MODEL}")
        self.identify_namespace = pages.identify_namespace(
            blocks=self.blocks, block_size=self.block_size, eui64=self.eui64,
            deallocate=self.deallocate, write_zeroes=self.write_zeroes,
            read_only=self.read_only)
        self._touched: set[CompletionQueue] = set()
        self.aqa = self.asq = self.acq = 0
        self.stats = [0, 0, 0, 0]      # bytes read, bytes written, read and write commands
        self.cc = 0
        self._controller_reset()

    def _default_features(self) -> dict[int, int]:
        queues = (self.max_queues - 1) * 0x10001
        return {FEATURE_ARBITRATION: 0, FEATURE_POWER: 0, FEATURE_TEMPERATURE: 0x157,
                FEATURE_ERROR_RECOVERY: 0, FEATURE_WRITE_CACHE: 1, FEATURE_QUEUES: queues,
                FEATURE_COALESCING: 0, FEATURE_ATOMICITY: 0, FEATURE_ASYNC_EVENTS: 0}

    def _controller_reset(self) -> None:
        """CC.EN 1 -> 0 (and power on): queues and held requests go, features and
        status return to their defaults; AQA, ASQ and ACQ stay."""
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.aers: list[int] = []
        self.features = self._default_features()
        self.intms = 0
        self.csts = 0
        self._update_intx()

    @property
    def memory(self):
        return self.context.memory

    def teardown(self) -> None:
        self.image.close()

    # --- registers ------------------------------------------------------------------------
    def _dword(self, offset: int) -> int:
        if offset in (REG_CAP, REG_CAP + 4):
            return (self.cap >> (8 * offset)) & 0xFFFFFFFF
        if offset in (REG_ASQ, REG_ASQ + 4, REG_ACQ, REG_ACQ + 4):
            value = self.asq if offset < REG_ACQ else self.acq
            return (value >> (8 * (offset & 4))) & 0xFFFFFFFF
        return {REG_VS: pages.VERSION, REG_INTMS: self.intms, REG_INTMC: self.intms,
                REG_CC: self.cc, REG_CSTS: self.csts, REG_AQA: self.aqa}.get(offset, 0)

    def _write_dword(self, offset: int, value: int) -> None:
        if offset >= DOORBELLS:
            self._doorbell(offset - DOORBELLS, value)
        elif offset == REG_INTMS:
            self.intms |= value
            self._update_intx()
        elif offset == REG_INTMC:
            self.intms &= ~value
            self._update_intx()
        elif offset == REG_CC:
            self._write_cc(value & CC_WRITABLE)
        elif offset == REG_AQA:
            self.aqa = value & AQA_MASK
        elif offset in (REG_ASQ, REG_ASQ + 4, REG_ACQ, REG_ACQ + 4):
            name = "asq" if offset < REG_ACQ else "acq"
            shift = 8 * (offset & 4)
            merged = (getattr(self, name) & ~(0xFFFFFFFF << shift)) | (value << shift)
            setattr(self, name, merged & QUEUE_BASE_MASK)

    def _write_cc(self, value: int) -> None:
        old, self.cc = self.cc, value
        if old & CC_EN and not value & CC_EN:
            self._controller_reset()
        elif value & CC_EN and not old & CC_EN:
            self._enable()
        if value & CC_SHN and not old & CC_SHN:
            self._shutdown()

    def _enable(self) -> None:
        """CC.EN 0 -> 1: the admin queues from AQA, ASQ and ACQ; CSTS.CFS where the
        controller cannot run as configured (a page size or command set it lacks,
        admin queues outside guest RAM)."""
        sq_size, cq_size = (self.aqa & 0xFFF) + 1, ((self.aqa >> 16) & 0xFFF) + 1
        problem = None
        if self.cc & (CC_CSS | CC_MPS | CC_AMS):
            problem = f"CC {self.cc:#x} asks for a command set, page size or arbitration " \
                      "the controller lacks"
        elif sq_size < 2 or cq_size < 2:
            problem = f"admin queues of {sq_size} and {cq_size} entries (AQA {self.aqa:#x})"
        elif not self.memory.is_ram(self.asq, sq_size * SQ_ENTRY) or \
                not self.memory.is_ram(self.acq, cq_size * CQ_ENTRY):
            problem = f"admin queues at {self.asq:#x} and {self.acq:#x} are not in guest RAM"
        if problem:
            self.warn_once("enable", "controller not enabled: %s", problem)
            self.csts |= CSTS_CFS
            return
        self.cqs[0] = CompletionQueue(0, self.acq, cq_size, vector=0, ien=True)
        self.sqs[0] = SubmissionQueue(0, self.asq, sq_size, cqid=0)
        self.csts |= CSTS_RDY

    def _shutdown(self) -> None:
        """Nothing is in flight between register accesses: sync the disk and report
        the shutdown complete."""
        try:
            self.image.flush()
        except OSError as exc:
            self.warn_once("flush", "flushing %s at shutdown failed: %s", self.path, exc)
        self.csts |= CSTS_SHST_COMPLETE

    def _doorbell(self, offset: int, value: int) -> None:
        qid, is_cq = divmod(offset // 4, 2)
        if not self.csts & CSTS_RDY or self.csts & CSTS_CFS:
            self.warn_once("doorbell-disabled", "doorbell written while the controller "
                           "is not ready")
            return
        queue = (self.cqs if is_cq else self.sqs).get(qid)
        if queue is None or value >= queue.size:
            kind = "completion" if is_cq else "submission"
            self.warn_once(f"doorbell-{kind}", "%s queue %d doorbell written with %d: no "
                           "such queue or entry", kind, qid, value)
            return
        if is_cq:
            queue.head = value
        else:
            queue.tail = value
        self._run()

    def _update_intx(self) -> None:
        """Pin-based interrupts (7.5.1): asserted while an interrupt-enabled
        completion queue holds unconsumed entries, unless INTMS masks it."""
        level = not self.msix.enabled and not self.intms & 1 and any(
            cq.ien and cq.head != cq.tail for cq in self.cqs.values())
        if level:
            self.assert_intx()
        else:
            self.deassert_intx()

    def config_changed(self, offset: int, size: int) -> None:
        """MSI-X turned on or off: INTx follows."""
        with self.lock:
            self._update_intx()

    # --- serving queues ---------------------------------------------------------------------
    def _run(self) -> None:
        """Serve every submission queue while its completion queue has room,
        `io_slots` commands from one queue at a time, then interrupt for each
        completion queue that got entries."""
        try:
            progress = True
            while progress and not self.csts & CSTS_CFS:
                progress = False
                for qid in sorted(self.sqs):
                    sq = self.sqs.get(qid)
                    served = 0
                    while sq is not None and sq.head != sq.tail and served < self.io_slots:
                        cq = self.cqs.get(sq.cqid)
                        if cq is None or cq.full:
                            break
                        raw = self.memory.read(sq.base + SQ_ENTRY * sq.head, SQ_ENTRY)
                        sq.head = (sq.head + 1) % sq.size
                        self._execute(sq, cq, Command(raw))
                        served += 1
                        sq = self.sqs.get(qid)      # an admin command may delete queues
                    progress = progress or served > 0
        except Exception:     # a bug (queues are in RAM, checked when made): stop the
            log.exception("nvme %s: serving the queues failed", self.bdf)
            self._fatal("internal error")           # controller, not the VM
        touched, self._touched = self._touched, set()
        if self.msix.enabled:
            for cq in touched:
                if cq.ien and self.cqs.get(cq.qid) is cq:
                    self.msix.fire(cq.vector)
        self._update_intx()

    def _fatal(self, reason: str) -> None:
        self.warn_once("fatal", "controller fatal status: %s", reason)
        self.csts |= CSTS_CFS

    def _execute(self, sq: SubmissionQueue, cq: CompletionQueue, command: Command) -> None:
        if command.flags:              # fused operations and SGLs are not offered
            outcome = (INVALID_FIELD, 0)
        else:
            handler = (ADMIN_COMMANDS if sq.qid == 0 else IO_COMMANDS).get(command.opcode)
            outcome = (INVALID_OPCODE, 0) if handler is None else handler(self, command)
        if outcome is not None:        # None: held (an Asynchronous Event Request)
            self._complete(cq, sq, command.cid, *outcome)

    def _complete(self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, status: int,
                  result: int) -> None:
        """Post a completion entry, its phase tag written last."""
        at = cq.base + CQ_ENTRY * cq.tail
        self.memory.write(at, _CQE_HEAD.pack(result, 0, sq.head, sq.qid))
        dnr = DNR if status not in (SUCCESS, ABORT_REQUESTED) else 0
        self.memory.write(at + 12, _CQE_TAIL.pack(cid, cq.phase | (status << 1) | dnr))
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail = 0
            cq.phase ^= 1
        self._touched.add(cq)

    def _to_guest(self, command: Command, data: bytes) -> int:
        try:
            views = prp_views(self.memory, command.prp1, command.prp2, len(data), True)
        except PrpError as exc:
            self.warn_once("prp", "%s", exc)
            return exc.status
        at = 0
        for view in views:
            view[:] = data[at:at + len(view)]
            at += len(view)
        return SUCCESS

    # --- admin commands ------------------------------------------------------------------------
    def _identify(self, command: Command):
        cns, nsid = command.cdw10 & 0xFF, command.nsid
        if cns == CNS_CONTROLLER:
            data = self.identify_controller
        elif cns == CNS_NAMESPACE:
            if nsid != NAMESPACE:
                return INVALID_NAMESPACE, 0
            data = self.identify_namespace
        elif cns == CNS_ACTIVE_LIST:
            if nsid >= 0xFFFFFFFE:
                return INVALID_NAMESPACE, 0
            data = pages.namespace_list([NAMESPACE] if nsid < NAMESPACE else [])
        elif cns == CNS_DESCRIPTORS:
            if nsid != NAMESPACE:
                return INVALID_NAMESPACE, 0
            data = pages.namespace_descriptors(self.eui64)
        else:
            return INVALID_FIELD, 0
        return self._to_guest(command, data), 0

    def _get_log_page(self, command: Command):
        dwords = ((command.cdw11 & 0xFFFF) << 16 | command.cdw10 >> 16) + 1
        offset = command.cdw12 | (command.cdw13 << 32)
        lid = command.cdw10 & 0xFF
        if lid == LOG_ERROR:
            data = pages.error_log()
        elif lid == LOG_SMART:
            bytes_read, bytes_written, reads, writes = self.stats
            data = pages.smart_log(units_read=-(-bytes_read // 512000),
                                   units_written=-(-bytes_written // 512000),
                                   reads=reads, writes=writes)
        elif lid == LOG_FIRMWARE:
            data = pages.firmware_log(FIRMWARE)
        else:
            return INVALID_LOG_PAGE, 0
        length = 4 * dwords
        if offset % 4 or offset >= len(data) or length > MAX_TRANSFER:
            return INVALID_FIELD, 0
        return self._to_guest(command, data[offset:offset + length].ljust(length, b"\0")), 0

    def _set_features(self, command: Command):
        fid, value = command.cdw10 & 0xFF, command.cdw11
        if command.cdw10 & (1 << 31):
            return NOT_SAVEABLE, 0
        if fid == FEATURE_QUEUES:
            wanted_sq, wanted_cq = value & 0xFFFF, value >> 16
            if 0xFFFF in (wanted_sq, wanted_cq):
                return INVALID_FIELD, 0
            most = self.max_queues - 1
            value = min(wanted_sq, most) | min(wanted_cq, most) << 16
        elif fid == FEATURE_VECTOR_CONFIG:
            return (SUCCESS if value & 0xFFFF < self.msix.vectors else INVALID_FIELD), 0
        elif fid == FEATURE_POWER and value & 0x1F:
            return INVALID_FIELD, 0     # power state 0 is the only one (NPSS 0)
        elif fid not in self.features:
            return INVALID_FIELD, 0
        masks = {FEATURE_WRITE_CACHE: 1, FEATURE_TEMPERATURE: 0xFFFF, FEATURE_POWER: 0xFF}
        self.features[fid] = value & masks.get(fid, 0xFFFFFFFF)
        return SUCCESS, value if fid == FEATURE_QUEUES else 0

    def _get_features(self, command: Command):
        fid, select = command.cdw10 & 0xFF, (command.cdw10 >> 8) & 7
        if fid == FEATURE_VECTOR_CONFIG:
            vector = command.cdw11 & 0xFFFF
            if vector >= self.msix.vectors or select > 3:
                return INVALID_FIELD, 0
            return SUCCESS, FEATURE_CHANGEABLE if select == 3 else vector
        if fid not in self.features or select > 3:
            return INVALID_FIELD, 0
        if select == 3:
            return SUCCESS, FEATURE_CHANGEABLE
        source = self.features if select == 0 else self._default_features()
        return SUCCESS, source[fid]

    def _create_cq(self, command: Command):
        qid, size = command.cdw10 & 0xFFFF, (command.cdw10 >> 16) + 1
        contiguous, ien, vector = command.cdw11 & 1, bool(command.cdw11 & 2), command.cdw11 >> 16
        if not 1 <= qid <= self.max_queues or qid in self.cqs:
            return INVALID_QUEUE_ID, 0
        if not 2 <= size <= self.queue_entries:
            return INVALID_QUEUE_SIZE, 0
        if vector >= self.msix.vectors:
            return INVALID_VECTOR, 0
        if not contiguous or (self.cc >> CC_IOCQES_SHIFT) & 0xF != 4 or \
                command.prp1 % PAGE or not self.memory.is_ram(command.prp1, size * CQ_ENTRY):
            return INVALID_FIELD, 0
        self.cqs[qid] = CompletionQueue(qid, command.prp1, size, vector, ien)
        return SUCCESS, 0

    def _create_sq(self, command: Command):
        qid, size = command.cdw10 & 0xFFFF, (command.cdw10 >> 16) + 1
        contiguous, cqid = command.cdw11 & 1, command.cdw11 >> 16
        if not 1 <= qid <= self.max_queues or qid in self.sqs:
            return INVALID_QUEUE_ID, 0
        if cqid == 0 or cqid not in self.cqs:
            return INVALID_CQ, 0
        if not 2 <= size <= self.queue_entries:
            return INVALID_QUEUE_SIZE, 0
        if not contiguous or (self.cc >> CC_IOSQES_SHIFT) & 0xF != 6 or \
                command.prp1 % PAGE or not self.memory.is_ram(command.prp1, size * SQ_ENTRY):
            return INVALID_FIELD, 0
        self.sqs[qid] = SubmissionQueue(qid, command.prp1, size, cqid)
        return SUCCESS, 0

    def _delete_sq(self, command: Command):
        qid = command.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.sqs:
            return INVALID_QUEUE_ID, 0
        del self.sqs[qid]
        return SUCCESS, 0

    def _delete_cq(self, command: Command):
        qid = command.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.cqs:
            return INVALID_QUEUE_ID, 0
        if any(sq.cqid == qid for sq in self.sqs.values()):
            return INVALID_QUEUE_DELETION, 0
        del self.cqs[qid]
        return SUCCESS, 0

    def _abort(self, command: Command):
        """Only held Asynchronous Event Requests are ever outstanding: such a one
        completes as aborted; anything else is reported not aborted (DW0 bit 0)."""
        sqid, cid = command.cdw10 & 0xFFFF, command.cdw10 >> 16
        admin = self.cqs[0]
        if sqid == 0 and cid in self.aers and (admin.tail + 2) % admin.size != admin.head:
            self.aers.remove(cid)
            self._complete(admin, self.sqs[0], cid, ABORT_REQUESTED, 0)
            return SUCCESS, 0
        return SUCCESS, 1

    def _async_event(self, command: Command):
        """Held until an event (none is ever raised) or a reset."""
        if len(self.aers) > pages.ASYNC_EVENT_LIMIT:
            return ASYNC_EVENT_LIMIT, 0
        self.aers.append(command.cid)
        return None

    # --- I/O commands -------------------------------------------------------------------------
    def _check_range(self, command: Command, writes: bool):
        """(byte offset, byte length), or the status that refuses the command."""
        if command.nsid != NAMESPACE:
            return INVALID_NAMESPACE
        lba, count = command.lba_range
        if lba + count > self.blocks:
            return LBA_OUT_OF_RANGE
        if writes and self.read_only:
            return WRITE_PROTECTED
        return lba * self.block_size, count * self.block_size

    def _transfer(self, command: Command, write: bool):
        checked = self._check_range(command, write)
        if isinstance(checked, int):
            return checked, 0
        offset, length = checked
        if length > MAX_TRANSFER:
            return INVALID_FIELD, 0
        try:
            views = prp_views(self.memory, command.prp1, command.prp2, length, not write)
        except PrpError as exc:
            self.warn_once("prp", "%s", exc)
            return exc.status, 0
        aligned = command.prp1 % PAGE == 0 and length % PAGE == 0
        try:
            if write:
                done = self.image.writev(views, offset, aligned)
                if done and (command.cdw12 & FUA or not self.features[FEATURE_WRITE_CACHE]):
                    self.image.flush()
            else:
                done = self.image.readv(views, offset, aligned)
        except OSError as exc:
            self.warn_once(f"io-{write}", "%s of %s failed: %s",
                           "write" if write else "read", self.path, exc)
            done = False
        if not done:
            return (WRITE_FAULT if write else UNRECOVERED_READ), 0
        self.stats[1 if write else 0] += length
        self.stats[3 if write else 2] += 1
        return SUCCESS, 0

    def _read(self, command: Command):
        return self._transfer(command, write=False)

    def _write(self, command: Command):
        return self._transfer(command, write=True)

    def _flush(self, command: Command):
        if command.nsid not in (NAMESPACE, ALL_NAMESPACES):
            return INVALID_NAMESPACE, 0
        try:
            self.image.flush()
        except OSError as exc:
            self.warn_once("flush", "flushing %s failed: %s", self.path, exc)
            return WRITE_FAULT, 0
        return SUCCESS, 0

    def _clear(self, ranges: list[tuple[int, int]], unmap: bool):
        try:
            for offset, length in ranges:
                self.image.clear(offset, length, unmap)
        except OSError as exc:
            self.warn_once("clear", "clearing blocks of %s failed: %s", self.path, exc)
            return WRITE_FAULT, 0
        return SUCCESS, 0

    def _write_zeroes(self, command: Command):
        if not self.write_zeroes:
            return INVALID_OPCODE, 0
        checked = self._check_range(command, True)
        if isinstance(checked, int):
            return checked, 0
        unmap = self.deallocate and bool(command.cdw12 & WRITE_ZEROES_DEALLOCATE)
        return self._clear([checked], unmap)

    def _dataset_management(self, command: Command):
        if not self.deallocate:
            return INVALID_OPCODE, 0
        if command.nsid != NAMESPACE:
            return INVALID_NAMESPACE, 0
        if not command.cdw11 & DSM_DEALLOCATE:
            return SUCCESS, 0            # only hints: nothing to do
        count = (command.cdw10 & 0xFF) + 1
        try:
            views = prp_views(self.memory, command.prp1, command.prp2, count * _RANGE.size,
                              False)
        except PrpError as exc:
            self.warn_once("prp", "%s", exc)
            return exc.status, 0
        data = b"".join(bytes(view) for view in views)
        ranges = []
        for _, blocks, lba in _RANGE.iter_unpack(data):
            if lba + blocks > self.blocks:
                return LBA_OUT_OF_RANGE, 0
            if blocks:
                ranges.append((lba * self.block_size, blocks * self.block_size))
        return self._clear(ranges, unmap=True)

    # --- lifecycle ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def quiesce(self):
        """Nothing is in flight but held event requests; the disk is synced so that
        every write the guest saw complete is in the image the snapshot names."""
        with self.lock:
            self.image.flush()
            yield

    def save_state(self) -> dict:
        with self.lock:
            state = super().save_state()
            state["nvme"] = {
                "cc": self.cc, "csts": self.csts, "aqa": self.aqa, "asq": self.asq,
                "acq": self.acq, "intms": self.intms,
                "features": {str(fid): value for fid, value in sorted(self.features.items())},
                "aers": list(self.aers),
                "sqs": [sq.save() for _, sq in sorted(self.sqs.items())],
                "cqs": [cq.save() for _, cq in sorted(self.cqs.items())],
                "stats": list(self.stats)}
        return state

    def restore_state(self, state: dict) -> None:
        """Every saved field is checked before anything changes (StateError)."""
        owner = f"nvme {self.bdf}"
        saved = state.get("nvme") if isinstance(state, dict) else None
        expect_keys(saved, ("cc", "csts", "aqa", "asq", "acq", "intms", "features", "aers",
                            "sqs", "cqs", "stats"), owner)
        registers = {"cc": bits(saved["cc"], CC_WRITABLE, f"{owner} CC"),
                     "csts": bits(saved["csts"], CSTS_BITS, f"{owner} CSTS"),
                     "aqa": bits(saved["aqa"], AQA_MASK, f"{owner} AQA"),
                     "asq": bits(saved["asq"], QUEUE_BASE_MASK, f"{owner} ASQ"),
                     "acq": bits(saved["acq"], QUEUE_BASE_MASK, f"{owner} ACQ"),
                     "intms": uint(saved["intms"], 0xFFFFFFFF, f"{owner} INTMS")}
        features = saved["features"]
        defaults = self._default_features()
        if not isinstance(features, dict) or set(features) != {str(f) for f in defaults}:
            raise StateError(f"{owner}: saved features {features!r} are not "
                             f"{sorted(defaults)}")
        features = {fid: uint(features[str(fid)], 0xFFFFFFFF, f"{owner} feature {fid}")
                    for fid in defaults}
        aers = self._list(saved["aers"], f"{owner} held event requests",
                          pages.ASYNC_EVENT_LIMIT + 1)
        aers = [uint(cid, 0xFFFF, f"{owner} held event request") for cid in aers]
        cqs = {}
        for item in self._list(saved["cqs"], f"{owner} completion queues",
                               self.max_queues + 1):
            cq = self._restore_cq(item, owner)
            if cq.qid in cqs:
                raise StateError(f"{owner}: completion queue {cq.qid} saved twice")
            cqs[cq.qid] = cq
        sqs = {}
        for item in self._list(saved["sqs"], f"{owner} submission queues",
                               self.max_queues + 1):
            sq = self._restore_sq(item, owner, cqs)
            if sq.qid in sqs:
                raise StateError(f"{owner}: submission queue {sq.qid} saved twice")
            sqs[sq.qid] = sq
        stats = self._list(saved["stats"], f"{owner} statistics", 4)
        if len(stats) != 4:
            raise StateError(f"{owner}: statistics {stats!r} are not four numbers")
        stats = [uint(value, (1 << 64) - 1, f"{owner} statistics") for value in stats]
        with self.lock:
            super().restore_state(state)
            for name, value in registers.items():
                setattr(self, name, value)
            self.features, self.aers, self.cqs, self.sqs, self.stats = \
                features, aers, cqs, sqs, stats
            self._touched = set()
            self._update_intx()

    @staticmethod
    def _list(value, what: str, limit: int) -> list:
        if not isinstance(value, list) or len(value) > limit:
            raise StateError(f"{what}: {value!r} is not a list of at most {limit}")
        return value

    def _queue_fields(self, item, count: int, what: str) -> tuple[int, int, int, int, int]:
        """qid, base, size, head and tail of a saved queue, each checked."""
        if not isinstance(item, list) or len(item) != count:
            raise StateError(f"{what}: {item!r} is not a list of {count} fields")
        qid = uint(item[0], self.max_queues, f"{what} id")
        limit = ADMIN_QUEUE_MAX if qid == 0 else self.queue_entries
        size = uint(item[2], limit, f"{what} {qid} size")
        if size < 2:
            raise StateError(f"{what} {qid} has {size} entries")
        base = bits(item[1], QUEUE_BASE_MASK, f"{what} {qid} base")
        if not self.memory.is_ram(base, size * (SQ_ENTRY if count == 6 else CQ_ENTRY)):
            raise StateError(f"{what} {qid} at {base:#x} is not in guest RAM")
        return (qid, base, size,
                uint(item[3], size - 1, f"{what} {qid} head"),
                uint(item[4], size - 1, f"{what} {qid} tail"))

    def _restore_cq(self, item, owner: str) -> CompletionQueue:
        what = f"{owner} completion queue"
        qid, base, size, head, tail = self._queue_fields(item, 8, what)
        return CompletionQueue(qid, base, size, head=head, tail=tail,
                               phase=uint(item[5], 1, f"{what} {qid} phase"),
                               vector=uint(item[6], self.msix.vectors - 1,
                                           f"{what} {qid} vector"),
                               ien=flag(item[7], f"{what} {qid} interrupt enable"))

    def _restore_sq(self, item, owner: str, cqs: dict) -> SubmissionQueue:
        what = f"{owner} submission queue"
        qid, base, size, head, tail = self._queue_fields(item, 6, what)
        cqid = uint(item[5], self.max_queues, f"{what} {qid} completion queue")
        if cqid not in cqs or (cqid == 0) != (qid == 0):
            raise StateError(f"{what} {qid} completes on queue {cqid}, which it cannot")
        return SubmissionQueue(qid, base, size, cqid, head=head, tail=tail)


ADMIN_COMMANDS = {
    ADMIN_DELETE_SQ: NvmeController._delete_sq, ADMIN_CREATE_SQ: NvmeController._create_sq,
    ADMIN_GET_LOG_PAGE: NvmeController._get_log_page,
    ADMIN_DELETE_CQ: NvmeController._delete_cq, ADMIN_CREATE_CQ: NvmeController._create_cq,
    ADMIN_IDENTIFY: NvmeController._identify, ADMIN_ABORT: NvmeController._abort,
    ADMIN_SET_FEATURES: NvmeController._set_features,
    ADMIN_GET_FEATURES: NvmeController._get_features,
    ADMIN_ASYNC_EVENT: NvmeController._async_event,
}
IO_COMMANDS = {
    IO_FLUSH: NvmeController._flush, IO_WRITE: NvmeController._write,
    IO_READ: NvmeController._read, IO_WRITE_ZEROES: NvmeController._write_zeroes,
    IO_DSM: NvmeController._dataset_management,
}
