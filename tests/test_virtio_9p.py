"""virtio-9p (pyhyve.virtio.ninep): a 9P2000.L client written here packs each
message as the protocol lays it out and sends it through the model over real
guest memory (test_virtio_models' bare transport: no PCI); every message
type round-trips, the guest tries to reach outside the share every way it
can (.., symbolic links, a directory swapped for a link between walk and
open, hard links), `ro` refuses every change, arbitrary bytes never make the
model raise, and the share works under pyhyve's Landlock and seccomp
sandbox.  Linux's own v9fs is its client in test_linux_storage.py."""

import errno
import json
import logging
import os
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from test_virtio_models import BareTransport

from pyhyve import sandbox
from pyhyve.config import ConfigError
from pyhyve.lifecycle import StateError
from pyhyve.virtio import ninep as P
from pyhyve.virtio.emulations import Virtio9pPci
from pyhyve.virtio.ninep import Virtio9p

REPO = Path(__file__).resolve().parent.parent
REQUEST, REPLY = 0x100000, 0x200000      # guest addresses of the two buffers
MSIZE = 64 * 1024
ROOT, FID = 1, 2                          # fids the tests use most
NOFID = 0xFFFFFFFF
# Tlopen flags (Linux's values)
O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_EXCL, O_TRUNC = 0, 1, 2, 0o100, 0o200, 0o1000


class P9Error(Exception):
    def __init__(self, code: int):
        super().__init__(f"Rlerror {errno.errorcode.get(code, code)}")
        self.errno = code


def s(value) -> bytes:
    """A 9P string."""
    value = value.encode() if isinstance(value, str) else value
    return struct.pack("<H", len(value)) + value


class Client:
    """The guest's side: packs T-messages, offers them with room for the reply,
    and unpacks R-messages (Rlerror raises P9Error)."""

    def __init__(self, transport: BareTransport):
        self.transport = transport
        self.tag = 0

    def raw(self, message: bytes, room: int = MSIZE) -> bytes:
        """Offer MESSAGE as it is; the bytes the device wrote back."""
        memory, driver = self.transport.memory, self.transport.driver
        memory.write(REQUEST, message)
        head = driver.add([(REQUEST, max(len(message), 1))], [(REPLY, room)] if room else [])
        self.transport.kick(0)
        used = driver.used()
        assert [element[0] for element in used] == [head]
        return memory.read(REPLY, used[0][1])

    def rpc(self, kind: int, body: bytes, room: int = MSIZE) -> bytes:
        self.tag = (self.tag + 1) % 0xFFFF
        reply = self.raw(struct.pack("<IBH", 7 + len(body), kind, self.tag) + body, room)
        size, rkind, rtag = struct.unpack_from("<IBH", reply)
        assert (size, rtag) == (len(reply), self.tag)
        if rkind == P.RLERROR:
            raise P9Error(struct.unpack_from("<I", reply, 7)[0])
        assert rkind == kind + 1
        return reply[7:]

    # --- one method per message ----------------------------------------------------------
    def version(self, msize: int = MSIZE, version: str = "9P2000.L") -> tuple[int, bytes]:
        body = self.rpc(P.TVERSION, struct.pack("<I", msize) + s(version))
        return struct.unpack_from("<I", body)[0], body[4:]

    def attach(self, fid: int = ROOT) -> bytes:
        return self.rpc(P.TATTACH, struct.pack("<II", fid, NOFID) + s("root") + s("") +
                        struct.pack("<I", 0))

    def walk(self, fid: int, newfid: int, *names) -> list[bytes]:
        body = self.rpc(P.TWALK, struct.pack("<IIH", fid, newfid, len(names)) +
                        b"".join(map(s, names)))
        count = struct.unpack_from("<H", body)[0]
        return [body[2 + 13 * i:15 + 13 * i] for i in range(count)]

    def lopen(self, fid: int, flags: int = O_RDONLY) -> bytes:
        return self.rpc(P.TLOPEN, struct.pack("<II", fid, flags))[:13]

    def lcreate(self, fid: int, name, flags: int = O_RDWR, mode: int = 0o644) -> bytes:
        return self.rpc(P.TLCREATE, struct.pack("<I", fid) + s(name) +
                        struct.pack("<III", flags, mode, 0))[:13]

    def read(self, fid: int, offset: int = 0, count: int = 4096) -> bytes:
        body = self.rpc(P.TREAD, struct.pack("<IQI", fid, offset, count))
        return body[4:4 + struct.unpack_from("<I", body)[0]]

    def write(self, fid: int, data: bytes, offset: int = 0) -> int:
        return struct.unpack("<I", self.rpc(P.TWRITE, struct.pack("<IQI", fid, offset, len(data))
                                            + data))[0]

    def clunk(self, fid: int) -> None:
        assert self.rpc(P.TCLUNK, struct.pack("<I", fid)) == b""

    def remove(self, fid: int) -> None:
        assert self.rpc(P.TREMOVE, struct.pack("<I", fid)) == b""

    def getattr(self, fid: int) -> dict:
        fields = P._GETATTR.unpack(self.rpc(P.TGETATTR, struct.pack("<IQ", fid, 0x3FFF)))
        names = ("valid", "qid", "mode", "uid", "gid", "nlink", "rdev", "size", "blksize",
                 "blocks", "atime", "atime_ns", "mtime", "mtime_ns", "ctime", "ctime_ns")
        return dict(zip(names, fields))

    def setattr(self, fid: int, valid: int, mode=0, uid=0, gid=0, size=0, atime=(0, 0),
                mtime=(0, 0)) -> None:
        assert self.rpc(P.TSETATTR, struct.pack("<IIIIIQQQQQ", fid, valid, mode, uid, gid, size,
                                                *atime, *mtime)) == b""

    def readdir(self, fid: int, offset: int = 0, count: int = 4096) -> list[tuple]:
        body = self.rpc(P.TREADDIR, struct.pack("<IQI", fid, offset, count))
        (length,) = struct.unpack_from("<I", body)
        assert length == len(body) - 4
        entries, at = [], 4
        while at < len(body):
            qid, next_offset, kind = body[at:at + 13], *struct.unpack_from("<QB", body, at + 13)
            (name_length,) = struct.unpack_from("<H", body, at + 22)
            entries.append((qid, next_offset, kind, body[at + 24:at + 24 + name_length]))
            at += 24 + name_length
        return entries

    def statfs(self, fid: int) -> tuple:
        return P._STATFS.unpack(self.rpc(P.TSTATFS, struct.pack("<I", fid)))

    def mkdir(self, fid: int, name, mode: int = 0o755) -> bytes:
        return self.rpc(P.TMKDIR, struct.pack("<I", fid) + s(name) + struct.pack("<II", mode, 0))

    def symlink(self, fid: int, name, target) -> bytes:
        return self.rpc(P.TSYMLINK, struct.pack("<I", fid) + s(name) + s(target) +
                        struct.pack("<I", 0))

    def readlink(self, fid: int) -> bytes:
        return self.rpc(P.TREADLINK, struct.pack("<I", fid))[2:]

    def link(self, dir_fid: int, fid: int, name) -> None:
        assert self.rpc(P.TLINK, struct.pack("<II", dir_fid, fid) + s(name)) == b""

    def renameat(self, old_dir: int, old, new_dir: int, new) -> None:
        assert self.rpc(P.TRENAMEAT, struct.pack("<I", old_dir) + s(old) +
                        struct.pack("<I", new_dir) + s(new)) == b""

    def unlinkat(self, fid: int, name, flags: int = 0) -> None:
        assert self.rpc(P.TUNLINKAT, struct.pack("<I", fid) + s(name) +
                        struct.pack("<I", flags)) == b""

    def fsync(self, fid: int, datasync: int = 0) -> None:
        assert self.rpc(P.TFSYNC, struct.pack("<II", fid, datasync)) == b""

    def flush(self, oldtag: int) -> None:
        assert self.rpc(P.TFLUSH, struct.pack("<H", oldtag)) == b""

    def xattrwalk(self, fid: int, newfid: int, name="") -> int:
        return struct.unpack("<Q", self.rpc(P.TXATTRWALK, struct.pack("<II", fid, newfid) +
                                            s(name)))[0]

    def lock(self, fid: int) -> int:
        return self.rpc(P.TLOCK, struct.pack("<IBIQQI", fid, 1, 0, 0, 100, 42) + s("me"))[0]

    def getlock(self, fid: int) -> tuple:
        body = self.rpc(P.TGETLOCK, struct.pack("<IBQQI", fid, 1, 5, 100, 42) + s("me"))
        return struct.unpack_from("<BQQI", body) + (body[23:],)     # the client id


