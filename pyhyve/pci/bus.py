"""PCI bus 0: slots, config cycles (mechanism #1 and ECAM), BAR windows.

bhyve's pci_emul.c keeps the same pieces: a slot/function table filled by
`-s`, config access through ports 0xCF8/0xCFC and the MMCONFIG window, and an
allocator that gives each BAR an initial address the guest may change.
"""

from ..config import ConfigError
from ..iobus import BusConflict
from ..lifecycle import Device, bits, expect_keys
from ..layout import (ECAM_BASE, ECAM_SIZE, HIGHMEM_BASE, PCI_IO_WINDOW, PCI_MEM32_WINDOW,
                      PCI_MEM64_SIZE, GiB, MiB)
from ..log import getLogger
from .device import BAR_IO, BAR_MEM32, BAR_MEM64, PciDevice
from .intx import IntxRouter
from .options import check as check_options

log = getLogger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_ENABLE = 1 << 31
SLOTS, FUNCTIONS = 32, 8


MAX_ROM_SIZE = 16 * MiB


def _read_rom(path: str, emulation: str) -> bytes:
    try:
        with open(path, "rb") as file:
            image = file.read(MAX_ROM_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"{emulation}: cannot read rom={path}: {exc.strerror}") from None
    if not image or len(image) > MAX_ROM_SIZE:
        raise ConfigError(f"{emulation}: rom={path} must hold 1 byte to 16 MiB")
    return image


