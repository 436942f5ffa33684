"""The ACPI tables that describe a pyhyve VM to its guest (bhyve's acpi.c).

`build_tables()` turns an `AcpiPlatform` (what the VM has: vCPUs, PCI windows
and INTx pins, the PM registers, the HPET, and the DSDT objects its devices
describe themselves with, Device.acpi_objects()) into RSDP, RSDT, XSDT, FADT,
FACS, MADT, MCFG, HPET and a DSDT.  Tables point at each other by
physical address, which is known only once they are placed, so each `Table`
lists its pointer fields and checksums and is linked in one of two ways:

- `install_in_fwcfg()`: SeaBIOS (like OVMF) reads `etc/acpi/tables` and
  `etc/acpi/rsdp` from fw_cfg, allocates them where it likes, and follows the
  commands in `etc/table-loader` (QEMU's BIOS linker/loader format) to patch the
  pointers and checksums; it then installs these tables instead of its own.
- `tables_in_memory()`: for a kernel booted without firmware, the tables are
  laid out at a fixed address in the BIOS area (bhyve uses 0xF2400), where an
  OS scanning for "RSD PTR " finds them.

The DSDT describes an APIC-mode platform only: its _PRT routes each INTx pin
straight to I/O APIC pin 16 + link, and there are no PCI interrupt link
devices, so an OS that runs the 8259s (calls _PIC(0)) gets no PCI interrupt
routing from ACPI.  _PIC still records the mode, in PICM, as the ACPI spec
asks of a platform.
"""

import struct

from ..devices.hpet import CAPABILITIES as HPET_CAPABILITIES
from ..devices.pm import (PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TMR_PORT, SCI_IRQ, SLP_TYP_S3,
                          SLP_TYP_S5)
from ..devices.rtc import CENTURY
from ..devices.syscontrol import RC_RST_CPU, RC_SYS_RST, RESET_CONTROL
from ..layout import ACPI_TABLES_BASE, ECAM_BASE, HPET_BASE, IOAPIC_BASE, LAPIC_BASE, LOWMEM_LIMIT
from ..lifecycle import ACPI_ISA, ACPI_PCI_ROOT, ACPI_SYSTEM
from ..pci.intx import IOAPIC_PIN_BASE, link_for
from ..pci.regs import INTERRUPT_PIN
from . import aml
from ..record import record

OEM_ID = b"PYHYVE"
OEM_TABLE_ID = b"PYHYVE  "
OEM_REVISION = 1
CREATOR_ID = b"PYHV"
CREATOR_REVISION = 1

PCI_MEM32_END = IOAPIC_BASE     # SeaBIOS places 32-bit BARs top-down from here
CONFIG_PORTS = (0xCF8, 8)       # the PCI config mechanism #1 ports the root bridge claims
ISA_BRIDGE = (31, 0)            # where vm.py puts `lpc` unless told otherwise

TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"

HEADER = struct.Struct("<4sIBB6s8sI4sI")   # the 36-byte System Description Table header
CHECKSUM_OFFSET = 9


