"""A USB HID tablet (bhyve's usb_mouse, QEMU's usb-tablet): a high-speed USB 2.0
device with one interface, HID class, whose interrupt IN endpoint 1 sends a
6-byte absolute report: buttons (left, right, middle), X and Y from 0 to
0x7FFF (little-endian), and a wheel step (-127..127).

The device answers the standard requests a host's enumeration makes
(descriptors, configuration, interface, status, features) and HID's class
requests (report descriptor, SET_IDLE, SET_PROTOCOL, GET_REPORT); anything
else stalls.  It is a pointer sink of the VM's input router.  The interrupt
endpoint is polled, not pushed, so reports wait in a queue (16, as QEMU's):
moves coalesce into the newest report and wheel steps add up while the
buttons stay the same, and a button change starts a new report, so that a
click made between two polls reaches the guest as a press and a release.

The controller calls control(), polled(), take_report() and has_report()
with its lock held; pointer_event() comes from the router's callers and
takes the same lock (given at construction) before changing the report, then
asks the controller (`wake`) to run the endpoint.  The first time the guest
polls the tablet (its interrupt endpoint, or GET_REPORT), the tablet tells
the router (`activate`, which takes only the router's lock), so that it
takes pointer events before devices made ready earlier.  As QEMU's tablet,
it does so once in its life: a reset does not make it tell again.
"""

import struct

from ..inputroute import BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT, WHEEL_DOWN, WHEEL_UP
from ..lifecycle import StateError, expect_keys, flag, uint

VENDOR, PRODUCT = 0x0627, 0x0001        # QEMU's tablet IDs: what guests' quirk tables know
MANUFACTURER, PRODUCT_NAME, SERIAL = "pyhyve", "USB Tablet", "1"
MAX_PACKET_0 = 64                       # high speed's EP0
REPORT_SIZE = 6
INTERRUPT_IN = 0x81                     # endpoint 1, IN
INTERRUPT_MAX_PACKET = 8

# bmRequestType and bRequest of what the device answers (USB 2.0 9.4, HID 1.11 7.2)
GET_STATUS, CLEAR_FEATURE, SET_FEATURE, SET_ADDRESS = 0, 1, 3, 5
GET_DESCRIPTOR, GET_CONFIGURATION, SET_CONFIGURATION = 6, 8, 9
GET_INTERFACE, SET_INTERFACE = 10, 11
HID_GET_REPORT, HID_GET_IDLE, HID_GET_PROTOCOL = 0x01, 0x02, 0x03
HID_SET_IDLE, HID_SET_PROTOCOL = 0x0A, 0x0B
DIR_IN = 0x80
TYPE_CLASS = 0x20
RECIPIENT_INTERFACE = 0x01
DT_DEVICE, DT_CONFIG, DT_STRING, DT_INTERFACE, DT_ENDPOINT = 1, 2, 3, 4, 5
DT_HID, DT_REPORT = 0x21, 0x22

# Generic Desktop pointer: 3 buttons and 5 bits of padding, absolute X and Y
# (16 bits, 0..0x7FFF), a relative wheel (8 bits)
REPORT_DESCRIPTOR = bytes((
    0x05, 0x01, 0x09, 0x02, 0xA1, 0x01,             # Generic Desktop, Mouse, Application
    0x09, 0x01, 0xA1, 0x00,                         # Pointer, Physical
    0x05, 0x09, 0x19, 0x01, 0x29, 0x03,             # Buttons 1 to 3
    0x15, 0x00, 0x25, 0x01, 0x95, 0x03, 0x75, 0x01, 0x81, 0x02,   # 3 x 1 bit, Data Var Abs
    0x95, 0x01, 0x75, 0x05, 0x81, 0x01,             # 5 bits of padding, Constant
    0x05, 0x01, 0x09, 0x30, 0x09, 0x31,             # X, Y
    0x15, 0x00, 0x26, 0xFF, 0x7F, 0x35, 0x00, 0x46, 0xFF, 0x7F,   # 0..0x7FFF
    0x75, 0x10, 0x95, 0x02, 0x81, 0x02,             # 2 x 16 bits, Data Var Abs
    0x09, 0x38, 0x15, 0x81, 0x25, 0x7F, 0x35, 0x00, 0x45, 0x00,   # Wheel, -127..127
    0x75, 0x08, 0x95, 0x01, 0x81, 0x06,             # 1 x 8 bits, Data Var Rel
    0xC0, 0xC0,                                     # End Collection x 2
))

