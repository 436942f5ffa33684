"""Input devices driven directly: the i8042's keyboard (scan code set 2, the
controller's set-1 translation, the commands atkbd and SeaBIOS send) and
virtio-input's keyboard and tablet (config pages, the eventq, the statusq),
each fed through the VM's input router; snapshots of both; fuzzing of the
i8042's ports with keys arriving between the guest's accesses; QMP's
input-send-event lists played into the router."""

import struct

import pytest
from fakevm import FakeVm
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from test_platform_devices import drain
from test_platform_devices import kbc_command as command
from test_virtio import BUFFERS, SLOT, Driver, Ring, VirtioVm

from pyhyve.devices.i8042 import I8042
from pyhyve.devices.ps2keymap import TRANSLATE_SET2, set2_sequence
from pyhyve import inputevents
from pyhyve.inputroute import BUTTON_LEFT, BUTTON_RIGHT, WHEEL_UP, InputRouter
from pyhyve.pci import regs as R
from pyhyve.virtio import device as D
from pyhyve.virtio import input as I
from pyhyve.virtio import pci as V
from pyhyve.virtio.emulations import VirtioKeyboardPci, VirtioTabletPci

KEY_A, KEY_ENTER, KEY_LEFTCTRL, KEY_RIGHTCTRL, KEY_UP = 30, 28, 29, 97, 103
KEY_SYSRQ, KEY_PAUSE, KEY_F7 = 99, 119, 65


# --- the i8042's keyboard ----------------------------------------------------------------
@pytest.fixture
def vm():
    return FakeVm()


@pytest.fixture
def kbc(vm):
    device = I8042(vm.context)
    yield device
    device.close()


def type_key(vm, code, down=True) -> list[int]:
    assert vm.context.input.key(code, down)
    return drain(vm)


def test_keys_in_scan_code_set_2(vm, kbc):
    command(vm, 0x60, 0x07)                              # XLAT off: raw set 2
    assert kbc.ready()
    assert type_key(vm, KEY_A) == [0x1C]
    assert type_key(vm, KEY_A, False) == [0xF0, 0x1C]
    assert type_key(vm, KEY_RIGHTCTRL) == [0xE0, 0x14]
    assert type_key(vm, KEY_UP, False) == [0xE0, 0xF0, 0x75]
    assert type_key(vm, KEY_SYSRQ) == [0xE0, 0x12, 0xE0, 0x7C]
    assert type_key(vm, KEY_SYSRQ, False) == [0xE0, 0xF0, 0x7C, 0xE0, 0xF0, 0x12]
    assert type_key(vm, KEY_PAUSE) == [0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77]
    assert type_key(vm, KEY_PAUSE, False) == []          # Pause has no break code
    assert type_key(vm, 0x2FF) == []                     # no such key on a PS/2 keyboard


def test_translation_to_set_1(vm, kbc):
    assert type_key(vm, KEY_A) == [0x1E]
    assert type_key(vm, KEY_A, False) == [0x9E]
    assert type_key(vm, KEY_RIGHTCTRL, False) == [0xE0, 0x9D]
    assert type_key(vm, KEY_F7) == [0x41]
    assert type_key(vm, KEY_SYSRQ) == [0xE0, 0x2A, 0xE0, 0x37]
    assert type_key(vm, KEY_PAUSE) == [0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5]
    vm.port_write(0x60, 1, 0xF2)                         # identify, as atkbd sees it
    assert drain(vm) == [0xFA, 0xAB, 0x41]


def test_set_1_keys_without_the_controller_translating(vm, kbc):
    command(vm, 0x60, 0x07)
    vm.port_write(0x60, 1, 0xF0)
    vm.port_write(0x60, 1, 0x01)
    vm.port_write(0x60, 1, 0xF0)
    vm.port_write(0x60, 1, 0x00)
    assert drain(vm) == [0xFA, 0xFA, 0xFA, 0xFA, 0x01]
    assert type_key(vm, KEY_UP, False) == [0xE0, 0xC8]
    vm.port_write(0x60, 1, 0xF0)
    vm.port_write(0x60, 1, 0x03)                         # set 3: refused
    assert drain(vm) == [0xFA, 0xFE]
    vm.port_write(0x60, 1, 0xFF)                         # reset: set 2 again
    assert drain(vm) == [0xFA, 0xAA]
    assert type_key(vm, KEY_UP) == [0xE0, 0x75]


def test_translation_table_is_set_1():
    """Set 1 is the Linux key code for every key of the basic block."""
    for code in range(1, 89):
        sequence = set2_sequence(code, True)
        if sequence:
            assert TRANSLATE_SET2[sequence[-1]] == code