class PciBus(Device):
    """Bus 0 of the guest's PCI hierarchy.  Its own state is the config-address
    latch at 0xCF8; each function it holds is a device of the VM's too."""

    number = 0
    name = "pci.0"
    savable = True

    def __init__(self, context):
        self.context = context
        self.functions: dict[tuple[int, int], PciDevice] = {}
        self.config_address = 0
        self.intx = IntxRouter(context)
        high_end = HIGHMEM_BASE + context.memory.highmem_size
        mem64_base = max(HIGHMEM_BASE + 60 * GiB, (high_end + GiB - 1) & ~(GiB - 1))
        self._next = {BAR_IO: PCI_IO_WINDOW[0], BAR_MEM32: PCI_MEM32_WINDOW[0],
                      BAR_MEM64: mem64_base}
        self._limit = {BAR_IO: PCI_IO_WINDOW[1], BAR_MEM32: PCI_MEM32_WINDOW[1],
                       BAR_MEM64: mem64_base + PCI_MEM64_SIZE}
        # Only the first port: dispatch is by the starting port, so a dword at
        # 0xCF8 lands here while a byte at 0xCF9 reaches the reset control register.
        context.ports.register("pci-config-address", CONFIG_ADDRESS_PORT, 1,
                          self._address_read, self._address_write)
        context.ports.register("pci-config-data", CONFIG_DATA_PORT, 4,
                          self._data_read, self._data_write)
        context.mmio.register("pci-ecam", ECAM_BASE, ECAM_SIZE, self._ecam_read, self._ecam_write)

    @property
    def mem64_window(self) -> tuple[int, int]:
        return self._limit[BAR_MEM64] - PCI_MEM64_SIZE, self._limit[BAR_MEM64]

    # --- devices -------------------------------------------------------------------
    def add(self, slot: int, func: int, cls: type, options: dict[str, str]) -> PciDevice:
        """Instantiate an emulation into slot/func (bhyve's pci_emul_init)."""
        if not (0 <= slot < SLOTS and 0 <= func < FUNCTIONS):
            raise ConfigError(f"PCI slot {slot}:{func} is out of range "
                              f"(slots 0-{SLOTS - 1}, functions 0-{FUNCTIONS - 1})")
        if (slot, func) in self.functions:
            raise ConfigError(f"PCI slot {slot}:{func} is already taken by "
                              f"{self.functions[slot, func].emulation_name}")
        check_options(cls.emulation_name, cls.options, options)
        options = dict(options)
        rom_path = options.pop("rom", None)     # any device may carry an option ROM
        device = cls(self.context, self, slot, func)
        device.init(options)
        if rom_path is not None:
            device.add_rom(_read_rom(rom_path, cls.emulation_name))
        self.functions[slot, func] = device
        self.context.plug(device)
        return device

    def remove(self, device: PciDevice) -> None:
        """Take a device off the bus: BARs, interrupts and config space go away."""
        device.deassert_intx()
        device.unmap_all()
        device.teardown()
        del self.functions[device.slot, device.func]
        self.context.unplug(device)

    def is_multifunction(self, slot: int) -> bool:
        return any(s == slot and f > 0 for s, f in self.functions)

    def devices(self) -> list[PciDevice]:
        return [self.functions[key] for key in sorted(self.functions)]

    # --- BAR placement ------------------------------------------------------------------
    def allocate(self, kind: str, size: int) -> int:
        """The next naturally aligned address for a BAR of this kind."""
        base = (self._next[kind] + size - 1) & ~(size - 1)
        if base + size > self._limit[kind]:
            raise ConfigError(f"no room for a {size:#x}-byte {kind} BAR")
        self._next[kind] = base + size
        return base

    def map(self, device: PciDevice, kind: str, address: int, size: int, name: str,
            read, write):
        """Decode a BAR at `address`; None (logged once) where that cannot be."""
        bus = self.context.ports if kind == BAR_IO else self.context.mmio
        if address == 0 or (kind == BAR_IO and address + size > 0x10000):
            return None
        try:
            return bus.register(name, address, size, read, write)
        except BusConflict as exc:
            device.warn_once(f"bar-conflict-{address:#x}", "BAR not decoded: %s", exc)
            return None

    def unmap(self, kind: str, mapping) -> None:
        (self.context.ports if kind == BAR_IO else self.context.mmio).unregister(mapping)

    # --- config cycles --------------------------------------------------------------------
    def config_read(self, bus: int, slot: int, func: int, offset: int, size: int) -> int:
        device = self.functions.get((slot, func)) if bus == self.number else None
        if device is None or offset % size or offset + size > device.config_size:
            return (1 << (8 * size)) - 1
        return device.config_read(offset, size)

    def config_write(self, bus: int, slot: int, func: int, offset: int, size: int,
                     value: int) -> None:
        device = self.functions.get((slot, func)) if bus == self.number else None
        if device is None or offset % size or offset + size > device.config_size:
            return
        device.config_write(offset, size, value)

    def _address_read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.config_address
        return (1 << (8 * size)) - 1

    def _address_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:       # only dword writes latch (PCI 3.0, 3.2.2.3.2)
            self.config_address = value & 0x8FFFFFFC

    def _decode_address(self, offset: int) -> tuple[int, int, int, int] | None:
        address = self.config_address
        if not address & CONFIG_ENABLE:
            return None
        return ((address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 7,
                (address & 0xFC) + offset)

    def _data_read(self, offset: int, size: int) -> int:
        target = self._decode_address(offset)
        if target is None:
            return (1 << (8 * size)) - 1
        return self.config_read(*target, size)

    def _data_write(self, offset: int, size: int, value: int) -> None:
        target = self._decode_address(offset)
        if target is not None:
            self.config_write(*target, size, value)

    @staticmethod
    def _decode_ecam(offset: int) -> tuple[int, int, int, int]:
        return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, offset & 0xFFF

    def _ecam_read(self, offset: int, size: int) -> int:
        if size == 8:       # a qword MMIO access is two dword config cycles, as in QEMU
            return self._ecam_read(offset, 4) | self._ecam_read(offset + 4, 4) << 32
        return self.config_read(*self._decode_ecam(offset), size)

    def _ecam_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self._ecam_write(offset, 4, value & 0xFFFFFFFF)
            self._ecam_write(offset + 4, 4, value >> 32)
            return
        self.config_write(*self._decode_ecam(offset), size, value)

    def save_state(self) -> dict:
        return {"config_address": self.config_address}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("config_address",), self.name)
        self.config_address = bits(state["config_address"], 0x8FFFFFFC, "PCI config address")

    def close(self) -> None:
        """The functions are the VM's devices, closed before the bus; any left
        (a VM that failed while being built) go now."""
        for device in reversed(self.devices()):
            self.remove(device)


__all__ = ["PciBus"]
