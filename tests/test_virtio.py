"""virtio-pci, virtio-blk and virtio-rnd driven as a guest driver drives them:
config cycles to find the capabilities and enable the BARs, then the modern
structures in BAR 4 or the legacy registers in I/O BAR 0, split virtqueues laid
out in guest memory, and notifications by register write or, as KVM would
deliver them, through the ioeventfd and the virtio I/O thread.  Then real
SeaBIOS boots a boot sector from a virtio-blk disk, on pyhyve and on QEMU."""

import os
import struct
import subprocess
import threading
import time

import pytest
from fakevm import FakeVm, RecordingKvmVm
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from pyhyve.config import ConfigError
from pyhyve.layout import MiB
from pyhyve.pci import emulations
from pyhyve.pci import regs as R
from pyhyve.pci.bus import PciBus
from pyhyve.virtio import blk as B
from pyhyve.virtio import device as D
from pyhyve.virtio import pci as V
from pyhyve.virtio.emulations import VirtioBlockPci
from pyhyve.virtio.emulations import VirtioRandomPci

SLOT = 4
MSI_ADDRESS = 0xFEE00000
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000      # a queue of up to 256 entries
LEGACY_PFN = 0x30                                  # legacy rings at 0x30000
BUFFERS = 0x40000
DISK_SIZE = 64 * 1024
SERIAL = "pyhyve-test-disk"


class IoeventfdKvmVm(RecordingKvmVm):
    """Records KVM_IOEVENTFD assignments as KVM keeps them."""

    def __init__(self):
        super().__init__()
        self.ioeventfds: dict[tuple, int] = {}

    def ioeventfd(self, fd, addr, length, pio, datamatch=None, deassign=False):
        key = (addr, length, pio, datamatch)
        if deassign:
            assert self.ioeventfds.pop(key) == fd
        else:
            assert key not in self.ioeventfds
            self.ioeventfds[key] = fd


class VirtioVm(FakeVm):
    """FakeVm with MSI recording and (optionally) write notifiers as KVM's
    ioeventfds, recorded as KVM keeps them."""

    def __init__(self, ioeventfd: bool = False):
        super().__init__(memory_size=16 * MiB)
        if ioeventfd:
            self.kvm_vm = IoeventfdKvmVm()
            for bus, pio in ((self.ports, True), (self.mmio, False)):
                bus.notifier = (lambda fd, address, size, datamatch, deassign, pio=pio:
                                self.kvm_vm.ioeventfd(fd, address, size, pio, datamatch,
                                                      deassign))
        self.msis: list[tuple[int, int]] = []
        self.pci = PciBus(self.context)

    def signal_msi(self, address: int, data: int) -> None:
        self.msis.append((address, data))

    def close(self) -> None:
        self.pci.close()
        for closable in reversed(self.closables):
            closable.close()


