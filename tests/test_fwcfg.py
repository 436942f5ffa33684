"""fw_cfg as SeaBIOS drives it: the port interface, the file directory, DMA, -f."""

import logging
import mmap
import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakevm import FakeVm
from fuzzing import fuzz_settings
from pyhyve.config import ConfigError
from pyhyve.devices.fwcfg import (
    DMA_CTL_ERROR, DMA_CTL_READ, DMA_CTL_SELECT, DMA_CTL_SKIP, DMA_CTL_WRITE,
    E820_RAM, E820_RESERVED, FW_CFG_BOOT_MENU, FW_CFG_FILE_DIR, FW_CFG_ID,
    FW_CFG_MAX_CPUS, FW_CFG_NB_CPUS, FW_CFG_NOGRAPHIC, FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE, FW_CFG_UUID, FW_CFG_WRITE_CHANNEL, FwCfg, e820_table,
    parse_fw_cfg_option)
from pyhyve.layout import MiB

SELECTOR, DATA, DMA_HIGH, DMA_LOW = 0x510, 0x511, 0x514, 0x518
DESCRIPTOR = 0x1000             # where the tests put DMA descriptors
BUFFER = 0x2000                 # and where DMA reads land


def be32_as_outl(value: int) -> int:
    """What `outl(cpu_to_be32(value))` puts on the bus, as SeaBIOS writes it."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def select(vm, key: int) -> None:
    vm.port_write(SELECTOR, 2, key)


def read_bytes(vm, count: int) -> bytes:
    return bytes(vm.port_read(DATA, 1) for _ in range(count))


def read_item(vm, key: int, count: int) -> bytes:
    select(vm, key)
    return read_bytes(vm, count)


def read_directory(vm) -> dict[str, tuple[int, int]]:
    """SeaBIOS's qemu_romfile_init: a be32 count, then 64-byte entries read in turn."""
    count = struct.unpack(">I", read_item(vm, FW_CFG_FILE_DIR, 4))[0]
    files = {}
    for _ in range(count):
        size, key, reserved, name = struct.unpack(">IHH56s", read_bytes(vm, 64))
        assert reserved == 0
        files[name.split(b"\0", 1)[0].decode()] = (size, key)
    return files


def dma(vm, control: int, length: int, address: int, descriptor: int = DESCRIPTOR,
        high: int | None = None) -> int:
    """Run one DMA request the way SeaBIOS does; returns the control word written back."""
    vm.memory.write(descriptor, struct.pack(">IIQ", control, length, address))
    if high is not None:
        vm.port_write(DMA_HIGH, 4, be32_as_outl(high))
    vm.port_write(DMA_LOW, 4, be32_as_outl(descriptor & 0xFFFFFFFF))
    return struct.unpack(">I", vm.memory.read(descriptor, 4))[0]


@pytest.fixture
def vm():
    return FakeVm()


@pytest.fixture
def fwcfg(vm):
    device = FwCfg(vm.context, cpus=4, max_cpus=8, uuid=bytes(range(16)), boot_menu=True)
    device.add_file("opt/zeta", b"last")
    device.add_file("etc/e820", e820_table([(0, 16 * MiB, E820_RAM)]))
    device.add_file("opt/alpha", b"hello fw_cfg")
    return device


# --- the traditional port interface --------------------------------------------
def test_signature_and_id_through_ports(vm, fwcfg):
    assert read_bytes(vm, 4) == b"QEMU"          # selected at power-on, as in QEMU
    assert read_item(vm, FW_CFG_SIGNATURE, 4) == b"QEMU"
    ident = struct.unpack("<I", read_item(vm, FW_CFG_ID, 4))[0]
    assert ident == 0b11                         # traditional interface and DMA


def test_numbered_items(vm, fwcfg):
    assert struct.unpack("<Q", read_item(vm, FW_CFG_RAM_SIZE, 8))[0] == 16 * MiB
    assert struct.unpack("<H", read_item(vm, FW_CFG_NB_CPUS, 2))[0] == 4
    assert struct.unpack("<H", read_item(vm, FW_CFG_MAX_CPUS, 2))[0] == 8
    assert struct.unpack("<H", read_item(vm, FW_CFG_BOOT_MENU, 2))[0] == 1
    assert struct.unpack("<H", read_item(vm, FW_CFG_NOGRAPHIC, 2))[0] == 1
    assert read_item(vm, FW_CFG_UUID, 16) == bytes(range(16))


