"""xHCI with a USB tablet, driven by tests/xhcidriver.py as Linux's xhci-hcd and
usbhid drive it: reset and run, port reset and its event, Enable Slot and
Address Device, the descriptors over endpoint 0, Configure Endpoint and the
tablet's reports on its interrupt endpoint; stalls, bad rings and commands;
a snapshot in the middle; guest-written registers and rings fuzzed."""

import struct

import pytest
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from test_virtio import VirtioVm

from pyhyve.config import ConfigError
from pyhyve.inputroute import BUTTON_LEFT, WHEEL_DOWN, WHEEL_UP
from pyhyve.pci import regs as R
from pyhyve.usb import tablet as T
from pyhyve.usb import xhci as X
from xhcidriver import COMMANDS, XhciDriver

SLOT = 5


@pytest.fixture
def vm():
    machine = VirtioVm()
    yield machine
    machine.close()


def controller(vm, options=None):
    vm.pci.add(SLOT, 0, X.XhciController, {"slot.1.device": "tablet"} if options is None
               else options)
    driver = XhciDriver(vm, SLOT)
    driver.start()
    return driver


def enumerated(vm):
    """A driver that reset port 1, addressed the tablet and configured it."""
    driver = controller(vm)
    driver.events()
    driver.reset_port(1)
    driver.events()
    driver.address_device(1)
    assert driver.configure_tablet() == X.SUCCESS
    return driver


def test_identity_and_capabilities(vm):
    driver = controller(vm)
    assert driver.cfg(R.VENDOR_ID, 4) == 0x000D1B36
    assert driver.cfg(R.REVISION_ID, 4) >> 8 == 0x0C0330
    assert driver.read(0) == 0x01000020                      # CAPLENGTH, HCIVERSION 1.0
    assert driver.read(4) >> 24 == 2 and driver.read(4) & 0xFF == X.MAX_SLOTS
    xecp = (driver.read(0x10) >> 16) * 4
    protocols = []
    while True:
        header = driver.read(xecp)
        assert header & 0xFF == 2                            # Supported Protocol
        protocols.append((header >> 24, driver.read(xecp + 4), driver.read(xecp + 8) & 0xFFFF))
        if not (header >> 8) & 0xFF:
            break
        xecp += 4 * ((header >> 8) & 0xFF)
    assert protocols == [(2, 0x20425355, 0x0101), (3, 0x20425355, 0x0102)]


def test_port_connect_reset_and_events(vm):
    driver = controller(vm)
    events = driver.events()                                 # the connect, seen at run
    assert [(event[0], event[2] >> 24) for event in events] == [(X.EVENT_PORT_STATUS_CHANGE, 1)]
    portsc = driver.portsc(1)
    assert portsc & (X.PORT_CCS | X.PORT_CSC | X.PORT_PP) == X.PORT_CCS | X.PORT_CSC | X.PORT_PP
    assert not portsc & X.PORT_PED and driver.portsc(2) & X.PORT_CCS == 0
    driver.write(X.PORTS, X.PORT_PP | X.PORT_CSC)             # acknowledge the change
    assert not driver.portsc(1) & X.PORT_CSC
    driver.reset_port(1)
    assert [event[2] >> 24 for event in driver.events()] == [1]
    portsc = driver.portsc(1)
    assert portsc & X.PORT_PED and portsc & X.PORT_PRC and not portsc & X.PORT_PR
    assert (portsc >> X.PORT_SPEED_SHIFT) & 0xF == X.SPEED_HIGH
    assert vm.kvm_vm.irq_lines or driver.read(X.INTERRUPTER_0 + X.IMAN) & X.IMAN_IP


def test_interrupts_intx_then_msix(vm):
    """INTx follows IMAN.IP; a message goes out per batch of events, the next
    only once the driver's ERDP write says it caught up (EHB)."""
    driver = controller(vm)
    device = vm.pci.functions[(SLOT, 0)]
    assert device.intx_asserted                              # the connect event at run
    driver.write(X.INTERRUPTER_0 + X.IMAN, X.IMAN_IE | X.IMAN_IP)
    assert not device.intx_asserted
    driver.events()
    offset = driver.cfg(R.CAPABILITIES_POINTER, 1)
    while driver.cfg(offset, 1) != R.CAP_ID_MSIX:
        offset = driver.cfg(offset + 1, 1)
    table = driver.base + X.MSIX_TABLE
    for at, value in ((0, 0xFEE00000), (4, 0), (8, 0x45), (12, 0)):
        vm.mmio_write(table + at, 4, value)
    driver.cfg_write(offset + 2, 2, 1 << 15)
    driver.command(X.CMD_NOOP)                               # events() acknowledges (EHB)
    assert vm.msis == [(0xFEE00000, 0x45)]
    for _ in range(2):                                       # two commands, not acknowledged
        driver.command_ring.put(0, 0, X.CMD_NOOP << 10)
        driver.write(X.DOORBELLS, 0)
    assert len(vm.msis) == 2                                 # the handler is busy: one message
    assert len(driver.events()) == 2
    driver.command(X.CMD_NOOP)
    assert len(vm.msis) == 3


