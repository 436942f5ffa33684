"""`xhci`: an xHCI 1.0 USB host controller with a HID tablet, as bhyve's pci_xhci.

    -s SLOT,xhci,tablet

PCI class 0c/03/30, one 64-bit memory BAR: the capability registers, the
operational registers (and a PORTSC set for each of NUM_PORTS ports), the
runtime registers with interrupter 0, the doorbells, and the extended
capabilities that say which ports speak USB 2 (port 1) and USB 3 (port 2).
The tablet (pyhyve.usb.tablet) sits on port 1 when asked for; port 2 stays
empty.  Interrupts go out by MSI-X, MSI or INTx, whichever the driver
enabled.

The guest's software keeps its rings in its memory: the command ring (a
doorbell 0 write runs it: Enable Slot, Disable Slot, Address Device,
Configure Endpoint, Evaluate Context, Reset Endpoint, Stop Endpoint, Set TR
Dequeue Pointer, Reset Device, No Op), a transfer ring per endpoint (a slot
doorbell runs it: control transfers on endpoint 0, the tablet's reports on
its interrupt IN endpoint), and the event ring, described by the event ring
segment table, where the controller posts completions and port changes.
Device contexts live in guest memory too; the controller keeps its own copy
of each endpoint's ring position and state, and writes the output context
as the specification says (a command that changes it, a halt).

Everything runs under the device lock, on the vCPU thread that wrote a
doorbell or register, or on the router's caller that brought a report.  The
guest's numbers (ring and context addresses, TRB fields, slot and endpoint
IDs) are checked: a ring in memory that is not RAM, a TD without end or a
loop of Link TRBs makes the controller report an error (Host System Error,
TRB Error, a halted endpoint), never touch memory outside the guest or spin.
A snapshot keeps the registers, the rings' positions, the slots, the ports
and the tablet; what is in guest memory is in the memory snapshot.
"""

import struct
import threading
import time

from ..config import ConfigError
from ..lifecycle import StateError, expect_keys, uint
from ..memory import GuestMemoryError
from ..pci import BAR_MEM64, PciDevice, emulation
from ..pci.options import Option
from .tablet import UsbTablet

VENDOR_ID, DEVICE_ID = 0x1B36, 0x000D       # QEMU's qemu-xhci (Red Hat's PCI IDs)
CLASS_XHCI = 0x0C0330
BAR_SIZE = 0x4000
MAX_SLOTS = 8
NUM_PORTS = 2                   # port 1: USB 2 (the tablet's), port 2: USB 3
USB2_PORT, USB3_PORT = 1, 2
ERST_MAX = 4                    # up to 2^4 event ring segments
RING_BUDGET = 1024              # TRBs one doorbell may make the controller read
TD_LIMIT = 64                   # TRBs one transfer descriptor may span

# register blocks in the BAR
CAP_LENGTH = 0x20
OPERATIONAL = CAP_LENGTH
PORTS = OPERATIONAL + 0x400
EXTENDED_CAPS = 0x800
RUNTIME = 0x1000
INTERRUPTER_0 = RUNTIME + 0x20
DOORBELLS = 0x2000
MSIX_TABLE, MSIX_PBA = 0x3000, 0x3800

