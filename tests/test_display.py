"""The standard VGA (pyhyve/display): registers, video memory, DISPI, drawing,
the framebuffer BAR's memslot, snapshots, and a fuzz of everything the guest
can reach.  Guest-driven checks (SeaBIOS, GRUB, QEMU's pixels) are in
tests/test_vnc.py."""

import json
import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakevm import FakeVm
from firmware import require_program
from pyhyve.display import vga as V
from pyhyve.display.render import c6_to_8
from pyhyve.display.stdvga import StdVga
from pyhyve.pci.bus import PciBus
from pyhyve.pci import regs as R

SLOT = 3


class VgaVm(FakeVm):
    def __init__(self):
        super().__init__()
        self.pci = PciBus(self.context)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.pci.config_write(0, SLOT, 0, offset, size, value)


@pytest.fixture
def vm():
    machine = VgaVm()
    machine.device = machine.pci.add(SLOT, 0, StdVga, {"vram": "1"})
    yield machine
    machine.pci.close()


def seq(vm, index, value):
    vm.port_write(0x3C4, 2, index | value << 8)          # outw, as the VGA BIOS writes


def gc(vm, index, value):
    vm.port_write(0x3CE, 2, index | value << 8)


def crtc(vm, index, value):
    vm.port_write(0x3D4, 2, index | value << 8)


def attr(vm, index, value):
    vm.port_read(0x3DA, 1)                # reset the flip-flop (colour addressing)
    vm.port_write(0x3C0, 1, index)
    vm.port_write(0x3C0, 1, value)


def dispi(vm, index, value=None):
    vm.port_write(0x1CE, 2, index)
    if value is None:
        return vm.port_read(0x1CF, 2)
    vm.port_write(0x1CF, 2, value)


def test_ids_bars_and_rom(vm):
    device = vm.device
    assert device.config_read(R.VENDOR_ID, 4) == 0x11111234
    assert device.config_read(R.REVISION_ID, 4) >> 8 == 0x030000
    assert device.bars[0].size == 1 << 20 and device.bars[0].prefetchable
    assert device.bars[2].size == 4096
    assert device.rom[:2] == b"\x55\xaa"            # Debian's vgabios-stdvga.bin


def test_sequencer_graphics_and_crtc_registers(vm):
    seq(vm, 4, 0xFF)
    assert vm.port_read(0x3C5, 1) == V.SR_MASK[4]               # writable bits only
    vm.port_write(0x3C4, 1, 2)
    assert vm.port_read(0x3C4, 1) == 2
    gc(vm, 5, 0xFF)
    assert vm.port_read(0x3CF, 1) == V.GR_MASK[5]
    vm.port_write(0x3C2, 1, 0x01)                                # colour addressing
    crtc(vm, 0x0E, 0x12)
    assert vm.port_read(0x3D5, 1) == 0x12
    assert vm.port_read(0x3B5, 1) == 0xFF                        # mono ports now idle
    crtc(vm, 0x11, 0x80)                                         # protect CRTC 0-7
    crtc(vm, 0x01, 0x55)
    assert vm.device.state.cr[1] == 0


def test_attribute_flip_flop_and_dac(vm):
    vm.port_write(0x3C2, 1, 0x01)              # colour: input status 1 at 0x3da
    attr(vm, 0x10, 0x0C)
    assert vm.device.state.ar[0x10] == 0x0C
    vm.port_write(0x3C0, 1, 0x20)              # an index write, as the flip-flop says
    assert vm.port_read(0x3C0, 1) == 0         # ... which now waits for data
    vm.port_read(0x3DA, 1)
    assert vm.port_read(0x3C0, 1) == 0x20
    vm.port_write(0x3C8, 1, 5)
    for value in (0x3F, 0x10, 0x01):
        vm.port_write(0x3C9, 1, value)
    vm.port_write(0x3C7, 1, 5)
    assert [vm.port_read(0x3C9, 1) for _ in range(3)] == [0x3F, 0x10, 0x01]
    assert vm.port_read(0x3C8, 1) == 6                           # the write index advanced
    assert c6_to_8(0x3F) == 0xFF and c6_to_8(0x10) == 0x40 and c6_to_8(0x01) == 0x07