def test_enumeration_descriptors_and_reports(vm):
    driver = controller(vm)
    driver.events()
    driver.reset_port(1)
    driver.events()
    assert driver.command(X.CMD_NOOP) == (X.SUCCESS, 0)
    slot = driver.address_device(1, block=True)              # Linux's new scheme: BSR first
    code, device = driver.control(0x80, 6, 0x0100, 0, 64)
    assert code == X.SUCCESS and device == T.DEVICE_DESCRIPTOR
    vm.memory.write_u64(0x104000 + 64 + 8,                   # where endpoint 0's ring is now
                        0x106000 + 16 * driver.ep0.index | driver.ep0.cycle)
    assert driver.command(X.CMD_ADDRESS_DEVICE, 0x104000, slot << 24)[0] == X.SUCCESS
    assert vm.memory.read_u32(0x105000 + 12) == X.SLOT_ADDRESSED << 27 | slot
    assert driver.control(0x80, 6, 0x0200, 0, 9)[1] == T.CONFIG_DESCRIPTOR[:9]
    assert driver.control(0x80, 6, 0x0200, 0, 255)[1] == T.CONFIG_DESCRIPTOR
    assert driver.control(0x80, 6, 0x0302, 0x409, 255)[1].decode("utf-16-le")[1:] == \
        "USB Tablet"
    assert driver.control(0x81, 6, 0x2200, 0, 255)[1] == T.REPORT_DESCRIPTOR
    assert driver.control(0x21, 0x0A, 0, 0, 0)[0] == X.SUCCESS            # SET_IDLE
    assert driver.control(0x80, 6, 0x0F00, 0, 5)[0] == X.STALL_ERROR      # no BOS: stall
    assert vm.memory.read_u32(0x105000 + 32) & 7 == X.EP_HALTED
    assert driver.command(X.CMD_RESET_ENDPOINT, 0, slot << 24 | X.EP0 << 16)[0] == X.SUCCESS
    dequeue = 0x106000 + 16 * driver.ep0.index | driver.ep0.cycle       # past the stalled TD
    assert driver.command(X.CMD_SET_TR_DEQUEUE, dequeue, slot << 24 | X.EP0 << 16)[0] == \
        X.SUCCESS
    assert driver.configure_tablet() == X.SUCCESS
    assert vm.memory.read_u32(0x105000 + 12) >> 27 == X.SLOT_CONFIGURED
    assert driver.control(0xA1, 0x01, 0x0100, 0, 6)[1] == bytes(6)        # GET_REPORT

    assert vm.context.input.pointer(0x1234, 0x7FFF, BUTTON_LEFT)
    driver.queue_report_buffer()
    assert driver.reports() == [struct.pack("<BHHb", 1, 0x1234, 0x7FFF, 0)]
    driver.queue_report_buffer()
    assert driver.reports() == []                                         # nothing new: NAK
    vm.context.input.pointer(5, 6, WHEEL_DOWN)                            # fills the buffer
    assert driver.reports() == [struct.pack("<BHHb", 0, 5, 6, -1)]
    vm.context.input.pointer(7, 8, 0)
    vm.context.input.pointer(9, 10, WHEEL_DOWN)
    driver.queue_report_buffer()
    assert driver.reports() == [struct.pack("<BHHb", 0, 9, 10, -1)]      # coalesced


