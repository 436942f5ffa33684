"""The `nvme` emulation driven as an NVMe driver drives it: config cycles to
find and enable BAR 0, the controller registers, admin and I/O queues laid
out in guest memory, doorbells, PRP lists, MSI-X and INTx; malformed
commands, PRPs and doorbells from hypothesis; snapshots.  Then real SeaBIOS
boots a boot sector from an NVMe disk, on pyhyve and on QEMU.  Linux's own
driver makes an ext2 filesystem on it in test_linux_storage.py."""

import json
import os
import re
import struct
import subprocess

import pytest
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from pyhyve.config import ConfigError
from pyhyve.lifecycle import StateError
from pyhyve.nvme import controller as N
from pyhyve.nvme import pages
from pyhyve.nvme.prp import DATA_TRANSFER_ERROR, PAGE, PRP_OFFSET_INVALID
from nvmedriver import (ACQ, ASQ, CC_ENABLE, DATA, IOCQ, IOSQ, LISTS, MSI_ADDRESS, SLOT, MiB,
                        NvmeDriver, NvmeVm)
from pyhyve.pci import emulations
from pyhyve.pci import regs as R

DISK_SIZE = 4 * MiB
@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


def make(path, **options):
    vm = NvmeVm()
    device = vm.pci.add(SLOT, 0, emulations()["nvme"], {"path": str(path), **options})
    return vm, device, NvmeDriver(vm, device)


@pytest.fixture
def nvme(disk):
    vm, device, driver = make(disk)
    yield driver
    vm.close()


def ready(driver, **queues) -> None:
    assert driver.enable() & N.CSTS_RDY
    driver.create_io_queues(**queues)


# --- the PCI function and the registers ------------------------------------------------------
def test_pci_identity_bars_and_capabilities(nvme):
    assert nvme.cfg(R.VENDOR_ID, 2) == N.VENDOR_ID
    assert nvme.cfg(R.CLASS_PROG, 1) == 0x02 and nvme.cfg(R.CLASS_PROG + 1, 2) == 0x0108
    assert nvme.cfg(R.BAR0, 4) & 0x6 == R.BAR_MEM_TYPE_64
    assert nvme.cfg(R.INTERRUPT_PIN, 1) == 1
    assert nvme.device.msix.vectors == 17 and nvme.device.msix.bar_index == 4
    # sizing BAR 0: 16 KiB
    nvme.cfg_write(R.BAR0, 4, 0xFFFFFFFF)
    assert (~nvme.cfg(R.BAR0, 4) | 0xF) & 0xFFFFFFFF == N.BAR0_SIZE - 1


def test_capabilities_version_and_a_qword_read(nvme):
    cap = nvme.reg(N.REG_CAP, 8)
    assert cap & 0xFFFF == 2047                     # MQES: qsz 2048, 0's based
    assert cap >> 16 & 1                            # CQR
    assert (cap >> 24) & 0xFF == N.CAP_TIMEOUT
    assert (cap >> 32) & 0xF == 0                   # DSTRD
    assert cap >> 37 & 1                            # CSS: NVM
    assert nvme.reg(N.REG_CAP) | nvme.reg(N.REG_CAP + 4) << 32 == cap
    assert nvme.reg(N.REG_VS) == 0x00010400


def test_options_set_mqes_and_queue_limits(disk):
    vm, device, driver = make(disk, qsz="64", maxq="2")
    try:
        assert driver.reg(N.REG_CAP) & 0xFFFF == 63
        assert device.msix.vectors == 3
        assert driver.enable() & N.CSTS_RDY
        status, _ = driver.admin(N.ADMIN_CREATE_CQ, prp1=IOCQ, cdw=(64 << 16 | 1, 1))
        assert status == N.INVALID_QUEUE_SIZE        # 65 entries
        status, _ = driver.admin(N.ADMIN_CREATE_CQ, prp1=IOCQ, cdw=(63 << 16 | 3, 1))
        assert status == N.INVALID_QUEUE_ID          # qid above maxq
        status, _ = driver.admin(N.ADMIN_CREATE_CQ, prp1=IOCQ, cdw=(7 << 16 | 1, 3 << 16 | 3))
        assert status == N.INVALID_VECTOR
        status, value = driver.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_QUEUES, 0x00070007))
        assert status == N.SUCCESS and value == 0x00010001
    finally:
        vm.close()


def test_enable_disable_and_shutdown(nvme):
    assert nvme.enable() & (N.CSTS_RDY | N.CSTS_CFS) == N.CSTS_RDY
    nvme.create_io_queues()
    nvme.set_reg(N.REG_CC, CC_ENABLE | 1 << 14)         # normal shutdown
    assert nvme.reg(N.REG_CSTS) & 0xC == N.CSTS_SHST_COMPLETE
    nvme.set_reg(N.REG_CC, 0)
    assert nvme.reg(N.REG_CSTS) == 0
    assert nvme.device.sqs == {} and nvme.device.cqs == {}
    assert nvme.reg(N.REG_ASQ, 8) == ASQ                # AQA, ASQ, ACQ survive a reset


