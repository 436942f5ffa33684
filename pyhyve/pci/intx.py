"""Legacy PCI interrupts (bhyve's pci_irq.c): INTx pins -> PIRQ links -> IRQs.

A device's INTx pin in slot S reaches PIRQ link (S + pin - 1) mod 4, the PIIX
swizzle SeaBIOS and the ACPI _PRT assume.  Each link drives I/O APIC pin
16 + link, and, when the guest routed the link to an ISA IRQ through the
LPC bridge's PIRQ registers, that 8259 IRQ too.  Lines are level-triggered
and shared, so each link counts its asserted devices, and each ISA IRQ counts
its asserted links (firmware routes several links to one IRQ: SeaBIOS uses
10, 10, 11, 11).
"""

import threading

PIRQ_LINKS = 4
IOAPIC_PIN_BASE = 16
PIRQ_DISABLED = 0x80
# ISA IRQs a PIRQ may be routed to (PIIX3 datasheet: not 0, 1, 2, 8, 13)
ROUTABLE_IRQS = frozenset((3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15))


def link_for(slot: int, pin: int) -> int:
    return (slot + pin - 1) % PIRQ_LINKS


class IntxRouter:
    def __init__(self, context):
        self.context = context
        self._pins = [context.irq_line(IOAPIC_PIN_BASE + link, "pci")
                      for link in range(PIRQ_LINKS)]
        self.routes = [PIRQ_DISABLED] * PIRQ_LINKS    # what the LPC bridge holds
        self.counts = [0] * PIRQ_LINKS
        self._lock = threading.Lock()

    @staticmethod
    def isa_irq(route: int) -> int | None:
        irq = route & 0x0F
        return irq if not route & PIRQ_DISABLED and irq in ROUTABLE_IRQS else None

    def _drive(self, link: int, level: bool) -> None:
        self._pins[link].set(level)
        self._drive_isa(link, self.routes[link], level)

    def _drive_isa(self, link: int, route: int, level: bool) -> None:
        """Each link is its own source on a (possibly shared) ISA IRQ line."""
        irq = self.isa_irq(route)
        if irq is not None:
            self.context.irq_line(irq, f"pirq{link}").set(level)

    def assert_pin(self, device) -> None:
        link = link_for(device.slot, device.config[0x3D])
        with self._lock:
            self.counts[link] += 1
            if self.counts[link] == 1:
                self._drive(link, True)

    def deassert_pin(self, device) -> None:
        link = link_for(device.slot, device.config[0x3D])
        with self._lock:
            if self.counts[link] > 0:
                self.counts[link] -= 1
                if self.counts[link] == 0:
                    self._drive(link, False)

    def set_route(self, link: int, route: int) -> None:
        """The guest reprogrammed a PIRQ register: move an asserted line with it."""
        with self._lock:
            if self.routes[link] == route:
                return
            old, self.routes[link] = self.routes[link], route
            if self.counts[link]:         # the I/O APIC pin stays as it is
                self._drive_isa(link, old, False)
                self._drive_isa(link, route, True)