# --- the platform -----------------------------------------------------------------------
@record
class AcpiPlatform:
    """What the tables describe.  Address windows are (start, end) with `end`
    exclusive, as everywhere in pyhyve; the defaults are pyhyve's platform.
    (Named tuples here rather than dataclasses: importing dataclasses costs
    milliseconds of start-up, and every VM builds ACPI tables.)"""

    cpus: tuple[int, ...] = (0,)            # APIC IDs, in vCPU order (ACPI UIDs 0, 1, ...)
    ecam_base: int = ECAM_BASE
    ecam_buses: tuple[int, int] = (0, 0)    # first and last bus, inclusive
    pci_io: tuple[int, int] = (0, 0x10000)  # the root bridge decodes all ports but config
    pci_mem32: tuple[int, int] = (LOWMEM_LIMIT, PCI_MEM32_END)
    pci_mem64: tuple[int, int] | None = None
    pci_intx: tuple[tuple[int, int], ...] = ()      # (slot, pin), pin 1-4 = INTA-INTD
    isa_bridge: tuple[int, int] | None = ISA_BRIDGE  # (slot, function) of the LPC bridge
    # what the devices describe themselves with: (lifecycle.ACPI_*, AML) pairs
    objects: tuple[tuple[str, bytes], ...] = ()
    pm1a_evt: int = PM1A_EVT_PORT
    pm1a_cnt: int = PM1A_CNT_PORT
    pm_tmr: int = PM_TMR_PORT
    sci_irq: int = SCI_IRQ
    hpet: int | None = HPET_BASE            # where the HPET's registers are, if it has one

    def check(self) -> None:
        """ValueError for a platform no tables can describe (build_tables asks)."""
        if not self.cpus or len(set(self.cpus)) != len(self.cpus):
            raise ValueError("ACPI needs at least one vCPU, each with its own APIC ID")
        first, last = self.ecam_buses
        if not 0 <= first <= last <= 255:
            raise ValueError(f"invalid ECAM bus range {first}-{last}")

    @property
    def ecam_size(self) -> int:
        first, last = self.ecam_buses
        return (last - first + 1) << 20

    @property
    def ioapic_id(self) -> int:
        """The lowest ID no local APIC has: unique in the old shared APIC ID space,
        and below 16 (what KVM's I/O APIC ID register holds) for up to 15 vCPUs."""
        return min(set(range(256)) - set(self.cpus))


def platform_from_vm(vm) -> AcpiPlatform:
    """The AcpiPlatform of an assembled VirtualMachine."""
    devices = vm.pci.devices()
    pins = sorted({(device.slot, device.config[INTERRUPT_PIN]) for device in devices
                   if 1 <= device.config[INTERRUPT_PIN] <= 4})
    lpc = [(device.slot, device.func) for device in devices if device.emulation_name == "lpc"]
    return AcpiPlatform(
        cpus=tuple(vm.topology.apic_id(index) for index in range(vm.topology.cpus)),
        pci_mem64=vm.pci.mem64_window,
        pci_intx=tuple(pins),
        isa_bridge=lpc[0] if lpc else None,
        objects=tuple(item for device in vm.devices for item in device.acpi_objects()),
    )


# --- tables and how they link -------------------------------------------------------------
@record
class Pointer:
    """A field holding another table's physical address."""
    offset: int
    size: int           # 4 or 8 bytes
    target: str         # the signature of the table it points at


@record
class Checksum:
    """A byte that makes bytes [start, start + length) sum to zero."""
    offset: int
    start: int
    length: int


@record
class Table:
    """One table's bytes, its pointer fields (zero until linked) and its checksums."""
    data: bytes
    pointers: tuple[Pointer, ...] = ()
    checksums: tuple[Checksum, ...] = ()
    align: int = 8

    @property
    def signature(self) -> str:
        return self.data[:4].decode("ascii")


@record
class AcpiTables:
    """The RSDP and the tables it leads to, in the order they are laid out."""
    rsdp: Table
    tables: tuple[Table, ...]

    def table(self, signature: str) -> Table:
        for table in self.tables:
            if table.signature == signature:
                return table
        raise KeyError(signature)


def _fill_checksums(image: bytearray, offset: int, table: Table) -> None:
    """Checksums in order: the RSDP's extended checksum covers its first one."""
    for checksum in table.checksums:
        at = offset + checksum.offset
        image[at] = 0
        start = offset + checksum.start
        image[at] = -sum(image[start:start + checksum.length]) & 0xFF


