"""`virtio-keyboard` and `virtio-tablet`: input devices (virtio 1.2, 5.8), as QEMU's.

    -s SLOT,virtio-keyboard
    -s SLOT,virtio-tablet

Each is a sink of the VM's input router (pyhyve.inputroute): the keyboard
takes keys, the tablet absolute pointer moves.  Both say what they are
through the config space the driver selects pages of (ID_NAME, ID_SERIAL,
ID_DEVIDS, PROP_BITS, EV_BITS per event type, ABS_INFO per axis) and send
evdev events (struct virtio_input_event: type, code, value) one per buffer
of the eventq, each report closed by SYN_REPORT.  The statusq brings the
guest's events back: LED state for the keyboard, kept and saved.

The names are pyhyve's own ("pyhyve Virtio Keyboard"; QEMU's say QEMU),
since a guest shows them to its user; the bus, vendor, product and version
IDs are QEMU's, which is what guests' quirk tables match.  The tablet's
wheel is REL_WHEEL, as in QEMU's default wheel-axis mode.

Events wait in the model while the driver has posted no buffers, up to
PENDING_LIMIT; a report that does not fit whole is dropped, so the guest
never sees half of one.  They survive a snapshot.

Threading: the router's callers (the VNC server, QMP) take the transport's
lock to queue events and then kick the eventq, which the transport runs
unless the VM is paused or the driver has not started the device; it runs
the queue again when that changes.
"""

import struct
from collections import deque

from ..inputroute import BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT, POINTER_MAX, WHEEL_DOWN, \
    WHEEL_UP
from ..lifecycle import StateError, expect_keys, uint
from .device import Transport, VirtioDevice
from .queue import Chain, SplitQueue

VIRTIO_ID_INPUT = 18
EVENTQ, STATUSQ = 0, 1
QUEUE_SIZE = 64
PENDING_LIMIT = 256             # events held while the driver posts no buffers

# config selects (5.8.5)
CFG_UNSET, CFG_ID_NAME, CFG_ID_SERIAL, CFG_ID_DEVIDS = 0x00, 0x01, 0x02, 0x03
CFG_PROP_BITS, CFG_EV_BITS, CFG_ABS_INFO = 0x10, 0x11, 0x12
CONFIG_SIZE = 8 + 128           # select, subsel, size, reserved[5], then the union

# evdev (linux/input-event-codes.h)
EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_LED, EV_REP = 0x00, 0x01, 0x02, 0x03, 0x11, 0x14
SYN_REPORT = 0
REL_WHEEL = 0x08
ABS_X, ABS_Y = 0x00, 0x01
LED_NUML, LED_CAPSL, LED_SCROLLL = 0x00, 0x01, 0x02
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
KEYBOARD_KEYS = range(1, 0x100)  # the key codes below the buttons (BTN_MISC, 0x100)
BUS_VIRTUAL = 0x06
QEMU_VENDOR = 0x0627
PRODUCT_KEYBOARD, PRODUCT_TABLET = 0x0001, 0x0003

_EVENT = struct.Struct("<HHi")      # struct virtio_input_event: type, code, value
_ABS_INFO = struct.Struct("<IIIII")  # min, max, fuzz, flat, res
_DEVIDS = struct.Struct("<HHHH")    # bustype, vendor, product, version

# the router's button bits and the tablet's button codes
_BUTTONS = ((BUTTON_LEFT, BTN_LEFT), (BUTTON_RIGHT, BTN_RIGHT), (BUTTON_MIDDLE, BTN_MIDDLE))


