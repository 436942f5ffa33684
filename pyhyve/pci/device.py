"""bhyve's pci_devinst: a PCI function's config space, BARs, capabilities and
interrupts, and the hooks a device emulation overrides.

A new device subclasses PciDevice, names itself with @emulation("name"),
declares IDs, BARs and capabilities in init(), and answers BAR accesses in
bar_read()/bar_write().  Everything the guest can write to config space is
checked here, so subclasses only see accesses that make sense.
"""

import mmap
import struct
import threading

from ..lifecycle import Device, StateError, decode, encode, flag, uint
from ..memory import GuestMemoryError
from . import regs as R
from ..log import getLogger
from .msi import MsiCapability, MsixCapability

log = getLogger(__name__)

BAR_IO, BAR_MEM32, BAR_MEM64 = "io", "mem32", "mem64"


class Bar:
    """One base address register: its kind, size and where the guest put it."""

    __slots__ = ("index", "kind", "size", "prefetchable", "address", "mapping")

    def __init__(self, index: int, kind: str, size: int, prefetchable: bool):
        self.index = index
        self.kind = kind
        self.size = size
        self.prefetchable = prefetchable
        self.address = 0
        self.mapping = None        # the iobus Range while the BAR is decoded

    @property
    def flags(self) -> int:
        if self.kind == BAR_IO:
            return R.BAR_IO_SPACE
        value = R.BAR_MEM_TYPE_64 if self.kind == BAR_MEM64 else 0
        return value | (R.BAR_MEM_PREFETCH if self.prefetchable else 0)