def test_scanning_and_the_keyboard_port(vm, kbc):
    vm.port_write(0x60, 1, 0xF5)                         # scanning off
    assert drain(vm) == [0xFA]
    assert not kbc.ready()
    assert type_key(vm, KEY_A) == []
    vm.port_write(0x60, 1, 0xF4)
    assert drain(vm) == [0xFA] and kbc.ready()
    command(vm, 0xAD)                                    # port off: keys wait
    assert not kbc.ready()
    vm.context.input.key(KEY_ENTER, True)
    command(vm, 0x20)                                    # a controller reply still comes
    assert drain(vm) == [0x53]
    command(vm, 0xAE)
    assert drain(vm) == [0x1C]


def test_keyboard_commands_linux_and_seabios_send(vm, kbc):
    vm.port_write(0x60, 1, 0xED)
    vm.port_write(0x60, 1, 0x07)                         # all LEDs
    vm.port_write(0x60, 1, 0xF3)
    vm.port_write(0x60, 1, 0x00)                         # fastest typematic
    assert drain(vm) == [0xFA] * 4
    assert kbc.save_state()["leds"] == 7 and kbc.save_state()["typematic"] == 0
    vm.port_write(0x60, 1, 0xED)
    vm.port_write(0x60, 1, 0xF2)                         # a command ends the wait for a parameter
    assert drain(vm) == [0xFA, 0xFA, 0xAB, 0x41]         # 83, translated
    vm.port_write(0x60, 1, 0xFE)                         # resend: the last byte again
    assert drain(vm) == [0x41]
    vm.port_write(0x60, 1, 0xEE)
    assert drain(vm) == [0xEE]
    vm.port_write(0x60, 1, 0xF6)
    assert drain(vm) == [0xFA] and kbc.save_state()["typematic"] == 0x2B


def test_irq1_follows_the_output_buffer(vm, kbc):
    command(vm, 0x60, 0x03)                              # raw set 2
    vm.context.input.key(KEY_A, True)
    assert vm.irq_levels[1] is True
    vm.context.input.key(KEY_A, False)
    assert vm.port_read(0x60, 1) == 0x1C
    assert vm.irq_levels[1] is True                      # F0 1C follows
    assert drain(vm) == [0xF0, 0x1C]
    assert vm.irq_levels[1] is False
    command(vm, 0x60, 0x00)                              # interrupts off
    vm.context.input.key(KEY_A, True)
    assert vm.irq_levels[1] is False and drain(vm) == [0x1C]


def test_keys_typed_while_paused_wait(vm, kbc):
    kbc.pause()
    vm.context.input.key(KEY_A, True)
    assert drain(vm) == [] and not vm.irq_levels.get(1)
    kbc.resume()
    assert vm.irq_levels[1] is True and drain(vm) == [0x1E]


def test_a_full_keyboard_drops_whole_keys(vm, kbc):
    command(vm, 0x60, 0x13)                              # raw set 2, port off
    for _ in range(100):
        vm.context.input.key(KEY_PAUSE, True)
    command(vm, 0xAE)
    out = drain(vm)
    assert len(out) == 8 * (64 // 8) and out[:8] == list(set2_sequence(KEY_PAUSE, True))


def test_i8042_state_survives_save_restore_save(vm, kbc):
    command(vm, 0x60, 0x47)
    vm.port_write(0x60, 1, 0xED)
    vm.port_write(0x60, 1, 0x02)
    drain(vm)
    command(vm, 0xAD)
    vm.context.input.key(KEY_RIGHTCTRL, False)          # E0 F0 14 waits in the keyboard
    command(vm, 0xAE)
    assert vm.port_read(0x60, 1) == 0xE0                 # F0 taken by the translator, 14 out
    state = kbc.save_state()
    assert state["xlat_break"] is False and state["queue"] == [[0x9D, 0]]
    other_vm = FakeVm()
    other = I8042(other_vm.context)
    other.restore_state(state)
    other.resync_irq()
    assert other.save_state() == state
    assert other_vm.irq_levels[1] is True and drain(other_vm) == [0x9D]
    bad = dict(state, scancode_set=3)
    with pytest.raises(ValueError):
        other.restore_state(bad)


PORT_OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from((0x60, 0x64)), st.integers(0, 0xFF)),
    st.tuples(st.just("read"), st.sampled_from((0x60, 0x64)), st.just(0)),
    st.tuples(st.just("key"), st.integers(0, 0x300), st.booleans())), max_size=80)


