"""The disk images one VM holds locked, for a live migration to hand over.

block.BlockImage locks its image as QEMU does (block.py says how).  A live
migration's source and destination both open the same images; the
destination must not lock them before the source lets go, after its last
write.  So the VM gathers the images its disks open while it is built
(ImageLocks.collecting), and the migration calls release() on the source
and take() on the destination.

Its own module, apart from block.py, because every VM makes one: a VM
without disks then never imports the block backend (about 0.4 ms of every
start).  The set being gathered is per thread, as a VM is built on one.
"""

import contextlib
import threading

from .config import ConfigError

_gathering = threading.local()      # .locks: the ImageLocks being gathered on this thread


class ImageLocks:
    """The locked images of one VM, gathered while it is built (collecting()).
    With `deferred` (a migration destination) images open without their lock
    until take()."""

    def __init__(self, deferred: bool = False):
        self.deferred = deferred
        self.images: list = []          # block.BlockImage

    @contextlib.contextmanager
    def collecting(self):
        """Images opened in this context (on this thread) join this set."""
        outer = getattr(_gathering, "locks", None)
        _gathering.locks = self
        try:
            yield self
        finally:
            _gathering.locks = outer

    def release(self) -> None:
        """The source, after its last write: others may lock the images now."""
        for image in self.images:
            image.unlock()

    def take(self) -> None:
        """Lock every image (again); ConfigError, with none held, if one is
        locked elsewhere."""
        taken = []
        try:
            for image in self.images:
                image.lock()
                taken.append(image)
        except ConfigError:
            for image in taken:
                image.unlock()
            raise


def gathering() -> ImageLocks | None:
    """The ImageLocks that an image opened now on this thread joins, if any."""
    return getattr(_gathering, "locks", None)
