"""The 16550A UART on the PC's COM ports (bhyve's uart_emul.c).

Transmission is instantaneous: THR and the transmitter are always empty
(LSR.THRE and LSR.TEMT always set), and each byte written goes straight to
the backend.  Reception goes through a 16-byte FIFO (one byte in 16450 mode,
with FIFOs off); host input that does not fit waits in a bounded pending
buffer, as if still on the wire, and moves in as the guest reads.  Time is
not modelled, so data below the FIFO trigger level reports the character
timeout interrupt at once.

Interrupts follow the chip: line status (overrun) before received data before
THR empty before modem status.  As on PC boards, the IRQ only reaches the
interrupt controller while MCR.OUT2 is set, and never in loopback mode, where
the chip disconnects its OUT2 pin; the ISA line is edge-triggered, so the level
is driven high while an enabled interrupt is pending and low otherwise.

THR writes are queued by KVM (iobus.queue_writes) rather than exit while
nothing the guest can see depends on when they arrive: while the THR-empty
interrupt is off, and unless loopback turns them into received data that
interrupts.  The bus hands them over before the guest's next access to the
UART, so a console that polls LSR before each byte (Linux's, SeaBIOS's,
GRUB's) leaves the guest once a byte instead of twice.

The vCPU threads and the backend's I/O thread (through `receive`) both reach
the state, so every access holds the UART's lock.
"""

import threading
from collections import deque

from ..boot import aml
from ..lifecycle import ACPI_ISA, Device, decode, encode, expect_keys, flag, uint

COM_PORTS = {
    "com1": (0x3F8, 4),
    "com2": (0x2F8, 3),
    "com3": (0x3E8, 4),
    "com4": (0x2E8, 3),
}

REG_DATA = 0        # RBR (read) / THR (write); DLL while LCR.DLAB
REG_IER = 1         # DLM while LCR.DLAB
REG_IIR = 2         # IIR (read) / FCR (write)
REG_LCR = 3
REG_MCR = 4
REG_LSR = 5
REG_MSR = 6
REG_SCR = 7

IER_ERBFI = 0x01    # received data available
IER_ETBEI = 0x02    # THR empty
IER_ELSI = 0x04     # line status
IER_EDSSI = 0x08    # modem status
IER_MASK = 0x0F

IIR_NOPEND = 0x01
IIR_MSR = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_TIMEOUT = 0x0C  # data below the FIFO trigger level
IIR_FIFO = 0xC0     # FIFOs enabled (a 16550A, not a 16550)

FCR_ENABLE = 0x01
FCR_RX_RESET = 0x02
FCR_DMA = 0x08
FCR_TRIGGER = 0xC0
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_DELTA = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FIFO_SIZE = 16
PENDING_LIMIT = 4096
DEFAULT_DIVISOR = 1     # 115200 baud from the 1.8432 MHz clock, as bhyve sets it

_BYTES = tuple(bytes((value,)) for value in range(256))   # no allocation per THR write


def modem_status(mcr: int) -> int:
    """MSR's status bits: MCR's outputs in loopback, else a cable that is always ready.

    bhyve asserts DCD and DSR so that opening the tty never waits for carrier;
    CTS is asserted too, so a guest using RTS/CTS flow control can send."""
    if not mcr & MCR_LOOP:
        return MSR_DCD | MSR_DSR | MSR_CTS
    return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0) |
            (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))


def acpi_device(name: str, port: int, irq: int) -> bytes:
    """COMn (PNP0501) with _UID n, as firmware describes a PC's serial ports."""
    return aml.device(name.upper(), aml.name("_HID", aml.eisa_id("PNP0501")),
                      aml.name("_UID", int(name.removeprefix("com"))),
                      aml.name("_CRS", aml.resource_template(aml.io(port, port, 1, 8),
                                                             aml.irq_no_flags(irq))))