def test_directory_is_sorted_and_big_endian(vm, fwcfg):
    files = read_directory(vm)
    assert list(files) == ["etc/e820", "opt/alpha", "opt/zeta"]
    assert files["etc/e820"] == (20, 0x20)
    assert files["opt/alpha"] == (12, 0x21)
    assert files["opt/zeta"] == (4, 0x22)


def test_reading_a_file_through_ports(vm, fwcfg):
    size, key = read_directory(vm)["opt/alpha"]
    assert read_item(vm, key, size) == b"hello fw_cfg"
    assert read_bytes(vm, 3) == b"\0\0\0"        # past the end reads zeros
    assert read_item(vm, key, 5) == b"hello"     # selecting again rewinds


def test_wide_data_reads_keep_stream_order(vm, fwcfg):
    select(vm, FW_CFG_SIGNATURE)
    assert vm.port_read(DATA, 2).to_bytes(2, "little") == b"QE"
    assert vm.port_read(DATA, 4).to_bytes(4, "little") == b"MU\0\0"


def test_write_channel_bit_selects_for_reading_and_writes_are_ignored(vm, fwcfg):
    select(vm, FW_CFG_SIGNATURE | FW_CFG_WRITE_CHANNEL)
    vm.port_write(DATA, 1, 0x55)
    assert read_bytes(vm, 4) == b"QEMU"


def test_unknown_items_and_the_selector_read_as_zero(vm, fwcfg):
    assert read_item(vm, 0x1234, 4) == bytes(4)
    assert read_item(vm, 0x3FFF, 4) == bytes(4)
    assert vm.port_read(SELECTOR, 2) == 0
    assert vm.port_read(0x512, 1) == 0xFF        # not ours, as in QEMU


def test_byte_write_to_the_selector_selects(vm, fwcfg):
    vm.port_write(SELECTOR, 1, FW_CFG_NB_CPUS)
    assert read_bytes(vm, 2) == b"\x04\x00"


# --- DMA ----------------------------------------------------------------------------
def test_dma_signature_reads_back(vm, fwcfg):
    assert bytes(vm.port_read(DMA_HIGH + i, 1) for i in range(8)) == b"QEMU CFG"
    high = int.from_bytes(vm.port_read(DMA_HIGH, 4).to_bytes(4, "little"), "big")
    low = int.from_bytes(vm.port_read(DMA_LOW, 4).to_bytes(4, "little"), "big")
    assert high << 32 | low == 0x51454D5520434647


def test_dma_select_and_read_a_file(vm, fwcfg):
    size, key = read_directory(vm)["opt/alpha"]
    status = dma(vm, key << 16 | DMA_CTL_SELECT | DMA_CTL_READ, size, BUFFER)
    assert status == 0
    assert vm.memory.read(BUFFER, size) == b"hello fw_cfg"


def test_dma_skip_then_read_and_zero_fill_past_the_end(vm, fwcfg):
    _, key = read_directory(vm)["opt/alpha"]
    vm.memory.write(BUFFER, b"\xAA" * 16)
    assert dma(vm, key << 16 | DMA_CTL_SELECT | DMA_CTL_SKIP, 6, 0) == 0
    assert dma(vm, DMA_CTL_READ, 10, BUFFER) == 0
    assert vm.memory.read(BUFFER, 16) == b"fw_cfg\0\0\0\0" + b"\xAA" * 6


def test_dma_reads_the_directory_like_seabios(vm, fwcfg):
    assert dma(vm, FW_CFG_FILE_DIR << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 4, BUFFER) == 0
    count = struct.unpack(">I", vm.memory.read(BUFFER, 4))[0]
    assert count == 3
    assert dma(vm, DMA_CTL_READ, 64, BUFFER) == 0
    size, key, _, name = struct.unpack(">IHH56s", vm.memory.read(BUFFER, 64))
    assert (name.rstrip(b"\0"), size, key) == (b"etc/e820", 20, 0x20)


def test_dma_without_an_operation_does_nothing(vm, fwcfg):
    vm.memory.write(BUFFER, b"\xAA" * 4)
    assert dma(vm, FW_CFG_SIGNATURE << 16 | DMA_CTL_SELECT, 4, BUFFER) == 0
    assert vm.memory.read(BUFFER, 4) == b"\xAA" * 4