class Ring:
    """The driver's half of a split virtqueue in guest memory."""

    def __init__(self, vm, desc: int, avail: int, used: int, size: int):
        self.memory = vm.memory
        self.desc, self.avail, self.used, self.size = desc, avail, used, size
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        for address, length in ((desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)):
            self.memory.write(address, bytes(length))

    def offer(self, buffers: list[tuple[int, int, bool]], flags_override=None) -> int:
        """Put a chain of (gpa, length, device_writable) in the table and the avail ring."""
        head = self.next_desc
        for i, (gpa, length, writable) in enumerate(buffers):
            index = (head + i) % self.size
            flags = (2 if writable else 0) | (1 if i < len(buffers) - 1 else 0)
            if flags_override is not None:
                flags = flags_override
            struct.pack_into("<QIHH", self.memory.view(self.desc + 16 * index, 16, True), 0,
                             gpa, length, flags, (index + 1) % self.size)
        self.next_desc = (head + len(buffers)) % self.size
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)
        return head

    def completed(self) -> list[tuple[int, int]]:
        """(head, length) of the used entries the device added since the last call."""
        index = self.memory.read_u16(self.used + 2)
        done = []
        while self.used_seen != index:
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            done.append(struct.unpack("<II", self.memory.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return done


class Driver:
    """What a guest driver does: config cycles, capability walk, register access."""

    def __init__(self, vm: VirtioVm, device):
        self.vm = vm
        self.device = device
        self.caps = {}
        offset = self.cfg(R.CAPABILITIES_POINTER, 1)
        while offset:
            if self.cfg(offset, 1) == R.CAP_ID_VENDOR:
                cfg_type = self.cfg(offset + 3, 1)
                self.caps[cfg_type] = (offset, self.cfg(offset + 4, 1),
                                       self.cfg(offset + 8, 4), self.cfg(offset + 12, 4))
            elif self.cfg(offset, 1) == R.CAP_ID_MSIX:
                self.msix_cap = offset
            offset = self.cfg(offset + 1, 1)
        self.cfg_write(R.COMMAND, 2, R.COMMAND_IO | R.COMMAND_MEMORY | R.COMMAND_MASTER)

    def cfg(self, offset: int, size: int) -> int:
        return self.vm.pci.config_read(0, SLOT, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.vm.pci.config_write(0, SLOT, 0, offset, size, value)

    def bar(self, index: int) -> int:
        value = self.cfg(R.BAR0 + 4 * index, 4)
        return value & ~3 if value & 1 else value & ~0xF

    # --- modern structures, found through the capabilities ---
    def _address(self, cfg_type: int, offset: int) -> int:
        _, bar, base, _ = self.caps[cfg_type]
        return self.bar(bar) + base + offset

    def read(self, cfg_type: int, offset: int, size: int) -> int:
        return self.vm.mmio_read(self._address(cfg_type, offset), size)

    def write(self, cfg_type: int, offset: int, size: int, value: int) -> None:
        self.vm.mmio_write(self._address(cfg_type, offset), size, value)

    def common(self, offset: int, size: int) -> int:
        return self.read(V.CAP_COMMON_CFG, offset, size)

    def set_common(self, offset: int, size: int, value: int) -> None:
        self.write(V.CAP_COMMON_CFG, offset, size, value)

    def device_features(self) -> int:
        features = 0
        for word in (0, 1):
            self.set_common(V.COMMON_DFSELECT, 4, word)
            features |= self.common(V.COMMON_DF, 4) << (32 * word)
        return features

    def negotiate(self, features: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back."""
        self.set_common(V.COMMON_STATUS, 1, 0)
        self.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER)
        for word in (0, 1):
            self.set_common(V.COMMON_GFSELECT, 4, word)
            self.set_common(V.COMMON_GF, 4, (features >> (32 * word)) & 0xFFFFFFFF)
        self.set_common(V.COMMON_STATUS, 1,
                        D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER | D.STATUS_FEATURES_OK)
        return self.common(V.COMMON_STATUS, 1)

    def setup_queue(self, index: int, vector: int | None = None) -> Ring:
        """Lay queue `index` out at DESC/AVAIL/USED, at its largest size, and enable it."""
        self.set_common(V.COMMON_Q_SELECT, 2, index)
        size = self.common(V.COMMON_Q_SIZE, 2)
        self.set_common(V.COMMON_Q_SIZE, 2, size)
        for offset, address in ((V.COMMON_Q_DESCLO, DESC), (V.COMMON_Q_AVAILLO, AVAIL),
                                (V.COMMON_Q_USEDLO, USED)):
            self.set_common(offset, 4, address)
            self.set_common(offset + 4, 4, 0)
        if vector is not None:
            self.set_common(V.COMMON_Q_MSIX, 2, vector)
        ring = Ring(self.vm, DESC, AVAIL, USED, size)
        self.set_common(V.COMMON_Q_ENABLE, 2, 1)
        return ring

    def start(self, features: int, vector: int | None = None,
              config_vector: int | None = None) -> Ring:
        assert self.negotiate(features) & D.STATUS_FEATURES_OK
        if config_vector is not None:
            self.set_common(V.COMMON_MSIX, 2, config_vector)
        ring = self.setup_queue(0, vector=vector)
        self.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                        D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)
        return ring

    def notify(self, index: int) -> None:
        self.set_common(V.COMMON_Q_SELECT, 2, index)
        notify_off = self.common(V.COMMON_Q_NOFF, 2)
        multiplier = self.cfg(self.caps[V.CAP_NOTIFY_CFG][0] + 16, 4)
        self.write(V.CAP_NOTIFY_CFG, notify_off * multiplier, 2, index)

    def status(self) -> int:
        return self.common(V.COMMON_STATUS, 1)

    def enable_msix(self, vectors: int) -> None:
        """Program vector i to MSI data 0x40 + i and enable MSI-X."""
        table = self.bar(self.cfg(self.msix_cap + 4, 4) & 7)
        for vector in range(vectors):
            entry = table + 16 * vector
            self.vm.mmio_write(entry, 4, MSI_ADDRESS)
            self.vm.mmio_write(entry + 4, 4, 0)
            self.vm.mmio_write(entry + 8, 4, 0x40 + vector)
            self.vm.mmio_write(entry + 12, 4, 0)
        self.cfg_write(self.msix_cap + 2, 2, 1 << 15)

    # --- legacy registers in I/O BAR 0 ---
    def legacy_read(self, offset: int, size: int) -> int:
        return self.vm.port_read(self.bar(0) + offset, size)

    def legacy_write(self, offset: int, size: int, value: int) -> None:
        self.vm.port_write(self.bar(0) + offset, size, value)


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (DISK_SIZE // 256))
    return path


def make(vm, cls, **options):
    return vm.pci.add(SLOT, 0, cls, {k: str(v) for k, v in options.items()})


@pytest.fixture
def blk(disk):
    vm = VirtioVm()
    device = make(vm, VirtioBlockPci, path=disk, ser=SERIAL)
    yield vm, device, Driver(vm, device)
    vm.close()


def blk_request(vm, ring, kind, sector=0, out=b"", in_length=0, status_at=None):
    """Queue a request: header, data out, data in, status byte; returns the status gpa."""
    header = BUFFERS
    vm.memory.write(header, struct.pack("<IIQ", kind, 0, sector))
    buffers = [(header, 16, False)]
    if out:
        vm.memory.write(BUFFERS + 0x1000, out)
        buffers.append((BUFFERS + 0x1000, len(out), False))
    if in_length:
        vm.memory.write(BUFFERS + 0x20000, bytes(in_length))
        buffers.append((BUFFERS + 0x20000, in_length, True))
    status = status_at or BUFFERS + 0x800
    vm.memory.write(status, b"\xee")
    buffers.append((status, 1, True))
    ring.offer(buffers)
    return status


def blk_do(driver, ring, kind, **kwargs):
    """Run one request to completion; (status, used length, data read)."""
    status = blk_request(driver.vm, ring, kind, **kwargs)
    driver.notify(0)
    (head, length), = ring.completed()
    data = driver.vm.memory.read(BUFFERS + 0x20000, kwargs.get("in_length", 0))
    return driver.vm.memory.read_u8(status), length, data


MODERN_BLK = D.F_VERSION_1 | B.F_FLUSH | B.F_BLK_SIZE | B.F_SEG_MAX


# --- identity and capabilities ------------------------------------------------------------
def test_ids_and_capabilities(blk):
    vm, device, driver = blk
    assert driver.cfg(R.VENDOR_ID, 2) == 0x1AF4
    assert driver.cfg(R.DEVICE_ID, 2) == 0x1001            # transitional virtio-blk
    assert driver.cfg(R.REVISION_ID, 1) == 0
    assert driver.cfg(R.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert driver.cfg(R.SUBSYSTEM_ID, 2) == 2              # virtio type: block
    assert driver.cfg(R.REVISION_ID, 4) >> 8 == 0x010000
    assert driver.cfg(R.INTERRUPT_PIN, 1) == 1
    assert set(driver.caps) == {1, 2, 3, 4, 5}
    for cfg_type in (1, 2, 3, 4):
        _, bar, offset, length = driver.caps[cfg_type]
        assert bar == 4 and offset + length <= 0x4000
    assert driver.cfg(driver.caps[2][0] + 2, 1) == 20      # notify cap carries a multiplier
    assert driver.cfg(driver.caps[2][0] + 16, 4) == 4
    assert driver.cfg(R.BAR0, 4) & 1                       # legacy I/O BAR 0
    driver.cfg_write(R.BAR0 + 16, 4, 0xFFFFFFFF)           # size BAR 4: 16 KiB, 32-bit
    assert driver.cfg(R.BAR0 + 16, 4) == 0xFFFFC000
    assert driver.msix_cap
    assert driver.cfg(driver.msix_cap + 2, 2) & 0x7FF == 1  # 2 vectors: config + queue 0
    assert "virtio-blk" in emulations() and "virtio-rnd" in emulations()


def test_blk_config_space(blk, disk):
    vm, device, driver = blk
    assert driver.read(V.CAP_DEVICE_CFG, 0, 4) | driver.read(V.CAP_DEVICE_CFG, 4, 4) << 32 \
        == DISK_SIZE // 512
    assert driver.read(V.CAP_DEVICE_CFG, 0, 8) == DISK_SIZE // 512
    assert driver.read(V.CAP_DEVICE_CFG, 12, 4) == B.SEG_MAX
    assert driver.read(V.CAP_DEVICE_CFG, 20, 4) == 512      # blk_size


# --- feature negotiation ----------------------------------------------------------------------
def test_modern_feature_negotiation(blk):
    vm, device, driver = blk
    features = driver.device_features()
    for bit in (D.F_VERSION_1, D.F_EVENT_IDX, D.F_INDIRECT_DESC, B.F_SEG_MAX, B.F_BLK_SIZE,
                B.F_FLUSH, B.F_WRITE_ZEROES):
        assert features & bit
    assert not features & B.F_RO
    assert driver.negotiate(D.F_VERSION_1 | B.F_FLUSH) & D.STATUS_FEATURES_OK
    driver.set_common(V.COMMON_GFSELECT, 4, 0)
    assert driver.common(V.COMMON_GF, 4) == B.F_FLUSH
    # a modern driver must take VERSION_1, and nothing the device did not offer
    assert not driver.negotiate(B.F_FLUSH) & D.STATUS_FEATURES_OK
    assert not driver.negotiate(D.F_VERSION_1 | B.F_RO) & D.STATUS_FEATURES_OK
    # once FEATURES_OK is set the features stay as they are
    assert driver.negotiate(D.F_VERSION_1) & D.STATUS_FEATURES_OK
    driver.set_common(V.COMMON_GFSELECT, 4, 0)
    driver.set_common(V.COMMON_GF, 4, B.F_FLUSH)
    assert device.driver_features == D.F_VERSION_1


def test_legacy_driver(blk, disk):
    """A virtio 0.9.5 driver: 32-bit features, queue by page frame number, config at 0x14."""
    vm, device, driver = blk
    host = driver.legacy_read(V.LEGACY_HOST_FEATURES, 4)
    assert host == device.device_features & 0xFFFFFFFF and host & B.F_FLUSH
    driver.legacy_write(V.LEGACY_STATUS, 1, 0)
    driver.legacy_write(V.LEGACY_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER)
    driver.legacy_write(V.LEGACY_GUEST_FEATURES, 4, B.F_FLUSH | (1 << 31))  # 31: not offered
    assert driver.legacy_read(V.LEGACY_GUEST_FEATURES, 4) == B.F_FLUSH
    assert driver.legacy_read(V.LEGACY_CONFIG, 4) == DISK_SIZE // 512   # capacity, low half
    driver.legacy_write(V.LEGACY_QUEUE_SELECT, 2, 0)
    size = driver.legacy_read(V.LEGACY_QUEUE_SIZE, 2)
    assert size == 256
    driver.legacy_write(V.LEGACY_QUEUE_PFN, 4, LEGACY_PFN)
    assert driver.legacy_read(V.LEGACY_QUEUE_PFN, 4) == LEGACY_PFN
    desc = LEGACY_PFN << 12
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + 4095) & ~4095
    ring = Ring(vm, desc, avail, used, size)
    driver.legacy_write(V.LEGACY_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                        D.STATUS_DRIVER_OK)
    status = blk_request(vm, ring, B.T_IN, sector=1, in_length=512)
    driver.legacy_write(V.LEGACY_QUEUE_NOTIFY, 2, 0)
    assert ring.completed() == [(0, 513)]
    assert vm.memory.read_u8(status) == B.S_OK
    assert vm.memory.read(BUFFERS + 0x20000, 512) == disk.read_bytes()[512:1024]
    # INTx and the ISR: reading it returns "queue" and clears it
    assert device.intx_asserted
    assert driver.legacy_read(V.LEGACY_ISR, 1) == V.ISR_QUEUE
    assert not device.intx_asserted
    assert driver.legacy_read(V.LEGACY_ISR, 1) == 0
    # with MSI-X on, the vector registers appear and the config moves to 0x18
    driver.enable_msix(2)
    driver.legacy_write(V.LEGACY_CONFIG_VECTOR, 2, 0)
    driver.legacy_write(V.LEGACY_QUEUE_VECTOR, 2, 1)
    assert driver.legacy_read(V.LEGACY_QUEUE_VECTOR, 2) == 1
    assert driver.legacy_read(V.LEGACY_CONFIG_MSIX, 4) == DISK_SIZE // 512
    blk_request(vm, ring, B.T_FLUSH)
    driver.legacy_write(V.LEGACY_QUEUE_NOTIFY, 2, 0)
    assert ring.completed() == [(3, 1)]
    assert vm.msis == [(MSI_ADDRESS, 0x41)]
    # writing PFN 0 deletes the queue
    driver.legacy_write(V.LEGACY_QUEUE_PFN, 4, 0)
    assert not device.queues[0].ready and driver.legacy_read(V.LEGACY_QUEUE_PFN, 4) == 0


# --- virtio-blk requests -----------------------------------------------------------------------
def test_blk_round_trip(blk, disk):
    vm, device, driver = blk
    driver.enable_msix(2)
    ring = driver.start(MODERN_BLK, vector=1, config_vector=0)
    assert driver.common(V.COMMON_MSIX, 2) == 0
    assert driver.common(V.COMMON_Q_MSIX, 2) == 1
    payload = os.urandom(1024)
    assert blk_do(driver, ring, B.T_OUT, sector=3, out=payload)[:2] == (B.S_OK, 1)
    assert disk.read_bytes()[3 * 512:5 * 512] == payload
    assert vm.msis == [(MSI_ADDRESS, 0x41)]                # the queue's vector
    status, length, data = blk_do(driver, ring, B.T_IN, sector=2, in_length=2048)
    assert (status, length) == (B.S_OK, 2049)
    assert data == disk.read_bytes()[1024:3072]
    assert blk_do(driver, ring, B.T_FLUSH)[:2] == (B.S_OK, 1)
    status, length, data = blk_do(driver, ring, B.T_GET_ID, in_length=20)
    assert (status, length) == (B.S_OK, 21)
    assert data == SERIAL.encode().ljust(20, b"\0")
    assert len(vm.msis) == 4
    assert driver.common(V.COMMON_Q_ENABLE, 2) == 1


def test_blk_scattered_request(blk, disk):
    """Header, data and status may share descriptors and split anywhere (ANY_LAYOUT)."""
    vm, device, driver = blk
    ring = driver.start(MODERN_BLK)
    vm.memory.write(BUFFERS, struct.pack("<IIQ", B.T_IN, 0, 4))
    pieces = [(BUFFERS, 10, False), (BUFFERS + 10, 6, False),
              (BUFFERS + 0x1000, 100, True), (BUFFERS + 0x2000, 412, True),
              (BUFFERS + 0x3000, 513, True)]
    ring.offer(pieces)
    driver.notify(0)
    assert ring.completed() == [(0, 1025)]
    data = vm.memory.read(BUFFERS + 0x1000, 100) + vm.memory.read(BUFFERS + 0x2000, 412) + \
        vm.memory.read(BUFFERS + 0x3000, 512)
    assert data == disk.read_bytes()[2048:3072]
    assert vm.memory.read_u8(BUFFERS + 0x3000 + 512) == B.S_OK


def test_blk_bad_requests(blk, disk):
    vm, device, driver = blk
    ring = driver.start(MODERN_BLK)
    sectors = DISK_SIZE // 512
    assert blk_do(driver, ring, B.T_IN, sector=sectors - 1, in_length=1024)[0] == B.S_IOERR
    assert blk_do(driver, ring, B.T_OUT, sector=sectors, out=bytes(512))[0] == B.S_IOERR
    assert blk_do(driver, ring, B.T_IN, sector=2**63, in_length=512)[0] == B.S_IOERR
    assert blk_do(driver, ring, B.T_IN, sector=0, in_length=100)[0] == B.S_IOERR
    assert blk_do(driver, ring, 0x77)[0] == B.S_UNSUPP
    # a header shorter than 16 bytes
    vm.memory.write(BUFFERS + 0x800, b"\xee")
    ring.offer([(BUFFERS, 8, False), (BUFFERS + 0x800, 1, True)])
    driver.notify(0)
    assert ring.completed() == [(ring.next_desc - 2, 1)]
    assert vm.memory.read_u8(BUFFERS + 0x800) == B.S_IOERR
    assert disk.read_bytes() == bytes(range(256)) * (DISK_SIZE // 256)
    assert not driver.status() & D.STATUS_NEEDS_RESET
    # no status byte at all: nothing to answer with, so the device needs a reset
    ring.offer([(BUFFERS, 16, False)])
    driver.notify(0)
    assert driver.status() & D.STATUS_NEEDS_RESET


def test_ro_disk_refuses_writes(disk):
    vm = VirtioVm()
    device = make(vm, VirtioBlockPci, path=disk, ro="true")
    driver = Driver(vm, device)
    features = driver.device_features()
    assert features & B.F_RO and not features & (B.F_DISCARD | B.F_WRITE_ZEROES)
    ring = driver.start(MODERN_BLK | B.F_RO)
    before = disk.read_bytes()
    assert blk_do(driver, ring, B.T_OUT, sector=0, out=b"x" * 512)[0] == B.S_IOERR
    assert blk_do(driver, ring, B.T_WRITE_ZEROES, out=struct.pack("<QII", 0, 1, 0))[0] \
        == B.S_IOERR
    assert blk_do(driver, ring, B.T_IN, sector=0, in_length=512)[0] == B.S_OK
    assert disk.read_bytes() == before
    vm.close()


def test_discard_and_write_zeroes(blk, disk):
    vm, device, driver = blk
    features = driver.device_features()
    ring = driver.start(MODERN_BLK | (features & (B.F_DISCARD | B.F_WRITE_ZEROES)))
    segment = struct.pack("<QII", 2, 3, 0)
    assert blk_do(driver, ring, B.T_WRITE_ZEROES, out=segment)[0] == B.S_OK
    assert disk.read_bytes()[1024:2560] == bytes(1536)
    assert disk.read_bytes()[2560:2561] == bytes([2560 % 256])
    unmap = struct.pack("<QII", 8, 2, B.WRITE_ZEROES_UNMAP)
    assert blk_do(driver, ring, B.T_WRITE_ZEROES, out=unmap)[0] == B.S_OK
    assert disk.read_bytes()[4096:5120] == bytes(1024)
    beyond = struct.pack("<QII", DISK_SIZE // 512 - 1, 2, 0)
    assert blk_do(driver, ring, B.T_WRITE_ZEROES, out=beyond)[0] == B.S_IOERR
    if features & B.F_DISCARD:
        assert blk_do(driver, ring, B.T_DISCARD, out=struct.pack("<QII", 20, 4, 0))[0] == B.S_OK
        assert disk.read_bytes()[20 * 512:24 * 512] == bytes(2048)
        # DISCARD takes no flags
        assert blk_do(driver, ring, B.T_DISCARD, out=struct.pack("<QII", 0, 1, 1))[0] \
            == B.S_UNSUPP
    assert len(disk.read_bytes()) == DISK_SIZE


def test_write_zeroes_without_fallocate(blk, disk):
    """Where the filesystem has neither ZERO_RANGE nor holes, zeros are written."""
    vm, device, driver = blk
    ring = driver.start(MODERN_BLK | B.F_WRITE_ZEROES)
    device.model.image.zero_range = False
    device.model.image.can_punch = False
    out = struct.pack("<QII", 1, 2, B.WRITE_ZEROES_UNMAP)
    assert blk_do(driver, ring, B.T_WRITE_ZEROES, out=out)[0] == B.S_OK
    assert disk.read_bytes()[512:1536] == bytes(1024)


# --- status, reset, errors --------------------------------------------------------------------
def test_a_refused_notifier_leaves_the_notify_write_to_exit(disk, caplog):
    """The bus offers notifiers but the hypervisor refuses one: the device says so
    once, and the driver's notify write reaches the device the slow way."""
    from pyhyve.iobus import NotifierUnavailable

    def refuse(fd, address, size, datamatch, deassign):
        if not deassign:
            raise NotifierUnavailable("no more ioeventfds")
    vm = VirtioVm()
    vm.ports.notifier = vm.mmio.notifier = refuse
    try:
        device = make(vm, VirtioBlockPci, path=disk)
        driver = Driver(vm, device)
        ring = driver.start(MODERN_BLK)
        assert blk_do(driver, ring, B.T_IN, sector=1, in_length=512)[:2] == (B.S_OK, 513)
        assert "no ioeventfd at" in caplog.text and "no more ioeventfds" in caplog.text
    finally:
        vm.close()


def test_a_paused_device_leaves_requests_for_resume(blk, disk):
    """While the VM is paused, a notified queue waits: nothing moves into guest
    memory until resume() looks at every queue."""
    vm, device, driver = blk
    ring = driver.start(MODERN_BLK)
    device.pause()
    status = blk_request(vm, ring, B.T_IN, sector=2, in_length=512)
    driver.notify(0)
    assert ring.completed() == [] and vm.memory.read_u8(status) == 0xEE
    device.resume()
    (_, length), = ring.completed()
    assert length == 513 and vm.memory.read_u8(status) == B.S_OK
    assert vm.memory.read(BUFFERS + 0x20000, 512) == disk.read_bytes()[1024:1536]


def test_reset(blk):
    vm, device, driver = blk
    driver.enable_msix(2)
    ring = driver.start(MODERN_BLK, vector=1, config_vector=0)
    assert driver.common(V.COMMON_MSIX, 2) == 0
    blk_do(driver, ring, B.T_FLUSH)
    driver.set_common(V.COMMON_STATUS, 1, 0)
    assert driver.status() == 0
    assert driver.common(V.COMMON_MSIX, 2) == V.NO_VECTOR
    driver.set_common(V.COMMON_Q_SELECT, 2, 0)
    assert driver.common(V.COMMON_Q_ENABLE, 2) == 0
    assert driver.common(V.COMMON_Q_SIZE, 2) == 256
    assert driver.common(V.COMMON_Q_MSIX, 2) == V.NO_VECTOR
    assert driver.common(V.COMMON_Q_DESCLO, 4) == 0
    driver.set_common(V.COMMON_GFSELECT, 4, 0)
    assert driver.common(V.COMMON_GF, 4) == 0
    # the device works again from scratch
    ring = driver.start(MODERN_BLK)
    assert blk_do(driver, ring, B.T_FLUSH)[:2] == (B.S_OK, 1)


def test_queue_register_rules(blk):
    vm, device, driver = blk
    driver.negotiate(MODERN_BLK)
    driver.set_common(V.COMMON_Q_SELECT, 2, 1)             # there is no queue 1
    assert driver.common(V.COMMON_Q_SIZE, 2) == 0
    driver.set_common(V.COMMON_Q_SELECT, 2, 0)
    driver.set_common(V.COMMON_Q_SIZE, 2, 1024)            # above the maximum: ignored
    assert driver.common(V.COMMON_Q_SIZE, 2) == 256
    driver.set_common(V.COMMON_Q_MSIX, 2, 7)               # no such MSI-X entry
    assert driver.common(V.COMMON_Q_MSIX, 2) == V.NO_VECTOR
    assert driver.common(V.COMMON_NUMQ, 2) == 1
    driver.set_common(V.COMMON_Q_DESCLO, 8, 0x1234_0000_5000)   # a 64-bit access
    assert driver.common(V.COMMON_Q_DESCLO, 4) == 0x5000
    assert driver.common(V.COMMON_Q_DESCHI, 4) == 0x1234
    # a ring outside guest memory: enabling it makes the device need a reset
    driver.set_common(V.COMMON_Q_ENABLE, 2, 1)
    assert driver.status() & D.STATUS_NEEDS_RESET


def test_needs_reset_on_malformed_chain(blk):
    vm, device, driver = blk
    driver.enable_msix(2)
    ring = driver.start(MODERN_BLK, vector=1, config_vector=0)
    ring.offer([(15 * MiB, 2 * MiB, False)])               # runs off the end of RAM
    driver.notify(0)
    assert driver.status() & D.STATUS_NEEDS_RESET
    assert driver.status() & D.STATUS_DRIVER_OK
    assert vm.msis == [(MSI_ADDRESS, 0x40)]                # the config vector
    assert ring.completed() == []
    # a stopped device ignores the queue until the driver resets it
    blk_request(vm, ring, B.T_FLUSH)
    driver.notify(0)
    assert ring.completed() == []
    driver.set_common(V.COMMON_STATUS, 1, 0)
    assert driver.status() == 0
    ring = driver.start(MODERN_BLK)
    assert blk_do(driver, ring, B.T_FLUSH)[0] == B.S_OK


def test_needs_reset_with_intx(blk):
    """Without MSI-X the config change shows in ISR bit 1, and INTx."""
    vm, device, driver = blk
    ring = driver.start(MODERN_BLK)
    ring.offer([(BUFFERS, 16, False)], flags_override=1)    # NEXT, into a loop
    driver.notify(0)
    assert driver.status() & D.STATUS_NEEDS_RESET
    assert device.intx_asserted
    assert driver.read(V.CAP_ISR_CFG, 0, 1) == V.ISR_CONFIG
    assert not device.intx_asserted


# Mostly plausible values (a repeated branch weighs more), so that requests get
# served as well as refused.
_PLAUSIBLE_ADDRESS = st.integers(BUFFERS, BUFFERS + 0x4000)
_PLAUSIBLE_LENGTH = st.sampled_from([1, 16, 512, 1024, 4096])
ADDRESSES = st.one_of(_PLAUSIBLE_ADDRESS, _PLAUSIBLE_ADDRESS, _PLAUSIBLE_ADDRESS,
                      st.integers(0, 2**64 - 1))
LENGTHS = st.one_of(_PLAUSIBLE_LENGTH, _PLAUSIBLE_LENGTH, _PLAUSIBLE_LENGTH,
                    st.integers(0, 2**32 - 1))
FLAGS = st.one_of(st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 3]),
                  st.integers(0, 0xFFFF))
DESCRIPTORS = st.lists(st.tuples(ADDRESSES, LENGTHS, FLAGS, st.integers(0, 7)),
                       min_size=1, max_size=8)
HEADS = st.lists(st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)), min_size=1, max_size=4)


