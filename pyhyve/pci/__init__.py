"""bhyve's pci_emul: PCI device emulations, registered by name for `-s`.

    @emulation("mydev")
    class MyDevice(PciDevice):
        def init(self, options): ...

makes `-s 5,mydev,opt=value` instantiate MyDevice in slot 5.
"""

import importlib

from .device import BAR_IO, BAR_MEM32, BAR_MEM64, PciDevice

_EMULATIONS: dict[str, type] = {}
# Modules whose import registers the built-in emulations.
BUILTIN_MODULES = ("pyhyve.pci.hostbridge", "pyhyve.pci.lpc", "pyhyve.pci.testdev",
                   "pyhyve.virtio.blk", "pyhyve.virtio.console", "pyhyve.virtio.net",
                   "pyhyve.virtio.rnd")


def emulation(name: str):
    """Class decorator: register a PciDevice subclass under an emulation name."""
    def register(cls: type) -> type:
        cls.emulation_name = name
        _EMULATIONS[name] = cls
        return cls
    return register


def emulations() -> dict[str, type]:
    """Every registered emulation, the built-in ones loaded first."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(sorted(_EMULATIONS.items()))


def describe(cls: type) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


__all__ = ["emulation", "emulations", "describe", "PciDevice",
           "BAR_IO", "BAR_MEM32", "BAR_MEM64"]
