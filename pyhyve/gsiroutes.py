"""The VM's GSI routing table: ISA interrupts wired as on a PC, and MSI routes.

KVM_SET_GSI_ROUTING replaces the whole table, which is installed once when
the VM is created and grown as devices send new MSI messages.

Wired interrupts follow QEMU's PC (and what pyhyve's MADT and MP table
promise): ISA IRQ 0, the PIT's output, goes to the master 8259's pin 0 and to
I/O APIC pin 2; GSI 2 (the 8259 cascade) goes nowhere; every other ISA IRQ
N goes to its 8259 pin and to I/O APIC pin N, and GSIs 16-23 (PCI INTx) to
the I/O APIC only.  KVM's default table, used until a table is set, sends
GSI 0 to I/O APIC pin 0, where the tables say nothing is: Linux then reports
"8254 timer not connected to IO-APIC" and falls back to the 8259.

Each distinct MSI message (address, data) gets a GSI route and an eventfd
bound to it with KVM_IRQFD, so raising it is one eventfd write that KVM turns
into the interrupt.  Messages beyond the route budget use KVM_SIGNAL_MSI.
"""

import os
import threading

from .kvm import abi

FIRST_MSI_GSI = 24
MAX_MSI_ROUTES = 512
IOAPIC_PINS = 24
ISA_IRQS = 16
TIMER_IRQ, TIMER_IOAPIC_PIN = 0, 2
CASCADE_IRQ = 2


def _irqchip_route(gsi: int, chip: int, pin: int):
    entry = abi.kvm_irq_routing_entry(gsi=gsi, type=abi.KVM_IRQ_ROUTING_IRQCHIP)
    entry.u.irqchip.irqchip, entry.u.irqchip.pin = chip, pin
    return entry


def wired_routes() -> list:
    """The irqchip routes of a PC: 8259 pins for ISA IRQs, I/O APIC pins for all."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        if gsi == CASCADE_IRQ:
            continue
        if gsi < ISA_IRQS:
            chip = abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else abi.KVM_IRQCHIP_PIC_SLAVE
            routes.append(_irqchip_route(gsi, chip, gsi % 8))
        pin = TIMER_IOAPIC_PIN if gsi == TIMER_IRQ else gsi
        routes.append(_irqchip_route(gsi, abi.KVM_IRQCHIP_IOAPIC, pin))
    return routes


class GsiRoutes:
    """Owns the routing table of one KVM VM (after KVM_CREATE_IRQCHIP) and the
    eventfds of its MSI routes.  signal() may be called from any thread."""

    def __init__(self, kvm_vm):
        self.kvm_vm = kvm_vm
        self._fds: dict[tuple[int, int], int] = {}      # (address, data) -> eventfd
        self._entries = wired_routes()
        self._lock = threading.Lock()
        kvm_vm.set_gsi_routing(self._entries)

    def signal(self, address: int, data: int) -> None:
        fd = self._fds.get((address, data))
        if fd is None:
            fd = self._route(address, data)
        if fd is None:
            self.kvm_vm.signal_msi(address, data)
        else:
            os.eventfd_write(fd, 1)

    def _route(self, address: int, data: int) -> int | None:
        with self._lock:
            if (address, data) in self._fds:
                return self._fds[address, data]
            if len(self._fds) >= MAX_MSI_ROUTES:
                return None
            gsi = FIRST_MSI_GSI + len(self._fds)
            entry = abi.kvm_irq_routing_entry(gsi=gsi, type=abi.KVM_IRQ_ROUTING_MSI)
            entry.u.msi.address_lo = address & 0xFFFFFFFF
            entry.u.msi.address_hi = address >> 32
            entry.u.msi.data = data
            self.kvm_vm.set_gsi_routing(self._entries + [entry])
            self._entries.append(entry)
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.kvm_vm.irqfd(fd, gsi)
            self._fds[address, data] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
