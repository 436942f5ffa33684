"""ACPI tables and the AML encoder: byte-level checks, the linking in memory and
through fw_cfg's table loader, ACPICA's own tools (every table disassembled by
`iasl -d`, recompiled and compared, the DSDT evaluated by `acpiexec`), and
SeaBIOS installing the tables in a real boot."""

import re
import struct
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from fakevm import FakeVm
from firmware import require_file, require_program
from pyhyve.boot import aml
from pyhyve.layout import ACPI_TABLES_BASE
from pyhyve.boot.acpi import (LOADER_ENTRY_SIZE, AcpiPlatform, build_tables,
                              install_in_fwcfg, platform_from_vm, tables_image,
                              tables_in_memory)
from pyhyve.devices.hpet import CAPABILITIES as HPET_CAPABILITIES, Hpet
from pyhyve.devices.i8042 import I8042
from pyhyve.devices.rtc import Rtc
from pyhyve.devices.uart import acpi_device as uart_acpi_device
from pyhyve.lifecycle import ACPI_ISA, ACPI_SYSTEM
from pyhyve.pci.bus import PciBus
from pyhyve.pci.lpc import LpcBridge
from pyhyve.pci.testdev import PciTestDevice

PLATFORM = AcpiPlatform(
    cpus=(0, 1, 2, 3),
    pci_mem64=(64 << 30, 128 << 30),
    pci_intx=((3, 1), (4, 1), (4, 2), (4, 1), (31, 4)),
    objects=(*Rtc.acpi_objects(None), *I8042.acpi_objects(None),
             (ACPI_ISA, uart_acpi_device("com1", 0x3F8, 4)),
             (ACPI_ISA, uart_acpi_device("com2", 0x2F8, 3)),
             *Hpet.acpi_objects(None)),
)
SDT_SIGNATURES = {"DSDT", "FACP", "APIC", "MCFG", "HPET", "XSDT", "RSDT"}


def u16(data, offset):
    return struct.unpack_from("<H", data, offset)[0]


def u32(data, offset):
    return struct.unpack_from("<I", data, offset)[0]


def u64(data, offset):
    return struct.unpack_from("<Q", data, offset)[0]


def sums_to_zero(data) -> bool:
    return sum(data) & 0xFF == 0


# --- the AML encoder --------------------------------------------------------------------------
@pytest.mark.parametrize("content, encoded", [
    (0, b"\x01"),
    (62, b"\x3f"),                          # 63: the largest one-byte length
    (63, b"\x41\x04"),                      # 65 in two bytes: low nibble, then the rest
    (0xFFF - 2, b"\x4f\xff"),               # 0xFFF: the largest two-byte length
    (0xFFF - 1, b"\x81\x00\x01"),           # 0x1001 in three bytes
    (0xFFFFF - 3, b"\x8f\xff\xff"),
    (0xFFFFF - 2, b"\xc1\x00\x00\x01"),     # 0x100001 in four bytes
    ((1 << 28) - 5, b"\xcf\xff\xff\xff"),
])
def test_pkg_length_boundaries(content, encoded):
    assert aml.pkg_length(content) == encoded


def test_pkg_length_limit():
    with pytest.raises(ValueError):
        aml.pkg_length((1 << 28) - 4)


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"), (0xFFFF, b"\x0b\xff\xff"),
    (0x10000, b"\x0c\x00\x00\x01\x00"), (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
    (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
    (aml.ONES - 1, b"\x0e" + (aml.ONES - 1).to_bytes(8, "little")),
    (aml.ONES, b"\xff"),
])
def test_integers_take_their_smallest_encoding(value, encoded):
    assert aml.integer(value) == encoded
    assert aml.data(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integers_out_of_range(value):
    with pytest.raises(ValueError):
        aml.integer(value)


@pytest.mark.parametrize("path, encoded", [
    ("_S5", b"_S5_"),
    ("PCI0", b"PCI0"),
    ("\\", b"\\\x00"),
    ("\\_SB", b"\\_SB_"),
    ("^^FOO", b"^^FOO_"),
    ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),
    ("PCI0.ISA.COM1", b"\x2f\x03PCI0ISA_COM1"),
    ("^PCI0.ISA", b"^\x2ePCI0ISA_"),
])
def test_name_paths(path, encoded):
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["", "1ABC", "abcd", "TOOLONG", "A-B", "\\_SB..PCI0"])
def test_bad_names(path):
    with pytest.raises(ValueError):
        aml.name_string(path)


