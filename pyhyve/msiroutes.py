"""MSI delivery through GSI routes and irqfds (the hot path for device interrupts).

Each distinct MSI message (address, data) a device sends gets a KVM GSI route
and an eventfd bound to it with KVM_IRQFD, so raising it is one eventfd
write that KVM turns into the interrupt.  KVM_SET_GSI_ROUTING replaces the
whole table, so it always carries the default irqchip routes KVM starts with
(GSIs 0-15 to both 8259s and the I/O APIC, 16-23 to the I/O APIC).  Messages
beyond the route budget fall back to KVM_SIGNAL_MSI.
"""

import os
import threading

from .kvm import abi

FIRST_MSI_GSI = 24
MAX_MSI_ROUTES = 512
IOAPIC_PINS = 24


def _irqchip_routes() -> list:
    routes = []
    for gsi in range(IOAPIC_PINS):
        entry = abi.kvm_irq_routing_entry(gsi=gsi, type=abi.KVM_IRQ_ROUTING_IRQCHIP)
        entry.u.irqchip.irqchip, entry.u.irqchip.pin = abi.KVM_IRQCHIP_IOAPIC, gsi
        routes.append(entry)
        if gsi < 16:
            pic = abi.kvm_irq_routing_entry(gsi=gsi, type=abi.KVM_IRQ_ROUTING_IRQCHIP)
            pic.u.irqchip.irqchip = (abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8
                                     else abi.KVM_IRQCHIP_PIC_SLAVE)
            pic.u.irqchip.pin = gsi % 8
            routes.append(pic)
    return routes


class MsiRoutes:
    def __init__(self, kvm_vm):
        self.kvm_vm = kvm_vm
        self._fds: dict[tuple[int, int], int] = {}      # (address, data) -> eventfd
        self._entries = _irqchip_routes()
        self._lock = threading.Lock()

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
