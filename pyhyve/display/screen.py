"""What a console sees of a display: the current frame, and what changed in it.

A Screen asks its renderer for a fresh frame and compares it with the one
before, in bands (a text row, or 16 scan lines) and 64-pixel tiles, so a
console sends only changed tiles.  Where a band's content moved up or down
(a console scrolling), the change is also described as a copy, which VNC
sends as CopyRect instead of the pixels.

Threading: refresh() may be called from any thread (each VNC client's, a
screenshot request); it serialises itself.  An Update's pixels are an
immutable copy, safe to encode while the next frame is drawn.
"""

import threading
from collections import deque
from collections.abc import Callable

from ..record import record

TILE = 64
HISTORY = 8                 # updates a slower client may catch up on by their rectangles


@record
class Update:
    serial: int                 # increases with each frame that differs from the last
    width: int
    height: int
    pixels: bytes               # width * height 32-bit pixels, B G R 0
    rects: list                 # (x, y, w, h) that changed since frame serial - 1
    copies: list                # (src_y, dst_y, h) full-width moves done before rects
    resized: bool


class Screen:
    """Frames of one display, numbered, with their differences."""

    def __init__(self, draw: Callable[[], tuple[int, int, bytes, tuple | None, int]]):
        """DRAW() returns (width, height, frame, (first, end) lines that may
        have changed or None, band height)."""
        self._draw = draw
        self._lock = threading.Lock()
        self.current = Update(0, 0, 0, b"", [], [], True)
        self._history: deque[Update] = deque(maxlen=HISTORY)

    def refresh(self) -> Update:
        """Draw the display now; returns self.current (a new Update when something changed)."""
        with self._lock:
            width, height, frame, changed, band = self._draw()
            old = self.current
            if (width, height) != (old.width, old.height):
                self._publish(Update(old.serial + 1, width, height, bytes(frame),
                                     [(0, 0, width, height)], [], True))
                return self.current
            if changed is None:
                return old
            pixels = bytes(frame)
            copies, rects = _differences(old.pixels, pixels, width, height, changed, band)
            if rects or copies:
                self._publish(Update(old.serial + 1, width, height, pixels, rects, copies,
                                     False))
            return self.current

    def _publish(self, update: Update) -> None:
        self.current = update
        self._history.append(update)

    def changes_since(self, serial: int) -> tuple[list, list] | None:
        """(copies, rects) turning frame SERIAL into the current one, or None
        when that is too long ago or the size changed since (send it all).
        Copies are given only for one step; over several they become rects."""
        with self._lock:
            current = self.current
            steps = [u for u in self._history if u.serial > serial]
            if not steps or steps[0].serial != serial + 1 or any(u.resized for u in steps):
                return None if current.serial != serial else ([], [])
            if len(steps) == 1:
                return list(steps[0].copies), list(steps[0].rects)
            rects = []
            for step in steps:
                rects += [(0, dst, current.width, h) for _, dst, h in step.copies]
                rects += step.rects
            return [], rects


def _bands(pixels: bytes, stride: int, height: int, band: int) -> list[bytes]:
    return [pixels[y * stride:min(y + band, height) * stride] for y in range(0, height, band)]


def _scroll(old_bands: list[bytes], new_bands: list[bytes]) -> int:
    """The band shift (new band i == old band i + shift) that explains most of
    the frame, or 0 when none explains more than the frame as it stands."""
    positions: dict[bytes, list[int]] = {}
    for index, content in enumerate(old_bands):
        positions.setdefault(content, []).append(index)
    votes: dict[int, int] = {}
    for index, content in enumerate(new_bands):
        for old_index in positions.get(content, ()):
            votes[old_index - index] = votes.get(old_index - index, 0) + 1
    if not votes:
        return 0
    shift = max(votes, key=lambda s: (votes[s], -abs(s)))
    if shift == 0 or votes[shift] <= votes.get(0, 0) or votes[shift] < len(new_bands) // 2:
        return 0
    return shift


def _differences(old: bytes, new: bytes, width: int, height: int, changed: tuple[int, int],
                 band: int) -> tuple[list, list]:
    """(copies, rects) turning OLD into NEW, looking at scan lines CHANGED only."""
    stride = width * 4
    band = max(1, band)
    first, end = changed
    first -= first % band
    old_bands = _bands(old, stride, height, band)
    new_bands = _bands(new, stride, height, band)
    copies = []
    reference = old_bands
    if (first, end) == (0, height) and len(new_bands) > 2:
        shift = _scroll(old_bands, new_bands)
        if shift:
            count = len(new_bands) - abs(shift)
            dst = 0 if shift > 0 else -shift
            src = dst + shift
            height_moved = min(count * band, height - max(src, dst) * band)
            copies.append((src * band, dst * band, height_moved))
            reference = list(old_bands)
            moved = old_bands[src:src + count]
            reference[dst:dst + count] = moved
            # a moved band's last rows may be cut by the frame's end: compare in full
    rects = []
    for index in range(first // band, (min(end, height) + band - 1) // band):
        if new_bands[index] == reference[index]:
            continue
        top = index * band
        rows = min(band, height - top)
        old_band, new_band = reference[index], new_bands[index]
        x = 0
        while x < width:
            tile = min(TILE, width - x)
            if len(old_band) != len(new_band) or any(
                    old_band[r * stride + 4 * x:r * stride + 4 * (x + tile)] !=
                    new_band[r * stride + 4 * x:r * stride + 4 * (x + tile)]
                    for r in range(rows)):
                if rects and rects[-1][1] == top and rects[-1][0] + rects[-1][2] == x:
                    left = rects.pop()
                    rects.append((left[0], top, left[2] + tile, rows))
                else:
                    rects.append((x, top, tile, rows))
            x += tile
    return copies, rects
