"""The guest-physical address map of a pyhyve VM, in one place.

Memory, the buses, the loaders and the firmware tables (ACPI, MP table, e820)
all describe the same machine; each reads its addresses from here, so they
cannot disagree.  The map is bhyve's, which is also what SeaBIOS and Linux
expect of a PC:

    0          - 0xA0000      RAM (conventional memory)
    0xA0000    - 0x100000     legacy hole: VGA window, option ROMs, BIOS area
      0xE0000  - 0x100000       BIOS area: the bootrom's last 128 KiB, shadowed
                                into RAM chunk by chunk by the host bridge's PAM
      0xF0000                   MP table (a directly booted kernel)
      0xF2400                   ACPI tables (a directly booted kernel)
    0x100000   - 3 GiB        RAM
    3 GiB      - 0xE0000000   32-bit PCI BARs
    0xE0000000 - +1 MiB       PCI ECAM (bus 0)
    0xFEC00000                I/O APIC
    0xFED00000                HPET
    0xFEE00000                local APICs (and the MSI window)
    0xFEFFC000 - 0xFF000000   KVM's identity-map page and TSS (Intel)
    4 GiB      -              RAM above the hole, then 64-bit PCI BARs
"""

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

LEGACY_HOLE = (0xA0000, 0x100000)   # never RAM for a kernel: VGA window and BIOS area
BIOS_AREA_BASE = 0xE0000            # the legacy BIOS window firmware expects
BIOS_AREA_SIZE = 128 * KiB
BIOS_AREA_END = BIOS_AREA_BASE + BIOS_AREA_SIZE
# The i440FX PAM granularity above 0xE0000: four 16 KiB chunks, then 64 KiB.
BIOS_AREA_CHUNKS = ((0xE0000, 0xE4000), (0xE4000, 0xE8000), (0xE8000, 0xEC000),
                    (0xEC000, 0xF0000), (0xF0000, 0x100000))
MPTABLE_BASE = 0xF0000              # where bhyve puts it
ACPI_TABLES_BASE = 0xF2400          # bhyve's RSDP address

LOWMEM_LIMIT = 3 * GiB              # bhyve's default start of the PCI hole
HIGHMEM_BASE = 4 * GiB
ECAM_BASE = 0xE0000000              # bhyve's PCI_EMUL_ECFG_BASE
ECAM_BUSES = 1                      # bus 0 only: 1 MiB of MMCONFIG
ECAM_SIZE = ECAM_BUSES << 20
PCI_MEM32_WINDOW = (LOWMEM_LIMIT, ECAM_BASE)
PCI_IO_WINDOW = (0xC000, 0x10000)   # where SeaBIOS and QEMU put PCI I/O BARs
PCI_MEM64_SIZE = 64 * GiB

IOAPIC_BASE = 0xFEC00000
HPET_BASE = 0xFED00000
LAPIC_BASE = 0xFEE00000             # also where MSIs are written (the MSI window)
IDENTITY_MAP_ADDR = 0xFEFFC000      # one page KVM needs on Intel, below the bootrom
TSS_ADDR = 0xFEFFD000               # three pages KVM needs on Intel
