"""`virtio-blk`: a disk backed by a file or block device (virtio 1.2, 5.2).

    -s SLOT,virtio-blk,PATH[,ro][,nocache][,direct][,nodelete][,lock=off]
                          [,sectorsize=L[/P]][,ser=ID]

as bhyve's pci_virtio_block and blockif take them: `ro` opens read-only and
offers VIRTIO_BLK_F_RO; `nocache` opens with O_DIRECT; `direct` opens with
O_SYNC; `nodelete` withholds DISCARD; `lock=off` leaves the image unlocked
(pyhyve.block locks it against other VMs by default, as QEMU does);
`sectorsize` sets the logical block size (and, after the slash, the
physical one, reported through TOPOLOGY);
`ser` is the 20-byte ID GET_ID returns (default: "BHYVE-" and a hash of the
path, as bhyve makes it).

Data moves with preadv/pwritev straight between the image (pyhyve.block,
which also holds O_DIRECT, hole punching and zeroing) and guest memory.
DISCARD is offered only where the image can punch holes; WRITE_ZEROES on any
writable disk.

A snapshot keeps no request of its own: the transport serves every offered
request before it saves the queues (the transport's quiesce()), and the
disk is synced (this model's), so the guest finds each write it saw complete on the disk after a
restore, and re-sends none.
"""

import contextlib
import hashlib
import os
import struct

from ..block import DIRECT_ALIGN, BlockImage
from ..config import Config, ConfigError
from .device import Transport, VirtioDevice
from .queue import Chain, VirtqueueError, split_buffers

VIRTIO_ID_BLOCK = 2

F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WRITE_ZEROES_UNMAP = 1

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2
ID_BYTES = 20
MAX_RANGE_SECTORS = 0x3FFFFF     # per DISCARD/WRITE_ZEROES segment, as QEMU
MAX_RANGE_SEGMENTS = 32

_HEADER = struct.Struct("<IIQ")            # type, reserved (ioprio), sector
_SEGMENT = struct.Struct("<QII")           # sector, num_sectors, flags
# struct virtio_blk_config up to write_zeroes_may_unmap (5.2.4)
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

def _sector_sizes(text: str) -> tuple[int, int]:
    logical, _, physical = text.partition("/")
    try:
        sizes = int(logical), int(physical or logical)
    except ValueError:
        raise ConfigError(f"virtio-blk: sectorsize '{text}' is not L or L/P") from None
    for size in sizes:
        if size < SECTOR or size > 65536 or size & (size - 1):
            raise ConfigError(f"virtio-blk: sector size {size} is not a power of two "
                              "from 512 to 65536")
    if sizes[1] < sizes[0]:
        raise ConfigError(f"virtio-blk: physical sector size {sizes[1]} is below the "
                          f"logical {sizes[0]}")
    return sizes


