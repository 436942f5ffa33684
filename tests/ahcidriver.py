"""A guest's AHCI driver for unit tests: the register, command list, command
table and PRDT work a driver does (tests/test_ahci.py, tests/test_device_fuzz.py),
on the PCI test VM the NVMe tests use."""

import struct

from nvmedriver import NvmeVm as PciVm          # a FakeVm with a PCI bus and recorded MSIs

from pyhyve.ahci import hba as H
from pyhyve.ahci import port as P
from pyhyve.ahci import protocol as F
from pyhyve.pci import regs as R

SLOT = 4
MiB = 1 << 20
LISTS = 0x100000                 # port N: command list at LISTS + N * 0x1000, FIS area + 0x400
TABLES = 0x140000                # port N slot S: table at TABLES + (N * 32 + S) * 0x1000
DATA = 0x400000                  # data buffers (up to 4 MiB)
MSI_ADDRESS = 0xFEE00000

__all__ = ["PciVm", "AhciDriver", "SLOT", "MiB", "LISTS", "TABLES", "DATA", "MSI_ADDRESS"]


def h2d(command: int, lba: int = 0, count: int = 0, features: int = 0, device: int = 0x40,
        control: int = 0, is_command: bool = True) -> bytes:
    """A Register Host-to-Device FIS."""
    return struct.pack("<BBBBBBBBBBBBBBBB4x", F.FIS_REGISTER_H2D,
                       F.H2D_COMMAND if is_command else 0, command, features & 0xFF,
                       lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, device, lba >> 24 & 0xFF,
                       lba >> 32 & 0xFF, lba >> 40 & 0xFF, features >> 8 & 0xFF, count & 0xFF,
                       count >> 8 & 0xFF, 0, control)


class AhciDriver:
    """What an AHCI driver does: ABAR registers, one command list per port."""

    def __init__(self, vm, device, slot: int = SLOT):
        self.vm, self.device, self.slot = vm, device, slot
        self.cfg_write(R.COMMAND, 2, R.COMMAND_MEMORY | R.COMMAND_MASTER)
        self.abar = self.cfg(R.BAR0 + 4 * H.ABAR, 4) & ~0xF

    def cfg(self, offset: int, size: int) -> int:
        return self.vm.pci.config_read(0, self.slot, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.vm.pci.config_write(0, self.slot, 0, offset, size, value)

    def reg(self, offset: int, size: int = 4) -> int:
        return self.vm.mmio_read(self.abar + offset, size)

    def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        self.vm.mmio_write(self.abar + offset, size, value)

    def port_reg(self, port: int, offset: int) -> int:
        return self.reg(H.PORTS_BASE + H.PORT_SIZE * port + offset)

    def set_port_reg(self, port: int, offset: int, value: int) -> None:
        self.set_reg(H.PORTS_BASE + H.PORT_SIZE * port + offset, value)

    def start(self, port: int = 0, interrupts: bool = True) -> None:
        """Enable AHCI (and interrupts), place the port's lists, start it."""
        self.set_reg(H.REG_GHC, H.GHC_AE | (H.GHC_IE if interrupts else 0))
        self.set_port_reg(port, P.REG_CMD, 0)
        self.vm.memory.write(LISTS + port * 0x1000, bytes(0x500))
        self.set_port_reg(port, P.REG_CLB, LISTS + port * 0x1000)
        self.set_port_reg(port, P.REG_FB, LISTS + port * 0x1000 + 0x400)
        self.set_port_reg(port, P.REG_IE, P.IE_MASK)
        self.set_port_reg(port, P.REG_SERR, 0xFFFFFFFF)
        self.set_port_reg(port, P.REG_IS, 0xFFFFFFFF)
        self.set_port_reg(port, P.REG_CMD, P.CMD_FRE | P.CMD_ST)

    def received(self, port: int, at: int, length: int) -> bytes:
        return self.vm.memory.read(LISTS + port * 0x1000 + 0x400 + at, length)

    def prepare(self, port: int, slot: int, cfis: bytes, prdt=(), acmd: bytes = b"",
                write: bool = False) -> None:
        """Fill slot `slot`'s header and table: the FIS, packet and PRDT
        entries ((address, bytes) pairs)."""
        table = TABLES + (port * 32 + slot) * 0x1000
        flags = len(cfis) // 4 | (F.HEADER_ATAPI if acmd else 0) | (F.HEADER_WRITE if write else 0)
        header = struct.pack("<HHIQ16x", flags, len(prdt), 0, table)
        self.vm.memory.write(LISTS + port * 0x1000 + 32 * slot, header)
        body = cfis.ljust(0x40, b"\0") + acmd.ljust(16, b"\0").ljust(0x40, b"\0")
        body += b"".join(struct.pack("<QII", address, 0, count - 1) for address, count in prdt)
        self.vm.memory.write(table, body)

    def issue(self, port: int, slots: int) -> None:
        self.set_port_reg(port, P.REG_CI, slots)

    def command(self, cfis: bytes, prdt=(), port: int = 0, slot: int = 0, acmd: bytes = b"",
                write: bool = False) -> tuple[int, int]:
        """Run one command to its end: (PxTFD, PxIS), PxIS acknowledged."""
        self.prepare(port, slot, cfis, prdt, acmd, write)
        self.issue(port, 1 << slot)
        status = self.port_reg(port, P.REG_IS)
        self.set_port_reg(port, P.REG_IS, status)
        self.set_reg(H.REG_IS, 1 << port)
        return self.port_reg(port, P.REG_TFD), status

    def byte_count(self, port: int, slot: int) -> int:
        return struct.unpack("<I", self.vm.memory.read(LISTS + port * 0x1000 + 32 * slot + 4,
                                                       4))[0]

    def recover(self, port: int = 0) -> None:
        """What a driver's error handling does: stop the port, clear errors, start it."""
        self.set_port_reg(port, P.REG_CMD, P.CMD_FRE)
        self.set_port_reg(port, P.REG_SERR, 0xFFFFFFFF)
        self.set_port_reg(port, P.REG_IS, 0xFFFFFFFF)
        self.set_port_reg(port, P.REG_CMD, P.CMD_FRE | P.CMD_ST)

    def packet(self, cdb: bytes, length: int, port: int = 0, slot: int = 0) -> tuple[int, bytes]:
        """An ATAPI command reading up to `length` bytes: (PxTFD, data)."""
        self.vm.memory.write(DATA, bytes(length))
        tfd, _ = self.command(h2d(0xA0, features=1, lba=length << 8), [(DATA, length)] if length
                              else [], port=port, slot=slot, acmd=cdb)
        return tfd, self.vm.memory.read(DATA, length)
