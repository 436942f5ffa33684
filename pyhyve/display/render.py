"""Drawing what a VGA shows: text, planar and packed-pixel modes, and the Bochs
VBE linear modes, into one 32-bit frame (bytes B, G, R, 0 per pixel: the
little-endian 0x00RRGGBB that RFB clients take as their default format).

The rules are the VGA's as QEMU renders them, so that screens compare pixel
for pixel: text cells are glyphs from plane 2 (the font the guest's BIOS
loaded), 9 pixels wide unless the sequencer says 8, the 9th column repeating
the 8th for line-drawing characters 0xb0-0xdf; colours come from the DAC,
its 6-bit values widened by repeating the low bit (QEMU's c6_to_8); the
cursor blinks with QEMU's period.  CGA 2-bit modes (BIOS modes 4-6) are not
drawn: a frame of the mode's size stays black (and says so once).

Nothing here trusts the registers: every geometry is clamped, every video
memory read wraps inside the buffer, and a mode too large to draw gives a
small black frame.

Threading: one Renderer per display, used by the display thread only.
"""

import time

from . import vga as V

MAX_PIXELS = 4096 * 2048            # larger modes are not drawn
MAX_TEXT_CELLS = 160 * 100          # as QEMU, which draws no larger text screen
CURSOR_HALF_PERIOD = 1000 * 2 * 16 / 60 / 2 / 1000      # seconds per blink phase
EXPAND8 = [bytes((byte >> (7 - bit)) & 1 for bit in range(8)) for byte in range(256)]


def c6_to_8(value: int) -> int:
    value &= 0x3F
    low = value & 1
    return (value << 2) | (low << 1) | low


def _pixel(r: int, g: int, b: int) -> bytes:
    return bytes((b, g, r, 0))


def _apply_palette(indices: bytes, tables: tuple[bytes, bytes, bytes]) -> bytearray:
    """32-bit pixels of colour-index bytes, through per-channel tables (B, G, R)."""
    out = bytearray(4 * len(indices))
    out[0::4] = indices.translate(tables[0])
    out[1::4] = indices.translate(tables[1])
    out[2::4] = indices.translate(tables[2])
    return out


def _double(data: bytes) -> bytearray:
    out = bytearray(2 * len(data))
    out[0::2] = data
    out[1::2] = data
    return out