def test_dma_write_is_refused(vm, fwcfg):
    status = dma(vm, FW_CFG_SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_WRITE, 4, BUFFER)
    assert status == DMA_CTL_ERROR
    assert read_item(vm, FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_dma_destination_outside_memory_sets_error(vm, fwcfg):
    key = FW_CFG_SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_READ
    assert dma(vm, key, 4, 16 * MiB - 2) == DMA_CTL_ERROR
    assert dma(vm, key, 4, 1 << 63) == DMA_CTL_ERROR
    assert dma(vm, key, 4, (1 << 64) - 1) == DMA_CTL_ERROR


def test_dma_huge_length_sets_error_without_raising(vm, fwcfg):
    key = FW_CFG_SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_READ
    assert dma(vm, key, 0xFFFFFFFF, BUFFER) == DMA_CTL_ERROR
    assert vm.memory.read(BUFFER, 4) == b"QEMU"     # the item itself was copied


def test_dma_huge_skip_is_harmless(vm, fwcfg):
    assert dma(vm, FW_CFG_SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_SKIP,
               0xFFFFFFFF, 0) == 0
    assert read_bytes(vm, 1) == b"\0"


def test_dma_into_read_only_memory_sets_error(vm, fwcfg):
    rom = mmap.mmap(-1, 64 * 1024)
    vm.memory.map_bootrom(rom)
    status = dma(vm, FW_CFG_SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 4, 0xF0000)
    assert status == DMA_CTL_ERROR
    assert rom[:4] == bytes(4)


def test_dma_descriptor_outside_memory_is_ignored(vm, fwcfg):
    vm.port_write(DMA_HIGH, 4, be32_as_outl(0x1234))
    vm.port_write(DMA_LOW, 4, be32_as_outl(0))      # nothing there to read or report
    # the latched high half is spent: a low-only write (what SeaBIOS does) works again
    assert dma(vm, FW_CFG_SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 4, BUFFER) == 0
    assert vm.memory.read(BUFFER, 4) == b"QEMU"


def test_dma_descriptor_straddling_the_end_of_memory_gets_error(vm, fwcfg):
    end = 16 * MiB
    vm.memory.write(end - 8, b"\xFF" * 8)
    vm.port_write(DMA_LOW, 4, be32_as_outl(end - 8))
    assert vm.memory.read(end - 8, 4) == struct.pack(">I", DMA_CTL_ERROR)


def test_dma_with_a_high_half(vm, fwcfg):
    status = dma(vm, FW_CFG_ID << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 4, BUFFER, high=0)
    assert status == 0
    assert vm.memory.read(BUFFER, 4) == b"\x03\0\0\0"


def test_dma_address_register_ignores_other_widths(vm, fwcfg):
    vm.memory.write(DESCRIPTOR, struct.pack(">IIQ", DMA_CTL_SELECT | DMA_CTL_READ, 4, BUFFER))
    vm.port_write(DMA_LOW, 2, 0x1000)
    vm.port_write(DMA_LOW + 1, 4, 0x1000)
    assert vm.memory.read(DESCRIPTOR, 4) == struct.pack(">I", DMA_CTL_SELECT | DMA_CTL_READ)


# --- items and files ------------------------------------------------------------------
def test_add_file_rejects_duplicates_and_long_names(vm, fwcfg):
    with pytest.raises(ConfigError, match="given twice"):
        fwcfg.add_file("opt/alpha", b"")
    with pytest.raises(ConfigError, match="55"):
        fwcfg.add_file("opt/" + "x" * 52, b"")
    fwcfg.add_file("opt/" + "x" * 51, b"ok")
    files = read_directory(vm)
    assert files["opt/" + "x" * 51] == (2, 0x22)
    assert files["opt/zeta"] == (4, 0x23)             # renumbered, as QEMU does


def test_add_bytes_keeps_files_to_add_file(vm, fwcfg):
    with pytest.raises(ValueError):
        fwcfg.add_bytes(0x20, b"x")
    with pytest.raises(ValueError):
        fwcfg.add_bytes(FW_CFG_FILE_DIR, b"x")
    fwcfg.add_bytes(0x8003, b"arch")             # arch-local items are their own space
    assert read_item(vm, 0x8003, 4) == b"arch"
    assert read_item(vm, FW_CFG_RAM_SIZE, 8) == struct.pack("<Q", 16 * MiB)


def test_e820_table_layout():
    table = e820_table([(0, 0x9FC00, E820_RAM), (0xF0000, 0x10000, E820_RESERVED)])
    assert len(table) == 40
    assert struct.unpack("<QQIQQI", table) == (0, 0x9FC00, 1, 0xF0000, 0x10000, 2)
    assert e820_table([]) == b""


# --- -f NAME,string=TEXT / -f NAME,file=PATH ---------------------------------------------
def test_parse_string_option():
    assert parse_fw_cfg_option("opt/x,string=hi") == ("opt/x", b"hi")
    assert parse_fw_cfg_option("name=opt/x,string=a,b=c") == ("opt/x", b"a,b=c")
    assert parse_fw_cfg_option("opt/x,string=") == ("opt/x", b"")


def test_parse_file_option(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"\0\1\2binary")
    assert parse_fw_cfg_option(f"opt/blob,file={path}") == ("opt/blob", b"\0\1\2binary")


def test_parse_warns_outside_opt(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_fw_cfg_option("etc/thing,string=1") == ("etc/thing", b"1")
    assert "opt/" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_fw_cfg_option("opt/thing,string=1")
    assert caplog.text == ""


@pytest.mark.parametrize("text, message", [
    ("opt/x", "expected NAME,string=TEXT or NAME,file=PATH"),
    (",string=x", "expected NAME"),
    ("opt/x,str=x", "expected NAME"),
    ("opt/x,file=", "expected NAME"),
    ("opt/x,", "expected NAME"),
    ("opt/" + "y" * 52 + ",string=x", "is 56 bytes long; the limit is 55"),
    ("opt/x,file=/nonexistent/fw_cfg/file", "cannot read -f opt/x file /nonexistent/fw_cfg/file"),
])
def test_parse_rejects(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        parse_fw_cfg_option(text)
    assert "\n" not in str(info.value)


def test_parse_accepts_a_55_byte_name():
    name = "opt/" + "y" * 51
    assert parse_fw_cfg_option(name + ",string=x") == (name, b"x")


# --- the guest cannot break it ------------------------------------------------------------
def test_zero_fill_does_not_allocate_the_requested_length(vm, fwcfg):
    length = 16 * MiB - BUFFER
    tracemalloc.start()
    try:
        status = dma(vm, FW_CFG_SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_READ, length,
                     BUFFER)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 0
    assert peak < 1 * MiB
    assert vm.memory.read(BUFFER, 8) == b"QEMU\0\0\0\0"


SMALL = 1 * MiB
ports = st.integers(0x50E, 0x51D)
addresses = st.one_of(st.integers(0, SMALL + 16), st.integers(0, (1 << 64) - 1))
controls = st.one_of(
    st.tuples(st.integers(0, 0x30), st.sampled_from((0, 1, 0x19, 0x20, 0x21, 0x4019, 0xFFFF)))
    .map(lambda pair: pair[1] << 16 | pair[0]),
    st.integers(0, 0xFFFFFFFF))
lengths = st.one_of(st.integers(0, 300), st.integers(0, 0xFFFFFFFF))
access = st.one_of(
    st.tuples(st.just("out"), ports, st.sampled_from((1, 2, 4)), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("in"), ports, st.sampled_from((1, 2, 4))),
    st.tuples(st.just("poke"), st.integers(0, SMALL - 16), st.binary(min_size=16,
                                                                     max_size=16)),
    st.tuples(st.just("dma"), addresses, controls, lengths, addresses),
)


@fuzz_settings(300)
@given(st.lists(access, max_size=40))
def test_random_guest_accesses_never_raise(accesses):
    vm = FakeVm(memory_size=SMALL)
    FwCfg(vm.context).add_file("opt/f", b"data" * 40)
    for kind, *args in accesses:
        if kind == "out":
            vm.port_write(*args)
        elif kind == "in":
            port, size = args
            assert 0 <= vm.port_read(port, size) < 1 << (8 * size)
        elif kind == "poke":
            vm.memory.write(*args)
        else:
            where, control, length, target = args
            if vm.memory.is_ram(where, 16):
                vm.memory.write(where, struct.pack(">IIQ", control, length, target))
            vm.port_write(DMA_HIGH, 4, be32_as_outl(where >> 32))
            vm.port_write(DMA_LOW, 4, be32_as_outl(where & 0xFFFFFFFF))
            if vm.memory.is_ram(where, 4):
                status = struct.unpack(">I", vm.memory.read(where, 4))[0]
                assert status in (0, DMA_CTL_ERROR)