def test_stop_endpoint_and_disable_slot(vm):
    driver = enumerated(vm)
    slot = driver.slot_id
    driver.queue_report_buffer()
    assert driver.command(X.CMD_STOP_ENDPOINT, 0, slot << 24 | X.EP1_IN << 16)[0] == X.SUCCESS
    assert vm.memory.read_u32(0x105000 + 32 * X.EP1_IN) & 7 == X.EP_STOPPED
    vm.context.input.pointer(1, 2, 0)
    assert driver.reports() == []                            # stopped: the report waits
    driver.write(X.DOORBELLS + 4 * slot, X.EP1_IN)           # a doorbell restarts it
    assert driver.reports() == [struct.pack("<BHHb", 0, 1, 2, 0)]
    assert driver.command(X.CMD_STOP_ENDPOINT, 0, slot << 24 | 9 << 16)[0] == \
        X.ENDPOINT_NOT_ENABLED
    assert driver.command(X.CMD_DISABLE_SLOT, 0, slot << 24) == (X.SUCCESS, slot)
    assert driver.command(X.CMD_DISABLE_SLOT, 0, slot << 24)[0] == X.SLOT_NOT_ENABLED
    assert driver.command(X.CMD_ADDRESS_DEVICE, 0x104000, 7 << 24)[0] == X.SLOT_NOT_ENABLED
    assert driver.command(31)[0] == X.TRB_ERROR


def test_reports_wait_while_the_vm_is_paused(vm):
    driver = enumerated(vm)
    device = vm.pci.functions[(SLOT, 0)]
    driver.queue_report_buffer()
    device.pause()
    vm.context.input.pointer(1, 2, 0)
    assert driver.reports() == []
    device.resume()
    assert driver.reports() == [struct.pack("<BHHb", 0, 1, 2, 0)]


def test_slots_run_out(vm):
    driver = controller(vm)
    for _ in range(X.MAX_SLOTS):
        assert driver.command(X.CMD_ENABLE_SLOT)[0] == X.SUCCESS
    assert driver.command(X.CMD_ENABLE_SLOT)[0] == X.NO_SLOTS


def test_router_takes_the_tablet_once_configured(vm):
    driver = controller(vm, {})
    assert not vm.context.input.pointer(1, 1, 0)             # no tablet on this controller
    vm.pci.close()
    driver = enumerated(vm)
    assert driver is not None and vm.context.input.pointer(1, 1, 0)


def test_a_looping_command_ring_is_a_host_system_error(vm):
    driver = controller(vm)
    vm.memory.write(COMMANDS, struct.pack("<QII", COMMANDS, 0, X.TRB_LINK << 10 | 1))
    driver.write(X.DOORBELLS, 0)
    assert driver.op(X.USBSTS) & X.STS_HSE


def test_snapshot_in_the_middle_of_a_transfer(vm):
    driver = enumerated(vm)
    driver.queue_report_buffer()
    device = vm.pci.functions[(SLOT, 0)]
    vm.context.input.pointer(3, 4, BUTTON_LEFT)
    driver.events()
    driver.queue_report_buffer()
    state = device.save_state()
    assert state["xhci"]["slots"]["1"]["endpoints"]["3"][0] == X.EP_RUNNING

    other_vm = VirtioVm()
    try:
        other = other_vm.pci.add(SLOT, 0, X.XhciController, {"slot.1.device": "tablet"})
        other_vm.memory.write(0, vm.memory.read(0, 0x110000))
        other.restore_state(state)
        assert other.save_state() == state
        other_vm.context.input.pointer(9, 9, 0)
        driver.vm = other_vm
        assert driver.reports() == [struct.pack("<BHHb", 0, 9, 9, 0)]
        bad = dict(state, xhci=dict(state["xhci"], slots={"99": {}}))
        with pytest.raises(ValueError):
            other.restore_state(bad)
    finally:
        other_vm.close()


def test_options():
    assert X.XhciController.legacy_options("tablet") == {"slot.1.device": "tablet"}
    vm = VirtioVm()
    try:
        with pytest.raises(ConfigError, match="unknown USB device"):
            vm.pci.add(SLOT, 0, X.XhciController, {"slot.1.device": "mouse"})
        with pytest.raises(ConfigError, match="no USB 2 port"):
            vm.pci.add(SLOT, 0, X.XhciController, {"slot.2.device": "tablet"})
    finally:
        vm.close()


def test_tablet_requests_and_state():
    import threading
    woken = []
    activated = []
    tablet = T.UsbTablet(threading.RLock(), lambda: woken.append(1), activated.append)
    assert tablet.control(0x80, 6, 0x0300, 0, 255, b"") == b"\x04\x03\x09\x04"
    assert tablet.control(0x80, 6, 0x0309, 0, 255, b"") is None
    assert tablet.control(0x80, 6, 0x0700, 0, 255, b"") is None
    assert not tablet.ready()
    assert tablet.control(0, 9, 1, 0, 0, b"") == b"" and tablet.ready()
    assert tablet.control(0x80, 8, 0, 0, 1, b"") == b"\x01"
    assert tablet.control(0x21, 0x0B, 0, 0, 0, b"") == b"" and tablet.protocol == 0
    tablet.pointer_event(10, 20, BUTTON_LEFT)
    assert woken and tablet.has_report()
    assert activated == [] and tablet.control(0xA1, 1, 0x0100, 0, 6, b"")
    tablet.polled()
    assert activated == [tablet]                # once a reset: the first poll tells the router
    state = tablet.save_state()
    other = T.UsbTablet(threading.RLock(), lambda: None, lambda sink: None)
    other.restore_state(state)
    assert other.save_state() == state
    for queue in ([[1, 10, 20, 200]], [[1, 10, 20]], [[8, 0, 0, 0]], [[1, 10, 20, 0]] * 17, {}):
        with pytest.raises(ValueError):
            other.restore_state(dict(state, queue=queue))
    tablet.reset()                              # once in its life, as QEMU's tablet
    tablet.polled()
    assert activated == [tablet]


