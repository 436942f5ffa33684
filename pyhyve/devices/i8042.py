"""The i8042 keyboard controller: data at port 0x60, status and commands at 0x64.

Firmware and operating systems probe the controller and the keyboard behind
it, and some reset the machine or gate A20 through its output port.  Nothing
types on this keyboard (the console is the serial port), so it only answers
commands.  The aux (PS/2 mouse) port exists but has no mouse on it: a byte
sent to it comes back as a timeout, so guests give up at once rather than
after waiting for answers that never come.
"""

import threading
from collections import deque

from ..boot import aml
from ..lifecycle import (ACPI_ISA, Device, StateError, decode, encode, expect_keys, flag,
                         optional_uint, uint)
from ..vcpu import ExitStatus

DATA_PORT = 0x60
COMMAND_PORT = 0x64
KBD_IRQ = 1
AUX_IRQ = 12
QUEUE_LIMIT = 16                # bytes waiting for the guest; more are dropped

# status register
ST_OBF = 0x01                   # output buffer full
ST_SYS = 0x04                   # system flag: self-test passed, or set by the command byte
ST_COMMAND = 0x08               # the last write went to the command port
ST_UNLOCKED = 0x10              # keyboard not inhibited by the key lock
ST_AUX = 0x20                   # the byte in the output buffer is from the aux port
ST_TIMEOUT = 0x40

# command byte (controller RAM byte 0)
CB_KBD_INT = 0x01
CB_AUX_INT = 0x02
CB_SYS = 0x04
CB_KBD_DISABLED = 0x10
CB_AUX_DISABLED = 0x20
POWER_ON_COMMAND_BYTE = CB_KBD_INT | CB_AUX_INT

# output port
OUT_RESET = 0x01                # active low: 0 resets the machine
OUT_A20 = 0x02
POWER_ON_OUTPUT_PORT = OUT_RESET | OUT_A20

# controller commands
READ_RAM, READ_RAM_LAST = 0x20, 0x3F            # byte 0, at 0x20, is the command byte
WRITE_RAM, WRITE_RAM_LAST = 0x60, 0x7F
AUX_DISABLE = 0xA7
AUX_ENABLE = 0xA8
AUX_TEST = 0xA9
SELF_TEST = 0xAA
KBD_TEST = 0xAB
KBD_DISABLE = 0xAD
KBD_ENABLE = 0xAE
READ_OUTPUT = 0xD0
WRITE_OUTPUT = 0xD1
WRITE_KBD_BUFFER = 0xD2         # as if the keyboard had sent the byte
WRITE_AUX_BUFFER = 0xD3         # as if the aux device had sent it
WRITE_AUX = 0xD4                # send the byte to the aux device
A20_DISABLE = 0xDD
A20_ENABLE = 0xDF
PULSE_OUTPUT = 0xF0             # 0xF0-0xFF: pulse low the output port bits 0-3 that are clear
TAKES_DATA = frozenset((WRITE_OUTPUT, WRITE_KBD_BUFFER, WRITE_AUX_BUFFER, WRITE_AUX))
SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00

# keyboard commands and replies
KBD_SET_LEDS = 0xED
KBD_ECHO = 0xEE
KBD_SCANCODE_SET = 0xF0
KBD_IDENTIFY = 0xF2
KBD_TYPEMATIC = 0xF3
KBD_RESET = 0xFF
KBD_TAKES_PARAMETER = frozenset((KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_TYPEMATIC))
KBD_JUST_ACK = frozenset(range(0xF4, 0xFF))     # enable, disable, defaults, set-3 types, resend
ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA                   # basic assurance test passed
KBD_ID = (0xAB, 0x83)           # MF2 keyboard
SCANCODE_SET_2 = 0x02

