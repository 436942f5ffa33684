"""The MP table as a guest without ACPI parses it."""

import struct

from pyhyve.boot.mptable import build_mptable
from pyhyve.layout import IOAPIC_BASE as IOAPIC_ADDRESS, LAPIC_BASE as LAPIC_ADDRESS, MPTABLE_BASE


def parse(blob: bytes):
    assert blob[:4] == b"_MP_" and sum(blob[:16]) % 256 == 0
    address, length, revision = struct.unpack_from("<IBB", blob, 4)
    assert (length, revision) == (1, 4)
    table = blob[address - MPTABLE_BASE:]
    signature, size, _, _, _, _, _, _, count, lapic = struct.unpack_from(
        "<4sHBB8s12sIHHI", table)
    assert signature == b"PCMP" and sum(table[:size]) % 256 == 0 and lapic == LAPIC_ADDRESS
    entries, at = [], 44
    for _ in range(count):
        kind = table[at]
        length = 20 if kind == 0 else 8
        entries.append(table[at:at + length])
        at += length
    assert at == size
    return entries


def test_one_processor_entry_per_vcpu_and_the_bsp_flagged():
    entries = parse(build_mptable([0, 1, 4], 0x806F8, 0xBFEBFBFF, []))
    cpus = [struct.unpack_from("<BBBB", e) for e in entries if e[0] == 0]
    assert [(apic, flags) for _, apic, _, flags in cpus] == [(0, 3), (1, 1), (4, 1)]


def test_io_apic_buses_and_interrupt_wiring():
    entries = parse(build_mptable([0], 0, 0, [(3, 1, 19)]))
    ioapics = [struct.unpack_from("<BBBBI", e) for e in entries if e[0] == 2]
    assert [(flags, address) for _, _, _, flags, address in ioapics] == [(1, IOAPIC_ADDRESS)]
    buses = {e[1]: e[2:8] for e in entries if e[0] == 1}
    assert buses == {0: b"PCI   ", 1: b"ISA   "}
    interrupts = [struct.unpack_from("<BBHBBBB", e) for e in entries if e[0] == 3]
    isa = {irq: pin for _, _, _, bus, irq, _, pin in interrupts if bus == 1}
    assert isa[0] == 2 and isa[4] == 4 and 2 not in isa
    pci = [(irq, pin, flags) for _, _, flags, bus, irq, _, pin in interrupts if bus == 0]
    assert pci == [((3 << 2) | 0, 19, 0x0F)]
    local = [struct.unpack_from("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(kind, lint) for _, kind, _, _, _, _, lint in local] == [(3, 0), (1, 1)]
