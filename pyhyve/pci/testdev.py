"""`pci-testdev`: a small device for tests and for learning the framework.

BAR0 (32-bit memory, 4 KiB) and BAR1 (I/O, 256 ports) expose the same
registers; BAR2 is a 64-bit prefetchable BAR for sizing tests; BAR4 holds the
MSI-X table.  Registers (32-bit):
  0x00  magic "PTST" (read-only)
  0x04  scratch, read/write at any width
  0x08  write N: raise interrupt vector N (MSI-X, MSI or INTx, as enabled)
  0x0C  read: 1 while INTx is asserted; write: deassert INTx (the guest's ack)
  0x10  interrupts raised so far (read-only)
"""

from ..config import ConfigError
from . import BAR_IO, BAR_MEM32, BAR_MEM64, PciDevice, emulation
from .options import Option

MAGIC = 0x54535450
REG_MAGIC, REG_SCRATCH, REG_RAISE, REG_INTX, REG_COUNT = 0x00, 0x04, 0x08, 0x0C, 0x10
CLASS_OTHER = 0xFF0000


@emulation("pci-testdev")
class PciTestDevice(PciDevice):
    """test device: scratch register, INTx, MSI and MSI-X on demand"""

    savable = True
    options = (Option("vectors", "number", "4", "MSI and MSI-X vectors: 1, 2, 4 ... 32"),)

    def init(self, options: dict[str, str]) -> None:
        vectors = int(options.get("vectors", "4"), 0)
        if not 1 <= vectors <= 32 or vectors & (vectors - 1):
            raise ConfigError("pci-testdev: vectors must be a power of two from 1 to 32")
        self.set_ids(0x1B36, 0x0005, CLASS_OTHER, subsystem_vendor=0x1AF4, subsystem=0x1100)
        self.set_interrupt_pin(1)
        self.add_bar(0, BAR_MEM32, 4096)
        self.add_bar(1, BAR_IO, 256)
        self.add_bar(2, BAR_MEM64, 1 << 20, prefetchable=True)
        self.add_msi(vectors)
        self.add_msix(vectors, bar_index=4)
        self.scratch = 0
        self.raised = 0

    def save_state(self) -> dict:
        return {**super().save_state(), "scratch": self.scratch, "raised": self.raised}

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        self.scratch = int(state["scratch"]) & 0xFFFFFFFF
        self.raised = int(state["raised"]) & 0xFFFFFFFF

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index not in (0, 1):
            return 0
        register, shift = offset & ~3, 8 * (offset & 3)
        value = {REG_MAGIC: MAGIC, REG_SCRATCH: self.scratch, REG_INTX: int(self.intx_asserted),
                 REG_COUNT: self.raised}.get(register, 0)
        return value >> shift

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index not in (0, 1):
            return
        register, shift = offset & ~3, 8 * (offset & 3)
        if register == REG_SCRATCH:
            mask = ((1 << (8 * size)) - 1) << shift
            self.scratch = (self.scratch & ~mask) | ((value << shift) & mask)
        elif register == REG_RAISE:
            self.raised += 1
            self.raise_interrupt(value & 0xFF)
        elif register == REG_INTX:
            self.deassert_intx()
