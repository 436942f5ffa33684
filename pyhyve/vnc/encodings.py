"""RFB pixel formats and rectangle encodings (RFC 6143, 7.4 and 7.7).

Frames come from the display as 32-bit B, G, R, 0 pixels; each client says
in SetPixelFormat how it wants them (8, 16 or 32 bits per pixel, true
colour, any channel sizes, shifts and byte order).  Conversion works on
whole rectangles with bytes.translate and big integers, never per pixel in
Python, so a full screen costs milliseconds.

Encodings: Raw, CopyRect, zlib (raw pixels through the connection's zlib
stream) and ZRLE (64x64 tiles, solid or raw, through another zlib stream).
"""

import struct
import zlib

RAW, COPYRECT, ZLIB, ZRLE = 0, 1, 6, 16
DESKTOP_SIZE = -223
ZRLE_TILE = 64


class PixelFormat:
    """A client's pixel format; convert() turns display pixels into it."""

    STRUCT = struct.Struct(">BBBBHHHBBB3x")

    def __init__(self, bpp=32, depth=24, big_endian=False, true_colour=True,
                 red_max=255, green_max=255, blue_max=255, red_shift=16, green_shift=8,
                 blue_shift=0):
        self.bpp, self.depth, self.big_endian, self.true_colour = bpp, depth, big_endian, \
            true_colour
        self.maxima = (red_max, green_max, blue_max)
        self.shifts = (red_shift, green_shift, blue_shift)
        self.native = (bpp, big_endian, self.maxima, self.shifts) == \
            (32, False, (255, 255, 255), (16, 8, 0))
        self._tables = self._byte_tables() if not self.native else None

    @classmethod
    def unpack(cls, data: bytes) -> "PixelFormat":
        bpp, depth, big, true, rmax, gmax, bmax, rshift, gshift, bshift = \
            cls.STRUCT.unpack(data)
        return cls(bpp, depth, bool(big), bool(true), rmax, gmax, bmax, rshift, gshift,
                   bshift)

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.bpp, self.depth, int(self.big_endian),
                                int(self.true_colour), *self.maxima, *self.shifts)

    def problem(self) -> str | None:
        """Why this format cannot be served, or None."""
        if not self.true_colour:
            return "colour-map pixel formats are not supported"
        if self.bpp not in (8, 16, 32):
            return f"{self.bpp} bits per pixel is not an RFB format"
        if any(shift >= self.bpp for shift in self.shifts) or \
                any(m > 0xFFFF for m in self.maxima):
            return "colour shifts outside the pixel"
        return None

    def _byte_tables(self) -> list[tuple[bytes, bytes, bytes]]:
        """For each output byte (least significant first), what each 8-bit
        channel value (R, G, B) contributes to it."""
        tables = []
        for byte in range(self.bpp // 8):
            per_channel = []
            for maximum, shift in zip(self.maxima, self.shifts):
                per_channel.append(bytes(
                    (((value * maximum + 127) // 255) << shift >> (8 * byte)) & 0xFF
                    for value in range(256)))
            tables.append(tuple(per_channel))
        return tables

    @property
    def bytes_per_pixel(self) -> int:
        return self.bpp // 8

    def convert(self, pixels: bytes) -> bytes:
        """Display pixels (B, G, R, 0 each) in this format."""
        if self.native:
            return pixels
        count = len(pixels) // 4
        red, green, blue = pixels[2::4], pixels[1::4], pixels[0::4]
        size = self.bpp // 8
        out = bytearray(count * size)
        for byte, (t_red, t_green, t_blue) in enumerate(self._tables):
            value = int.from_bytes(red.translate(t_red), "big") | \
                int.from_bytes(green.translate(t_green), "big") | \
                int.from_bytes(blue.translate(t_blue), "big")
            where = size - 1 - byte if self.big_endian else byte
            out[where::size] = value.to_bytes(count, "big")
        return bytes(out)

    def compressed_pixel(self) -> slice:
        """ZRLE's CPIXEL: the 3 bytes of a 32-bit pixel its colours use, where
        they all fit in 3 bytes (RFC 6143, 7.7.6); all the bytes otherwise."""
        if self.bpp != 32 or self.depth > 24:
            return slice(0, self.bytes_per_pixel)
        used = 0
        for maximum, shift in zip(self.maxima, self.shifts):
            used |= maximum << shift
        low_three = used < (1 << 24)
        high_three = not used & 0xFF
        if low_three:
            return slice(1, 4) if self.big_endian else slice(0, 3)
        if high_three:
            return slice(0, 3) if self.big_endian else slice(1, 4)
        return slice(0, 4)


def crop(pixels: bytes, frame_width: int, x: int, y: int, w: int, h: int) -> bytes:
    """The display pixels of one rectangle, row after row."""
    stride = frame_width * 4
    if x == 0 and w == frame_width:
        return pixels[y * stride:(y + h) * stride]
    return b"".join(pixels[(y + row) * stride + 4 * x:(y + row) * stride + 4 * (x + w)]
                    for row in range(h))


def rect_header(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding)


class Encoder:
    """One client's encoders: its pixel format and its two zlib streams, which
    last as long as the connection (the client's inflaters keep their state)."""

    def __init__(self):
        self.format = PixelFormat()
        self._zlib = zlib.compressobj(6)
        self._zrle = zlib.compressobj(6)

    def raw(self, pixels: bytes, frame_width: int, x: int, y: int, w: int, h: int) -> bytes:
        return rect_header(x, y, w, h, RAW) + \
            self.format.convert(crop(pixels, frame_width, x, y, w, h))

    def zlib(self, pixels: bytes, frame_width: int, x: int, y: int, w: int, h: int) -> bytes:
        data = self.format.convert(crop(pixels, frame_width, x, y, w, h))
        packed = self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        return rect_header(x, y, w, h, ZLIB) + struct.pack(">I", len(packed)) + packed

    def zrle(self, pixels: bytes, frame_width: int, x: int, y: int, w: int, h: int) -> bytes:
        """Tiles left to right, top to bottom: a single colour as subencoding 1,
        anything else raw (subencoding 0), in compressed pixels."""
        cpixel = self.format.compressed_pixel()
        size = self.format.bytes_per_pixel
        parts = []
        for top in range(y, y + h, ZRLE_TILE):
            rows = min(ZRLE_TILE, y + h - top)
            for left in range(x, x + w, ZRLE_TILE):
                columns = min(ZRLE_TILE, x + w - left)
                tile = self.format.convert(crop(pixels, frame_width, left, top, columns, rows))
                first = tile[:size]
                if tile == first * (columns * rows):
                    parts.append(b"\x01" + first[cpixel])
                elif cpixel.stop - cpixel.start == size:
                    parts.append(b"\x00" + tile)
                else:
                    trimmed = bytearray((cpixel.stop - cpixel.start) * columns * rows)
                    for index, offset in enumerate(range(cpixel.start, cpixel.stop)):
                        trimmed[index::cpixel.stop - cpixel.start] = tile[offset::size]
                    parts.append(b"\x00" + bytes(trimmed))
        packed = self._zrle.compress(b"".join(parts)) + self._zrle.flush(zlib.Z_SYNC_FLUSH)
        return rect_header(x, y, w, h, ZRLE) + struct.pack(">I", len(packed)) + packed

    @staticmethod
    def copy(src_x: int, src_y: int, x: int, y: int, w: int, h: int) -> bytes:
        return rect_header(x, y, w, h, COPYRECT) + struct.pack(">HH", src_x, src_y)
