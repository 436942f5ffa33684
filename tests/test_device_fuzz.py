"""Every registered PCI emulation under random guest traffic, through the entry
points the vm_loop uses: config cycles (mechanism #1 and ECAM) at any offset
and size, reads and writes anywhere in each BAR and the ROM BAR at sizes 1, 2,
4 and 8, guest RAM rewritten between them, and, for virtio devices that a
driver started first (every feature offered taken, every queue on the same
rings), chains offered with arbitrary descriptors and queue notifications
that find them.

Invariants: no exception escapes to the caller (the vm_loop); nothing is
logged at ERROR (a device's internal failure, which the transport turns into
NEEDS_RESET so the VM runs on, is still a bug); reads return no more bits
than asked for; afterwards, with its BARs put back where they were, the
device still identifies itself, a virtio device resets through its common
config and then serves one well-formed request, an NVMe controller
resets, enables and answers Identify, and an AHCI controller resets, starts
its first port and answers IDENTIFY (PACKET) DEVICE, and an xHCI controller resets and
addresses its tablet.  A mutant (a virtio-rnd that
raises on each request) must fail that check in every run."""

import os
import struct
from contextlib import contextmanager

import pytest
from fuzzing import collect_errors, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from ahcidriver import AhciDriver, h2d
from nvmedriver import NvmeDriver
from pyhyve.ahci import ata as A
from pyhyve.ahci import hba as H
from pyhyve.ahci import protocol as F
from xhcidriver import XhciDriver
from pyhyve.nvme import controller as N
from pyhyve.pci import emulations
from pyhyve.pci import regs as R
from pyhyve.usb.tablet import DEVICE_DESCRIPTOR
from pyhyve.virtio import device as D
from pyhyve.virtio import pci as V
from pyhyve.virtio.pci import VirtioPciDevice
from test_pci import fuzz_bar_access, fuzz_config_access
from test_virtio import (ADDRESSES, AVAIL, BUFFERS, DESC, FLAGS, LENGTHS, SLOT, Driver,
                         VirtioVm)

MiB = 1 << 20
SLOTS = {"hostbridge": 0, "amd_hostbridge": 0, "lpc": 31}
DEFAULT_SLOT = SLOT             # where test_virtio's Driver looks


@contextmanager
def fake_tap():
    """A datagram socketpair end in place of a tap for virtio-net."""
    import socket

    from pyhyve.virtio import net

    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    device_end.setblocking(False)
    original = net.open_tap
    net.open_tap = lambda name: os.dup(device_end.fileno())
    try:
        yield {"tap": "fuzz0"}
    finally:
        net.open_tap = original
        device_end.close()
        host_end.close()


def small_disk(tmp: str) -> str:
    path = os.path.join(tmp, "disk.img")
    with open(path, "wb") as f:
        f.truncate(64 * 1024)
    return path


@contextmanager
def options_for(name: str, tmp: str):
    """The options an emulation needs to come up (a disk, a console backend, a tap)."""
    if name in ("virtio-blk", "nvme"):
        yield {"path": small_disk(tmp)}
    elif name.startswith("ahci"):
        yield {"port.0.type": "cd" if name == "ahci-cd" else "hd", "port.0.path": small_disk(tmp)}
    elif name == "virtio-console":
        yield {"port.0.name": "console", "port.0.path": os.path.join(tmp, "console.sock"),
               "port.1.name": "agent", "port.1.path": os.path.join(tmp, "agent.sock")}
    elif name == "virtio-net":
        with fake_tap() as options:
            yield options
    elif name == "virtio-scsi":
        path = os.path.join(tmp, "lun0.img")
        with open(path, "wb") as f:
            f.truncate(64 * 1024)
        yield {"lun.0.path": path}
    elif name == "xhci":
        yield {"slot.1.device": "tablet"}
    elif name == "virtio-9p":
        share = os.path.join(tmp, "share")
        os.makedirs(share, exist_ok=True)
        yield {"sharename": "fuzz", "path": share}
    else:
        yield {}


def test_every_registered_emulation_is_fuzzed():
    """A new emulation lands in this fuzzer by being registered; this fails if it
    cannot be brought up with the options above."""
    import tempfile
    for name, cls in emulations().items():
        with tempfile.TemporaryDirectory() as tmp, options_for(name, tmp) as options:
            vm = VirtioVm()
            try:
                vm.pci.add(SLOTS.get(name, DEFAULT_SLOT), 0, cls, options)
            finally:
                vm.close()


SIZES = st.sampled_from((1, 2, 4))
VALUES = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from(
    (0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, 0x80000000, 0xFEE00000, 0x10000, 0x11000, 0x12000)))
CONFIG = st.tuples(st.just("config"), st.sampled_from(("cf8", "ecam")), st.integers(0, 0xFFF),
                   SIZES, VALUES, st.booleans())
