"""A byte stream cut into JSON texts, as QEMU's JSON streamer cuts QMP input.

QMP needs no newline after a message (the qemu.qmp library sends none): a
message ends where its outermost object or array closes, or, for a number or
a literal at the top, at the next delimiter.  The scanner checks the syntax
as the bytes arrive (a small pushdown automaton over JSON's tokens), so a
malformed message is reported at its first wrong byte instead of waiting for
a closing brace that never comes; the input then resynchronises at the next
newline, and what lies between is dropped.  A raw control character inside
a string is such an error (JSON forbids one), so an unterminated string ends
at its line too.  Each complete text is decoded by the json module, which
also checks what the scanner leaves alone (escapes, UTF-8, number ranges).
"""

import json
import re

MAX_DEPTH = 256             # nesting of objects and arrays; QMP needs a handful

WHITESPACE = frozenset(b" \t\r\n")
BARE = frozenset(b"0123456789+-.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LITERALS = (b"true", b"false", b"null")
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

# Where the scanner is inside the innermost container: "o" object, "a" array.
_OBJECT_START = "o{"        # after '{': a key or '}'
_OBJECT_KEY = "ok"          # after ',': a key
_OBJECT_COLON = "o:"        # after a key
_OBJECT_VALUE = "ov"        # after ':'
_OBJECT_NEXT = "o,"         # after a member: ',' or '}'
_ARRAY_START = "a["         # after '[': a value or ']'
_ARRAY_VALUE = "av"         # after ',': a value
_ARRAY_NEXT = "a,"          # after an element: ',' or ']'
_EXPECTS_VALUE = (_OBJECT_VALUE, _ARRAY_START, _ARRAY_VALUE)
_EXPECTS_KEY = (_OBJECT_START, _OBJECT_KEY)


class JsonStream:
    """feed() bytes, get back what they completed: for each text, in order,
    (value, None), or (None, message) for one that is not JSON.  Once a text
    passes `max_length` bytes, `overflowed` is set and the stream takes no
    more (where the next text would begin cannot be known)."""

    def __init__(self, max_length: int, max_depth: int = MAX_DEPTH):
        self.max_length = max_length
        self.max_depth = max_depth
        self.overflowed = False
        self._reset()
        self._skipping = False

    def _reset(self) -> None:
        self._text = bytearray()
        self._stack: list[str] = []
        self._bare = bytearray()
        self._in_string = self._escape = self._string_is_key = False

    def feed(self, data: bytes) -> list[tuple[object, str | None]]:
        results: list[tuple[object, str | None]] = []
        if self.overflowed:
            return results
        for byte in data:
            if self._skipping:
                self._skipping = byte != 0x0A
                continue
            error = self._scan(byte, results)
            if error is not None:
                results.append((None, f"JSON parse error, {error}"))
                self._reset()
                self._skipping = byte != 0x0A
            elif len(self._text) > self.max_length:
                self.overflowed = True
                break
        return results

    def _scan(self, byte: int, results: list) -> str | None:
        """Take one byte; an error message if it cannot continue the text."""
        if self._in_string:
            self._text.append(byte)
            if byte < 0x20:
                return "control character in a string"
            if self._escape:
                self._escape = False
            elif byte == 0x5C:          # backslash
                self._escape = True
            elif byte == 0x22:          # the closing quote
                self._in_string = False
                if self._string_is_key:
                    self._stack[-1] = _OBJECT_COLON
                else:
                    self._value_done(results)
            return None
        if self._bare:
            if byte in BARE:
                self._bare.append(byte)
                self._text.append(byte)
                return None
            error = self._end_bare(results)
            if error is not None:
                return error
        if byte in WHITESPACE:
            if self._stack:
                self._text.append(byte)
            return None
        top = self._stack[-1] if self._stack else None
        expects_value = top is None or top in _EXPECTS_VALUE
        self._text.append(byte)
        if byte == 0x22:                # '"'
            if not expects_value and top not in _EXPECTS_KEY:
                return "unexpected string"
            self._in_string, self._string_is_key = True, top in _EXPECTS_KEY
        elif byte in (0x7B, 0x5B):      # '{' '['
            if not expects_value:
                return f"unexpected '{chr(byte)}'"
            if len(self._stack) >= self.max_depth:
                return "nesting too deep"
            self._stack.append(_OBJECT_START if byte == 0x7B else _ARRAY_START)
        elif byte == 0x7D:              # '}'
            if top not in (_OBJECT_START, _OBJECT_NEXT):
                return "unexpected '}'"
            self._stack.pop()
            self._value_done(results)
        elif byte == 0x5D:              # ']'
            if top not in (_ARRAY_START, _ARRAY_NEXT):
                return "unexpected ']'"
            self._stack.pop()
            self._value_done(results)
        elif byte == 0x3A:              # ':'
            if top != _OBJECT_COLON:
                return "unexpected ':'"
            self._stack[-1] = _OBJECT_VALUE
        elif byte == 0x2C:              # ','
            if top == _OBJECT_NEXT:
                self._stack[-1] = _OBJECT_KEY
            elif top == _ARRAY_NEXT:
                self._stack[-1] = _ARRAY_VALUE
            else:
                return "unexpected ','"
        elif byte in BARE and expects_value:
            self._bare.append(byte)
        else:
            return f"unexpected {_describe(byte)}"
        return None

    def _end_bare(self, results: list) -> str | None:
        """A number or literal ended; check it."""
        token, self._bare = bytes(self._bare), bytearray()
        if token not in _LITERALS and not _NUMBER.fullmatch(token):
            return f"invalid token '{token[:20].decode(errors='replace')}'"
        self._value_done(results)
        return None

    def _value_done(self, results: list) -> None:
        if not self._stack:             # the whole text
            text = bytes(self._text)
            self._reset()
            try:
                results.append((json.loads(text), None))
            except (ValueError, RecursionError) as exc:
                results.append((None, f"JSON parse error, {_reason(exc)}"))
            return
        top = self._stack[-1]
        self._stack[-1] = _OBJECT_NEXT if top[0] == "o" else _ARRAY_NEXT


def _describe(byte: int) -> str:
    if 0x20 < byte < 0x7F:
        return f"'{chr(byte)}'"
    return f"byte {byte:#04x}"


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg[0].lower() + exc.msg[1:]
    if isinstance(exc, UnicodeDecodeError):
        return "invalid UTF-8"
    return str(exc) or type(exc).__name__