def qid_path(qid: bytes) -> int:
    return struct.unpack("<BIQ", qid)[2]


def code(call, *args, **keywords) -> int:
    """The errno of a call that must fail."""
    with pytest.raises(P9Error) as raised:
        call(*args, **keywords)
    return raised.value.errno


@pytest.fixture
def share(tmp_path) -> Path:
    path = tmp_path / "share"
    path.mkdir()
    (path / "hello.txt").write_bytes(b"hello from the host\n")
    (path / "sub").mkdir()
    (path / "sub" / "inner.txt").write_bytes(b"inner\n")
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """Beside the share: nothing the guest does may read or change it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(b"host secret\n")
    return path


def tree(path: Path) -> dict:
    """Everything about a directory tree the guest must not touch."""
    found = {}
    for entry in sorted(path.rglob("*")) + [path]:
        st = entry.lstat()
        found[str(entry)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                             st.st_nlink, entry.read_bytes() if entry.is_file() and
                             not entry.is_symlink() else None)
    return found


def connect(share: Path, ro: bool = False, tag: str = "hostshare") -> Client:
    options = {"sharename": tag, "path": str(share)}
    if ro:
        options["ro"] = "true"
    client = Client(BareTransport(Virtio9p, options))
    assert client.version() == (MSIZE, b"\x08\x009P2000.L")
    client.attach()
    return client


@pytest.fixture
def client(share):
    client = connect(share)
    yield client
    client.transport.model.close()


# --- the device --------------------------------------------------------------------------------
def test_config_space_holds_the_mount_tag(share):
    model = BareTransport(Virtio9p, {"sharename": "mytag", "path": str(share)}).model
    assert model.device_type == 9 and model.features == P.F_MOUNT_TAG
    assert bytes(model.config) == struct.pack("<H", 5) + b"mytag"
    model.close()


@pytest.mark.parametrize("text, options", [
    ("docs=/srv/docs", {"sharename": "docs", "path": "/srv/docs"}),
    ("docs=/srv/docs,ro", {"sharename": "docs", "path": "/srv/docs", "ro": "true"}),
    ("ro=false,x=/y", {"ro": "false", "sharename": "x", "path": "/y"}),
])
def test_s_options_are_bhyves(text, options):
    assert Virtio9pPci.legacy_options(text) == options


@pytest.mark.parametrize("text, message", [
    ("docs", "neither SHARENAME=PATH nor ro"),
    ("a=/x,b=/y", "one SHARENAME=PATH per device"),
])
def test_bad_s_options_are_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        Virtio9pPci.legacy_options(text)


@pytest.mark.parametrize("options, message", [
    ({"path": "/tmp"}, "give the share as SHARENAME=PATH"),
    ({"sharename": "a b", "path": "/tmp"}, "not 1 to 255 printable"),
    ({"sharename": "t" * 256, "path": "/tmp"}, "not 1 to 255 printable"),
    ({"sharename": "t", "path": "/nonexistent/dir"}, "No such file"),
    ({"sharename": "t", "path": "/etc/hostname"}, "Not a directory"),
    ({"sharename": "t", "path": "/tmp", "ro": "maybe"}, "not a boolean"),
])
def test_bad_shares_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        BareTransport(Virtio9p, options)


# --- round trips -------------------------------------------------------------------------------
def test_version_negotiates_msize_and_refuses_other_protocols(share):
    client = Client(BareTransport(Virtio9p, {"sharename": "t", "path": str(share)}))
    assert code(client.attach) == errno.EPROTO                 # nothing before Tversion
    assert client.version(1 << 30) == (P.MAX_MSIZE, s("9P2000.L"))
    assert client.version(8192, "9P2000.u") == (8192, s("unknown"))
    assert code(client.attach) == errno.EPROTO
    assert code(client.version, 100) == errno.EINVAL
    assert client.version(8192) == (8192, s("9P2000.L"))
    client.attach()
    client.version(8192)                                       # a new session: fids gone
    assert code(client.getattr, ROOT) == errno.EBADF
    client.transport.model.close()


def test_walk_open_read_write_create_and_clunk(client, share):
    root_qid = client.attach(7)
    assert root_qid[0] == P.QTDIR and qid_path(root_qid) == share.stat().st_ino
    qids = client.walk(ROOT, FID, "sub", "inner.txt")
    assert [qid_path(q) for q in qids] == [(share / "sub").stat().st_ino,
                                           (share / "sub" / "inner.txt").stat().st_ino]
    client.lopen(FID)
    assert client.read(FID) == b"inner\n"
    assert client.read(FID, 2, 2) == b"ne"
    assert code(client.write, FID, b"x") == errno.EBADF       # opened for reading
    assert code(client.lopen, FID) == errno.EINVAL            # already open
    client.clunk(FID)
    assert code(client.clunk, FID) == errno.EBADF

    client.walk(ROOT, 3, "sub")
    qid = client.lcreate(3, "new.txt", O_RDWR | O_CREAT, 0o640)   # fid 3 becomes the file
    assert qid[0] == P.QTFILE
    assert client.write(3, b"written by 9p") == 13
    assert client.write(3, b"P", 11) == 1
    assert client.read(3, 0, 100) == b"written by Pp"
    client.fsync(3)
    client.fsync(3, datasync=1)
    assert (share / "sub" / "new.txt").read_bytes() == b"written by Pp"
    assert stat.S_IMODE((share / "sub" / "new.txt").stat().st_mode) == 0o640
    client.walk(ROOT, 4, "sub")
    assert code(client.lcreate, 4, "new.txt", O_RDWR | O_CREAT | O_EXCL) == errno.EEXIST
    client.walk(ROOT, 5, "sub", "new.txt")
    client.lopen(5, O_WRONLY | O_TRUNC)
    assert (share / "sub" / "new.txt").read_bytes() == b""

    assert client.walk(ROOT, 6) == []                         # a clone of the root
    assert len(client.walk(6, 6, "hello.txt")) == 1           # then walked in place
    assert code(client.walk, ROOT, 8, "missing") == errno.ENOENT
    qids = client.walk(ROOT, 8, "sub", "missing")              # partial: newfid not made
    assert len(qids) == 1 and code(client.getattr, 8) == errno.EBADF
    assert code(client.walk, 5, 9, "x") == errno.ENOTDIR       # from a file
    client.walk(5, 5)                                          # newfid == fid
    assert code(client.walk, ROOT, 5, "sub") == errno.EEXIST   # newfid in use


def test_getattr_setattr_and_statfs(client, share):
    client.walk(ROOT, FID, "hello.txt")
    attrs = client.getattr(FID)
    st = (share / "hello.txt").stat()
    assert attrs["valid"] == P.GETATTR_BASIC and attrs["mode"] == st.st_mode
    assert (attrs["size"], attrs["nlink"], attrs["uid"]) == (20, 1, st.st_uid)
    assert attrs["mtime"] * 10**9 + attrs["mtime_ns"] == st.st_mtime_ns

    client.setattr(FID, P.SETATTR_MODE, mode=0o600)
    client.setattr(FID, P.SETATTR_SIZE, size=5)
    client.setattr(FID, P.SETATTR_ATIME | P.SETATTR_ATIME_SET | P.SETATTR_MTIME |
                   P.SETATTR_MTIME_SET, atime=(1000, 5), mtime=(2000, 7))
    st = (share / "hello.txt").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o600, 5)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    client.setattr(FID, P.SETATTR_MTIME)                       # now
    assert (share / "hello.txt").stat().st_mtime > 2000
    assert (share / "hello.txt").stat().st_atime_ns == 1000 * 10**9 + 5    # left alone
    if os.geteuid() == 0:
        client.setattr(FID, P.SETATTR_UID | P.SETATTR_GID, uid=1234, gid=4321)
        st = (share / "hello.txt").stat()
        assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert code(client.setattr, FID, P.SETATTR_ATIME | P.SETATTR_ATIME_SET,
                atime=(1, 10**9)) == errno.EINVAL
    assert code(client.setattr, FID, P.SETATTR_SIZE, size=1 << 63) == errno.EINVAL
    client.walk(ROOT, 3, "sub")
    assert code(client.setattr, 3, P.SETATTR_SIZE, size=0) == errno.EISDIR

    fields = client.statfs(ROOT)
    vfs = os.statvfs(share)
    assert fields[0] == P.V9FS_MAGIC and fields[1:3] == (vfs.f_bsize, vfs.f_blocks)


def test_set_id_bits_never_reach_the_host(client, share):
    """A guest (root in it, or not) cannot leave a set-user-ID program in the share."""
    client.walk(ROOT, FID)
    client.lcreate(FID, "tool", O_RDWR | O_CREAT, 0o6755)
    assert stat.S_IMODE((share / "tool").stat().st_mode) == 0o755
    client.setattr(FID, P.SETATTR_MODE, mode=0o4711)
    assert stat.S_IMODE((share / "tool").stat().st_mode) == 0o711
    client.mkdir(ROOT, "shared", 0o3775)                   # setgid and sticky stay on dirs
    assert stat.S_IMODE((share / "shared").stat().st_mode) == 0o3775
    client.walk(ROOT, 3, "shared")
    client.setattr(3, P.SETATTR_MODE, mode=0o6770)
    assert stat.S_IMODE((share / "shared").stat().st_mode) == 0o2770


def test_readdir_lists_every_entry_across_calls(client, share):
    for number in range(40):
        (share / "sub" / f"file-{number:02}").write_bytes(b"")
    os.symlink("inner.txt", share / "sub" / "link")
    (share / "sub" / "dir").mkdir()
    client.walk(ROOT, FID, "sub")
    client.lopen(FID)
    names, offset = [], 0
    while entries := client.readdir(FID, offset, 200):       # a few entries per call
        assert len(entries) < 10
        names += [(name, kind) for _, _, kind, name in entries]
        offset = entries[-1][1]
    expected = {(b".", P.DT_DIR), (b"..", P.DT_DIR), (b"inner.txt", P.DT_REG),
                (b"link", P.DT_LNK), (b"dir", P.DT_DIR)}
    expected |= {(f"file-{n:02}".encode(), P.DT_REG) for n in range(40)}
    assert sorted(names) == sorted(expected)
    assert client.readdir(FID, 10**12) == []
    client.walk(ROOT, 3, "hello.txt")
    assert code(client.readdir, 3) == errno.ENOTDIR


def test_mkdir_symlink_readlink_link_rename_unlink_remove(client, share):
    assert client.mkdir(ROOT, "made", 0o750)[0] == P.QTDIR
    assert stat.S_IMODE((share / "made").stat().st_mode) == 0o750
    assert code(client.mkdir, ROOT, "made") == errno.EEXIST
    assert client.symlink(ROOT, "ln", "/etc/passwd")[0] == P.QTSYMLINK
    assert os.readlink(share / "ln") == "/etc/passwd"
    client.walk(ROOT, FID, "ln")
    assert client.readlink(FID) == b"/etc/passwd"
    client.walk(ROOT, 3, "hello.txt")
    assert code(client.readlink, 3) == errno.EINVAL
    client.link(ROOT, 3, "hard.txt")
    assert (share / "hard.txt").stat().st_ino == (share / "hello.txt").stat().st_ino
    client.walk(ROOT, 4, "made")
    client.renameat(ROOT, "hard.txt", 4, "moved.txt")
    assert (share / "made" / "moved.txt").read_bytes() == b"hello from the host\n"
    assert not (share / "hard.txt").exists()
    client.unlinkat(4, "moved.txt")
    assert code(client.unlinkat, ROOT, "made", 0) == errno.EISDIR
    client.unlinkat(ROOT, "made", P.AT_REMOVEDIR)
    assert not (share / "made").exists()
    client.walk(ROOT, 5, "sub", "inner.txt")
    client.remove(5)                                 # by its name now, then clunked
    assert not (share / "sub" / "inner.txt").exists()
    assert code(client.getattr, 5) == errno.EBADF
    client.walk(ROOT, 6, "sub")
    os.rename(share / "sub", share / "renamed")      # the host moves it
    client.remove(6)
    assert not (share / "renamed").exists()
    client.walk(ROOT, 7)
    assert code(client.remove, 7) == errno.EBUSY     # the share's root stays
    assert share.is_dir() and code(client.getattr, 7) == errno.EBADF


def test_flush_xattrs_locks_and_unknown_messages(client):
    client.flush(5)
    assert client.xattrwalk(ROOT, FID) == 0          # no attributes: an empty list
    assert client.read(FID) == b""
    client.clunk(FID)
    assert code(client.xattrwalk, ROOT, FID, "user.x") == errno.ENODATA
    assert client.lock(ROOT) == P.LOCK_SUCCESS
    assert client.getlock(ROOT) == (P.LOCK_TYPE_UNLCK, 5, 100, 42, b"me")
    for kind in (P.TAUTH, P.TMKNOD, P.TRENAME, P.TXATTRCREATE, 112, 114, 124, 126, P.TLERROR,
                 P.TVERSION + 1, 0, 255):
        assert code(client.rpc, kind, b"\0" * 16) == errno.EOPNOTSUPP


def test_fid_table_is_bounded(client, monkeypatch):
    monkeypatch.setattr(P, "MAX_FIDS", 4)
    client.walk(ROOT, 2)
    client.walk(ROOT, 3)
    client.walk(ROOT, 4)
    assert code(client.walk, ROOT, 5) == errno.EMFILE
    client.walk(4, 4, "sub")                        # replacing one is fine
    assert code(client.walk, ROOT, NOFID) == errno.EINVAL


# --- read-only ---------------------------------------------------------------------------------
def test_read_only_share_refuses_every_change(share):
    before = tree(share)
    client = connect(share, ro=True)
    client.walk(ROOT, FID, "hello.txt")
    client.lopen(FID)
    assert client.read(FID) == b"hello from the host\n"
    client.walk(ROOT, 3, "hello.txt")
    client.walk(ROOT, 4, "sub")
    for call, args in [
            (client.lopen, (3, O_WRONLY)), (client.lopen, (3, O_RDWR)),
            (client.lopen, (3, O_RDONLY | O_TRUNC)), (client.lcreate, (4, "n", O_RDWR)),
            (client.setattr, (3, P.SETATTR_MODE)), (client.setattr, (3, P.SETATTR_SIZE)),
            (client.setattr, (3, P.SETATTR_MTIME)), (client.mkdir, (ROOT, "d")),
            (client.symlink, (ROOT, "l", "x")), (client.link, (ROOT, 3, "h")),
            (client.renameat, (ROOT, "hello.txt", 4, "x")), (client.unlinkat, (ROOT, "hello.txt")),
            (client.remove, (3,))]:
        assert code(call, *args) == errno.EROFS, call.__name__
    client.transport.model.close()
    assert tree(share) == before


# --- escapes -----------------------------------------------------------------------------------
def test_dotdot_stays_inside_the_share(client, share):
    root = client.walk(ROOT, FID, "..")[0]
    assert qid_path(root) == share.stat().st_ino
    client.clunk(FID)
    qids = client.walk(ROOT, FID, "sub", "..", "..", "..", "sub", ".", "inner.txt")
    assert [qid_path(q) for q in qids[:4]] == [(share / "sub").stat().st_ino] + \
        [share.stat().st_ino] * 3
    client.lopen(FID)
    assert client.read(FID) == b"inner\n"
    for name in ("sub/inner.txt", "/etc", "", "a\0b", "x" * 256):
        assert code(client.walk, ROOT, 3, name) in (errno.EINVAL, errno.ENAMETOOLONG)
    for bad in ("..", ".", "a/b", ""):
        assert code(client.mkdir, ROOT, bad) == errno.EINVAL
        assert code(client.lcreate, ROOT, bad) == errno.EINVAL
        assert code(client.renameat, ROOT, "hello.txt", ROOT, bad) == errno.EINVAL
        assert code(client.unlinkat, ROOT, bad) == errno.EINVAL


def test_absolute_symlinks_are_data_never_followed(client, share, outside):
    os.symlink(outside, share / "out-dir")                       # placed by the host
    os.symlink(outside / "secret", share / "out-file")
    client.symlink(ROOT, "guest-link", str(outside))             # made by the guest
    before = tree(outside)
    for link in ("out-dir", "guest-link"):
        qids = client.walk(ROOT, FID, link, "secret")            # no way through
        assert len(qids) == 1 and qids[0][0] == P.QTSYMLINK
        client.walk(ROOT, FID, link)
        assert code(client.lopen, FID) == errno.ELOOP
        assert code(client.readdir, FID) == errno.ENOTDIR
        assert code(client.lcreate, FID, "planted") == errno.ENOTDIR
        assert code(client.mkdir, FID, "planted") == errno.ENOTDIR
        client.clunk(FID)
    client.walk(ROOT, FID, "out-file")
    assert code(client.lopen, FID, O_RDWR) == errno.ELOOP
    assert code(client.lcreate, ROOT, "out-file", O_RDWR | O_CREAT) == errno.ELOOP
    assert code(client.setattr, FID, P.SETATTR_SIZE) == errno.EINVAL
    assert code(client.setattr, FID, P.SETATTR_MODE, mode=0o777) == errno.EOPNOTSUPP
    client.setattr(FID, P.SETATTR_MTIME | P.SETATTR_MTIME_SET, mtime=(5, 0))  # the link's own
    assert (share / "out-file").lstat().st_mtime == 5
    if os.geteuid() == 0:
        client.setattr(FID, P.SETATTR_UID, uid=4321)                 # the link's own owner
        assert (share / "out-file").lstat().st_uid == 4321
    assert client.getattr(FID)["qid"][0] == P.QTSYMLINK
    client.link(ROOT, FID, "hard-to-link")                       # links the link itself
    assert os.readlink(share / "hard-to-link") == str(outside / "secret")
    client.unlinkat(ROOT, "out-dir")                             # removes the link only
    client.renameat(ROOT, "out-file", ROOT, "renamed-link")
    client.remove(FID)                                           # the link, by its new name
    assert not os.path.lexists(share / "renamed-link")
    assert tree(outside) == before


def test_a_directory_swapped_for_a_symlink_after_the_walk(client, share, outside):
    """The fid holds the directory itself: after the host (or a second guest
    process) swaps `sub` for a link to the outside, what the fid does still
    happens in the directory it walked to, now `sub.old`."""
    before = tree(outside)
    client.walk(ROOT, FID, "sub")
    client.walk(ROOT, 3, "sub", "inner.txt")
    os.rename(share / "sub", share / "sub.old")
    os.symlink(outside, share / "sub")
    client.lopen(3, O_RDWR | O_TRUNC)
    client.write(3, b"still inside")
    qid = client.lcreate(FID, "secret", O_RDWR | O_CREAT)        # in sub.old, not outside
    client.write(FID, b"planted")
    assert qid[0] == P.QTFILE
    client.walk(ROOT, 4, "sub")
    assert code(client.readdir, 4) == errno.ENOTDIR
    client.walk(ROOT, 5, "sub.old")
    client.lopen(5)
    assert {entry[3] for entry in client.readdir(5)} == {b".", b"..", b"inner.txt", b"secret"}
    assert code(client.mkdir, 4, "x") == errno.ENOTDIR
    assert len(client.walk(ROOT, 6, "sub", "secret")) == 1
    client.walk(ROOT, 7, "sub.old")
    client.walk(7, 8, "..")                                      # its parent: the root
    assert qid_path(client.getattr(8)["qid"]) == share.stat().st_ino
    assert (share / "sub.old" / "inner.txt").read_bytes() == b"still inside"
    assert (share / "sub.old" / "secret").read_bytes() == b"planted"
    assert tree(outside) == before


def test_rename_race_while_a_file_is_being_walked_to(client, share, outside):
    """A walk is one component at a time from the descriptor the last step
    opened: swapping a middle directory between two walks cannot redirect
    the second into the outside."""
    before = tree(outside)
    client.walk(ROOT, FID, "sub")
    os.rename(share / "sub", share / "gone")
    os.symlink(outside, share / "sub")
    qids = client.walk(FID, 3, "inner.txt")                       # from the held directory
    assert qid_path(qids[0]) == (share / "gone" / "inner.txt").stat().st_ino
    assert code(client.walk, 3, 4, "..", "secret") == errno.ENOTDIR
    qids = client.walk(FID, 4, "..", "sub", "secret")
    assert len(qids) == 2 and qids[1][0] == P.QTSYMLINK
    assert tree(outside) == before


def test_hard_links_only_of_what_is_inside(client, share, outside):
    """Tlink's source is a fid, and fids are inside: the guest cannot name an
    outside file to link, and a link to a symlink is a link to the link."""
    os.symlink(outside / "secret", share / "ptr")
    before = tree(outside)
    client.walk(ROOT, FID, "ptr")
    client.link(ROOT, FID, "copy")
    assert (share / "copy").is_symlink()
    assert (outside / "secret").stat().st_nlink == 1
    client.walk(ROOT, 3, "sub")
    assert code(client.link, ROOT, 3, "dirlink") == errno.EPERM   # no directory links
    assert code(client.link, FID, 3, "x") == errno.ENOTDIR        # the target dir is a link
    assert tree(outside) == before


# --- malformed messages --------------------------------------------------------------------------
def test_malformed_messages_get_einval_or_are_dropped(client):
    header = struct.pack("<IBH", 100, P.TGETATTR, 9)                # size past what was sent
    reply = client.raw(header + struct.pack("<IQ", ROOT, 0))
    assert reply == struct.pack("<IBHI", 11, P.RLERROR, 9, errno.EINVAL)
    reply = client.raw(struct.pack("<IBH", 9, P.TGETATTR, 9) + b"\x01\x00")   # body short
    assert reply[4] == P.RLERROR and reply[7:] == struct.pack("<I", errno.EINVAL)
    reply = client.raw(struct.pack("<IBH", 3, P.TCLUNK, 9))           # size below a header
    assert reply[4] == P.RLERROR
    client.transport.warnings.clear()
    assert client.raw(b"\x01\x02") == b""                            # no tag: dropped
    assert client.raw(b"\x01\x02") == b""
    assert set(client.transport.warnings) == {  # said once by virtio-pci's warn_once
        "dropped a request of 2 bytes: shorter than a 9P header"}
    assert code(client.rpc, P.TWALK, struct.pack("<IIH", ROOT, 5, 17) + s("a") * 17) == \
        errno.EINVAL
    assert code(client.rpc, P.TWRITE, struct.pack("<IQI", ROOT, 0, 1000) + b"ab") == errno.EINVAL
    assert code(client.rpc, P.TATTACH, struct.pack("<II", 5, NOFID) + b"\xff\xff") == errno.EINVAL
    # No room for the reply: ENOBUFS, or nothing where not even that fits.
    client.walk(ROOT, FID, "hello.txt")
    assert code(client.rpc, P.TGETATTR, struct.pack("<IQ", FID, 0), room=20) == errno.ENOBUFS
    assert client.raw(struct.pack("<IBHIQ", 19, P.TGETATTR, 1, FID, 0), room=8) == b""
    assert client.raw(struct.pack("<IBHIQ", 19, P.TGETATTR, 1, FID, 0), room=0) == b""
    # Reads and directory listings are cut to the room given.
    client.lopen(FID)
    assert len(client.read(FID, 0, 1 << 31)) == 20
    assert client.rpc(P.TREAD, struct.pack("<IQI", FID, 0, 100), room=15)[4:] == b"hell"
    assert code(client.read, FID, 1 << 63) == errno.EINVAL
    assert not client.transport.resets


def test_every_message_type_with_a_short_body_is_einval(client):
    client.walk(ROOT, FID, "sub")
    for kind in P._HANDLERS:
        if kind in (P.TVERSION, P.TFLUSH):
            continue
        assert code(client.rpc, kind, b"\x02\x00\x00") == errno.EINVAL, kind


FIDS = st.sampled_from((ROOT, FID, FID, 3, 3, 3, 4, 5, NOFID, 0))
NAMES = st.sampled_from((b"sub", b"hello.txt", b"..", b".", b"ln", b"x", b"", b"a/b", b"x" * 300))
# Each field kind: mostly values that mean something, sometimes anything.
FIELDS = {
    "F": FIDS.map(lambda v: struct.pack("<I", v)),
    "I": st.one_of(st.sampled_from((O_RDWR | O_CREAT, O_WRONLY | O_TRUNC, 0o777, 2,
                                    P.AT_REMOVEDIR, 0x1FF, 4096)),
                   st.integers(0, 2**32 - 1)).map(lambda v: struct.pack("<I", v)),
    "Q": st.one_of(st.sampled_from((0, 1, 100, 2**63 - 1, 2**63, 2**64 - 1)),
                   st.integers(0, 2**64 - 1)).map(lambda v: struct.pack("<Q", v)),
    "H": st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF)).map(lambda v: struct.pack("<H", v)),
    "B": st.integers(0, 255).map(lambda v: bytes([v])),
    "s": NAMES.map(s),
    "r": st.binary(max_size=40),
}
# The fields of each T-message, in order (F: a fid; r: raw bytes, such as Twrite's data).
LAYOUTS = {
    P.TVERSION: "Is", P.TATTACH: "FIssI", P.TWALK: "FFHss", P.TLOPEN: "FI",
    P.TLCREATE: "FsIII", P.TREAD: "FQI", P.TWRITE: "FQIr", P.TCLUNK: "F", P.TREMOVE: "F",
    P.TGETATTR: "FQ", P.TSETATTR: "FIIIIQQQQQ", P.TREADDIR: "FQI", P.TSTATFS: "F",
    P.TMKDIR: "FsII", P.TSYMLINK: "FssI", P.TREADLINK: "F", P.TLINK: "FFs",
    P.TRENAMEAT: "FsFs", P.TUNLINKAT: "FsI", P.TFSYNC: "FI", P.TFLUSH: "H",
    P.TXATTRWALK: "FFs", P.TLOCK: "FBIQQIs", P.TGETLOCK: "FBQQIs", P.TAUTH: "FssI",
    P.TMKNOD: "FsIIII", 0: "r", 255: "r",
}
ROOMS = st.sampled_from((MSIZE, MSIZE, 7, 11, 64, 300, 0))
# A message: a header and the fields its type has (maybe cut short or with
# bytes after), or any bytes at all.
TYPED = st.sampled_from(sorted(LAYOUTS)).flatmap(lambda kind: st.tuples(
    st.just(kind), st.tuples(*[FIELDS[c] for c in LAYOUTS[kind]]).map(b"".join),
    st.sampled_from((None,) * 6 + (0, 1, 5)), st.binary(max_size=4), ROOMS))
MESSAGE = st.one_of(TYPED, TYPED, TYPED, st.tuples(st.binary(max_size=300), ROOMS))


def send(client: Client, message: tuple) -> None:
    if len(message) == 2:
        client.raw(*message)
        return
    kind, body, cut, extra, room = message
    body = (body[:cut] if cut is not None else body) + extra
    client.raw(struct.pack("<IBH", 7 + len(body), kind, 1) + body, room)


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@fuzz_settings(500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(MESSAGE, max_size=12))
def test_arbitrary_messages_never_raise_nor_reach_outside(tmp_path, messages):
    exercise(tmp_path, messages)


def test_a_model_that_raises_is_caught_by_the_fuzzer(tmp_path, monkeypatch):
    """The mutant the fuzzer must catch: one message type's handler raises."""
    def broken(self, reader, space):
        raise RuntimeError("mutant")
    monkeypatch.setitem(P._HANDLERS, P.TGETATTR, broken)
    with pytest.raises(RuntimeError, match="mutant"):
        exercise(tmp_path, [(P.TGETATTR, struct.pack("<IQ", FID, 0), None, b"", MSIZE)])