# BAR offsets mostly where registers are: the start of a BAR and of each virtio
# structure in the modern BAR (ISR, device config, notify), else anywhere.
BAR_OFFSETS = st.one_of(st.integers(0, 0x3F), st.integers(0, 0x3F),
                        st.tuples(st.sampled_from((0x1000, 0x2000, 0x3000)),
                                  st.integers(0, 0x3F)).map(sum),
                        st.integers(0, MiB - 1))
# ("bar", which of the device's BARs, offset, size, value, write)
BAR = st.tuples(st.just("bar"), st.integers(0, 6), BAR_OFFSETS, st.sampled_from((1, 2, 4, 8)),
                st.one_of(VALUES, st.integers(0, 2**64 - 1)), st.booleans())
RAM = st.tuples(st.just("ram"), st.one_of(st.integers(0x10000, 0x13000),
                                          st.integers(0, 16 * MiB - 64)),
                st.binary(min_size=1, max_size=64))
NOTIFY = st.tuples(st.just("notify"), st.integers(0, 7))
# A descriptor (address, length, flags, next) written at index `head`, and head
# offered in the avail ring that every started queue shares.
OFFER = st.tuples(st.just("offer"), st.integers(0, 7),
                  st.tuples(ADDRESSES, LENGTHS, FLAGS, st.integers(0, 7)))
OPERATIONS = st.lists(st.one_of(CONFIG, BAR, BAR, RAM, RAM, NOTIFY, OFFER, OFFER),
                      max_size=60)
MAX_RING = 256                  # the largest queue: every size's slot for idx is filled


def offer(vm, head: int, descriptor: tuple) -> None:
    """Put `descriptor` at `head` and make head the next avail entry, whatever the
    reading queue's size (the slot is idx modulo it: every slot holds head)."""
    vm.memory.write(DESC + 16 * head, struct.pack("<QIHH", *descriptor))
    vm.memory.write(AVAIL + 4, struct.pack(f"<{MAX_RING}H", *[head] * MAX_RING))
    vm.memory.write_u16(AVAIL + 2, (vm.memory.read_u16(AVAIL + 2) + 1) & 0xFFFF)


def start_every_queue(driver, queues: int) -> None:
    driver.negotiate(driver.device_features())
    for index in range(queues):
        driver.setup_queue(index)
    driver.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                      D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)


def cfg_read(vm, slot, offset, size):
    return vm.pci.config_read(0, slot, 0, offset, size)


# One well-formed request per virtio emulation: (queue, [(gpa, length, device-writable)]).
# virtio-blk reads sector 0 (header, 512 data bytes, status); virtio-net sends a
# minimum frame behind its 12-byte header; virtio-console writes on port 0;
# virtio-9p answers a Tversion; virtio-scsi runs TEST UNIT READY on LUN 0 (request
# header with a 32-byte CDB, then response with 96 bytes of sense); virtio-keyboard
# and virtio-tablet take an event on the statusq.
BLK_HEADER = struct.pack("<IIQ", 0, 0, 0)
TVERSION = struct.pack("<IBHIH", 21, 100, 0xFFFF, 8192, 8) + b"9P2000.L"
SCSI_TUR = bytes([1, 0, 0x40, 0]) + bytes(4 + 11 + 32)
REQUESTS = {
    "virtio-rnd": (0, [(BUFFERS, 64, True)]),
    "virtio-blk": (0, [(BUFFERS, 16, False), (BUFFERS + 0x200, 512, True),
                       (BUFFERS + 0x400, 1, True)]),
    "virtio-net": (1, [(BUFFERS, 12 + 60, False)]),
    "virtio-console": (1, [(BUFFERS, 5, False)]),
    "virtio-9p": (0, [(BUFFERS, len(TVERSION), False), (BUFFERS + 0x200, 64, True)]),
    "virtio-scsi": (2, [(BUFFERS, len(SCSI_TUR), False), (BUFFERS + 0x200, 108, True)]),
    "virtio-keyboard": (1, [(BUFFERS, 8, False)]),
    "virtio-tablet": (1, [(BUFFERS, 8, False)]),
}


@contextmanager
def no_errors_logged():
    """Fail if pyhyve logs at ERROR inside (log.exception: a device's own bug)."""
    with collect_errors() as messages:
        yield
    assert not messages, messages


def serves_a_request(vm, device, name: str) -> None:
    """From reset, a driver that takes every feature starts the device and makes
    one well-formed request, which the device completes without NEEDS_RESET."""
    driver = Driver(vm, device)
    driver.set_common(V.COMMON_STATUS, 1, 0)
    driver.negotiate(driver.device_features())
    queue, buffers = REQUESTS[name]
    ring = driver.setup_queue(queue)
    driver.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                      D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)
    vm.memory.write(BUFFERS, {"virtio-blk": BLK_HEADER, "virtio-9p": TVERSION,
                                    "virtio-scsi": SCSI_TUR}.get(
        name, bytes(16)))
    head = ring.offer(buffers)
    driver.notify(queue)
    assert [used[0] for used in ring.completed()] == [head]
    assert not driver.status() & D.STATUS_NEEDS_RESET