@pytest.mark.parametrize("text, encoded", [
    ("PNP0A03", b"\x0c\x41\xd0\x0a\x03"),
    ("PNP0A08", b"\x0c\x41\xd0\x0a\x08"),
    ("PNP0501", b"\x0c\x41\xd0\x05\x01"),
    ("PNP0000", b"\x0c\x41\xd0\x00\x00"),      # a DWordConst even when it would fit a word
    ("QEM0002", b"\x0c\x44\xad\x00\x02"),
])
def test_eisa_id_compression(text, encoded):
    assert aml.eisa_id(text) == encoded


def test_strings_buffers_and_packages():
    assert aml.string("ab") == b"\x0dab\x00"
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.package(1, "a", aml.package()) == b"\x12\x09\x03\x01\x0da\x00\x12\x02\x00"
    assert aml.package(*range(63))[1:3] == aml.pkg_length(len(aml.package(*range(63))) - 3)
    with pytest.raises(ValueError):
        aml.package(*range(256))
    with pytest.raises(TypeError):
        aml.data(True)


def test_named_objects_and_methods():
    assert aml.name("_UID", 0) == b"\x08_UID\x00"
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"
    assert aml.device("COM1", aml.name("_UID", 1)) == b"\x5b\x82\x0bCOM1\x08_UID\x01"
    method = aml.method("_PIC", 1, aml.store(aml.arg(0), aml.name_string("PICM")))
    assert method == b"\x14\x0c_PIC\x01\x70\x68PICM"
    flags = aml.method("M", 3, serialized=True, sync_level=2)[6]
    assert flags == 3 | 1 << 3 | 2 << 4
    assert aml.return_(aml.local(7)) == b"\xa4\x67"