def test_tablet_queues_a_click_made_between_two_polls():
    """Press and release before the host polls are two reports, as under QEMU;
    moves with the same buttons coalesce into the newest, wheel steps add up."""
    import threading
    tablet = T.UsbTablet(threading.RLock(), lambda: None, lambda sink: None)
    tablet.control(0, 9, 1, 0, 0, b"")
    tablet.pointer_event(100, 200, 0)
    tablet.pointer_event(300, 400, 0)
    tablet.pointer_event(300, 400, BUTTON_LEFT)
    tablet.pointer_event(300, 400, 0)
    tablet.pointer_event(300, 400, WHEEL_UP)
    tablet.pointer_event(300, 400, 0)
    tablet.pointer_event(300, 400, WHEEL_UP)
    reports = []
    while tablet.has_report():
        reports.append(struct.unpack("<BHHb", tablet.take_report()))
    assert reports == [(0, 300, 400, 0), (1, 300, 400, 0), (0, 300, 400, 2)]
    for n in range(40):                         # a host that never polls: the queue stays 16
        tablet.pointer_event(n, n, BUTTON_LEFT if n % 2 else 0)
    assert len(tablet.queue) == T.QUEUE_LENGTH and tablet.queue[-1][1] == 39


REGISTER_OFFSETS = st.one_of(
    st.sampled_from([X.OPERATIONAL + register for register in
                     (X.USBCMD, X.USBSTS, X.CRCR_LO, X.CRCR_HI, X.DCBAAP_LO, X.CONFIG)] +
                    [X.PORTS, X.PORTS + 0x10] +
                    [X.INTERRUPTER_0 + register for register in
                     (X.IMAN, X.ERSTSZ, X.ERSTBA_LO, X.ERDP_LO)] +
                    [X.DOORBELLS + 4 * slot for slot in range(4)]),
    st.integers(0, X.BAR_SIZE - 8))
VALUES = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from((1, 3, 5, 0x11, 0x101000,
                                                                0x102000, 0x103000)))
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("write"), REGISTER_OFFSETS, VALUES, st.sampled_from((1, 2, 4, 8))),
    st.tuples(st.just("read"), REGISTER_OFFSETS, st.just(0), st.sampled_from((1, 2, 4, 8))),
    st.tuples(st.just("ram"), st.sampled_from((0x100000, 0x101000, 0x102000, 0x103000,
                                               0x104000, 0x106000, 0x107000)),
              st.binary(min_size=16, max_size=64), st.just(0)),
    st.tuples(st.just("pointer"), st.integers(0, 0x7FFF), st.integers(0, 31), st.just(0))),
    max_size=60)


@fuzz_settings(150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS, enumerate_first=st.booleans())
def test_fuzzed_guest_never_breaks_the_controller(operations, enumerate_first):
    """Any register traffic and ring contents: nothing raises, the controller
    saves and restores, and after HCRST it enumerates the tablet again."""
    vm = VirtioVm()
    try:
        driver = enumerated(vm) if enumerate_first else controller(vm)
        device = vm.pci.functions[(SLOT, 0)]
        for kind, first, second, size in operations:
            if kind == "write":
                driver.write(first, second & ((1 << (8 * size)) - 1), size)
            elif kind == "read":
                assert 0 <= driver.read(first, size) < 1 << (8 * size)
            elif kind == "ram":
                vm.memory.write(first, second)
            else:
                vm.context.input.pointer(first, first, second)
        state = device.save_state()
        device.restore_state(state)
        assert device.save_state() == state
        driver.start()
        driver.events()
        driver.reset_port(1)
        driver.events()
        driver.address_device(1)
        assert driver.control(0x80, 6, 0x0100, 0, 18)[1] == T.DEVICE_DESCRIPTOR
    finally:
        vm.close()
