"""The EDID the standard VGA offers its driver: one 128-byte EDID 1.4 block
(VESA E-EDID) describing a monitor whose preferred mode is the display's
w x h at 60 Hz, so that Linux's bochs DRM driver starts in the size the
operator chose (QEMU's VGA offers one too; without it the driver falls back
to 1024x768 whatever w and h say).

The preferred mode's timing is VESA CVT with reduced blanking, the timing
flat panels use; the established 640x480, 800x600 and 1024x768 modes that
fit are listed as well.  Nothing here comes from the guest.
"""

import math

BLOCK_SIZE = 128
HEADER = bytes((0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00))
MANUFACTURER, PRODUCT_CODE, SERIAL = "PYH", 0x0001, 0
MODEL_YEAR = 2026
DPI = 100                                   # the physical size the monitor claims
SRGB = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060), (0.3127, 0.3290))  # R, G, B, white
# The established modes (VESA DMT at 60 Hz): size, byte and bit, pixel clock
# in kHz, line rate in Hz
ESTABLISHED = (((640, 480), 0, 0x20, 25175, 31469), ((800, 600), 0, 0x01, 40000, 37879),
               ((1024, 768), 1, 0x08, 65000, 48363))

# CVT reduced blanking (VESA CVT 1.2, section 5.4), 60 Hz
REFRESH = 60
RB_H_BLANK, RB_H_SYNC, RB_H_FRONT = 160, 32, 48
RB_MIN_V_BLANK_US, RB_V_FRONT, RB_MIN_V_BACK = 460, 3, 6
CLOCK_STEP_KHZ = 250
MIN_CLOCK_KHZ = 10000           # EDID's smallest pixel clock: tiny modes get a longer blank


def _vsync_lines(width: int, height: int) -> int:
    """CVT's vertical sync width, which tells a monitor the aspect ratio."""
    for (across, down), lines in (((4, 3), 4), ((16, 9), 5), ((16, 10), 6), ((5, 4), 7),
                                  ((15, 9), 7)):
        if width * down == height * across:
            return lines
    return 10


