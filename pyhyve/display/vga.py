"""The VGA register file and video memory, with the Bochs VBE ("DISPI")
extension: what the guest programs, as QEMU's standard VGA presents it.

Video memory is one buffer (the PCI framebuffer BAR's RAM) seen two ways: the
linear framebuffer maps it into the guest directly, and the legacy window at
0xA0000-0xBFFFF reaches it through the VGA's planes, four bytes per address
(plane 0 at byte 0 .. plane 3 at byte 3), as text and planar modes expect.
The VGA BIOS loads its font into plane 2 and writes characters to planes 0
and 1 through that window; render.py draws from the same bytes.

Threading: the vCPU threads call the port and window handlers, the display
thread reads the registers to render; register values are plain ints and
bytes, and a frame drawn while the guest changes a mode is redrawn next time.
Nothing the guest writes can raise: every index is masked and every address
checked against the buffer.
"""

from ..lifecycle import StateError, bits, decode, encode, expect_keys, uint

VGA_WINDOW = (0xA0000, 0xC0000)
VGA_PORTS = (0x3C0, 0x20)                  # attribute .. CRTC (colour) and input status 1
MONO_PORTS = (0x3B4, 7)                    # the CRTC and input status at their mono addresses
DISPI_PORTS = (0x1CE, 3)                   # index, data (and the data alias at 0x1d0)

# register groups and their writable bits (QEMU's sr_mask and gr_mask)
SR_MASK = (0x03, 0x3D, 0x0F, 0x3F, 0x0E, 0x00, 0x00, 0xFF)
GR_MASK = (0x0F, 0x0F, 0x0F, 0x1F, 0x03, 0x7B, 0x0F, 0x0F, 0xFF)
AR_COUNT, SR_COUNT, GR_COUNT, CR_COUNT = 0x15, 8, 9, 0x19

# sequencer, graphics controller, attribute and CRTC indices used below
SR_CLOCK_MODE, SR_PLANE_WRITE, SR_CHAR_MAP, SR_MEMORY_MODE = 1, 2, 3, 4
SR04_CHAIN4 = 0x08
GR_SR_VALUE, GR_SR_ENABLE, GR_COMPARE, GR_ROTATE, GR_READ_PLANE, GR_MODE, GR_MISC, \
    GR_DONT_CARE, GR_BIT_MASK = range(9)
GR06_GRAPHICS = 0x01
AR_MODE, AR_OVERSCAN, AR_PLANE_ENABLE, AR_HPAN, AR_COLOR_PAGE = 0x10, 0x11, 0x12, 0x13, 0x14
CR_H_DISP, CR_OVERFLOW, CR_MAX_SCAN, CR_CURSOR_START, CR_CURSOR_END = 1, 7, 9, 0xA, 0xB
CR_START_HI, CR_START_LO, CR_CURSOR_HI, CR_CURSOR_LO = 0xC, 0xD, 0xE, 0xF
CR_V_DISP_END, CR_OFFSET, CR_MODE, CR_LINE_COMPARE, CR_V_SYNC_END = 0x12, 0x13, 0x17, 0x18, 0x11
ST01_RETRACE = 0x09                        # vertical retrace and display-disabled bits

# Bochs VBE DISPI registers
DISPI_ID, DISPI_XRES, DISPI_YRES, DISPI_BPP, DISPI_ENABLE, DISPI_BANK, DISPI_VIRT_WIDTH, \
    DISPI_VIRT_HEIGHT, DISPI_X_OFFSET, DISPI_Y_OFFSET, DISPI_VIDEO_MEMORY_64K = range(11)
DISPI_COUNT = 10                           # stored registers; 0xa is computed
DISPI_ID0, DISPI_ID5 = 0xB0C0, 0xB0C5
DISPI_ENABLED, DISPI_GETCAPS, DISPI_8BIT_DAC, DISPI_LFB_ENABLED, DISPI_NOCLEARMEM = \
    0x01, 0x02, 0x20, 0x40, 0x80
DISPI_MAX_XRES, DISPI_MAX_YRES, DISPI_MAX_BPP = 16000, 12000, 32
DISPI_BPPS = (4, 8, 15, 16, 24, 32)

