"""The i8042 keyboard controller: data at port 0x60, status and commands at 0x64.

Firmware and operating systems probe the controller and the keyboard behind
it, and some reset the machine or gate A20 through its output port.  The
keyboard is an MF2 keyboard in scan code set 2 (set 1 on request): it takes
the commands Linux's atkbd and SeaBIOS send and types what the VM's input
router (pyhyve.inputroute) gives it, Linux key codes made into scan codes
by pyhyve.devices.ps2keymap.  The aux (PS/2 mouse) port exists but has no
mouse on it: a byte sent to it comes back as a timeout, so guests give up
at once rather than after waiting for answers that never come.

Two buffers, as on the hardware: the keyboard's own (up to KBD_QUEUE_LIMIT
bytes: its command replies and keys) and the controller's output buffer
(its replies, and one keyboard byte at a time).  A keyboard byte moves into
the output buffer only while the buffer is empty and the keyboard port is
enabled, translated to set 1 on the way when the command byte's XLAT bit is
set; IRQ 1 is raised while the output buffer holds a keyboard byte and the
command byte enables it.

Threading: vCPU threads (port I/O) and the router's callers (the VNC server,
QMP) meet under one lock.
"""

import threading
from collections import deque

from ..boot import aml
from ..lifecycle import (ACPI_ISA, Device, StateError, decode, encode, expect_keys, flag,
                         optional_uint, uint)
from ..vcpu import ExitStatus
from .ps2keymap import Set1Translator, set2_sequence

DATA_PORT = 0x60
COMMAND_PORT = 0x64
KBD_IRQ = 1
AUX_IRQ = 12
QUEUE_LIMIT = 16                # controller replies waiting for the guest; more are dropped
KBD_QUEUE_LIMIT = 64            # bytes the keyboard holds; a key that does not fit is lost

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
CB_XLAT = 0x40                  # translate the keyboard's set 2 into set 1
# What PC firmware leaves an OS, which a kexec boot (no firmware) must find too:
# Linux's i8042 driver takes the keyboard port as translated unless told
# otherwise (i8042.direct), so its atkbd would misread raw set 2.
POWER_ON_COMMAND_BYTE = CB_KBD_INT | CB_AUX_INT | CB_XLAT

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
KBD_SCAN_ON = 0xF4
KBD_SCAN_OFF = 0xF5             # and back to the defaults
KBD_DEFAULTS = 0xF6
KBD_RESEND = 0xFE
KBD_RESET = 0xFF
KBD_TAKES_PARAMETER = frozenset((KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_TYPEMATIC))
KBD_SET3_ONLY = frozenset(range(0xF7, 0xFE))    # key types in set 3, which it lacks
KBD_FIRST_COMMAND = KBD_SET_LEDS  # a byte from here up is a command, never a parameter
ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA                   # basic assurance test passed
KBD_ID = (0xAB, 0x83)           # MF2 keyboard
SCANCODE_SETS = (1, 2)          # set 3 is refused, as keyboards without it do
DEFAULT_TYPEMATIC = 0x2B        # 10.9 characters/s after 500 ms