def exercise(tmp_path, messages: list) -> None:
    """A session (version, attach; fid 2 the open directory sub, 3 the open
    file hello.txt, 4 a symbolic link to the outside) then arbitrary
    messages: the model answers or drops each (an exception would escape
    kick() here, which virtio-pci would log as an ERROR and set NEEDS_RESET
    for); nothing outside the share changes; a well-formed request still
    works afterwards."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        share, outside = Path(scratch) / "share", Path(scratch) / "outside"
        for path in (share, share / "sub", outside):
            path.mkdir()
        (share / "hello.txt").write_bytes(b"hello")
        (outside / "secret").write_bytes(b"secret")
        os.symlink(outside, share / "ln")
        before = tree(outside)
        errors = _Errors()
        logging.getLogger("pyhyve").addHandler(errors)
        client = connect(share)
        try:
            client.walk(ROOT, FID, "sub")
            client.lopen(FID)
            client.walk(ROOT, 3, "hello.txt")
            client.lopen(3, O_RDWR)
            client.walk(ROOT, 4, "ln")
            for message in messages:
                send(client, message)
            assert client.version() == (MSIZE, s("9P2000.L"))
            client.attach()
            assert client.walk(ROOT, 3, "..")
        finally:
            client.transport.model.close()
            logging.getLogger("pyhyve").removeHandler(errors)
        assert not errors.messages and not client.transport.resets
        assert tree(outside) == before


# --- snapshots -----------------------------------------------------------------------------------
def test_save_restore_save_unchanged_without_fids_and_refused_with_them(share):
    from test_snapshot import _json
    from test_virtio import VirtioVm
    vm = VirtioVm()
    device = vm.pci.add(5, 0, Virtio9pPci, {"sharename": "t", "path": str(share)})
    client = Client(BareTransport(Virtio9p, {"sharename": "t", "path": str(share)}))
    model = device.model
    # Drive the PCI device's model the way the bare transport drives its own.
    client.transport.model.close()
    client.transport.model = model
    original = model.transport
    model.transport = client.transport
    client.version(8192)
    model.transport = original
    state = _json(device.save_state())
    assert state["virtio"]["device"] == {"msize": 8192}

    fresh_vm = VirtioVm()
    fresh = fresh_vm.pci.add(5, 0, Virtio9pPci, {"sharename": "t", "path": str(share)})
    fresh.restore_state(state)
    assert _json(fresh.save_state()) == state
    with pytest.raises(StateError, match="msize"):
        fresh.model.restore_state({"msize": P.MAX_MSIZE + 1})

    model.transport = client.transport
    client.attach()
    model.transport = original
    with pytest.raises(OSError, match="9P fids do not survive a snapshot: unmount it first"):
        with device.quiesce():
            pass
    model.reset()                                    # the driver reset: no fids, no session
    assert not model.fids and model.msize == 0
    with device.quiesce():
        pass
    vm.close()
    fresh_vm.close()


def test_a_snapshot_of_a_vm_with_the_share_mounted_is_refused_in_one_line(share, tmp_path,
                                                                          needs_kvm):
    from test_snapshot import counter_rom

    from pyhyve import snapshot
    from pyhyve.config import Config
    from pyhyve.vm import VirtualMachine
    vm = VirtualMachine(Config({"name": "snap9p", "lpc.bootrom": str(counter_rom()),
                                "pci.0.3.0.device": "virtio-9p",
                                "pci.0.3.0.sharename": "t", "pci.0.3.0.path": str(share)}))
    try:
        model = vm.pci.functions[3, 0].model
        client = Client(BareTransport(Virtio9p, {"sharename": "t", "path": str(share)}))
        client.transport.model.close()
        client.transport.model, model.transport = model, client.transport
        client.version()
        client.attach()
        with pytest.raises(snapshot.SnapshotError) as raised:
            snapshot.save(vm, str(tmp_path / "x.snap"))
        assert str(raised.value) == (
            f"cannot snapshot: device virtio-9p at PCI 00:03.0: the guest holds fids of the "
            f"9P share '{share}' (has it mounted); 9P fids do not survive a snapshot: "
            "unmount it first")
        assert not (tmp_path / "x.snap").exists()
    finally:
        vm.close()


# --- the sandbox ---------------------------------------------------------------------------------
SANDBOXED = """
import json, os, sys, threading
sys.path.insert(0, "tests")
from pyhyve import sandbox
from pyhyve.config import Config
import test_virtio_9p as T
share, outside = sys.argv[1], sys.argv[2]
client = T.connect(T.Path(share))
sandbox.confine(Config({}))              # Landlock and seccomp, as the pyhyve command
results = {"landlock": sandbox.confined_by_landlock()}
c = client
c.walk(T.ROOT, 2, "sub")
c.lcreate(2, "made.txt", T.O_RDWR | T.O_CREAT)
c.write(2, b"from the sandbox")
c.setattr(2, T.P.SETATTR_MODE | T.P.SETATTR_SIZE | T.P.SETATTR_MTIME, mode=0o600, size=4)
c.walk(T.ROOT, 3, "sub")
c.mkdir(3, "dir")
c.symlink(3, "ln", "made.txt")
c.walk(T.ROOT, 4, "sub", "made.txt")
c.link(3, 4, "hard.txt")
c.renameat(3, "hard.txt", T.ROOT, "moved.txt")
c.unlinkat(3, "dir", T.P.AT_REMOVEDIR)
c.walk(T.ROOT, 5, "hello.txt")
c.remove(5)
c.lopen(3)
results["listing"] = sorted(e[3].decode() for e in c.readdir(3))
results["statfs"] = c.statfs(T.ROOT)[0]
try:
    open(os.path.join(outside, "planted"), "w")
    results["outside"] = "written"
