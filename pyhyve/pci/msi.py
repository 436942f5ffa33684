"""MSI and MSI-X capabilities: where guests program their interrupt messages.

Both deliver through the VM's `signal_msi(address, data)` (KVM_SIGNAL_MSI).
A message whose address is not in the 0xFEExxxxx local-APIC window is a guest
error: it is dropped and logged once rather than handed to KVM.
"""

import struct

from ..lifecycle import decode, encode
from . import regs as R

MSI_CONTROL_ENABLE = 1 << 0
MSI_CONTROL_64BIT = 1 << 7
MSI_CONTROL_PER_VECTOR_MASK = 1 << 8
MSIX_CONTROL_FUNCTION_MASK = 1 << 14
MSIX_CONTROL_ENABLE = 1 << 15
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 1 << 0


def _valid_message_address(address: int) -> bool:
    return address & ~0xFFFFF == R.MSI_ADDRESS_BASE


class MsiCapability:
    """A 64-bit MSI capability with per-vector masking, 1 to 32 vectors."""

    def __init__(self, device, vectors: int):
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI vectors must be a power of two up to 32")
        self.device = device
        self.vectors = vectors
        control = ((vectors.bit_length() - 1) << 1) | MSI_CONTROL_64BIT | \
            MSI_CONTROL_PER_VECTOR_MASK
        body = struct.pack("<HIIHHII", control, 0, 0, 0, 0, 0, 0)
        writable = struct.pack("<HIIHHII", 0x71, 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFF, 0,
                               (1 << vectors) - 1 if vectors < 32 else 0xFFFFFFFF, 0)
        self.offset = device.add_capability(R.CAP_ID_MSI, body, writable)
        self.pending = 0

    def covers(self, offset: int, size: int) -> bool:
        return offset < self.offset + 24 and offset + size > self.offset

    def save_state(self) -> dict:
        """The registers live in config space; only the pending bits are kept here."""
        return {"pending": self.pending}

    def restore_state(self, state: dict) -> None:
        self.pending = int(state["pending"]) & ((1 << self.vectors) - 1)

    def _field(self, at: int, fmt: str) -> int:
        return struct.unpack_from(fmt, self.device.config, self.offset + at)[0]

    @property
    def control(self) -> int:
        return self._field(2, "<H")

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSI_CONTROL_ENABLE)

    def config_written(self) -> None:
        """Deliver messages that were pending while masked, once unmasked."""
        control = self.control
        capable = (control >> 1) & 7
        if (control >> 4) & 7 > capable:
            # Multiple Message Enable above what the device is capable of is
            # undefined; clamp it (as QEMU does) so vector bits never overwrite
            # more of the guest's data than the device has vectors for.
            struct.pack_into("<H", self.device.config, self.offset + 2,
                             (control & ~0x70) | capable << 4)
        if self.enabled and self.pending:
            for vector in range(self.vectors):
                if self.pending & (1 << vector) and not self._masked(vector):
                    self.pending &= ~(1 << vector)
                    self.fire(vector)
        self._store_pending()

    def _masked(self, vector: int) -> bool:
        return bool(self._field(16, "<I") & (1 << vector))

    def _store_pending(self) -> None:
        struct.pack_into("<I", self.device.config, self.offset + 20, self.pending)

    def fire(self, vector: int) -> None:
        enabled_vectors = 1 << ((self.control >> 4) & 7)
        if not self.enabled or vector >= min(enabled_vectors, self.vectors):
            return
        if self._masked(vector):
            self.pending |= 1 << vector
            self._store_pending()
            return
        address = self._field(4, "<I") | (self._field(8, "<I") << 32)
        data = self._field(12, "<H")
        if not _valid_message_address(address):
            self.device.warn_once("msi-address", "MSI address %#x is not an APIC address",
                                  address)
            return
        multiple = enabled_vectors - 1
        self.device.context.signal_msi(address, (data & ~multiple) | (vector & multiple))


