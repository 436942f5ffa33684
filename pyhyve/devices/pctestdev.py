"""pc-testdev: the ports and memory window kvm-unit-tests pokes to check the
hypervisor (QEMU's pc-testdev, which bhyve's `-l pc-testdev` also offers).

- ports 0xe0-0xe3: a 32-bit scratch register; an access of any width at
  port 0xe0+N reads or writes the bytes from N on (within the 32 bits), so
  what was written reads back by size and place;
- ports 0xe8-0xeb: the same register, taken one byte at a time (QEMU's
  byte window: a wider access is that many byte accesses);
- port 0xe4 "flush page": a 4-byte write names a guest page that QEMU
  unmaps and maps again on the host, so that KVM must fault it in anew.
  That exercises KVM's MMU, not the device: pyhyve accepts the write and
  leaves the page as it is.  bhyve has no such port;
- ports 0x2000-0x2017: a byte write of non-zero raises interrupt line N
  (GSI N: ISA IRQ N through the 8259s and the I/O APIC, N of 16 and more
  through the I/O APIC only), zero lowers it; reads return 0.  QEMU takes
  only lines 0-15 (its ISA bus asserts on more);
- memory 0xff000000-0xff00ffff: 64 KiB that read back what was written.

Accesses QEMU would not take (a wider write to an IRQ port, a narrower one
to the flush port, a window access running past its end) are dropped, the
part outside left alone, and logged once.  Like bhyve's, this device comes
with an isa-debug-exit at 0xf4 (builder.py), unless one is configured.

Threading: vCPU threads call in; one lock keeps the register, the window and
the line levels consistent.  All of it is saved (snapshots) and a reset
clears it, lowering the lines.
"""

import threading

from ..config import ConfigError
from ..iobus import BusConflict
from ..lifecycle import Device, StateError, decode, encode, expect_keys, uint

SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
BYTE_WINDOW_PORT = 0xE8
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000
PC_TESTDEV_DEBUG_EXIT = 0xF4        # bhyve's pc-testdev: an isa-debug-exit, 4 ports


class PcTestdev(Device):
    name = "pc-testdev"
    savable = True

    def __init__(self, context):
        self.context = context
        self._lock = threading.Lock()
        self._scratch = 0
        self._iomem = bytearray(IOMEM_SIZE)
        self._raised: set[int] = set()
        self._lines = [context.irq_line(irq, self.name) for irq in range(IRQ_LINES)]
        for region in context.memory.regions:
            if region.gpa < IOMEM_BASE + IOMEM_SIZE and IOMEM_BASE < region.end:
                raise ConfigError(f"pc-testdev's memory at {IOMEM_BASE:#x}+{IOMEM_SIZE:#x} "
                                  f"overlaps the {region.name} at {region.gpa:#x}-"
                                  f"{region.end - 1:#x}")
        ports = context.ports
        try:
            ports.register("pc-testdev-scratch", SCRATCH_PORT, 4, self._read_scratch,
                           self._write_scratch)
            ports.register("pc-testdev-flush", FLUSH_PORT, 4, self._read_flush,
                           self._write_flush)
            ports.register("pc-testdev-bytes", BYTE_WINDOW_PORT, 4, self._read_bytes,
                           self._write_bytes)
            ports.register("pc-testdev-irq", IRQ_PORT, IRQ_LINES, self._read_irq,
                           self._write_irq)
            context.mmio.register("pc-testdev-iomem", IOMEM_BASE, IOMEM_SIZE,
                                  self._read_iomem, self._write_iomem)
        except BusConflict as exc:
            raise ConfigError(str(exc)) from None

    # --- the scratch register ---------------------------------------------------------
    def _read_scratch(self, offset: int, size: int) -> int:
        shift = 8 * offset
        return (self._scratch & ((1 << 8 * size) - 1 << shift) & 0xFFFFFFFF) >> shift

    def _write_scratch(self, offset: int, size: int, value: int) -> None:
        shift = 8 * offset
        mask = (1 << 8 * size) - 1 << shift
        with self._lock:
            self._scratch = (self._scratch & ~mask | value << shift) & 0xFFFFFFFF

    def _read_bytes(self, offset: int, size: int) -> int:
        """Past port 0xeb the bytes are not the register's: all ones, as QEMU
        reads the unclaimed ports there."""
        return sum((self._read_scratch(offset + i, 1) if offset + i < 4 else 0xFF) << 8 * i
                   for i in range(size))

    def _write_bytes(self, offset: int, size: int, value: int) -> None:
        for i in range(min(size, 4 - offset)):
            self._write_scratch(offset + i, 1, value >> 8 * i & 0xFF)

    # --- flush page and interrupt lines -----------------------------------------------
    def _read_flush(self, offset: int, size: int) -> int:
        return 0

    def _write_flush(self, offset: int, size: int, value: int) -> None:
        if offset or size != 4:
            self.context.warn_once("pc-testdev-flush", "pc-testdev: %d-byte write at "
                                   "port %#x ignored (the flush port takes 4 bytes)",
                                   size, FLUSH_PORT + offset)

    def _read_irq(self, offset: int, size: int) -> int:
        return 0

    def _write_irq(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            self.context.warn_once("pc-testdev-irq", "pc-testdev: %d-byte write at port "
                                   "%#x ignored (interrupt lines take bytes)",
                                   size, IRQ_PORT + offset)
            return
        with self._lock:
            (self._raised.add if value else self._raised.discard)(offset)
            self._lines[offset].set(bool(value))

    # --- the memory window --------------------------------------------------------------
    def _fits(self, offset: int, size: int) -> int:
        """How many of the access's bytes are in the window."""
        fit = min(size, IOMEM_SIZE - offset)
        if fit < size:
            self.context.warn_once("pc-testdev-iomem", "pc-testdev: %d-byte access at "
                                   "%#x runs past the memory window; the rest dropped",
                                   size, IOMEM_BASE + offset)
        return fit

    def _read_iomem(self, offset: int, size: int) -> int:
        fit = self._fits(offset, size)
        return int.from_bytes(self._iomem[offset:offset + fit], "little")

    def _write_iomem(self, offset: int, size: int, value: int) -> None:
        fit = self._fits(offset, size)
        with self._lock:
            self._iomem[offset:offset + fit] = (value & (1 << 8 * fit) - 1).to_bytes(fit,
                                                                                   "little")

    # --- lifecycle ------------------------------------------------------------------------
    def save_state(self) -> dict:
        with self._lock:
            return {"scratch": self._scratch, "iomem": encode(self._iomem),
                    "raised": sorted(self._raised)}

    def restore_state(self, state: dict) -> None:
        """Lines are not driven here: the machine lowered them all, and
        resync_irq() raises again those saved high."""
        expect_keys(state, ("scratch", "iomem", "raised"), self.name)
        scratch = uint(state["scratch"], 0xFFFFFFFF, "pc-testdev scratch")
        iomem = decode(state["iomem"], "pc-testdev iomem", length=IOMEM_SIZE)
        if not isinstance(state["raised"], list):
            raise StateError(f"pc-testdev raised lines are {state['raised']!r}, not a list")
        raised = {uint(line, IRQ_LINES - 1, "pc-testdev raised line")
                  for line in state["raised"]}
        with self._lock:
            self._scratch, self._iomem[:] = scratch, iomem
            for line in self._raised - raised:
                self._lines[line].set(False)
            self._raised = raised

    def resync_irq(self) -> None:
        with self._lock:
            for line in self._raised:
                self._lines[line].set(True)
