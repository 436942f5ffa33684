"""bhyve's pci_emul: PCI device emulations, registered by name for `-s`.

    @emulation("mydev")
    class MyDevice(PciDevice):
        def init(self, options): ...

makes `-s 5,mydev,opt=value` instantiate MyDevice in slot 5.
"""

import importlib

from .device import BAR_IO, BAR_MEM32, BAR_MEM64, PciDevice

_EMULATIONS: dict[str, type] = {}
# The module whose import registers each built-in emulation: a VM imports only
# those it uses (the virtio modules alone cost milliseconds of start-up).
BUILTIN_MODULES = {
    "hostbridge": "pyhyve.pci.hostbridge",
    "amd_hostbridge": "pyhyve.pci.hostbridge",
    "lpc": "pyhyve.pci.lpc",
    "pci-testdev": "pyhyve.pci.testdev",
    "virtio-blk": "pyhyve.virtio.blk",
    "virtio-console": "pyhyve.virtio.console",
    "virtio-net": "pyhyve.virtio.net",
    "virtio-rnd": "pyhyve.virtio.rnd",
}


def emulation(name: str):
    """Class decorator: register a PciDevice subclass under an emulation name."""
    def register(cls: type) -> type:
        cls.emulation_name = name
        _EMULATIONS[name] = cls
        return cls
    return register


def find_emulation(name: str) -> type | None:
    """The emulation registered as `name` (a built-in one is imported now), or None."""
    if name not in _EMULATIONS and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    return _EMULATIONS.get(name)


def emulations() -> dict[str, type]:
    """Every registered emulation, the built-in ones loaded first."""
    for module in BUILTIN_MODULES.values():
        importlib.import_module(module)
    return dict(sorted(_EMULATIONS.items()))


def describe(cls: type) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


__all__ = ["emulation", "emulations", "find_emulation", "describe", "PciDevice",
           "BAR_IO", "BAR_MEM32", "BAR_MEM64"]