def _place(tables, base: int, elsewhere: dict[str, int] | None = None
           ) -> tuple[bytearray, dict[str, int], list[int]]:
    """Lay tables out from `base`, each at its alignment; fill in every pointer (to a
    table placed here, or one at an address in `elsewhere`) and every checksum.
    Returns the image, each table's address, and each table's offset in the image."""
    image = bytearray()
    offsets = []
    for table in tables:
        image += bytes(-(base + len(image)) % table.align)
        offsets.append(len(image))
        image += table.data
    addresses = {table.signature: base + offset for table, offset in zip(tables, offsets)}
    known = {**(elsewhere or {}), **addresses}
    for table, offset in zip(tables, offsets):
        for pointer in table.pointers:
            image[offset + pointer.offset:offset + pointer.offset + pointer.size] = \
                known[pointer.target].to_bytes(pointer.size, "little")
        _fill_checksums(image, offset, table)
    return image, addresses, offsets


def _checksummed(table: Table) -> Table:
    """The table with its checksums right as it stands (pointers still zero), so
    that it is valid on its own too."""
    data = bytearray(table.data)
    _fill_checksums(data, 0, table)
    return table._replace(data=bytes(data))


def _sdt(signature: bytes, revision: int, body: bytes, pointers=()) -> Table:
    """A System Description Table: the standard header, then `body`."""
    length = HEADER.size + len(body)
    header = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION,
                         CREATOR_ID, CREATOR_REVISION)
    return _checksummed(Table(header + body, tuple(pointers),
                              (Checksum(CHECKSUM_OFFSET, 0, length),)))


# --- RSDP, RSDT, XSDT (5.2.5, 5.2.7, 5.2.8) ---------------------------------------------------
RSDP = struct.Struct("<8sB6sBIIQB3x")
RSDP_REVISION = 2               # ACPI 2.0+: the XSDT address and the extended checksum
RSDP_V1_LENGTH = 20             # what the first checksum covers


RSDP_SIGNATURE = "RSD "         # its Table.signature: the first four bytes of "RSD PTR "


def build_rsdp() -> Table:
    data = RSDP.pack(b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0, RSDP.size, 0, 0)
    return _checksummed(Table(data, (Pointer(16, 4, "RSDT"), Pointer(24, 8, "XSDT")),
                              (Checksum(8, 0, RSDP_V1_LENGTH), Checksum(32, 0, RSDP.size)),
                              align=16))


def build_rsdt(signatures: list[str]) -> Table:
    """For ACPI 1.0 guests: 32-bit pointers to the same tables as the XSDT."""
    return _sdt(b"RSDT", 1, bytes(4 * len(signatures)),
                [Pointer(HEADER.size + 4 * i, 4, sig) for i, sig in enumerate(signatures)])


def build_xsdt(signatures: list[str]) -> Table:
    return _sdt(b"XSDT", 1, bytes(8 * len(signatures)),
                [Pointer(HEADER.size + 8 * i, 8, sig) for i, sig in enumerate(signatures)])


# --- FADT and FACS (5.2.9, 5.2.10) ----------------------------------------------------------
FADT_REVISION, FADT_MINOR_REVISION = 6, 0     # ACPI 6.0: 276 bytes
GAS = struct.Struct("<BBBBQ")                 # Generic Address Structure
SYSTEM_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3
NO_C2_LATENCY, NO_C3_LATENCY = 101, 1001      # above 100 and 1000 us: not supported
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5        # set: no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8       # the PM timer has 32 bits
FADT_RESET_REG_SUP = 1 << 10
RESET_VALUE = RC_SYS_RST | RC_RST_CPU
FADT_FACS_OFFSET, FADT_DSDT_OFFSET, FADT_X_DSDT_OFFSET = 36, 40, 140
FACS = struct.Struct("<4sIIIIIQB3xI24x")
FACS_WAKING_VECTOR = 12         # the 32-bit firmware waking vector's offset
FACS_VERSION = 2


def _gas(address: int, byte_width: int, access: int) -> bytes:
    return GAS.pack(SYSTEM_IO, 8 * byte_width, 0, access, address)


