"""Image files of a display frame: PNG (the standard library's zlib; RFC
2083) and PPM (QEMU's default screendump format).

A screenshot is the frame as a console sees it: 8-bit RGB, no alpha.
"""

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + \
        struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _rgb(width: int, height: int, pixels: bytes) -> bytearray:
    """Display pixels (B, G, R, 0 each) as R, G, B bytes."""
    count = width * height
    rgb = bytearray(3 * count)
    rgb[0::3], rgb[1::3], rgb[2::3] = pixels[2:4 * count:4], pixels[1:4 * count:4], \
        pixels[0:4 * count:4]
    return rgb


def ppm(width: int, height: int, pixels: bytes) -> bytes:
    return b"P6\n%d %d\n255\n" % (width, height) + _rgb(width, height, pixels)


def png(width: int, height: int, pixels: bytes) -> bytes:
    """PNG of WIDTH x HEIGHT display pixels."""
    rgb = _rgb(width, height, pixels)
    stride = 3 * width
    lines = b"".join(b"\0" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(lines, 6)) + \
        _chunk(b"IEND", b"")