def test_resource_descriptors():
    assert aml.io(0x3F8, 0x3F8, 1, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.irq_no_flags(8, 1) == b"\x22\x02\x01"
    assert aml.memory32_fixed(0xE0000000, 1 << 20) == \
        b"\x86\x09\x00\x01" + struct.pack("<II", 0xE0000000, 1 << 20)
    assert aml.interrupt(16, active_low=True, shared=True) == \
        b"\x89\x06\x00\x0d\x01" + struct.pack("<I", 16)
    bus = aml.word_bus_number(0, 0)
    assert bus == b"\x88\x0d\x00\x02\x0c\x00" + struct.pack("<5H", 0, 0, 0, 0, 1)
    assert len(aml.word_io(0, 0xCF7)) == 16
    assert len(aml.dword_memory(0xC0000000, 0xDFFFFFFF)) == 26
    assert len(aml.qword_memory(1 << 36, (1 << 37) - 1)) == 46
    template = aml.resource_template(aml.irq_no_flags(4))
    assert template == b"\x11\x08\x0a\x05\x22\x10\x00\x79\x00"
    with pytest.raises(ValueError):
        aml.dword_memory(2, 1)


# --- the tables -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tables():
    return build_tables(PLATFORM)


def read_from(image: bytes, base: int):
    def read(address, length):
        assert base <= address and address + length <= base + len(image)
        return image[address - base:address - base + length]
    return read


def walk(read, rsdp_address: int) -> dict[str, bytes]:
    """Follow the RSDP as an OS does, checking every checksum and pointer on the way."""
    rsdp = read(rsdp_address, 36)
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2 and u32(rsdp, 20) == 36
    assert sums_to_zero(rsdp[:20]) and sums_to_zero(rsdp)

    def table(address):
        data = read(address, u32(read(address, 8), 4))
        assert sums_to_zero(data), data[:4]
        return data

    xsdt, rsdt = table(u64(rsdp, 24)), table(u32(rsdp, 16))
    assert xsdt[:4] == b"XSDT" and rsdt[:4] == b"RSDT"
    entries = [u64(xsdt, offset) for offset in range(36, len(xsdt), 8)]
    assert entries == [u32(rsdt, offset) for offset in range(36, len(rsdt), 4)]
    found = {"XSDT": xsdt, "RSDT": rsdt}
    for address in entries:
        data = table(address)
        found[data[:4].decode()] = data
    fadt = found["FACP"]
    assert u32(fadt, 40) == u64(fadt, 140)
    found["DSDT"] = table(u32(fadt, 40))
    facs_address = u32(fadt, 36)
    assert facs_address % 64 == 0 and u64(fadt, 132) == 0
    found["FACS"] = read(facs_address, 64)
    assert found["FACS"][:4] == b"FACS"
    return found


def test_every_table_checksums_on_its_own(tables):
    for table in tables.tables:
        if table.signature != "FACS":
            assert u32(table.data, 4) == len(table.data)
            assert sums_to_zero(table.data), table.signature
    rsdp = tables.rsdp.data
    assert sums_to_zero(rsdp[:20]) and sums_to_zero(rsdp)
    assert {table.signature for table in tables.tables} == SDT_SIGNATURES | {"FACS"}


def test_tables_linked_in_memory(tables):
    image, addresses = tables_image(tables)
    assert addresses["RSD "] == ACPI_TABLES_BASE
    assert ACPI_TABLES_BASE + len(image) <= 0x100000       # all inside the BIOS area
    found = walk(read_from(image, ACPI_TABLES_BASE), ACPI_TABLES_BASE)
    assert set(found) == SDT_SIGNATURES | {"FACS"}
    for signature in ("DSDT", "APIC", "MCFG", "FACS"):    # no pointers in these
        assert found[signature] == tables.table(signature).data
    with pytest.raises(ValueError):
        tables_image(tables, ACPI_TABLES_BASE + 8)


def test_tables_in_guest_memory(tables):
    vm = FakeVm()
    try:
        addresses = tables_in_memory(vm.memory, tables)
        assert addresses["RSD "] == ACPI_TABLES_BASE
        found = walk(vm.memory.read, ACPI_TABLES_BASE)
        assert found["DSDT"] == tables.table("DSDT").data
    finally:
        vm.memory.close()


def test_madt_has_one_enabled_local_apic_per_cpu(tables):
    madt = tables.table("APIC").data
    assert madt[8] == 4 and u32(madt, 36) == 0xFEE00000 and u32(madt, 40) == 1
    entries, offset = [], 44
    while offset < len(madt):
        entries.append(madt[offset:offset + madt[offset + 1]])
        offset += madt[offset + 1]
    assert offset == len(madt)
    lapics = [entry for entry in entries if entry[0] == 0]
    assert [(entry[2], entry[3], u32(entry, 4)) for entry in lapics] == \
        [(uid, apic_id, 1) for uid, apic_id in enumerate(PLATFORM.cpus)]
    (ioapic,) = [entry for entry in entries if entry[0] == 1]
    assert ioapic[2] == 4 and u32(ioapic, 4) == 0xFEC00000 and u32(ioapic, 8) == 0
    overrides = {entry[3]: (u32(entry, 4), u16(entry, 8)) for entry in entries if entry[0] == 2}
    assert overrides == {0: (2, 0), 9: (9, 0x000D)}     # SCI: level, active-high
    (nmi,) = [entry for entry in entries if entry[0] == 4]
    assert nmi[2] == 0xFF and nmi[5] == 1                # every CPU's LINT1


def test_madt_uses_x2apic_entries_for_large_apic_ids():
    madt = build_tables(AcpiPlatform(cpus=(0, 1, 256, 257))).table("APIC").data
    types = []
    offset = 44
    while offset < len(madt):
        types.append(madt[offset])
        offset += madt[offset + 1]
    assert types.count(0) == 2 and types.count(9) == 2 and types.count(10) == 1
    x2apic = madt.index(bytes([9, 16]), 44)
    assert u32(madt, x2apic + 4) == 256 and u32(madt, x2apic + 12) == 2   # APIC ID, UID


def test_fadt_fields(tables):
    fadt = tables.table("FACP").data
    assert len(fadt) == 276 and fadt[8] == 6
    assert u16(fadt, 46) == 9 and u32(fadt, 48) == 0              # SCI 9, no SMI_CMD
    assert (u32(fadt, 56), u32(fadt, 64), u32(fadt, 76)) == (0x400, 0x404, 0x408)
    assert (fadt[88], fadt[89], fadt[91]) == (4, 2, 4)            # PM1 EVT, CNT, TMR lengths
    assert fadt[108] == 0x32                                      # century in CMOS
    assert u16(fadt, 109) == 0x0003                               # legacy devices, 8042
    flags = u32(fadt, 112)
    assert flags == (1 << 0) | (1 << 2) | (1 << 5) | (1 << 8) | (1 << 10)
    assert not flags & (1 << 4)                                   # fixed power button
    assert fadt[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, 0xCF9) and fadt[128] == 6
    assert fadt[148:160] == struct.pack("<BBBBQ", 1, 32, 0, 2, 0x400)   # X_PM1a_EVT_BLK
    assert fadt[172:184] == struct.pack("<BBBBQ", 1, 16, 0, 2, 0x404)   # X_PM1a_CNT_BLK
    assert fadt[208:220] == struct.pack("<BBBBQ", 1, 32, 0, 3, 0x408)   # X_PM_TMR_BLK


def test_mcfg_and_facs(tables):
    mcfg = tables.table("MCFG").data
    assert len(mcfg) == 60
    assert struct.unpack_from("<QHBB", mcfg, 44) == (0xE0000000, 0, 0, 0)
    facs = tables.table("FACS")
    assert len(facs.data) == 64 and u32(facs.data, 4) == 64 and facs.data[32] == 2
    assert facs.align == 64


def test_hpet_table_matches_the_device():
    """The Event Timer Block ID is the low half of the capabilities the guest reads."""
    hpet = build_tables(PLATFORM).table("HPET").data
    assert len(hpet) == 56
    assert u32(hpet, 36) == HPET_CAPABILITIES & 0xFFFFFFFF
    assert struct.unpack_from("<BBBBQ", hpet, 40) == (0, 0, 0, 0, 0xFED00000)
    assert "HPET" not in {t.signature for t in build_tables(AcpiPlatform(hpet=None)).tables}


def test_platform_from_vm():
    vm = FakeVm()
    vm.topology = SimpleNamespace(cpus=2, apic_id=lambda index: 2 * index)
    vm.pci = PciBus(vm.context)
    described = SimpleNamespace(acpi_objects=lambda: [(ACPI_SYSTEM, b"described")])
    vm.devices.append(described)
    try:
        vm.pci.add(5, 0, PciTestDevice, {})
        vm.pci.add(31, 0, LpcBridge, {})
        platform = platform_from_vm(vm)
    finally:
        vm.pci.close()
        vm.memory.close()
    assert platform.cpus == (0, 2) and platform.ioapic_id == 1
    assert platform.pci_intx == ((5, 1),)
    assert platform.isa_bridge == (31, 0)
    assert platform.objects == ((ACPI_SYSTEM, b"described"),)   # from every device
    assert platform.pci_mem64 == vm.pci.mem64_window


# --- fw_cfg's table loader ----------------------------------------------------------------------
class RecordingFwCfg:
    def __init__(self):
        self.files = {}

    def add_file(self, name, data, replace=False):
        assert replace or name not in self.files
        self.files[name] = data


def loader_commands(blob: bytes) -> list[tuple]:
    assert len(blob) % LOADER_ENTRY_SIZE == 0
    commands = []
    for offset in range(0, len(blob), LOADER_ENTRY_SIZE):
        entry = blob[offset:offset + LOADER_ENTRY_SIZE]
        command = u32(entry, 0)
        if command == 1:
            file, align, zone = struct.unpack_from("<56sIB", entry, 4)
            commands.append(("allocate", file.rstrip(b"\0").decode(), align, zone))
        elif command == 2:
            dest, src, at, size = struct.unpack_from("<56s56sIB", entry, 4)
            commands.append(("pointer", dest.rstrip(b"\0").decode(),
                             src.rstrip(b"\0").decode(), at, size))
        elif command == 3:
            file, at, start, length = struct.unpack_from("<56sIII", entry, 4)
            commands.append(("checksum", file.rstrip(b"\0").decode(), at, start, length))
        else:
            pytest.fail(f"unknown table-loader command {command}")
    return commands


def run_loader(files: dict[str, bytes], commands, addresses: dict[str, int]):
    """What SeaBIOS's romfile_loader_execute does, with buffers at `addresses`."""
    memory = {}
    for command in commands:
        if command[0] == "allocate":
            _, file, align, _ = command
            assert addresses[file] % align == 0
            memory[file] = bytearray(files[file])
        elif command[0] == "pointer":
            _, dest, src, at, size = command
            assert at + size <= len(memory[dest])
            value = int.from_bytes(memory[dest][at:at + size], "little") + addresses[src]
            memory[dest][at:at + size] = value.to_bytes(size, "little")
        else:
            _, file, at, start, length = command
            buffer = memory[file]
            buffer[at] = (buffer[at] - sum(buffer[start:start + length])) & 0xFF

    def read(address, length):
        for file, data in memory.items():
            if addresses[file] <= address and address + length <= addresses[file] + len(data):
                return bytes(data[address - addresses[file]:address - addresses[file] + length])
        pytest.fail(f"read outside the loaded files at {address:#x}")
    return read


def test_table_loader_blob(tables):
    fwcfg = RecordingFwCfg()
    install_in_fwcfg(fwcfg, tables)
    assert set(fwcfg.files) == {"etc/acpi/tables", "etc/acpi/rsdp", "etc/table-loader"}
    assert len(fwcfg.files["etc/acpi/rsdp"]) == 36
    commands = loader_commands(fwcfg.files["etc/table-loader"])
    assert commands[:2] == [("allocate", "etc/acpi/rsdp", 16, 2),
                            ("allocate", "etc/acpi/tables", 64, 1)]
    pointers = [command for command in commands if command[0] == "pointer"]
    checksums = [command for command in commands if command[0] == "checksum"]
    assert len(commands) == 2 + len(pointers) + len(checksums)
    assert commands.index(checksums[0]) > commands.index(pointers[-1])
    assert all(src == "etc/acpi/tables" and size in (4, 8) for _, _, src, _, size in pointers)
    # RSDP -> RSDT, XSDT; FADT -> FACS, DSDT, X_DSDT; XSDT and RSDT -> FADT, MADT, MCFG, HPET
    assert sorted(size for _, dest, _, _, size in pointers if dest == "etc/acpi/rsdp") == [4, 8]
    assert sorted(size for _, dest, _, _, size in pointers) == [4] * 7 + [8] * 6
    rsdp_checksums = [command[2:] for command in checksums if command[1] == "etc/acpi/rsdp"]
    assert rsdp_checksums == [(8, 0, 20), (32, 0, 36)]
    assert len(checksums) == len(SDT_SIGNATURES) + 2

    addresses = {"etc/acpi/rsdp": 0xF5A10, "etc/acpi/tables": 0x7FE0000}
    found = walk(run_loader(fwcfg.files, commands, addresses), addresses["etc/acpi/rsdp"])
    assert set(found) == SDT_SIGNATURES | {"FACS"}
    assert found["DSDT"] == tables.table("DSDT").data


# --- ACPICA's tools ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iasl():
    return require_program("iasl", "acpica-tools")


def run_tool(command: list[str], cwd) -> str:
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def clean(text: str) -> bool:
    return not any(word in text for word in ("Error", "Warning", "Incorrect", "Invalid"))


def disassemble(iasl, path) -> str:
    """iasl -d PATH: its output and the .dsl must carry no complaint; returns the .dsl."""
    output = run_tool([iasl, "-d", path.name], path.parent)
    assert clean(output), output
    dsl = path.with_suffix(".dsl").read_text()
    assert clean(dsl), dsl
    return dsl


def recompile(iasl, dsl_path) -> bytes:
    """Compile a disassembly back (no name-path optimization, so iasl emits what we did)."""
    output_stem = dsl_path.with_name(dsl_path.stem + "-again")
    output = run_tool([iasl, "-on", "-p", output_stem.name, dsl_path.name], dsl_path.parent)
    assert "0 Errors, 0 Warnings" in output, output
    return output_stem.with_suffix(".aml").read_bytes()


def same_but_creator(ours: bytes, theirs: bytes) -> bool:
    """Equal but for what iasl stamps in the header: its creator ID and the checksum."""
    def strip(data):
        return data[:9] + data[10:28] + data[36:]
    return strip(ours) == strip(theirs)


def test_iasl_disassembles_and_recompiles_every_table(iasl, tables, tmp_path):
    image, addresses = tables_image(tables)
    dsls = {}
    for table in tables.tables:
        start = addresses[table.signature] - ACPI_TABLES_BASE
        path = tmp_path / f"{table.signature.lower()}.dat"
        path.write_bytes(image[start:start + len(table.data)])
        dsls[table.signature] = disassemble(iasl, path)
        assert same_but_creator(image[start:start + len(table.data)],
                                recompile(iasl, path.with_suffix(".dsl")))
    dsdt = dsls["DSDT"]
    for expected in ("Device (PCI0)", 'EisaId ("PNP0A08")', 'EisaId ("PNP0A03")', "_PRT",
                     "Name (_S5, Package (0x04)", "Method (_PIC, 1", "Device (COM1)",
                     "Device (COM2)", 'EisaId ("PNP0501")', 'EisaId ("PNP0B00")',
                     'EisaId ("PNP0303")', 'EisaId ("PNP0C02")', "Name (_ADR, 0x001F0000)",
                     "0xDFFFFFFF", "0xE0100000", "0xFEBFFFFF", "0x0CF7", "0x0D00",
                     "0x0000001000000000", "0x0000001FFFFFFFFF"):
        assert expected in dsdt, expected
    assert "0xE0000000,         // Range Minimum" not in dsdt       # ECAM is not a window
    assert "I/O Apic ID : 04" in dsls["APIC"]
    assert dsls["FACP"].count("0000000000000408") == 1
    assert 'EisaId ("PNP0103")' in dsdt and "0xFED00000" in dsdt
    hpet = dsls["HPET"]
    # vendor 8086, legacy route capable, 64-bit counter, 3 comparators, revision 1
    for expected in ("Hardware Block ID : 8086A201", "Space ID : 00 [SystemMemory]",
                     "Address : 00000000FED00000"):
        assert expected in " ".join(hpet.split()), expected


def test_iasl_compiles_the_same_rsdp(iasl, tables, tmp_path):
    """iasl -d cannot read an RSDP (it has no standard header), but its data-table
    compiler can write one: it must come out byte for byte like ours."""
    rsdp = tables.rsdp.data
    fields = [("Signature", '"RSD PTR "'), ("Checksum", "00"), ("Oem ID", '"PYHYVE"'),
              ("Revision", "02"), ("RSDT Address", f"{u32(rsdp, 16):08X}"),
              ("Length", "00000024"), ("XSDT Address", f"{u64(rsdp, 24):016X}"),
              ("Extended Checksum", "00"), ("Reserved", "000000")]
    source = tmp_path / "rsdp.asl"
    source.write_text("".join(f"{name} : {value}\n" for name, value in fields))
    output = run_tool([iasl, "-p", "rsdp", source.name], tmp_path)
    assert "0 Errors, 0 Warnings" in output, output
    assert (tmp_path / "rsdp.aml").read_bytes() == rsdp


def test_iasl_round_trips_every_encoder_construct(iasl, tmp_path):
    """Constructs the DSDT does not use (yet): iasl must read them as written."""
    body = aml.scope("\\_SB", aml.device(
        "DEV0",
        aml.name("_HID", "PYHY0001"),
        aml.name("INT0", aml.ONES), aml.name("INT1", 1 << 40), aml.name("INT2", 0x1234),
        aml.name("STR0", "hello"),
        aml.name("BUF0", aml.buffer(bytes(range(70)))),         # two-byte PkgLength
        aml.name("BUF1", aml.buffer(bytes(5000))),              # three-byte PkgLength
        aml.name("_CRS", aml.resource_template(
            aml.interrupt(16, 17, active_low=True, shared=True),
            aml.interrupt(5, edge=True),
            aml.memory32_fixed(0xFED00000, 0x400),
            aml.word_io(0x1000, 0x1FFF),
            aml.dword_memory(0xA0000, 0xBFFFF, cacheable=True),
            aml.qword_memory(1 << 36, (1 << 37) - 1),
            aml.irq_no_flags(3, 4))),
        aml.method("GETV", 1, aml.store(aml.arg(0), aml.local(0)), aml.return_(aml.local(0)),
                   serialized=True, sync_level=2),
        aml.device("SUB0", aml.name("_ADR", 0x00030000),
                   aml.method("_STA", 0, aml.return_(0x0F)),
                   aml.name("REFS", aml.package(aml.name_string("^INT0"),
                                                aml.name_string("\\_SB.DEV0.SUB0.REFS"),
                                                aml.name_string("^SUB0.REFS"),
                                                aml.package(1, 2)))),
    ))
    header = struct.pack("<4sIBB6s8sI4sI", b"SSDT", 36 + len(body), 2, 0, b"PYHYVE",
                         b"TEST    ", 1, b"PYHV", 1)
    table = bytearray(header + body)
    table[9] = -sum(table) & 0xFF
    path = tmp_path / "ssdt.dat"
    path.write_bytes(table)
    dsl = disassemble(iasl, path)
    for expected in ("Name (INT0, Ones)", "0x0000010000000000", "Method (GETV, 1, Serialized, 2)",
                     "Interrupt (ResourceConsumer, Level, ActiveLow, Shared, ,, )",
                     "Memory32Fixed (ReadWrite,", "^INT0", "\\_SB.DEV0.SUB0.REFS"):
        assert expected in dsl, expected
    assert same_but_creator(bytes(table), recompile(iasl, path.with_suffix(".dsl")))


def test_acpiexec_evaluates_the_dsdt(tables, tmp_path):
    acpiexec = require_program("acpiexec", "acpica-tools")
    (tmp_path / "dsdt.dat").write_bytes(tables.table("DSDT").data)
    output = run_tool([acpiexec, "-b", "Execute \\_PIC 1; Execute \\PICM; "
                       "Execute \\_SB.PCI0._PRT; Execute \\_S5", "dsdt.dat"], tmp_path)
    picm = output.split("Evaluating \\PICM", 1)[1]
    assert "[Integer] = 0000000000000001" in picm.split("Evaluating", 1)[0]
    prt = output.split("Evaluating \\_SB.PCI0._PRT", 1)[1].split("Evaluating", 1)[0]
    assert "[Package] Contains 4 Elements:" in prt           # (3,A) (4,A) (4,B) (31,D)
    values = [int(line.split("=")[1], 16) for line in prt.splitlines() if "[Integer]" in line]
    assert values == [0x3FFFF, 0, 0, 19, 0x4FFFF, 0, 0, 16, 0x4FFFF, 1, 0, 17,
                      0x1FFFFF, 3, 0, 18]


# --- SeaBIOS installs them ----------------------------------------------------------------------
def read_guest(memory, address: int, length: int) -> bytes:
    """Read guest memory across the BIOS area's 16 KiB PAM chunks."""
    data = b""
    while length:
        chunk = min(length, 0x4000 - address % 0x4000)
        data += memory.read(address, chunk)
        address, length = address + chunk, length - chunk
    return data


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
@pytest.mark.parametrize("rom", ["bios.bin", "bios-256k.bin"])
def test_seabios_installs_our_tables(tmp_path, rom):
    """Debian's SeaBIOS loads the tables through etc/table-loader; its 256 KiB build
    also scans the DSDT for devices (the PS/2 keyboard), which must parse cleanly."""
    from pyhyve.config import Config
    from pyhyve.vcpu import ExitStatus
    from pyhyve.vm import VirtualMachine

    seabios = require_file(f"/usr/share/seabios/{rom}", "seabios")
    log = tmp_path / "seabios.log"
    vm = VirtualMachine(Config({"name": "acpi", "cpus": "2", "memory.size": "128M",
                                "lpc.bootrom": seabios, "lpc.debugcon.path": str(log),
                                "pci.0.3.0.device": "pci-testdev"}))
    try:
        tables = vm.acpi_tables          # the VM hands them to SeaBIOS through fw_cfg
        platform = platform_from_vm(vm)

        def stop_after_post():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "No bootable device" not in \
                    log.read_text(errors="replace"):
                time.sleep(0.1)
            vm.stop(ExitStatus.POWEROFF)
        watcher = threading.Thread(target=stop_after_post, daemon=True)
        watcher.start()
        vm.run()
        watcher.join()
        text = log.read_text(errors="replace")
        assert "No bootable device" in text
        assert "parse error" not in text and "overrun" not in text
        if rom == "bios-256k.bin":
            assert f"(len {len(tables.table('DSDT').data)})" in text   # ACPI: parse DSDT at
        fseg = read_guest(vm.memory, 0xF0000, 0x10000)
        rsdp = fseg.find(b"RSD PTR ")
        assert rsdp >= 0 and rsdp % 16 == 0
        assert fseg[rsdp + 9:rsdp + 15] == b"PYHYVE"       # ours, not SeaBIOS's own
        found = walk(lambda address, length: read_guest(vm.memory, address, length),
                     0xF0000 + rsdp)
    finally:
        vm.close()
    assert platform.cpus == (0, 1) and platform.pci_intx == ((3, 1),)
    for signature in ("DSDT", "APIC", "MCFG", "FACS"):
        assert found[signature] == tables.table(signature).data


class DescribedDevice(PciTestDevice):
    """A PCI function that adds its own object beside itself, as a device with a
    _DSM or a companion platform device would."""

    def acpi_objects(self):
        from pyhyve.boot import aml
        from pyhyve.lifecycle import ACPI_PCI_ROOT
        return [(ACPI_PCI_ROOT, aml.device("TST0", aml.name("_ADR", self.slot << 16)))]


def test_a_device_adds_its_own_objects_where_it_says(iasl, tmp_path):
    vm = FakeVm()
    vm.topology = SimpleNamespace(cpus=1, apic_id=lambda index: index)
    vm.pci = PciBus(vm.context)
    try:
        vm.pci.add(6, 0, DescribedDevice, {})
        vm.pci.add(31, 0, LpcBridge, {})
        vm.add_device(SimpleNamespace(acpi_objects=lambda: [*Rtc.acpi_objects(None)]))
        tables = build_tables(platform_from_vm(vm))
    finally:
        vm.pci.close()
        vm.memory.close()
    path = tmp_path / "dsdt.dat"
    path.write_bytes(tables.table("DSDT").data)
    dsdt = disassemble(iasl, path)
    assert re.search(r"Device \(PCI0\)\s*\{.*Device \(TST0\)\s*\{\s*Name \(_ADR, 0x00060000\)",
                     dsdt, re.S), dsdt
    assert re.search(r"Device \(ISA\)\s*\{\s*Name \(_ADR, 0x001F0000\).*Device \(RTC\)", dsdt,
                     re.S), dsdt