def test_text_mode_writes_land_in_planes_0_and_1(vm):
    gc(vm, 6, 0x0E)                    # memory map 3 (0xB8000), text
    gc(vm, 5, 0x10)                    # odd/even
    seq(vm, 2, 0x03)
    vm.mmio_write(0xB8000, 2, 0x0741)  # 'A', grey on black
    vm.mmio_write(0xB8002, 2, 0x1E42)  # 'B', yellow on blue: the next address, 4 bytes on
    vram = vm.device.vram
    assert vram[0] == 0x41 and vram[1] == 0x07
    assert bytes(vram[4:6]) == b"\x42\x1e" and vram[2] == vram[3] == 0
    vm.mmio_write(0xB8005, 1, 0x4F)    # a byte alone: cell 2's attribute
    assert vram[9] == 0x4F and vram[8] == 0
    assert vm.mmio_read(0xB8001, 1) == 0x07
    assert vm.mmio_read(0xA0000, 1) == 0xFF                      # outside the map


def test_planar_write_modes_and_read_mode_1(vm):
    gc(vm, 6, 0x05)                    # graphics, memory map 1 (0xA0000, 64 KiB)
    seq(vm, 4, 0x06)                   # planar
    seq(vm, 2, 0x0F)
    gc(vm, 1, 0x0F)                    # set/reset enabled on every plane
    gc(vm, 0, 0x05)                    # colour 5: planes 0 and 2
    gc(vm, 8, 0xF0)                    # bit mask
    vm.mmio_write(0xA0000, 1, 0)
    assert bytes(vm.device.vram[0:4]) == bytes((0xF0, 0, 0xF0, 0))
    gc(vm, 5, 0x08)                    # read mode 1: where do pixels have colour 5?
    gc(vm, 2, 0x05)
    gc(vm, 7, 0x0F)
    assert vm.mmio_read(0xA0000, 1) == 0xF0
    gc(vm, 5, 0x02)                    # write mode 2: the value is the colour
    gc(vm, 1, 0)
    gc(vm, 8, 0x0F)
    vm.mmio_write(0xA0000, 1, 0x03)            # bits outside the mask keep the latch
    assert bytes(vm.device.vram[0:4]) == bytes((0xFF, 0x0F, 0xF0, 0))


def test_dispi_mode_and_caps(vm):
    assert dispi(vm, V.DISPI_ID) == V.DISPI_ID5
    assert dispi(vm, V.DISPI_VIDEO_MEMORY_64K) == 16             # vram=1 (MiB)
    dispi(vm, V.DISPI_ENABLE, V.DISPI_GETCAPS)
    assert dispi(vm, V.DISPI_XRES) == V.DISPI_MAX_XRES
    dispi(vm, V.DISPI_ENABLE, 0)
    dispi(vm, V.DISPI_XRES, 640)
    dispi(vm, V.DISPI_YRES, 400)
    dispi(vm, V.DISPI_BPP, 32)
    dispi(vm, V.DISPI_ENABLE, V.DISPI_ENABLED | V.DISPI_LFB_ENABLED)
    assert dispi(vm, V.DISPI_VIRT_WIDTH) == 640
    assert dispi(vm, V.DISPI_VIRT_HEIGHT) == (1 << 20) // (640 * 4)
    dispi(vm, V.DISPI_BPP, 13)                                   # not a depth: 8 instead
    assert dispi(vm, V.DISPI_BPP) == 8
    bar2 = vm.device.bars[2].address
    vm.config_write(R.COMMAND, 2, R.COMMAND_MEMORY)
    assert vm.mmio_read(bar2 + 0x500 + 2 * V.DISPI_XRES, 2) == 640
    vm.mmio_write(bar2 + 0x500 + 2 * V.DISPI_BPP, 2, 32)
    assert vm.device.state.dispi[V.DISPI_BPP] == 32
    assert vm.mmio_read(bar2 + 0x400 + 0x1C, 1) == vm.port_read(0x3DC, 1)


def read_edid(vm) -> bytes:
    """The EDID as bochs-drm reads it: bytes from BAR2's start."""
    bar2 = vm.device.bars[2].address
    vm.config_write(R.COMMAND, 2, R.COMMAND_MEMORY)
    return bytes(vm.mmio_read(bar2 + offset, 1) for offset in range(256))