class Uart16550(Device):
    """One COM port: 8 registers at `base_port`, ISA interrupt `irq`, host side `backend`.

    `backend` is a pyhyve.devices.chardev.Backend, or None for a port with
    nothing attached (output is dropped, no input arrives)."""

    savable = True

    def __init__(self, context, name: str, base_port: int, irq: int, backend):
        self.context = context
        self.name = name
        self.base_port = base_port
        self.irq = irq
        self._line = context.irq_line(irq)
        self.backend = backend
        self.rx_dropped = 0             # host input bytes lost to a full pending buffer
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._pending = bytearray()
        self._irq_level = False
        self._closed = False
        self._ports = context.ports
        self._range = None
        try:
            self._range = context.ports.register(name, base_port, 8, self._read, self._write)
            self._reset_registers()
        except BaseException:
            self.close()                    # the UART owns its backend from the start
            raise
        if backend is not None:
            backend.attach(self.receive)

    def reset(self, power_on: dict) -> None:
        self._reset_registers()

    def _reset_registers(self) -> None:
        """The chip's reset state; host input still pending stays, as on a real line."""
        with self._lock:
            self._ier = 0
            self._fcr = 0
            self._lcr = 0
            self._mcr = 0
            self._scr = 0
            self._divisor = DEFAULT_DIVISOR
            self._msr = modem_status(0)
            self._overrun = False
            self._thre_pending = False
            self._rx.clear()
            self._refill()
            self._update_irq()
            self._update_thr_queueing()

    def acpi_objects(self) -> list[tuple[str, bytes]]:
        return [(ACPI_ISA, acpi_device(self.name, self.base_port, self.irq))]

    # --- snapshots ------------------------------------------------------------------
    REGISTERS = {"ier": 0xFF, "fcr": 0xFF, "lcr": 0xFF, "mcr": 0xFF, "scr": 0xFF,
                 "divisor": 0xFFFF, "msr": 0xFF}

    def save_state(self) -> dict:
        """Registers, flags, and the input the guest has not read: the receive
        FIFO first, then what waits behind it."""
        with self._lock:
            state = {field: getattr(self, f"_{field}") for field in self.REGISTERS}
            state.update(overrun=self._overrun, thre_pending=self._thre_pending,
                         pending=encode(bytes(self._rx) + self._pending))
            return state

    def restore_state(self, state: dict) -> None:
        """Into a UART built from the same config and not yet running: host input
        that arrived meanwhile stays, after the saved input."""
        expect_keys(state, (*self.REGISTERS, "overrun", "thre_pending", "pending"), self.name)
        values = {field: uint(state[field], limit, f"{self.name} {field}")
                  for field, limit in self.REGISTERS.items()}
        flags = {field: flag(state[field], f"{self.name} {field}")
                 for field in ("overrun", "thre_pending")}
        saved_input = decode(state["pending"], f"{self.name} pending input",
                             limit=PENDING_LIMIT + FIFO_SIZE)
        with self._lock:
            for field, value in values.items():
                setattr(self, f"_{field}", value)
            self._overrun, self._thre_pending = flags["overrun"], flags["thre_pending"]
            self._pending[:0] = saved_input + bytes(self._rx)   # input since start: last
            self._rx.clear()
            self._refill()
            self._update_thr_queueing()

    def receive(self, data: bytes) -> None:
        """Host input, called from the backend's I/O thread."""
        with self._lock:
            if self._closed:
                return
            self._pending += data
            self._refill()
            excess = len(self._pending) - PENDING_LIMIT
            if excess > 0:
                del self._pending[PENDING_LIMIT:]
                self.rx_dropped += excess
                self._overrun = True        # tell the guest that input was lost
                self.context.warn_once(("uart-input-dropped", self.name),
                                  "%s: guest is not reading its input; dropping bytes",
                                  self.name)
            self._update_irq()

    def close(self) -> None:
        """Stop taking input and release the backend (outside the lock: its I/O
        thread may be waiting for it in receive)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.backend is not None:
            self.backend.close()

    # --- port access (vCPU threads) -------------------------------------------------
    def _read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read_register(offset)
            self._update_irq()
        return value

    def _write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == REG_DATA and not self._lcr & LCR_DLAB:
                output = self._transmit(value)
            else:
                output = None
                self._write_register(offset, value)
                if offset in (REG_IER, REG_MCR):
                    self._update_thr_queueing()
            self._update_irq()
        if output is not None and self.backend is not None:
            self.backend.write(output)      # unlocked: a slow backend never holds up input

    def _read_register(self, offset: int) -> int:
        if offset == REG_DATA:
            if self._lcr & LCR_DLAB:
                return self._divisor & 0xFF
            if not self._rx:
                return 0
            value = self._rx.popleft()
            self._refill()
            return value
        if offset == REG_IER:
            return self._divisor >> 8 if self._lcr & LCR_DLAB else self._ier
        if offset == REG_IIR:
            reason = self._reason()
            if reason == IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THR empty
            return reason | (IIR_FIFO if self._fcr & FCR_ENABLE else 0)
        if offset == REG_LCR:
            return self._lcr
        if offset == REG_MCR:
            return self._mcr
        if offset == REG_LSR:
            value = LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0) | \
                (LSR_OE if self._overrun else 0)
            self._overrun = False
            return value
        if offset == REG_MSR:
            value = self._msr
            self._msr &= ~MSR_DELTA
            return value
        return self._scr

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == REG_DATA:              # only reached with DLAB set
            self._divisor = (self._divisor & 0xFF00) | value
        elif offset == REG_IER and dlab:
            self._divisor = (self._divisor & 0x00FF) | (value << 8)
        elif offset == REG_IER:
            if value & ~self._ier & IER_ETBEI:
                self._thre_pending = True   # enabling it with THR empty raises it
            self._ier = value & IER_MASK
        elif offset == REG_IIR:
            self._write_fcr(value)
        elif offset == REG_LCR:
            self._lcr = value
        elif offset == REG_MCR:
            self._write_mcr(value)
        elif offset == REG_SCR:
            self._scr = value
        # LSR and MSR are read-only: writes are ignored, as by the chip

    def _transmit(self, value: int) -> bytes | None:
        """THR written: the byte leaves at once, so THR is empty again."""
        self._thre_pending = True
        if not self._mcr & MCR_LOOP:
            return _BYTES[value]
        if len(self._rx) < self._rx_capacity():
            self._rx.append(value)
        else:
            self._overrun = True
        return None

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & FCR_ENABLE:
            self._rx.clear()                # switching 16450/16550 mode empties the FIFOs
        if value & FCR_ENABLE:
            if value & FCR_RX_RESET:
                self._rx.clear()
            self._fcr = value & (FCR_ENABLE | FCR_DMA | FCR_TRIGGER)
        else:
            self._fcr = 0                   # the other bits only count with FIFOs on
        self._refill()

    def _write_mcr(self, value: int) -> None:
        self._mcr = value & MCR_MASK
        old, new = self._msr, modem_status(self._mcr)
        delta = ((old ^ new) & (MSR_CTS | MSR_DSR | MSR_DCD)) >> 4
        if old & MSR_RI and not new & MSR_RI:
            delta |= MSR_TERI
        self._msr = (old & MSR_DELTA) | delta | new
        self._refill()                      # leaving loopback lets waiting input in

    # --- derived state ------------------------------------------------------------
    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _refill(self) -> None:
        """Move pending host input into the RX FIFO; loopback cuts the line off."""
        if self._pending and not self._mcr & MCR_LOOP:
            room = self._rx_capacity() - len(self._rx)
            if room > 0:
                self._rx.extend(self._pending[:room])
                del self._pending[:room]

    def _reason(self) -> int:
        """The highest-priority enabled interrupt, as IIR bits 0-3."""
        ier = self._ier
        if self._overrun and ier & IER_ELSI:
            return IIR_RLS
        if self._rx and ier & IER_ERBFI:
            if self._fcr & FCR_ENABLE and \
                    len(self._rx) < RX_TRIGGER_LEVELS[self._fcr >> 6]:
                return IIR_TIMEOUT
            return IIR_RDA
        if self._thre_pending and ier & IER_ETBEI:
            return IIR_THRE
        if self._msr & MSR_DELTA and ier & IER_EDSSI:
            return IIR_MSR
        return IIR_NOPEND

    def resync_irq(self) -> None:
        """Drive the line from the registers again (after a restore lowered it)."""
        with self._lock:
            self._irq_level = False
            self._update_irq()

    def _update_thr_queueing(self) -> None:
        """Queue THR writes while they can wait (the module docstring), else
        have them exit: called with the lock held, after IER or MCR changed."""
        if self._range is None:
            return
        if not self._ier & IER_ETBEI and not (self._mcr & MCR_LOOP and self._ier & IER_ERBFI):
            self._ports.queue_writes(self._range, self.base_port, 1)
        else:
            self._ports.unqueue_writes(self._range, self.base_port, 1)

    def _update_irq(self) -> None:
        level = (self._mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2 and \
            self._reason() != IIR_NOPEND
        if level != self._irq_level:
            self._irq_level = level
            self._line.set(level)