@fuzz_settings(80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descriptors=DESCRIPTORS, heads=HEADS,
       header=st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, 2**64 - 1)))
def test_garbage_never_escapes(disk, descriptors, heads, header):
    """Whatever the driver puts in the rings, the device answers or stops; no exception
    reaches the vCPU and the disk does not grow."""
    vm = VirtioVm()
    device = make(vm, VirtioBlockPci, path=disk)
    driver = Driver(vm, device)
    driver.start(MODERN_BLK | B.F_WRITE_ZEROES)
    for index, descriptor in enumerate(descriptors):
        vm.memory.write(DESC + 16 * index, struct.pack("<QIHH", *descriptor))
    vm.memory.write(BUFFERS, struct.pack("<IIQ", header[0], 0, header[1]))
    for i, head in enumerate(heads):
        vm.memory.write_u16(AVAIL + 4 + 2 * i, head)
    vm.memory.write_u16(AVAIL + 2, len(heads))
    driver.notify(0)
    assert driver.status() & (D.STATUS_NEEDS_RESET | D.STATUS_DRIVER_OK)
    assert os.path.getsize(disk) == DISK_SIZE
    vm.close()


# --- ioeventfds and the I/O thread --------------------------------------------------------------
def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_ioeventfd_notifications(disk):
    vm = VirtioVm(ioeventfd=True)
    device = make(vm, VirtioBlockPci, path=disk)
    driver = Driver(vm, device)
    assert vm.kvm_vm.ioeventfds == {}                     # no queue is live yet
    ring = driver.start(MODERN_BLK)
    notify = driver._address(V.CAP_NOTIFY_CFG, 0)
    port = driver.bar(0) + V.LEGACY_QUEUE_NOTIFY
    fds = vm.kvm_vm.ioeventfds
    assert set(fds) == {(notify, 2, False, None), (port, 2, True, 0)}
    assert [t.name for t in threading.enumerate()].count("virtio-io") == 1
    # KVM signals the eventfd instead of exiting: the I/O thread serves the queue
    blk_request(vm, ring, B.T_IN, sector=0, in_length=512)
    os.eventfd_write(fds[notify, 2, False, None], 1)
    assert wait_for(lambda: ring.used_seen != vm.memory.read_u16(USED + 2))
    assert ring.completed() == [(0, 513)]
    # the guest moves BAR 4: the notify ioeventfd follows it
    driver.cfg_write(R.BAR0 + 16, 4, 0xC1000000)
    assert (notify, 2, False, None) not in fds
    assert (0xC1000000 + V.MODERN_NOTIFY, 2, False, None) in fds
    # memory decode off: only the port one stays
    driver.cfg_write(R.COMMAND, 2, R.COMMAND_IO)
    assert set(fds) == {(port, 2, True, 0)}
    driver.cfg_write(R.COMMAND, 2, R.COMMAND_IO | R.COMMAND_MEMORY)
    assert len(fds) == 2
    # a reset withdraws them all
    driver.set_common(V.COMMON_STATUS, 1, 0)
    assert fds == {}
    ring = driver.start(MODERN_BLK)
    assert len(fds) == 2
    vm.close()
    assert fds == {}
    assert "virtio-io" not in [t.name for t in threading.enumerate()]


