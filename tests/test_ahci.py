"""The `ahci`, `ahci-hd` and `ahci-cd` emulations driven as an AHCI driver
drives them: config cycles to find ABAR, HBA and port registers, command
lists and tables in guest memory, PRDTs, NCQ, ATAPI packets, MSI and INTx;
malformed commands from hypothesis; snapshots.  Then real SeaBIOS boots a
GRUB ISO from an AHCI CD-ROM and a boot sector from an AHCI disk, on pyhyve
and on QEMU.  Linux's own ahci, sd and sr drivers use a disk and a CD in
test_linux_storage.py."""

import hashlib
import json
import os
import re
import struct
import subprocess

import pytest
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from ahcidriver import DATA, LISTS, MSI_ADDRESS, SLOT, TABLES, AhciDriver, MiB, PciVm, h2d
from pyhyve.ahci import ata as A
from pyhyve.ahci import atapi as C
from pyhyve.ahci import hba as H
from pyhyve.ahci import port as P
from pyhyve.ahci import protocol as F
from pyhyve.config import ConfigError
from pyhyve.lifecycle import StateError
from pyhyve.pci import emulations
from pyhyve.pci import regs as R

DISK_SIZE = 4 * MiB
CD_SIZE = 2 * MiB
CD_BLOCKS = CD_SIZE // 2048


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


@pytest.fixture
def cdrom(tmp_path):
    path = tmp_path / "cd.iso"
    path.write_bytes(os.urandom(CD_SIZE))
    return path


def make(emulation: str, text: str):
    vm = PciVm()
    cls = emulations()[emulation]
    device = vm.pci.add(SLOT, 0, cls, cls.legacy_options(text))
    return vm, device, AhciDriver(vm, device)


@pytest.fixture
def both(disk, cdrom):
    """A disk on port 0 and a CD-ROM on port 1, both ports started."""
    vm, device, driver = make("ahci", f"hd:{disk},cd:{cdrom}")
    driver.start(0)
    driver.start(1)
    yield driver
    vm.close()


def cdb(*values: int) -> bytes:
    return bytes(values).ljust(12, b"\0")


# --- the PCI function and the HBA --------------------------------------------------------------
def test_pci_identity_abar_msi_and_intx(both):
    assert both.cfg(R.VENDOR_ID, 4) == 0x2821_8086
    assert both.cfg(R.REVISION_ID, 4) >> 8 == 0x010601
    assert both.cfg(R.INTERRUPT_PIN, 1) == 1
    assert both.device.msi is not None and both.device.msi.vectors == 1
    assert both.cfg(R.BAR0 + 4 * 5, 4) & 0xF == 0                       # 32-bit memory
    both.cfg_write(R.BAR0 + 4 * 5, 4, 0xFFFFFFFF)
    assert (~both.cfg(R.BAR0 + 4 * 5, 4) | 0xF) & 0xFFFFFFFF == 0x3FF     # 1 KiB: 6 ports


def test_hba_registers(both):
    cap = both.reg(H.REG_CAP)
    assert cap & 0x1F == 5                                     # six ports (ICH8)
    assert (cap >> 8) & 0x1F == 31                             # 32 command slots
    assert cap & H.CAP_SNCQ and cap & H.CAP_S64A and cap & H.CAP_SAM
    assert (cap >> 20) & 0xF == 3                              # Gen3
    assert both.reg(H.REG_PI) == 0b11
    assert both.reg(H.REG_VS) == 0x00010300
    assert both.reg(H.REG_GHC) == H.GHC_AE | H.GHC_IE
    assert both.reg(H.REG_CAP, 2) == cap & 0xFFFF              # narrow and
    assert both.reg(H.REG_CAP, 8) == cap | both.reg(H.REG_GHC) << 32     # wide reads


def test_ports_signatures_and_status(both):
    assert both.port_reg(0, P.REG_SIG) == P.SIG_ATA
    assert both.port_reg(1, P.REG_SIG) == P.SIG_ATAPI
    assert both.port_reg(2, P.REG_SIG) == P.SIG_NONE
    assert both.port_reg(0, P.REG_SSTS) == 0x133                # Gen3, device present
    assert both.port_reg(2, P.REG_SSTS) == 0
    assert both.port_reg(0, P.REG_TFD) & 0xFF == F.READY
    assert both.port_reg(1, P.REG_CMD) & (P.CMD_CR | P.CMD_FR) == P.CMD_CR | P.CMD_FR
    assert both.port_reg(0, P.REG_CMD) & P.CMD_CPS
    assert not both.port_reg(2, P.REG_CMD) & P.CMD_CPS


def test_hba_reset_stops_ports_and_clears_registers(both):
    both.set_port_reg(0, P.REG_SCTL, 0x20)         # ignored: the port runs
    assert both.port_reg(0, P.REG_SCTL) == 0
    both.set_reg(H.REG_GHC, H.GHC_HR)
    assert both.reg(H.REG_GHC) == H.GHC_AE and both.reg(H.REG_IS) == 0
    assert both.port_reg(0, P.REG_CMD) & (P.CMD_ST | P.CMD_CR | P.CMD_FRE) == 0
    assert both.port_reg(0, P.REG_IE) == 0
    assert both.port_reg(0, P.REG_CLB) == LISTS                 # the lists stay where they are
    assert both.port_reg(0, P.REG_SIG) == P.SIG_ATA