# capability registers
HCIVERSION = 0x0100
HCSPARAMS1 = MAX_SLOTS | 1 << 8 | NUM_PORTS << 24      # slots, one interrupter, ports
HCSPARAMS2 = ERST_MAX << 4
HCCPARAMS1 = 0x1 | (EXTENDED_CAPS // 4) << 16           # 64-bit addresses, 32-byte contexts;
# no port power control: PORTSC's PP stays set

# operational registers (offsets from OPERATIONAL)
USBCMD, USBSTS, PAGESIZE, DNCTRL = 0x00, 0x04, 0x08, 0x14
CRCR_LO, CRCR_HI, DCBAAP_LO, DCBAAP_HI, CONFIG = 0x18, 0x1C, 0x30, 0x34, 0x38
CMD_RUN, CMD_HCRST, CMD_INTE, CMD_HSEE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
CMD_EWE = 1 << 10
CMD_WRITABLE = CMD_RUN | CMD_INTE | CMD_HSEE | CMD_EWE    # save/restore (CSS, CRS) finish at once
STS_HCH, STS_HSE, STS_EINT, STS_PCD, STS_SRE = 1, 1 << 2, 1 << 3, 1 << 4, 1 << 10
STS_W1C = STS_HSE | STS_EINT | STS_PCD | STS_SRE
CRCR_RCS, CRCR_CS, CRCR_CA = 1, 2, 4

# PORTSC
PORT_CCS, PORT_PED, PORT_PR, PORT_PP = 1 << 0, 1 << 1, 1 << 4, 1 << 9
PORT_PLS_SHIFT, PORT_PLS_MASK = 5, 0xF << 5
PORT_SPEED_SHIFT = 10
PORT_LWS = 1 << 16
PORT_CSC, PORT_PEC, PORT_WRC, PORT_OCC, PORT_PRC, PORT_PLC, PORT_CEC = (1 << n for n in
                                                                       range(17, 24))
PORT_CHANGES = PORT_CSC | PORT_PEC | PORT_WRC | PORT_OCC | PORT_PRC | PORT_PLC | PORT_CEC
PORT_WAKE_BITS = 0x7 << 25
PORT_WPR = 1 << 31
PLS_U0, PLS_U3, PLS_RX_DETECT, PLS_POLLING = 0, 3, 5, 7
SPEED_HIGH = 3

# interrupter registers (offsets from INTERRUPTER_0)
IMAN, IMOD, ERSTSZ, ERSTBA_LO, ERSTBA_HI, ERDP_LO, ERDP_HI = 0x00, 0x04, 0x08, 0x10, 0x14, \
    0x18, 0x1C
IMAN_IP, IMAN_IE = 1, 2
ERDP_EHB = 1 << 3

# TRBs: types (control bits 15:10) and fields
TRB_NORMAL, TRB_SETUP, TRB_DATA, TRB_STATUS, TRB_LINK = 1, 2, 3, 4, 6
CMD_ENABLE_SLOT, CMD_DISABLE_SLOT, CMD_ADDRESS_DEVICE, CMD_CONFIGURE_ENDPOINT = 9, 10, 11, 12
CMD_EVALUATE_CONTEXT, CMD_RESET_ENDPOINT, CMD_STOP_ENDPOINT, CMD_SET_TR_DEQUEUE = 13, 14, 15, 16
CMD_RESET_DEVICE, CMD_NOOP = 17, 23
SLOT_COMMANDS = frozenset((CMD_DISABLE_SLOT, CMD_ADDRESS_DEVICE, CMD_CONFIGURE_ENDPOINT,
                           CMD_EVALUATE_CONTEXT, CMD_RESET_ENDPOINT, CMD_STOP_ENDPOINT,
                           CMD_SET_TR_DEQUEUE, CMD_RESET_DEVICE))
EVENT_TRANSFER, EVENT_COMMAND_COMPLETION, EVENT_PORT_STATUS_CHANGE = 32, 33, 34
TRB_CYCLE, TRB_TOGGLE_CYCLE, TRB_ISP, TRB_CHAIN, TRB_IOC, TRB_IDT = 1, 2, 4, 0x10, 0x20, 0x40
TRB_BSR = 1 << 9                # Address Device: block SET_ADDRESS
TRB_DECONFIGURE = 1 << 9        # Configure Endpoint
TRB_DIR_IN = 1 << 16            # Data Stage
_TRB = struct.Struct("<QII")

# completion codes
SUCCESS, TRB_ERROR, STALL_ERROR, NO_SLOTS = 1, 5, 6, 9
SLOT_NOT_ENABLED, ENDPOINT_NOT_ENABLED, SHORT_PACKET = 11, 12, 13
PARAMETER_ERROR, CONTEXT_STATE_ERROR = 17, 19

# contexts (32 bytes each)
CONTEXT_SIZE = 32
SLOT_DISABLED_OR_ENABLED, SLOT_DEFAULT, SLOT_ADDRESSED, SLOT_CONFIGURED = 0, 1, 2, 3
EP_DISABLED, EP_RUNNING, EP_HALTED, EP_STOPPED = 0, 1, 2, 3
EP0, EP1_IN = 1, 3              # device context indices (DCI)


class RingCursor:
    """Where the controller reads a ring: the next TRB's address and the cycle
    state it expects there."""

    __slots__ = ("dequeue", "cycle")

    def __init__(self, dequeue: int = 0, cycle: int = 1):
        self.dequeue, self.cycle = dequeue, cycle


class Endpoint:
    __slots__ = ("state", "ring")

    def __init__(self, dequeue: int, cycle: int):
        self.state = EP_RUNNING
        self.ring = RingCursor(dequeue, cycle)


class Slot:
    """A device slot the guest enabled: its state, root port, output context and endpoints."""

    __slots__ = ("state", "port", "context", "endpoints")

    def __init__(self):
        self.state = SLOT_DISABLED_OR_ENABLED
        self.port = 0
        self.context = 0                            # the output device context's address
        self.endpoints: dict[int, Endpoint] = {}    # by DCI


class CommandError(Exception):
    """A command or transfer that fails with a completion code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@emulation("xhci")
class XhciController(PciDevice):
    """xHCI controller with a USB tablet: tablet (bhyve's xhci,tablet)"""

    savable = True
    options = (Option("slot.N.device", "text", None,
                      "the USB device on USB 2 port N (only 1): tablet"),)

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """bhyve's pci_xhci_legacy_config: each device name takes the next port."""
        options = {}
        for number, name in enumerate(filter(None, text.split(",")), 1):
            options[f"slot.{number}.device"] = name
        return options

    def init(self, options: dict[str, str]) -> None:
        self.lock = threading.RLock()
        self._paused = False
        self.tablet: UsbTablet | None = None
        for key, name in options.items():
            if key != f"slot.{USB2_PORT}.device":
                raise ConfigError(f"xhci: no USB 2 port for '{key}' (the controller has one)")
            if name != "tablet":
                raise ConfigError(f"xhci: unknown USB device '{name}' (it has: tablet)")
            self.tablet = UsbTablet(self.lock, self._tablet_report,
                                    self.context.input.activate)
        self.set_ids(VENDOR_ID, DEVICE_ID, CLASS_XHCI, revision=1,
                     subsystem_vendor=0x1AF4, subsystem=0x1100)
        self.set_interrupt_pin(1)
        self.add_bar(0, BAR_MEM64, BAR_SIZE)
        self.add_msi(1)
        self.add_msix(1, 0, MSIX_TABLE, MSIX_PBA)
        self._controller_reset()
        if self.tablet is not None:
            self.context.input.add_pointer(self.tablet)

    def teardown(self) -> None:
        if self.tablet is not None:
            self.context.input.remove(self.tablet)

    def _controller_reset(self) -> None:
        """Power on, or HCRST: halted, every register at its default, slots
        disabled, ports as their devices leave them."""
        self.usbcmd = 0
        self.usbsts = STS_HCH
        self.dnctrl = 0
        self.command_ring = RingCursor()
        self.dcbaap = 0
        self.config_register = 0
        self.iman = self.imod = self.erstsz = self.erstba = self.erdp = 0
        self.imod = 4000            # the specification's default: 1 ms
        self.event_segment = self.event_index = 0
        self.event_cycle = 1
        self.slots: dict[int, Slot] = {}
        self.portsc = [0] * NUM_PORTS
        for number in range(1, NUM_PORTS + 1):
            self._port_power_on(number)
        if self.tablet is not None:
            self.tablet.reset()
        self.deassert_intx()

    def _port_power_on(self, number: int) -> None:
        if number == USB2_PORT and self.tablet is not None:
            self.portsc[number - 1] = PORT_PP | PORT_CCS | PORT_CSC | \
                PLS_POLLING << PORT_PLS_SHIFT | SPEED_HIGH << PORT_SPEED_SHIFT
        else:
            self.portsc[number - 1] = PORT_PP | PLS_RX_DETECT << PORT_PLS_SHIFT

    # --- register access --------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        with self.lock:
            if size == 8:
                return self._read32(offset) | self._read32(offset + 4) << 32
            shift = 8 * (offset & 3)
            return (self._read32(offset & ~3) >> shift) & ((1 << (8 * size)) - 1)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            if size == 8 and not offset & 7:
                self._write32(offset, value & 0xFFFFFFFF)
                self._write32(offset + 4, value >> 32)
            elif size == 4 and not offset & 3:
                self._write32(offset, value)
            else:
                self.warn_once(f"width-{offset:#x}-{size}", "ignored %d-byte write at %#x "
                               "(registers take 32-bit writes)", size, offset)

    def _read32(self, offset: int) -> int:
        if offset < CAP_LENGTH:
            return {0x00: CAP_LENGTH | HCIVERSION << 16, 0x04: HCSPARAMS1, 0x08: HCSPARAMS2,
                    0x10: HCCPARAMS1, 0x14: DOORBELLS, 0x18: RUNTIME}.get(offset, 0)
        if PORTS <= offset < PORTS + 0x10 * NUM_PORTS:
            return self.portsc[(offset - PORTS) // 0x10] if offset % 0x10 == 0 else 0
        if OPERATIONAL <= offset < PORTS:
            return self._operational_read(offset - OPERATIONAL)
        if EXTENDED_CAPS <= offset < EXTENDED_CAPS + len(_SUPPORTED_PROTOCOLS):
            return int.from_bytes(_SUPPORTED_PROTOCOLS[offset - EXTENDED_CAPS:
                                                       offset - EXTENDED_CAPS + 4], "little")
        if offset == RUNTIME:
            return self._mfindex()
        if INTERRUPTER_0 <= offset < INTERRUPTER_0 + 0x20:
            return self._interrupter_read(offset - INTERRUPTER_0)
        return 0            # doorbells read as 0, and so does everything unassigned

    def _operational_read(self, at: int) -> int:
        if at == USBCMD:
            return self.usbcmd
        if at == USBSTS:
            return self.usbsts
        if at == PAGESIZE:
            return 1            # 4 KiB pages
        if at == DNCTRL:
            return self.dnctrl
        if at == DCBAAP_LO:
            return self.dcbaap & 0xFFFFFFFF
        if at == DCBAAP_HI:
            return self.dcbaap >> 32
        if at == CONFIG:
            return self.config_register
        return 0                # CRCR reads as zero: the ring is stopped between doorbells

    def _interrupter_read(self, at: int) -> int:
        return {IMAN: self.iman, IMOD: self.imod, ERSTSZ: self.erstsz,
                ERSTBA_LO: self.erstba & 0xFFFFFFFF, ERSTBA_HI: self.erstba >> 32,
                ERDP_LO: self.erdp & 0xFFFFFFFF, ERDP_HI: self.erdp >> 32}.get(at, 0)

    def _mfindex(self) -> int:
        """The microframe index: 125 us frames while the controller runs."""
        return int(time.monotonic() * 8000) & 0x3FFF if self.usbcmd & CMD_RUN else 0

    def _write32(self, offset: int, value: int) -> None:
        if PORTS <= offset < PORTS + 0x10 * NUM_PORTS:
            if offset % 0x10 == 0:
                self._port_write(1 + (offset - PORTS) // 0x10, value)
        elif OPERATIONAL <= offset < PORTS:
            self._operational_write(offset - OPERATIONAL, value)
        elif INTERRUPTER_0 <= offset < INTERRUPTER_0 + 0x20:
            self._interrupter_write(offset - INTERRUPTER_0, value)
        elif DOORBELLS <= offset <= DOORBELLS + 4 * MAX_SLOTS:
            self._doorbell((offset - DOORBELLS) // 4, value & 0xFF)

    def _operational_write(self, at: int, value: int) -> None:
        if at == USBCMD:
            if value & CMD_HCRST:
                self._controller_reset()
                return
            old, self.usbcmd = self.usbcmd, value & CMD_WRITABLE
            if self.usbcmd & CMD_RUN and not old & CMD_RUN:
                self.usbsts &= ~STS_HCH
                for number in range(1, NUM_PORTS + 1):
                    if self.portsc[number - 1] & PORT_CHANGES:
                        self._port_event(number)
            elif old & CMD_RUN and not self.usbcmd & CMD_RUN:
                self.usbsts |= STS_HCH
            self._update_interrupt()
        elif at == USBSTS:
            self.usbsts &= ~(value & STS_W1C)
        elif at == DNCTRL:
            self.dnctrl = value & 0xFFFF
        elif at == CRCR_LO:
            if value & (CRCR_CS | CRCR_CA):
                return          # nothing runs between doorbells: stopped already
            self.command_ring = RingCursor((self.command_ring.dequeue & ~0xFFFFFFFF) |
                                           (value & ~0x3F), value & CRCR_RCS)
        elif at == CRCR_HI:
            self.command_ring.dequeue = (self.command_ring.dequeue & 0xFFFFFFFF) | value << 32
        elif at == DCBAAP_LO:
            self.dcbaap = (self.dcbaap & ~0xFFFFFFFF) | (value & ~0x3F)
        elif at == DCBAAP_HI:
            self.dcbaap = (self.dcbaap & 0xFFFFFFFF) | value << 32
        elif at == CONFIG:
            self.config_register = min(value & 0xFF, MAX_SLOTS) | (value & 0x300)

    def _interrupter_write(self, at: int, value: int) -> None:
        if at == IMAN:
            self.iman = (self.iman & ~value & IMAN_IP) | (value & IMAN_IE)
            if not self.iman & IMAN_IP:
                self.deassert_intx()
            self._update_interrupt()
        elif at == IMOD:
            self.imod = value
        elif at == ERSTSZ:
            self.erstsz = value & 0xFFFF
        elif at in (ERSTBA_LO, ERSTBA_HI):
            # writing the table's address (re)starts the event ring at its first segment
            if at == ERSTBA_LO:
                self.erstba = (self.erstba & ~0xFFFFFFFF) | (value & ~0x3F)
            else:
                self.erstba = (self.erstba & 0xFFFFFFFF) | value << 32
            self.event_segment = self.event_index = 0
            self.event_cycle = 1
        elif at == ERDP_LO:
            busy = self.erdp & ERDP_EHB and not value & ERDP_EHB
            self.erdp = (self.erdp & ~0xFFFFFFFF) | (value & ~0xF) | (ERDP_EHB if busy else 0)
            self._update_interrupt()
        elif at == ERDP_HI:
            self.erdp = (self.erdp & 0xFFFFFFFF) | value << 32

    # --- ports -------------------------------------------------------------------------------
    def _port_write(self, number: int, value: int) -> None:
        old = self.portsc[number - 1]
        new = old & ~(value & PORT_CHANGES)
        new = (new & ~PORT_WAKE_BITS) | (value & PORT_WAKE_BITS)
        if value & PORT_PED:                    # writing 1 disables the port
            new &= ~PORT_PED
        if value & PORT_LWS and new & PORT_PED:
            state = (value & PORT_PLS_MASK) >> PORT_PLS_SHIFT
            if state in (PLS_U0, PLS_U3):
                current = (new & PORT_PLS_MASK) >> PORT_PLS_SHIFT
                new = (new & ~PORT_PLS_MASK) | state << PORT_PLS_SHIFT
                if current == PLS_U3 and state == PLS_U0:
                    new |= PORT_PLC             # resumed
        self.portsc[number - 1] = new
        if value & (PORT_PR | PORT_WPR):
            self._port_reset(number, warm=bool(value & PORT_WPR))
        elif new & PORT_CHANGES & ~old:
            self._port_event(number)

    def _port_reset(self, number: int, warm: bool) -> None:
        """A reset completes at once: the device is reset and the port enabled."""
        portsc = self.portsc[number - 1]
        if not portsc & PORT_CCS:
            if warm:
                self.portsc[number - 1] = portsc | PORT_WRC | PORT_PRC
                self._port_event(number)
            return
        if number == USB2_PORT and self.tablet is not None:
            self.tablet.reset()
        self.portsc[number - 1] = (portsc & ~PORT_PLS_MASK) | PORT_PED | PORT_PRC | \
            (PORT_WRC if warm else 0) | PLS_U0 << PORT_PLS_SHIFT
        self._port_event(number)

    def _port_event(self, number: int) -> None:
        self.usbsts |= STS_PCD
        self._post_event(number << 24, SUCCESS << 24, EVENT_PORT_STATUS_CHANGE << 10)

    # --- the event ring and interrupts -------------------------------------------------------
    def _segment(self, index: int) -> tuple[int, int]:
        """(base, TRB count) of event ring segment INDEX, from the guest's table."""
        base, size = struct.unpack("<QI", self.context.memory.read(self.erstba + 16 * index, 12))
        return base & ~0x3F, size & 0xFFFF

    def _post_event(self, parameter: int, status: int, control: int) -> None:
        """Put an event on the ring and interrupt; a full or broken ring loses it."""
        if not self.usbcmd & CMD_RUN or not self.erstsz:
            return
        try:
            base, size = self._segment(self.event_segment)
            if size < 16 or size > 4096:
                raise GuestMemoryError(f"event ring segment of {size} TRBs")
            segment, index, cycle = self.event_segment, self.event_index + 1, self.event_cycle
            if index == size:
                segment, index = segment + 1, 0
                if segment >= min(self.erstsz, 1 << ERST_MAX):
                    segment, cycle = 0, cycle ^ 1
                following = self._segment(segment)[0] + 16 * index
            else:
                following = base + 16 * index
            if following == self.erdp & ~0xF:
                self.warn_once("event-ring-full", "event ring full: events lost")
                return
            address = base + 16 * self.event_index
            view = self.context.memory.view(address, 16, write=True)
        except GuestMemoryError as exc:
            self.warn_once("event-ring", "event ring not in guest RAM (%s): host system error",
                           exc)
            self.usbsts |= STS_HSE
            return
        struct.pack_into("<QI", view, 0, parameter, status)
        struct.pack_into("<I", view, 12, control | self.event_cycle)   # the cycle bit last
        self.event_segment, self.event_index, self.event_cycle = segment, index, cycle
        self._update_interrupt()

    def _events_waiting(self) -> bool:
        try:
            base = self._segment(self.event_segment)[0]
        except GuestMemoryError:
            return False
        return base + 16 * self.event_index != self.erdp & ~0xF

    def _update_interrupt(self) -> None:
        """Interrupt when events wait and the driver's handler is not busy with
        earlier ones (ERDP's EHB, which it clears when it has caught up)."""
        if not self.usbcmd & CMD_RUN or self.erdp & ERDP_EHB or not self._events_waiting():
            return
        self.erdp |= ERDP_EHB
        self.iman |= IMAN_IP
        self.usbsts |= STS_EINT
        if not self.iman & IMAN_IE or not self.usbcmd & CMD_INTE:
            return
        if self.msix.enabled or self.msi.enabled:
            self.raise_interrupt(0)
            self.iman &= ~IMAN_IP       # a message clears IP once sent
        else:
            self.assert_intx()

    # --- rings ----------------------------------------------------------------------------------
    def _read_trb(self, address: int) -> tuple[int, int, int]:
        return _TRB.unpack(self.context.memory.read(address, 16))

    def _next_trb(self, ring: RingCursor, budget: list[int]):
        """(address, parameter, status, control) of the ring's next TRB past any
        Link TRBs (ring advanced past them), or None where the guest has not
        written one yet; GuestMemoryError, or CommandError(TRB_ERROR) when
        BUDGET (a one-item list, shared across calls) runs out."""
        while True:
            if budget[0] <= 0:
                raise CommandError(TRB_ERROR)
            budget[0] -= 1
            parameter, status, control = self._read_trb(ring.dequeue)
            if control & TRB_CYCLE != ring.cycle:
                return None
            if (control >> 10) & 0x3F != TRB_LINK:
                return ring.dequeue, parameter, status, control
            ring.dequeue = parameter & ~0xF
            if control & TRB_TOGGLE_CYCLE:
                ring.cycle ^= 1

    def _read_td(self, ring: RingCursor, ends):
        """The TRBs of the next transfer descriptor, up to the one ENDS(control)
        accepts, and the cursor past it; None while the guest is still writing it."""
        cursor = RingCursor(ring.dequeue, ring.cycle)
        budget = [RING_BUDGET]
        trbs = []
        while len(trbs) < TD_LIMIT:
            trb = self._next_trb(cursor, budget)
            if trb is None:
                return None
            trbs.append(trb)
            cursor.dequeue += 16
            if ends(trb[3]):
                return trbs, cursor
        raise CommandError(TRB_ERROR)

    # --- the command ring -------------------------------------------------------------------
    def _doorbell(self, target: int, value: int) -> None:
        if not self.usbcmd & CMD_RUN:
            return
        if target == 0:
            self._run_commands()
            return
        slot = self.slots.get(target)
        endpoint = slot.endpoints.get(value) if slot else None
        if endpoint is None:
            self.warn_once(f"doorbell-{target}-{value}", "doorbell for slot %d endpoint %d, "
                           "which is not enabled", target, value)
            return
        if endpoint.state == EP_STOPPED:
            endpoint.state = EP_RUNNING
        if endpoint.state == EP_RUNNING:
            self._run_endpoint(target, value)

    def _run_commands(self) -> None:
        ring = self.command_ring
        budget = [RING_BUDGET]
        while True:
            try:
                trb = self._next_trb(ring, budget)
            except (GuestMemoryError, CommandError) as exc:
                self.warn_once("command-ring", "command ring unusable (%s): host system error",
                               exc)
                self.usbsts |= STS_HSE
                return
            if trb is None:
                return
            address, parameter, status, control = trb
            ring.dequeue += 16
            slot_id = control >> 24
            try:
                code, slot_id = self._command((control >> 10) & 0x3F, parameter, control,
                                              slot_id)
            except CommandError as exc:
                code = exc.code
            except GuestMemoryError as exc:
                self.warn_once("context", "a command's context is not in guest RAM: %s", exc)
                code = PARAMETER_ERROR
            self._post_event(address, code << 24,
                             EVENT_COMMAND_COMPLETION << 10 | slot_id << 24)

    def _command(self, kind: int, parameter: int, control: int, slot_id: int):
        """Carry out one command: (completion code, slot ID for the event)."""
        if kind == CMD_NOOP:
            return SUCCESS, 0
        if kind == CMD_ENABLE_SLOT:
            enabled = self.config_register & 0xFF
            free = next((number for number in range(1, enabled + 1)
                         if number not in self.slots), None)
            if free is None:
                return NO_SLOTS, 0
            self.slots[free] = Slot()
            return SUCCESS, free
        if kind not in SLOT_COMMANDS:
            return TRB_ERROR, 0
        slot = self.slots.get(slot_id)
        if slot is None:
            return SLOT_NOT_ENABLED, slot_id
        if kind == CMD_DISABLE_SLOT:
            del self.slots[slot_id]
            return SUCCESS, slot_id
        if kind == CMD_ADDRESS_DEVICE:
            return self._address_device(slot_id, slot, parameter, control), slot_id
        if kind == CMD_CONFIGURE_ENDPOINT:
            return self._configure_endpoint(slot, parameter, control), slot_id
        if kind == CMD_EVALUATE_CONTEXT:
            return self._evaluate_context(slot, parameter), slot_id
        if kind == CMD_RESET_DEVICE:
            if slot.state in (SLOT_DISABLED_OR_ENABLED, SLOT_DEFAULT):
                return CONTEXT_STATE_ERROR, slot_id
            slot.endpoints = {EP0: slot.endpoints[EP0]}
            slot.state = SLOT_DEFAULT
            self._write_slot_context(slot, context_entries=1)
            return SUCCESS, slot_id
        dci = (control >> 16) & 0x1F
        endpoint = slot.endpoints.get(dci)
        if endpoint is None:
            return ENDPOINT_NOT_ENABLED, slot_id
        if kind == CMD_RESET_ENDPOINT:
            if endpoint.state != EP_HALTED:
                return CONTEXT_STATE_ERROR, slot_id
            endpoint.state = EP_STOPPED
        elif kind == CMD_STOP_ENDPOINT:
            if endpoint.state != EP_RUNNING:
                return CONTEXT_STATE_ERROR, slot_id
            endpoint.state = EP_STOPPED
        else:               # CMD_SET_TR_DEQUEUE
            if endpoint.state not in (EP_STOPPED, EP_HALTED):
                return CONTEXT_STATE_ERROR, slot_id
            endpoint.ring = RingCursor(parameter & ~0xF, parameter & 1)
        self._write_endpoint_context(slot, dci, endpoint)
        return SUCCESS, slot_id

    def _input_context(self, address: int) -> tuple[int, int, bytes]:
        """(drop flags, add flags, the slot and endpoint contexts) of an input context."""
        data = self.context.memory.read(address & ~0xF, CONTEXT_SIZE * 33)
        drop, add = struct.unpack_from("<II", data, 0)
        return drop, add, data[CONTEXT_SIZE:]

    def _address_device(self, slot_id: int, slot: Slot, parameter: int, control: int) -> int:
        drop, add, contexts = self._input_context(parameter)
        if add & 0x3 != 0x3:
            return PARAMETER_ERROR
        block = control & TRB_BSR
        if slot.state not in (SLOT_DISABLED_OR_ENABLED, SLOT_DEFAULT) or \
                (slot.state == SLOT_DEFAULT and block):
            return CONTEXT_STATE_ERROR
        port = contexts[6]              # root hub port number, slot context DW1 bits 23:16
        if not 1 <= port <= NUM_PORTS or not self.portsc[port - 1] & PORT_PED or \
                port != USB2_PORT or self.tablet is None:
            return TRB_ERROR            # no device answers there
        slot.context = self.context.memory.read_u64(self.dcbaap + 8 * slot_id) & ~0x3F
        self.context.memory.view(slot.context, CONTEXT_SIZE * 2, write=True)
        slot.port = port
        slot.state = SLOT_DEFAULT if block else SLOT_ADDRESSED
        ep0 = contexts[CONTEXT_SIZE:2 * CONTEXT_SIZE]
        dequeue = struct.unpack_from("<Q", ep0, 8)[0]
        slot.endpoints = {EP0: Endpoint(dequeue & ~0xF, dequeue & 1)}
        output = bytearray(contexts[:2 * CONTEXT_SIZE])
        self.context.memory.write(slot.context, bytes(output))
        self._write_slot_context(slot, context_entries=1, address=0 if block else slot_id)
        self._write_endpoint_context(slot, EP0, slot.endpoints[EP0])
        return SUCCESS

    def _configure_endpoint(self, slot: Slot, parameter: int, control: int) -> int:
        if slot.state not in (SLOT_ADDRESSED, SLOT_CONFIGURED):
            return CONTEXT_STATE_ERROR
        memory = self.context.memory
        if control & TRB_DECONFIGURE:
            drop, add, contexts = 0xFFFFFFFC, 0, b""
        else:
            drop, add, contexts = self._input_context(parameter)
        for dci in range(2, 32):
            if drop & (1 << dci) or add & (1 << dci):
                slot.endpoints.pop(dci, None)
                at = slot.context + CONTEXT_SIZE * dci
                memory.write_u32(at, memory.read_u32(at) & ~0x7 | EP_DISABLED)
            if add & (1 << dci):
                context = contexts[CONTEXT_SIZE * dci:CONTEXT_SIZE * (dci + 1)]
                dequeue = struct.unpack_from("<Q", context, 8)[0]
                endpoint = slot.endpoints[dci] = Endpoint(dequeue & ~0xF, dequeue & 1)
                memory.write(slot.context + CONTEXT_SIZE * dci, context)
                self._write_endpoint_context(slot, dci, endpoint)
        slot.state = SLOT_CONFIGURED if len(slot.endpoints) > 1 else SLOT_ADDRESSED
        entries = max(slot.endpoints)
        if add & 1:
            entries = max(entries, contexts[3] >> 3)
        self._write_slot_context(slot, context_entries=entries)
        return SUCCESS

    def _evaluate_context(self, slot: Slot, parameter: int) -> int:
        if slot.state == SLOT_DISABLED_OR_ENABLED:
            return CONTEXT_STATE_ERROR
        drop, add, contexts = self._input_context(parameter)
        memory = self.context.memory
        if add & 1:         # max exit latency and the interrupter target
            memory.write(slot.context + 4, contexts[4:6])
            memory.write(slot.context + 10, contexts[10:12])
        if add & 2:         # endpoint 0's max packet size
            memory.write(slot.context + CONTEXT_SIZE + 6, contexts[CONTEXT_SIZE + 6:
                                                                   CONTEXT_SIZE + 8])
        return SUCCESS

    def _write_slot_context(self, slot: Slot, context_entries: int, address: int | None = None):
        memory = self.context.memory
        dword0 = memory.read_u32(slot.context)
        memory.write_u32(slot.context, (dword0 & 0x07FFFFFF) | context_entries << 27)
        dword3 = memory.read_u32(slot.context + 12)
        if address is not None:
            dword3 = (dword3 & ~0xFF) | address
        memory.write_u32(slot.context + 12, (dword3 & 0x07FFFFFF) | slot.state << 27)

    def _write_endpoint_context(self, slot: Slot, dci: int, endpoint: Endpoint) -> None:
        at = slot.context + CONTEXT_SIZE * dci
        memory = self.context.memory
        memory.write_u32(at, (memory.read_u32(at) & ~0x7) | endpoint.state)
        memory.write_u64(at + 8, endpoint.ring.dequeue | endpoint.ring.cycle)

    # --- transfers -------------------------------------------------------------------------
    def _run_endpoint(self, slot_id: int, dci: int) -> None:
        slot = self.slots[slot_id]
        endpoint = slot.endpoints[dci]
        try:
            if dci == EP0:
                while endpoint.state == EP_RUNNING and self._control_td(slot_id, endpoint):
                    pass
            elif dci == EP1_IN and slot.state == SLOT_CONFIGURED:
                self.tablet.polled()
                while endpoint.state == EP_RUNNING and self.tablet.has_report() and \
                        self._report_td(slot_id, endpoint):
                    pass
            else:
                self.warn_once(f"endpoint-{dci}", "the tablet has no endpoint %d", dci)
        except (GuestMemoryError, CommandError) as exc:
            self.warn_once(f"ring-{slot_id}-{dci}", "slot %d endpoint %d: bad transfer ring "
                           "(%s): endpoint halted", slot_id, dci, exc)
            self._halt(slot, slot_id, dci, endpoint, endpoint.ring.dequeue, TRB_ERROR)

    def pause(self) -> None:
        with self.lock:
            self._paused = True

    def resume(self) -> None:
        """Reports that came while the VM was paused go to the guest now."""
        with self.lock:
            self._paused = False
            if self.tablet is not None and self.tablet.has_report():
                self._tablet_report()

    def _tablet_report(self) -> None:
        """The tablet has a report: the slot it is addressed in takes it, if
        running, unless the VM is paused (then resume() sends it)."""
        if self._paused:
            return
        for slot_id, slot in self.slots.items():
            endpoint = slot.endpoints.get(EP1_IN)
            if slot.port == USB2_PORT and endpoint and endpoint.state == EP_RUNNING and \
                    self.usbcmd & CMD_RUN:
                self._run_endpoint(slot_id, EP1_IN)

    def _halt(self, slot: Slot, slot_id: int, dci: int, endpoint: Endpoint, address: int,
              code: int) -> None:
        endpoint.state = EP_HALTED
        try:
            self._write_endpoint_context(slot, dci, endpoint)
        except GuestMemoryError:
            pass
        self._transfer_event(address, 0, code, slot_id, dci)

    def _transfer_event(self, address: int, residual: int, code: int, slot_id: int,
                        dci: int) -> None:
        self._post_event(address, code << 24 | residual,
                         EVENT_TRANSFER << 10 | dci << 16 | slot_id << 24)

    def _control_td(self, slot_id: int, endpoint: Endpoint) -> bool:
        """Serve the next control transfer on endpoint 0; False when none is whole."""
        td = self._read_td(endpoint.ring, lambda control: (control >> 10) & 0x3F == TRB_STATUS)
        if td is None:
            return False
        trbs, after = td
        setup = trbs[0]
        if (setup[3] >> 10) & 0x3F != TRB_SETUP or not setup[3] & TRB_IDT:
            raise CommandError(TRB_ERROR)
        request_type, request, value, index, length = struct.unpack("<BBHHH",
                                                                    setup[1].to_bytes(8, "little"))
        data_trbs = [trb for trb in trbs[1:-1] if (trb[3] >> 10) & 0x3F in (TRB_DATA,
                                                                              TRB_NORMAL)]
        status_trb = trbs[-1]
        memory = self.context.memory
        out = b""
        if not request_type & 0x80:
            out = b"".join(_trb_data(memory, trb) for trb in data_trbs)[:length]
        answer = self.tablet.control(request_type, request, value, index, length, out)
        slot = self.slots[slot_id]
        if answer is None:
            stalled = data_trbs[0][0] if data_trbs else status_trb[0]
            self._halt(slot, slot_id, EP0, endpoint, stalled, STALL_ERROR)
            return False
        endpoint.ring = after
        if request_type & 0x80:
            self._scatter(slot_id, EP0, data_trbs, answer)
        else:
            for trb in data_trbs:
                if trb[3] & TRB_IOC:
                    self._transfer_event(trb[0], 0, SUCCESS, slot_id, EP0)
        if status_trb[3] & TRB_IOC:
            self._transfer_event(status_trb[0], 0, SUCCESS, slot_id, EP0)
        return True

    def _scatter(self, slot_id: int, dci: int, trbs: list, data: bytes) -> None:
        """Write DATA into the TRBs' buffers, with their events: one for a TRB
        with IOC, or for the one the data ran short in (ISP or IOC), which ends
        the transfer."""
        memory = self.context.memory
        done = 0
        for address, parameter, status, control in trbs:
            length = status & 0x1FFFF
            count = min(length, len(data) - done)
            if count:
                memory.write(parameter, data[done:done + count])
            done += count
            if count < length:
                if control & (TRB_ISP | TRB_IOC):
                    self._transfer_event(address, length - count, SHORT_PACKET, slot_id, dci)
                return
            if control & TRB_IOC:
                self._transfer_event(address, 0, SUCCESS, slot_id, dci)

    def _report_td(self, slot_id: int, endpoint: Endpoint) -> bool:
        """Give the tablet's report to the next TD on its interrupt endpoint."""
        td = self._read_td(endpoint.ring, lambda control: not control & TRB_CHAIN)
        if td is None:
            return False
        trbs, after = td
        if any((trb[3] >> 10) & 0x3F != TRB_NORMAL for trb in trbs):
            raise CommandError(TRB_ERROR)
        endpoint.ring = after
        self._scatter(slot_id, EP1_IN, trbs, self.tablet.take_report())
        return True

    # --- snapshots ----------------------------------------------------------------------------
    REGISTERS = (("usbcmd", CMD_WRITABLE), ("usbsts", 0x1FFF), ("dnctrl", 0xFFFF),
                 ("dcbaap", (1 << 64) - 1), ("config_register", 0x3FF), ("iman", 0x3),
                 ("imod", 0xFFFFFFFF), ("erstsz", 0xFFFF), ("erstba", (1 << 64) - 1),
                 ("erdp", (1 << 64) - 1), ("event_segment", (1 << ERST_MAX) - 1),
                 ("event_index", 4095), ("event_cycle", 1))

    def save_state(self) -> dict:
        with self.lock:
            state = super().save_state()
            state["xhci"] = {
                **{name: getattr(self, name) for name, _ in self.REGISTERS},
                "command_ring": [self.command_ring.dequeue, self.command_ring.cycle],
                "portsc": list(self.portsc),
                "slots": {str(number): {
                    "state": slot.state, "port": slot.port, "context": slot.context,
                    "endpoints": {str(dci): [endpoint.state, endpoint.ring.dequeue,
                                             endpoint.ring.cycle]
                                  for dci, endpoint in slot.endpoints.items()}}
                    for number, slot in self.slots.items()},
                "tablet": None if self.tablet is None else self.tablet.save_state()}
        return state

    def restore_state(self, state: dict) -> None:
        owner = f"xhci {self.bdf}"
        saved = state.get("xhci") if isinstance(state, dict) else None
        expect_keys(saved, [name for name, _ in self.REGISTERS] +
                    ["command_ring", "portsc", "slots", "tablet"], owner)
        registers = {name: uint(saved[name], limit, f"{owner} {name}")
                     for name, limit in self.REGISTERS}
        command_ring = _ring(saved["command_ring"], f"{owner} command ring")
        portsc = saved["portsc"]
        if not isinstance(portsc, list) or len(portsc) != NUM_PORTS:
            raise StateError(f"{owner} portsc must list {NUM_PORTS} ports")
        portsc = [uint(value, 0xFFFFFFFF, f"{owner} PORTSC") for value in portsc]
        slots = _slots(saved["slots"], owner)
        if (saved["tablet"] is None) != (self.tablet is None):
            raise StateError(f"{owner}: the snapshot's USB devices differ")
        if self.tablet is not None:
            self.tablet.restore_state(saved["tablet"])
        super().restore_state(state)
        with self.lock:
            for name, value in registers.items():
                setattr(self, name, value)
            self.command_ring, self.portsc, self.slots = command_ring, portsc, slots

    def resync_irq(self) -> None:
        with self.lock:
            if self.iman & IMAN_IP and self.iman & IMAN_IE and self.usbcmd & CMD_INTE and \
                    not (self.msix.enabled or self.msi.enabled):
                self.assert_intx()


def _trb_data(memory, trb) -> bytes:
    """An OUT TRB's data: in the TRB itself (IDT) or in guest memory."""
    address, parameter, status, control = trb
    length = status & 0x1FFFF
    if control & TRB_IDT:
        return parameter.to_bytes(8, "little")[:min(length, 8)]
    return memory.read(parameter, length)


def _ring(value, what: str) -> RingCursor:
    if not isinstance(value, list) or len(value) != 2:
        raise StateError(f"{what} must be [dequeue, cycle]")
    return RingCursor(uint(value[0], (1 << 64) - 1, what), uint(value[1], 1, what))


def _slots(saved, owner: str) -> dict[int, Slot]:
    if not isinstance(saved, dict):
        raise StateError(f"{owner} slots must be an object")
    slots = {}
    for key, fields in saved.items():
        if not key.isdigit() or not 1 <= int(key) <= MAX_SLOTS:
            raise StateError(f"{owner} has no slot {key!r}")
        what = f"{owner} slot {key}"
        expect_keys(fields, ("state", "port", "context", "endpoints"), what)
        slot = Slot()
        slot.state = uint(fields["state"], SLOT_CONFIGURED, f"{what} state")
        slot.port = uint(fields["port"], NUM_PORTS, f"{what} port")
        slot.context = uint(fields["context"], (1 << 64) - 1, f"{what} context")
        endpoints = fields["endpoints"]
        if not isinstance(endpoints, dict):
            raise StateError(f"{what} endpoints must be an object")
        for dci, value in endpoints.items():
            if not dci.isdigit() or not 1 <= int(dci) <= 31 or not isinstance(value, list) \
                    or len(value) != 3:
                raise StateError(f"{what} endpoint {dci!r} must be [state, dequeue, cycle]")
            endpoint = Endpoint(0, 1)
            endpoint.state = uint(value[0], EP_STOPPED, f"{what} endpoint state")
            endpoint.ring = _ring(value[1:], f"{what} endpoint {dci} ring")
            slot.endpoints[int(dci)] = endpoint
        slots[int(key)] = slot
    return slots


def _supported_protocol(major: int, port: int, last: bool) -> bytes:
    """xHCI's Supported Protocol capability (ID 2) for one port of USB MAJOR.0."""
    return struct.pack("<BBBB4sBBHI", 2, 0 if last else 4, 0, major, b"USB ", port, 1, 0, 0)


_SUPPORTED_PROTOCOLS = _supported_protocol(2, USB2_PORT, False) + \
    _supported_protocol(3, USB3_PORT, True)
