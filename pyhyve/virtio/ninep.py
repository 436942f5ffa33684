"""`virtio-9p`: a host directory shared with the guest over 9P2000.L (virtio
1.2, 5.11), as bhyve's pci_virtio_9p.

    -s SLOT,virtio-9p,SHARENAME=PATH[,ro]

SHARENAME is the mount tag the guest sees in config space (feature
VIRTIO_9P_MOUNT_TAG): `mount -t 9p -o trans=virtio,version=9p2000.L SHARENAME
/mnt`.  `ro` answers every call that would change the share with EROFS.

Each request is one chain: the T-message in the readable buffers, the
R-message written into the writable ones.  The server speaks 9P2000.L only:
Tversion, Tattach, Twalk, Tlopen, Tlcreate, Tread, Twrite, Tclunk, Tremove,
Tgetattr, Tsetattr, Treaddir, Tstatfs, Tmkdir, Tsymlink, Treadlink, Tlink,
Trenameat, Tunlinkat, Tfsync, Tflush, Txattrwalk (no extended attributes:
an empty list, ENODATA for a name), Tlock and Tgetlock (granted: locks are
the guest's business); anything else is Rlerror EOPNOTSUPP.  Every length,
count and offset in a message is checked against the message and the
negotiated msize; a message that does not parse gets Rlerror EINVAL, one too
short to carry a tag is dropped and logged once.

Confinement (pyhyve.sharedir): each fid holds an O_PATH descriptor of its
object, every walk opens one component beneath its directory's descriptor
without following symbolic links, and '..' at the share's root stays there.
Files are created as the user pyhyve runs as; Tsetattr's owner change is
attempted and its refusal (EPERM, unless root) answered as is.  Modes lose
set-user-ID (and, on files, set-group-ID): what the guest writes must not
run with another user's rights on the host.  The fid table is bounded
(MAX_FIDS; EMFILE beyond).

Threading: requests are served whole under the transport's lock, on the
thread that runs the queue (the I/O thread, from the ioeventfd).  A vCPU
thread, where a notify write misses its ioeventfd, has a seccomp filter of
its own that refuses changing files: the guest then gets EPERM for those
calls, and the rest work.

Snapshots: a fid is a host descriptor, and the guest's kernel keeps its fids
across a restore, so they cannot be carried over in a snapshot file.  A
snapshot is refused, with one line naming the device, while the guest holds
any fid (has the share mounted); unmounted, the device saves and restores as
the others (the negotiated msize only).
"""

import contextlib
import errno
import os
import stat
import struct

from .. import sandbox, sharedir
from ..config import Config, ConfigError
from ..lifecycle import expect_keys, uint
from .device import Transport, VirtioDevice
from .queue import Chain

VIRTIO_ID_9P = 9
F_MOUNT_TAG = 1 << 0
QUEUE_SIZE = 128
MAX_TAG = 255                  # bytes of mount tag (Linux keeps it as a string)
MAX_MSIZE = 512 * 1024         # Linux's virtio transport asks for at most ~500 KiB
MIN_MSIZE = 4096               # Linux refuses less itself
MAX_FIDS = 4096
MAX_WALK = 16                  # MAXWELEM
NOFID = 0xFFFFFFFF
HEADER = struct.Struct("<IBH")            # size, type, tag
IOHDR = 4 + 1 + 2 + 4                     # Rread/Rreaddir before their data
V9FS_MAGIC = 0x01021997

# Message types (T; R is T + 1)
TLERROR, TSTATFS, TLOPEN, TLCREATE, TSYMLINK, TMKNOD, TRENAME, TREADLINK = \
    6, 8, 12, 14, 16, 18, 20, 22
TGETATTR, TSETATTR, TXATTRWALK, TXATTRCREATE, TREADDIR = 24, 26, 30, 32, 40
TFSYNC, TLOCK, TGETLOCK, TLINK, TMKDIR, TRENAMEAT, TUNLINKAT = 50, 52, 54, 70, 72, 74, 76
TVERSION, TAUTH, TATTACH, TFLUSH, TWALK, TREAD, TWRITE, TCLUNK, TREMOVE = \
    100, 102, 104, 108, 110, 116, 118, 120, 122