class PciDevice(Device):
    """A PCI function; subclasses set `emulation_name` through @emulation, and
    `savable = True` once save_state() holds everything they know."""

    emulation_name = "?"
    config_size = R.CONFIG_SPACE_SIZE
    options: tuple = ()         # pci.options.Option: what init() accepts, checked before

    def __init__(self, context, bus, slot: int, func: int):
        self.context = context      # devctx.DeviceContext: all of the machine a device uses
        self.bus = bus
        self.slot = slot
        self.func = func
        self.config = bytearray(self.config_size)
        self.wmask = bytearray(self.config_size)     # guest-writable bits
        self.w1cmask = bytearray(self.config_size)   # write-1-to-clear bits
        self.bars: list[Bar | None] = [None] * 6
        self.rom: bytes | None = None
        self.rom_size = 0
        self.rom_address = 0
        self.rom_mapping = None
        self._rom_pages: mmap.mmap | None = None    # the ROM as guest memory, once mapped
        self._rom_memory_at: int | None = None      # where it is guest memory now
        self.msi: MsiCapability | None = None
        self.msix: MsixCapability | None = None
        self._cap_end = R.CAPABILITIES_START
        self._last_cap = 0
        self.intx_asserted = False   # the device's INTx condition (Interrupt Status)
        self._intx_line = False      # whether the router was told the pin is asserted
        self._intx_lock = threading.Lock()   # I/O threads raise, vCPUs write COMMAND
        self.warned: set = set()
        self._set16(R.COMMAND, 0)
        self.wmask[R.COMMAND:R.COMMAND + 2] = R.COMMAND_WRITABLE.to_bytes(2, "little")
        self.w1cmask[R.STATUS:R.STATUS + 2] = R.STATUS_W1C.to_bytes(2, "little")
        self.wmask[R.CACHE_LINE_SIZE] = 0xFF
        self.wmask[R.LATENCY_TIMER] = 0xFF
        self.wmask[R.INTERRUPT_LINE] = 0xFF
        self.config[R.INTERRUPT_LINE] = 0xFF

    @property
    def bdf(self) -> str:
        return f"{self.bus.number:02x}:{self.slot:02x}.{self.func}"

    @property
    def name(self) -> str:
        """Its place in the config (pci.BUS.SLOT.FUNC), which a snapshot keys it by."""
        return f"pci.{self.bus.number}.{self.slot}.{self.func}"

    @property
    def description(self) -> str:
        return f"{self.emulation_name} at PCI {self.bdf}"

    def close(self) -> None:
        """Off the bus: BARs, interrupts and what init() acquired go (bhyve's
        pci_emul teardown); a second call does nothing."""
        if self.bus.functions.get((self.slot, self.func)) is self:
            self.bus.remove(self)

    # --- hooks a device emulation overrides ------------------------------------
    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """Turn `-s` options ("a=b,flag") into config keys; emulations with
        positional options (a disk path) override this, as bhyve's do."""
        options = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            options[key] = value if sep else "true"
        return options

    def init(self, options: dict[str, str]) -> None:
        """Declare IDs, BARs and capabilities; raise ConfigError for bad options."""

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def config_changed(self, offset: int, size: int) -> None:
        """Called after the guest wrote to device-specific config space."""

    def teardown(self) -> None:
        """Release what init() acquired (files, threads)."""

    # --- snapshots (quiesce() comes from Device: nothing in flight by default) ---
    def save_state(self) -> dict:
        """What the guest programmed, as JSON: config space, BAR and ROM addresses,
        MSI and MSI-X state, the INTx condition.  Subclasses add their own."""
        state = {"emulation": self.emulation_name, "config": encode(self.config),
                 "bars": [None if bar is None else bar.address for bar in self.bars],
                 "rom_address": self.rom_address, "intx": self.intx_asserted}
        if self.msi is not None:
            state["msi"] = self.msi.save_state()
        if self.msix is not None:
            state["msix"] = self.msix.save_state()
        return state

    def restore_state(self, state: dict) -> None:
        """Take back save_state()'s output on a freshly built device of the same
        configuration: the BARs decode where the guest had put them, and an
        asserted INTx drives its line again.  StateError when it does not fit."""
        if not isinstance(state, dict) or state.get("emulation") != self.emulation_name:
            raise StateError(f"PCI {self.bdf}: saved state is not a {self.emulation_name}'s")
        config = decode(state["config"], f"PCI {self.bdf} config space",
                        length=len(self.config))
        saved_bars = state["bars"]
        if not isinstance(saved_bars, list) or len(saved_bars) != len(self.bars) or any(
                (bar is None) != (address is None) for bar, address in zip(self.bars, saved_bars)):
            raise StateError(f"PCI {self.bdf} BAR layout differs")
        addresses = [None if bar is None else
                     uint(address, (1 << 64) - 1 if bar.kind == BAR_MEM64 else 0xFFFFFFFF,
                          f"PCI {self.bdf} BAR {bar.index}")
                     for bar, address in zip(self.bars, saved_bars)]
        rom_address = uint(state["rom_address"], 0xFFFFFFFF, f"PCI {self.bdf} ROM address")
        intx = flag(state["intx"], f"PCI {self.bdf} INTx")
        for capability, key in ((self.msi, "msi"), (self.msix, "msix")):
            if (capability is None) != (key not in state):
                raise StateError(f"PCI {self.bdf} {key.upper()} capability differs")
        self.config[:] = config
        for bar, address in zip(self.bars, addresses):
            if bar is not None:
                bar.address = address
                self.update_mapping(bar)
        self.rom_address = rom_address
        self._update_rom_mapping()
        for capability, key in ((self.msi, "msi"), (self.msix, "msix")):
            if capability is not None:
                capability.restore_state(state[key])
        with self._intx_lock:
            self.intx_asserted = intx
            self._update_intx_line()

    # --- helpers for init() --------------------------------------------------------
    def set_ids(self, vendor: int, device: int, class_code: int, revision: int = 0,
                subsystem_vendor: int = 0, subsystem: int = 0,
                header_type: int = R.HEADER_TYPE_NORMAL) -> None:
        self._set16(R.VENDOR_ID, vendor)
        self._set16(R.DEVICE_ID, device)
        self.config[R.REVISION_ID] = revision
        self.config[R.CLASS_PROG:R.CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self.config[R.HEADER_TYPE] = header_type
        self._set16(R.SUBSYSTEM_VENDOR_ID, subsystem_vendor)
        self._set16(R.SUBSYSTEM_ID, subsystem)

    def set_interrupt_pin(self, pin: int = 1) -> None:
        """Use legacy INTx (1 = INTA .. 4 = INTD)."""
        self.config[R.INTERRUPT_PIN] = pin

    def add_bar(self, index: int, kind: str, size: int, prefetchable: bool = False) -> Bar:
        """Declare a BAR; its address comes from the bus allocator."""
        minimum = 4 if kind == BAR_IO else 16
        if size < minimum or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} must be a power of two >= {minimum}")
        if kind == BAR_MEM64 and index == 5:
            raise ValueError("a 64-bit BAR needs two registers; BAR 5 is the last")
        bar = Bar(index, kind, size, prefetchable)
        self.bars[index] = bar
        bar.address = self.bus.allocate(kind, size)
        self._store_bar(bar)
        return bar

    def add_rom(self, image: bytes) -> None:
        """Serve an expansion ROM through the ROM BAR at 0x30 (`rom=PATH`).

        As QEMU's pci_patch_ids does, a ROM whose PCI data structure names other
        IDs (iPXE's virtio-net ROM names 1af4:1041, the modern device) gets this
        device's, with byte 6 of the header adjusted to keep the checksum;
        firmware runs only ROMs that name the device they sit on."""
        image = bytearray(image)
        pcir = int.from_bytes(image[0x18:0x1A], "little") if len(image) >= 0x1A else 0
        if image[:2] == b"\x55\xaa" and pcir and image[pcir:pcir + 4] == b"PCIR" and \
                len(image) >= pcir + 8:
            delta = 0
            for at, value in ((pcir + 4, self._get16(R.VENDOR_ID)),
                              (pcir + 6, self._get16(R.DEVICE_ID))):
                new = value.to_bytes(2, "little")
                delta += sum(new) - sum(image[at:at + 2])
                image[at:at + 2] = new
            image[6] = (image[6] - delta) & 0xFF
        size = 2048
        while size < len(image):
            size <<= 1
        self.rom = bytes(image).ljust(size, b"\xff")
        self.rom_size = size
        self.rom_address = self.bus.allocate(BAR_MEM32, size)
        self._set32(R.ROM_ADDRESS, self.rom_address)

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (id, next, body) to the list; returns its offset."""
        offset = self._cap_end
        length = 2 + len(body)
        if offset + length > R.CONFIG_HEADER_END + 0xC0:
            raise ValueError("capabilities do not fit in config space")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2:offset + length] = body
        if writable:
            self.wmask[offset + 2:offset + 2 + len(writable)] = writable
        if self._last_cap:
            self.config[self._last_cap + 1] = offset
        else:
            self.config[R.CAPABILITIES_POINTER] = offset
            self._set16(R.STATUS, self._get16(R.STATUS) | R.STATUS_CAP_LIST)
        self._last_cap = offset
        self._cap_end = (offset + length + 3) & ~3
        return offset

    def add_msi(self, vectors: int = 1) -> None:
        self.msi = MsiCapability(self, vectors)

    def add_msix(self, vectors: int, bar_index: int, table_offset: int = 0,
                 pba_offset: int | None = None) -> None:
        """MSI-X with its table (and PBA) in a memory BAR this call also declares,
        unless the device declared that BAR already."""
        self.msix = MsixCapability(self, vectors, bar_index, table_offset, pba_offset)

    # --- interrupts ------------------------------------------------------------------
    def assert_intx(self) -> None:
        with self._intx_lock:
            if not self.intx_asserted and self.config[R.INTERRUPT_PIN]:
                self.intx_asserted = True
                self._set16(R.STATUS, self._get16(R.STATUS) | R.STATUS_INTERRUPT)
                self._update_intx_line()

    def deassert_intx(self) -> None:
        with self._intx_lock:
            self._set16(R.STATUS, self._get16(R.STATUS) & ~R.STATUS_INTERRUPT)
            if self.intx_asserted:
                self.intx_asserted = False
                self._update_intx_line()

    def _update_intx_line(self) -> None:
        # PCI 3.0 6.2.3: Interrupt Status follows the device whatever Interrupt
        # Disable says; the pin is asserted while status is set and disable is
        # clear, so clearing Interrupt Disable re-asserts a pending interrupt.
        level = self.intx_asserted and not self._get16(R.COMMAND) & R.COMMAND_INTX_DISABLE
        if level != self._intx_line:
            self._intx_line = level
            if level:
                self.bus.intx.assert_pin(self)
            else:
                self.bus.intx.deassert_pin(self)

    def raise_interrupt(self, vector: int = 0) -> None:
        """Signal `vector` the way the guest enabled: MSI-X, MSI, else INTx."""
        if self.msix is not None and self.msix.enabled:
            self.msix.fire(vector)
        elif self.msi is not None and self.msi.enabled:
            self.msi.fire(vector)
        else:
            self.assert_intx()

    def warn_once(self, key: str, message: str, *args) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s %s: " + message, self.emulation_name, self.bdf, *args)

    # --- config space, as the bus delivers it ------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        value = int.from_bytes(self.config[offset:offset + size], "little")
        if offset <= R.HEADER_TYPE < offset + size and self.func == 0 and \
                self.bus.is_multifunction(self.slot):
            value |= R.HEADER_TYPE_MULTIFUNCTION << (8 * (R.HEADER_TYPE - offset))
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        if R.BAR0 <= offset < R.BAR0 + 24:
            self._write_bar_register(offset, size, value)
            return
        if R.ROM_ADDRESS <= offset < R.ROM_ADDRESS + 4:
            self._write_rom_register(offset, size, value)
            return
        old_command = self._get16(R.COMMAND)
        for i in range(size):
            at = offset + i
            byte = (value >> (8 * i)) & 0xFF
            self.config[at] = (self.config[at] & ~self.wmask[at] & 0xFF) | (byte & self.wmask[at])
            self.config[at] &= ~(byte & self.w1cmask[at]) & 0xFF
        if offset < R.COMMAND + 2 and offset + size > R.COMMAND:
            self._command_changed(old_command)
        for capability in (self.msi, self.msix):
            if capability is not None and capability.covers(offset, size):
                capability.config_written()
        if offset >= R.CONFIG_HEADER_END:
            self.config_changed(offset, size)

    def _command_changed(self, old: int) -> None:
        new = self._get16(R.COMMAND)
        if (old ^ new) & (R.COMMAND_IO | R.COMMAND_MEMORY):
            for bar in self.bars:
                if bar is not None:
                    self.update_mapping(bar)
            self._update_rom_mapping()
        if (old ^ new) & R.COMMAND_INTX_DISABLE:
            with self._intx_lock:
                self._update_intx_line()

    # --- BARs --------------------------------------------------------------------------
    def _store_bar(self, bar: Bar) -> None:
        offset = R.BAR0 + 4 * bar.index
        mask = 0xFFFFFFFC if bar.kind == BAR_IO else 0xFFFFFFF0
        self._set32(offset, (bar.address & mask) | bar.flags)
        if bar.kind == BAR_MEM64:
            self._set32(offset + 4, bar.address >> 32)

    def _write_bar_register(self, offset: int, size: int, value: int) -> None:
        index = (offset - R.BAR0) // 4
        register = R.BAR0 + 4 * index
        shift = 8 * (offset - register)
        width_mask = ((1 << (8 * size)) - 1) << shift
        merged = (self._get32(register) & ~width_mask) | ((value << shift) & width_mask)
        upper = index > 0 and self.bars[index - 1] is not None and \
            self.bars[index - 1].kind == BAR_MEM64
        bar = self.bars[index - 1] if upper else self.bars[index]
        if bar is None:
            return                       # unimplemented BAR: reads as zero
        if upper:
            size_mask = ~(bar.size - 1) >> 32 & 0xFFFFFFFF
            address = (bar.address & 0xFFFFFFFF) | ((merged & size_mask) << 32)
        else:
            low_mask = ~(bar.size - 1) & (0xFFFFFFFC if bar.kind == BAR_IO else 0xFFFFFFF0)
            address = (bar.address & ~0xFFFFFFFF) | (merged & low_mask)
        bar.address = address
        self._store_bar(bar)
        self.update_mapping(bar)

    def update_mapping(self, bar: Bar) -> None:
        """Decode the BAR where the guest put it, if the command register allows."""
        if bar.mapping is not None:
            self.bus.unmap(bar.kind, bar.mapping)
            bar.mapping = None
        enable = R.COMMAND_IO if bar.kind == BAR_IO else R.COMMAND_MEMORY
        if not self._get16(R.COMMAND) & enable:
            return
        index = bar.index

        def read(offset: int, size: int) -> int:
            return self._dispatch_bar_read(index, offset, size)

        def write(offset: int, size: int, value: int) -> None:
            self._dispatch_bar_write(index, offset, size, value)

        bar.mapping = self.bus.map(self, bar.kind, bar.address, bar.size,
                                   f"{self.emulation_name}@{self.bdf}.bar{index}", read, write)

    def _dispatch_bar_read(self, index: int, offset: int, size: int) -> int:
        if self.msix is not None and self.msix.claims(index, offset):
            return self.msix.read(index, offset, size)
        return self.bar_read(index, offset, size)

    def _dispatch_bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if self.msix is not None and self.msix.claims(index, offset):
            self.msix.write(index, offset, size, value)
        else:
            self.bar_write(index, offset, size, value)

    def unmap_all(self) -> None:
        for bar in self.bars:
            if bar is not None and bar.mapping is not None:
                self.bus.unmap(bar.kind, bar.mapping)
                bar.mapping = None
        self._unmap_rom()

    # --- expansion ROM -----------------------------------------------------------------
    def _write_rom_register(self, offset: int, size: int, value: int) -> None:
        if self.rom is None:
            return
        shift = 8 * (offset - R.ROM_ADDRESS)
        width_mask = ((1 << (8 * size)) - 1) << shift
        merged = (self._get32(R.ROM_ADDRESS) & ~width_mask) | ((value << shift) & width_mask)
        merged &= ~(self.rom_size - 1) | R.ROM_ENABLE
        merged &= 0xFFFFF800 | R.ROM_ENABLE
        self._set32(R.ROM_ADDRESS, merged)
        self.rom_address = merged & ~(self.rom_size - 1) & 0xFFFFF800
        self._update_rom_mapping()

    def _update_rom_mapping(self) -> None:
        self._unmap_rom()
        if self.rom is None or not self._get32(R.ROM_ADDRESS) & R.ROM_ENABLE or \
                not self._get16(R.COMMAND) & R.COMMAND_MEMORY:
            return
        name = f"{self.emulation_name}@{self.bdf}.rom"
        self.rom_mapping = self.bus.map(self, BAR_MEM32, self.rom_address, self.rom_size,
                                        name, self._rom_read, self._rom_write)
        if self.rom_mapping is not None and self.rom_size >= mmap.PAGESIZE:
            self._map_rom_memory(name)

    def _map_rom_memory(self, name: str) -> None:
        """Let the guest read the ROM as read-only memory, as QEMU maps it,
        rather than exit for every read: firmware copies a ROM to shadow RAM
        four bytes at a time.  Writes still exit, to _rom_write; where the
        memory cannot go (it overlaps other memory) reads exit too."""
        if self._rom_pages is None:
            self._rom_pages = mmap.mmap(-1, self.rom_size)
            self._rom_pages[:] = self.rom
        try:
            self.context.memory.add_rom(name, self.rom_address, self._rom_pages, 0,
                                        self.rom_size)
        except GuestMemoryError:
            return
        self._rom_memory_at = self.rom_address

    def _unmap_rom(self) -> None:
        if self._rom_memory_at is not None:
            self.context.memory.remove_device_ram(self._rom_memory_at)
            self._rom_memory_at = None
        if self.rom_mapping is not None:
            self.bus.unmap(BAR_MEM32, self.rom_mapping)
            self.rom_mapping = None

    def _rom_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.rom[offset:offset + size].ljust(size, b"\xff"), "little")

    def _rom_write(self, offset: int, size: int, value: int) -> None:
        self.warn_once("rom-write", "guest wrote to the expansion ROM")

    # --- raw config access ------------------------------------------------------------
    def _get16(self, offset: int) -> int:
        return struct.unpack_from("<H", self.config, offset)[0]

    def _set16(self, offset: int, value: int) -> None:
        struct.pack_into("<H", self.config, offset, value & 0xFFFF)

    def _get32(self, offset: int) -> int:
        return struct.unpack_from("<I", self.config, offset)[0]

    def _set32(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.config, offset, value & 0xFFFFFFFF)


class DwordRegisters:
    """For a PciDevice whose registers in memory BAR `register_bar` are dwords
    (NVMe's, AHCI's): a read of any size is assembled from whole dwords, and a
    dword or qword write (two dwords) reaches _write_dword, all under the
    device's `lock`; narrower or unaligned writes are logged once and ignored.
    The device reads and writes one register with _dword(offset) and
    _write_dword(offset, value)."""

    register_bar = 0

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != self.register_bar:
            return 0
        start = offset & ~3
        with self.lock:
            value = 0
            for at in range(start, offset + size, 4):
                value |= self._dword(at) << (8 * (at - start))
        return (value >> (8 * (offset - start))) & ((1 << (8 * size)) - 1)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != self.register_bar:
            return
        if size not in (4, 8) or offset % 4:
            self.warn_once(f"width-{size}", "ignored %d-byte register write at %#x "
                           "(registers take dwords and qwords)", size, offset)
            return
        with self.lock:
            self._write_dword(offset, value & 0xFFFFFFFF)
            if size == 8:
                self._write_dword(offset + 4, value >> 32)


def disk_legacy_options(text: str) -> dict[str, str]:
    """`-s` options of a disk emulation (bhyve's blockif_legacy_config, which
    every disk device shares): the first word is the image's path, possibly
    written path=PATH; the rest are options as for any device."""
    path, _, rest = text.partition(",")
    options = PciDevice.legacy_options(rest)
    if path.startswith("path="):
        path = path[len("path="):]
    if path:
        options["path"] = path
    return options
