"""X11 keysyms, as RFB KeyEvents carry them, to Linux input key codes, as the
VM's input router takes them.

A keysym names the character a key produced on the client's keyboard ("A",
"!"); the guest wants the key that produces it on a US keyboard.  Shifted
characters map to their unshifted key: the client sends its Shift key as
an event of its own, so "!" arrives as Shift down, "!" down, "!" up, Shift
up, and the guest sees Shift and 1.
"""

US_LAYOUTS = ("us_unix", "us")         # bhyve's -K names for what key_code() implements

# the US layout's main block: characters to Linux key codes (KEY_1 = 2 ...)
_ROWS = (
    ("1234567890-=", 2, "!@#$%^&*()_+"),
    ("qwertyuiop[]", 16, "QWERTYUIOP{}"),
    ("asdfghjkl;'`", 30, 'ASDFGHJKL:"~'),
    ("zxcvbnm,./", 44, "ZXCVBNM<>?"),
)
_CHARACTERS = {" ": 57, "\\": 43, "|": 43}
for _plain, _first, _shifted in _ROWS:
    for _offset, (_a, _b) in enumerate(zip(_plain, _shifted)):
        _CHARACTERS[_a] = _CHARACTERS[_b] = _first + _offset

# keysyms of the function and modifier keys (X11's keysymdef.h values)
SPECIAL = {
    0xFF08: 14,     # BackSpace
    0xFF09: 15,     # Tab
    0xFE20: 15,     # ISO_Left_Tab (Shift+Tab)
    0xFF0D: 28,     # Return
    0xFF13: 119,    # Pause
    0xFF14: 70,     # Scroll_Lock
    0xFF1B: 1,      # Escape
    0xFF50: 102,    # Home
    0xFF51: 105,    # Left
    0xFF52: 103,    # Up
    0xFF53: 106,    # Right
    0xFF54: 108,    # Down
    0xFF55: 104,    # Page_Up
    0xFF56: 109,    # Page_Down
    0xFF57: 107,    # End
    0xFF61: 99,     # Print
    0xFF63: 110,    # Insert
    0xFF67: 127,    # Menu
    0xFF7F: 69,     # Num_Lock
    0xFF8D: 96,     # KP_Enter
    0xFFAA: 55,     # KP_Multiply
    0xFFAB: 78,     # KP_Add
    0xFFAD: 74,     # KP_Subtract
    0xFFAE: 83,     # KP_Decimal
    0xFFAF: 98,     # KP_Divide
    0xFFE1: 42,     # Shift_L
    0xFFE2: 54,     # Shift_R
    0xFFE3: 29,     # Control_L
    0xFFE4: 97,     # Control_R
    0xFFE5: 58,     # Caps_Lock
    0xFFE7: 125,    # Meta_L
    0xFFE8: 126,    # Meta_R
    0xFFE9: 56,     # Alt_L
    0xFFEA: 100,    # Alt_R
    0xFFEB: 125,    # Super_L
    0xFFEC: 126,    # Super_R
    0xFFFF: 111,    # Delete
}
SPECIAL.update({0xFFBE + index: code for index, code in
                enumerate((59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 87, 88))})      # F1-F12
SPECIAL.update({0xFFB0 + digit: code for digit, code in
                enumerate((82, 79, 80, 81, 75, 76, 77, 71, 72, 73))})              # KP_0-9


def key_code(keysym: int) -> int | None:
    """The Linux key code for KEYSYM, or None for a key the US keyboard lacks."""
    if keysym in SPECIAL:
        return SPECIAL[keysym]
    if 0x20 <= keysym <= 0x7E:
        return _CHARACTERS.get(chr(keysym))
    return None