def test_one_io_thread_per_vm(disk, tmp_path):
    vm = VirtioVm(ioeventfd=True)
    make(vm, VirtioBlockPci, path=disk)
    vm.pci.add(SLOT + 1, 0, VirtioRandomPci, {})
    assert len(vm.closables) == 1
    assert [t.name for t in threading.enumerate()].count("virtio-io") == 1
    vm.close()


# --- the PCI_CFG window --------------------------------------------------------------------------
def test_pci_cfg_access_window(blk):
    """Firmware that cannot reach BAR 4 reads and writes it through config space."""
    vm, device, driver = blk
    cap = driver.caps[V.CAP_PCI_CFG][0]
    driver.cfg_write(cap + 4, 1, 4)                         # bar
    driver.cfg_write(cap + 12, 4, 4)                        # length
    driver.cfg_write(cap + 8, 4, V.MODERN_COMMON + V.COMMON_DFSELECT)
    driver.cfg_write(cap + 16, 4, 1)                        # select the high word
    driver.cfg_write(cap + 8, 4, V.MODERN_COMMON + V.COMMON_DF)
    assert driver.cfg(cap + 16, 4) == (D.F_VERSION_1 >> 32)
    driver.cfg_write(cap + 8, 4, V.MODERN_DEVICE)
    assert driver.cfg(cap + 16, 4) == DISK_SIZE // 512
    driver.cfg_write(cap + 12, 4, 3)                        # not a valid length: no access
    driver.cfg_write(cap + 16, 4, 0xAAAA)
    assert driver.cfg(cap + 12, 4) == 3


