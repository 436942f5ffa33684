"""The `nvme` PCI emulation (bhyve's pci_nvme): an NVM Express 1.4 controller
with one namespace on a disk image.  controller.py holds the device,
prp.py the walk of a command's data pointers, pages.py the data structures
Identify and Get Log Page return."""