def check_usable(vm, device, slot, ids, bar_registers):
    """Put the BARs back, turn decoding on, and see the device answer."""
    for index, value in bar_registers.items():
        vm.pci.config_write(0, slot, 0, R.BAR0 + 4 * index, 4, value)
    vm.pci.config_write(0, slot, 0, R.COMMAND, 2,
                        R.COMMAND_IO | R.COMMAND_MEMORY | R.COMMAND_MASTER)
    assert cfg_read(vm, slot, R.VENDOR_ID, 4) == ids
    if isinstance(device, VirtioPciDevice):
        driver = Driver(vm, device)
        driver.set_common(V.COMMON_STATUS, 1, 0)                     # reset
        assert driver.common(V.COMMON_STATUS, 1) == 0
        driver.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER)
        assert driver.common(V.COMMON_STATUS, 1) == D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER
        assert driver.common(V.COMMON_NUMQ, 2) == len(device.queues)
        serves_a_request(vm, device, device.emulation_name)
    elif device.emulation_name == "nvme":
        driver = NvmeDriver(vm, device, slot)
        assert driver.enable() & (N.CSTS_RDY | N.CSTS_CFS) == N.CSTS_RDY
        assert driver.identify(N.CNS_CONTROLLER)[0] == N.SUCCESS
    elif isinstance(device, H.AhciController):
        driver = AhciDriver(vm, device, slot)
        driver.set_reg(H.REG_GHC, H.GHC_HR)
        driver.start(0)
        opcode = A.IDENTIFY_PACKET_DEVICE if device.ports[0].atapi else A.IDENTIFY_DEVICE
        assert driver.command(h2d(opcode), [(0x200000, 512)])[0] & 0xFF == F.READY
    elif device.emulation_name == "xhci":
        driver = XhciDriver(vm, slot)
        driver.start()
        driver.reset_port(1)
        driver.address_device(1)
        assert driver.control(0x80, 6, 0x0100, 0, 18)[1] == DEVICE_DESCRIPTOR


@pytest.mark.parametrize("name", sorted(emulations()))
@fuzz_settings(100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS, started=st.booleans())
def test_random_guest_traffic_never_escapes(tmp_path, name, operations, started):
    exercise(tmp_path, name, operations, started)


def test_a_device_that_raises_on_each_request_is_caught(tmp_path, monkeypatch):
    """The mutant the fuzzer must catch: no traffic at all, and the check that
    closes every example fails (the transport logs the model's exception and
    sets NEEDS_RESET; the VM would run on)."""
    from pyhyve.virtio.rnd import VirtioRandom

    def broken(self, index, chain):
        raise RuntimeError("mutant")
    monkeypatch.setattr(VirtioRandom, "handle_request", broken)
    with pytest.raises(AssertionError):
        exercise(tmp_path, "virtio-rnd", [], started=False)


def exercise(tmp_path, name: str, operations: list, started: bool) -> None:
    slot = SLOTS.get(name, DEFAULT_SLOT)
    with options_for(name, str(tmp_path)) as options, no_errors_logged():
        vm = VirtioVm()
        try:
            device = vm.pci.add(slot, 0, emulations()[name], options)
            ids = cfg_read(vm, slot, R.VENDOR_ID, 4)
            bar_registers = {index: cfg_read(vm, slot, R.BAR0 + 4 * index, 4)
                             for index in range(6)}
            vm.pci.config_write(0, slot, 0, R.COMMAND, 2,
                                R.COMMAND_IO | R.COMMAND_MEMORY | R.COMMAND_MASTER)
            decoded = [index for index, bar in enumerate(device.bars) if bar is not None]
            decoded += [6] if device.rom is not None else []      # 6: the ROM BAR
            driver = Driver(vm, device) if isinstance(device, VirtioPciDevice) else None
            if driver and started:
                start_every_queue(driver, len(device.queues))
            for operation in operations:
                if operation[0] == "config":
                    fuzz_config_access(vm, slot, 0, *operation[1:])
                elif operation[0] == "bar":
                    _, which, *access = operation
                    if decoded:
                        fuzz_bar_access(vm, device, decoded[which % len(decoded)], *access)
                elif operation[0] == "notify":
                    if driver:
                        driver.notify(operation[1] % len(device.queues))
                elif operation[0] == "offer":
                    offer(vm, *operation[1:])
                elif vm.memory.is_ram(operation[1], len(operation[2])):  # not a display's
                    vm.memory.write(operation[1], operation[2])          # VGA window
            check_usable(vm, device, slot, ids, bar_registers)
        finally:
            vm.close()