# --- virtio-rnd ------------------------------------------------------------------------------------
def test_rnd_fills_buffers():
    vm = VirtioVm()
    device = make(vm, VirtioRandomPci)
    driver = Driver(vm, device)
    assert driver.cfg(R.DEVICE_ID, 2) == 0x1005 and driver.cfg(R.SUBSYSTEM_ID, 2) == 4
    ring = driver.start(D.F_VERSION_1)
    vm.memory.write(BUFFERS, bytes(64))
    vm.memory.write(BUFFERS + 0x1000, bytes(32))
    ring.offer([(BUFFERS, 64, True), (BUFFERS + 0x1000, 32, True)])
    driver.notify(0)
    assert ring.completed() == [(0, 96)]
    data = vm.memory.read(BUFFERS, 64) + vm.memory.read(BUFFERS + 0x1000, 32)
    assert data != bytes(96) and len(set(data)) > 20
    with pytest.raises(ConfigError, match="unknown option"):
        vm.pci.add(SLOT + 1, 0, VirtioRandomPci, {"x": "1"})
    vm.close()


# --- options ------------------------------------------------------------------------------------------
def test_blk_options(tmp_path, disk):
    assert VirtioBlockPci.legacy_options("/d/disk.img,ro,sectorsize=512/4096,ser=ABC") == {
        "path": "/d/disk.img", "ro": "true", "sectorsize": "512/4096", "ser": "ABC"}
    assert VirtioBlockPci.legacy_options("path=/x,nocache") == {"path": "/x", "nocache": "true"}
    vm = VirtioVm()
    cases = [({}, "no disk path"), ({"path": tmp_path / "missing"}, "no such file"),
             ({"path": tmp_path}, "directory"), ({"path": disk, "bogus": 1}, "unknown option"),
             ({"path": disk, "sectorsize": 1000}, "power of two"),
             ({"path": disk, "sectorsize": "4096/512"}, "below the logical"),
             ({"path": disk, "ro": "maybe"}, "not a boolean")]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            make(vm, VirtioBlockPci, **options)
    device = make(vm, VirtioBlockPci, path=disk, sectorsize="4096/16384")
    driver = Driver(vm, device)
    assert driver.read(V.CAP_DEVICE_CFG, 20, 4) == 4096               # blk_size
    assert driver.read(V.CAP_DEVICE_CFG, 24, 1) == 2                  # physical_block_exp
    assert driver.read(V.CAP_DEVICE_CFG, 0, 8) == DISK_SIZE // 512    # still 512-byte units
    assert device.model.serial.startswith(b"BHYVE-")
    vm.close()


