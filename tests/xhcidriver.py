"""A small xHCI driver for tests: what Linux's xhci-hcd does, in the same order,
through config cycles and BAR accesses on a FakeVm-based VM with a PciBus.

Guest memory layout (16 MiB FakeVm): the DCBAA, a 16-TRB command ring ending
in a Link TRB, a one-segment event ring of EVENT_TRBS, an input and an output
context, a transfer ring for endpoint 0 and one for endpoint 1 IN, and data
buffers."""

import struct

from pyhyve.pci import regs as R
from pyhyve.usb import xhci as X

DCBAA, COMMANDS, ERST, EVENTS = 0x100000, 0x101000, 0x102000, 0x103000
INPUT, OUTPUT, EP0_RING, EP1_RING, DATA = 0x104000, 0x105000, 0x106000, 0x107000, 0x108000
RING_TRBS = 16
EVENT_TRBS = 32


class XhciDriver:
    def __init__(self, vm, slot: int):
        self.vm, self.slot = vm, slot
        low = self.cfg(R.BAR0, 4)
        self.base = (low & ~0xF) | self.cfg(R.BAR0 + 4, 4) << 32
        self.cfg_write(R.COMMAND, 2, R.COMMAND_MEMORY | R.COMMAND_MASTER)

    # --- access -------------------------------------------------------------------------------
    def cfg(self, offset: int, size: int) -> int:
        return self.vm.pci.config_read(0, self.slot, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.vm.pci.config_write(0, self.slot, 0, offset, size, value)

    def read(self, offset: int, size: int = 4) -> int:
        return self.vm.mmio_read(self.base + offset, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.vm.mmio_write(self.base + offset, size, value)

    def op(self, register: int) -> int:
        return self.read(X.OPERATIONAL + register)

    def portsc(self, number: int) -> int:
        return self.read(X.PORTS + 0x10 * (number - 1))

    # --- bring-up -----------------------------------------------------------------------------
    def start(self) -> None:
        """Reset, lay out the rings, run: xhci_reset(), xhci_init(), xhci_run()."""
        memory = self.vm.memory
        self.write(X.OPERATIONAL + X.USBCMD, X.CMD_HCRST)
        assert self.op(X.USBSTS) & X.STS_HCH
        for address in (DCBAA, COMMANDS, ERST, EVENTS, INPUT, OUTPUT, EP0_RING, EP1_RING):
            memory.write(address, bytes(0x1000))
        self.write(X.OPERATIONAL + X.CONFIG, X.MAX_SLOTS)
        self.write(X.OPERATIONAL + X.DCBAAP_LO, DCBAA)
        self.write(X.OPERATIONAL + X.DCBAAP_HI, 0)
        self.command_ring = Ring(memory, COMMANDS)
        self.write(X.OPERATIONAL + X.CRCR_LO, COMMANDS | 1)
        self.write(X.OPERATIONAL + X.CRCR_HI, 0)
        memory.write(ERST, struct.pack("<QII", EVENTS, EVENT_TRBS, 0))
        self.write(X.INTERRUPTER_0 + X.ERSTSZ, 1)
        self.write(X.INTERRUPTER_0 + X.ERDP_LO, EVENTS)
        self.write(X.INTERRUPTER_0 + X.ERDP_HI, 0)
        self.write(X.INTERRUPTER_0 + X.ERSTBA_LO, ERST)
        self.write(X.INTERRUPTER_0 + X.ERSTBA_HI, 0)
        self.event_dequeue, self.event_cycle = 0, 1
        self.write(X.INTERRUPTER_0 + X.IMAN, X.IMAN_IE)
        self.write(X.OPERATIONAL + X.USBCMD, X.CMD_RUN | X.CMD_INTE)
        assert not self.op(X.USBSTS) & X.STS_HCH

    def events(self) -> list[tuple[int, int, int, int]]:
        """(type, completion code, parameter, control) of each new event; the
        handler's ERDP write (EHB) after them, as xhci_irq does."""
        memory = self.vm.memory
        found = []
        while True:
            parameter, status, control = struct.unpack(
                "<QII", memory.read(EVENTS + 16 * self.event_dequeue, 16))
            if control & 1 != self.event_cycle:
                break
            found.append(((control >> 10) & 0x3F, status >> 24, parameter, control, status))
            self.event_dequeue += 1
            if self.event_dequeue == EVENT_TRBS:
                self.event_dequeue, self.event_cycle = 0, self.event_cycle ^ 1
        self.write(X.INTERRUPTER_0 + X.ERDP_LO,
                   (EVENTS + 16 * self.event_dequeue) | X.ERDP_EHB)
        return found

    def command(self, kind: int, parameter: int = 0, control: int = 0) -> tuple[int, int]:
        """Run one command: (completion code, slot ID) from its completion event."""
        address = self.command_ring.put(parameter, 0, kind << 10 | control)
        self.write(X.DOORBELLS, 0)
        completions = [event for event in self.events()
                       if event[0] == X.EVENT_COMMAND_COMPLETION]
        assert len(completions) == 1 and completions[0][2] == address, completions
        return completions[0][1], completions[0][3] >> 24

    def reset_port(self, number: int) -> None:
        self.write(X.PORTS + 0x10 * (number - 1), X.PORT_PP | X.PORT_PR)

    # --- a device ------------------------------------------------------------------------------
    def address_device(self, port: int, block: bool = False) -> int:
        """Enable Slot, then Address Device for the device on PORT; the slot ID."""
        code, slot_id = self.command(X.CMD_ENABLE_SLOT)
        assert code == X.SUCCESS
        memory = self.vm.memory
        memory.write_u64(DCBAA + 8 * slot_id, OUTPUT)
        self.ep0 = Ring(memory, EP0_RING)
        memory.write(INPUT, bytes(0x1000))
        memory.write(INPUT, struct.pack("<II", 0, 0x3))
        memory.write(INPUT + 32, struct.pack("<IIII", 1 << 27 | X.SPEED_HIGH << 20, port << 16,
                                             0, 0))
        memory.write(INPUT + 64, struct.pack("<IIQ", 0, 4 << 3 | 3 << 1 | 64 << 16,
                                             EP0_RING | 1))
        code, _ = self.command(X.CMD_ADDRESS_DEVICE, INPUT,
                               slot_id << 24 | (X.TRB_BSR if block else 0))
        assert code == X.SUCCESS
        self.slot_id = slot_id
        return slot_id

    def control(self, request_type: int, request: int, value: int, index: int,
                length: int, data: bytes = b"") -> tuple[int, bytes]:
        """One control transfer on endpoint 0: (completion code of the last
        event, the data stage's IN bytes)."""
        setup = struct.unpack("<Q", struct.pack("<BBHHH", request_type, request, value, index,
                                                length))[0]
        direction_in = bool(request_type & 0x80)
        transfer_type = (3 if direction_in else 2) if length else 0
        self.ep0.put(setup, 8, X.TRB_SETUP << 10 | X.TRB_IDT | transfer_type << 16)
        if length:
            if not direction_in:
                self.vm.memory.write(DATA, data)
            self.ep0.put(DATA, length, X.TRB_DATA << 10 | X.TRB_ISP |
                         (X.TRB_DIR_IN if direction_in else 0))
        self.ep0.put(0, 0, X.TRB_STATUS << 10 | X.TRB_IOC |
                     (0 if direction_in and length else X.TRB_DIR_IN))
        self.write(X.DOORBELLS + 4 * self.slot_id, X.EP0)
        transfers = [event for event in self.events() if event[0] == X.EVENT_TRANSFER]
        assert transfers, "no transfer event"
        received = length
        for event in transfers:
            if event[1] == X.SHORT_PACKET:
                received = length - (event[4] & 0xFFFFFF)
        got = self.vm.memory.read(DATA, received) if direction_in and length else b""
        return transfers[-1][1], got

    def configure_tablet(self) -> int:
        """Configure Endpoint for endpoint 1 IN (interrupt, 8 bytes), then
        SET_CONFIGURATION 1: the completion code of the command."""
        memory = self.vm.memory
        self.ep1 = Ring(memory, EP1_RING)
        memory.write(INPUT, bytes(0x1000))
        memory.write(INPUT, struct.pack("<II", 0, 1 | 1 << X.EP1_IN))
        memory.write(INPUT + 32, struct.pack("<IIII", 3 << 27 | X.SPEED_HIGH << 20, 1 << 16,
                                             0, 0))
        memory.write(INPUT + 32 * (1 + X.EP1_IN), struct.pack("<IIQI", 3 << 16,
                                                              7 << 3 | 3 << 1 | 8 << 16,
                                                              EP1_RING | 1, 8))
        code, _ = self.command(X.CMD_CONFIGURE_ENDPOINT, INPUT, self.slot_id << 24)
        assert self.control(0, 9, 1, 0, 0)[0] == X.SUCCESS
        return code

    def queue_report_buffer(self, address: int = DATA + 0x100) -> None:
        self.ep1.put(address, 8, X.TRB_NORMAL << 10 | X.TRB_ISP | X.TRB_IOC)
        self.write(X.DOORBELLS + 4 * self.slot_id, X.EP1_IN)

    def reports(self, address: int = DATA + 0x100) -> list[bytes]:
        """The reports the interrupt endpoint's transfer events say arrived."""
        out = []
        for event in self.events():
            if event[0] == X.EVENT_TRANSFER and event[3] >> 16 & 0x1F == X.EP1_IN:
                assert event[1] in (X.SUCCESS, X.SHORT_PACKET)
                out.append(self.vm.memory.read(address, 8 - (event[4] & 0xFFFFFF)))
        return out


class Ring:
    """The driver's side of a ring of RING_TRBS TRBs, the last a Link back (toggle cycle)."""

    def __init__(self, memory, base: int):
        self.memory, self.base = memory, base
        self.index, self.cycle = 0, 1

    def put(self, parameter: int, status: int, control: int) -> int:
        address = self.base + 16 * self.index
        self.memory.write(address, struct.pack("<QII", parameter, status, control | self.cycle))
        self.index += 1
        if self.index == RING_TRBS - 1:
            self.memory.write(self.base + 16 * self.index, struct.pack(
                "<QII", self.base, 0, X.TRB_LINK << 10 | X.TRB_TOGGLE_CYCLE | self.cycle))
            self.index, self.cycle = 0, self.cycle ^ 1
        return address