def test_comreset_through_sctl_limits_speed_and_sends_the_signature(both):
    both.set_port_reg(1, P.REG_CMD, P.CMD_FRE)                  # stopped, FIS area on
    both.set_port_reg(1, P.REG_SCTL, 0x21)                      # DET=1, at most Gen2
    both.set_port_reg(1, P.REG_SCTL, 0x20)
    assert both.port_reg(1, P.REG_SSTS) == 0x123
    fis = both.received(1, F.RX_REGISTER_D2H, 20)
    assert fis[0] == F.FIS_REGISTER_D2H and fis[5:7] == b"\x14\xeb" and fis[12] == 1


def test_software_reset_with_device_control_fises(both):
    both.command(h2d(A.IDENTIFY_DEVICE, lba=0x050403, count=0xFF), [(DATA, 512)])
    for control in (F.CONTROL_SRST, 0):
        both.prepare(0, 3, h2d(0, control=control, is_command=False))
        both.issue(0, 1 << 3)
        assert both.port_reg(0, P.REG_CI) == 0
    fis = both.received(0, F.RX_REGISTER_D2H, 20)
    assert fis[4] == 1 and fis[12] == 1 and fis[5:7] == b"\0\0"     # the ATA signature
    both.set_port_reg(0, P.REG_CMD, P.CMD_FRE | P.CMD_ST | P.CMD_CLO)
    assert not both.port_reg(0, P.REG_CMD) & P.CMD_CLO


# --- ATA ---------------------------------------------------------------------------------------
def words(data: bytes) -> list[int]:
    return list(struct.unpack("<256H", data))


def ident_string(data: bytes, start: int, length: int) -> str:
    return bytes(data[start + (i ^ 1)] for i in range(length)).decode().rstrip()


def test_identify_device(disk):
    vm, device, driver = make("ahci-hd", f"{disk},ser=SERIAL-1,model=Test Disk,rev=R9,nmrr=1")
    try:
        driver.start()
        tfd, status = driver.command(h2d(A.IDENTIFY_DEVICE), [(DATA, 512)])
        assert tfd & 0xFF == F.READY and status & P.IS_DHRS
        data = vm.memory.read(DATA, 512)
        w = words(data)
        assert ident_string(data, 20, 20) == "SERIAL-1"
        assert ident_string(data, 46, 8) == "R9"
        assert ident_string(data, 54, 40) == "Test Disk"
        assert w[60] | w[61] << 16 == DISK_SIZE // 512
        assert w[100] | w[101] << 16 == DISK_SIZE // 512
        assert w[83] & 1 << 10 and w[76] & 1 << 8 and w[75] == 31   # LBA48, NCQ, depth 32
        assert w[169] & 1 and w[217] == 1                          # TRIM, solid state
        assert data[510] == 0xA5 and sum(data) % 256 == 0          # integrity word
        assert driver.byte_count(0, 0) == 512
        pio = driver.received(0, F.RX_PIO_SETUP, 20)
        assert pio[0] == F.FIS_PIO_SETUP and pio[15] == F.READY
    finally:
        vm.close()


def test_default_serial_comes_from_the_path(disk):
    vm, device, driver = make("ahci-hd", str(disk))
    try:
        driver.start()
        driver.command(h2d(A.IDENTIFY_DEVICE), [(DATA, 512)])
        digest = hashlib.md5(str(disk).encode()).hexdigest().upper()
        assert ident_string(vm.memory.read(DATA, 512), 20, 20) == f"PYHYVE-{digest[:13]}"
        assert ident_string(vm.memory.read(DATA, 512), 54, 40) == "PYHYVE SATA DISK"
    finally:
        vm.close()


@pytest.mark.parametrize("opcode,lba,count", [(A.READ_DMA, 7, 9), (A.READ_DMA_EXT, 1 << 12, 16),
                                              (A.READ_SECTORS, 0, 1),
                                              (A.READ_MULTIPLE_EXT, 33, 3)])
def test_reads_through_a_scattered_prdt(both, disk, opcode, lba, count):
    length = count * 512
    pieces = [(DATA + 0x10000, 2), (DATA + 0x3002, 510), (DATA + 0x8000, length)]
    tfd, status = both.command(h2d(opcode, lba=lba, count=count), pieces)
    assert tfd & 0xFF == F.READY and status & P.IS_DHRS, hex(tfd)
    image = disk.read_bytes()[lba * 512:lba * 512 + length]
    got = both.vm.memory.read(DATA + 0x10000, 2) + both.vm.memory.read(DATA + 0x3002, 510) + \
        both.vm.memory.read(DATA + 0x8000, length - 512)
    assert got == image
    assert both.port_reg(0, P.REG_CI) == 0 and both.byte_count(0, 0) == length


@pytest.mark.parametrize("opcode", [A.WRITE_DMA, A.WRITE_DMA_EXT, A.WRITE_SECTORS_EXT])
def test_writes(both, disk, opcode):
    data = os.urandom(8192)
    both.vm.memory.write(DATA, data)
    tfd, _ = both.command(h2d(opcode, lba=100, count=16), [(DATA, 4096), (DATA + 4096, 4096)],
                          write=True)
    assert tfd & 0xFF == F.READY
    assert disk.read_bytes()[100 * 512:100 * 512 + 8192] == data


