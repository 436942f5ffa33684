"""The virtio-pci transport (virtio 1.2, sections 4.1 and 4.1.4.8), as bhyve's
virtio.c and QEMU's virtio-pci provide it.

Devices of the types virtio 0.9.5 knew are transitional, like bhyve's and
QEMU's defaults, so both kinds of driver find them (later types, as input,
are modern only: device ID 0x1040 + type, revision 1, no BAR 0):
  - legacy (virtio 0.9.5) drivers: device ID 0x1000 + n, revision 0, the
    register block in I/O BAR 0 (LEGACY_* below), queues placed by a page
    frame number;
  - modern (virtio 1.x) drivers: the same IDs (the virtio type is the
    subsystem ID), vendor capabilities pointing at the common, ISR, device
    and notify structures in 32-bit memory BAR 4 (MODERN_* offsets), and the
    PCI_CFG window capability for firmware that cannot reach the BAR.
MSI-X (one config vector plus one per queue) lives in memory BAR 1; without
it interrupts go through INTx and the ISR register, whose read clears it.

Queue notifications: once a queue is live, a write notifier on its notify
address (the MMIO notify slot, and the legacy notify port with the queue
index as datamatch; the buses set them up as KVM ioeventfds) signals an
eventfd instead of exiting to userspace, and the VM's virtio I/O thread runs
the queue.  A notify write that reaches bar_write anyway (no notifiers, an
odd access width, the PCI_CFG window) runs the queue on the vCPU thread.
Interrupts go out through the device context's signal_msi (an irqfd bound
to a GSI route per MSI message) or the INTx router.

The transport carries a device model (pyhyve.virtio.device): it is the
model's Transport, takes the PCI IDs and class from the model's device type,
serves its config space in both register blocks, and runs its queues.  An
emulation (pyhyve.virtio.emulations) is a subclass that names the model in
make_model().  Everything runs under the device lock (`lock`): the vCPU
threads and the I/O thread never see a half-made change.

Snapshots: quiesce() serves what the driver offered, lets the model finish
(a disk syncs) and holds the device lock while the VM is saved; save_state()
adds the transport registers, each queue's layout and ring positions, and
the model's own state to the PCI state; restore_state() checks all of it,
re-activates live queues on the restored guest memory, re-assigns their
ioeventfds and kicks them once.
"""

import contextlib
import os
import struct
import threading

from ..iobus import NotifierUnavailable
from ..lifecycle import StateError, bits, expect_keys, uint
from ..memory import GuestMemoryError
from ..pci import BAR_IO, BAR_MEM32, PciDevice
from ..pci import regs as R
from .device import (F_EVENT_IDX, F_VERSION_1, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                     STATUS_NEEDS_RESET, TRANSPORT_FEATURES, VirtioDevice)
from ..iothread import IoThread
from ..log import getLogger
from .queue import SplitQueue, VirtqueueError

log = getLogger(__name__)

VIRTIO_VENDOR_ID = 0x1AF4
# Transitional PCI device ID and class code by virtio device type (4.1.2.1)
PCI_IDENTITIES = {1: (0x1000, 0x020000),     # network card: Ethernet
                  2: (0x1001, 0x010000),     # block device: SCSI storage
                  3: (0x1003, 0x078000),     # console: other communication
                  4: (0x1005, 0x00FF00),     # entropy source: other
                  8: (0x1004, 0x010000),     # SCSI host: SCSI storage
                  9: (0x1009, 0x018000)}     # 9P transport: other mass storage
# Types virtio 1.0 added have no legacy form: modern only, device ID 0x1040 + type,
# revision 1, and no legacy register block (4.1.2.1)
MODERN_ONLY_CLASSES = {18: 0x098000}        # input device: other input controller
MODERN_ONLY_DEVICE_BASE = 0x1040

ISR_QUEUE = 1
ISR_CONFIG = 2
NO_VECTOR = 0xFFFF

# Vendor capability types (4.1.4)
CAP_COMMON_CFG, CAP_NOTIFY_CFG, CAP_ISR_CFG, CAP_DEVICE_CFG, CAP_PCI_CFG = 1, 2, 3, 4, 5
CAP_LENGTH = 16

