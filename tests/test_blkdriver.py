"""virtio-blk end to end: a guest with its own legacy virtio driver
(tests/guests/blkdriver.S) writes 1 MiB of a pattern, flushes, reads it back
and compares; the test then checks the backing file on the host."""

import struct

import pytest

from guestrun import run_rom
from pyhyve.vcpu import ExitStatus

pytestmark = pytest.mark.usefixtures("needs_kvm")

MiB = 1 << 20
SECTOR = 512
DISK_SIZE = 2 * MiB
WRITTEN = 1 * MiB           # the guest's TOTAL_KIB default
MASK64 = (1 << 64) - 1


def pattern(length: int) -> bytes:
    """What the guest writes: dword i of sector s is 0x5A000000 + (s << 16) + i."""
    return b"".join(struct.pack("<128I", *((0x5A000000 + (s << 16) + i) & 0xFFFFFFFF
                                           for i in range(SECTOR // 4)))
                    for s in range(length // SECTOR))


def checksum(data: bytes) -> int:
    """The guest's checksum: c = rol64(c, 1) + q over the qwords in order."""
    c = 0
    for (q,) in struct.iter_unpack("<Q", data):
        c = ((((c << 1) | (c >> 63)) & MASK64) + q) & MASK64
    return c


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


def test_guest_driver_writes_flushes_and_reads_back(tmp_path, disk):
    result = run_rom(tmp_path, "blkdriver", "-s", f"3,virtio-blk,{disk}")
    lines = result.debug.splitlines()
    assert lines[0].startswith("virtio-blk 00:03.0 io 0x"), result.debug + result.stderr
    assert "queue size 100 capacity 1000" in lines, result.debug    # hex: 256, 4096 sectors
    expected = f"{checksum(pattern(WRITTEN)):016x}"
    assert lines[-5:] == ["write status 00", "flush status 00",
                          f"written checksum {expected}", f"read checksum {expected}",
                          "blk ok"], result.debug + result.stderr
    assert result.status == ExitStatus.POWEROFF, result.stderr
    data = disk.read_bytes()
    assert len(data) == DISK_SIZE
    assert data[:WRITTEN] == pattern(WRITTEN)
    assert data[WRITTEN:] == bytes(DISK_SIZE - WRITTEN)


def test_guest_driver_sees_write_fail_on_read_only_disk(tmp_path, disk):
    result = run_rom(tmp_path, "blkdriver", "-s", f"3,virtio-blk,{disk},ro")
    lines = result.debug.splitlines()
    host_features = int(lines[1].removeprefix("host features 0x"), 16)
    assert host_features & (1 << 5), result.debug                  # VIRTIO_BLK_F_RO offered
    assert lines[-2:] == ["write status 01", "blk write failed"], \
        result.debug + result.stderr                                # VIRTIO_BLK_S_IOERR
    assert result.status == ExitStatus.POWEROFF, result.stderr
    assert disk.read_bytes() == bytes(DISK_SIZE)