def _bitmap(codes) -> bytes:
    """An evdev bitmap with the given bits set, cut after its last non-zero byte."""
    bitmap = bytearray(128)
    for code in codes:
        bitmap[code // 8] |= 1 << (code % 8)
    return bytes(bitmap).rstrip(b"\0")


class VirtioInput(VirtioDevice):
    """What the keyboard and the tablet share: the config pages, the event queue
    and the statusq; subclasses say what they are (NAME, PRODUCT, EVENT_TYPES)."""

    device_type = VIRTIO_ID_INPUT
    NAME = ""
    PRODUCT = 0
    VERSION = 1                             # QEMU 7.2's: 2 for the tablet
    EVENT_TYPES: dict[int, bytes] = {}      # event type: its bitmap of codes
    OWN_STATE = ("", 0)                     # the subclass's field a snapshot keeps, its limit

    def __init__(self, transport: Transport, options: dict[str, str], router):
        super().__init__(transport, [QUEUE_SIZE, QUEUE_SIZE], 0, CONFIG_SIZE)
        self.router = router
        self._pending: deque[tuple[int, int, int]] = deque()
        self._active = False                # the driver set DRIVER_OK
        self._select(CFG_UNSET, 0)

    # --- config space ---------------------------------------------------------------------
    def config_write(self, offset: int, size: int, value: int) -> None:
        """The driver writes select and subsel (bytes 0 and 1); the page follows."""
        if offset > 1:
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        select_subsel = bytearray(self.config[0:2])
        for index, byte in enumerate(data[:2 - offset]):
            select_subsel[offset + index] = byte
        self._select(*select_subsel)

    def _select(self, select: int, subsel: int) -> None:
        page = self._page(select, subsel)
        self.config[:] = bytes((select, subsel, len(page))) + bytes(5) + page.ljust(128, b"\0")

    def _page(self, select: int, subsel: int) -> bytes:
        if select == CFG_ID_NAME and subsel == 0:
            return self.NAME.encode()
        if select == CFG_ID_DEVIDS and subsel == 0:
            return _DEVIDS.pack(BUS_VIRTUAL, QEMU_VENDOR, self.PRODUCT, self.VERSION)
        if select == CFG_EV_BITS:
            return self.EVENT_TYPES.get(subsel, b"")
        if select == CFG_ABS_INFO and EV_ABS in self.EVENT_TYPES and subsel in (ABS_X, ABS_Y):
            return _ABS_INFO.pack(0, POINTER_MAX, 0, 0, 0)
        return b""      # no serial, no properties, nothing else

    # --- events to the guest -----------------------------------------------------------------
    def ready(self) -> bool:
        with self.transport.lock:
            return self._active

    def _report(self, events: list[tuple[int, int, int]], sync: bool = True) -> None:
        """Queue EVENTS and a SYN_REPORT as one report, then run the eventq;
        without SYNC, queue them only: a later report ends their frame."""
        if sync:
            events.append((EV_SYN, SYN_REPORT, 0))
        with self.transport.lock:
            if len(self._pending) + len(events) > PENDING_LIMIT:
                self.transport.warn_once("pending-full", "input events dropped: the driver "
                                         "takes none")
                return
            self._pending.extend(events)
        if sync:
            self.transport.kick(EVENTQ)

    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        if index == STATUSQ:
            super().queue_notified(index, queue)
            return
        while self._pending and (chain := queue.pop()) is not None:
            written = chain.write(self.transport.memory, _EVENT.pack(*self._pending[0]))
            if written == _EVENT.size:
                self._pending.popleft()
            else:
                self.transport.warn_once("short-buffer", "eventq buffer of %d bytes holds "
                                         "no event", written)
            queue.push(chain.head, written)
        self.transport.interrupt_queue(EVENTQ)

    def handle_request(self, index: int, chain: Chain) -> int:
        """A statusq buffer: events the guest sends the device."""
        data = chain.read_all(self.transport.memory)
        for offset in range(0, len(data) - _EVENT.size + 1, _EVENT.size):
            self.status_event(*_EVENT.unpack_from(data, offset))
        return 0

    def status_event(self, kind: int, code: int, value: int) -> None:
        """One event from the guest; those a device has no use for are ignored."""

    # --- lifecycle -----------------------------------------------------------------------------
    def activate(self, features: int) -> None:
        self._active = True
        self.router.activate(self)

    def reset(self) -> None:
        self._active = False
        self._pending.clear()
        self._select(CFG_UNSET, 0)

    def close(self) -> None:
        self.router.remove(self)

    def save_state(self) -> dict:
        field = self.OWN_STATE[0]
        return {"select": self.config[0], "subsel": self.config[1],
                "pending": [list(event) for event in self._pending],
                field: getattr(self, field)}

    def restore_state(self, state: dict) -> None:
        field, limit = self.OWN_STATE
        expect_keys(state, ("select", "subsel", "pending", field), self.name)
        own = uint(state[field], limit, f"{self.name} {field}")
        select = uint(state["select"], 0xFF, f"{self.name} select")
        subsel = uint(state["subsel"], 0xFF, f"{self.name} subsel")
        pending = state["pending"]
        if not isinstance(pending, list) or len(pending) > PENDING_LIMIT or not all(
                isinstance(event, list) and len(event) == 3 for event in pending):
            raise StateError(f"{self.name} pending must be at most {PENDING_LIMIT} "
                             "[type, code, value] events")
        events = [(uint(kind, 0xFFFF, f"{self.name} event type"),
                   uint(code, 0xFFFF, f"{self.name} event code"),
                   _signed32(value, f"{self.name} event value")) for kind, code, value in pending]
        self._select(select, subsel)
        self._pending = deque(events)
        setattr(self, field, own)


def _signed32(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or \
            not -(1 << 31) <= value < (1 << 31):
        raise StateError(f"{what} is {value!r}, not a 32-bit signed integer")
    return value


class VirtioKeyboard(VirtioInput):
    """virtio keyboard (no options): keys from the VM's input router; the guest's
    LED state comes back on the statusq"""

    name = "virtio-keyboard"
    NAME = "pyhyve Virtio Keyboard"
    PRODUCT = PRODUCT_KEYBOARD
    OWN_STATE = ("leds", 0x07)
    EVENT_TYPES = {EV_KEY: _bitmap(KEYBOARD_KEYS), EV_REP: b"\0",
                   EV_LED: _bitmap((LED_NUML, LED_CAPSL, LED_SCROLLL))}

    def __init__(self, transport: Transport, options: dict[str, str], router):
        super().__init__(transport, options, router)
        self.leds = 0                   # bit N: LED N is on
        router.add_keyboard(self)

    def key_event(self, code: int, down: bool, sync: bool = True) -> None:
        if code in KEYBOARD_KEYS:
            self._report([(EV_KEY, code, int(down))], sync)

    def key_sync(self) -> None:
        self._report([])

    def status_event(self, kind: int, code: int, value: int) -> None:
        if kind == EV_LED and code <= LED_SCROLLL:
            self.leds = self.leds | (1 << code) if value else self.leds & ~(1 << code)



class VirtioTablet(VirtioInput):
    """virtio tablet (no options): absolute pointer moves, three buttons and a
    wheel from the VM's input router"""

    name = "virtio-tablet"
    NAME = "pyhyve Virtio Tablet"
    PRODUCT = PRODUCT_TABLET
    VERSION = 2
    OWN_STATE = ("buttons", 0xFF)
    EVENT_TYPES = {EV_KEY: _bitmap(code for _, code in _BUTTONS),
                   EV_REL: _bitmap((REL_WHEEL,)), EV_ABS: _bitmap((ABS_X, ABS_Y))}

    def __init__(self, transport: Transport, options: dict[str, str], router):
        super().__init__(transport, options, router)
        self.buttons = 0                # the router's button mask last reported
        router.add_pointer(self)

    def pointer_event(self, x: int, y: int, buttons: int) -> None:
        """A move, with a button event for each button that changed and a wheel
        step for each wheel bit that came on."""
        events = [(EV_ABS, ABS_X, x), (EV_ABS, ABS_Y, y)]
        with self.transport.lock:
            changed, self.buttons = self.buttons ^ buttons, buttons
        for bit, code in _BUTTONS:
            if changed & bit:
                events.append((EV_KEY, code, int(bool(buttons & bit))))
        for bit, step in ((WHEEL_UP, 1), (WHEEL_DOWN, -1)):
            if changed & bit and buttons & bit:
                events.append((EV_REL, REL_WHEEL, step))
        self._report(events)

