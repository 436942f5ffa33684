"""bhyve's pci_emul: PCI device emulations, registered by name for `-s`.

    @emulation("mydev")
    class MyDevice(PciDevice):
        def init(self, options): ...

makes `-s 5,mydev,opt=value` instantiate MyDevice in slot 5.  A device kept
outside pyhyve, in an installed package, names its class in the package's
entry points instead (pyproject.toml):

    [project.entry-points."pyhyve.pci_emulations"]
    mydev = "mypackage.mydev:MyDevice"
"""

from ..config import ConfigError
from ..log import getLogger
from .device import BAR_IO, BAR_MEM32, BAR_MEM64, PciDevice

_EMULATIONS: dict[str, type] = {}
# The module whose import registers each built-in emulation: a VM imports only
# those it uses (the virtio modules alone cost milliseconds of start-up), with
# __import__: the importlib package would add half a millisecond more.
BUILTIN_MODULES = {
    "ahci": "pyhyve.ahci.hba",
    "ahci-cd": "pyhyve.ahci.hba",
    "ahci-hd": "pyhyve.ahci.hba",
    "hostbridge": "pyhyve.pci.hostbridge",
    "amd_hostbridge": "pyhyve.pci.hostbridge",
    "fbuf": "pyhyve.display.stdvga",
    "stdvga": "pyhyve.display.stdvga",
    "lpc": "pyhyve.pci.lpc",
    "nvme": "pyhyve.nvme.controller",
    "pci-testdev": "pyhyve.pci.testdev",
    "virtio-9p": "pyhyve.virtio.emulations",
    "virtio-blk": "pyhyve.virtio.emulations",
    "virtio-console": "pyhyve.virtio.emulations",
    "virtio-keyboard": "pyhyve.virtio.emulations",
    "virtio-net": "pyhyve.virtio.emulations",
    "virtio-rnd": "pyhyve.virtio.emulations",
    "virtio-scsi": "pyhyve.virtio.emulations",
    "virtio-tablet": "pyhyve.virtio.emulations",
    "xhci": "pyhyve.usb.xhci",
}


def emulation(name: str):
    """Class decorator: register a PciDevice subclass under an emulation name."""
    def register(cls: type) -> type:
        cls.emulation_name = name
        _EMULATIONS[name] = cls
        return cls
    return register


ENTRY_POINTS = "pyhyve.pci_emulations"


def find_emulation(name: str) -> type | None:
    """The emulation registered as `name` (a built-in one, or one an installed
    package's entry point names, is imported now), or None."""
    if name not in _EMULATIONS:
        if name in BUILTIN_MODULES:
            __import__(BUILTIN_MODULES[name])
        else:
            from importlib.metadata import entry_points     # milliseconds: only for plugins
            for entry in entry_points(group=ENTRY_POINTS, name=name):
                _load(entry)
    return _EMULATIONS.get(name)


def emulations() -> dict[str, type]:
    """Every emulation there is: built-in ones, then installed packages' (one
    that fails to load is left out, with a warning)."""
    from importlib.metadata import entry_points
    for module in BUILTIN_MODULES.values():
        __import__(module)
    for entry in entry_points(group=ENTRY_POINTS):
        if entry.name not in _EMULATIONS:
            try:
                _load(entry)
            except ConfigError as exc:
                getLogger(__name__).warning("%s", exc)
    return dict(sorted(_EMULATIONS.items()))


def _load(entry) -> None:
    """Register the PciDevice class an entry point names, under the entry's name."""
    try:
        cls = entry.load()
    except Exception as exc:        # someone else's package: report, never a traceback
        raise ConfigError(f"PCI emulation '{entry.name}' ({entry.value}) cannot be "
                          f"loaded: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, PciDevice)):
        raise ConfigError(f"PCI emulation '{entry.name}' ({entry.value}) is not a "
                          "PciDevice subclass")
    emulation(entry.name)(cls)


def describe(cls: type) -> str:
    """The emulation's summary for `-s help`: its docstring's first paragraph,
    whole, on one line (a summary wrapped over two lines lost its second, and
    with it what virtio-net's backends all take)."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split())


__all__ = ["emulation", "emulations", "find_emulation", "describe", "PciDevice",
           "BAR_IO", "BAR_MEM32", "BAR_MEM64"]