def test_ncq_reads_and_writes_complete_with_set_device_bits(both, disk):
    data = os.urandom(4096)
    both.vm.memory.write(DATA, data)
    both.prepare(0, 5, h2d(A.WRITE_FPDMA_QUEUED, lba=40, features=8, count=5 << 3),
                 [(DATA, 4096)], write=True)
    both.prepare(0, 9, h2d(A.READ_FPDMA_QUEUED, lba=40, features=8, count=9 << 3),
                 [(DATA + 0x2000, 4096)])
    both.set_port_reg(0, P.REG_SACT, 1 << 5 | 1 << 9)
    both.issue(0, 1 << 5 | 1 << 9)
    assert both.port_reg(0, P.REG_SACT) == 0 and both.port_reg(0, P.REG_CI) == 0
    assert both.port_reg(0, P.REG_IS) & P.IS_SDBS
    assert disk.read_bytes()[40 * 512:48 * 512] == data
    assert both.vm.memory.read(DATA + 0x2000, 4096) == data
    sdb = both.received(0, F.RX_SET_DEVICE_BITS, 8)
    assert sdb[0] == F.FIS_SET_DEVICE_BITS and sdb[1] & F.FIS_INTERRUPT


def test_ncq_error_is_kept_in_log_page_10h(both):
    both.set_port_reg(0, P.REG_SACT, 1 << 2)
    tfd, status = both.command(h2d(A.READ_FPDMA_QUEUED, lba=DISK_SIZE // 512, features=1,
                                   count=2 << 3), [(DATA, 512)], slot=2)
    assert tfd & F.STATUS_ERR and status & P.IS_TFES
    assert both.port_reg(0, P.REG_SACT) == 1 << 2               # left for the driver
    both.recover()
    assert both.port_reg(0, P.REG_SACT) == 0
    tfd, _ = both.command(h2d(A.READ_LOG_EXT, lba=A.LOG_NCQ_ERROR, count=1), [(DATA, 512)])
    log = both.vm.memory.read(DATA, 512)
    assert tfd & 0xFF == F.READY and log[0] == 2 and log[2] & F.STATUS_ERR
    assert sum(log) % 256 == 0


def test_flush_trim_and_set_features(both, disk):
    assert both.command(h2d(A.FLUSH_CACHE_EXT))[0] & 0xFF == F.READY
    entries = struct.pack("<QQ", 200 | 16 << 48, 1000 | 8 << 48).ljust(512, b"\0")
    both.vm.memory.write(DATA, entries)
    tfd, _ = both.command(h2d(A.DSM, features=A.DSM_TRIM, count=1), [(DATA, 512)], write=True)
    assert tfd & 0xFF == F.READY
    image = disk.read_bytes()
    assert image[200 * 512:216 * 512] == bytes(16 * 512)
    assert image[1000 * 512:1008 * 512] == bytes(8 * 512)
    assert image[216 * 512:217 * 512] != bytes(512)
    assert both.command(h2d(A.SET_FEATURES, features=A.SF_WRITE_CACHE_OFF))[0] & 0xFF == F.READY
    assert both.command(h2d(A.SET_FEATURES, features=A.SF_TRANSFER_MODE, count=0x45))[0] \
        & 0xFF == F.READY
    both.command(h2d(A.IDENTIFY_DEVICE), [(DATA, 512)])
    w = words(both.vm.memory.read(DATA, 512))
    assert not w[85] & 0x20 and w[88] >> 8 == 1 << 5           # cache off, UDMA5 selected
    tfd, _ = both.command(h2d(A.SET_FEATURES, features=0x42))
    assert tfd & F.STATUS_ERR and tfd >> 8 == F.ERROR_ABRT


