"""KVM's coalesced MMIO and PIO: writes queued in a ring instead of exits.

KVM puts the guest's writes inside registered zones into a ring page it
shares with pyhyve (the page of every vCPU's mmap that KVM_CAP_COALESCED_MMIO
names) and lets the vCPU run on; only a full ring makes such a write exit as
any other.  flush() hands the queued writes to their devices through the
buses, in the order the guest made them.  Devices ask for it through their
bus (iobus.queue_writes), which is this module's only client.

Who flushes: the buses, before any access that exits to a device with queued
registers; the VM, once its vCPUs are paused or stopped (a snapshot saves no
half-delivered device); and the VM's flush thread every FLUSH_INTERVAL, so
that the last bytes a guest queued before it went idle still come out.

Threads: flush() runs on vCPU threads, the flush thread and whoever pauses
the VM, one drain at a time under a lock.  An entry is consumed (the ring's
`first` moved past it) only once its device has it, so a flush that finds
the ring empty knows that every write before it arrived.  The drain calls
the devices' own write callbacks, which never flush again.
"""

import ctypes
import mmap
import struct
import threading

from .kvm import KvmError, abi
from .log import getLogger

FLUSH_INTERVAL = 0.02   # seconds output may wait in the ring while the guest idles

# kvm_coalesced_mmio_ring and kvm_coalesced_mmio (kvm.abi, checked against the
# kernel's headers), read with struct: faster than ctypes, once a write
_HEADER = struct.Struct("<II")      # first (pyhyve consumes), last (KVM produces)
_FIRST = struct.Struct("<I")
_ENTRY = struct.Struct("<QII8s")    # address, length, pio, data
_ENTRIES_AT = ctypes.sizeof(abi.kvm_coalesced_mmio_ring)
_PAGE = mmap.PAGESIZE
RING_SLOTS = (_PAGE - _ENTRIES_AT) // _ENTRY.size     # KVM_COALESCED_MMIO_MAX

log = getLogger(__name__)


class CoalescedWrites:
    """One VM's coalesced zones and ring: the buses' write queue (iobus.WriteQueue).

    `on_failure(name, address)` is told when a device's callback raised on
    a queued write, as the vm_loop tells the VM of one that raised on an exit."""

    def __init__(self, kvm, kvm_vm, ports, mmio, on_failure):
        self._kvm_vm = kvm_vm
        self._ring_page = kvm.check_extension(abi.KVM_CAP_COALESCED_MMIO)
        self._pio = bool(self._ring_page) and \
            bool(kvm.check_extension(abi.KVM_CAP_COALESCED_PIO))
        self._buses = {True: ports, False: mmio}
        self._on_failure = on_failure
        self._zones: set[tuple[int, int, bool]] = set()
        self._ring: mmap.mmap | None = None
        self._lock = threading.Lock()
        self.delivered = 0          # queued writes handed to devices: the exits saved

    def map_ring(self, vcpu_fd: int) -> None:
        """Map the ring through a vCPU's descriptor (any vCPU's: there is one
        ring per VM).  Until then no vCPU has run, so nothing is queued."""
        if self._ring_page and self._ring is None:
            self._ring = mmap.mmap(vcpu_fd, _PAGE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=self._ring_page * _PAGE)

    def queue(self, address: int, size: int, pio: bool, on: bool) -> bool:
        """Register the zone with KVM (on) or take it back; whether writes
        there are queued now."""
        zone = (address, size, pio)
        if on == (zone in self._zones):
            return on
        if not (self._pio if pio else self._ring_page):
            return False
        try:
            self._kvm_vm.coalesce_writes(address, size, pio, remove=not on)
        except KvmError as exc:
            log.warning("writes at %s %#x stay exits: %s", "port" if pio else "MMIO",
                        address, exc)
            return False
        (self._zones.add if on else self._zones.discard)(zone)
        return on

    def flush(self) -> None:
        """Hand every write queued so far to its device, oldest first."""
        ring = self._ring
        if ring is None:
            return
        first, last = _HEADER.unpack_from(ring, 0)
        if first == last:
            return
        with self._lock:
            first, last = _HEADER.unpack_from(ring, 0)
            while first != last and first < RING_SLOTS:
                address, size, pio, data = _ENTRY.unpack_from(
                    ring, _ENTRIES_AT + first * _ENTRY.size)
                self._deliver(address, min(size, 8), bool(pio), data)
                first = (first + 1) % RING_SLOTS
                _FIRST.pack_into(ring, 0, first)

    def _deliver(self, address: int, size: int, pio: bool, data: bytes) -> None:
        self.delivered += 1
        entry = self._buses[pio].lookup(address)
        if entry is None:               # its device went away: dropped, as an exit would be
            return
        write = entry.direct_write or entry.write
        try:
            write(address - entry.base, size, int.from_bytes(data[:size], "little"))
        except Exception:
            self._on_failure(entry.name, address)

    def flush_until(self, stopped: threading.Event) -> None:
        """The flush thread: a flush every FLUSH_INTERVAL until STOPPED is set."""
        while not stopped.wait(FLUSH_INTERVAL):
            self.flush()

    def close(self) -> None:
        with self._lock:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