def test_enable_with_admin_queues_outside_ram_is_a_fatal_status(nvme, caplog):
    nvme.set_reg(N.REG_AQA, 0x000F000F)
    nvme.set_reg(N.REG_ASQ, 0xF0000000, 8)
    nvme.set_reg(N.REG_ACQ, ACQ, 8)
    nvme.set_reg(N.REG_CC, CC_ENABLE)
    assert nvme.reg(N.REG_CSTS) & (N.CSTS_RDY | N.CSTS_CFS) == N.CSTS_CFS
    assert nvme.enable() & (N.CSTS_RDY | N.CSTS_CFS) == N.CSTS_RDY


# --- admin commands ---------------------------------------------------------------------------
def test_identify_controller(disk):
    vm, device, driver = make(disk, ser="pyhyve-serial")
    try:
        driver.enable()
        status, page = driver.identify(N.CNS_CONTROLLER)
        assert status == N.SUCCESS
        assert struct.unpack_from("<H", page, 0)[0] == N.VENDOR_ID
        assert page[4:24] == b"pyhyve-serial".ljust(20)
        assert page[24:64].rstrip() == b"pyhyve-NVMe"
        assert page[77] == N.MDTS
        assert struct.unpack_from("<I", page, 80)[0] == 0x00010400
        assert page[512] == 0x66 and page[513] == 0x44
        assert struct.unpack_from("<I", page, 516)[0] == 1                    # NN
        assert struct.unpack_from("<H", page, 520)[0] & pages.ONCS_WRITE_ZEROES
        assert page[525] & 1                                                 # VWC
        assert page[768:].startswith(b"nqn.2014-08.org.nvmexpress:")
    finally:
        vm.close()


def test_identify_namespace_lists_and_descriptors(disk):
    vm, device, driver = make(disk, sectsz="4096", eui64="0x0102030405060708")
    try:
        driver.enable()
        status, page = driver.identify(N.CNS_NAMESPACE, nsid=1)
        assert status == N.SUCCESS
        assert struct.unpack_from("<QQQ", page, 0) == (DISK_SIZE // 4096,) * 3
        assert page[128:132] == struct.pack("<I", 12 << 16)                   # LBADS 12
        assert page[120:128] == bytes(range(1, 9))
        assert page[99] == 0                                                   # writable
        assert driver.identify(N.CNS_NAMESPACE, nsid=2)[0] == N.INVALID_NAMESPACE
        status, page = driver.identify(N.CNS_ACTIVE_LIST, nsid=0)
        assert status == N.SUCCESS and page[:8] == struct.pack("<II", 1, 0)
        assert driver.identify(N.CNS_ACTIVE_LIST, nsid=1)[1][:4] == bytes(4)
        status, page = driver.identify(N.CNS_DESCRIPTORS, nsid=1)
        assert status == N.SUCCESS and page[:12] == bytes([1, 8, 0, 0]) + bytes(range(1, 9))
        assert driver.identify(0x55)[0] == N.INVALID_FIELD
    finally:
        vm.close()


def test_features(nvme):
    nvme.enable()
    status, value = nvme.admin(N.ADMIN_GET_FEATURES, cdw=(N.FEATURE_QUEUES,))
    assert status == N.SUCCESS and value == 0x000F000F                    # maxq 16
    assert nvme.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_QUEUES, 0x00030001)) == \
        (N.SUCCESS, 0x00030001)
    assert nvme.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_QUEUES, 0xFFFF)) == \
        (N.INVALID_FIELD, 0)
    assert nvme.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_WRITE_CACHE, 0))[0] == N.SUCCESS
    assert nvme.admin(N.ADMIN_GET_FEATURES, cdw=(N.FEATURE_WRITE_CACHE,)) == (N.SUCCESS, 0)
    assert nvme.admin(N.ADMIN_GET_FEATURES, cdw=(N.FEATURE_WRITE_CACHE | 1 << 8,)) == \
        (N.SUCCESS, 1)                                                    # the default
    assert nvme.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_COALESCING, 0x0105))[0] == \
        N.SUCCESS
    assert nvme.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_ASYNC_EVENTS, 0x1FF))[0] == \
        N.SUCCESS
    assert nvme.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_ARBITRATION | 1 << 31, 0))[0] \
        == N.NOT_SAVEABLE
    assert nvme.admin(N.ADMIN_SET_FEATURES, cdw=(0x7F, 0))[0] == N.INVALID_FIELD
    assert nvme.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_POWER, 3))[0] == N.INVALID_FIELD