def test_edid_prefers_w_by_h_and_passes_edid_decode():
    """edid-decode (Debian's, from the Linux media maintainers) judges the
    block: conformity PASS with no warning, w x h the first detailed timing
    and so the mode Linux prefers.  edid=off leaves the area zero."""
    edid_decode = require_program("edid-decode", "edid-decode")
    machine, plain = VgaVm(), VgaVm()
    try:
        machine.device = machine.pci.add(SLOT, 0, StdVga, {"vram": "4", "w": "1366",
                                                            "h": "768"})
        plain.device = plain.pci.add(SLOT, 0, StdVga, {"vram": "4", "edid": "off"})
        block = read_edid(machine)
        assert block[128:] == bytes(128) and sum(block[:128]) % 256 == 0
        report = subprocess.run([edid_decode, "--check", "-"], input=block[:128],
                                capture_output=True, check=False)
        text = report.stdout.decode()
        assert report.returncode == 0 and "EDID conformity: PASS" in text, text
        assert "Warnings" not in text, text
        assert re.search(r"DTD 1:\s+1366x768\s+59\.9", text), text
        assert "Display Product Name: 'pyhyve'" in text
        assert read_edid(plain) == bytes(256)
    finally:
        machine.pci.close()
        plain.pci.close()


def test_framebuffer_bar_is_a_memslot_that_follows_the_bar(vm):
    device, memory = vm.device, vm.memory
    vm.config_write(R.COMMAND, 2, R.COMMAND_MEMORY)
    first = device.bars[0].address
    assert device.lfb_gpa == first
    memory.write(first + 8, b"\x11\x22")                        # guest RAM, no exit
    assert device.vram[8:10] == b"\x11\x22"
    vm.config_write(R.BAR0, 4, 0xFFFFFFFF)                      # sizing
    assert vm.pci.config_read(0, SLOT, 0, R.BAR0, 4) & 0xFFFFFFF0 == 0xFFF00000
    vm.config_write(R.BAR0, 4, 0xD0000000)
    assert device.lfb_gpa == 0xD0000000 and memory.read(0xD0000008, 2) == b"\x11\x22"
    assert not memory.is_ram(first)
    vm.config_write(R.COMMAND, 2, 0)
    assert device.lfb_gpa is None and not memory.is_ram(0xD0000000)


def text_screen(vm, char: int, attribute: int = 0x07):
    """Mode 3's registers as the VGA BIOS sets them, a two-row glyph for CHAR
    in plane 2, and CHAR at the top left."""
    vm.port_write(0x3C2, 1, 0x67)
    for index, value in ((1, 0x00), (2, 0x03), (3, 0x00), (4, 0x02)):
        seq(vm, index, value)
    for index, value in ((1, 0x4F), (7, 0x1F), (9, 0x4F), (0x0A, 0x20), (0x12, 0x8F),
                         (0x13, 0x28), (0x17, 0xA3), (0x18, 0xFF)):
        crtc(vm, index, value)
    for index in range(16):
        attr(vm, index, index)
    attr(vm, 0x10, 0x0C)
    attr(vm, 0x12, 0x0F)
    vm.port_write(0x3C0, 1, 0x20)
    vm.port_write(0x3C8, 1, 0)
    for rgb in [(0, 0, 0)] * 7 + [(0x2A, 0x2A, 0x2A)]:
        for value in rgb:
            vm.port_write(0x3C9, 1, value)
    vram = vm.device.vram
    vram[char * 128 + 2] = 0x81                                  # plane 2, glyph row 0
    vram[0:2] = bytes((char, attribute))
    vm.device.state.font_changed = True


def test_text_mode_draws_the_guest_font_nine_pixels_wide(vm):
    text_screen(vm, 0xC4)                                        # a line-drawing char
    update = vm.device.screen.refresh()
    assert (update.width, update.height) == (720, 400)
    grey = bytes((0xA8, 0xA8, 0xA8, 0))                          # c6_to_8(0x2a)
    row = update.pixels[:9 * 4]
    assert row[:4] == grey and row[7 * 4:8 * 4] == grey and row[8 * 4:] == grey   # 9th = 8th
    text_screen(vm, 0x41)
    row = vm.device.screen.refresh().pixels[:9 * 4]
    assert row[7 * 4:8 * 4] == grey and row[8 * 4:] == bytes(4)                   # 9th blank


def test_screen_reports_changed_tiles_and_scrolls(vm):
    text_screen(vm, 0x41)
    screen = vm.device.screen
    first = screen.refresh()
    vm.device.vram[80 * 4 * 3:80 * 4 * 3 + 2] = bytes((0x41, 0x07))     # row 3, column 0
    second = screen.refresh()
    assert second.serial == first.serial + 1 and second.copies == []
    assert second.rects == [(0, 48, 64, 16)]
    assert screen.changes_since(first.serial) == ([], [(0, 48, 64, 16)])
    vram = vm.device.vram                                        # scroll up one row
    vram[0:80 * 4 * 24] = bytes(vram[80 * 4:80 * 4 * 25])
    vram[80 * 4 * 24:80 * 4 * 25] = bytes(80 * 4)
    third = screen.refresh()
    assert third.copies == [(16, 0, 384)]
    assert screen.changes_since(second.serial - 1)[0] == []      # two steps: rects only


