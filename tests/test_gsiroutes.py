"""The GSI routing table: a PC's ISA wiring from the start, and MSI routes with irqfds."""

import os

from pyhyve import gsiroutes
from pyhyve.kvm import abi
from pyhyve.gsiroutes import FIRST_MSI_GSI, GsiRoutes


class RoutingVm:
    def __init__(self):
        self.tables, self.irqfds, self.signalled = [], [], []

    def set_gsi_routing(self, entries):
        self.tables.append([(e.gsi, e.type) for e in entries])
        self.irqchip = [(e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) for e in entries
                        if e.type == abi.KVM_IRQ_ROUTING_IRQCHIP]

    def irqfd(self, fd, gsi):
        self.irqfds.append((fd, gsi))

    def signal_msi(self, address, data):
        self.signalled.append((address, data))


def test_each_message_gets_one_route_and_keeps_the_irqchip_routes():
    vm = RoutingVm()
    routes = GsiRoutes(vm)
    routes.signal(0xFEE00000, 0x41)
    routes.signal(0xFEE00000, 0x41)
    routes.signal(0xFEE01000, 0x42)
    assert [gsi for _, gsi in vm.irqfds] == [FIRST_MSI_GSI, FIRST_MSI_GSI + 1]
    last = vm.tables[-1]
    assert (FIRST_MSI_GSI + 1, abi.KVM_IRQ_ROUTING_MSI) in last
    irqchip = [gsi for gsi, kind in last if kind == abi.KVM_IRQ_ROUTING_IRQCHIP]
    assert sorted(set(irqchip)) == [gsi for gsi in range(24) if gsi != 2]
    assert len(irqchip) == 23 + 15
    fd = vm.irqfds[0][0]
    assert os.eventfd_read(fd) == 2             # both raises of the first message
    assert vm.signalled == []
    routes.close()


def test_messages_beyond_the_budget_use_signal_msi(monkeypatch):
    monkeypatch.setattr(gsiroutes, "MAX_MSI_ROUTES", 1)
    vm = RoutingVm()
    routes = GsiRoutes(vm)
    routes.signal(0xFEE00000, 1)
    routes.signal(0xFEE00000, 2)
    assert vm.signalled == [(0xFEE00000, 2)]
    routes.close()


def test_the_wired_table_is_installed_at_once_with_the_timer_on_ioapic_pin_2():
    """As QEMU's PC and pyhyve's MADT (IRQ 0 -> GSI 2 override) and MP table say:
    the PIT (GSI 0) reaches the 8259's pin 0 and I/O APIC pin 2; GSI 2 is the
    cascade and routes nowhere; the rest are identity-mapped."""
    vm = RoutingVm()
    GsiRoutes(vm).close()
    assert len(vm.tables) == 1                  # before any MSI
    routes = {(gsi, chip): pin for gsi, chip, pin in vm.irqchip}
    assert routes[0, abi.KVM_IRQCHIP_IOAPIC] == 2
    assert routes[0, abi.KVM_IRQCHIP_PIC_MASTER] == 0
    assert not [key for key in routes if key[0] == 2]
    assert routes[8, abi.KVM_IRQCHIP_PIC_SLAVE] == 0
    assert all(routes[gsi, abi.KVM_IRQCHIP_IOAPIC] == gsi for gsi in range(3, 24))
    assert not [key for key in routes if key[0] >= 16 and key[1] != abi.KVM_IRQCHIP_IOAPIC]
