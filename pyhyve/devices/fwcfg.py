"""QEMU's fw_cfg interface on x86 ports (bhyve's `-l fwcfg,qemu`), as SeaBIOS uses it.

Firmware written for QEMU (SeaBIOS, OVMF) learns the machine's shape from
fw_cfg: numbered items (signature, CPU count, RAM size) and named files
(`etc/e820`, `opt/...`) listed in a big-endian directory.  The guest selects an
item at port 0x510 and reads it a byte at a time at 0x511, or hands the device
a DMA descriptor through the big-endian address register at 0x514-0x51B.

Everything the guest names (selectors, descriptor addresses, lengths) is
checked: guest memory is reached only through `context.memory`, a bad address sets
the descriptor's ERROR bit, and no access ever raises out of the vm_loop.
"""

import struct
import threading

from ..config import ConfigError, read_user_file
from ..lifecycle import Device, expect_keys, uint
from ..log import getLogger
from ..memory import GuestMemoryError

SELECTOR_PORT = 0x510
DATA_PORT = 0x511
DMA_PORT = 0x514                # high 32 bits of the DMA address; low half at 0x518
DMA_PORT_SIZE = 8

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000   # legacy write mode; data writes are ignored anyway
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_MAX_FILE_PATH = 56       # name field in a directory entry, NUL included
MAX_NAME_BYTES = FW_CFG_MAX_FILE_PATH - 1
MAX_FILES = FW_CFG_ENTRY_MASK + 1 - FW_CFG_FILE_FIRST
MAX_ITEM_SIZE = 0xFFFFFFFF      # the directory's size field is 32 bits

ID_TRADITIONAL = 1 << 0
ID_DMA = 1 << 1
SIGNATURE = b"QEMU"
DMA_SIGNATURE = b"QEMU CFG"     # 0x51454d5520434647, big-endian, read back at 0x514

DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_ACCESS = struct.Struct(">IIQ")      # control, length, address
ZERO_FILL_CHUNK = 64 * 1024

E820_RAM = 1
E820_RESERVED = 2
E820_ENTRY = struct.Struct("<QQI")      # address, length, type (packed, 20 bytes)


def e820_table(ranges: list[tuple[int, int, int]]) -> bytes:
    """The `etc/e820` file: (address, length, type) entries, as SeaBIOS reads them."""
    return b"".join(E820_ENTRY.pack(address, length, kind)
                    for address, length, kind in ranges)


def _check_name(name: str) -> bytes:
    """A file name as the directory stores it, or ConfigError saying why not."""
    encoded = name.encode()
    if not encoded or b"\0" in encoded:
        raise ConfigError(f"invalid fw_cfg file name '{name}'")
    if len(encoded) > MAX_NAME_BYTES:
        raise ConfigError(f"fw_cfg file name '{name}' is {len(encoded)} bytes long; "
                          f"the limit is {MAX_NAME_BYTES}")
    return encoded


def parse_fw_cfg_option(text: str) -> tuple[str, bytes]:
    """`-f [name=]NAME,string=TEXT` or `-f [name=]NAME,file=PATH` -> (NAME, data).

    As with QEMU's -fw_cfg, a string is stored without a terminating NUL, and a
    name outside "opt/" draws a warning but is accepted.
    """
    usage = f"invalid -f '{text}': expected NAME,string=TEXT or NAME,file=PATH"
    spec = text[len("name="):] if text.startswith("name=") else text
    name, comma, value = spec.partition(",")
    if not name or not comma:
        raise ConfigError(usage)
    _check_name(name)
    if value.startswith("string="):
        data = value[len("string="):].encode()
    elif value.startswith("file=") and len(value) > len("file="):
        data = read_user_file(value[len("file="):], f"-f {name} file", MAX_ITEM_SIZE)
    else:
        raise ConfigError(usage)
    if not name.startswith("opt/"):
        getLogger("pyhyve.fwcfg").warning(
            "-f %s: fw_cfg names given by users should start with 'opt/'", name)
    return name, data