class Renderer:
    """Turns a VgaState into frames; keeps the last one to draw only what changed."""

    def __init__(self, state: V.VgaState):
        self.state = state
        self.width = 640
        self.height = 480
        self.frame = bytearray(self.width * self.height * 4)
        self._key = None                # what the last frame was drawn from
        self._glyphs: dict = {}
        self._glyph_key = None
        self.text_mode = False

    def invalidate(self) -> None:
        """Draw everything afresh next time (video memory changed behind our back)."""
        self._key = None

    # --- entry point ----------------------------------------------------------------------
    def render(self, dirty_pages: set[int] | None) -> tuple[int, int] | None:
        """Bring self.frame up to date; DIRTY_PAGES are the video memory pages
        written since the last call (None: unknown, redraw).  Returns the
        (first, end) scan lines that may have changed, or None."""
        state = self.state
        if (not state.ar_index & 0x20 and not state.dispi_enabled) or \
                state.sr[V.SR_CLOCK_MODE] & 0x20:
            # the attribute controller is being programmed, or the screen is off
            return self._blank()
        self.text_mode = not (state.gr[V.GR_MISC] & V.GR06_GRAPHICS or state.dispi_enabled)
        if not self.text_mode:
            return self._graphics(dirty_pages)
        return self._text()

    def _resize(self, width: int, height: int) -> None:
        if (width, height) != (self.width, self.height):
            self.width, self.height = width, height
            self.frame = bytearray(width * height * 4)

    def _blank(self) -> tuple[int, int] | None:
        key = ("blank", self.width, self.height)
        if key == self._key:
            return None
        self._key = key
        self.frame[:] = bytes(len(self.frame))
        return 0, self.height

    # --- colours ------------------------------------------------------------------------------
    def _palette16(self) -> list[bytes]:
        state = self.state
        colours = []
        for i in range(16):
            value = state.ar[i]
            if state.ar[V.AR_MODE] & 0x80:
                value = ((state.ar[V.AR_COLOR_PAGE] & 0x0F) << 4) | (value & 0x0F)
            else:
                value = ((state.ar[V.AR_COLOR_PAGE] & 0x0C) << 4) | (value & 0x3F)
            at = value * 3
            colours.append(_pixel(*(c6_to_8(c) for c in state.palette[at:at + 3])))
        return colours

    def _tables(self, colours: list[bytes]) -> tuple[bytes, bytes, bytes]:
        padded = colours + [bytes(4)] * (256 - len(colours))
        return tuple(bytes(colour[channel] for colour in padded) for channel in range(3))

    def _palette256(self) -> list[bytes]:
        palette = self.state.palette
        if self.state.dispi[V.DISPI_ENABLE] & V.DISPI_8BIT_DAC:
            return [_pixel(*palette[i * 3:i * 3 + 3]) for i in range(256)]
        return [_pixel(*(c6_to_8(c) for c in palette[i * 3:i * 3 + 3])) for i in range(256)]

    # --- text modes --------------------------------------------------------------------------
    def _text(self) -> tuple[int, int] | None:
        state = self.state
        sr, cr = state.sr, state.cr
        cheight = (cr[V.CR_MAX_SCAN] & 0x1F) + 1
        cwidth = 16 if sr[V.SR_CLOCK_MODE] & 0x08 else (8 if sr[V.SR_CLOCK_MODE] & 1 else 9)
        columns = cr[V.CR_H_DISP] + 1
        lines = cr[V.CR_V_DISP_END] | ((cr[V.CR_OVERFLOW] & 0x02) << 7) | \
            ((cr[V.CR_OVERFLOW] & 0x40) << 3)
        rows = (lines + 1) // cheight
        if columns * rows <= 1 or columns * rows > MAX_TEXT_CELLS:
            return self._blank()
        line_offset = cr[V.CR_OFFSET] << 3
        start = (cr[V.CR_START_HI] << 8) | cr[V.CR_START_LO]
        line_compare = cr[V.CR_LINE_COMPARE] | ((cr[V.CR_OVERFLOW] & 0x10) << 4) | \
            ((cr[V.CR_MAX_SCAN] & 0x40) << 3)
        vram, size = state.vram, state.vram_size
        cells = []                              # each row's (char, attr) bytes
        offset, line = start * 4, 0
        for _ in range(rows):
            end = offset + 4 * columns
            if end <= size:
                raw = bytes(vram[offset:end])
            else:
                raw = bytes(vram[(offset + i) % size] for i in range(4 * columns))
            row = bytearray(2 * columns)
            row[0::2] = raw[0::4]
            row[1::2] = raw[1::4]
            cells.append(bytes(row))
            offset += line_offset
            next_line = line + cheight
            if line < line_compare <= next_line:
                offset = 0
            line = next_line
        cursor_at = ((cr[V.CR_CURSOR_HI] << 8) | cr[V.CR_CURSOR_LO])
        cursor_on = not cr[V.CR_CURSOR_START] & 0x20 and \
            int(time.monotonic() / CURSOR_HALF_PERIOD) % 2 == 0
        colours = self._palette16()
        font_key = (sr[V.SR_CHAR_MAP], cheight, cwidth, state.ar[V.AR_MODE] & 0x04,
                    b"".join(colours))
        if state.font_changed or font_key != self._glyph_key:
            state.font_changed = False
            self._glyph_key = font_key
            self._glyphs = {}
        cursor = (cursor_at, cr[V.CR_CURSOR_START] & 0x1F, cr[V.CR_CURSOR_END] & 0x1F) \
            if cursor_on else None
        key = ("text", columns, rows, cheight, cwidth, start, line_offset, line_compare,
               tuple(cells), cursor, font_key, id(self._glyphs))
        if key == self._key:
            return None
        self._key = key
        self._resize(columns * cwidth, rows * cheight)
        fonts = self._font_bases(sr[V.SR_CHAR_MAP])
        stride = self.width * 4
        frame = self.frame
        offset, line = start * 4, 0
        for row_index, row in enumerate(cells):
            glyphs = [self._glyph(row[2 * i], row[2 * i + 1], fonts, cheight, cwidth, colours)
                      for i in range(columns)]
            cursor_column = None
            if cursor is not None:
                column = (cursor_at * 4 - offset) // 4
                if 0 <= column < columns and cursor_at * 4 == offset + 4 * column:
                    cursor_column = column
            if cursor_column is not None:
                glyphs[cursor_column] = self._with_cursor(
                    glyphs[cursor_column], row[2 * cursor_column + 1], cursor[1], cursor[2],
                    cheight, cwidth, colours)
            top = row_index * cheight
            for scan in range(cheight):
                at = (top + scan) * stride
                frame[at:at + stride] = b"".join([glyph[scan] for glyph in glyphs])
            offset += line_offset
            next_line = line + cheight
            if line < line_compare <= next_line:
                offset = 0
            line = next_line
        return 0, self.height

    def _font_bases(self, char_map: int) -> tuple[int, int]:
        first = ((char_map >> 4) & 1) | ((char_map << 1) & 6)
        second = ((char_map >> 5) & 1) | ((char_map >> 1) & 6)
        return first * 8192 * 4 + 2, second * 8192 * 4 + 2

    def _glyph(self, char: int, attr: int, fonts, cheight: int, cwidth: int,
               colours: list[bytes]) -> list[bytes]:
        """The CHEIGHT scan lines of one cell, as 32-bit pixels."""
        key = (char, attr)
        glyph = self._glyphs.get(key)
        if glyph is None:
            base = fonts[(attr >> 3) & 1] + 32 * 4 * char
            vram, size = self.state.vram, self.state.vram_size
            bitmap = bytes(vram[(base + 4 * scan) % size] for scan in range(cheight))
            dup9 = 0xB0 <= char <= 0xDF and self.state.ar[V.AR_MODE] & 0x04
            glyph = self._draw_rows(bitmap, colours[attr & 0x0F], colours[attr >> 4],
                                    cwidth, dup9)
            self._glyphs[key] = glyph
        return glyph

    @staticmethod
    def _draw_rows(bitmap: bytes, fg: bytes, bg: bytes, cwidth: int, dup9) -> list[bytes]:
        rows = []
        for bits in bitmap:
            pixels = [fg if bits >> (7 - x) & 1 else bg for x in range(8)]
            if cwidth == 9:
                pixels.append(pixels[7] if dup9 else bg)
            elif cwidth == 16:
                pixels = [pixel for pixel in pixels for _ in (0, 1)]
            rows.append(b"".join(pixels))
        return rows

    def _with_cursor(self, glyph: list[bytes], attr: int, first: int, last: int,
                     cheight: int, cwidth: int, colours: list[bytes]) -> list[bytes]:
        last = min(last, cheight - 1)
        if last < first or first >= cheight:
            return glyph
        solid = self._draw_rows(b"\xff", colours[attr & 0x0F], colours[attr >> 4], cwidth,
                                True)[0]
        return [solid if first <= scan <= last else row for scan, row in enumerate(glyph)]

    # --- graphics modes ----------------------------------------------------------------------
    def _graphics(self, dirty_pages: set[int] | None) -> tuple[int, int] | None:
        state = self.state
        sr, gr, cr = state.sr, state.gr, state.cr
        shift = (gr[V.GR_MODE] >> 5) & 3
        if state.dispi_enabled:
            regs = state.dispi
            width, height, bpp = regs[V.DISPI_XRES], regs[V.DISPI_YRES], regs[V.DISPI_BPP]
            line_offset, start, line_compare = state.line_length(), state.dispi_start(), 65535
        else:
            width = (cr[V.CR_H_DISP] + 1) * 8
            height = (cr[V.CR_V_DISP_END] | ((cr[V.CR_OVERFLOW] & 0x02) << 7) |
                      ((cr[V.CR_OVERFLOW] & 0x40) << 3)) + 1
            bpp = 0
            line_offset = cr[V.CR_OFFSET] << 3
            start = ((cr[V.CR_START_HI] << 8) | cr[V.CR_START_LO]) * 4
            line_compare = cr[V.CR_LINE_COMPARE] | ((cr[V.CR_OVERFLOW] & 0x10) << 4) | \
                ((cr[V.CR_MAX_SCAN] & 0x40) << 3)
        double_scan = cr[V.CR_MAX_SCAN] >> 7
        multi_scan = ((((cr[V.CR_MAX_SCAN] & 0x1F) + 1) << double_scan) - 1) if shift != 1 \
            else double_scan
        display_width = width
        if shift in (0, 1) and sr[V.SR_CLOCK_MODE] & 8:
            display_width <<= 1
        if display_width * height > MAX_PIXELS or display_width <= 0 or height <= 0:
            self._resize(640, 480)
            return self._blank()
        if shift == 0:
            kind, colours = ("4d2" if sr[V.SR_CLOCK_MODE] & 8 else "4"), self._palette16()
        elif shift == 1:
            state.warn_once("vga-cga", "CGA 2-bit graphics modes are not drawn")
            kind, colours = "cga", []
        elif bpp in (0, 8):
            kind, colours = ("8d2" if bpp == 0 else "8"), self._palette256()
        else:
            kind, colours = str(bpp), []
        geometry = ("graphics", kind, display_width, height, line_offset, start, line_compare,
                    multi_scan, cr[V.CR_MODE] & 0x43, state.ar[V.AR_PLANE_ENABLE],
                    b"".join(colours))
        full = geometry != self._key or dirty_pages is None
        if not full and not dirty_pages:
            return None
        self._key = geometry
        self._resize(display_width, height)
        tables = self._tables(colours) if colours else None
        bytes_per_line = {"4": width // 2, "4d2": width // 2, "8d2": width // 2, "8": width,
                          "15": width * 2, "16": width * 2, "24": width * 3, "32": width * 4,
                          "cga": width // 2}[kind]
        stride = display_width * 4
        frame, vram, size = self.frame, state.vram, state.vram_size
        first = end = None
        address, counter, run = start, 0, multi_scan
        for y in range(height):
            at = address
            if not cr[V.CR_MODE] & 1:
                bit = 14 + ((cr[V.CR_MODE] >> 6) & 1)
                at = (at & ~(1 << bit)) | ((counter & 1) << bit)
            if not cr[V.CR_MODE] & 2:
                at = (at & ~0x8000) | ((counter & 2) << 14)
            span = bytes_per_line * (2 if kind in ("4", "4d2") else 1)
            if full or any(page in dirty_pages for page in
                           range((at % size) >> 12, ((at % size) + span - 1 >> 12) + 1)):
                if at + span <= size:
                    source = bytes(vram[at:at + span])
                else:
                    source = bytes(vram[(at + i) % size] for i in range(span))
                frame[y * stride:(y + 1) * stride] = self._line(kind, source, width, tables)
                first = y if first is None else first
                end = y + 1
            if not run:
                mask = (cr[V.CR_MODE] & 3) ^ 3
                if counter & mask == mask:
                    address += line_offset
                counter += 1
                run = multi_scan
            else:
                run -= 1
            if y == line_compare:
                address = 0
        return None if first is None else (first, end)

    def _line(self, kind: str, source: bytes, width: int, tables) -> bytes:
        """One scan line of WIDTH source pixels (display_width output pixels)."""
        if kind == "32":
            return source
        if kind == "24":
            out = bytearray(4 * width)
            out[0::4], out[1::4], out[2::4] = source[0::3], source[1::3], source[2::3]
            return out
        if kind in ("15", "16"):
            low, high = source[0::2], source[1::2]
            out = bytearray(4 * width)
            if kind == "16":
                out[0::4] = low.translate(B16)
                out[1::4] = (int.from_bytes(low.translate(G16_LOW), "big") |
                             int.from_bytes(high.translate(G16_HIGH), "big")).to_bytes(
                                 width, "big")
                out[2::4] = high.translate(R16)
            else:
                out[0::4] = low.translate(B16)
                out[1::4] = (int.from_bytes(low.translate(G15_LOW), "big") |
                             int.from_bytes(high.translate(G15_HIGH), "big")).to_bytes(
                                 width, "big")
                out[2::4] = high.translate(R15)
            return out
        if kind == "8":
            return _apply_palette(source, tables)
        if kind == "8d2":
            return _apply_palette(bytes(_double(source[:width // 2])), tables)
        if kind in ("4", "4d2"):
            mask = self.state.ar[V.AR_PLANE_ENABLE]
            groups = len(source) // 4
            value = 0
            for plane in range(4):
                if mask >> plane & 1:
                    expanded = b"".join(map(EXPAND8.__getitem__, source[plane::4]))
                    value |= int.from_bytes(expanded, "big") << plane
            indices = value.to_bytes(groups * 8, "big")
            if kind == "4d2":
                indices = bytes(_double(indices))
            return _apply_palette(indices, tables)
        return bytes(4 * width * (2 if self.state.sr[V.SR_CLOCK_MODE] & 8 else 1))


B16 = bytes((value << 3) & 0xF8 for value in range(256))
G16_LOW = bytes((value >> 3) & 0x1C for value in range(256))
G16_HIGH = bytes((value << 5) & 0xE0 for value in range(256))
R16 = bytes(value & 0xF8 for value in range(256))
G15_LOW = bytes((value >> 2) & 0x38 for value in range(256))
G15_HIGH = bytes((value << 6) & 0xC0 for value in range(256))
R15 = bytes((value << 1) & 0xF8 for value in range(256))
