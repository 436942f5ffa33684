"""QEMU's InputEvent list (QAPI's input-send-event) played into the VM's input router.

QMP's input-send-event and the control socket's send-input take the same
events, so tests and tools type and point without a VNC client:

    {"type": "key", "data": {"down": true, "key": {"type": "qcode", "data": "a"}}}
    {"type": "key", "data": {"down": false, "key": {"type": "number", "data": 30}}}
    {"type": "abs", "data": {"axis": "x", "value": 16384}}
    {"type": "btn", "data": {"down": true, "button": "left"}}

A key is a QKeyCode name or QEMU's key number (set 1, E0 keys as 0x80 plus
their second byte; Print Screen and Pause have no number here: use their
qcodes).  Positions are absolute, 0 to 0x7FFF, as QEMU's; the
buttons are left, middle, right, wheel-up and wheel-down.  Keys go to the
router as they come, as in QEMU 7.2: a key number ends its input frame at
once, qcode keys share one frame that ends with the command; pointer changes
are gathered and sent once, at the end of the list, as QEMU syncs after the
command.  Relative motion is refused:
the VM's pointers are absolute.  The whole list is checked before anything
is sent, so a bad event sends nothing.
"""

from .devices.ps2keymap import KEY_BY_SET1_NUMBER
from .inputroute import (BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT, POINTER_MAX, WHEEL_DOWN,
                         WHEEL_UP, InputRouter)

MAX_EVENTS = 1024

BUTTONS = {"left": BUTTON_LEFT, "middle": BUTTON_MIDDLE, "right": BUTTON_RIGHT,
           "wheel-up": WHEEL_UP, "wheel-down": WHEEL_DOWN}

# QKeyCode name: Linux key code
QCODES = {
    "esc": 1, "minus": 12, "equal": 13, "backspace": 14, "tab": 15,
    "bracket_left": 26, "bracket_right": 27, "ret": 28, "ctrl": 29, "semicolon": 39,
    "apostrophe": 40, "grave_accent": 41, "shift": 42, "backslash": 43, "comma": 51,
    "dot": 52, "slash": 53, "shift_r": 54, "kp_multiply": 55, "alt": 56, "spc": 57,
    "caps_lock": 58, "num_lock": 69, "scroll_lock": 70, "kp_7": 71, "kp_8": 72, "kp_9": 73,
    "kp_subtract": 74, "kp_4": 75, "kp_5": 76, "kp_6": 77, "kp_add": 78, "kp_1": 79,
    "kp_2": 80, "kp_3": 81, "kp_0": 82, "kp_decimal": 83, "less": 86, "f11": 87, "f12": 88,
    "kp_enter": 96, "ctrl_r": 97, "kp_divide": 98, "sysrq": 99, "alt_r": 100, "home": 102,
    "up": 103, "pgup": 104, "left": 105, "right": 106, "end": 107, "down": 108, "pgdn": 109,
    "insert": 110, "delete": 111, "audiomute": 113, "volumedown": 114, "volumeup": 115,
    "power": 116, "pause": 119, "meta_l": 125, "meta_r": 126, "menu": 127,
    **{str(digit % 10): digit + 1 for digit in range(1, 11)},
    **{letter: code for row, first in (("qwertyuiop", 16), ("asdfghjkl", 30), ("zxcvbnm", 44))
       for code, letter in enumerate(row, first)},
    **{f"f{number}": 58 + number for number in range(1, 11)},
}


class InputEventError(ValueError):
    """An event list that does not fit the schema; the message says where."""


def _key_code(key, where: str) -> int:
    if not isinstance(key, dict) or set(key) != {"type", "data"}:
        raise InputEventError(f"{where}: 'key' must be {{\"type\", \"data\"}}")
    kind, value = key["type"], key["data"]
    if kind == "qcode":
        if value not in QCODES:
            raise InputEventError(f"{where}: unknown qcode {value!r}")
        return QCODES[value]
    if kind == "number":
        if not isinstance(value, int) or isinstance(value, bool) or value not in KEY_BY_SET1_NUMBER:
            raise InputEventError(f"{where}: unknown key number {value!r}")
        return KEY_BY_SET1_NUMBER[value]
    raise InputEventError(f"{where}: key type must be 'qcode' or 'number'")


def _field(data: dict, name: str, kind: type, where: str):
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputEventError(f"{where}: '{name}' must be {kind.__name__}")
    return value


def parse(events) -> list[tuple]:
    """The list checked and made into ("key", code, down), ("qcode", code,
    down) and ("abs", axis, value) / ("btn", bit, down) steps; InputEventError
    where it does not fit."""
    if not isinstance(events, list) or not events or len(events) > MAX_EVENTS:
        raise InputEventError(f"'events' must be a list of 1 to {MAX_EVENTS} events")
    steps = []
    for number, event in enumerate(events):
        where = f"event {number}"
        if not isinstance(event, dict) or set(event) != {"type", "data"} or \
                not isinstance(event["data"], dict):
            raise InputEventError(f"{where}: must be {{\"type\", \"data\": {{...}}}}")
        kind, data = event["type"], event["data"]
        if kind == "key":
            key = data.get("key")
            code = _key_code(key, where)            # checked: a dict with a known type
            steps.append(("qcode" if key["type"] == "qcode" else "key", code,
                          _field(data, "down", bool, where)))
        elif kind == "btn":
            button = data.get("button")
            if button not in BUTTONS:
                raise InputEventError(f"{where}: button must be one of {', '.join(BUTTONS)}")
            steps.append(("btn", BUTTONS[button], _field(data, "down", bool, where)))
        elif kind == "abs":
            axis, value = data.get("axis"), _field(data, "value", int, where)
            if axis not in ("x", "y"):
                raise InputEventError(f"{where}: axis must be 'x' or 'y'")
            steps.append(("abs", axis, value))
        elif kind == "rel":
            raise InputEventError(f"{where}: relative motion is not supported: "
                                  "the VM's pointers are absolute")
        else:
            raise InputEventError(f"{where}: type must be key, btn or abs")
    return steps


def send(router: InputRouter, events) -> None:
    """Check EVENTS, then play them into ROUTER (see the module docstring)."""
    steps = parse(events)
    x, y, buttons = router.pointer_state()
    moved = False
    for kind, first, second in steps:
        if kind in ("key", "qcode"):
            router.key(first, second, sync=kind == "key")
            continue
        moved = True
        if kind == "abs":
            value = min(max(second, 0), POINTER_MAX)
            x, y = (value, y) if first == "x" else (x, value)
        else:
            buttons = buttons | first if second else buttons & ~first
    router.key_sync()
    if moved:
        router.pointer(x, y, buttons)
