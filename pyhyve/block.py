"""One block backend under every disk device (bhyve's block_if.c): a disk
image file or block device, opened as the user's options say.

    image = BlockImage("virtio-blk", path, read_only=False, nocache=True)
    image.readv(views, offset, aligned)       # False if the image ended first
    image.writev(views, offset, aligned)
    image.flush(); image.clear(offset, length, unmap); image.close()

`nocache` opens a second descriptor with O_DIRECT, used for transfers whose
guest buffers, length and offset are all DIRECT_ALIGN-aligned (the device
says so: guest memory is mapped in page-aligned pieces, so a buffer's guest
address tells its host alignment); others go through the cached descriptor.
Linux keeps the two coherent: a direct read writes back cached dirty pages
first, a direct write invalidates them.  `sync` adds O_SYNC to both.

Locking, as QEMU's: an open file description lock (F_OFD_SETLK) on the whole
image, shared for a read-only disk and exclusive for a writable one, so two
VMs never write one image, nor one read it while another writes.  OFD locks
belong to the descriptor, not the process: they survive the privilege drop,
and go away with the descriptor (or the process, however it ends).
`lock=False` is the operator's way out (an image on a filesystem without
locks, or shared on purpose).  A live migration hands the lock over
(pyhyve/imagelocks.py): the VM collects the images it opens while it is
built; the destination's take their lock only once the source has released
its own, after its last write.

clear() makes a range read as zeros: a hole (fallocate PUNCH_HOLE) where
unmapping is allowed and the filesystem punches holes (probed once, past
the end of the file, where it changes nothing); else ZERO_RANGE; else
written zeros, so any writable image can do it.  Errors opening the image
are ConfigError naming the device; I/O errors are OSError for the device to
report to its guest.
"""

import ctypes
import errno
import fcntl
import os
import stat
import struct

from .config import ConfigError
from .imagelocks import gathering
from .log import getLogger

log = getLogger(__name__)

DIRECT_ALIGN = 4096
ZERO_CHUNK = 1 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_FLOCK = struct.Struct("@hhqqi4x")      # struct flock: type, whence, start, length, pid
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def transfer(function, fd: int, views: list[memoryview], offset: int) -> bool:
    """preadv/pwritev all of `views` at `offset`, resuming short transfers;
    False if the file ended first."""
    start = 0
    while start < len(views):
        done = function(fd, views[start:start + IOV_MAX], offset)
        if done <= 0:
            return False
        offset += done
        while done and done >= len(views[start]):
            done -= len(views[start])
            start += 1
        if done:
            views[start] = views[start][done:]
    return True


class BlockImage:
    """An open disk image: its size, what it can do, and I/O on it."""

    def __init__(self, owner: str, path: str, read_only: bool = False, nocache: bool = False,
                 sync: bool = False, nodelete: bool = False, lock: bool = True):
        """`owner` (the device, "virtio-blk") prefixes error messages."""
        self.owner, self.path, self.read_only = owner, path, read_only
        extra = os.O_SYNC if sync else 0
        self.fd = self._open(extra)
        self.direct_fd = None
        try:
            locks = gathering()
            if lock and locks is not None:
                locks.images.append(self)
            if lock and not (locks is not None and locks.deferred):
                self.lock()
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise ConfigError(f"{owner}: {path} is not a regular file or block device")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            if nocache:
                self.direct_fd = self._open_direct(extra)
            self.can_punch = not read_only and not nodelete and self._probe_punch()
            self.zero_range = True            # until the filesystem says otherwise
        except BaseException:
            self.close()
            raise

    def lock(self) -> None:
        kind = fcntl.F_RDLCK if self.read_only else fcntl.F_WRLCK
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                held = "is open for writing" if self.read_only else "is in use"
                raise ConfigError(f"{self.owner}: {self.path} {held} elsewhere (another VM?); "
                                  "lock=off shares it anyway") from None
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise ConfigError(f"{self.owner}: cannot lock {self.path}: "
                                  f"{exc.strerror}") from None
            log.warning("%s: %s cannot be locked here (%s); opened without a lock",
                        self.owner, self.path, exc.strerror)

    def unlock(self) -> None:
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK,
                        _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
        except OSError as exc:     # a filesystem without locks: none was held
            log.debug("%s: unlocking %s: %s", self.owner, self.path, exc.strerror)

    def _open(self, extra: int) -> int:
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC | extra
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            raise ConfigError(f"{self.owner}: {self.path}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{self.owner}: {self.path} is a directory") from None
        except OSError as exc:
            if not self.read_only and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ConfigError(f"{self.owner}: {self.path} is not writable "
                                  f"({exc.strerror}); add ,ro to use it read-only") from None
            raise ConfigError(f"{self.owner}: cannot open {self.path}: {exc.strerror}") from None

    def _open_direct(self, extra: int) -> int | None:
        try:
            return self._open(extra | os.O_DIRECT)
        except ConfigError as exc:
            log.warning("%s; nocache ignored: the page cache stays in use", exc)
            return None

    def _probe_punch(self) -> bool:
        """Whether hole punching works here: past the end of the file it changes nothing."""
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self.size, 512)
        except OSError:
            return False
        return True

    # --- I/O ------------------------------------------------------------------------
    def _fd_for(self, offset: int, aligned: bool) -> int:
        if self.direct_fd is not None and aligned and offset % DIRECT_ALIGN == 0:
            return self.direct_fd
        return self.fd

    def readv(self, views: list[memoryview], offset: int, aligned: bool = False) -> bool:
        """Fill `views` from `offset`; `aligned`: every buffer's guest address and
        length are DIRECT_ALIGN-aligned, so O_DIRECT may carry it."""
        return transfer(os.preadv, self._fd_for(offset, aligned), views, offset)

    def writev(self, views: list[memoryview], offset: int, aligned: bool = False) -> bool:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        return transfer(os.pwritev, self._fd_for(offset, aligned), views, offset)

    def flush(self) -> None:
        """What was written is on stable storage when this returns."""
        if not self.read_only:
            os.fdatasync(self.fd)

    def clear(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeros: a hole if allowed, else zeroed blocks."""
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        if unmap and self.can_punch:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        if self.zero_range:
            try:
                _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                    raise
                self.zero_range = False
        zeros = bytes(min(length, ZERO_CHUNK))
        while length:
            count = min(length, len(zeros))
            if not transfer(os.pwritev, self.fd, [memoryview(zeros)[:count]], offset):
                raise OSError(errno.EIO, "short write while zeroing")
            offset += count
            length -= count

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None
