"""The block backend every disk device shares (pyhyve.block), on its own."""

import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest

from build import build_rom
from guestrun import REPO, run_pyhyve
from pyhyve.block import BlockImage
from pyhyve.config import ConfigError


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 64)          # 16 KiB
    return path


def test_reads_writes_and_flushes(image_file):
    image = BlockImage("disk", str(image_file))
    try:
        assert image.size == 16384
        data = bytearray(8)
        assert image.readv([memoryview(data)], 250)
        assert bytes(data) == bytes([250, 251, 252, 253, 254, 255, 0, 1])
        assert image.writev([memoryview(b"abc"), memoryview(b"de")], 4096)
        image.flush()
        assert image_file.read_bytes()[4096:4101] == b"abcde"
        assert not image.readv([memoryview(bytearray(16))], 16384 - 8)   # past the end
    finally:
        image.close()


@pytest.mark.parametrize("punch, zero_range", [(True, True), (False, True), (False, False)])
def test_clear_reads_as_zeros_whichever_way_the_filesystem_allows(image_file, punch, zero_range):
    image = BlockImage("disk", str(image_file))
    try:
        image.can_punch = image.can_punch and punch
        image.zero_range = zero_range
        image.clear(1024, 2048, unmap=True)
        data = image_file.read_bytes()
        assert data[1024:3072] == bytes(2048) and data[1023] == 255 and data[3072] == 0
        assert data[3073] == 1
    finally:
        image.close()


def test_read_only_refuses_writes(image_file):
    image = BlockImage("disk", str(image_file), read_only=True)
    try:
        assert not image.can_punch
        for write in (lambda: image.writev([memoryview(b"x")], 0),
                      lambda: image.clear(0, 512, unmap=False)):
            with pytest.raises(OSError) as raised:
                write()
            assert raised.value.errno == errno.EROFS
    finally:
        image.close()
    assert image_file.read_bytes()[:1] == b"\0"


def test_open_errors_name_the_device(tmp_path):
    with pytest.raises(ConfigError, match="^ahci-hd: .*/missing: no such file$"):
        BlockImage("ahci-hd", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="is a directory"):
        BlockImage("nvme", str(tmp_path))


def test_images_are_locked_as_qemu_locks_them(image_file):
    """Writers exclusive, readers shared, lock=False opts out, and the lock
    goes with the image; another process sees it too (OFD locks are per
    open file, so one process opening twice is refused just the same)."""
    writer = BlockImage("virtio-blk", str(image_file))
    for read_only in (False, True):
        with pytest.raises(ConfigError, match=f"virtio-blk: {image_file} is .* elsewhere"):
            BlockImage("virtio-blk", str(image_file), read_only=read_only)
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, struct
        fd = os.open({str(image_file)!r}, os.O_RDONLY)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))
        except OSError as exc:
            print(exc.errno)
        """)], capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() in (str(errno.EAGAIN), str(errno.EACCES)), probe
    BlockImage("virtio-blk", str(image_file), lock=False).close()
    writer.close()
    readers = [BlockImage("virtio-blk", str(image_file), read_only=True) for _ in range(2)]
    with pytest.raises(ConfigError, match="in use elsewhere"):
        BlockImage("virtio-blk", str(image_file))
    for reader in readers:
        reader.close()
    BlockImage("virtio-blk", str(image_file)).close()


@pytest.mark.usefixtures("needs_kvm")
def test_a_second_vm_on_a_running_vms_disk_is_refused(image_file, tmp_path):
    """The operator's view: one line and exit status 4 while the first VM
    runs; lock=off lets the second start (it ends here at once, on a ROM
    that powers off)."""
    running = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-s", f"4,virtio-blk,{image_file}",
         "-o", f"control.socket={tmp_path / 'first.sock'}",
         "-l", f"bootrom,{build_rom('exits', COUNT=10**8)}", "first"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / "first.sock").exists():
            assert running.poll() is None, running.stderr.read()
            time.sleep(0.05)
        powers_off = ["-l", f"bootrom,{build_rom('hello16')}",
                      "-o", f"control.socket={tmp_path / 'second.sock'}", "second"]
        second = run_pyhyve(["-s", f"4,virtio-blk,{image_file}", *powers_off])
        assert second.returncode == 4
        assert second.stderr == (f"pyhyve: virtio-blk: {image_file} is in use elsewhere "
                                 "(another VM?); lock=off shares it anyway\n")
        shared = run_pyhyve(["-s", f"4,virtio-blk,{image_file},ro,lock=off", *powers_off])
        assert shared.returncode == 1, shared.stderr
    finally:
        running.kill()
        running.wait()