def test_log_pages(nvme):
    ready(nvme)
    assert nvme.io(N.IO_READ, 0, 8) == N.SUCCESS
    status, _ = nvme.admin(N.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw=(N.LOG_SMART | 127 << 16,))
    assert status == N.SUCCESS
    smart = nvme.vm.memory.read(DATA, 512)
    assert smart[3] == 100                                              # spare left
    assert int.from_bytes(smart[32:48], "little") == 1                 # 4 KiB: 1 unit
    assert int.from_bytes(smart[64:80], "little") == 1                 # one read
    status, _ = nvme.admin(N.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw=(N.LOG_FIRMWARE | 127 << 16,))
    assert status == N.SUCCESS and nvme.vm.memory.read(DATA, 16) == b"\x01" + bytes(7) + \
        b"1.0".ljust(8)
    assert nvme.admin(N.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw=(N.LOG_ERROR | 15 << 16,))[0] == \
        N.SUCCESS
    assert nvme.admin(N.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw=(0x70 | 15 << 16,))[0] == \
        N.INVALID_LOG_PAGE
    assert nvme.admin(N.ADMIN_GET_LOG_PAGE, prp1=DATA, cdw=(N.LOG_SMART | 15 << 16, 0,
                                                           4096))[0] == N.INVALID_FIELD


def test_queue_creation_and_deletion_rules(nvme):
    nvme.enable()
    assert nvme.admin(N.ADMIN_CREATE_SQ, prp1=IOSQ, cdw=(15 << 16 | 1, 1 << 16 | 1))[0] == \
        N.INVALID_CQ                                                     # no CQ 1 yet
    assert nvme.admin(N.ADMIN_CREATE_CQ, prp1=IOCQ, cdw=(15 << 16 | 1, 0))[0] == \
        N.INVALID_FIELD                                                  # not contiguous
    assert nvme.admin(N.ADMIN_CREATE_CQ, prp1=IOCQ + 8, cdw=(15 << 16 | 1, 1))[0] == \
        N.INVALID_FIELD                                                  # not page aligned
    assert nvme.admin(N.ADMIN_CREATE_CQ, prp1=0xF0000000, cdw=(15 << 16 | 1, 1))[0] == \
        N.INVALID_FIELD                                                  # not RAM
    assert nvme.admin(N.ADMIN_CREATE_CQ, prp1=IOCQ, cdw=(0 << 16 | 1, 1))[0] == \
        N.INVALID_QUEUE_SIZE                                             # one entry
    nvme.create_io_queues()
    assert nvme.admin(N.ADMIN_CREATE_CQ, prp1=IOCQ, cdw=(15 << 16 | 1, 1))[0] == \
        N.INVALID_QUEUE_ID                                               # exists
    assert nvme.admin(N.ADMIN_DELETE_CQ, cdw=(1,))[0] == N.INVALID_QUEUE_DELETION
    assert nvme.admin(N.ADMIN_DELETE_SQ, cdw=(1,))[0] == N.SUCCESS
    assert nvme.admin(N.ADMIN_DELETE_SQ, cdw=(1,))[0] == N.INVALID_QUEUE_ID
    assert nvme.admin(N.ADMIN_DELETE_CQ, cdw=(1,))[0] == N.SUCCESS
    assert nvme.admin(N.ADMIN_DELETE_CQ, cdw=(0,))[0] == N.INVALID_QUEUE_ID


def test_async_events_are_held_and_abort_completes_them(nvme):
    nvme.enable()
    held = [nvme.submit(0, N.ADMIN_ASYNC_EVENT) for _ in range(4)]
    assert nvme.completions(0) == []
    cid = nvme.submit(0, N.ADMIN_ASYNC_EVENT)
    assert [(entry[3], entry[4]) for entry in nvme.completions(0)] == \
        [(cid, N.ASYNC_EVENT_LIMIT)]
    cid = nvme.submit(0, N.ADMIN_ABORT, cdw=(held[1] << 16,))
    done = {entry[3]: entry for entry in nvme.completions(0)}
    assert done[held[1]][4] == N.ABORT_REQUESTED
    assert done[cid][4] == N.SUCCESS and done[cid][0] == 0              # aborted
    assert nvme.admin(N.ADMIN_ABORT, cdw=(0x1234 << 16,)) == (N.SUCCESS, 1)
    assert nvme.admin(N.ADMIN_KEEP_ALIVE) == (N.INVALID_OPCODE, 0)
    assert nvme.admin(0xC1) == (N.INVALID_OPCODE, 0)
    nvme.enable()                                                       # a reset drops them
    assert nvme.device.aers == []