def test_blk_not_writable(tmp_path, disk):
    if os.geteuid() == 0:
        pytest.skip("root may write any file")
    disk.chmod(0o444)
    vm = VirtioVm()
    with pytest.raises(ConfigError, match="not writable.*add ,ro"):
        make(vm, VirtioBlockPci, path=disk)
    make(vm, VirtioBlockPci, path=disk, ro="true")
    vm.close()


def test_nocache(disk):
    """nocache opens the disk with O_DIRECT where the filesystem allows it: aligned
    transfers use it, the rest (SeaBIOS reads 512 bytes anywhere) the cached descriptor."""
    vm = VirtioVm()
    device = make(vm, VirtioBlockPci, path=disk, nocache="true")
    if device.model.image.direct_fd is None:
        vm.close()
        pytest.skip("this filesystem refuses O_DIRECT")
    driver = Driver(vm, device)
    ring = driver.start(MODERN_BLK)
    used = []
    preadv = os.preadv

    def spy(fd, views, offset):
        used.append(fd)
        return preadv(fd, views, offset)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "preadv", spy)
        aligned = blk_do(driver, ring, B.T_IN, sector=8, in_length=4096)
        odd = blk_do(driver, ring, B.T_IN, sector=1, in_length=512)
    assert used == [device.model.image.direct_fd, device.model.image.fd]
    assert aligned == (B.S_OK, 4097, disk.read_bytes()[4096:8192])
    assert odd[0] == B.S_OK and odd[2] == disk.read_bytes()[512:1024]
    vm.close()