class I8042(Device):
    """The controller, its keyboard (a keyboard sink of the VM's input router)
    and an empty aux port."""

    name = "i8042"
    savable = True
    STATE = ("ram", "sys", "output_port", "queue", "last_read", "last_was_command",
             "command", "kbd_command", "kbd_queue", "kbd_last_sent", "scanning",
             "scancode_set", "leds", "typematic", "xlat_break")

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
        self._kbd_queue: deque[int] = deque()   # the keyboard's bytes, not yet sent
        self._kbd_last_sent = 0                 # what RESEND repeats
        self._xlat = Set1Translator()
        self._paused = False
        self._keyboard_defaults()
        self._leds = 0
        self._scancode_set = 2
        self._lines = {KBD_IRQ: False, AUX_IRQ: False}
        self._irq_lines = {irq: context.irq_line(irq) for irq in self._lines}
        context.ports.register("i8042-data", DATA_PORT, 1, self._data_read, self._data_write)
        context.ports.register("i8042-command", COMMAND_PORT, 1, self._status_read,
                               self._command_write)
        context.input.add_keyboard(self)

    def close(self) -> None:
        self.context.input.remove(self)

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
                    "command": self._command, "kbd_command": self._kbd_command,
                    "kbd_queue": encode(bytes(self._kbd_queue)),
                    "kbd_last_sent": self._kbd_last_sent, "scanning": self._scanning,
                    "scancode_set": self._scancode_set, "leds": self._leds,
                    "typematic": self._typematic, "xlat_break": self._xlat.pending_break}

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
        kbd_queue = decode(state["kbd_queue"], "i8042 kbd_queue", limit=KBD_QUEUE_LIMIT)
        kbd_last_sent = uint(state["kbd_last_sent"], 0xFF, "i8042 kbd_last_sent")
        scanning = flag(state["scanning"], "i8042 scanning")
        scancode_set = state["scancode_set"]
        if scancode_set not in SCANCODE_SETS or isinstance(scancode_set, bool):
            raise StateError(f"i8042 scancode_set is {scancode_set!r}, not one of "
                             f"{SCANCODE_SETS}")
        leds = uint(state["leds"], 0x07, "i8042 leds")
        typematic = uint(state["typematic"], 0x7F, "i8042 typematic")
        xlat_break = flag(state["xlat_break"], "i8042 xlat_break")
        with self._lock:
            self._ram[:] = ram
            self._sys, self._output_port = system, output_port
            self._queue.clear()
            self._queue.extend(entries)
            self._last_read, self._last_was_command = last_read, after_command
            self._command, self._kbd_command = command, kbd_command
            self._kbd_queue = deque(kbd_queue)
            self._kbd_last_sent, self._scanning = kbd_last_sent, scanning
            self._scancode_set, self._leds, self._typematic = scancode_set, leds, typematic
            self._xlat.pending_break = xlat_break

    # --- port I/O (bytes past the first belong to other ports) --------------------------
    def _data_read(self, offset: int, size: int) -> int:
        with self._lock:
            if self._queue:
                self._last_read = self._queue.popleft()[0]
                # drop the lines so that a byte still queued raises a fresh edge
                self._set_line(KBD_IRQ, False)
                self._set_line(AUX_IRQ, False)
                self._pull_keyboard()
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
                    self._pull_keyboard()
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
            self._pull_keyboard()
            self._update_irqs()
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
                                   "i8042: unsupported controller command %#x ignored",
                                   command)

    def _set_output_port(self, value: int) -> None:
        self._output_port = value
        if not value & OUT_RESET:
            self.context.request_stop(ExitStatus.RESET)

    # --- the keyboard: commands from the guest ------------------------------------------
    def _keyboard_defaults(self) -> None:
        self._scanning = True
        self._typematic = DEFAULT_TYPEMATIC

    def _keyboard(self, byte: int) -> None:
        self._ram[0] &= ~CB_KBD_DISABLED    # talking to the keyboard enables its port
        command, self._kbd_command = self._kbd_command, None
        if command is not None and byte < KBD_FIRST_COMMAND:
            self._parameter(command, byte)
        elif byte in KBD_TAKES_PARAMETER:
            self._kbd_command = byte
            self._send(ACK)
        elif byte == KBD_ECHO:
            self._send(KBD_ECHO)
        elif byte == KBD_IDENTIFY:
            self._send(ACK, *KBD_ID)
        elif byte == KBD_SCAN_ON:
            self._kbd_queue.clear()
            self._scanning = True
            self._send(ACK)
        elif byte in (KBD_SCAN_OFF, KBD_DEFAULTS):
            self._kbd_queue.clear()
            self._keyboard_defaults()
            self._scanning = byte == KBD_DEFAULTS
            self._send(ACK)
        elif byte == KBD_RESEND:
            self._send(self._kbd_last_sent)
        elif byte == KBD_RESET:
            self._kbd_queue.clear()
            self._keyboard_defaults()
            self._leds, self._scancode_set = 0, 2
            self._send(ACK, BAT_OK)
        elif byte in KBD_SET3_ONLY:
            self._send(ACK)
        else:
            self._send(RESEND)
        self._pull_keyboard()
        self._update_irqs()

    def _parameter(self, command: int, value: int) -> None:
        if command == KBD_SET_LEDS:
            self._leds = value & 0x07
            self._send(ACK)
        elif command == KBD_TYPEMATIC:
            self._typematic = value & 0x7F
            self._send(ACK)
        elif value == 0:                    # KBD_SCANCODE_SET: which one?
            self._send(ACK, self._scancode_set)
        elif value in SCANCODE_SETS:
            self._scancode_set = value
            self._send(ACK)
        else:
            self._send(RESEND)

    def _send(self, *replies: int) -> None:
        """Command replies go out even while scanning is off; a full buffer
        drops the oldest bytes rather than the reply the driver waits for."""
        for byte in replies:
            if len(self._kbd_queue) == KBD_QUEUE_LIMIT:
                self._kbd_queue.popleft()
            self._kbd_queue.append(byte)
        self._kbd_last_sent = replies[-1]

    # --- the keyboard: keys from the input router ---------------------------------------
    def ready(self) -> bool:
        """Whether the guest's driver takes keys: scanning on, the port enabled."""
        with self._lock:
            return self._scanning and not self._ram[0] & CB_KBD_DISABLED

    def key_event(self, code: int, down: bool, sync: bool = True) -> None:
        """Type key CODE (a Linux key code): its scan codes, whole or not at all."""
        sequence = set2_sequence(code, down)
        if self._scancode_set == 1:
            translator = Set1Translator()
            sequence = bytes(byte for byte in map(translator.feed, sequence)
                             if byte is not None)
        with self._lock:
            if not sequence or not self._scanning or \
                    len(self._kbd_queue) + len(sequence) > KBD_QUEUE_LIMIT:
                return
            self._kbd_queue.extend(sequence)
            if not self._paused:
                self._pull_keyboard()
                self._update_irqs()

    def key_sync(self) -> None:
        """PS/2 has no input frames: each key's scan codes are already on their way."""

    def pause(self) -> None:
        """Keys typed while the VM is paused wait in the keyboard."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._pull_keyboard()
            self._update_irqs()

    # --- the output buffer and interrupts ----------------------------------------------
    def _pull_keyboard(self) -> None:
        """Move the keyboard's next byte into an empty output buffer (through
        the set-1 translation where XLAT is on)."""
        while not self._queue and self._kbd_queue and not self._ram[0] & CB_KBD_DISABLED:
            byte = self._kbd_queue.popleft()
            if self._ram[0] & CB_XLAT:
                byte = self._xlat.feed(byte)
                if byte is None:
                    continue
            self._queue.append((byte, 0))

    def _reply(self, byte: int, status: int = 0) -> None:
        if len(self._queue) < QUEUE_LIMIT:
            self._queue.append((byte, status))
            self._update_irqs()

    def resync_irq(self) -> None:
        """Drive both lines from the output buffer again (after a restore lowered them)."""
        with self._lock:
            self._lines = dict.fromkeys(self._lines, False)
            self._pull_keyboard()
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
