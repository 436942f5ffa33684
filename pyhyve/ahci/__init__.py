"""The `ahci`, `ahci-hd` and `ahci-cd` PCI emulations (bhyve's pci_ahci): an
AHCI SATA controller with disks and CD-ROMs on the shared block backend.
hba.py holds the PCI function and the HBA's registers and interrupts,
port.py a port's registers, drive and FIS receive area, engine.py the
command list engine, protocol.py the FIS and command layouts, ata.py the ATA
command set and atapi.py the SCSI commands a CD-ROM answers."""