except PermissionError:
    results["outside"] = "refused"
def vcpu():
    sandbox.narrow_vcpu_thread()
    try:
        c.mkdir(T.ROOT, "from-vcpu")
        results["vcpu"] = "made"
    except T.P9Error as exc:
        results["vcpu"] = T.errno.errorcode[exc.errno]
thread = threading.Thread(target=vcpu)
thread.start()
thread.join()
print(json.dumps(results))
"""


@pytest.mark.skipif(sandbox.landlock.abi_version() == 0, reason="the kernel has no Landlock")
def test_the_share_works_under_landlock_and_seccomp(share, outside):
    """In a child (confinement is for good): everything the server does
    beneath the share passes Landlock and the seccomp allowlist, the process
    still may not write beside it, and a vCPU thread's own filter refuses."""
    proc = subprocess.run([sys.executable, "-c", SANDBOXED, str(share), str(outside)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    assert results == {"landlock": True, "listing": [".", "..", "inner.txt", "ln", "made.txt"],
                       "statfs": P.V9FS_MAGIC, "outside": "refused", "vcpu": "EPERM"}
    assert (share / "sub" / "made.txt").read_bytes() == b"from"
    assert stat.S_IMODE((share / "sub" / "made.txt").stat().st_mode) == 0o600
    assert (share / "moved.txt").read_bytes() == b"from"
    assert not (share / "hello.txt").exists() and not (outside / "planted").exists()


def test_a_writable_share_without_landlock_is_refused(share):
    script = textwrap.dedent(f"""
        import sys
        from pyhyve.config import Config, ConfigError
        from pyhyve import sandbox
        sandbox.serve_directory({str(share)!r}, writable=True)
        try:
            sandbox.confine(Config({{"process.landlock": "false"}}))
        except ConfigError as exc:
            print(exc)
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "a writable share needs Landlock" in proc.stdout, proc.stderr


@pytest.mark.parametrize("landlock, status, stderr", [
    ("true", 1, ""),
    ("false", 4, "pyhyve: virtio-9p: a writable share needs Landlock to say where the "
                 "seccomp filter may let files change: use ro, or run with "
                 "process.landlock=true on a kernel with Landlock, or process.seccomp=false\n"),
])
def test_the_pyhyve_command_confines_itself_with_a_share(share, tmp_path, needs_kvm, landlock,
                                                          status, stderr):
    """The default sandbox takes the share's Landlock rule, and the guest runs to
    its power-off; without Landlock a writable share is refused in one line."""
    from guestrun import run_rom
    if landlock == "true" and sandbox.landlock.abi_version() == 0:
        pytest.skip("the kernel has no Landlock")
    result = run_rom(tmp_path, "hello16", "-s", f"5,virtio-9p,t={share}",
                     "-o", f"control.socket={tmp_path / 'ctl.sock'}",
                     "-o", f"process.landlock={landlock}")
    assert (result.status, result.stderr) == (status, stderr)