LEGACY_BAR, MSIX_BAR, MODERN_BAR = 0, 1, 4
MODERN_BAR_SIZE = 0x4000
REGION_SIZE = 0x1000
MODERN_COMMON, MODERN_ISR, MODERN_DEVICE, MODERN_NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4            # each queue gets its own notify address
MSIX_PBA_OFFSET = 0x800

# struct virtio_pci_common_cfg (4.1.4.3)
COMMON_DFSELECT, COMMON_DF, COMMON_GFSELECT, COMMON_GF = 0x00, 0x04, 0x08, 0x0C
COMMON_MSIX, COMMON_NUMQ, COMMON_STATUS, COMMON_CFGGENERATION = 0x10, 0x12, 0x14, 0x15
COMMON_Q_SELECT, COMMON_Q_SIZE, COMMON_Q_MSIX, COMMON_Q_ENABLE = 0x16, 0x18, 0x1A, 0x1C
COMMON_Q_NOFF, COMMON_Q_DESCLO, COMMON_Q_DESCHI = 0x1E, 0x20, 0x24
COMMON_Q_AVAILLO, COMMON_Q_AVAILHI, COMMON_Q_USEDLO, COMMON_Q_USEDHI = 0x28, 0x2C, 0x30, 0x34
COMMON_SIZE = 0x38
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQ")

# The legacy register block in BAR 0 (4.1.4.8)
LEGACY_HOST_FEATURES, LEGACY_GUEST_FEATURES, LEGACY_QUEUE_PFN = 0x00, 0x04, 0x08
LEGACY_QUEUE_SIZE, LEGACY_QUEUE_SELECT, LEGACY_QUEUE_NOTIFY = 0x0C, 0x0E, 0x10
LEGACY_STATUS, LEGACY_ISR = 0x12, 0x13
LEGACY_CONFIG_VECTOR, LEGACY_QUEUE_VECTOR = 0x14, 0x16
LEGACY_CONFIG, LEGACY_CONFIG_MSIX = 0x14, 0x18
LEGACY_PFN_SHIFT = 12
LEGACY_ALIGN = 4096
_LEGACY = struct.Struct("<IIIHHHBB")