# --- I/O ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset,length", [(0, 512), (0, 8192), (512, 4096 * 3),
                                           (0, 1 * MiB), (0x800, 1 * MiB - 0x800)])
def test_write_and_read_through_prp_lists(disk, nvme, offset, length):
    ready(nvme)
    data = os.urandom(length)
    address = DATA + offset
    nvme.vm.memory.write(address, data)
    prp1, prp2 = nvme.prp_for(address, length)
    assert nvme.io(N.IO_WRITE, 24, length // 512, prp1, prp2) == N.SUCCESS
    assert disk.read_bytes()[24 * 512:24 * 512 + length] == data
    nvme.vm.memory.write(address, bytes(length))
    assert nvme.io(N.IO_READ, 24, length // 512, prp1, prp2) == N.SUCCESS
    assert nvme.vm.memory.read(address, length) == data


def test_prp_list_chained_over_list_pages(disk, nvme):
    """A list whose first page ends one entry short: its last slot chains on."""
    ready(nvme)
    data = os.urandom(5 * PAGE)
    nvme.vm.memory.write(DATA, data)
    entries = [DATA + PAGE * i for i in range(1, 5)]
    list_at = LISTS + PAGE - 16                                   # two slots left
    nvme.vm.memory.write(list_at, struct.pack("<QQ", entries[0], LISTS + 2 * PAGE))
    nvme.vm.memory.write(LISTS + 2 * PAGE, struct.pack("<3Q", *entries[1:]))
    assert nvme.io(N.IO_WRITE, 0, 40, DATA, list_at) == N.SUCCESS
    assert disk.read_bytes()[:5 * PAGE] == data


def test_bad_prps_and_ranges_get_a_status(disk, nvme):
    ready(nvme)
    before = disk.read_bytes()
    assert nvme.io(N.IO_READ, 0, 1, prp1=0xF0000000) == DATA_TRANSFER_ERROR
    assert nvme.io(N.IO_READ, 0, 16, prp1=DATA, prp2=0xF0000000) == DATA_TRANSFER_ERROR
    assert nvme.io(N.IO_READ, 0, 16, prp1=DATA, prp2=DATA + PAGE + 8) == PRP_OFFSET_INVALID
    assert nvme.io(N.IO_READ, 0, 1, prp1=DATA + 2) == PRP_OFFSET_INVALID
    assert nvme.io(N.IO_READ, 0, 24, prp1=DATA, prp2=LISTS + 4) == PRP_OFFSET_INVALID
    nvme.vm.memory.write(LISTS, struct.pack("<QQ", DATA + PAGE, 0xFFFFF000))
    assert nvme.io(N.IO_READ, 0, 24, prp1=DATA, prp2=LISTS) == DATA_TRANSFER_ERROR
    # a list whose last slot names the list itself ends when the data does
    loop = LISTS + PAGE - 24
    nvme.vm.memory.write(loop, struct.pack("<QQQ", DATA, DATA, loop))
    assert nvme.io(N.IO_READ, 0, 2040, prp1=DATA, prp2=loop) == N.SUCCESS     # 254 entries
    blocks = DISK_SIZE // 512
    assert nvme.io(N.IO_READ, blocks - 1, 2) == N.LBA_OUT_OF_RANGE
    assert nvme.io(N.IO_READ, (1 << 64) - 1, 1) == N.LBA_OUT_OF_RANGE
    assert nvme.io(N.IO_READ, 0, 4096) == N.INVALID_FIELD                # above MDTS
    assert nvme.io(N.IO_READ, 0, 1, nsid=2) == N.INVALID_NAMESPACE
    assert nvme.io(0x7E, 0, 1) == N.INVALID_OPCODE
    assert nvme.command(1, N.IO_READ, nsid=1, prp1=DATA, flags=0x40)[0] == N.INVALID_FIELD
    assert disk.read_bytes() == before


def test_flush_write_zeroes_and_deallocate(disk, nvme):
    ready(nvme)
    assert nvme.command(1, N.IO_FLUSH, nsid=1) == (N.SUCCESS, 0)
    assert nvme.command(1, N.IO_FLUSH, nsid=0xFFFFFFFF) == (N.SUCCESS, 0)
    assert nvme.io(N.IO_WRITE_ZEROES, 8, 8) == N.SUCCESS
    assert disk.read_bytes()[8 * 512:16 * 512] == bytes(4096)
    nvme.vm.memory.write(DATA, struct.pack("<IIQIIQ", 0, 16, 100, 0, 8, 2000))
    assert nvme.command(1, N.IO_DSM, nsid=1, prp1=DATA, cdw=(1, N.DSM_DEALLOCATE))[0] == \
        N.SUCCESS
    image = disk.read_bytes()
    assert image[100 * 512:116 * 512] == bytes(16 * 512)
    assert image[2000 * 512:2008 * 512] == bytes(8 * 512)
    assert image[116 * 512:117 * 512] != bytes(512)
    nvme.vm.memory.write(DATA, struct.pack("<IIQ", 0, 16, DISK_SIZE // 512 - 8))
    assert nvme.command(1, N.IO_DSM, nsid=1, prp1=DATA, cdw=(0, N.DSM_DEALLOCATE))[0] == \
        N.LBA_OUT_OF_RANGE


@pytest.mark.parametrize("dsm,offered", [("enable", True), ("disable", False)])
def test_dsm_option(disk, dsm, offered):
    vm, device, driver = make(disk, dsm=dsm)
    try:
        ready(driver)
        _, page = driver.identify(N.CNS_CONTROLLER)
        assert bool(struct.unpack_from("<H", page, 520)[0] & pages.ONCS_DSM) == offered
        driver.vm.memory.write(DATA, struct.pack("<IIQ", 0, 8, 0))
        status, _ = driver.command(1, N.IO_DSM, nsid=1, prp1=DATA, cdw=(0, N.DSM_DEALLOCATE))
        assert status == (N.SUCCESS if offered else N.INVALID_OPCODE)
        assert (disk.read_bytes()[:4096] == bytes(4096)) == offered
    finally:
        vm.close()


def test_read_only_namespace_is_write_protected(disk):
    before = disk.read_bytes()
    vm, device, driver = make(disk, ro="true")
    try:
        ready(driver)
        _, page = driver.identify(N.CNS_NAMESPACE, nsid=1)
        assert page[99] & pages.NSATTR_WRITE_PROTECTED
        assert driver.io(N.IO_WRITE, 0, 1) == N.WRITE_PROTECTED
        assert driver.io(N.IO_WRITE_ZEROES, 0, 1) == N.INVALID_OPCODE
        assert driver.io(N.IO_READ, 0, 8) == N.SUCCESS
        assert vm.memory.read(DATA, 4096) == before[:4096]
    finally:
        vm.close()
    assert disk.read_bytes() == before


def test_phase_tags_wrap_and_a_full_completion_queue_waits(nvme):
    """A 4-entry CQ holds 3 completions: the rest wait for the head doorbell; the
    phase tag flips on each wrap, and SQ head follows the commands taken."""
    nvme.enable()
    nvme.create_io_queues(entries=4)
    for _ in range(3):
        nvme.submit(1, N.IO_FLUSH, nsid=1, ring=False)
    nvme.ring(1)
    done = nvme.completions(1, acknowledge=False)
    assert [entry[1] for entry in done] == [1, 2, 3] and len(done) == 3
    cids = [nvme.submit(1, N.IO_FLUSH, nsid=1) for _ in range(3)]
    assert nvme.completions(1, acknowledge=False) == []           # the CQ is full
    nvme.set_reg(N.DOORBELLS + 12, nvme.queues[1]["head"])        # consumed: room again
    done = nvme.completions(1)
    assert [entry[3] for entry in done] == cids
    assert all(entry[4] == N.SUCCESS for entry in done)
    for round_ in range(5):
        assert nvme.io(N.IO_READ, round_, 1) == N.SUCCESS


def test_msix_vector_per_completion_queue(nvme):
    nvme.cfg_write(nvme.device.msix.offset + 2, 2, 0x8000)        # MSI-X on
    table = nvme.device.bars[4].address
    for vector in (0, 2):
        nvme.vm.mmio_write(table + 16 * vector, 4, MSI_ADDRESS)
        nvme.vm.mmio_write(table + 16 * vector + 8, 4, 0x40 + vector)
        nvme.vm.mmio_write(table + 16 * vector + 12, 4, 0)
    ready(nvme, vector=2)
    assert nvme.vm.msis and set(nvme.vm.msis) == {(MSI_ADDRESS, 0x40)}
    nvme.vm.msis.clear()
    assert nvme.io(N.IO_READ, 0, 1) == N.SUCCESS
    assert nvme.vm.msis == [(MSI_ADDRESS, 0x42)]
    assert not nvme.device.intx_asserted


def test_intx_follows_unconsumed_completions_and_intms(nvme):
    nvme.enable()
    nvme.submit(0, N.ADMIN_GET_FEATURES, cdw=(N.FEATURE_QUEUES,))
    assert nvme.device.intx_asserted
    nvme.set_reg(N.REG_INTMS, 1)
    assert not nvme.device.intx_asserted and nvme.reg(N.REG_INTMC) == 1
    nvme.set_reg(N.REG_INTMC, 1)
    assert nvme.device.intx_asserted
    nvme.completions(0)                                           # head doorbell
    assert not nvme.device.intx_asserted
    nvme.create_io_queues(ien=False, vector=0)
    assert nvme.io(N.IO_READ, 0, 1) == N.SUCCESS
    assert not nvme.device.intx_asserted                          # IEN clear


def test_doorbells_that_name_nothing_are_ignored(nvme):
    nvme.set_reg(N.DOORBELLS, 1)                                  # not enabled yet
    ready(nvme)
    for offset, value in ((N.DOORBELLS + 8 * 5, 1), (N.DOORBELLS + 8, 999),
                          (N.DOORBELLS + 12, 16), (N.BAR0_SIZE - 4, 3)):
        nvme.set_reg(offset, value)
    nvme.set_reg(N.REG_CC, 0xFF, 1)                               # byte write: ignored
    nvme.set_reg(N.REG_CC, 0xFFFF, 2)
    assert nvme.reg(N.REG_CSTS) & (N.CSTS_RDY | N.CSTS_CFS) == N.CSTS_RDY
    assert nvme.io(N.IO_READ, 0, 1) == N.SUCCESS


def test_bad_options_are_one_line_config_errors(disk, tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(bytes(100))
    for options, message in (
            ({"path": str(small)}, "smaller than one 512-byte block"),
            ({"path": str(disk), "sectsz": "1024"}, "sectsz 1024 is not 512 or 4096"),
            ({"path": str(disk), "dsm": "maybe"}, "dsm 'maybe'"),
            ({"path": str(disk), "maxq": "0"}, "maxq: 0 is outside"),
            ({"path": str(disk), "qsz": "70000"}, "qsz: 70000 is outside"),
            ({"path": str(disk), "ser": "x" * 21}, "at most 20"),
            ({"path": str(disk), "eui64": str(1 << 64)}, "eui64"),
            ({}, "no disk path"),
            ({"path": str(tmp_path / "missing.img")}, "no such file")):
        vm = NvmeVm()
        try:
            with pytest.raises(ConfigError, match=re.escape(message)):
                vm.pci.add(SLOT, 0, emulations()["nvme"], options)
        finally:
            vm.close()


def test_legacy_options_take_the_path_first():
    cls = emulations()["nvme"]
    assert cls.legacy_options("/d.img,maxq=4,ro") == {"path": "/d.img", "maxq": "4",
                                                     "ro": "true"}


# --- snapshots ---------------------------------------------------------------------------------
def test_save_restore_save_unchanged_and_work_goes_on(disk):
    vm, device, driver = make(disk)
    try:
        ready(driver, entries=8)
        aer = driver.submit(0, N.ADMIN_ASYNC_EVENT)
        for lba in range(5):
            assert driver.io(N.IO_READ, lba, 1) == N.SUCCESS
        driver.admin(N.ADMIN_SET_FEATURES, cdw=(N.FEATURE_WRITE_CACHE, 0))
        with device.quiesce():
            state = json.loads(json.dumps(device.save_state()))
        memory = vm.memory.read(0, 4 * MiB)
    finally:
        vm.close()
    vm, device, _ = make(disk)
    try:
        vm.memory.write(0, memory)
        device.restore_state(state)
        assert json.loads(json.dumps(device.save_state())) == state
        assert device.aers == [aer] and device.features[N.FEATURE_WRITE_CACHE] == 0
        driver.vm, driver.device = vm, device
        data = os.urandom(512)
        vm.memory.write(DATA, data)
        assert driver.io(N.IO_WRITE, 7, 1) == N.SUCCESS          # queue positions kept
        assert disk.read_bytes()[7 * 512:8 * 512] == data
        abort = driver.submit(0, N.ADMIN_ABORT, cdw=(aer << 16,))
        assert {entry[3]: entry[4] for entry in driver.completions(0)} == \
            {aer: N.ABORT_REQUESTED, abort: N.SUCCESS}
    finally:
        vm.close()


@pytest.mark.parametrize("path,value", [
    (("cc",), 1 << 30), (("csts",), 0x40), (("asq",), 0x123), (("features",), {}),
    (("aers",), [1] * 9), (("sqs",), [[1, 0x102000, 16, 0, 0, 1]]),
    (("cqs",), [[1, 0x103000, 16, 16, 0, 1, 1, True]]),
    (("cqs",), [[1, 0x103000, 16, 0, 0, 1, 99, True]]),
    (("cqs",), [[0, 0, 16, 0, 0, 1, 0, True], [0, 0, 16, 0, 0, 1, 0, True]]),
    (("cqs",), [[1, 0xF0000000, 16, 0, 0, 1, 1, True]]),
    (("stats",), [1, 2]), (("intms",), -1)])
def test_restore_refuses_state_that_does_not_fit(disk, path, value):
    vm, device, driver = make(disk)
    try:
        state = json.loads(json.dumps(device.save_state()))
        state["nvme"][path[0]] = value
        with pytest.raises(StateError):
            device.restore_state(state)
        assert device.save_state()["nvme"]["cc"] == 0
    finally:
        vm.close()


# --- malformed traffic from hypothesis ---------------------------------------------------------
ADDRESS = st.one_of(st.sampled_from((0, DATA, DATA + 4, DATA + 0x800, LISTS, LISTS + 8,
                                     16 * MiB - PAGE, 16 * MiB, 0xFEE00000, 0xFFFFF000,
                                     (1 << 64) - PAGE)),
                    st.integers(0, (1 << 64) - 1))
DWORD = st.one_of(st.integers(0, 16), st.integers(0, 0xFFFFFFFF), st.sampled_from(
    (0, 1, 7, 0xFF, 0xFFFF, 0x10000, 0x7F0001, 0xFFFFFFFF)))
SMALL = st.one_of(st.integers(0, 40), DWORD)
NSID = st.one_of(st.just(1), st.sampled_from((0, 2, 0xFFFFFFFF)), st.integers(0, 0xFFFFFFFF))
FLAGS = st.sampled_from((0, 0, 0, 0, 0, 0x01, 0x40, 0xFF))


def command_of(qid: int, opcodes, cdw10=DWORD, cdw11=DWORD, cdw12=DWORD):
    """("command", qid, opcode, flags, nsid, prp1, prp2, cdw10..15): mostly the
    commands the controller knows, with fields near what they check, so the
    checks behind the opcode and namespace (ranges, PRPs, queue rules) are reached."""
    return st.tuples(st.just("command"), st.just(qid), st.sampled_from(opcodes), FLAGS, NSID,
                     ADDRESS, ADDRESS, st.tuples(cdw10, cdw11, cdw12, DWORD, DWORD, DWORD))


COMMAND = st.one_of(
    command_of(0, (N.ADMIN_IDENTIFY,), cdw10=st.one_of(st.integers(0, 3), DWORD)),
    command_of(0, (N.ADMIN_GET_LOG_PAGE,), cdw10=st.tuples(st.integers(0, 4), SMALL).map(
        lambda t: t[0] | (t[1] & 0xFFFF) << 16), cdw12=SMALL),
    command_of(0, (N.ADMIN_CREATE_CQ, N.ADMIN_CREATE_SQ, N.ADMIN_DELETE_CQ,
                   N.ADMIN_DELETE_SQ), cdw10=st.tuples(st.integers(0, 20), SMALL).map(
        lambda t: t[0] | (t[1] & 0xFFFF) << 16), cdw11=SMALL),
    command_of(0, (N.ADMIN_GET_FEATURES, N.ADMIN_SET_FEATURES, N.ADMIN_ABORT,
                   N.ADMIN_ASYNC_EVENT), cdw10=SMALL, cdw11=SMALL),
    command_of(1, (N.IO_READ, N.IO_WRITE, N.IO_WRITE_ZEROES, N.IO_FLUSH),
               cdw10=st.integers(0, DISK_SIZE // 512 + 8), cdw11=st.sampled_from((0, 0, 1)),
               cdw12=st.one_of(st.integers(0, 300), DWORD)),
    command_of(1, (N.IO_DSM,), cdw10=st.integers(0, 4), cdw11=st.sampled_from((4, 0, 7))),
    st.tuples(st.just("command"), st.sampled_from((0, 1)), st.integers(0, 0xFF), FLAGS, NSID,
              ADDRESS, ADDRESS, st.tuples(DWORD, DWORD, DWORD, DWORD, DWORD, DWORD)))
DOORBELL = st.tuples(st.just("doorbell"), st.integers(0, 40), st.booleans(),
                     st.integers(0, 0xFFFFFFFF))
REGISTER = st.tuples(st.just("register"), st.sampled_from(
                         (N.REG_INTMS, N.REG_INTMC, N.REG_CC, N.REG_AQA, N.REG_ASQ,
                          N.REG_ASQ + 4, N.REG_ACQ, N.REG_NSSR, N.REG_CSTS)),
                     st.one_of(DWORD, st.sampled_from((CC_ENABLE, 0, CC_ENABLE | 1 << 14))))
LIST = st.tuples(st.just("list"), st.integers(0, 511), ADDRESS)
OPERATIONS = st.lists(st.one_of(COMMAND, COMMAND, COMMAND, COMMAND, DOORBELL, REGISTER,
                                LIST, LIST), max_size=40)


def drive_randomly(driver, operations) -> None:
    for operation in operations:
        kind = operation[0]
        if kind == "command":
            _, qid, opcode, flags, nsid, prp1, prp2, cdw = operation
            if qid in driver.queues:
                driver.submit(qid, opcode, nsid=nsid, prp1=prp1, prp2=prp2, cdw=cdw,
                              flags=flags)
                driver.completions(qid)
        elif kind == "doorbell":
            _, qid, head, value = operation
            driver.set_reg(N.DOORBELLS + 8 * qid + 4 * head, value)
        elif kind == "register":
            driver.set_reg(operation[1], operation[2])
        else:
            driver.vm.memory.write(LISTS + 8 * operation[1], struct.pack("<Q", operation[2]))


def still_works(driver, disk) -> None:
    """After anything: a reset, new queues, one write read back."""
    assert driver.enable() & (N.CSTS_RDY | N.CSTS_CFS) == N.CSTS_RDY
    driver.create_io_queues()
    data = os.urandom(4096)
    driver.vm.memory.write(DATA, data)
    assert driver.io(N.IO_WRITE, 16, 8) == N.SUCCESS
    assert disk.read_bytes()[16 * 512:24 * 512] == data
    driver.vm.memory.write(DATA, bytes(4096))
    assert driver.io(N.IO_READ, 16, 8) == N.SUCCESS
    assert driver.vm.memory.read(DATA, 4096) == data


@fuzz_settings(150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS, started=st.sampled_from((True, True, True, False)))
def test_malformed_commands_prps_and_doorbells_never_escape(disk, errors_logged, operations,
                                                            started):
    vm, device, driver = make(disk)
    try:
        if started:
            ready(driver)
        drive_randomly(driver, operations)
        still_works(driver, disk)
    finally:
        vm.close()
    assert not errors_logged, errors_logged


def test_the_fuzz_check_catches_a_controller_that_raises(disk, errors_logged, monkeypatch):
    """The mutant the fuzz above must catch: an Identify that raises is logged at
    ERROR (the controller then reports a fatal status) and fails the checks."""
    def broken(self, command):
        raise RuntimeError("mutant")
    monkeypatch.setitem(N.ADMIN_COMMANDS, N.ADMIN_IDENTIFY, broken)
    vm, device, driver = make(disk)
    try:
        driver.enable()
        driver.submit(0, N.ADMIN_IDENTIFY, prp1=DATA, cdw=(1,))
        assert errors_logged
        assert driver.reg(N.REG_CSTS) & N.CSTS_CFS
    finally:
        vm.close()


# --- a real client: SeaBIOS boots from an NVMe disk -----------------------------------------
MBR_TEXT = "MBR: hello from the boot sector"
SECTOR2_TEXT = "SECTOR2: read through int 13h from an NVMe namespace"
SEABIOS_NVME = "/usr/share/seabios/bios-256k.bin"     # bios.bin (128 KiB) has no NVMe driver


@pytest.fixture(scope="module")
def boot_disk(tmp_path_factory):
    from build import build_mbr_disk, missing_tools
    if missing_tools():
        pytest.skip(f"missing tools: {missing_tools()}")
    return build_mbr_disk(tmp_path_factory.mktemp("nvme-mbr") / "disk.img", SECTOR2_TEXT)


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_seabios_boots_from_nvme(boot_disk, tmp_path):
    from firmware import require_file
    from guestrun import run_pyhyve
    seabios = require_file(SEABIOS_NVME, "seabios")
    console, log = tmp_path / "com1.txt", tmp_path / "seabios.log"
    proc = run_pyhyve(["-m", "128M", "-l", f"bootrom,{seabios}", "-l", f"com1,file={console}",
                       "-l", f"debugcon,file={log}", "-s", f"2,nvme,{boot_disk}",
                       "-o", f"control.socket={tmp_path / 'ctl.sock'}", "nvme-seabios"],
                      timeout=120)
    text = console.read_text(errors="replace")
    assert MBR_TEXT in text and SECTOR2_TEXT in text, (text, proc.stderr)
    assert proc.returncode == 1                              # the MBR powered off
    debug = log.read_text(errors="replace")
    assert "Searching bootorder for: /pci@i0cf8/*@2" in debug
    assert re.search(r"drive 0x[0-9a-f]+: PCHS=0/0/0 translation=lba .* s=2048", debug), debug


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_qemu_boots_the_same_nvme_disk(boot_disk):
    from firmware import require_file, require_program
    seabios = require_file(SEABIOS_NVME, "seabios")
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    proc = subprocess.run(
        [qemu, "-machine", "pc", "-enable-kvm", "-m", "128", "-nodefaults", "-nographic",
         "-serial", "stdio", "-monitor", "none", "-bios", seabios,
         "-drive", f"file={boot_disk},format=raw,if=none,id=d",
         "-device", "nvme,drive=d,serial=x",
         "-device", "isa-debug-exit,iobase=0x404,iosize=2"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    text = proc.stdout.decode(errors="replace")
    assert MBR_TEXT in text and SECTOR2_TEXT in text
    assert proc.returncode == 1