def build_fadt(platform: AcpiPlatform) -> Table:
    """Fixed hardware: the PM1a blocks and PM timer at pm.py's ports, SCI on IRQ 9,
    reset through 0xCF9, a fixed power button and no sleep button.  SMI_CMD is 0:
    there is no SMM, ACPI is always enabled (SCI_EN is never handed over)."""
    no_register = bytes(GAS.size)
    pm1_evt_len, pm1_cnt_len, pm_tmr_len = 4, 2, 4
    body = b"".join([
        struct.pack("<II", 0, 0),                   # FIRMWARE_CTRL (FACS), DSDT: linked
        struct.pack("<BBH", 0, 0, platform.sci_irq),    # reserved, PM profile unspecified
        struct.pack("<IBBBB", 0, 0, 0, 0, 0),       # SMI_CMD, ACPI_ENABLE/DISABLE, S4BIOS, PSTATE
        struct.pack("<8I", platform.pm1a_evt, 0, platform.pm1a_cnt, 0, 0, platform.pm_tmr,
                    0, 0),                          # PM1a/b EVT, PM1a/b CNT, PM2, TMR, GPE0/1
        struct.pack("<8B", pm1_evt_len, pm1_cnt_len, 0, pm_tmr_len, 0, 0, 0, 0),
        struct.pack("<4H", NO_C2_LATENCY, NO_C3_LATENCY, 0, 0),     # ..., flush size, stride
        struct.pack("<5B", 0, 0, 0, 0, CENTURY),    # duty cycle, RTC alarms, century index
        struct.pack("<HB", IAPC_LEGACY_DEVICES | IAPC_8042, 0),
        struct.pack("<I", FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT |
                    FADT_RESET_REG_SUP),
        _gas(RESET_CONTROL, 1, ACCESS_BYTE),
        struct.pack("<BHB", RESET_VALUE, 0, FADT_MINOR_REVISION),  # ..., ARM boot flags
        struct.pack("<QQ", 0, 0),                   # X_FIRMWARE_CTRL (must stay 0), X_DSDT
        _gas(platform.pm1a_evt, pm1_evt_len, ACCESS_WORD), no_register,
        _gas(platform.pm1a_cnt, pm1_cnt_len, ACCESS_WORD), no_register,
        no_register,                                # X_PM2_CNT_BLK
        _gas(platform.pm_tmr, pm_tmr_len, ACCESS_DWORD),
        no_register, no_register,                   # X_GPE0_BLK, X_GPE1_BLK
        no_register, no_register,                   # sleep control/status: HW-reduced only
        struct.pack("<Q", 0),                       # hypervisor vendor identity
    ])
    return _sdt(b"FACP", FADT_REVISION, body, [
        Pointer(FADT_FACS_OFFSET, 4, "FACS"),
        Pointer(FADT_DSDT_OFFSET, 4, "DSDT"),       # SeaBIOS reads only this one
        Pointer(FADT_X_DSDT_OFFSET, 8, "DSDT"),
    ])


def build_facs() -> Table:
    """Required of every platform that is not hardware-reduced; no checksum, 64-byte aligned."""
    return Table(FACS.pack(b"FACS", FACS.size, 0, 0, 0, 0, 0, FACS_VERSION, 0), align=64)


# --- MADT (5.2.12) -------------------------------------------------------------------------
MADT_REVISION = 4               # ACPI 6.0 errata A
MADT_PCAT_COMPAT = 1 << 0       # the 8259s are there too
LOCAL_APIC, IO_APIC, SOURCE_OVERRIDE, LOCAL_APIC_NMI = 0, 1, 2, 4
LOCAL_X2APIC, LOCAL_X2APIC_NMI = 9, 10
LAPIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF           # Local APIC NMI: every processor
ALL_X2APIC_PROCESSORS = 0xFFFFFFFF
INTI_CONFORMS = 0
INTI_ACTIVE_HIGH = 1
INTI_EDGE = 1 << 2
INTI_LEVEL = 3 << 2
NMI_LINT = 1
ISA_TIMER_IRQ, ISA_TIMER_GSI = 0, 2
MAX_XAPIC_ID = 254              # 255 is the xAPIC broadcast ID


