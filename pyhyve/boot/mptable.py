"""The Intel MultiProcessor table (bhyve's mptbl.c), for guests without ACPI.

A directly booted kernel finds the "_MP_" floating pointer in the BIOS area
and from it the configuration table: one processor entry per vCPU, the buses,
the I/O APIC and where each ISA IRQ and PCI INTx pin is wired.  `-Y` (config
x86.mptable=false) leaves it out, as in bhyve.
"""

import struct

from ..layout import IOAPIC_BASE, LAPIC_BASE, MPTABLE_BASE

IOAPIC_PINS = 24
BUS_PCI, BUS_ISA = 0, 1
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_EXTINT = 0, 1, 3
CPU_ENABLED, CPU_BSP = 0x1, 0x2
# ISA IRQ 0 (the PIT) reaches I/O APIC pin 2, as on PC hardware and in the MADT.
ISA_IRQ_TO_PIN = {irq: (2 if irq == 0 else irq) for irq in range(16) if irq != 2}
# polarity/trigger flags: 0 = bus default; PCI lines are level, active low
PCI_INTX_FLAGS = 0x0F
SCI_FLAGS = 0x0D                # ACPI SCI: level, active high


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(apic_ids: list[int], cpu_signature: int, cpu_features: int,
                  pci_intx: list[tuple[int, int, int]], sci_irq: int = 9) -> bytes:
    """The floating pointer followed by the configuration table, to be copied to
    MPTABLE_BASE.  pci_intx holds (slot, pin 1-4, I/O APIC pin) for each wired pin."""
    ioapic_id = 0                  # what KVM's in-kernel I/O APIC reports
    entries = []
    for index, apic_id in enumerate(apic_ids):
        flags = CPU_ENABLED | (CPU_BSP if index == 0 else 0)
        entries.append(struct.pack("<BBBBIIQ", 0, apic_id, 0x14, flags,
                                   cpu_signature, cpu_features, 0))
    entries.append(struct.pack("<BB6s", 1, BUS_PCI, b"PCI   "))
    entries.append(struct.pack("<BB6s", 1, BUS_ISA, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, 0x11, 1, IOAPIC_BASE))
    for irq, pin in ISA_IRQ_TO_PIN.items():
        flags = SCI_FLAGS if irq == sci_irq else 0
        entries.append(struct.pack("<BBHBBBB", 3, INT_TYPE_INT, flags, BUS_ISA, irq,
                                   ioapic_id, pin))
    for slot, pin, ioapic_pin in pci_intx:
        entries.append(struct.pack("<BBHBBBB", 3, INT_TYPE_INT, PCI_INTX_FLAGS, BUS_PCI,
                                   (slot << 2) | (pin - 1), ioapic_id, ioapic_pin))
    entries.append(struct.pack("<BBHBBBB", 4, INT_TYPE_EXTINT, 0, BUS_ISA, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", 4, INT_TYPE_NMI, 0, BUS_ISA, 0, 0xFF, 1))
    body = b"".join(entries)
    config_address = MPTABLE_BASE + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), 4, 0,
                                   b"PYHYVE  ", b"pyhyve      ", 0, 0, len(entries),
                                   LAPIC_BASE, 0, 0, 0))
    table = header + body
    table[7] = _checksum(table)
    pointer = bytearray(struct.pack("<4sIBBB5s", b"_MP_", config_address, 1, 4, 0,
                                    bytes(5)))
    pointer[10] = _checksum(pointer)
    return bytes(pointer + table)
