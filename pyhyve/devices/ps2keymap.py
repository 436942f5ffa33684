"""Linux key codes to PS/2 scan codes: set 2, and the controller's translation to set 1.

A PS/2 keyboard speaks scan code set 2: a key's make code is one byte, or
E0 and a byte for the keys the 101-key layout added (the right-hand Ctrl
and Alt, the cursor block, ...); its break code puts F0 before the last
byte.  Print Screen and Pause are sequences of their own, and Pause sends
no break code at all.

The i8042 translates set 2 into the XT's set 1 when its command byte's XLAT
bit is set, byte by byte: each byte through TRANSLATE_SET2, F0 swallowed and
the byte after it sent with bit 7 set.  For the keys in KEY_TO_SET2 set 1
is the Linux key code itself (Linux numbered its keys after set 1), which
is how the translation table below is made rather than written out; bytes
no key sends pass unchanged, except F7's 0x83 (the one set-2 code above
0x7F), which falls out of the same rule.
"""

PREFIX_E0 = 0xE0
BREAK = 0xF0

# Linux key code: set-2 make code of the keys whose set-1 code is the key code
_BASIC = {
    1: 0x76, 2: 0x16, 3: 0x1E, 4: 0x26, 5: 0x25, 6: 0x2E, 7: 0x36, 8: 0x3D, 9: 0x3E,
    10: 0x46, 11: 0x45, 12: 0x4E, 13: 0x55, 14: 0x66, 15: 0x0D, 16: 0x15, 17: 0x1D,
    18: 0x24, 19: 0x2D, 20: 0x2C, 21: 0x35, 22: 0x3C, 23: 0x43, 24: 0x44, 25: 0x4D,
    26: 0x54, 27: 0x5B, 28: 0x5A, 29: 0x14, 30: 0x1C, 31: 0x1B, 32: 0x23, 33: 0x2B,
    34: 0x34, 35: 0x33, 36: 0x3B, 37: 0x42, 38: 0x4B, 39: 0x4C, 40: 0x52, 41: 0x0E,
    42: 0x12, 43: 0x5D, 44: 0x1A, 45: 0x22, 46: 0x21, 47: 0x2A, 48: 0x32, 49: 0x31,
    50: 0x3A, 51: 0x41, 52: 0x49, 53: 0x4A, 54: 0x59, 55: 0x7C, 56: 0x11, 57: 0x29,
    58: 0x58, 59: 0x05, 60: 0x06, 61: 0x04, 62: 0x0C, 63: 0x03, 64: 0x0B, 65: 0x83,
    66: 0x0A, 67: 0x01, 68: 0x09, 69: 0x77, 70: 0x7E, 71: 0x6C, 72: 0x75, 73: 0x7D,
    74: 0x7B, 75: 0x6B, 76: 0x73, 77: 0x74, 78: 0x79, 79: 0x69, 80: 0x72, 81: 0x7A,
    82: 0x70, 83: 0x71, 86: 0x61, 87: 0x78, 88: 0x07,
}

# Linux key code: (set-2 byte after E0, set-1 byte after E0)
_EXTENDED = {
    96: (0x5A, 0x1C),       # KEY_KPENTER
    97: (0x14, 0x1D),       # KEY_RIGHTCTRL
    98: (0x4A, 0x35),       # KEY_KPSLASH
    100: (0x11, 0x38),      # KEY_RIGHTALT
    102: (0x6C, 0x47),      # KEY_HOME
    103: (0x75, 0x48),      # KEY_UP
    104: (0x7D, 0x49),      # KEY_PAGEUP
    105: (0x6B, 0x4B),      # KEY_LEFT
    106: (0x74, 0x4D),      # KEY_RIGHT
    107: (0x69, 0x4F),      # KEY_END
    108: (0x72, 0x50),      # KEY_DOWN
    109: (0x7A, 0x51),      # KEY_PAGEDOWN
    110: (0x70, 0x52),      # KEY_INSERT
    111: (0x71, 0x53),      # KEY_DELETE
    113: (0x23, 0x20),      # KEY_MUTE
    114: (0x21, 0x2E),      # KEY_VOLUMEDOWN
    115: (0x32, 0x30),      # KEY_VOLUMEUP
    116: (0x37, 0x5E),      # KEY_POWER
    125: (0x1F, 0x5B),      # KEY_LEFTMETA
    126: (0x27, 0x5C),      # KEY_RIGHTMETA
    127: (0x2F, 0x5D),      # KEY_COMPOSE (the menu key)
}

KEY_SYSRQ = 99              # Print Screen
KEY_PAUSE = 119
_PRINT_SCREEN_MAKE = bytes((PREFIX_E0, 0x12, PREFIX_E0, 0x7C))
_PRINT_SCREEN_BREAK = bytes((PREFIX_E0, BREAK, 0x7C, PREFIX_E0, BREAK, 0x12))
_PAUSE_MAKE = bytes((0xE1, 0x14, 0x77, 0xE1, BREAK, 0x14, BREAK, 0x77))


def _translation_table() -> bytes:
    table = bytearray(range(256))
    for code, set2 in _BASIC.items():
        table[set2] = code
    for set2, set1 in _EXTENDED.values():
        table[set2] = set1
    return bytes(table)


TRANSLATE_SET2 = _translation_table()
# QEMU's key numbers: set 1, an E0 key as 0x80 plus its second byte
KEY_BY_SET1_NUMBER = {**{code: code for code in _BASIC},
                      **{0x80 | set1: code for code, (_, set1) in _EXTENDED.items()}}


def set2_sequence(code: int, down: bool) -> bytes:
    """The set-2 bytes for pressing (DOWN) or releasing key CODE; empty for
    keys a PS/2 keyboard does not have."""
    if code in _BASIC:
        return bytes((_BASIC[code],)) if down else bytes((BREAK, _BASIC[code]))
    if code in _EXTENDED:
        byte = _EXTENDED[code][0]
        return bytes((PREFIX_E0, byte)) if down else bytes((PREFIX_E0, BREAK, byte))
    if code == KEY_SYSRQ:
        return _PRINT_SCREEN_MAKE if down else _PRINT_SCREEN_BREAK
    if code == KEY_PAUSE:
        return _PAUSE_MAKE if down else b""
    return b""


class Set1Translator:
    """The i8042's XLAT: set-2 bytes in, set-1 bytes out, one at a time (a
    break prefix waits for the byte it modifies).  `pending_break` is state a
    snapshot keeps."""

    def __init__(self):
        self.pending_break = False

    def feed(self, byte: int) -> int | None:
        """The set-1 byte for BYTE, or None where it only set the break flag."""
        if byte == BREAK:
            self.pending_break = True
            return None
        translated = TRANSLATE_SET2[byte]
        if self.pending_break:
            self.pending_break = False
            translated |= 0x80
        return translated