@fuzz_settings(200)
@given(operations=PORT_OPS)
def test_i8042_fuzz_never_raises_and_stays_bounded(operations):
    vm = FakeVm()
    device = I8042(vm.context)
    for kind, first, second in operations:
        if kind == "write":
            vm.port_write(first, 1, second)
        elif kind == "read":
            assert 0 <= vm.port_read(first, 1) <= 0xFF
        elif kind == "key":
            device.key_event(first, second)
    state = device.save_state()
    other = I8042(FakeVm().context)
    other.restore_state(state)
    assert other.save_state() == state


# --- virtio-input --------------------------------------------------------------------------
EVENTS = 0x50000                # eventq buffers, one 8-byte event each


@pytest.fixture
def virtio_vm():
    vm = VirtioVm()
    yield vm
    vm.close()


def device_config(driver, select, subsel=0) -> bytes:
    driver.write(V.CAP_DEVICE_CFG, 0, 1, select)
    driver.write(V.CAP_DEVICE_CFG, 1, 1, subsel)
    size = driver.read(V.CAP_DEVICE_CFG, 2, 1)
    return bytes(driver.read(V.CAP_DEVICE_CFG, 8 + i, 1) for i in range(size))


def setup_queue(driver, index, base) -> Ring:
    """Queue INDEX enabled with its rings at BASE, BASE + 0x1000 and BASE + 0x2000."""
    driver.set_common(V.COMMON_Q_SELECT, 2, index)
    size = driver.common(V.COMMON_Q_SIZE, 2)
    for offset, address in ((V.COMMON_Q_DESCLO, base), (V.COMMON_Q_AVAILLO, base + 0x1000),
                            (V.COMMON_Q_USEDLO, base + 0x2000)):
        driver.set_common(offset, 4, address)
        driver.set_common(offset + 4, 4, 0)
    ring = Ring(driver.vm, base, base + 0x1000, base + 0x2000, size)
    driver.set_common(V.COMMON_Q_ENABLE, 2, 1)
    return ring


def start(vm, cls, buffers=16):
    """The device started as Linux's virtio_input starts it: eventq buffers
    posted before DRIVER_OK."""
    device = vm.pci.add(SLOT, 0, cls, {})
    driver = Driver(vm, device)
    assert driver.negotiate(D.F_VERSION_1) & D.STATUS_FEATURES_OK
    event_ring = setup_queue(driver, I.EVENTQ, 0x10000)
    setup_queue(driver, I.STATUSQ, 0x20000)
    for index in range(buffers):
        event_ring.offer([(EVENTS + 8 * index, 8, True)])
    assert not device.model.ready()
    driver.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                      D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)
    assert device.model.ready()
    return device, driver, event_ring


def events(vm, ring) -> list[tuple[int, int, int]]:
    out = []
    for head, length in ring.completed():
        assert length == 8
        out.append(struct.unpack("<HHi", vm.memory.read(EVENTS + 8 * head, 8)))
    return out


def test_virtio_input_is_a_modern_only_pci_device(virtio_vm):
    device = virtio_vm.pci.add(SLOT, 0, VirtioTabletPci, {})
    driver = Driver(virtio_vm, device)
    assert driver.cfg(R.VENDOR_ID, 4) == 0x1052 << 16 | 0x1AF4
    assert driver.cfg(R.REVISION_ID, 4) >> 8 == 0x098000 and driver.cfg(R.REVISION_ID, 1) == 1
    assert driver.cfg(R.BAR0, 4) == 0                    # no legacy registers
    assert driver.cfg(0x2E, 2) == 18                     # subsystem: virtio input