def cvt_reduced_blanking(width: int, height: int) -> dict[str, int]:
    """The CVT-RB timing of WIDTH x HEIGHT at 60 Hz: pixel clock in kHz,
    blanking, porches and sync widths in pixels and lines.  The width is
    kept as it is (CVT would round it down to 8 pixels)."""
    vsync = _vsync_lines(width, height)
    line_us = (1e6 / REFRESH - RB_MIN_V_BLANK_US) / height
    v_blank = max(math.floor(RB_MIN_V_BLANK_US / line_us) + 1,
                  RB_V_FRONT + vsync + RB_MIN_V_BACK)
    total_pixels = width + RB_H_BLANK
    clock_khz = REFRESH * (height + v_blank) * total_pixels / 1000
    if clock_khz < MIN_CLOCK_KHZ:
        v_blank = math.ceil(MIN_CLOCK_KHZ * 1000 / (REFRESH * total_pixels)) - height
        clock_khz = MIN_CLOCK_KHZ
    return {"width": width, "height": height,
            "clock_khz": int(clock_khz // CLOCK_STEP_KHZ) * CLOCK_STEP_KHZ,
            "h_blank": RB_H_BLANK, "h_front": RB_H_FRONT, "h_sync": RB_H_SYNC,
            "v_blank": v_blank, "v_front": RB_V_FRONT, "v_sync": vsync}


def _detailed_timing(timing: dict[str, int], width_mm: int, height_mm: int) -> bytes:
    t = timing
    return bytes((
        t["clock_khz"] // 10 & 0xFF, t["clock_khz"] // 10 >> 8,
        t["width"] & 0xFF, t["h_blank"] & 0xFF, (t["width"] >> 8) << 4 | t["h_blank"] >> 8,
        t["height"] & 0xFF, t["v_blank"] & 0xFF, (t["height"] >> 8) << 4 | t["v_blank"] >> 8,
        t["h_front"] & 0xFF, t["h_sync"] & 0xFF,
        (t["v_front"] & 0xF) << 4 | t["v_sync"] & 0xF,
        (t["h_front"] >> 8) << 6 | (t["h_sync"] >> 8) << 4 | (t["v_front"] >> 4) << 2 |
        t["v_sync"] >> 4,
        width_mm & 0xFF, height_mm & 0xFF, (width_mm >> 8) << 4 | height_mm >> 8,
        0, 0,
        0x1A))                  # digital separate sync, hsync positive, vsync negative


def _text_descriptor(tag: int, text: str) -> bytes:
    return bytes((0, 0, 0, tag, 0)) + (text.encode()[:13] + b"\n").ljust(13, b" ")[:13]


def _range_limits(clocks_khz: list[int], line_rates_hz: list[int]) -> bytes:
    """Vertical 50-75 Hz, the line rate and the clock what the listed modes
    need: "range limits only", no formula for other modes."""
    min_line_khz = min(line_rates_hz) // 1000
    max_line_khz = -(-max(line_rates_hz) // 1000)
    max_clock = -(-max(clocks_khz) // 10000)
    return bytes((0, 0, 0, 0xFD, 0, 50, 75, min_line_khz, max_line_khz, max_clock, 0x01,
                  0x0A)) + b" " * 6


def _chromaticity() -> bytes:
    coordinates = [round(value * 1024) for point in SRGB for value in point]
    low = [0, 0]
    for index, value in enumerate(coordinates):
        low[index // 4] |= (value & 3) << (6 - 2 * (index % 4))
    return bytes(low + [value >> 2 for value in coordinates])


def _size_mm(width: int, height: int) -> tuple[int, int]:
    """The image size at DPI; none (0, 0) for one below 10 cm, which EDID
    readers take for a mistake."""
    size = round(width * 25.4 / DPI), round(height * 25.4 / DPI)
    return size if min(size) >= 100 else (0, 0)


def edid(width: int, height: int, name: str = "pyhyve") -> bytes:
    """The 128-byte EDID of a WIDTH x HEIGHT monitor called NAME."""
    letters = [ord(letter) - ord("A") + 1 for letter in MANUFACTURER]
    maker = letters[0] << 10 | letters[1] << 5 | letters[2]
    width_mm, height_mm = _size_mm(width, height)
    timing = cvt_reduced_blanking(width, height)
    clocks_khz = [timing["clock_khz"]]
    line_rates_hz = [timing["clock_khz"] * 1000 // (timing["width"] + timing["h_blank"])]
    established = bytearray(3)
    for (mode_width, mode_height), index, bit, clock_khz, line_hz in ESTABLISHED:
        if mode_width <= width and mode_height <= height:
            established[index] |= bit
            clocks_khz.append(clock_khz)
            line_rates_hz.append(line_hz)
    block = bytearray(
        HEADER + maker.to_bytes(2, "big") + PRODUCT_CODE.to_bytes(2, "little") +
        SERIAL.to_bytes(4, "little") +
        bytes((1, MODEL_YEAR - 1990, 1, 4,     # week 1 of the model year, EDID 1.4
               0xA0,                             # digital, 8 bits a colour
               round(width_mm / 10), round(height_mm / 10),
               120,                              # gamma 2.2
               0x06)) +                          # sRGB, the preferred mode is native
        _chromaticity() + established + b"\x01\x01" * 8 +
        _detailed_timing(timing, width_mm, height_mm) +
        _range_limits(clocks_khz, line_rates_hz) +
        _text_descriptor(0xFC, name) + bytes((0, 0, 0, 0x10)) + bytes(14) +
        b"\0")                                  # no extension blocks
    block.append(-sum(block) & 0xFF)
    assert len(block) == BLOCK_SIZE
    return bytes(block)
