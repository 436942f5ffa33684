"""Where a console's keyboard and pointer events go.

A frontend (the VNC server, a test) reports what the user did; input devices
(the i8042's keyboard, a USB or virtio tablet, a virtio keyboard) take it to
the guest.  Keys are Linux input event codes (KEY_A is 30), the one numbering
every device model translates from: PS/2 scancodes, USB HID usages and
virtio-input's own events.  Pointer positions are absolute, 0 to POINTER_MAX
on each axis across the screen, so they need no knowledge of the display mode.

Like QEMU, events go to one device of each kind, so a guest that drives a
virtio keyboard gets each key once, not twice: the first ready sink
(`ready()`) in an order where each sink whose guest driver became ready
(`activate()`: a virtio driver's DRIVER_OK, the first poll of a USB tablet)
moves to the front and new sinks join at the back; with none ready, the
first.  The order is not in snapshots: a restored VM starts from the order
its devices restore in.

Threading: frontends call key() and pointer() from their own threads; sinks
must take events from any thread.
"""

import threading

POINTER_MAX = 0x7FFF

BUTTON_LEFT = 1 << 0            # RFB's button mask, which pointer() takes as it is
BUTTON_MIDDLE = 1 << 1
BUTTON_RIGHT = 1 << 2
WHEEL_UP = 1 << 3
WHEEL_DOWN = 1 << 4


class KeyboardSink:
    """What a keyboard gives the router (an interface: i8042, virtio-input)."""

    def ready(self) -> bool: ...
    # SYNC False: more keys of the same input frame follow, then key_sync()
    # (virtio-input reports a frame's keys before one SYN_REPORT; the i8042
    # has no frames and ignores it)
    def key_event(self, code: int, down: bool, sync: bool) -> None: ...
    def key_sync(self) -> None: ...


class PointerSink:
    """What a pointer gives the router (an interface: virtio-input, the USB tablet)."""

    def ready(self) -> bool: ...
    def pointer_event(self, x: int, y: int, buttons: int) -> None: ...


def _choose(sinks: list):
    for sink in sinks:
        if sink.ready():
            return sink
    return sinks[0] if sinks else None


class InputRouter:
    """The VM's keyboards and pointers, and the choice among them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._keyboards: list[KeyboardSink] = []
        self._pointers: list[PointerSink] = []
        self._pointer_state = (0, 0, 0)   # the last pointer() call's (x, y, buttons)
        self._unsynced = None             # the keyboard whose frame key_sync() ends

    def add_keyboard(self, sink: KeyboardSink) -> None:
        with self._lock:
            self._keyboards.append(sink)

    def add_pointer(self, sink: PointerSink) -> None:
        with self._lock:
            self._pointers.append(sink)

    def activate(self, sink) -> None:
        """SINK's driver just became ready: it takes events before the others
        (QEMU's qemu_input_handler_activate)."""
        with self._lock:
            for sinks in (self._keyboards, self._pointers):
                if sink in sinks:
                    sinks.remove(sink)
                    sinks.insert(0, sink)

    def remove(self, sink) -> None:
        """A device unplugged or closed stops receiving events."""
        with self._lock:
            for sinks in (self._keyboards, self._pointers):
                if sink in sinks:
                    sinks.remove(sink)

    def key(self, code: int, down: bool, sync: bool = True) -> bool:
        """Press or release key CODE, ending the input frame unless SYNC is
        False (then key_sync() ends it, as QEMU's QMP sends a command's
        qcode keys); False when the VM has no keyboard."""
        with self._lock:
            sink = _choose(self._keyboards)
            unsynced, self._unsynced = self._unsynced, (None if sync else sink)
        if sink is None:
            return False
        if unsynced is not None and unsynced is not sink:
            unsynced.key_sync()
        sink.key_event(code, down, sync)
        return True

    def key_sync(self) -> None:
        """End the input frame of keys sent with sync=False."""
        with self._lock:
            unsynced, self._unsynced = self._unsynced, None
        if unsynced is not None:
            unsynced.key_sync()

    def pointer(self, x: int, y: int, buttons: int) -> bool:
        """Move the pointer to (X, Y) (clamped to 0..POINTER_MAX) with BUTTONS
        held; False when the VM has no absolute pointer."""
        x, y = min(max(x, 0), POINTER_MAX), min(max(y, 0), POINTER_MAX)
        with self._lock:
            self._pointer_state = (x, y, buttons)
            sink = _choose(self._pointers)
        if sink is None:
            return False
        sink.pointer_event(x, y, buttons)
        return True

    def pointer_state(self) -> tuple[int, int, int]:
        """(x, y, buttons) as the last pointer() left them: a frontend that
        changes one of them (QMP's input-send-event) keeps the others."""
        with self._lock:
            return self._pointer_state