# --- end to end: SeaBIOS boots a boot sector from a virtio-blk disk ------------------------------------
MBR_TEXT = "MBR: hello from the boot sector"
SECTOR2_TEXT = "SECTOR2: read through int 13h and virtio-blk"


@pytest.fixture(scope="module")
def boot_disk(tmp_path_factory):
    from build import build_mbr_disk, missing_tools
    if missing_tools():
        pytest.skip(f"missing tools: {missing_tools()}")
    return build_mbr_disk(tmp_path_factory.mktemp("mbr") / "disk.img", SECTOR2_TEXT)


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_seabios_boots_from_virtio_blk(boot_disk, tmp_path):
    from firmware import require_file
    from guestrun import run_pyhyve
    seabios = require_file("/usr/share/seabios/bios.bin", "seabios")
    console, log = tmp_path / "com1.txt", tmp_path / "seabios.log"
    proc = run_pyhyve(["-m", "128M", "-l", f"bootrom,{seabios}", "-l", f"com1,file={console}",
                       "-l", f"debugcon,file={log}", "-s", f"2,virtio-blk,{boot_disk}",
                       "virtio-vm"], timeout=120)
    text = console.read_text(errors="replace")
    assert MBR_TEXT in text and SECTOR2_TEXT in text, (text, proc.stderr)
    assert proc.returncode == 1                              # the MBR powered off
    debug = log.read_text(errors="replace")
    assert "found virtio-blk at 00:02.0" in debug
    assert "using modern (1.0) virtio mode" in debug


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_qemu_boots_the_same_disk(boot_disk):
    from firmware import require_file, require_program
    seabios = require_file("/usr/share/seabios/bios.bin", "seabios")
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    proc = subprocess.run(
        [qemu, "-machine", "pc", "-enable-kvm", "-m", "128", "-nodefaults", "-nographic",
         "-serial", "stdio", "-monitor", "none", "-bios", seabios,
         "-drive", f"file={boot_disk},format=raw,if=virtio",
         "-device", "isa-debug-exit,iobase=0x404,iosize=2"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    text = proc.stdout.decode(errors="replace")
    assert MBR_TEXT in text and SECTOR2_TEXT in text
    # isa-debug-exit exits with (value << 1) | 1: the low byte of 0x3400 << 1 | 1 is 1
    assert proc.returncode == 1