class I8042(Device):
    """The controller, a keyboard that only answers, and an empty aux port.

    The port-disable bits of the command byte are kept for the guest to read
    back; as nothing is typed, there is nothing for them to hold back."""

    name = "i8042"
    savable = True
    STATE = ("ram", "sys", "output_port", "queue", "last_read", "last_was_command",
             "command", "kbd_command")

    def __init__(self, context):
        self.context = context
        self._lock = threading.Lock()
        self._ram = bytearray(32)
        self._ram[0] = POWER_ON_COMMAND_BYTE
        self._sys = False
        self._output_port = POWER_ON_OUTPUT_PORT
        self._queue: deque[tuple[int, int]] = deque()   # (byte, status bits it shows)
        self._last_read = 0
        self._last_was_command = False
        self._command: int | None = None        # controller command awaiting its data byte
        self._kbd_command: int | None = None    # keyboard command awaiting its parameter
        self._lines = {KBD_IRQ: False, AUX_IRQ: False}
        self._irq_lines = {irq: context.irq_line(irq) for irq in self._lines}
        context.ports.register("i8042-data", DATA_PORT, 1, self._data_read, self._data_write)
        context.ports.register("i8042-command", COMMAND_PORT, 1, self._status_read,
                          self._command_write)

    def acpi_objects(self) -> list[tuple[str, bytes]]:
        """The keyboard (PNP0303): Linux finds the i8042 through it."""
        return [(ACPI_ISA, aml.device("KBD", aml.name("_HID", aml.eisa_id("PNP0303")),
                                      aml.name("_CRS", aml.resource_template(
                                          aml.io(DATA_PORT, DATA_PORT, 1, 1),
                                          aml.io(COMMAND_PORT, COMMAND_PORT, 1, 1),
                                          aml.irq_no_flags(KBD_IRQ)))))]

    # --- snapshots ------------------------------------------------------------------
    def save_state(self) -> dict:
        with self._lock:
            return {"ram": encode(self._ram), "sys": self._sys,
                    "output_port": self._output_port,
                    "queue": [list(entry) for entry in self._queue],
                    "last_read": self._last_read, "last_was_command": self._last_was_command,
                    "command": self._command, "kbd_command": self._kbd_command}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, self.STATE, self.name)
        ram = decode(state["ram"], "i8042 ram", length=len(self._ram))
        queue = state["queue"]
        if not isinstance(queue, list) or len(queue) > QUEUE_LIMIT or not all(
                isinstance(entry, list) and len(entry) == 2 for entry in queue):
            raise StateError(f"i8042 queue must be at most {QUEUE_LIMIT} [byte, status] pairs")
        entries = [(uint(byte, 0xFF, "i8042 queued byte"), uint(status, 0xFF, "i8042 status"))
                   for byte, status in queue]
        system = flag(state["sys"], "i8042 sys")
        after_command = flag(state["last_was_command"], "i8042 last_was_command")
        output_port = uint(state["output_port"], 0xFF, "i8042 output_port")
        last_read = uint(state["last_read"], 0xFF, "i8042 last_read")
        command = optional_uint(state["command"], 0xFF, "i8042 command")
        kbd_command = optional_uint(state["kbd_command"], 0xFF, "i8042 kbd_command")
        with self._lock:
            self._ram[:] = ram
            self._sys, self._output_port = system, output_port
            self._queue.clear()
            self._queue.extend(entries)
            self._last_read, self._last_was_command = last_read, after_command
            self._command, self._kbd_command = command, kbd_command

    # --- port I/O (bytes past the first belong to other ports) --------------------------
    def _data_read(self, offset: int, size: int) -> int:
        with self._lock:
            if self._queue:
                self._last_read = self._queue.popleft()[0]
                # drop the lines so that a byte still queued raises a fresh edge
                self._set_line(KBD_IRQ, False)
                self._set_line(AUX_IRQ, False)
                self._update_irqs()
            return self._last_read | _high_ones(size)

    def _status_read(self, offset: int, size: int) -> int:
        with self._lock:
            status = ST_UNLOCKED
            if self._sys:
                status |= ST_SYS
            if self._last_was_command:
                status |= ST_COMMAND
            if self._queue:
                status |= ST_OBF | self._queue[0][1]
            return status | _high_ones(size)

    def _data_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            self._last_was_command = False
            command, self._command = self._command, None
            if command is None:
                self._keyboard(value)
            elif WRITE_RAM <= command <= WRITE_RAM_LAST:
                self._ram[command - WRITE_RAM] = value
                if command == WRITE_RAM:
                    self._sys = bool(value & CB_SYS)
                    self._update_irqs()
            elif command == WRITE_OUTPUT:
                self._set_output_port(value)
            elif command == WRITE_KBD_BUFFER:
                self._reply(value)
            elif command == WRITE_AUX_BUFFER:
                self._reply(value, ST_AUX)
            elif command == WRITE_AUX:
                self._reply(RESEND, ST_AUX | ST_TIMEOUT)    # no mouse answers

    def _command_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            self._last_was_command = True
            self._command = None
            self._controller(value)

    # --- the controller ---------------------------------------------------------------
    def _controller(self, command: int) -> None:
        if READ_RAM <= command <= READ_RAM_LAST:
            self._reply(self._ram[command - READ_RAM])
        elif WRITE_RAM <= command <= WRITE_RAM_LAST or command in TAKES_DATA:
            self._command = command
        elif command == AUX_DISABLE:
            self._ram[0] |= CB_AUX_DISABLED
        elif command == AUX_ENABLE:
            self._ram[0] &= ~CB_AUX_DISABLED
        elif command in (AUX_TEST, KBD_TEST):
            self._reply(INTERFACE_OK)
        elif command == SELF_TEST:
            self._sys = True
            self._reply(SELF_TEST_OK)
        elif command == KBD_DISABLE:
            self._ram[0] |= CB_KBD_DISABLED
        elif command == KBD_ENABLE:
            self._ram[0] &= ~CB_KBD_DISABLED
        elif command == READ_OUTPUT:
            self._reply(self._output_port)
        elif command == A20_DISABLE:
            self._set_output_port(self._output_port & ~OUT_A20)
        elif command == A20_ENABLE:
            self._set_output_port(self._output_port | OUT_A20)
        elif command >= PULSE_OUTPUT:
            if not command & OUT_RESET:     # 0xFE (and other even ones) pulse reset
                self.context.request_stop(ExitStatus.RESET)
        else:
            self.context.warn_once(("i8042-command", command),
                              "i8042: unsupported controller command %#x ignored", command)

    def _set_output_port(self, value: int) -> None:
        self._output_port = value
        if not value & OUT_RESET:
            self.context.request_stop(ExitStatus.RESET)

    # --- the keyboard -----------------------------------------------------------------
    def _keyboard(self, byte: int) -> None:
        self._ram[0] &= ~CB_KBD_DISABLED    # talking to the keyboard enables its port
        command, self._kbd_command = self._kbd_command, None
        if command is not None:             # this byte is the command's parameter
            self._reply(ACK)
            if command == KBD_SCANCODE_SET and byte == 0:
                self._reply(SCANCODE_SET_2)
        elif byte in KBD_TAKES_PARAMETER:
            self._kbd_command = byte
            self._reply(ACK)
        elif byte == KBD_ECHO:
            self._reply(KBD_ECHO)
        elif byte == KBD_IDENTIFY:
            self._reply(ACK)
            for id_byte in KBD_ID:
                self._reply(id_byte)
        elif byte == KBD_RESET:
            self._reply(ACK)
            self._reply(BAT_OK)
        elif byte in KBD_JUST_ACK:
            self._reply(ACK)
        else:
            self._reply(RESEND)

    # --- the output buffer and interrupts ----------------------------------------------
    def _reply(self, byte: int, status: int = 0) -> None:
        if len(self._queue) < QUEUE_LIMIT:
            self._queue.append((byte, status))
            self._update_irqs()

    def resync_irq(self) -> None:
        """Drive both lines from the output buffer again (after a restore lowered them)."""
        with self._lock:
            self._lines = dict.fromkeys(self._lines, False)
            self._update_irqs()

    def _update_irqs(self) -> None:
        aux = bool(self._queue) and bool(self._queue[0][1] & ST_AUX)
        self._set_line(KBD_IRQ, bool(self._queue) and not aux and
                       bool(self._ram[0] & CB_KBD_INT))
        self._set_line(AUX_IRQ, aux and bool(self._ram[0] & CB_AUX_INT))

    def _set_line(self, irq: int, level: bool) -> None:
        if self._lines[irq] != level:
            self._lines[irq] = level
            self._irq_lines[irq].set(level)


def _high_ones(size: int) -> int:
    """All ones in the bytes of a wide read that fall on the next ports."""
    return (1 << (8 * size)) - 0x100 if size > 1 else 0