def test_graphics_modes_draw_from_video_memory(vm):
    vm.port_write(0x3C0, 1, 0x20)
    dispi(vm, V.DISPI_XRES, 64)
    dispi(vm, V.DISPI_YRES, 8)
    dispi(vm, V.DISPI_BPP, 16)
    dispi(vm, V.DISPI_ENABLE, V.DISPI_ENABLED)
    vm.device.vram[0:2] = (0xF800 | 0x07E0 | 0x001F).to_bytes(2, "little")   # white
    vm.device.vram[2:4] = (0x001F).to_bytes(2, "little")                      # blue
    update = vm.device.screen.refresh()
    assert (update.width, update.height) == (64, 8)
    assert update.pixels[:8] == bytes((0xF8, 0xFC, 0xF8, 0, 0xF8, 0, 0, 0))
    dispi(vm, V.DISPI_BPP, 32)                 # same mode, other depth: redrawn
    vm.device.vram[0:4] = bytes((1, 2, 3, 0))
    assert vm.device.screen.refresh().pixels[:4] == bytes((1, 2, 3, 0))


def test_state_survives_save_restore_save(vm):
    text_screen(vm, 0x41, 0x1E)
    dispi(vm, V.DISPI_XRES, 800)
    vm.config_write(R.COMMAND, 2, R.COMMAND_MEMORY)
    saved = json.loads(json.dumps(vm.device.save_state()))
    other = VgaVm()
    try:
        twin = other.pci.add(SLOT, 0, StdVga, {"vram": "1"})
        twin.restore_state(saved)
        assert twin.save_state() == saved
        assert twin.vram[:2] == bytes((0x41, 0x1E)) and twin.lfb_gpa == vm.device.lfb_gpa
        broken = dict(saved, vram=saved["vram"][:-8] + "AAAAAAAA")
        with pytest.raises(ValueError):
            twin.restore_state(broken)
    finally:
        other.pci.close()


PORTS = st.one_of(st.integers(0x3B0, 0x3DF), st.integers(0x1CE, 0x1D0))
WINDOW = st.integers(0xA0000, 0xBFFFF)
OPERATION = st.one_of(
    st.tuples(st.just("port"), PORTS, st.sampled_from((1, 2, 4)), st.integers(0, 0xFFFFFFFF),
              st.booleans()),
    st.tuples(st.just("window"), WINDOW, st.sampled_from((1, 2, 4, 8)),
              st.integers(0, 2**64 - 1), st.booleans()),
    st.tuples(st.just("bar2"), st.integers(0, 4095), st.sampled_from((1, 2, 4, 8)),
              st.integers(0, 2**64 - 1), st.booleans()),
    st.tuples(st.just("config"), st.sampled_from((R.COMMAND, R.BAR0, R.BAR0 + 8, 0x30)),
              st.just(4), st.integers(0, 0xFFFFFFFF), st.just(True)),
    st.tuples(st.just("render"), st.just(0), st.just(1), st.just(0), st.just(False)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPERATION, max_size=80))
def test_guest_traffic_never_raises(operations):
    """Ports, the window, the register BAR and config space in any order,
    with frames drawn between: nothing the guest does may raise."""
    machine = VgaVm()
    try:
        device = machine.pci.add(SLOT, 0, StdVga, {"vram": "1"})
        for kind, where, size, value, write in operations:
            value &= (1 << (8 * size)) - 1
            if kind == "port":
                (machine.port_write(where, size, value) if write else
                 machine.port_read(where, size))
            elif kind == "window":
                (machine.mmio_write(where, size, value) if write else
                 machine.mmio_read(where, size))
            elif kind == "bar2":
                (device.bar_write(2, where, size, value) if write else
                 device.bar_read(2, where, size))
            elif kind == "config":
                machine.config_write(where, size, value)
            else:
                device.screen.refresh()
        device.screen.refresh()
        saved = device.save_state()
        device.restore_state(saved)
        assert device.save_state() == saved
    finally:
        machine.pci.close()