def build_madt(platform: AcpiPlatform) -> Table:
    """One enabled local APIC per vCPU (x2APIC entries for IDs an xAPIC cannot hold),
    KVM's I/O APIC with GSIs from 0, and the ISA overrides: the PIT's IRQ 0 on pin 2,
    the SCI level-triggered, active-high."""
    entries = []
    for uid, apic_id in enumerate(platform.cpus):
        if apic_id <= MAX_XAPIC_ID:
            entries.append(struct.pack("<BBBBI", LOCAL_APIC, 8, uid, apic_id, LAPIC_ENABLED))
        else:
            entries.append(struct.pack("<BBHIII", LOCAL_X2APIC, 16, 0, apic_id, LAPIC_ENABLED,
                                       uid))
    entries.append(struct.pack("<BBBBII", IO_APIC, 12, platform.ioapic_id, 0, IOAPIC_BASE, 0))
    entries.append(struct.pack("<BBBBIH", SOURCE_OVERRIDE, 10, 0, ISA_TIMER_IRQ, ISA_TIMER_GSI,
                               INTI_CONFORMS))
    entries.append(struct.pack("<BBBBIH", SOURCE_OVERRIDE, 10, 0, platform.sci_irq,
                               platform.sci_irq, INTI_ACTIVE_HIGH | INTI_LEVEL))
    entries.append(struct.pack("<BBBHB", LOCAL_APIC_NMI, 6, ALL_PROCESSORS,
                               INTI_ACTIVE_HIGH | INTI_EDGE, NMI_LINT))
    if max(platform.cpus) > MAX_XAPIC_ID:
        entries.append(struct.pack("<BBHIB3x", LOCAL_X2APIC_NMI, 12,
                                   INTI_ACTIVE_HIGH | INTI_EDGE, ALL_X2APIC_PROCESSORS,
                                   NMI_LINT))
    return _sdt(b"APIC", MADT_REVISION,
                struct.pack("<II", LAPIC_BASE, MADT_PCAT_COMPAT) + b"".join(entries))


# --- HPET (IA-PC HPET Specification 1.0a, 3.2.4) ----------------------------------------------
SYSTEM_MEMORY = 0


def build_hpet(platform: AcpiPlatform) -> Table:
    """Event Timer Block ID (the low half of the capabilities register), the
    block's address, HPET number 0, no minimum periodic tick, no page protection."""
    body = struct.pack("<I", HPET_CAPABILITIES & 0xFFFFFFFF) + \
        GAS.pack(SYSTEM_MEMORY, 0, 0, 0, platform.hpet) + struct.pack("<BHB", 0, 0, 0)
    return _sdt(b"HPET", 1, body)


# --- MCFG (PCI Firmware Specification 3.0, 4.1.2) -------------------------------------------
def build_mcfg(platform: AcpiPlatform) -> Table:
    first, last = platform.ecam_buses
    allocation = struct.pack("<QHBBI", platform.ecam_base, 0, first, last, 0)
    return _sdt(b"MCFG", 1, bytes(8) + allocation)


# --- DSDT -------------------------------------------------------------------------------------
DSDT_REVISION = 2               # 64-bit AML integers


def _subtract(window: tuple[int, int], hole: tuple[int, int]) -> list[tuple[int, int]]:
    """The parts of [start, end) outside [hole start, hole end)."""
    start, end = window
    parts = [(start, min(end, hole[0])), (max(start, hole[1]), end)]
    return [(a, b) for a, b in parts if a < b]