DEVICE_DESCRIPTOR = struct.pack("<BBHBBBBHHHBBBB", 18, DT_DEVICE, 0x0200, 0, 0, 0,
                                MAX_PACKET_0, VENDOR, PRODUCT, 0x0100, 1, 2, 3, 1)
_INTERFACE = struct.pack("<BBBBBBBBB", 9, DT_INTERFACE, 0, 0, 1, 3, 0, 0, 0)     # HID
_HID = struct.pack("<BBHBBBH", 9, DT_HID, 0x0111, 0, 1, DT_REPORT, len(REPORT_DESCRIPTOR))
_ENDPOINT = struct.pack("<BBBBHB", 7, DT_ENDPOINT, INTERRUPT_IN, 3, INTERRUPT_MAX_PACKET,
                        4)     # interrupt, every 2^(4-1) microframes: 1 ms
_CONFIG_BODY = _INTERFACE + _HID + _ENDPOINT
CONFIG_DESCRIPTOR = struct.pack("<BBHBBBBB", 9, DT_CONFIG, 9 + len(_CONFIG_BODY), 1, 1, 0,
                                0x80, 50) + _CONFIG_BODY        # no remote wakeup, 100 mA
STRINGS = {1: MANUFACTURER, 2: PRODUCT_NAME, 3: SERIAL}
LANGUAGE_EN_US = 0x0409

_BUTTON_BITS = ((BUTTON_LEFT, 0x01), (BUTTON_RIGHT, 0x02), (BUTTON_MIDDLE, 0x04))
QUEUE_LENGTH = 16           # reports waiting for the host; then moves overwrite the newest


def _string_descriptor(index: int) -> bytes | None:
    if index == 0:
        body = struct.pack("<H", LANGUAGE_EN_US)
    elif index in STRINGS:
        body = STRINGS[index].encode("utf-16-le")
    else:
        return None
    return bytes((2 + len(body), DT_STRING)) + body