class VirtioPciDevice(PciDevice):
    """A virtio device on PCI: the transport around a model (make_model())."""

    savable = True

    def make_model(self, options: dict[str, str]) -> VirtioDevice:
        """Build the model from the emulation's options (ConfigError where they
        do not fit), with this transport as its Transport."""
        raise NotImplementedError

    def init(self, options: dict[str, str]) -> None:
        """Build the model, then declare IDs, BARs, capabilities and queues after it."""
        self.lock = threading.RLock()
        self._paused = False             # the VM is: queues wait, host input stays queued
        self._removed = False            # torn down: a late kick finds no device to run
        self._clear_state()
        self._assigned: set[tuple] = set()
        self._notify_fds: list[int] = []
        self.model = self.make_model(options)
        try:
            self._declare()
        except BaseException:
            self.model.close()
            raise

    def _declare(self) -> None:
        model = self.model
        transitional = model.device_type in PCI_IDENTITIES
        if transitional:
            device_id, class_code = PCI_IDENTITIES[model.device_type]
        elif model.device_type in MODERN_ONLY_CLASSES:
            device_id = MODERN_ONLY_DEVICE_BASE + model.device_type
            class_code = MODERN_ONLY_CLASSES[model.device_type]
        else:
            raise ValueError(f"no PCI ID for virtio device type {model.device_type}")
        self.set_ids(VIRTIO_VENDOR_ID, device_id, class_code, revision=0 if transitional else 1,
                     subsystem_vendor=VIRTIO_VENDOR_ID, subsystem=model.device_type)
        self.set_interrupt_pin(1)
        self.device_features = model.features | TRANSPORT_FEATURES
        self.queues = [SplitQueue(self.memory, size) for size in model.queue_sizes]
        self.queue_max = list(model.queue_sizes)
        self.queue_vectors = [NO_VECTOR] * len(self.queues)

        if transitional:
            legacy_size = 32
            while legacy_size < LEGACY_CONFIG_MSIX + len(model.config):
                legacy_size <<= 1
            self.add_bar(LEGACY_BAR, BAR_IO, legacy_size)
        self.add_msix(len(self.queues) + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET)
        self.add_bar(MODERN_BAR, BAR_MEM32, MODERN_BAR_SIZE)
        for cfg_type, offset in ((CAP_COMMON_CFG, MODERN_COMMON), (CAP_ISR_CFG, MODERN_ISR),
                                 (CAP_DEVICE_CFG, MODERN_DEVICE)):
            self._add_virtio_cap(cfg_type, MODERN_BAR, offset, REGION_SIZE)
        self._add_virtio_cap(CAP_NOTIFY_CFG, MODERN_BAR, MODERN_NOTIFY, REGION_SIZE,
                             struct.pack("<I", NOTIFY_MULTIPLIER))
        # The driver writes bar, offset and length, then moves data through the window.
        window = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        self._pci_cfg_cap = self._add_virtio_cap(CAP_PCI_CFG, 0, 0, 0, b"\0" * 4, window)

        # Write notifiers need the hypervisor's support; the I/O thread serves
        # them only if they have it.
        if self.context.ports.notifies and self.context.mmio.notifies:
            for index in range(len(self.queues)):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._notify_fds.append(fd)
                self.io_thread.register(fd, lambda index=index: self.kick(index))

    def _add_virtio_cap(self, cfg_type: int, bar: int, offset: int, length: int,
                        extra: bytes = b"", writable: bytes | None = None) -> int:
        """struct virtio_pci_cap (4.1.4): cap_len, cfg_type, bar, id, offset, length."""
        body = struct.pack("<BBBBxxII", CAP_LENGTH + len(extra), cfg_type, bar, 0,
                           offset, length) + extra
        return self.add_capability(R.CAP_ID_VENDOR, body, writable)

    def _clear_state(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.config_generation = 0
        self.isr = 0

    # --- the model's Transport (pyhyve.virtio.device) ----------------------------------
    @property
    def memory(self):
        return self.context.memory

    @property
    def vm_name(self) -> str:
        return self.context.vm_name

    @property
    def instance(self) -> str:
        """bhyve's "SLOT-FUNC", which virtio-net hashes into its default MAC."""
        return f"{self.slot}-{self.func}"

    @property
    def io_thread(self) -> IoThread:
        return self.context.io_thread()

    def negotiated(self, feature: int) -> bool:
        return bool(self.driver_features & feature)

    def interrupt_queue(self, index: int) -> None:
        """Interrupt for queue `index` if it pushed buffers the driver wants to hear of."""
        if self.queues[index].needs_interrupt():
            self._interrupt(self.queue_vectors[index], ISR_QUEUE)

    def notify_config_change(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            if self.status & STATUS_DRIVER_OK:
                self._interrupt(self.config_vector, ISR_CONFIG)

    def needs_reset(self, reason: str) -> None:
        """The driver broke the rules: stop the device until it resets it."""
        with self.lock:
            if self.status & STATUS_NEEDS_RESET:
                return
            log.warning("%s %s: %s; device needs reset", self.emulation_name, self.bdf, reason)
            self.status |= STATUS_NEEDS_RESET
            if self.status & STATUS_DRIVER_OK:
                self._interrupt(self.config_vector, ISR_CONFIG)

    def kick(self, index: int) -> bool:
        """Run queue `index` (from the I/O thread, a notify register write or the
        model); while the VM is paused the queue waits for resume()."""
        with self.lock:
            return not self._paused and self._run_queue(index)

    def _run_queue(self, index: int) -> bool:
        """Let the model serve queue `index` if the device and the queue are live."""
        with self.lock:
            if self._removed or \
                    self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET) != STATUS_DRIVER_OK:
                return False
            if not 0 <= index < len(self.queues) or not self.queues[index].ready:
                return False
            try:
                self.model.queue_notified(index, self.queues[index])
            except (VirtqueueError, GuestMemoryError) as exc:
                self.needs_reset(f"queue {index}: {exc}")
            except Exception:            # a model bug: stop this device, not the VM
                log.exception("%s %s: queue %d failed", self.emulation_name, self.bdf, index)
                self.needs_reset(f"queue {index}: internal error")
            return True

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.fire(vector)
        else:
            self.isr |= isr_bit
            self.assert_intx()

    # --- lifecycle ---------------------------------------------------------------------
    @contextlib.contextmanager
    def quiesce(self):
        """Serve every request the driver has offered, notified or not, let the
        model finish, then hold the device lock: no I/O thread or backend thread
        is inside a request while the snapshot is taken, and each request is
        either complete (in the used ring, in guest memory) or not yet taken
        from the avail ring."""
        with self.lock:
            for index in range(len(self.queues)):
                self._run_queue(index)
            with self.model.quiesce():
                yield

    def pause(self) -> None:
        with self.lock:
            self._paused = True
            self.model.pause()

    def resume(self) -> None:
        """Look at every queue once: what was offered or arrived meanwhile."""
        with self.lock:
            self._paused = False
            self.model.resume()
            for index in range(len(self.queues)):
                self._run_queue(index)

    def save_state(self) -> dict:
        with self.lock:
            state = super().save_state()
            state["virtio"] = {
                "status": self.status, "driver_features": self.driver_features,
                "device_feature_select": self.device_feature_select,
                "driver_feature_select": self.driver_feature_select,
                "queue_select": self.queue_select, "config_vector": self.config_vector,
                "config_generation": self.config_generation, "isr": self.isr,
                "queue_vectors": list(self.queue_vectors),
                "queues": [queue.save_state() for queue in self.queues],
                "device": self.model.save_state()}
        return state

    def restore_state(self, state: dict) -> None:
        """Restore the transport, the queues and the model, re-assign the notify
        ioeventfds where the BARs now decode, then look at every live queue once:
        a notification does not survive a snapshot, and receive paths (host
        input, a tap) start again from a kick.  The transport's registers are
        checked before anything changes; StateError where they do not fit."""
        owner = f"{self.emulation_name} {self.bdf}"
        saved = state.get("virtio") if isinstance(state, dict) else None
        expect_keys(saved, ("status", "driver_features", "device_feature_select",
                            "driver_feature_select", "queue_select", "config_vector",
                            "config_generation", "isr", "queue_vectors", "queues", "device"),
                    f"{owner} virtio")
        registers = {key: uint(saved[key], limit, f"{owner} virtio {key}") for key, limit in (
            ("status", 0xFF), ("driver_features", (1 << 64) - 1),
            ("device_feature_select", 0xFFFFFFFF), ("driver_feature_select", 0xFFFFFFFF),
            ("queue_select", 0xFFFF), ("config_vector", 0xFFFF),
            ("config_generation", 0xFF))}
        isr = bits(saved["isr"], ISR_QUEUE | ISR_CONFIG, f"{owner} virtio ISR")
        queues, vectors = saved["queues"], saved["queue_vectors"]
        if not isinstance(queues, list) or not isinstance(vectors, list) or \
                len(queues) != len(self.queues) or len(vectors) != len(self.queues):
            raise StateError(f"{owner} has {len(self.queues)} queues, the snapshot "
                             f"{len(queues) if isinstance(queues, list) else queues!r}")
        vectors = [uint(vector, 0xFFFF, f"{owner} queue {index} vector")
                   for index, vector in enumerate(vectors)]
        checked = [queue.check_state(queue_state, f"{owner} queue {index}")
                   for index, (queue, queue_state) in enumerate(zip(self.queues, queues))]
        super().restore_state(state)
        with self.lock:
            for key, value in registers.items():
                setattr(self, key, value)
            self.config_vector = self._valid_vector(self.config_vector)
            self.isr = isr
            for index, (queue, fields) in enumerate(zip(self.queues, checked)):
                try:
                    queue.restore_state(fields)
                except VirtqueueError as exc:
                    raise StateError(f"{owner} queue {index}: {exc}") from None
                self.queue_vectors[index] = self._valid_vector(vectors[index])
            self.model.restore_state(saved["device"])
            if self.status & STATUS_DRIVER_OK:
                self.model.activate(self.driver_features)
            self._sync_ioeventfds()
            for index in range(len(self.queues)):
                self.kick(index)

    # --- status, features, reset -------------------------------------------------------
    def _write_status(self, value: int, modern: bool) -> None:
        """Legacy drivers have no FEATURES_OK step: what they wrote is what they get.
        At DRIVER_OK the features are final: the model hears so before its queues run."""
        if value == 0:
            self._reset()
            return
        old = self.status
        if modern and value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK and \
                not self._features_acceptable():
            value &= ~STATUS_FEATURES_OK
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            self.model.activate(self.driver_features)
        self.status = value | (old & STATUS_NEEDS_RESET)
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            for index, queue in enumerate(self.queues):   # notifications sent too early
                if queue.ready:
                    self.kick(index)

    def _features_acceptable(self) -> bool:
        """Modern drivers must take VERSION_1, nothing the device did not offer, and
        what the model needs with what they took."""
        features = self.driver_features
        return bool(features & F_VERSION_1) and not features & ~self.device_features and \
            self.model.features_acceptable(features)

    def _reset(self) -> None:
        self._clear_state()
        for index, queue in enumerate(self.queues):
            queue.reset()
            self.queue_vectors[index] = NO_VECTOR
        self.deassert_intx()
        self._sync_ioeventfds()
        self.model.reset()

    def _read_isr(self) -> int:
        value, self.isr = self.isr, 0
        self.deassert_intx()
        return value

    def _activate(self, index: int) -> None:
        queue = self.queues[index]
        queue.event_idx = self.negotiated(F_EVENT_IDX)
        try:
            queue.activate()
        except VirtqueueError as exc:
            self.needs_reset(f"queue {index}: {exc}")
            return
        self._sync_ioeventfds()
        if self.status & STATUS_DRIVER_OK:
            self.kick(index)

    # --- BAR accesses ---------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        with self.lock:
            if index == MODERN_BAR:
                return self._modern_read(offset, size)
            if index == LEGACY_BAR:
                return self._legacy_read(offset, size)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            if index == MODERN_BAR:
                self._modern_write(offset, size, value)
            elif index == LEGACY_BAR:
                self._legacy_write(offset, size, value)

    def _config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.model.config[offset:offset + size].ljust(size, b"\0"),
                              "little")

    # --- modern interface -----------------------------------------------------------------
    def _modern_read(self, offset: int, size: int) -> int:
        region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == MODERN_COMMON:
            if at >= COMMON_SIZE:
                return 0
            return int.from_bytes(self._common_bytes()[at:at + size].ljust(size, b"\0"),
                                  "little")
        if region == MODERN_ISR:
            return self._read_isr() if at == 0 else 0
        if region == MODERN_DEVICE:
            return self._config_read(at, size)
        return 0

    def _common_bytes(self) -> bytes:
        select = self.queue_select
        if select < len(self.queues):
            queue = self.queues[select]
            queue_fields = (queue.size, self.queue_vectors[select], int(queue.ready), select,
                            queue.desc_addr, queue.avail_addr, queue.used_addr)
        else:
            queue_fields = (0, NO_VECTOR, 0, 0, 0, 0, 0)
        word = self.device_feature_select
        features = (self.device_features >> (32 * word)) & 0xFFFFFFFF if word < 2 else 0
        driver_word = self.driver_feature_select
        driver = (self.driver_features >> (32 * driver_word)) & 0xFFFFFFFF \
            if driver_word < 2 else 0
        return _COMMON.pack(word, features, driver_word, driver, self.config_vector,
                            len(self.queues), self.status, self.config_generation,
                            select, *queue_fields)

    def _modern_write(self, offset: int, size: int, value: int) -> None:
        region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == MODERN_COMMON:
            self._common_write(at, size, value)
        elif region == MODERN_DEVICE:
            self.model.config_write(at, size, value)
        elif region == MODERN_NOTIFY:
            self.kick(at // NOTIFY_MULTIPLIER)

    def _common_write(self, at: int, size: int, value: int) -> None:
        if size == 8 and at in (COMMON_Q_DESCLO, COMMON_Q_AVAILLO, COMMON_Q_USEDLO):
            self._common_write(at, 4, value & 0xFFFFFFFF)
            self._common_write(at + 4, 4, value >> 32)
            return
        if at == COMMON_DFSELECT and size == 4:
            self.device_feature_select = value
        elif at == COMMON_GFSELECT and size == 4:
            self.driver_feature_select = value
        elif at == COMMON_GF and size == 4:
            word = self.driver_feature_select
            if word < 2 and not self.status & STATUS_FEATURES_OK:
                mask = 0xFFFFFFFF << (32 * word)
                self.driver_features = (self.driver_features & ~mask) | (value << (32 * word))
        elif at == COMMON_MSIX and size == 2:
            self.config_vector = self._valid_vector(value)
        elif at == COMMON_STATUS and size == 1:
            self._write_status(value, modern=True)
        elif at == COMMON_Q_SELECT and size == 2:
            self.queue_select = value
        elif self.queue_select < len(self.queues) and size in (2, 4):
            self._queue_register_write(self.queue_select, at, size, value)
        else:
            self.warn_once(f"common-{at:#x}-{size}", "ignored %d-byte write at common "
                           "config offset %#x", size, at)

    def _queue_register_write(self, index: int, at: int, size: int, value: int) -> None:
        queue = self.queues[index]
        if at == COMMON_Q_MSIX and size == 2:
            self.queue_vectors[index] = self._valid_vector(value)
        elif queue.ready:
            self.warn_once("live-queue", "driver changed queue %d while it is enabled", index)
        elif at == COMMON_Q_SIZE and size == 2:
            if value <= self.queue_max[index]:
                queue.size = value    # activate() checks it against the ring rules
            else:
                self.warn_once("queue-size", "queue %d size %d is above the maximum %d",
                               index, value, self.queue_max[index])
        elif at == COMMON_Q_ENABLE and size == 2:
            if value == 1:
                self._activate(index)
        elif size == 4 and COMMON_Q_DESCLO <= at < COMMON_SIZE:
            name = ("desc_addr", "avail_addr", "used_addr")[(at - COMMON_Q_DESCLO) // 8]
            shift = 32 if at & 4 else 0
            old = getattr(queue, name)
            setattr(queue, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _valid_vector(self, vector: int) -> int:
        """The vector the driver asked for, or NO_VECTOR where there is no such entry."""
        return vector if vector < self.msix.vectors else NO_VECTOR

    # --- legacy interface ----------------------------------------------------------------
    def _legacy_config_offset(self) -> int:
        return LEGACY_CONFIG_MSIX if self.msix.enabled else LEGACY_CONFIG

    def _legacy_read(self, offset: int, size: int) -> int:
        config = self._legacy_config_offset()
        if offset >= config:
            return self._config_read(offset - config, size)
        if offset <= LEGACY_ISR < offset + size:
            isr = self._read_isr()
        else:
            isr = 0
        select = self.queue_select
        if select < len(self.queues):
            queue = self.queues[select]
            pfn = queue.desc_addr >> LEGACY_PFN_SHIFT if queue.ready else 0
            queue_size, queue_vector = self.queue_max[select], self.queue_vectors[select]
        else:
            pfn, queue_size, queue_vector = 0, 0, NO_VECTOR
        block = _LEGACY.pack(self.device_features & 0xFFFFFFFF,
                             self.driver_features & 0xFFFFFFFF, pfn, queue_size, select, 0,
                             self.status, isr)
        block += struct.pack("<HH", self.config_vector, queue_vector)
        return int.from_bytes(block[offset:offset + size].ljust(size, b"\0"), "little")

    def _legacy_write(self, offset: int, size: int, value: int) -> None:
        config = self._legacy_config_offset()
        if offset >= config:
            self.model.config_write(offset - config, size, value)
        elif offset == LEGACY_GUEST_FEATURES and size == 4:
            if not self.status & STATUS_DRIVER_OK:
                self.driver_features = value & self.device_features
        elif offset == LEGACY_QUEUE_PFN and size == 4:
            self._legacy_set_pfn(value)
        elif offset == LEGACY_QUEUE_SELECT and size == 2:
            self.queue_select = value
        elif offset == LEGACY_QUEUE_NOTIFY and size == 2:
            self.kick(value)
        elif offset == LEGACY_STATUS and size == 1:
            self._write_status(value, modern=False)
        elif offset == LEGACY_CONFIG_VECTOR and size == 2:
            self.config_vector = self._valid_vector(value)
        elif offset == LEGACY_QUEUE_VECTOR and size == 2 and \
                self.queue_select < len(self.queues):
            self.queue_vectors[self.queue_select] = self._valid_vector(value)
        else:
            self.warn_once(f"legacy-{offset:#x}-{size}", "ignored %d-byte write at legacy "
                           "register %#x", size, offset)

    def _legacy_set_pfn(self, pfn: int) -> None:
        index = self.queue_select
        if index >= len(self.queues):
            return
        queue = self.queues[index]
        if pfn == 0:                   # the driver deletes the queue
            queue.reset()
            self._sync_ioeventfds()
            return
        if queue.ready:
            self.warn_once("live-queue", "driver moved queue %d while it is enabled", index)
            return
        size = queue.size = self.queue_max[index]
        queue.desc_addr = pfn << LEGACY_PFN_SHIFT
        queue.avail_addr = queue.desc_addr + 16 * size
        queue.used_addr = (queue.avail_addr + 6 + 2 * size + LEGACY_ALIGN - 1) & \
            ~(LEGACY_ALIGN - 1)
        self._activate(index)

    # --- the PCI_CFG window: BAR accesses through config space -------------------------
    def _window(self):
        """(bar, offset, length) of the PCI_CFG capability, if they name a valid access."""
        cap = self._pci_cfg_cap
        bar_index = self.config[cap + 4]
        offset, length = struct.unpack_from("<II", self.config, cap + 8)
        bar = self.bars[bar_index] if bar_index < 6 else None
        if bar is None or length not in (1, 2, 4) or offset % length or \
                offset + length > bar.size:
            return None
        return bar_index, offset, length

    def config_read(self, offset: int, size: int) -> int:
        data = self._pci_cfg_cap + 16
        if offset < data + 4 and offset + size > data:
            window = self._window()
            if window is not None:
                value = self._dispatch_bar_read(*window)
                self.config[data:data + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        return super().config_read(offset, size)

    def config_changed(self, offset: int, size: int) -> None:
        data = self._pci_cfg_cap + 16
        if offset < data + 4 and offset + size > data:
            window = self._window()
            if window is not None:
                bar_index, bar_offset, length = window
                value = int.from_bytes(self.config[data:data + length], "little")
                self._dispatch_bar_write(bar_index, bar_offset, length, value)

    # --- ioeventfds ------------------------------------------------------------------------
    def update_mapping(self, bar) -> None:
        super().update_mapping(bar)
        if bar.index in (LEGACY_BAR, MODERN_BAR):
            with self.lock:
                self._sync_ioeventfds()

    def _sync_ioeventfds(self) -> None:
        """Assign ioeventfds for live queues at the notify addresses the BARs decode now,
        and withdraw those that no longer apply."""
        if not self._notify_fds:
            return
        wanted = set()
        legacy, modern = self.bars[LEGACY_BAR], self.bars[MODERN_BAR]
        for index, queue in enumerate(self.queues):
            if not queue.ready:
                continue
            if legacy is not None and legacy.mapping is not None:
                wanted.add((index, True, legacy.address + LEGACY_QUEUE_NOTIFY, index))
            if modern.mapping is not None:
                wanted.add((index, False, modern.address + MODERN_NOTIFY +
                            NOTIFY_MULTIPLIER * index, None))
        for key in self._assigned - wanted:
            self._ioeventfd(key, deassign=True)
        for key in wanted - self._assigned:
            self._ioeventfd(key, deassign=False)

    def _ioeventfd(self, key: tuple, deassign: bool) -> None:
        index, pio, address, datamatch = key
        bus = self.context.ports if pio else self.context.mmio
        try:
            if deassign:
                bus.remove_notifier(self._notify_fds[index], address, 2, datamatch)
            else:
                bus.add_notifier(self._notify_fds[index], address, 2, datamatch)
        except NotifierUnavailable as exc:
            # The notify write then exits to userspace and reaches bar_write.
            self.warn_once(f"ioeventfd-{address:#x}", "no ioeventfd at %#x: %s", address, exc)
            if not deassign:
                return
        if deassign:
            self._assigned.discard(key)
        else:
            self._assigned.add(key)

    def teardown(self) -> None:
        """Withdraw the notifiers, then close the model (outside the lock: its
        backend threads may be waiting for it).  The I/O thread may be in a
        notification's callback meanwhile (a VM closes its PCI devices before
        its I/O thread): its kick then finds the device removed, rather than
        running a queue on a closed backend."""
        with self.lock:
            self._removed = True
            for key in list(self._assigned):
                self._ioeventfd(key, deassign=True)
            for fd in self._notify_fds:
                self.io_thread.unregister(fd)
                os.close(fd)
            self._notify_fds = []
        self.model.close()