class FwCfg(Device):
    """The fw_cfg device: its items, the guest's cursor into one, and the DMA engine.

    Ports: 0x510 selector (16-bit write; bytes accepted as QEMU does), 0x511
    data (reads return the selected item's next bytes, the first in the low
    byte; writes are ignored as in QEMU 2.4+), 0x514-0x51B the DMA address.
    The items come from the config, so a snapshot holds only the cursor and
    a half-latched DMA address; a DMA transfer runs within one vCPU exit.
    """

    name = "fw_cfg"
    savable = True

    def __init__(self, context, *, cpus: int = 1, max_cpus: int | None = None,
                 uuid: bytes = bytes(16), boot_menu: bool = False, nographic: bool = True):
        if len(uuid) != 16:
            raise ValueError("fw_cfg UUID must be 16 bytes")
        self.context = context
        self._items: dict[int, bytes] = {}
        self._files: dict[str, bytes] = {}
        # vCPU threads share one cursor; QEMU serializes them under its big lock
        self._lock = threading.Lock()
        self._selected = FW_CFG_SIGNATURE
        self._data = b""
        self._offset = 0
        self._dma_address = 0
        self.add_bytes(FW_CFG_SIGNATURE, SIGNATURE)
        self.add_bytes(FW_CFG_ID, struct.pack("<I", ID_TRADITIONAL | ID_DMA))
        self.add_bytes(FW_CFG_UUID, bytes(uuid))
        self.add_bytes(FW_CFG_RAM_SIZE, struct.pack("<Q", context.memory.size))
        self.add_bytes(FW_CFG_NOGRAPHIC, struct.pack("<H", int(nographic)))
        self.add_bytes(FW_CFG_NB_CPUS, struct.pack("<H", cpus))
        self.add_bytes(FW_CFG_MAX_CPUS, struct.pack("<H", max_cpus or cpus))
        self.add_bytes(FW_CFG_BOOT_MENU, struct.pack("<H", int(boot_menu)))
        self._rebuild_directory()
        self._reset_cursor()
        context.ports.register("fw_cfg", SELECTOR_PORT, 2, self._port_read, self._port_write)
        context.ports.register("fw_cfg-dma", DMA_PORT, DMA_PORT_SIZE, self._dma_read,
                          self._dma_write)

    # --- items ----------------------------------------------------------------
    def add_bytes(self, key: int, data: bytes) -> None:
        """Add or replace a numbered item (files and the directory are managed here)."""
        index = key & FW_CFG_ENTRY_MASK
        if not 0 <= key <= 0xFFFF or key & FW_CFG_WRITE_CHANNEL or \
                (not key & FW_CFG_ARCH_LOCAL and
                 (index >= FW_CFG_FILE_FIRST or index == FW_CFG_FILE_DIR)):
            raise ValueError(f"fw_cfg key {key:#x} is not a numbered item")
        if len(data) > MAX_ITEM_SIZE:
            raise ValueError(f"fw_cfg item {key:#x} is larger than 4 GiB")
        self._items[key] = bytes(data)

    def add_file(self, name: str, data: bytes, replace: bool = False) -> None:
        """Add a named file (or, with replace, give one new contents, which
        firmware reads at its next boot); ConfigError for a bad or duplicate name."""
        _check_name(name)
        if name in self._files and not replace:
            raise ConfigError(f"fw_cfg file '{name}' is given twice")
        if name not in self._files and len(self._files) >= MAX_FILES:
            raise ConfigError(f"too many fw_cfg files (at most {MAX_FILES})")
        if len(data) > MAX_ITEM_SIZE:
            raise ConfigError(f"fw_cfg file '{name}' is larger than 4 GiB")
        with self._lock:
            self._files[name] = bytes(data)
            self._rebuild_directory()

    def _rebuild_directory(self) -> None:
        """Number files in name order from 0x20 and rewrite FW_CFG_FILE_DIR, as QEMU does."""
        for key in [k for k in self._items if FW_CFG_FILE_FIRST <= k <= FW_CFG_ENTRY_MASK]:
            del self._items[key]
        entries = [struct.pack(">I", len(self._files))]
        for number, name in enumerate(sorted(self._files, key=str.encode)):
            key = FW_CFG_FILE_FIRST + number
            self._items[key] = self._files[name]
            entries.append(struct.pack(">IHH56s", len(self._files[name]), key, 0,
                                       name.encode()))
        self._items[FW_CFG_FILE_DIR] = b"".join(entries)

    def reset(self, power_on: dict) -> None:
        self._reset_cursor()

    def _reset_cursor(self) -> None:
        """Back to power-on state: the signature selected, no DMA address latched."""
        with self._lock:
            self._select(FW_CFG_SIGNATURE)
            self._dma_address = 0

    def _select(self, key: int) -> None:
        """Point the cursor at an item; unknown items read as zeros."""
        self._selected = key & ~FW_CFG_WRITE_CHANNEL & 0xFFFF
        self._data = self._items.get(self._selected, b"")
        self._offset = 0

    def save_state(self) -> dict:
        with self._lock:
            return {"selected": self._selected, "offset": self._offset,
                    "dma_address": self._dma_address}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("selected", "offset", "dma_address"), self.name)
        selected = uint(state["selected"], 0xFFFF, "fw_cfg selected item")
        offset = uint(state["offset"], MAX_ITEM_SIZE, "fw_cfg offset")
        dma_address = uint(state["dma_address"], (1 << 64) - 1, "fw_cfg DMA address")
        with self._lock:
            self._select(selected)
            self._offset = offset
            self._dma_address = dma_address

    # --- traditional interface: 0x510 selector, 0x511 data -------------------------
    def _port_read(self, offset: int, size: int) -> int:
        if offset != DATA_PORT - SELECTOR_PORT:
            return 0                                    # the selector is write-only
        with self._lock:
            chunk = self._data[self._offset:self._offset + size]
            self._offset += len(chunk)
        return int.from_bytes(chunk, "little")

    def _port_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size <= 2:
            with self._lock:
                self._select(value)

    # --- DMA interface: 0x514-0x51B -------------------------------------------------
    def _dma_read(self, offset: int, size: int) -> int:
        return int.from_bytes(DMA_SIGNATURE[offset:offset + size], "little")

    def _dma_write(self, offset: int, size: int, value: int) -> None:
        """Latch the big-endian address; writing its low half starts the transfer."""
        if size != 4 or offset not in (0, 4):
            return                                      # QEMU drops other widths too
        half = int.from_bytes(value.to_bytes(4, "little"), "big")
        with self._lock:
            if offset == 0:
                self._dma_address = half << 32
                return
            address = self._dma_address | half
            self._dma_address = 0
            self._dma_transfer(address)

    def _dma_transfer(self, address: int) -> None:
        """Run one descriptor and write its control word back (0, or ERROR)."""
        try:
            control, length, target = DMA_ACCESS.unpack(self.context.memory.read(address, 16))
        except GuestMemoryError:
            self._dma_complete(address, DMA_CTL_ERROR)
            return
        if control & DMA_CTL_SELECT:
            self._select(control >> 16)
        if control & DMA_CTL_READ:
            operation = DMA_CTL_READ
        elif control & DMA_CTL_WRITE:
            operation = DMA_CTL_WRITE
        elif control & DMA_CTL_SKIP:
            operation = DMA_CTL_SKIP
        else:
            operation, length = 0, 0
        self._dma_complete(address, self._dma_move(operation, target, length))

    def _dma_move(self, operation: int, target: int, length: int) -> int:
        """Copy at most the rest of the item, then zero-fill what a read asked beyond it.

        Host allocation stays bounded by the item's size whatever `length` the
        guest gives; no item is writable, so a write is an error.
        """
        if not length:
            return 0
        data, offset = self._data, self._offset
        count = min(length, max(len(data) - offset, 0))
        self._offset = offset + count
        if operation == DMA_CTL_WRITE:
            self.context.warn_once("fwcfg-dma-write", "guest tried to write a read-only "
                              "fw_cfg item by DMA")
            return DMA_CTL_ERROR
        if operation != DMA_CTL_READ:
            return 0
        memory = self.context.memory
        try:
            if count:
                memory.write(target, memoryview(data)[offset:offset + count])
            if length > count:
                self._zero_fill(target + count, length - count)
        except GuestMemoryError:
            self.context.warn_once("fwcfg-dma-range", "fw_cfg DMA to %#x+%#x is outside "
                              "guest memory", target, length)
            return DMA_CTL_ERROR
        return 0

    def _zero_fill(self, gpa: int, length: int) -> None:
        """Zero guest memory in place, a chunk at a time, without a length-sized buffer."""
        view = self.context.memory.view(gpa, length, write=True)
        zeros = memoryview(bytes(min(length, ZERO_FILL_CHUNK)))
        for start in range(0, length, len(zeros)):
            end = min(start + len(zeros), length)
            view[start:end] = zeros[:end - start]

    def _dma_complete(self, address: int, status: int) -> None:
        try:
            self.context.memory.write(address, struct.pack(">I", status))
        except GuestMemoryError:
            pass                            # nowhere to report it; QEMU drops it too