RLERROR = TLERROR + 1

QTDIR, QTSYMLINK, QTFILE = 0x80, 0x02, 0x00
DT_UNKNOWN, DT_DIR, DT_REG, DT_LNK = 0, 4, 8, 10

# Tsetattr's valid bits
SETATTR_MODE, SETATTR_UID, SETATTR_GID, SETATTR_SIZE = 0x1, 0x2, 0x4, 0x8
SETATTR_ATIME, SETATTR_MTIME, SETATTR_ATIME_SET, SETATTR_MTIME_SET = 0x10, 0x20, 0x80, 0x100
GETATTR_BASIC = 0x7FF          # mode, nlink, uid, gid, rdev, times, ino, size, blocks
AT_REMOVEDIR = 0x200
LOCK_SUCCESS = 0
LOCK_TYPE_UNLCK = 2

# Tlopen/Tlcreate flags (Linux's own values on x86) the server passes on;
# the rest (CREAT in Tlopen, NOCTTY, DIRECT, NOFOLLOW, CLOEXEC, ...) it
# decides itself.
OPEN_PASSED = os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_DSYNC | os.O_SYNC
WRITING = os.O_WRONLY | os.O_RDWR | os.O_TRUNC

_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_QID = struct.Struct("<BIQ")
_GETATTR = struct.Struct("<Q13sIIIQQQQQ" + "Q" * 10)
_STATFS = struct.Struct("<IIQQQQQQI")
_SETATTR = struct.Struct("<IIIIIQQQQQ")
_TWO_U32 = struct.Struct("<II")
_THREE_U32 = struct.Struct("<III")
_READ = struct.Struct("<IQI")                # fid, offset, count
_FID_U64 = struct.Struct("<IQ")
_LOCK = struct.Struct("<IBIQQI")             # fid, type, flags, start, length, proc_id
_GETLOCK = struct.Struct("<IBQQI")


class _Malformed(Exception):
    """The message does not hold what its type says."""


class _Reader:
    """The fields of one message body, each checked against its end."""

    __slots__ = ("data", "at")

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, layout: struct.Struct) -> tuple:
        if self.at + layout.size > len(self.data):
            raise _Malformed
        values = layout.unpack_from(self.data, self.at)
        self.at += layout.size
        return values

    def u32(self) -> int:
        return self.take(_U32)[0]

    def string(self) -> bytes:
        (length,) = self.take(_U16)
        if self.at + length > len(self.data):
            raise _Malformed
        value = self.data[self.at:self.at + length]
        self.at += length
        return bytes(value)

    def rest(self, count: int) -> memoryview:
        if self.at + count > len(self.data):
            raise _Malformed
        return memoryview(self.data)[self.at:self.at + count]