class UsbTablet:
    """The tablet; `wake()` is called (lock held) when a report is waiting."""

    name = "tablet"
    STATE = ("configuration", "protocol", "idle", "buttons", "x", "y", "queue",
             "router_buttons", "activated")

    def __init__(self, lock, wake, activate):
        self._lock = lock
        self._wake = wake
        self._activate = activate
        self.activated = False      # polled once: the router knows (for good, as in QEMU)
        self.reset()
        self.router_buttons = 0     # the router's mask last seen, for wheel edges

    def reset(self) -> None:
        """A USB bus reset: unconfigured, report protocol, nothing to send."""
        self.configuration = 0
        self.protocol = 1           # report protocol
        self.idle = 0
        self.buttons = self.x = self.y = 0
        self.queue: list[list[int]] = []    # [buttons, x, y, wheel] reports not yet taken

    # --- the router's side ----------------------------------------------------------------
    def ready(self) -> bool:
        with self._lock:
            return self.configuration != 0

    def pointer_event(self, x: int, y: int, buttons: int) -> None:
        with self._lock:
            changed, self.router_buttons = self.router_buttons ^ buttons, buttons
            self.x, self.y = x, y
            self.buttons = sum(bit for mask, bit in _BUTTON_BITS if buttons & mask)
            wheel = sum(step for mask, step in ((WHEEL_UP, 1), (WHEEL_DOWN, -1))
                        if changed & mask and buttons & mask)
            newest = self.queue[-1] if self.queue else None
            if newest is not None and (newest[0] == self.buttons or
                                       len(self.queue) == QUEUE_LENGTH):
                newest[:] = [self.buttons, x, y, max(-127, min(127, newest[3] + wheel))]
            else:
                self.queue.append([self.buttons, x, y, wheel])
            if self.configuration:
                self._wake()

    # --- the controller's side -------------------------------------------------------------
    def polled(self) -> None:
        """The guest asked for a report: the first time, the router hears
        that the guest's driver is ready."""
        if not self.activated:
            self.activated = True
            self._activate(self)

    def report(self) -> bytes:
        """The pointer as it is now (GET_REPORT)."""
        self.polled()
        return struct.pack("<BHHb", self.buttons, self.x, self.y, 0)

    def has_report(self) -> bool:
        return bool(self.queue) and self.configuration != 0

    def take_report(self) -> bytes:
        """The oldest waiting report, for the interrupt endpoint."""
        return struct.pack("<BHHb", *self.queue.pop(0))

    def control(self, request_type: int, request: int, value: int, index: int,
                length: int, data: bytes) -> bytes | None:
        """One control transfer; the data stage IN (at most LENGTH bytes), or
        b"" for one without; None stalls."""
        answer = self._answer(request_type, request, value, index, data)
        return None if answer is None else answer[:length]

    def _answer(self, request_type: int, request: int, value: int, index: int,
                data: bytes) -> bytes | None:
        kind, low = value >> 8, value & 0xFF
        if request_type == DIR_IN and request == GET_DESCRIPTOR:
            if kind == DT_DEVICE:
                return DEVICE_DESCRIPTOR
            if kind == DT_CONFIG and low == 0:
                return CONFIG_DESCRIPTOR
            if kind == DT_STRING:
                return _string_descriptor(low)
            return None
        if request_type == DIR_IN | RECIPIENT_INTERFACE and request == GET_DESCRIPTOR:
            if kind == DT_REPORT:
                return REPORT_DESCRIPTOR
            if kind == DT_HID:
                return _HID
            return None
        if request_type & DIR_IN and request == GET_STATUS:
            return bytes(2)
        if request_type == 0 and request == SET_ADDRESS:
            return b""
        if request_type == DIR_IN and request == GET_CONFIGURATION:
            return bytes((self.configuration,))
        if request_type == 0 and request == SET_CONFIGURATION and low in (0, 1):
            self.configuration = low
            return b""
        if request_type == DIR_IN | RECIPIENT_INTERFACE and request == GET_INTERFACE:
            return b"\0"
        if request_type == RECIPIENT_INTERFACE and request == SET_INTERFACE and value == 0:
            return b""
        if request_type & ~0x03 == 0 and request in (CLEAR_FEATURE, SET_FEATURE):
            return b""          # remote wakeup, endpoint halt: nothing to keep
        class_in = DIR_IN | TYPE_CLASS | RECIPIENT_INTERFACE
        class_out = TYPE_CLASS | RECIPIENT_INTERFACE
        if request_type == class_in and request == HID_GET_REPORT:
            return self.report()
        if request_type == class_in and request == HID_GET_IDLE:
            return bytes((self.idle,))
        if request_type == class_in and request == HID_GET_PROTOCOL:
            return bytes((self.protocol,))
        if request_type == class_out and request == HID_SET_IDLE:
            self.idle = value >> 8
            return b""
        if request_type == class_out and request == HID_SET_PROTOCOL and value in (0, 1):
            self.protocol = value
            return b""
        return None

    # --- snapshots (the controller's lock held) ------------------------------------------
    def save_state(self) -> dict:
        return {"configuration": self.configuration, "protocol": self.protocol,
                "idle": self.idle, "buttons": self.buttons, "x": self.x, "y": self.y,
                "queue": [list(report) for report in self.queue],
                "router_buttons": self.router_buttons, "activated": self.activated}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, self.STATE, "usb tablet")
        values = {key: uint(state[key], limit, f"usb tablet {key}") for key, limit in (
            ("configuration", 1), ("protocol", 1), ("idle", 0xFF), ("buttons", 0x07),
            ("x", 0x7FFF), ("y", 0x7FFF), ("router_buttons", 0xFF))}
        queue = state["queue"]
        if not isinstance(queue, list) or len(queue) > QUEUE_LENGTH:
            raise StateError(f"usb tablet queue is not a list of up to {QUEUE_LENGTH} reports")
        reports = []
        for report in queue:
            if not isinstance(report, list) or len(report) != 4:
                raise StateError("usb tablet report is not [buttons, x, y, wheel]")
            buttons, x, y = (uint(value, limit, "usb tablet report")
                             for value, limit in zip(report, (0x07, 0x7FFF, 0x7FFF)))
            wheel = report[3]
            if not isinstance(wheel, int) or isinstance(wheel, bool) or \
                    not -127 <= wheel <= 127:
                raise StateError(f"usb tablet wheel is {wheel!r}, not -127..127")
            reports.append([buttons, x, y, wheel])
        activated = flag(state["activated"], "usb tablet activated")
        for key, value in values.items():
            setattr(self, key, value)
        self.queue = reports
        self.activated = activated
