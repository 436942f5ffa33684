"""MSI delivery through GSI routes and irqfds."""

import os

from pyhyve import msiroutes
from pyhyve.kvm import abi
from pyhyve.msiroutes import FIRST_MSI_GSI, MsiRoutes


class RoutingVm:
    def __init__(self):
        self.tables, self.irqfds, self.signalled = [], [], []

    def set_gsi_routing(self, entries):
        self.tables.append([(e.gsi, e.type) for e in entries])

    def irqfd(self, fd, gsi):
        self.irqfds.append((fd, gsi))

    def signal_msi(self, address, data):
        self.signalled.append((address, data))


def test_each_message_gets_one_route_and_keeps_the_irqchip_routes():
    vm = RoutingVm()
    routes = MsiRoutes(vm)
    routes.signal(0xFEE00000, 0x41)
    routes.signal(0xFEE00000, 0x41)
    routes.signal(0xFEE01000, 0x42)
    assert [gsi for _, gsi in vm.irqfds] == [FIRST_MSI_GSI, FIRST_MSI_GSI + 1]
    last = vm.tables[-1]
    assert (FIRST_MSI_GSI + 1, abi.KVM_IRQ_ROUTING_MSI) in last
    irqchip = [gsi for gsi, kind in last if kind == abi.KVM_IRQ_ROUTING_IRQCHIP]
    assert sorted(set(irqchip)) == list(range(24)) and len(irqchip) == 24 + 16
    fd = vm.irqfds[0][0]
    assert os.eventfd_read(fd) == 2             # both raises of the first message
    assert vm.signalled == []
    routes.close()


def test_messages_beyond_the_budget_use_signal_msi(monkeypatch):
    monkeypatch.setattr(msiroutes, "MAX_MSI_ROUTES", 1)
    vm = RoutingVm()
    routes = MsiRoutes(vm)
    routes.signal(0xFEE00000, 1)
    routes.signal(0xFEE00000, 2)
    assert vm.signalled == [(0xFEE00000, 2)]
    routes.close()