def _string(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def _qid(st: os.stat_result) -> bytes:
    if stat.S_ISDIR(st.st_mode):
        kind = QTDIR
    elif stat.S_ISLNK(st.st_mode):
        kind = QTSYMLINK
    else:
        kind = QTFILE
    return _QID.pack(kind, 0, st.st_ino)


def _host_mode(mode: int, directory: bool) -> int:
    """The permission bits the guest asks for, less set-user-ID, and on a file
    set-group-ID: nothing the guest makes may run with another user's rights
    on the host."""
    mode &= 0o7777 & ~stat.S_ISUID
    return mode if directory else mode & ~stat.S_ISGID


def _wire_time(nanoseconds: int) -> tuple[int, int]:
    """A stat time as 9P's u64 seconds (two's complement before 1970) and nanoseconds."""
    seconds, rest = divmod(nanoseconds, 1_000_000_000)
    return seconds & ((1 << 64) - 1), rest


def _time(seconds: int, nanoseconds: int) -> tuple[int, int]:
    """A u64 seconds and nanoseconds pair from the wire as a timespec."""
    if nanoseconds >= 1_000_000_000:
        raise OSError(errno.EINVAL, "nanoseconds out of range")
    return (seconds - (1 << 64) if seconds >= 1 << 63 else seconds), nanoseconds


class _Fid:
    """What one guest fid names: its object's O_PATH descriptor, and, once
    opened, a descriptor for I/O.  `listing` holds a directory's entries
    between Treaddir calls; an xattr fid (Txattrwalk) reads as empty."""

    __slots__ = ("fd", "mode", "file", "writable", "listing", "xattr")

    def __init__(self, fd: int, mode: int, xattr: bool = False):
        self.fd, self.mode = fd, mode
        self.file: int | None = None
        self.writable = False
        self.listing: list[bytes] | None = None
        self.xattr = xattr

    def close(self) -> None:
        if self.file is not None:
            os.close(self.file)
            self.file = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def share_options(options: dict[str, str]) -> tuple[str, str, bool]:
    """(mount tag, path, read-only) from the emulation's options, checked."""
    tag, path = options.get("sharename"), options.get("path")
    if not tag or not path:
        raise ConfigError("virtio-9p: give the share as SHARENAME=PATH "
                          "(-s SLOT,virtio-9p,SHARENAME=PATH[,ro])")
    encoded = tag.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_TAG or not tag.isprintable() or " " in tag:
        raise ConfigError(f"virtio-9p: share name '{tag}' is not 1 to {MAX_TAG} printable "
                          "characters without spaces")
    try:
        read_only = Config(options).get_bool("ro")
    except ConfigError as exc:
        raise ConfigError(f"virtio-9p: {exc}") from None
    return tag, path, read_only


class Virtio9p(VirtioDevice):
    """virtio 9P transport for one shared directory (sharename, path, ro)"""

    device_type = VIRTIO_ID_9P
    name = "virtio-9p"

    def __init__(self, transport: Transport, options: dict[str, str]):
        tag, self.path, self.read_only = share_options(options)
        try:
            self.root = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"virtio-9p: {self.path}: {exc.strerror}") from None
        self.root_stat = os.fstat(self.root)
        encoded = tag.encode("utf-8", "surrogateescape")
        super().__init__(transport, [QUEUE_SIZE], F_MOUNT_TAG, 2 + len(encoded))
        self.config[:] = _U16.pack(len(encoded)) + encoded
        self.fids: dict[int, _Fid] = {}
        self.msize = 0                 # 0: no Tversion yet
        sandbox.serve_directory(self.path, writable=not self.read_only)

    # --- lifecycle ---------------------------------------------------------------------
    def reset(self) -> None:
        self._clunk_all()
        self.msize = 0

    def close(self) -> None:
        self._clunk_all()
        if self.root >= 0:
            os.close(self.root)
            self.root = -1

    def _clunk_all(self) -> None:
        for fid in self.fids.values():
            fid.close()
        self.fids.clear()

    @contextlib.contextmanager
    def quiesce(self):
        """Requests are served whole under the lock; fids cannot be saved (see
        the module docstring), so a snapshot with any is refused here."""
        if self.fids:
            raise OSError(errno.EBUSY, f"the guest holds fids of the 9P share "
                          f"'{self.path}' (has it mounted); 9P fids do not survive a "
                          "snapshot: unmount it first")
        yield

    def save_state(self) -> dict:
        return {"msize": self.msize}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("msize",), self.name)
        msize = uint(state["msize"], MAX_MSIZE, f"{self.name} msize")
        self._clunk_all()
        self.msize = msize

    # --- requests ------------------------------------------------------------------------
    def handle_request(self, index: int, chain: Chain) -> int:
        memory = self.transport.memory
        request = self._read_request(chain, memory)
        space = sum(length for _, length in chain.writable)
        if len(request) < HEADER.size:
            self.transport.warn_once("short", "dropped a request of %d bytes: shorter "
                                     "than a 9P header", len(request))
            return 0
        size, kind, tag = HEADER.unpack_from(request)
        if size < HEADER.size or size > len(request) or size > (self.msize or MAX_MSIZE):
            reply = self._error(tag, errno.EINVAL)
        else:
            reply = self._serve(kind, tag, request[HEADER.size:size], space)
        if len(reply) > space:
            reply = self._error(tag, errno.ENOBUFS)
            if len(reply) > space:
                self.transport.warn_once("no-room", "dropped a reply: the request left "
                                         "%d bytes for it", space)
                return 0
        return chain.write(memory, reply)

    def _read_request(self, chain: Chain, memory) -> bytes:
        """The readable buffers, up to the most a message may hold."""
        left = self.msize or MAX_MSIZE
        parts = []
        for gpa, length in chain.readable:
            if not left:
                break
            count = min(length, left)
            parts.append(memory.view(gpa, count))
            left -= count
        return b"".join(parts)

    @staticmethod
    def _error(tag: int, code: int) -> bytes:
        return HEADER.pack(HEADER.size + 4, RLERROR, tag) + _U32.pack(code)

    def _serve(self, kind: int, tag: int, body: bytes, space: int) -> bytes:
        handler = _HANDLERS.get(kind)
        if handler is None:
            return self._error(tag, errno.EOPNOTSUPP)
        if kind != TVERSION and not self.msize:
            return self._error(tag, errno.EPROTO)
        try:
            reply = handler(self, _Reader(body), min(space, self.msize or MAX_MSIZE))
        except _Malformed:
            self.transport.warn_once(f"malformed-{kind}", "malformed 9P message of type %d",
                                     kind)
            return self._error(tag, errno.EINVAL)
        except OSError as exc:
            return self._error(tag, exc.errno or errno.EIO)
        return HEADER.pack(HEADER.size + len(reply), kind + 1, tag) + reply

    # --- fids ----------------------------------------------------------------------------
    def _fid(self, number: int) -> _Fid:
        fid = self.fids.get(number)
        if fid is None:
            raise OSError(errno.EBADF, "no such fid")
        return fid

    def _dir(self, number: int) -> _Fid:
        fid = self._fid(number)
        if not stat.S_ISDIR(fid.mode) or fid.xattr:
            raise OSError(errno.ENOTDIR, "not a directory")
        return fid

    def _new_fid(self, number: int, replacing: int | None = None) -> None:
        """NUMBER may become a fid (REPLACING: it may be that one)."""
        if number == NOFID:
            raise OSError(errno.EINVAL, "NOFID")
        if number in self.fids and number != replacing:
            raise OSError(errno.EEXIST, "fid in use")
        if number not in self.fids and len(self.fids) >= MAX_FIDS:
            raise OSError(errno.EMFILE, "too many fids")

    def _set_fid(self, number: int, fid: _Fid) -> None:
        old = self.fids.pop(number, None)
        if old is not None:
            old.close()
        self.fids[number] = fid

    def _writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only share")

    def _is_root(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.root_stat.st_dev, self.root_stat.st_ino)

    @staticmethod
    def _child_name(reader: _Reader) -> bytes:
        """A name a call creates or removes: one component, not '.' or '..'."""
        name = reader.string()
        sharedir.check_name(name)
        if name in (b".", b".."):
            raise OSError(errno.EINVAL, "'.' or '..'")
        return name

    def _child_qid(self, dir_fd: int, name: bytes) -> bytes:
        return _qid(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))

    # --- session -------------------------------------------------------------------------
    def _version(self, reader: _Reader, space: int) -> bytes:
        (msize,) = reader.take(_U32)
        version = reader.string()
        self._clunk_all()
        if msize < MIN_MSIZE:
            self.msize = 0
            raise OSError(errno.EINVAL, "msize too small")
        self.msize = min(msize, MAX_MSIZE)
        answer = b"9P2000.L" if version.startswith(b"9P2000.L") else b"unknown"
        if answer == b"unknown":
            self.msize = 0
        return _U32.pack(min(msize, MAX_MSIZE)) + _string(answer)

    def _attach(self, reader: _Reader, space: int) -> bytes:
        number, _afid = reader.take(_TWO_U32)
        reader.string()                 # uname
        reader.string()                 # aname: there is one tree
        reader.take(_U32)               # n_uname
        self._new_fid(number)
        fd = os.dup(self.root)
        self._set_fid(number, _Fid(fd, self.root_stat.st_mode))
        return _qid(self.root_stat)

    def _flush(self, reader: _Reader, space: int) -> bytes:
        reader.take(_U16)               # oldtag: every request before it is answered
        return b""

    def _clunk(self, reader: _Reader, space: int) -> bytes:
        number = reader.u32()
        self._fid(number)
        self.fids.pop(number).close()
        return b""

    # --- walking -------------------------------------------------------------------------
    def _walk(self, reader: _Reader, space: int) -> bytes:
        number, new_number = reader.take(_TWO_U32)
        (count,) = reader.take(_U16)
        if count > MAX_WALK:
            raise _Malformed
        names = [reader.string() for _ in range(count)]
        start = self._fid(number)
        if start.xattr:
            raise OSError(errno.EINVAL, "an xattr fid")
        self._new_fid(new_number, replacing=number)
        fd = os.dup(start.fd)
        mode = start.mode
        qids = []
        try:
            for name in names:
                try:
                    next_fd, st = self._step(fd, mode, name)
                except OSError:
                    if not qids:
                        raise
                    break
                os.close(fd)
                fd, mode = next_fd, st.st_mode
                qids.append(_qid(st))
        except BaseException:
            os.close(fd)
            raise
        if len(qids) < len(names):      # a partial walk: newfid is not made
            os.close(fd)
        else:
            self._set_fid(new_number, _Fid(fd, mode))
        return _U16.pack(len(qids)) + b"".join(qids)

    def _step(self, fd: int, mode: int, name: bytes) -> tuple[int, os.stat_result]:
        """One walk element from directory FD: (new O_PATH descriptor, its stat)."""
        sharedir.check_name(name)
        if not stat.S_ISDIR(mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        if name == b".":
            new = os.dup(fd)
        elif name == b"..":
            new = self._parent(fd)
        else:
            new = sharedir.open_beneath(fd, name, os.O_PATH)
        try:
            return new, os.fstat(new)
        except BaseException:
            os.close(new)
            raise

    def _parent(self, fd: int) -> int:
        """'..' of directory FD, which at the share's root is the root."""
        if self._is_root(os.fstat(fd)):
            return os.dup(self.root)
        where = sharedir.location(self.root, fd)
        if not where:
            raise OSError(errno.ENOENT, "no longer in the share")
        parent = sharedir.walk(self.root, where[:-1])
        try:
            st = os.stat(where[-1], dir_fd=parent, follow_symlinks=False)
            here = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (here.st_dev, here.st_ino):
                raise OSError(errno.ENOENT, "moved")
        except BaseException:
            os.close(parent)
            raise
        return parent

    # --- opening -------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        flags &= OPEN_PASSED
        if flags & os.O_ACCMODE == os.O_ACCMODE:
            raise OSError(errno.EINVAL, "no access mode")
        if flags & WRITING:
            self._writable()
        return flags

    def _lopen(self, reader: _Reader, space: int) -> bytes:
        number, flags = reader.take(_TWO_U32)
        fid = self._fid(number)
        if fid.file is not None or fid.xattr:
            raise OSError(errno.EINVAL, "already open")
        flags = self._open_flags(flags)
        if stat.S_ISDIR(fid.mode):
            if flags & WRITING:
                raise OSError(errno.EISDIR, "a directory")
            fid.file = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fid.fd)
        elif stat.S_ISREG(fid.mode):
            fid.file = sharedir.reopen(fid.fd, flags)
        elif stat.S_ISLNK(fid.mode):
            raise OSError(errno.ELOOP, "a symbolic link")
        else:                           # devices, FIFOs and sockets stay closed
            raise OSError(errno.EOPNOTSUPP, "not a file or directory")
        fid.writable = bool(flags & os.O_ACCMODE)
        fid.listing = None
        return _qid(os.fstat(fid.fd)) + _U32.pack(0)

    def _lcreate(self, reader: _Reader, space: int) -> bytes:
        number = reader.u32()
        name = self._child_name(reader)
        flags, mode, _gid = reader.take(_THREE_U32)
        self._writable()
        fid = self._dir(number)
        if fid.file is not None:
            raise OSError(errno.EINVAL, "already open")
        flags = self._open_flags(flags) | os.O_CREAT | (flags & os.O_EXCL)
        mode = _host_mode(mode, directory=False)
        file = sharedir.open_beneath(fid.fd, name, flags, mode)
        try:
            os.fchmod(file, mode)               # the guest applied its umask; not ours
            path_fd = sharedir.reopen(file, os.O_PATH)
        except BaseException:
            os.close(file)
            raise
        os.close(fid.fd)
        fid.fd, fid.file, fid.mode = path_fd, file, os.fstat(file).st_mode
        fid.writable = bool(flags & os.O_ACCMODE)
        return _qid(os.fstat(file)) + _U32.pack(0)

    # --- data ----------------------------------------------------------------------------
    def _read(self, reader: _Reader, space: int) -> bytes:
        number, offset, count = reader.take(_READ)
        fid = self._fid(number)
        count = max(0, min(count, space - IOHDR))
        if fid.xattr:
            return _U32.pack(0)
        if fid.file is None:
            raise OSError(errno.EBADF, "not open")
        if offset >= 1 << 63:
            raise OSError(errno.EINVAL, "offset out of range")
        data = os.pread(fid.file, count, offset)
        return _U32.pack(len(data)) + data

    def _write(self, reader: _Reader, space: int) -> bytes:
        number, offset, count = reader.take(_READ)
        data = reader.rest(count)
        fid = self._fid(number)
        if fid.file is None or not fid.writable:
            raise OSError(errno.EBADF, "not open for writing")
        if offset >= 1 << 63:
            raise OSError(errno.EINVAL, "offset out of range")
        return _U32.pack(os.pwrite(fid.file, data, offset))

    def _fsync(self, reader: _Reader, space: int) -> bytes:
        number, datasync = reader.take(_TWO_U32)
        fid = self._fid(number)
        if fid.file is None:
            raise OSError(errno.EBADF, "not open")
        (os.fdatasync if datasync else os.fsync)(fid.file)
        return b""

    def _readdir(self, reader: _Reader, space: int) -> bytes:
        number, offset, count = reader.take(_READ)
        fid = self._dir(number)
        if fid.listing is None or offset == 0:
            fid.listing = self._list(fid.fd)
        count = max(0, min(count, space - IOHDR))
        entries, used = [], 0
        for entry in fid.listing[offset:] if offset < len(fid.listing) else ():
            if used + len(entry) > count:
                break
            entries.append(entry)
            used += len(entry)
        return _U32.pack(used) + b"".join(entries)

    def _list(self, fd: int) -> list[bytes]:
        """Each entry as Rreaddir carries it, its offset the position after it."""
        here = os.fstat(fd)
        found = [(b".", _qid(here), DT_DIR), (b"..", _qid(here), DT_DIR)]
        directory = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            self._scan(directory, found)
        finally:
            os.close(directory)
        return [qid + struct.pack("<QB", position + 1, dtype) + _string(name)
                for position, (name, qid, dtype) in enumerate(found)]

    @staticmethod
    def _scan(directory: int, found: list) -> None:
        """(name, qid, d_type) of each entry; an entry's type may need an
        fstatat on DIRECTORY (where the file system gives no d_type)."""
        with os.scandir(directory) as scan:
            for entry in scan:
                if entry.is_symlink():
                    kind, dtype = QTSYMLINK, DT_LNK
                elif entry.is_dir(follow_symlinks=False):
                    kind, dtype = QTDIR, DT_DIR
                elif entry.is_file(follow_symlinks=False):
                    kind, dtype = QTFILE, DT_REG
                else:
                    kind, dtype = QTFILE, DT_UNKNOWN
                found.append((os.fsencode(entry.name), _QID.pack(kind, 0, entry.inode()),
                              dtype))

    # --- attributes ----------------------------------------------------------------------
    def _getattr(self, reader: _Reader, space: int) -> bytes:
        number, _mask = reader.take(_FID_U64)
        fid = self._fid(number)
        st = os.fstat(fid.fd)
        return _GETATTR.pack(
            GETATTR_BASIC, _qid(st), st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
            st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,
            *_wire_time(st.st_atime_ns), *_wire_time(st.st_mtime_ns),
            *_wire_time(st.st_ctime_ns), 0, 0, 0, 0)

    def _setattr(self, reader: _Reader, space: int) -> bytes:
        (number, valid, mode, uid, gid, size, atime_s, atime_ns, mtime_s,
         mtime_ns) = reader.take(_SETATTR)
        fid = self._fid(number)
        self._writable()
        if valid & SETATTR_MODE:
            if stat.S_ISLNK(fid.mode):
                raise OSError(errno.EOPNOTSUPP, "mode of a symbolic link")
            os.chmod(sharedir.proc_path(fid.fd), _host_mode(mode, stat.S_ISDIR(fid.mode)))
        if valid & (SETATTR_UID | SETATTR_GID):
            sharedir.chown(fid.fd, uid if valid & SETATTR_UID else -1,
                           gid if valid & SETATTR_GID else -1)
        if valid & SETATTR_SIZE:
            if stat.S_ISDIR(fid.mode):
                raise OSError(errno.EISDIR, "a directory")
            if not stat.S_ISREG(fid.mode) or size >= 1 << 63:
                raise OSError(errno.EINVAL, "not a file, or too large")
            os.truncate(sharedir.proc_path(fid.fd), size)
        if valid & (SETATTR_ATIME | SETATTR_MTIME):
            sharedir.set_times(fid.fd, self._when(valid, SETATTR_ATIME, SETATTR_ATIME_SET,
                                                  atime_s, atime_ns),
                               self._when(valid, SETATTR_MTIME, SETATTR_MTIME_SET,
                                          mtime_s, mtime_ns))
        return b""

    @staticmethod
    def _when(valid: int, change: int, given: int, seconds: int, nanoseconds: int):
        if not valid & change:
            return 0, sharedir.UTIME_OMIT
        if not valid & given:
            return 0, sharedir.UTIME_NOW
        return _time(seconds, nanoseconds)

    def _statfs(self, reader: _Reader, space: int) -> bytes:
        fid = self._fid(reader.u32())
        vfs = os.statvfs(fid.fd)
        return _STATFS.pack(V9FS_MAGIC, vfs.f_bsize, vfs.f_blocks, vfs.f_bfree, vfs.f_bavail,
                            vfs.f_files, vfs.f_ffree, vfs.f_fsid & ((1 << 64) - 1),
                            vfs.f_namemax)

    def _readlink(self, reader: _Reader, space: int) -> bytes:
        fid = self._fid(reader.u32())
        if not stat.S_ISLNK(fid.mode):
            raise OSError(errno.EINVAL, "not a symbolic link")
        target = os.readlink(b"", dir_fd=fid.fd)
        if len(target) > 0xFFFF:
            raise OSError(errno.ENAMETOOLONG, "target too long")
        return _string(target)

    def _xattrwalk(self, reader: _Reader, space: int) -> bytes:
        """No extended attributes: the list is empty, a name is not there."""
        number, new_number = reader.take(_TWO_U32)
        name = reader.string()
        fid = self._fid(number)
        if name:
            raise OSError(errno.ENODATA, "no such attribute")
        self._new_fid(new_number, replacing=number)
        self._set_fid(new_number, _Fid(os.dup(fid.fd), fid.mode, xattr=True))
        return struct.pack("<Q", 0)

    # --- changing the tree ---------------------------------------------------------------
    def _mkdir(self, reader: _Reader, space: int) -> bytes:
        number = reader.u32()
        name = self._child_name(reader)
        mode, _gid = reader.take(_TWO_U32)
        self._writable()
        fid = self._dir(number)
        mode = _host_mode(mode, directory=True)
        os.mkdir(name, mode, dir_fd=fid.fd)
        made = sharedir.open_beneath(fid.fd, name, os.O_PATH | os.O_DIRECTORY)
        try:
            os.chmod(sharedir.proc_path(made), mode)     # past our umask
            return _qid(os.fstat(made))
        finally:
            os.close(made)

    def _symlink(self, reader: _Reader, space: int) -> bytes:
        number = reader.u32()
        name = self._child_name(reader)
        target = reader.string()
        reader.take(_U32)               # gid
        self._writable()
        fid = self._dir(number)
        if not target or b"\0" in target:
            raise OSError(errno.EINVAL, "bad target")
        os.symlink(target, name, dir_fd=fid.fd)
        return self._child_qid(fid.fd, name)

    def _link(self, reader: _Reader, space: int) -> bytes:
        dir_number, number = reader.take(_TWO_U32)
        name = self._child_name(reader)
        self._writable()
        directory = self._dir(dir_number)
        fid = self._fid(number)
        if stat.S_ISDIR(fid.mode) or fid.xattr:
            raise OSError(errno.EPERM, "a directory")
        sharedir.link(fid.fd, directory.fd, name)
        return b""

    def _renameat(self, reader: _Reader, space: int) -> bytes:
        old_dir = reader.u32()
        old_name = self._child_name(reader)
        new_dir = reader.u32()
        new_name = self._child_name(reader)
        self._writable()
        source, target = self._dir(old_dir), self._dir(new_dir)
        os.rename(old_name, new_name, src_dir_fd=source.fd, dst_dir_fd=target.fd)
        return b""

    def _unlinkat(self, reader: _Reader, space: int) -> bytes:
        number = reader.u32()
        name = self._child_name(reader)
        flags = reader.u32()
        self._writable()
        fid = self._dir(number)
        if flags & AT_REMOVEDIR:
            os.rmdir(name, dir_fd=fid.fd)
        else:
            os.unlink(name, dir_fd=fid.fd)
        return b""

    def _remove(self, reader: _Reader, space: int) -> bytes:
        """Remove the fid's object by the name it has now, then clunk it (even
        when the removal fails, as 9P says)."""
        number = reader.u32()
        fid = self._fid(number)
        try:
            self._writable()
            here = os.fstat(fid.fd)
            if self._is_root(here) or fid.xattr:
                raise OSError(errno.EBUSY, "the share's root")
            where = sharedir.location(self.root, fid.fd)
            if not where:
                raise OSError(errno.ENOENT, "no longer in the share")
            parent = sharedir.walk(self.root, where[:-1])
            try:
                st = os.stat(where[-1], dir_fd=parent, follow_symlinks=False)
                if (st.st_dev, st.st_ino) != (here.st_dev, here.st_ino):
                    raise OSError(errno.ENOENT, "moved")
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(where[-1], dir_fd=parent)
                else:
                    os.unlink(where[-1], dir_fd=parent)
            finally:
                os.close(parent)
        finally:
            self.fids.pop(number).close()
        return b""

    # --- locks ---------------------------------------------------------------------------
    def _lock(self, reader: _Reader, space: int) -> bytes:
        self._fid(reader.take(_LOCK)[0])
        reader.string()                 # client_id
        return bytes([LOCK_SUCCESS])

    def _getlock(self, reader: _Reader, space: int) -> bytes:
        number, _kind, start, length, proc_id = reader.take(_GETLOCK)
        client = reader.string()
        self._fid(number)
        return struct.pack("<BQQI", LOCK_TYPE_UNLCK, start, length, proc_id) + _string(client)


_HANDLERS = {
    TVERSION: Virtio9p._version, TATTACH: Virtio9p._attach, TFLUSH: Virtio9p._flush,
    TWALK: Virtio9p._walk, TCLUNK: Virtio9p._clunk, TLOPEN: Virtio9p._lopen,
    TLCREATE: Virtio9p._lcreate, TREAD: Virtio9p._read, TWRITE: Virtio9p._write,
    TFSYNC: Virtio9p._fsync, TREADDIR: Virtio9p._readdir, TGETATTR: Virtio9p._getattr,
    TSETATTR: Virtio9p._setattr, TSTATFS: Virtio9p._statfs, TREADLINK: Virtio9p._readlink,
    TXATTRWALK: Virtio9p._xattrwalk, TMKDIR: Virtio9p._mkdir, TSYMLINK: Virtio9p._symlink,
    TLINK: Virtio9p._link, TRENAMEAT: Virtio9p._renameat, TUNLINKAT: Virtio9p._unlinkat,
    TREMOVE: Virtio9p._remove, TLOCK: Virtio9p._lock, TGETLOCK: Virtio9p._getlock,
}