def _host_bridge_resources(platform: AcpiPlatform) -> bytes:
    """PCI0's _CRS: its buses, the config ports it consumes, and the windows it
    forwards: all I/O ports but those, and memory outside ECAM."""
    config_ports = (CONFIG_PORTS[0], CONFIG_PORTS[0] + CONFIG_PORTS[1])
    ecam = (platform.ecam_base, platform.ecam_base + platform.ecam_size)
    descriptors = [aml.word_bus_number(*platform.ecam_buses),
                   aml.io(CONFIG_PORTS[0], CONFIG_PORTS[0], 1, CONFIG_PORTS[1])]
    descriptors += [aml.word_io(start, end - 1) for start, end in
                    _subtract(platform.pci_io, config_ports)]
    descriptors += [aml.dword_memory(start, end - 1) for start, end in
                    _subtract(platform.pci_mem32, ecam)]
    if platform.pci_mem64 is not None:
        start, end = platform.pci_mem64
        descriptors.append(aml.qword_memory(start, end - 1, cacheable=True))
    return aml.resource_template(*descriptors)


def _routing_table(platform: AcpiPlatform) -> bytes:
    """_PRT: each (slot, pin) to its link's I/O APIC pin, as pyhyve.pci.intx wires it.
    A source of 0 means the last element is a GSI, level-triggered and active-low."""
    entries = [aml.package((slot << 16) | 0xFFFF, pin - 1, 0,
                           IOAPIC_PIN_BASE + link_for(slot, pin))
               for slot, pin in sorted(set(platform.pci_intx))]
    return aml.package(*entries)


def build_dsdt(platform: AcpiPlatform) -> Table:
    """\\_SB.PCI0 (the PCIe root: ECAM, windows, _PRT), a motherboard-resource device
    that reserves ECAM (Linux trusts MCFG only if something does), _S3, _S5 and _PIC, and
    what the devices add: the legacy ones behind the LPC bridge (or at \\_SB when
    there is none), the HPET at \\_SB."""
    host_bridge = [
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_SEG", 0),
        aml.name("_UID", 0),
        aml.name("_BBN", platform.ecam_buses[0]),
        aml.name("_CRS", _host_bridge_resources(platform)),
        aml.name("_PRT", _routing_table(platform)),
        aml.device("MRES", aml.name("_HID", aml.eisa_id("PNP0C02")),
                   aml.name("_CRS", aml.resource_template(
                       aml.memory32_fixed(platform.ecam_base, platform.ecam_size)))),
    ]
    placed = {ACPI_ISA: [], ACPI_SYSTEM: [], ACPI_PCI_ROOT: []}
    for where, body in platform.objects:
        placed[where].append(body)
    system_bus = placed[ACPI_SYSTEM]
    host_bridge += placed[ACPI_PCI_ROOT]
    if platform.isa_bridge is not None:
        slot, function = platform.isa_bridge
        host_bridge.append(aml.device("ISA", aml.name("_ADR", (slot << 16) | function),
                                      *placed[ACPI_ISA]))
    else:
        system_bus += placed[ACPI_ISA]
    body = b"".join([
        aml.name("PICM", 0),
        aml.method("_PIC", 1, aml.store(aml.arg(0), aml.name_string("PICM"))),
        aml.name("_S3", aml.package(SLP_TYP_S3, SLP_TYP_S3, 0, 0)),
        aml.name("_S5", aml.package(SLP_TYP_S5, SLP_TYP_S5, 0, 0)),
        aml.scope("\\_SB", aml.device("PCI0", *host_bridge), *system_bus),
    ])
    return _sdt(b"DSDT", DSDT_REVISION, body)


# --- all of them ------------------------------------------------------------------------------
def build_tables(platform: AcpiPlatform) -> AcpiTables:
    """Every table, FACS first for its 64-byte alignment."""
    platform.check()
    listed = [build_fadt(platform), build_madt(platform), build_mcfg(platform)]
    if platform.hpet is not None:
        listed.append(build_hpet(platform))
    signatures = [table.signature for table in listed]
    return AcpiTables(build_rsdp(), (build_facs(), build_dsdt(platform), *listed,
                                     build_xsdt(signatures), build_rsdt(signatures)))