def test_config_pages_describe_keyboard_and_tablet(virtio_vm):
    tablet = virtio_vm.pci.add(SLOT, 0, VirtioTabletPci, {})
    driver = Driver(virtio_vm, tablet)
    assert device_config(driver, I.CFG_ID_NAME) == b"pyhyve Virtio Tablet"
    assert device_config(driver, I.CFG_ID_SERIAL) == b""
    assert device_config(driver, I.CFG_ID_DEVIDS) == struct.pack("<HHHH", 6, 0x0627, 3, 2)
    assert device_config(driver, I.CFG_PROP_BITS) == b""
    keys = device_config(driver, I.CFG_EV_BITS, I.EV_KEY)
    assert [code for code in range(8 * len(keys)) if keys[code // 8] >> (code % 8) & 1] == \
        [I.BTN_LEFT, I.BTN_RIGHT, I.BTN_MIDDLE]
    assert device_config(driver, I.CFG_EV_BITS, I.EV_ABS) == b"\x03"
    assert device_config(driver, I.CFG_EV_BITS, I.EV_REL) == b"\x00\x01"     # REL_WHEEL
    assert device_config(driver, I.CFG_EV_BITS, I.EV_SYN) == b""
    assert device_config(driver, I.CFG_ABS_INFO, I.ABS_Y) == struct.pack("<5I", 0, 0x7FFF,
                                                                         0, 0, 0)
    assert device_config(driver, I.CFG_ABS_INFO, 5) == b""
    driver.write(V.CAP_DEVICE_CFG, 0, 2, I.CFG_ABS_INFO | I.ABS_X << 8)     # both at once
    assert driver.read(V.CAP_DEVICE_CFG, 2, 1) == 20
    virtio_vm.pci.close()
    driver = Driver(virtio_vm, virtio_vm.pci.add(SLOT, 0, VirtioKeyboardPci, {}))
    assert device_config(driver, I.CFG_ID_NAME) == b"pyhyve Virtio Keyboard"
    assert device_config(driver, I.CFG_EV_BITS, I.EV_KEY)[KEY_A // 8] >> (KEY_A % 8) & 1
    assert device_config(driver, I.CFG_EV_BITS, I.EV_LED) == b"\x07"
    assert device_config(driver, I.CFG_EV_BITS, I.EV_REP) == b"\x00"
    assert device_config(driver, I.CFG_EV_BITS, I.EV_ABS) == b""


def test_virtio_keyboard_sends_keys_and_takes_leds(virtio_vm):
    device, driver, ring = start(virtio_vm, VirtioKeyboardPci)
    assert virtio_vm.context.input.key(KEY_A, True)
    virtio_vm.context.input.key(KEY_A, False)
    assert events(virtio_vm, ring) == [(I.EV_KEY, KEY_A, 1), (I.EV_SYN, 0, 0),
                                       (I.EV_KEY, KEY_A, 0), (I.EV_SYN, 0, 0)]
    virtio_vm.context.input.key(KEY_A, True, sync=False)     # one frame: QMP's qcode keys
    virtio_vm.context.input.key(KEY_A, False, sync=False)
    assert events(virtio_vm, ring) == []
    virtio_vm.context.input.key_sync()
    assert events(virtio_vm, ring) == [(I.EV_KEY, KEY_A, 1), (I.EV_KEY, KEY_A, 0),
                                       (I.EV_SYN, 0, 0)]
    virtio_vm.memory.write(BUFFERS, struct.pack("<HHi", I.EV_LED, I.LED_CAPSL, 1) +
                           struct.pack("<HHi", I.EV_LED, I.LED_NUML, 1))
    status = Ring(virtio_vm, 0x20000, 0x21000, 0x22000, driver.common(V.COMMON_Q_SIZE, 2))
    status.offer([(BUFFERS, 16, False)])
    driver.notify(I.STATUSQ)
    assert status.completed() and device.model.leds == 0b011


def test_virtio_tablet_moves_clicks_and_scrolls(virtio_vm):
    device, driver, ring = start(virtio_vm, VirtioTabletPci)
    virtio_vm.context.input.pointer(0x100, 0x7FFF, BUTTON_LEFT)
    assert events(virtio_vm, ring) == [(I.EV_ABS, I.ABS_X, 0x100), (I.EV_ABS, I.ABS_Y, 0x7FFF),
                                       (I.EV_KEY, I.BTN_LEFT, 1), (I.EV_SYN, 0, 0)]
    virtio_vm.context.input.pointer(5, 6, BUTTON_RIGHT | WHEEL_UP)
    assert events(virtio_vm, ring)[2:] == [(I.EV_KEY, I.BTN_LEFT, 0),
                                           (I.EV_KEY, I.BTN_RIGHT, 1),
                                           (I.EV_REL, I.REL_WHEEL, 1), (I.EV_SYN, 0, 0)]


def test_events_wait_for_buffers_and_survive_a_snapshot(virtio_vm):
    device, driver, ring = start(virtio_vm, VirtioKeyboardPci, buffers=1)
    virtio_vm.context.input.key(KEY_A, True)
    virtio_vm.context.input.key(KEY_ENTER, True)
    assert events(virtio_vm, ring) == [(I.EV_KEY, KEY_A, 1)]
    device_config(driver, I.CFG_ID_NAME)
    state = device.save_state()
    assert state["virtio"]["device"]["pending"] == [[0, 0, 0], [1, KEY_ENTER, 1], [0, 0, 0]]

    other_vm = VirtioVm()
    try:
        other = other_vm.pci.add(SLOT, 0, VirtioKeyboardPci, {})
        other_vm.memory.write(0, virtio_vm.memory.read(0, 0x60000))
        other.restore_state(state)
        assert other.save_state() == state
        assert other.model.ready() and other.model.config[:3] == bytes((1, 0, 22))
        other_driver = Driver(other_vm, other)
        ring.memory = other_vm.memory
        ring.offer([(EVENTS + 8, 8, True)])
        other_driver.notify(I.EVENTQ)
        assert events(other_vm, ring) == [(I.EV_SYN, 0, 0)]
    finally:
        other_vm.close()


def test_router_prefers_a_started_virtio_keyboard_over_the_i8042(virtio_vm):
    """The i8042 is ready from the start; DRIVER_OK puts the virtio keyboard
    before it (QEMU activates its handler)."""
    kbc = I8042(virtio_vm.context)
    device = virtio_vm.pci.add(SLOT, 0, VirtioKeyboardPci, {})
    virtio_vm.context.input.key(KEY_A, True)
    assert drain(virtio_vm) == [0x1E]                    # the virtio driver is not there yet
    virtio_vm.pci.close()
    device, driver, ring = start(virtio_vm, VirtioKeyboardPci)
    virtio_vm.context.input.key(KEY_A, True)
    assert drain(virtio_vm) == [] and events(virtio_vm, ring)[0] == (I.EV_KEY, KEY_A, 1)
    driver.set_common(V.COMMON_STATUS, 1, 0)             # the driver resets it: the i8042
    virtio_vm.context.input.key(KEY_A, False)
    assert drain(virtio_vm) == [0x9E]
    kbc.close()


# --- QMP's input-send-event events, as pyhyve.inputevents plays them -----------------------
class Sink:
    def __init__(self):
        self.keys, self.moves = [], []

    def ready(self):
        return True

    def key_event(self, code, down, sync):
        self.keys.append((code, down) if sync else (code, down, "more"))

    def key_sync(self):
        self.keys.append("sync")

    def pointer_event(self, x, y, buttons):
        self.moves.append((x, y, buttons))


def key(down, kind, data):
    return {"type": "key", "data": {"down": down, "key": {"type": kind, "data": data}}}


def test_input_send_event_lists_become_router_calls():
    router, sink = InputRouter(), Sink()
    router.add_keyboard(sink)
    router.add_pointer(sink)
    inputevents.send(router, [key(True, "qcode", "a"), key(False, "number", 0x1E),
                              key(True, "number", 0x9D), key(True, "qcode", "ctrl_r"),
                              key(True, "qcode", "0"), key(True, "qcode", "f10"),
                              key(True, "qcode", "m")])
    # as QEMU 7.2: a key number ends the input frame, qcode keys wait for the command's end
    assert sink.keys == [(KEY_A, True, "more"), (KEY_A, False), (KEY_RIGHTCTRL, True),
                         (KEY_RIGHTCTRL, True, "more"), (11, True, "more"), (68, True, "more"),
                         (50, True, "more"), "sync"]
    inputevents.send(router, [{"type": "abs", "data": {"axis": "x", "value": 100}},
                              {"type": "btn", "data": {"down": True, "button": "left"}},
                              {"type": "abs", "data": {"axis": "y", "value": 0x9000}}])
    inputevents.send(router, [{"type": "btn", "data": {"down": True, "button": "wheel-up"}}])
    inputevents.send(router, [{"type": "btn", "data": {"down": False, "button": "left"}}])
    assert sink.moves == [(100, 0x7FFF, BUTTON_LEFT), (100, 0x7FFF, BUTTON_LEFT | WHEEL_UP),
                          (100, 0x7FFF, WHEEL_UP)]


@pytest.mark.parametrize("events", [
    [], "keys", [{"type": "key"}], [key(True, "qcode", "nosuch")], [key(1, "qcode", "a")],
    [key(True, "number", 0x300)], [{"type": "rel", "data": {"axis": "x", "value": 1}}],
    [{"type": "btn", "data": {"down": True, "button": "side"}}],
    [{"type": "abs", "data": {"axis": "z", "value": 1}}],
    [key(True, "qcode", "a"), {"type": "abs", "data": {"axis": "x", "value": "1"}}]])
def test_bad_event_lists_send_nothing(events):
    router, sink = InputRouter(), Sink()
    router.add_keyboard(sink)
    with pytest.raises(inputevents.InputEventError):
        inputevents.send(router, events)
    assert sink.keys == []