def test_errors_stop_the_port_until_software_clears_st(both, disk):
    before = disk.read_bytes()
    tfd, status = both.command(h2d(A.READ_DMA_EXT, lba=DISK_SIZE // 512 - 1, count=2),
                               [(DATA, 1024)])
    assert tfd & F.STATUS_ERR and tfd >> 8 & F.ERROR_IDNF and status & P.IS_TFES
    assert both.port_reg(0, P.REG_CI) == 1                     # left set
    both.issue(0, 1 << 1)                                        # nothing runs meanwhile
    assert both.port_reg(0, P.REG_CI) == 0b11
    both.recover()
    for cfis, prdt in ((h2d(0x7E), []),                                   # unknown command
                       (h2d(A.READ_DMA, count=8), [(DATA, 512)]),          # PRDT too short
                       (h2d(A.READ_DMA, count=1), [(0xF0000000, 512)]),    # not RAM
                       (h2d(A.PACKET), []),                                # not ATAPI
                       (h2d(A.IDENTIFY_PACKET_DEVICE), [(DATA, 512)])):
        tfd, status = both.command(cfis, prdt)
        assert tfd & F.STATUS_ERR and status & P.IS_TFES, cfis
        both.recover()
    assert both.command(h2d(A.READ_DMA, count=1), [(DATA, 512)])[0] & 0xFF == F.READY
    assert disk.read_bytes() == before


def test_command_list_outside_ram_is_a_host_bus_fatal_error(both):
    both.set_port_reg(0, P.REG_CMD, P.CMD_FRE)
    both.set_port_reg(0, P.REG_CLB, 0xF0000000)
    both.set_port_reg(0, P.REG_CMD, P.CMD_FRE | P.CMD_ST)
    both.issue(0, 1)
    assert both.port_reg(0, P.REG_IS) & P.IS_HBFS


def test_read_only_disk(disk):
    before = disk.read_bytes()
    vm, device, driver = make("ahci-hd", f"{disk},ro")
    try:
        driver.start()
        assert driver.command(h2d(A.WRITE_DMA, count=1), [(DATA, 512)], write=True)[0] \
            & F.STATUS_ERR
        driver.recover()
        driver.command(h2d(A.IDENTIFY_DEVICE), [(DATA, 512)])
        assert not words(vm.memory.read(DATA, 512))[169] & 1          # no TRIM
    finally:
        vm.close()
    assert disk.read_bytes() == before


# --- ATAPI -------------------------------------------------------------------------------------
def test_identify_packet_device_and_identify_device_refused(both):
    tfd, _ = both.command(h2d(A.IDENTIFY_PACKET_DEVICE), [(DATA, 512)], port=1)
    data = both.vm.memory.read(DATA, 512)
    assert tfd & 0xFF == F.READY and words(data)[0] == 0x85C0
    assert ident_string(data, 54, 40) == "PYHYVE SATA DVD ROM"
    tfd, _ = both.command(h2d(A.IDENTIFY_DEVICE), [(DATA, 512)], port=1)
    assert tfd & F.STATUS_ERR


def test_inquiry_capacity_and_reads(both, cdrom):
    tfd, data = both.packet(cdb(C.INQUIRY, 0, 0, 0, 36), 36, port=1)
    assert tfd & 0xFF == F.READY and data[0] == 5 and data[1] == 0x80
    assert data[8:16] == b"PYHYVE  " and data[16:32] == b"PYHYVE SATA DVD "
    tfd, data = both.packet(cdb(C.READ_CAPACITY), 8, port=1)
    assert struct.unpack(">II", data) == (CD_BLOCKS - 1, 2048)
    image = cdrom.read_bytes()
    tfd, data = both.packet(cdb(C.READ_10, 0, 0, 0, 0, 17, 0, 0, 2), 4096, port=1)
    assert tfd & 0xFF == F.READY and data == image[17 * 2048:19 * 2048]
    assert both.received(1, F.RX_REGISTER_D2H, 20)[12] == C.INTERRUPT_REASON_DONE
    tfd, data = both.packet(cdb(C.READ_12, 0, 0, 0, 0, 3, 0, 0, 0, 1), 2048, port=1)
    assert data == image[3 * 2048:4 * 2048]
    assert both.packet(cdb(C.TEST_UNIT_READY), 0, port=1)[0] & 0xFF == F.READY
    assert both.packet(cdb(C.START_STOP_UNIT, 0, 0, 0, 2), 0, port=1)[0] & 0xFF == F.READY
    assert both.packet(cdb(C.PREVENT_ALLOW, 0, 0, 0, 1), 0, port=1)[0] & 0xFF == F.READY


def test_errors_leave_sense_data_for_request_sense(both):
    for command, (key, asc) in ((cdb(C.READ_10, 0, 0, 0, 0x10, 0, 0, 0, 1), (5, 0x21)),
                                (cdb(0xBB), (5, 0x20)),
                                (cdb(C.INQUIRY, 1, 0x80, 0, 36), (5, 0x24)),
                                (cdb(C.MODE_SENSE_10, 0, 0xC1, 0, 0, 0, 0, 0, 64), (5, 0x39)),
                                (cdb(C.GET_EVENT_STATUS, 0, 0, 0, 0x10, 0, 0, 0, 8), (5, 0x24))):
        tfd, _ = both.packet(command, 16, port=1)
        assert tfd & F.STATUS_ERR and tfd >> 12 == key, (command, hex(tfd))
        assert both.port_reg(1, P.REG_IS) == 0                     # acknowledged
        both.recover(1)
        tfd, sense = both.packet(cdb(C.REQUEST_SENSE, 0, 0, 0, 18), 18, port=1)
        assert tfd & 0xFF == F.READY and (sense[0], sense[2], sense[12]) == (0x70, key, asc)
        tfd, sense = both.packet(cdb(C.REQUEST_SENSE, 0, 0, 0, 18), 18, port=1)
        assert sense[2] == 0                                         # reported once


@pytest.mark.parametrize("msf", [False, True])
def test_read_toc_formats(both, msf):
    flags = 2 if msf else 0
    tfd, data = both.packet(cdb(C.READ_TOC, flags, 0, 0, 0, 0, 0, 0, 100), 100, port=1)
    assert tfd & 0xFF == F.READY
    assert struct.unpack(">HBB", data[:4]) == (18, 1, 1)
    track, lead_out = data[4:12], data[12:20]
    assert track[1:3] == bytes((0x14, 1)) and lead_out[2] == 0xAA
    if msf:
        assert track[4:] == bytes((0, 0, 2, 0))
        frames = CD_BLOCKS + 150
        assert lead_out[4:] == bytes((0, frames // 4500, frames // 75 % 60, frames % 75))
    else:
        assert track[4:] == bytes(4) and lead_out[4:] == CD_BLOCKS.to_bytes(4, "big")
    tfd, data = both.packet(cdb(C.READ_TOC, flags, 0, 0, 0, 0, 0xAA, 0, 12), 12, port=1)
    assert struct.unpack(">H", data[:2]) == (10,) and data[6] == 0xAA
    tfd, data = both.packet(cdb(C.READ_TOC, flags, 1, 0, 0, 0, 0, 0, 12), 12, port=1)
    assert tfd & 0xFF == F.READY and data[:4] == bytes((0, 10, 1, 1)) and data[6] == 1
    tfd, data = both.packet(cdb(C.READ_TOC, 2, 2, 0, 0, 0, 0, 0, 100), 100, port=1)
    assert tfd & 0xFF == F.READY and struct.unpack(">H", data[:2]) == (46,)
    points = [data[4 + 11 * i + 3] for i in range(4)]
    assert points == [0xA0, 0xA1, 0xA2, 1]
    assert both.packet(cdb(C.READ_TOC, 0, 0, 0, 0, 0, 5, 0, 12), 12, port=1)[0] & F.STATUS_ERR


def test_configuration_events_and_mode_pages(both):
    tfd, data = both.packet(cdb(C.GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 1, 0), 256, port=1)
    length = struct.unpack(">I", data[:4])[0]
    assert tfd & 0xFF == F.READY and data[6:8] == b"\x00\x08"          # CD-ROM profile
    codes, at = [], 8
    while at < length + 4:
        codes.append(struct.unpack(">H", data[at:at + 2])[0])
        at += 4 + data[at + 3]
    assert codes == [0x0000, 0x0001, 0x0003, 0x0010, 0x001E]
    tfd, data = both.packet(cdb(C.GET_CONFIGURATION, 2, 0, 0x28, 0, 0, 0, 0, 64), 64, port=1)
    assert struct.unpack(">I", data[:4])[0] == 4                          # no MRW feature
    tfd, data = both.packet(cdb(C.GET_EVENT_STATUS, 1, 0, 0, 0x10, 0, 0, 0, 8), 8, port=1)
    assert data == bytes((0, 6, 4, 0x10, 0, 2, 0, 0))
    tfd, data = both.packet(cdb(C.MODE_SENSE_10, 0, 0x2A, 0, 0, 0, 0, 0, 64), 64, port=1)
    assert tfd & 0xFF == F.READY and data[8] == 0x2A and data[14] & 0x08     # ejectable
    assert struct.unpack(">H", data[:2])[0] == 6 + 2 + data[9]
    tfd, data = both.packet(cdb(C.MODE_SENSE_10, 0, 0x3F, 0, 0, 0, 0, 0, 64), 64, port=1)
    assert data[8] == 0x01 and data[8 + 2 + data[9]] == 0x2A


# --- interrupts ----------------------------------------------------------------------------------
def test_intx_follows_is_and_ghc_ie(both):
    assert not both.device.intx_asserted
    both.prepare(0, 0, h2d(A.FLUSH_CACHE))
    both.issue(0, 1)
    assert both.reg(H.REG_IS) == 1 and both.device.intx_asserted
    both.set_reg(H.REG_IS, 1)                    # PxIS still set: IS comes back
    assert both.reg(H.REG_IS) == 1 and both.device.intx_asserted
    both.set_reg(H.REG_GHC, H.GHC_AE)
    assert not both.device.intx_asserted
    both.set_port_reg(0, P.REG_IS, 0xFFFFFFFF)
    both.set_reg(H.REG_IS, 1)
    both.set_reg(H.REG_GHC, H.GHC_AE | H.GHC_IE)
    assert not both.device.intx_asserted and both.reg(H.REG_IS) == 0
    both.set_port_reg(0, P.REG_IE, 0)            # masked: PxIS only
    both.command(h2d(A.FLUSH_CACHE))
    assert both.reg(H.REG_IS) == 0 and not both.device.intx_asserted


def test_msi_once_per_new_port_status_and_again_if_cleared_early(both):
    offset = both.device.msi.offset
    both.cfg_write(offset + 4, 4, MSI_ADDRESS)
    both.cfg_write(offset + 12, 2, 0x41)
    both.cfg_write(offset + 2, 2, 1)                              # MSI on
    both.prepare(0, 0, h2d(A.FLUSH_CACHE))
    both.issue(0, 1)
    assert both.vm.msis == [(MSI_ADDRESS, 0x41)] and not both.device.intx_asserted
    both.prepare(1, 0, h2d(A.IDENTIFY_PACKET_DEVICE), [(DATA, 512)])
    both.issue(1, 1)                                              # port 1's bit is new
    assert len(both.vm.msis) == 2
    both.set_port_reg(0, P.REG_IS, 0xFFFFFFFF)
    both.set_reg(H.REG_IS, 0b11)                                  # port 1 still has status
    assert len(both.vm.msis) == 3 and both.reg(H.REG_IS) == 0b10


# --- options -----------------------------------------------------------------------------------
def test_legacy_options_for_each_emulation():
    ahci = emulations()["ahci"]
    assert ahci.legacy_options("hd:/a.img,ro,ser=X,cd:/b.iso,hd:/c.img") == {
        "port.0.type": "hd", "port.0.path": "/a.img", "port.0.ro": "true", "port.0.ser": "X",
        "port.1.type": "cd", "port.1.path": "/b.iso", "port.2.type": "hd",
        "port.2.path": "/c.img"}
    assert emulations()["ahci-cd"].legacy_options("/b.iso,nocache") == {
        "port.0.type": "cd", "port.0.path": "/b.iso", "port.0.nocache": "true"}
    assert emulations()["ahci-hd"].legacy_options("path=/a.img") == {
        "port.0.type": "hd", "port.0.path": "/a.img"}
    with pytest.raises(ConfigError, match="does not start with hd: or cd:"):
        ahci.legacy_options("/a.img")


def test_many_ports_widen_abar_and_cd_images_open_read_only(disk, cdrom):
    os.chmod(cdrom, 0o444)
    vm = PciVm()
    try:
        device = vm.pci.add(SLOT, 0, emulations()["ahci"],
                            {"port.9.type": "cd", "port.9.path": str(cdrom),
                             "port.0.type": "hd", "port.0.path": str(disk)})
        driver = AhciDriver(vm, device)
        assert driver.reg(H.REG_PI) == 1 | 1 << 9 and driver.reg(H.REG_CAP) & 0x1F == 9
        assert device.bars[H.ABAR].size == 0x800
        assert driver.port_reg(9, P.REG_SIG) == P.SIG_ATAPI
    finally:
        vm.close()


def test_bad_options_are_one_line_config_errors(disk, tmp_path):
    small = tmp_path / "small.iso"
    small.write_bytes(bytes(1024))
    for options, message in (
            ({}, "no ports"),
            ({"port.0.type": "hd"}, "port 0 has no path"),
            ({"port.0.type": "zip", "port.0.path": str(disk)}, "type hd or cd"),
            ({"port.32.type": "hd", "port.32.path": str(disk)}, "ports are 0 to 31"),
            ({"port.0.type": "cd", "port.0.path": str(small)}, "smaller than one sector"),
            ({"port.0.type": "hd", "port.0.path": str(disk), "port.0.ser": "x" * 21},
             "ser must be at most 20"),
            ({"port.0.type": "hd", "port.0.path": str(disk), "port.0.nmrr": "70000"}, "nmrr"),
            ({"port.0.type": "hd", "port.0.path": str(tmp_path / "gone.img")},
             "no such file")):
        vm = PciVm()
        try:
            with pytest.raises(ConfigError, match=re.escape(message)):
                vm.pci.add(SLOT, 0, emulations()["ahci"], options)
        finally:
            vm.close()


# --- snapshots ---------------------------------------------------------------------------------
def saved(device) -> dict:
    with device.quiesce():
        return json.loads(json.dumps(device.save_state()))


def test_save_restore_save_unchanged_and_the_error_state_survives(disk, cdrom):
    vm, device, driver = make("ahci", f"hd:{disk},cd:{cdrom}")
    try:
        driver.start(0)
        driver.start(1)
        driver.command(h2d(A.SET_FEATURES, features=A.SF_WRITE_CACHE_OFF))
        driver.packet(cdb(0xBB), 0, port=1)                   # an error left standing
        driver.set_port_reg(0, P.REG_SACT, 1 << 4)
        driver.prepare(0, 4, h2d(A.READ_FPDMA_QUEUED, lba=1 << 40, features=1, count=4 << 3),
                       [(DATA, 512)])
        driver.issue(0, 1 << 4)                                 # a queued error, unread
        state = saved(device)
        memory = vm.memory.read(0, 8 * MiB)
    finally:
        vm.close()
    vm, device, driver = make("ahci", f"hd:{disk},cd:{cdrom}")
    try:
        vm.memory.write(0, memory)
        device.restore_state(state)
        assert saved(device) == state
        assert driver.port_reg(1, P.REG_CI) == 1 and driver.port_reg(1, P.REG_TFD) >> 12 == 5
        assert driver.port_reg(0, P.REG_SACT) == 1 << 4
        driver.recover(1)
        tfd, sense = driver.packet(cdb(C.REQUEST_SENSE, 0, 0, 0, 18), 18, port=1)
        assert sense[2] == 5 and sense[12] == 0x20              # the sense data came along
        driver.recover(0)
        driver.command(h2d(A.READ_LOG_EXT, lba=A.LOG_NCQ_ERROR, count=1), [(DATA, 512)])
        assert vm.memory.read(DATA, 1) == b"\x04"               # and the NCQ error log
        data = os.urandom(512)
        vm.memory.write(DATA, data)
        assert driver.command(h2d(A.WRITE_DMA, lba=9, count=1), [(DATA, 512)],
                              write=True)[0] & 0xFF == F.READY
        assert disk.read_bytes()[9 * 512:10 * 512] == data
        assert not device.ports[0].write_cache
    finally:
        vm.close()


@pytest.mark.parametrize("path,value", [
    (("ghc",), 4), (("is",), 1 << 8), (("ports",), []), (("ports", 0, "clb"), 0x123),
    (("ports", 0, "ie"), 1 << 12), (("ports", 0, "cmd"), 1 << 5), (("ports", 1, "sense"), [1]),
    (("ports", 1, "waiting"), 1), (("ports", 0, "ncq_error"), "x"),
    (("ports", 0, "mult_sectors"), 129), (("ports", 0, "tfd"), -1)])
def test_restore_refuses_state_that_does_not_fit(disk, cdrom, path, value):
    vm, device, driver = make("ahci", f"hd:{disk},cd:{cdrom}")
    try:
        state = saved(device)
        target = state["ahci"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        before = saved(device)
        with pytest.raises(StateError):
            device.restore_state(state)
        assert saved(device) == before
    finally:
        vm.close()


def test_a_machine_reset_brings_the_power_on_state_back(disk):
    vm, device, driver = make("ahci-hd", str(disk))
    try:
        power_on = json.loads(json.dumps(device.save_state()))      # as the VM keeps it
        driver.start()
        driver.command(h2d(A.SET_FEATURES, features=A.SF_WRITE_CACHE_OFF))
        device.reset(power_on)
        assert driver.port_reg(0, P.REG_CMD) & P.CMD_ST == 0 and device.ports[0].write_cache
        assert driver.reg(H.REG_GHC) == H.GHC_AE
    finally:
        vm.close()


# --- malformed traffic from hypothesis ---------------------------------------------------------
ADDRESS = st.one_of(st.sampled_from((0, DATA, DATA + 1, DATA + 0x800, LISTS, TABLES,
                                     16 * MiB - 512, 16 * MiB, 0xFEE00000, 0xFFFFF000,
                                     (1 << 64) - 512)),
                    st.integers(0, (1 << 64) - 1))
PRDT = st.lists(st.tuples(ADDRESS, st.one_of(st.integers(1, 0x2000),
                                             st.integers(1, 1 << 22))), max_size=4)
OPCODES = st.one_of(st.sampled_from(sorted(A.COMMANDS)), st.integers(0, 0xFF))
CDB = st.one_of(st.tuples(st.sampled_from(sorted(C.COMMANDS)),
                          st.binary(min_size=11, max_size=11)).map(lambda t: bytes([t[0]]) + t[1]),
                st.binary(min_size=12, max_size=12))
FIELD = st.one_of(st.integers(0, 16), st.integers(0, 0xFFFF), st.integers(0, (1 << 48) - 1))
COMMAND = st.tuples(st.just("command"), st.integers(0, 2), st.integers(0, 31), OPCODES,
                    FIELD, FIELD, st.integers(0, 0xFFFF), PRDT, CDB, st.booleans(),
                    st.sampled_from((F.FIS_REGISTER_H2D,) * 5 + (0x34, 0)))
REGISTER = st.tuples(st.just("register"), st.integers(0, 2),
                     st.sampled_from((P.REG_CLB, P.REG_FB, P.REG_IS, P.REG_IE, P.REG_CMD,
                                      P.REG_SCTL, P.REG_SERR, P.REG_SACT, P.REG_CI)),
                     st.one_of(st.integers(0, 0xFFFFFFFF),
                               st.sampled_from((P.CMD_FRE | P.CMD_ST, 1, 0, 0x21))))
HBA = st.tuples(st.just("hba"), st.sampled_from((H.REG_GHC, H.REG_IS, H.REG_CAP, 0x28)),
                st.integers(0, 0xFFFFFFFF))
OPERATIONS = st.lists(st.one_of(COMMAND, COMMAND, COMMAND, REGISTER, HBA), max_size=30)


def drive_randomly(driver, operations) -> None:
    for operation in operations:
        kind = operation[0]
        if kind == "command":
            _, port, slot, opcode, lba, features, count, prdt, packet, write, fis = operation
            cfis = bytearray(h2d(opcode, lba=lba, count=count, features=features))
            cfis[0] = fis
            driver.prepare(port, slot, bytes(cfis), prdt, packet if opcode == A.PACKET else b"",
                           write)
            if opcode in A.QUEUED:
                driver.set_port_reg(port, P.REG_SACT, 1 << slot)
            driver.issue(port, 1 << slot)
        elif kind == "register":
            driver.set_port_reg(operation[1], operation[2], operation[3])
        else:
            driver.set_reg(operation[1], operation[2])


def still_works(driver, disk) -> None:
    """After anything: an HBA reset, a started port, one write read back."""
    driver.set_reg(H.REG_GHC, H.GHC_HR)
    driver.start(0)
    data = os.urandom(4096)
    driver.vm.memory.write(DATA, data)
    assert driver.command(h2d(A.WRITE_DMA_EXT, lba=16, count=8), [(DATA, 4096)],
                          write=True)[0] & 0xFF == F.READY
    assert disk.read_bytes()[16 * 512:24 * 512] == data
    driver.vm.memory.write(DATA, bytes(4096))
    assert driver.command(h2d(A.READ_DMA_EXT, lba=16, count=8), [(DATA, 4096)])[0] \
        & 0xFF == F.READY
    assert driver.vm.memory.read(DATA, 4096) == data


@fuzz_settings(150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
def test_malformed_commands_and_registers_never_escape(disk, cdrom, errors_logged, operations):
    vm, device, driver = make("ahci", f"hd:{disk},cd:{cdrom}")
    try:
        driver.start(0)
        driver.start(1)
        drive_randomly(driver, operations)
        still_works(driver, disk)
    finally:
        vm.close()
    assert not errors_logged, errors_logged


def test_the_fuzz_check_catches_a_model_that_raises(disk, cdrom, errors_logged, monkeypatch):
    """The mutant the fuzz above must catch: a FLUSH that raises is logged at
    ERROR (the port then stops with a fatal error) and fails the checks."""
    def broken(port, command):
        raise RuntimeError("mutant")
    monkeypatch.setitem(A.COMMANDS, A.FLUSH_CACHE, broken)
    vm, device, driver = make("ahci", f"hd:{disk}")
    try:
        driver.start()
        driver.command(h2d(A.FLUSH_CACHE))
        assert errors_logged
        assert driver.port_reg(0, P.REG_TFD) & F.STATUS_ERR
    finally:
        vm.close()


# --- real clients: SeaBIOS boots from an AHCI CD-ROM and disk ---------------------------------
SECTOR2_TEXT = "SECTOR2: read through int 13h from an AHCI disk"
SEABIOS = "/usr/share/seabios/bios-256k.bin"


@pytest.fixture(scope="module")
def grub_iso(tmp_path_factory):
    from firmware import require_program
    from grubdisk import build_grub_iso
    require_program("xorriso", "xorriso")
    require_program("mformat", "mtools")
    mkrescue = require_program("grub-mkrescue", "grub-common")
    return build_grub_iso(tmp_path_factory.mktemp("ahci-iso"), mkrescue)


@pytest.fixture(scope="module")
def boot_disk(tmp_path_factory):
    from build import build_mbr_disk, missing_tools
    if missing_tools():
        pytest.skip(f"missing tools: {missing_tools()}")
    return build_mbr_disk(tmp_path_factory.mktemp("ahci-mbr") / "disk.img", SECTOR2_TEXT)


def seabios_on_pyhyve(tmp_path, emulation: str, image, name: str):
    """(serial console text, SeaBIOS's debug log, exit status)."""
    from firmware import require_file
    from guestrun import run_pyhyve
    seabios = require_file(SEABIOS, "seabios")
    console, log = tmp_path / "com1.txt", tmp_path / "seabios.log"
    proc = run_pyhyve(["-m", "128M", "-l", f"bootrom,{seabios}", "-l", f"com1,file={console}",
                       "-l", f"debugcon,file={log}", "-s", f"3,{emulation},{image}",
                       "-o", f"control.socket={tmp_path / 'ctl.sock'}", name], timeout=300)
    return console.read_text(errors="replace"), log.read_text(errors="replace"), proc


def seabios_on_qemu(image, device: str):
    from firmware import require_file, require_program
    seabios = require_file(SEABIOS, "seabios")
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    media = ",media=cdrom" if device == "ide-cd" else ""
    proc = subprocess.run(
        [qemu, "-machine", "pc", "-enable-kvm", "-m", "128", "-nodefaults", "-nographic",
         "-serial", "stdio", "-monitor", "none", "-bios", seabios,
         "-drive", f"file={image},format=raw,if=none,id=d{media}", "-device", "ahci,id=a",
         "-device", f"{device},drive=d,bus=a.0",
         "-device", "isa-debug-exit,iobase=0x404,iosize=2"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    return proc.stdout.decode(errors="replace"), proc


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_seabios_boots_grub_from_an_ahci_cd(grub_iso, tmp_path):
    from grubdisk import FILE_TEXT, MARKER
    text, debug, proc = seabios_on_pyhyve(tmp_path, "ahci-cd", grub_iso, "ahci-cd-seabios")
    assert MARKER in text and FILE_TEXT in text, (text[-2000:], proc.stderr)
    assert 'AHCI/0: registering: "DVD/CD [AHCI/0: PYHYVE SATA DVD ROM ATAPI-8 DVD/CD]"' \
        in debug, debug
    assert "Booting from DVD/CD..." in debug
    assert proc.returncode == 1                       # GRUB's halt powers off


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_qemu_boots_the_same_grub_cd_from_its_ahci(grub_iso):
    from grubdisk import FILE_TEXT, MARKER
    text, proc = seabios_on_qemu(grub_iso, "ide-cd")
    assert MARKER in text and FILE_TEXT in text, text[-2000:]


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_seabios_boots_from_an_ahci_disk(boot_disk, tmp_path):
    from test_nvme import MBR_TEXT
    text, debug, proc = seabios_on_pyhyve(tmp_path, "ahci-hd", boot_disk, "ahci-hd-seabios")
    assert MBR_TEXT in text and SECTOR2_TEXT in text, (text, proc.stderr)
    assert proc.returncode == 1                              # the MBR powered off
    assert re.search(r"AHCI/0: registering: \"AHCI/0: PYHYVE SATA DISK ATA-8 Hard-Disk "
                     r"\(1 MiBytes\)\"", debug), debug
    assert "Searching bootorder for: /pci@i0cf8/*@3/drive@0/disk@0" in debug


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_qemu_boots_the_same_ahci_disk(boot_disk):
    from test_nvme import MBR_TEXT
    text, proc = seabios_on_qemu(boot_disk, "ide-hd")
    assert MBR_TEXT in text and SECTOR2_TEXT in text, text
    assert proc.returncode == 1