def tables_image(tables: AcpiTables, base: int = ACPI_TABLES_BASE
                 ) -> tuple[bytes, dict[str, int]]:
    """The tables linked to run from `base`, the RSDP first (so at `base`, which must
    be 16-byte aligned for an OS's scan to find it); returns the image and each
    table's address."""
    if base % 16:
        raise ValueError(f"the RSDP must be 16-byte aligned, not at {base:#x}")
    image, addresses, _ = _place([tables.rsdp, *tables.tables], base)
    return bytes(image), addresses


def tables_in_memory(memory, tables: AcpiTables, base: int = ACPI_TABLES_BASE
                     ) -> dict[str, int]:
    """Write the linked tables into guest memory at `base` (the RSDP's address);
    returns each table's address, by signature."""
    image, addresses = tables_image(tables, base)
    memory.write(base, image)
    return addresses


# --- the fw_cfg table loader (QEMU's hw/acpi/bios-linker-loader.c) ----------------------------
LOADER_ENTRY_SIZE = 128
LOADER_FILE_NAME = 56           # bytes, NUL-padded: fw_cfg's file name field
LOADER_ALLOCATE, LOADER_ADD_POINTER, LOADER_ADD_CHECKSUM = 1, 2, 3
ZONE_HIGH, ZONE_FSEG = 1, 2     # anywhere below 4 GiB; the 0xE0000-0xFFFFF BIOS segment


def _loader_entry(command: int, payload: bytes) -> bytes:
    return struct.pack("<I", command) + payload.ljust(LOADER_ENTRY_SIZE - 4, b"\0")


def _file_name(name: str) -> bytes:
    return struct.pack(f"{LOADER_FILE_NAME}s", name.encode())


def loader_allocate(file: str, align: int, zone: int) -> bytes:
    """Allocate a buffer for `file` and copy the file in."""
    return _loader_entry(LOADER_ALLOCATE, _file_name(file) + struct.pack("<IB", align, zone))


def loader_add_pointer(dest: str, src: str, offset: int, size: int) -> bytes:
    """Add the address of `src`'s buffer to the `size`-byte number at `offset` in `dest`."""
    return _loader_entry(LOADER_ADD_POINTER,
                         _file_name(dest) + _file_name(src) + struct.pack("<IB", offset, size))


def loader_add_checksum(file: str, offset: int, start: int, length: int) -> bytes:
    """Subtract the byte sum of [start, start + length) from the byte at `offset`."""
    return _loader_entry(LOADER_ADD_CHECKSUM,
                         _file_name(file) + struct.pack("<III", offset, start, length))


def install_in_fwcfg(fwcfg, tables: AcpiTables) -> None:
    """Hand the tables to SeaBIOS (or OVMF): the RSDP in the F segment where OSes look
    for it, the rest in high memory.  The files carry each pointer as an offset into
    `etc/acpi/tables`, which the loader turns into an address by adding where it put
    that file; then it recomputes every checksum."""
    blob, offsets_by_signature, offsets = _place(tables.tables, 0)
    rsdp, _, _ = _place([tables.rsdp], 0, offsets_by_signature)
    placed = [(TABLES_FILE, table, offset) for table, offset in zip(tables.tables, offsets)]
    placed.append((RSDP_FILE, tables.rsdp, 0))
    commands = [loader_allocate(RSDP_FILE, tables.rsdp.align, ZONE_FSEG),
                loader_allocate(TABLES_FILE, max(table.align for table in tables.tables),
                                ZONE_HIGH)]
    commands += [loader_add_pointer(file, TABLES_FILE, offset + pointer.offset, pointer.size)
                 for file, table, offset in placed for pointer in table.pointers]
    commands += [loader_add_checksum(file, offset + checksum.offset, offset + checksum.start,
                                     checksum.length)
                 for file, table, offset in placed for checksum in table.checksums]
    fwcfg.add_file(TABLES_FILE, bytes(blob), replace=True)
    fwcfg.add_file(RSDP_FILE, bytes(rsdp), replace=True)
    fwcfg.add_file(LOADER_FILE, b"".join(commands), replace=True)