class VirtioBlock(VirtioDevice):
    """virtio block device: the model, built from its options (config keys)"""

    device_type = VIRTIO_ID_BLOCK
    name = "virtio-blk"

    def __init__(self, transport: Transport, options: dict[str, str]):
        keys = Config(options)
        path = options.get("path")
        if not path:
            raise ConfigError("virtio-blk: no disk path given (-s SLOT,virtio-blk,PATH)")
        try:
            self.read_only = keys.get_bool("ro")
            nocache = keys.get_bool("nocache")
            sync = keys.get_bool("direct")
            nodelete = keys.get_bool("nodelete")
            lock = keys.get_bool("lock", True)
        except ConfigError as exc:
            raise ConfigError(f"virtio-blk: {exc}") from None
        logical, physical = _sector_sizes(options.get("sectorsize", "512"))
        serial = options.get("ser")
        if serial is None:
            digest = hashlib.md5(os.fsencode(path)).digest()
            serial = "BHYVE-%02X%02X-%02X%02X-%02X%02X" % tuple(digest[:6])
        self.serial = serial.encode("ascii", "replace")[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.path = path

        self.image = BlockImage("virtio-blk", path, self.read_only, nocache, sync, nodelete,
                                lock)
        try:
            self.capacity = self.image.size // SECTOR
            features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY
            features |= F_RO if self.read_only else F_WRITE_ZEROES
            if self.image.can_punch:
                features |= F_DISCARD
            super().__init__(transport, [QUEUE_SIZE], features, _CONFIG.size)
        except BaseException:
            self.image.close()
            raise
        _CONFIG.pack_into(
            self.config, 0, self.capacity, 0, SEG_MAX, 0, 0, 0, logical,
            (physical // logical).bit_length() - 1, 0, 0, 0, 0, 0, 1,
            MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, logical // SECTOR,
            MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, int(self.image.can_punch))

    def close(self) -> None:
        self.image.close()

    @contextlib.contextmanager
    def quiesce(self):
        """Requests are served whole under the device lock, so once quiesced no
        request is half done; completed writes go to stable storage before the
        snapshot that counts them as done is written."""
        self.image.flush()
        yield

    # --- requests ----------------------------------------------------------------------
    def handle_request(self, index: int, chain: Chain) -> int:
        """Serve one request; the status goes in the last byte the driver gave us."""
        readable, writable = chain.readable, chain.writable
        if not writable:
            raise VirtqueueError("block request without a status byte")
        memory = self.transport.memory
        status_gpa, status_length = writable[-1]
        if readable and readable[0][1] == _HEADER.size and status_length == 1:
            # How drivers lay a request out: the header alone in the first
            # buffer, the status byte alone in the last.
            header_bytes = memory.view(*readable[0])
            data_out, data_in = readable[1:], writable[:-1]
        else:
            data_in, status = split_buffers(writable, sum(n for _, n in writable) - 1)
            status_gpa = status[0][0]
            header, data_out = split_buffers(readable, _HEADER.size)
            header_bytes = b"".join(memory.view(g, n) for g, n in header)
        written = 0
        if len(header_bytes) < _HEADER.size:
            result = S_IOERR
        else:
            kind, _, sector = _HEADER.unpack(header_bytes)
            try:
                result, written = self._serve(kind, sector, data_in, data_out)
            except OSError as exc:
                self.transport.warn_once(f"io-{exc.errno}", "I/O error on %s: %s",
                                         self.path, exc.strerror)
                result, written = S_IOERR, 0
        memory.view(status_gpa, 1, write=True)[0] = result
        return written + 1

    def _serve(self, kind: int, sector: int, data_in, data_out) -> tuple[int, int]:
        """(status, bytes written into data_in) for one request."""
        memory = self.transport.memory
        if kind == T_IN or kind == T_OUT:
            reading = kind == T_IN
            if not reading and self.read_only:
                return S_IOERR, 0
            length, aligned, views = 0, True, []
            for gpa, n in data_in if reading else data_out:
                length += n
                aligned = aligned and not (gpa % DIRECT_ALIGN or n % DIRECT_ALIGN)
                views.append(memory.view(gpa, n, write=reading))
            if length % SECTOR or not self._in_disk(sector, length // SECTOR):
                return S_IOERR, 0
            move = self.image.readv if reading else self.image.writev
            if not move(views, sector * SECTOR, aligned):
                return S_IOERR, 0
            return S_OK, length if reading else 0
        if kind == T_FLUSH:
            self.image.flush()
            return S_OK, 0
        if kind == T_GET_ID:
            views = [memory.view(g, n, write=True) for g, n in data_in]
            done = 0
            for view in views:
                count = min(len(view), ID_BYTES - done)
                view[:count] = self.serial[done:done + count]
                done += count
            return S_OK, done
        if kind == T_DISCARD or kind == T_WRITE_ZEROES:
            return self._ranges(kind, data_out), 0
        return S_UNSUPP, 0

    def _in_disk(self, sector: int, count: int) -> bool:
        return sector + count <= self.capacity

    def _ranges(self, kind: int, data_out) -> int:
        """DISCARD and WRITE_ZEROES: a list of (sector, count, flags) segments."""
        if self.read_only:
            return S_IOERR
        if kind == T_DISCARD and not self.image.can_punch:
            return S_UNSUPP
        length = sum(n for _, n in data_out)
        if not length or length % _SEGMENT.size or length > _SEGMENT.size * MAX_RANGE_SEGMENTS:
            return S_IOERR
        table = b"".join(self.transport.memory.view(g, n) for g, n in data_out)
        segments = list(_SEGMENT.iter_unpack(table))
        for sector, count, flags in segments:
            allowed = WRITE_ZEROES_UNMAP if kind == T_WRITE_ZEROES else 0
            if flags & ~allowed:
                return S_UNSUPP
            if count > MAX_RANGE_SECTORS or not self._in_disk(sector, count):
                return S_IOERR
        for sector, count, flags in segments:
            if count:
                self.image.clear(sector * SECTOR, count * SECTOR,
                                 kind == T_DISCARD or bool(flags & WRITE_ZEROES_UNMAP))
        return S_OK