class MsixCapability:
    """MSI-X: a table of (address, data, mask) entries and a pending-bit array in a BAR."""

    def __init__(self, device, vectors: int, bar_index: int, table_offset: int,
                 pba_offset: int | None):
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X vectors must be 1..2048")
        self.device = device
        self.vectors = vectors
        self.bar_index = bar_index
        self.table_offset = table_offset
        table_size = vectors * MSIX_ENTRY_SIZE
        self.pba_offset = pba_offset if pba_offset is not None else \
            (table_offset + table_size + 4095) & ~4095
        self.pba_size = ((vectors + 63) // 64) * 8
        self.table = bytearray(table_size)
        for vector in range(vectors):
            struct.pack_into("<I", self.table, vector * MSIX_ENTRY_SIZE + 12, MSIX_VECTOR_MASKED)
        self.pending = 0
        if device.bars[bar_index] is None:
            size = 4096
            while size < self.pba_offset + self.pba_size:
                size <<= 1
            device.add_bar(bar_index, "mem32", size)
        body = struct.pack("<HII", vectors - 1, table_offset | bar_index,
                           self.pba_offset | bar_index)
        writable = struct.pack("<HII", MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK, 0, 0)
        self.offset = device.add_capability(R.CAP_ID_MSIX, body, writable)

    def covers(self, offset: int, size: int) -> bool:
        return offset < self.offset + 12 and offset + size > self.offset

    def save_state(self) -> dict:
        return {"table": encode(self.table),
                "pending": self.pending}

    def restore_state(self, state: dict) -> None:
        self.table[:] = decode(state["table"], "MSI-X table", length=len(self.table))
        self.pending = int(state["pending"]) & ((1 << self.vectors) - 1)

    @property
    def control(self) -> int:
        return struct.unpack_from("<H", self.device.config, self.offset + 2)[0]

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & MSIX_CONTROL_FUNCTION_MASK)

    def config_written(self) -> None:
        self._deliver_pending()

    def claims(self, bar_index: int, offset: int) -> bool:
        if bar_index != self.bar_index:
            return False
        return (self.table_offset <= offset < self.table_offset + len(self.table) or
                self.pba_offset <= offset < self.pba_offset + self.pba_size)

    def read(self, bar_index: int, offset: int, size: int) -> int:
        if self.table_offset <= offset < self.table_offset + len(self.table):
            start = offset - self.table_offset
            return int.from_bytes(self.table[start:start + size].ljust(size, b"\xff"), "little")
        start = offset - self.pba_offset
        return (self.pending >> (8 * start)) & ((1 << (8 * size)) - 1)

    def write(self, bar_index: int, offset: int, size: int, value: int) -> None:
        if not self.table_offset <= offset < self.table_offset + len(self.table):
            return                      # the PBA is read-only
        start = offset - self.table_offset
        if size not in (4, 8) or start % 4:
            self.device.warn_once("msix-width", "MSI-X table access of size %d at %#x",
                                  size, start)
            return
        end = min(start + size, len(self.table))
        self.table[start:end] = value.to_bytes(size, "little")[:end - start]
        self._deliver_pending()

    def entry(self, vector: int) -> tuple[int, int, bool]:
        address_lo, address_hi, data, control = struct.unpack_from(
            "<IIII", self.table, vector * MSIX_ENTRY_SIZE)
        return address_lo | (address_hi << 32), data, bool(control & MSIX_VECTOR_MASKED)

    def fire(self, vector: int) -> None:
        if not self.enabled or not 0 <= vector < self.vectors:
            return
        address, data, masked = self.entry(vector)
        if masked or self.function_masked:
            self.pending |= 1 << vector
            return
        if not _valid_message_address(address):
            self.device.warn_once("msix-address", "MSI-X vector %d address %#x is not an "
                                  "APIC address", vector, address)
            return
        self.device.context.signal_msi(address, data)

    def _deliver_pending(self) -> None:
        if not self.pending or not self.enabled or self.function_masked:
            return
        for vector in range(self.vectors):
            if self.pending & (1 << vector) and not self.entry(vector)[2]:
                self.pending &= ~(1 << vector)
                self.fire(vector)
