"""The escape key of an interactive console, as cu(1) and ssh(1) have one.

A terminal in raw mode sends every key to the guest, Ctrl-C included, so the
user needs one sequence the console keeps for itself: the escape character
(`~` unless configured) typed at the start of a line, that is first of all
or right after a carriage return or newline, then one command character:

    ~.   end the session (pyhyve: power off the VM; pyhyvectl --console: detach)
    ~?   list the escape commands on the terminal (the guest sees nothing)
    ~~   send one ~ to the guest

Any other character after the escape sends both on, as cu does; an escape
character anywhere else in a line is an ordinary key.  `none` turns the
escape off, so that a paste into the console reaches the guest untouched.
"""

from .config import ConfigError

DEFAULT = "~"
QUIT = "quit"           # the commands feed() reports
HELP = "help"
_LINE_ENDS = b"\r\n"


def parse_escape(text: str, what: str = "console.escape") -> bytes | None:
    """The escape byte TEXT names: one ASCII character, `^X` for a control
    character (`^]` is 0x1D, `^?` DEL), or None for `none`."""
    if text == "none":
        return None
    if len(text) == 2 and text[0] == "^" and ("@" <= text[1].upper() <= "_" or text[1] == "?"):
        value = 0x7F if text[1] == "?" else ord(text[1].upper()) ^ 0x40
    elif len(text) == 1 and text.isascii():
        value = ord(text)
    else:
        raise ConfigError(f"{what}={text!r}: expected one ASCII character, ^X for a "
                          "control character, or none")
    if value in _LINE_ENDS or value == 0:
        raise ConfigError(f"{what}={text!r}: the escape cannot be NUL, return or newline")
    return bytes((value,))


def describe(escape: bytes) -> str:
    """How a user types ESCAPE: `~`, or `^]` for a control character."""
    value = escape[0]
    if value == 0x7F:
        return "^?"
    return f"^{chr(value ^ 0x40)}" if value < 0x20 else chr(value)


def help_text(escape: bytes, quit_meaning: str) -> bytes:
    """The list `~?` prints, with raw-mode line ends (the terminal adds no CR)."""
    key = describe(escape)
    lines = ["Supported escape sequences:",
             f" {key}.  {quit_meaning}",
             f" {key}?  this message",
             f" {key}{key}  send the escape character ({key})",
             "(Escapes are recognised only at the start of a line.)"]
    return ("\r\n" + "\r\n".join(lines) + "\r\n").encode()


class EscapeFilter:
    """Splits what a user types into bytes for the guest and escape commands.

    feed(data) returns, in order, bytes to pass on and the commands QUIT and
    HELP; after QUIT, nothing.  An escape character at the start of a line is
    held back until the next key says what it means; that key may come in a
    later feed()."""

    def __init__(self, escape: bytes | None = DEFAULT.encode()):
        self.escape = escape
        self._at_line_start = True     # a session starts at the start of a line
        self._escaped = False          # the escape was typed and is held back
        self.ended = False             # QUIT came: nothing more goes anywhere

    def feed(self, data: bytes) -> list[bytes | str]:
        escape = self.escape
        if self.ended:
            return []
        if escape is None or (not self._escaped and escape not in data):
            if data:
                self._at_line_start = data[-1] in _LINE_ENDS
            return [data] if data else []
        out: list[bytes | str] = []
        passed = bytearray()
        for value in data:
            byte = bytes((value,))
            if self._escaped:
                self._escaped = False
                if byte == b".":
                    command = QUIT
                elif byte == b"?":
                    command = HELP
                elif byte == escape:
                    passed += escape
                    self._at_line_start = False
                    continue
                else:
                    passed += escape + byte
                    self._at_line_start = value in _LINE_ENDS
                    continue
                if passed:
                    out.append(bytes(passed))
                    passed.clear()
                out.append(command)
                if command == QUIT:
                    self.ended = True   # the session ends: the rest goes nowhere
                    return out
                continue                # still at the start of a line
            if self._at_line_start and byte == escape:
                self._escaped = True
                continue
            passed.append(value)
            self._at_line_start = value in _LINE_ENDS
        if passed:
            out.append(bytes(passed))
        return out