PAGE = 4096


def _planes(value: int) -> int:
    """A 4-bit plane mask as a 32-bit mask with 0xff in each selected plane's byte."""
    return sum(0xFF << (8 * plane) for plane in range(4) if value >> plane & 1)


MASK16 = tuple(_planes(value) for value in range(16))


class VgaState:
    """The registers and video memory of one standard VGA (see the module docstring)."""

    def __init__(self, vram, warn_once):
        self.vram = vram                    # a writable buffer: the framebuffer BAR's RAM
        self.vram_size = len(vram)
        self.warn_once = warn_once
        self.written_pages: set[int] = set()    # vram pages written through the window
        self.font_changed = True            # plane 2 written since the last render
        self.reset()

    def reset(self) -> None:
        self.sr = bytearray(SR_COUNT)
        self.gr = bytearray(GR_COUNT)
        self.ar = bytearray(AR_COUNT)
        self.cr = bytearray(256)
        self.misc_output = 0
        self.feature_control = 0
        self.sr_index = self.gr_index = self.ar_index = self.cr_index = 0
        self.ar_flip_flop = 0
        self.st01 = 0
        self.latch = 0
        self.dac_state = 0
        self.dac_read_index = self.dac_write_index = self.dac_sub_index = 0
        self.dac_cache = bytearray(3)
        self.palette = bytearray(768)
        self.dispi_index = 0
        self.dispi = [0] * DISPI_COUNT
        self.dispi[DISPI_ID] = DISPI_ID5
        self.bank_offset = 0
        self.font_changed = True

    # --- I/O ports: byte registers, wider accesses split as QEMU's port lists do ----
    def port_read(self, port: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(port + i) << (8 * i)
        return value

    def port_write(self, port: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    def _wrong_crtc(self, port: int) -> bool:
        """Mono ports while the misc register picks colour addressing, or the reverse."""
        colour = self.misc_output & 1
        return (0x3B0 <= port <= 0x3BF and colour) or (0x3D0 <= port <= 0x3DF and not colour)

    def _read_byte(self, port: int) -> int:
        if self._wrong_crtc(port):
            return 0xFF
        if port == 0x3C0:
            return self.ar_index if not self.ar_flip_flop else 0
        if port == 0x3C1:
            index = self.ar_index & 0x1F
            return self.ar[index] if index < AR_COUNT else 0
        if port == 0x3C4:
            return self.sr_index
        if port == 0x3C5:
            return self.sr[self.sr_index]
        if port == 0x3C7:
            return self.dac_state
        if port == 0x3C8:
            return self.dac_write_index
        if port == 0x3C9:
            value = self.palette[self.dac_read_index * 3 + self.dac_sub_index]
            self.dac_sub_index += 1
            if self.dac_sub_index == 3:
                self.dac_sub_index = 0
                self.dac_read_index = (self.dac_read_index + 1) & 0xFF
            return value
        if port == 0x3CA:
            return self.feature_control
        if port == 0x3CC:
            return self.misc_output
        if port == 0x3CE:
            return self.gr_index
        if port == 0x3CF:
            return self.gr[self.gr_index]
        if port in (0x3B4, 0x3D4):
            return self.cr_index
        if port in (0x3B5, 0x3D5):
            return self.cr[self.cr_index]
        if port in (0x3BA, 0x3DA):
            # Retrace and display-enable toggle at each read, so that guests
            # waiting for a retrace see one; reading resets the attribute flip-flop.
            self.st01 ^= ST01_RETRACE
            self.ar_flip_flop = 0
            return self.st01
        return 0xFF if port in (0x1CE, 0x1CF, 0x1D0) else 0

    def _write_byte(self, port: int, value: int) -> None:
        if self._wrong_crtc(port):
            return
        if port == 0x3C0:
            if not self.ar_flip_flop:
                self.ar_index = value & 0x3F
            else:
                index = self.ar_index & 0x1F
                if index < 0x10:
                    self.ar[index] = value & 0x3F
                elif index == AR_MODE:
                    self.ar[index] = value & ~0x10 & 0xFF
                elif index == AR_OVERSCAN:
                    self.ar[index] = value
                elif index == AR_PLANE_ENABLE:
                    self.ar[index] = value & 0x3F
                elif index in (AR_HPAN, AR_COLOR_PAGE):
                    self.ar[index] = value & 0x0F
            self.ar_flip_flop ^= 1
        elif port == 0x3C2:
            self.misc_output = value & ~0x10 & 0xFF
        elif port == 0x3C4:
            self.sr_index = value & 7
        elif port == 0x3C5:
            self.sr[self.sr_index] = value & SR_MASK[self.sr_index]
        elif port == 0x3C7:
            self.dac_read_index, self.dac_sub_index, self.dac_state = value, 0, 3
        elif port == 0x3C8:
            self.dac_write_index, self.dac_sub_index, self.dac_state = value, 0, 0
        elif port == 0x3C9:
            self.dac_cache[self.dac_sub_index] = value
            self.dac_sub_index += 1
            if self.dac_sub_index == 3:
                at = self.dac_write_index * 3
                self.palette[at:at + 3] = self.dac_cache
                self.dac_sub_index = 0
                self.dac_write_index = (self.dac_write_index + 1) & 0xFF
        elif port == 0x3CE:
            self.gr_index = value & 0x0F
        elif port == 0x3CF:
            if self.gr_index < GR_COUNT:
                self.gr[self.gr_index] = value & GR_MASK[self.gr_index]
        elif port in (0x3B4, 0x3D4):
            self.cr_index = value
        elif port in (0x3B5, 0x3D5):
            index = self.cr_index
            if self.cr[CR_V_SYNC_END] & 0x80 and index <= CR_OVERFLOW:
                # CRTC registers 0-7 are write-protected; only line compare's bit 4 of 7
                if index == CR_OVERFLOW:
                    self.cr[CR_OVERFLOW] = (self.cr[CR_OVERFLOW] & ~0x10) | (value & 0x10)
                return
            self.cr[index] = value
        elif port in (0x3BA, 0x3DA):
            self.feature_control = value & 0x10

    # --- the DISPI interface (ports 0x1ce/0x1cf, and the MMIO BAR at 0x500) ------------
    def dispi_read(self, index: int) -> int:
        if index > DISPI_VIDEO_MEMORY_64K:
            return 0
        if index == DISPI_VIDEO_MEMORY_64K:
            return self.vram_size >> 16
        if self.dispi[DISPI_ENABLE] & DISPI_GETCAPS and index in (DISPI_XRES, DISPI_YRES,
                                                                    DISPI_BPP):
            return {DISPI_XRES: DISPI_MAX_XRES, DISPI_YRES: DISPI_MAX_YRES,
                    DISPI_BPP: DISPI_MAX_BPP}[index]
        return self.dispi[index]

    def dispi_write(self, index: int, value: int) -> None:
        value &= 0xFFFF
        regs = self.dispi
        if index == DISPI_ID:
            if DISPI_ID0 <= value <= DISPI_ID5:
                regs[DISPI_ID] = value
        elif index in (DISPI_XRES, DISPI_YRES, DISPI_BPP, DISPI_VIRT_WIDTH, DISPI_X_OFFSET,
                       DISPI_Y_OFFSET):
            regs[index] = value
            self._fixup_dispi()
            if regs[DISPI_ENABLE] & DISPI_ENABLED:
                self._program_vga_for_dispi()
        elif index == DISPI_BANK:
            banks = max(1, self.vram_size >> 16)
            regs[DISPI_BANK] = value & (banks - 1 if banks & (banks - 1) == 0 else 0xFFFF)
            self.bank_offset = (regs[DISPI_BANK] << 16) % self.vram_size
        elif index == DISPI_ENABLE:
            if value & DISPI_ENABLED and not regs[DISPI_ENABLE] & DISPI_ENABLED:
                regs[DISPI_VIRT_WIDTH] = regs[DISPI_X_OFFSET] = regs[DISPI_Y_OFFSET] = 0
                regs[DISPI_ENABLE] |= DISPI_ENABLED
                self._fixup_dispi()
                if not value & DISPI_NOCLEARMEM:
                    end = min(self.vram_size, regs[DISPI_YRES] * self.line_length())
                    self.vram[:end] = bytes(end)
                    self.written_pages.update(range((end + PAGE - 1) // PAGE))
                self._program_vga_for_dispi()
            elif not value & DISPI_ENABLED:
                self.bank_offset = 0
            regs[DISPI_ENABLE] = value & (DISPI_ENABLED | DISPI_GETCAPS | DISPI_8BIT_DAC |
                                          DISPI_LFB_ENABLED | DISPI_NOCLEARMEM)
        elif index == DISPI_VIRT_HEIGHT:
            pass                                # computed from the others

    @property
    def dispi_enabled(self) -> bool:
        return bool(self.dispi[DISPI_ENABLE] & DISPI_ENABLED)

    def line_length(self) -> int:
        """Bytes per scan line of the DISPI mode."""
        bpp = self.dispi[DISPI_BPP]
        width = self.dispi[DISPI_VIRT_WIDTH]
        return width >> 1 if bpp == 4 else width * ((bpp + 7) // 8)

    def dispi_start(self) -> int:
        """Byte offset of the first visible pixel of the DISPI mode."""
        bpp = self.dispi[DISPI_BPP]
        x_offset = self.dispi[DISPI_X_OFFSET]
        start = self.line_length() * self.dispi[DISPI_Y_OFFSET]
        start += x_offset >> 1 if bpp == 4 else x_offset * ((bpp + 7) // 8)
        return start

    def _fixup_dispi(self) -> None:
        """Keep the DISPI registers describing a mode that fits video memory."""
        regs = self.dispi
        if regs[DISPI_BPP] not in DISPI_BPPS:
            regs[DISPI_BPP] = 8
        regs[DISPI_XRES] = min(regs[DISPI_XRES], DISPI_MAX_XRES) & ~7 or 8
        regs[DISPI_VIRT_WIDTH] = min(max(regs[DISPI_VIRT_WIDTH], regs[DISPI_XRES]),
                                     DISPI_MAX_XRES)
        length = self.line_length()
        if length * regs[DISPI_XRES] and length > self.vram_size:
            regs[DISPI_VIRT_WIDTH] = regs[DISPI_XRES]
            length = self.line_length()
        height = min(self.vram_size // max(length, 1), 0xFFFF)
        regs[DISPI_VIRT_HEIGHT] = height
        regs[DISPI_YRES] = min(max(regs[DISPI_YRES], 1), DISPI_MAX_YRES, height)
        regs[DISPI_X_OFFSET] = min(regs[DISPI_X_OFFSET], regs[DISPI_VIRT_WIDTH] - regs[DISPI_XRES])
        regs[DISPI_Y_OFFSET] = min(regs[DISPI_Y_OFFSET], height - regs[DISPI_YRES])

    def _program_vga_for_dispi(self) -> None:
        """The VGA registers a DISPI mode implies (graphics, window at 0xA0000 in
        64 KiB banks, chain 4 above 4 bpp), as the Bochs VBE interface defines."""
        regs = self.dispi
        self.gr[GR_MISC] = (self.gr[GR_MISC] & ~0x0C) | 0x04 | GR06_GRAPHICS
        self.cr[CR_MODE] |= 3
        self.cr[CR_OFFSET] = (self.line_length() >> 3) & 0xFF
        self.cr[CR_H_DISP] = ((regs[DISPI_XRES] >> 3) - 1) & 0xFF
        height = regs[DISPI_YRES] - 1
        self.cr[CR_V_DISP_END] = height & 0xFF
        self.cr[CR_OVERFLOW] = (self.cr[CR_OVERFLOW] & ~0x42) | ((height >> 7) & 0x02) | \
            ((height >> 3) & 0x40)
        self.cr[CR_LINE_COMPARE] = 0xFF
        self.cr[CR_OVERFLOW] |= 0x10
        self.cr[CR_MAX_SCAN] |= 0x40
        if regs[DISPI_BPP] == 4:
            shift = 0
            self.sr[SR_CLOCK_MODE] &= ~8
        else:
            shift = 2
            self.sr[SR_MEMORY_MODE] |= SR04_CHAIN4
            self.sr[SR_PLANE_WRITE] |= 0x0F
        self.gr[GR_MODE] = (self.gr[GR_MODE] & ~0x60) | (shift << 5)
        self.cr[CR_MAX_SCAN] &= ~0x9F

    # --- the legacy window at 0xA0000 ---------------------------------------------------
    def _window_address(self, offset: int) -> int | None:
        """The VGA memory address of window OFFSET, or None where the memory
        map the graphics controller selects leaves it unmapped."""
        memory_map = (self.gr[GR_MISC] >> 2) & 3
        if memory_map == 0:
            return offset
        if memory_map == 1:
            return offset + self.bank_offset if offset < 0x10000 else None
        base = 0x10000 if memory_map == 2 else 0x18000
        return offset - base if base <= offset < base + 0x8000 else None

    def window_read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._window_read_byte(offset + i) << (8 * i)
        return value

    def window_write(self, offset: int, size: int, value: int) -> None:
        if size == 2 and not offset & 1 and self.gr[GR_MODE] & 0x10 and \
                not self.sr[SR_MEMORY_MODE] & SR04_CHAIN4 and \
                self.sr[SR_PLANE_WRITE] & 3 == 3 and not self.gr[GR_READ_PLANE] & 2:
            # A character and its attribute (the text console's every write, and
            # BIOS screen clears): planes 0 and 1 at one address, adjacent bytes.
            address = self._window_address(offset & 0x1FFFF)
            if address is not None and 2 * address + 2 <= self.vram_size:
                self.vram[2 * address:2 * address + 2] = value.to_bytes(2, "little")
                self.written_pages.add(address >> 11)
            return
        for i in range(size):
            self._window_write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _window_read_byte(self, offset: int) -> int:
        address = self._window_address(offset & 0x1FFFF)
        if address is None:
            return 0xFF
        vram = self.vram
        if self.sr[SR_MEMORY_MODE] & SR04_CHAIN4:
            return vram[address] if address < self.vram_size else 0xFF
        if self.gr[GR_MODE] & 0x10:             # odd/even: planes 0/1 (2/3) alternate
            plane = (self.gr[GR_READ_PLANE] & 2) | (address & 1)
            at = ((address & ~1) << 1) | plane
            return vram[at] if at < self.vram_size else 0xFF
        if address * 4 + 4 > self.vram_size:
            return 0xFF
        self.latch = int.from_bytes(vram[address * 4:address * 4 + 4], "little")
        if not self.gr[GR_MODE] & 0x08:        # read mode 0: one plane
            return (self.latch >> (8 * (self.gr[GR_READ_PLANE] & 3))) & 0xFF
        # read mode 1: bits where every enabled plane matches the colour compare
        differ = (self.latch ^ MASK16[self.gr[GR_COMPARE]]) & MASK16[self.gr[GR_DONT_CARE]]
        differ |= differ >> 16
        differ |= differ >> 8
        return ~differ & 0xFF

    def _window_write_byte(self, offset: int, value: int) -> None:
        address = self._window_address(offset & 0x1FFFF)
        if address is None:
            return
        vram = self.vram
        if self.sr[SR_MEMORY_MODE] & SR04_CHAIN4:
            if address < self.vram_size and self.sr[SR_PLANE_WRITE] & (1 << (address & 3)):
                vram[address] = value
                self._written(address, 1 << (address & 3))
            return
        if self.gr[GR_MODE] & 0x10:
            plane = (self.gr[GR_READ_PLANE] & 2) | (address & 1)
            at = ((address & ~1) << 1) | plane
            if at < self.vram_size and self.sr[SR_PLANE_WRITE] & (1 << plane):
                vram[at] = value
                self._written(at, 1 << plane)
            return
        if address * 4 + 4 > self.vram_size:
            return
        gr = self.gr
        latch = self.latch
        mode = gr[GR_MODE] & 3
        if mode == 1:
            data = latch
        else:
            if mode == 0 or mode == 3:
                rotate = gr[GR_ROTATE] & 7
                value = ((value >> rotate) | (value << (8 - rotate))) & 0xFF
            if mode == 0:
                data = value * 0x01010101
                enable = MASK16[gr[GR_SR_ENABLE]]
                data = (data & ~enable) | (MASK16[gr[GR_SR_VALUE]] & enable)
                bit_mask = gr[GR_BIT_MASK]
            elif mode == 2:
                data = MASK16[value & 0x0F]
                bit_mask = gr[GR_BIT_MASK]
            else:
                bit_mask = gr[GR_BIT_MASK] & value
                data = MASK16[gr[GR_SR_VALUE]]
            function = gr[GR_ROTATE] >> 3
            if function == 1:
                data &= latch
            elif function == 2:
                data |= latch
            elif function == 3:
                data ^= latch
            bit_mask *= 0x01010101
            data = (data & bit_mask) | (latch & ~bit_mask)
        planes = self.sr[SR_PLANE_WRITE]
        write_mask = MASK16[planes]
        old = int.from_bytes(vram[address * 4:address * 4 + 4], "little")
        vram[address * 4:address * 4 + 4] = ((old & ~write_mask) | (data & write_mask)) \
            .to_bytes(4, "little")
        self._written(address * 4, planes)

    def _written(self, at: int, planes: int) -> None:
        self.written_pages.add(at >> 12)
        if planes & 4:
            self.font_changed = True

    # --- snapshots ------------------------------------------------------------------------
    FIELDS = ("sr", "gr", "ar", "cr", "misc_output", "feature_control", "sr_index",
              "gr_index", "ar_index", "cr_index", "ar_flip_flop", "st01", "latch",
              "dac_state", "dac_read_index", "dac_write_index", "dac_sub_index", "dac_cache",
              "palette", "dispi_index", "dispi", "bank_offset")

    def save_state(self) -> dict:
        return {"sr": encode(self.sr), "gr": encode(self.gr), "ar": encode(self.ar),
                "cr": encode(self.cr), "misc_output": self.misc_output,
                "feature_control": self.feature_control, "sr_index": self.sr_index,
                "gr_index": self.gr_index, "ar_index": self.ar_index,
                "cr_index": self.cr_index, "ar_flip_flop": self.ar_flip_flop,
                "st01": self.st01, "latch": self.latch, "dac_state": self.dac_state,
                "dac_read_index": self.dac_read_index, "dac_write_index": self.dac_write_index,
                "dac_sub_index": self.dac_sub_index, "dac_cache": encode(self.dac_cache),
                "palette": encode(self.palette), "dispi_index": self.dispi_index,
                "dispi": list(self.dispi), "bank_offset": self.bank_offset}

    def restore_state(self, state: dict) -> None:
        """Checked in full before anything changes (StateError names the field)."""
        expect_keys(state, self.FIELDS, "VGA")
        arrays = {name: decode(state[name], f"VGA {name}", length=length)
                  for name, length in (("sr", SR_COUNT), ("gr", GR_COUNT), ("ar", AR_COUNT),
                                       ("cr", 256), ("dac_cache", 3), ("palette", 768))}
        numbers = {name: uint(state[name], limit, f"VGA {name}") for name, limit in (
            ("misc_output", 0xFF), ("feature_control", 0xFF), ("sr_index", SR_COUNT - 1),
            ("gr_index", 0x0F), ("ar_index", 0x3F), ("cr_index", 0xFF), ("st01", 0xFF),
            ("latch", 0xFFFFFFFF), ("dac_state", 3), ("dac_read_index", 0xFF),
            ("dac_write_index", 0xFF), ("dac_sub_index", 2), ("dispi_index", 0xFFFF),
            ("bank_offset", self.vram_size - 1))}
        numbers["ar_flip_flop"] = bits(state["ar_flip_flop"], 1, "VGA attribute flip-flop")
        dispi = state["dispi"]
        if not isinstance(dispi, list) or len(dispi) != DISPI_COUNT:
            raise StateError(f"VGA dispi is {dispi!r}, not {DISPI_COUNT} registers")
        dispi = [uint(value, 0xFFFF, f"VGA DISPI register {i}") for i, value in enumerate(dispi)]
        for name, value in arrays.items():
            setattr(self, name, bytearray(value))
        for name, value in numbers.items():
            setattr(self, name, value)
        self.dispi = dispi
        self.font_changed = True
