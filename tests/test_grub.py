"""End to end: SeaBIOS boots GRUB 2 from a virtio-blk disk, GRUB reads its
grub.cfg and `cat`s a file from an ext2 partition on the serial console, then
halts; the same disk on pyhyve and on QEMU, with both boot times printed.

The disk is built without loop devices or mounts: an MBR with GRUB's boot.img
as boot code and one partition table entry, GRUB's core.img (made by
grub-mkimage, its embedded prefix naming the partition) in the sectors after
the MBR, where boot.img's kernel sector pointer finds it, and an ext2
filesystem made by `mke2fs -d` in a file, copied in at PARTITION_START.

GRUB's `halt` powers a QEMU machine off through its ACPI tables; where
SeaBIOS finds no ACPI power-off register (pyhyve without ACPI tables for the
firmware), GRUB's APM fallback ends in a halt with interrupts off, which
pyhyve, like bhyve, reports as exit status 2.
"""

import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from firmware import read_until, require_file, require_program
from guestrun import REPO

SECTOR = 512
PARTITION_START = 2048                  # sectors: what fdisk picks, 1 MiB
PARTITION_SIZE = 8 * 1024 * 1024
BOOT_IMG = "/usr/lib/grub/i386-pc/boot.img"
BOOT_IMG_KERNEL_SECTOR = 0x5C           # GRUB_BOOT_MACHINE_KERNEL_SECTOR: core.img's LBA
PARTITION_TABLE = 446
GRUB_MODULES = ["biosdisk", "part_msdos", "ext2", "serial", "terminal", "cat", "echo",
                "normal", "configfile", "halt"]

MARKER = "pyhyve-grub-e2e: grub.cfg runs"
FILE_TEXT = "pyhyve-grub-e2e: this line lives in hello.txt on ext2"
GRUB_CFG = f"""serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
echo {MARKER}
cat (hd0,msdos1)/hello.txt
halt
"""

BOOT_TIMEOUT = 240                      # QEMU takes about 40 s here, pyhyve somewhat more
HALT_TIMEOUT = 60


def partition_entry(start: int, sectors: int) -> bytes:
    """An active Linux partition, addressed by LBA (its CHS fields say "beyond 8 GiB")."""
    return struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                       start, sectors)


@pytest.fixture(scope="module")
def grub_disk(tmp_path_factory) -> Path:
    boot_img = require_file(BOOT_IMG, "grub-pc-bin")
    mkimage = require_program("grub-mkimage", "grub-common")
    mke2fs = require_program("mke2fs", "e2fsprogs")
    work = tmp_path_factory.mktemp("grub")
    root = work / "root"
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG)
    (root / "hello.txt").write_text(FILE_TEXT + "\n")

    partition = work / "partition.img"
    with open(partition, "wb") as file:
        file.truncate(PARTITION_SIZE)
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext2", "-d", str(root), str(partition)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    core_img = work / "core.img"
    subprocess.run([mkimage, "-O", "i386-pc", "-o", str(core_img), "-p",
                    "(hd0,msdos1)/boot/grub", *GRUB_MODULES], check=True, capture_output=True)
    core = core_img.read_bytes()
    assert SECTOR + len(core) <= PARTITION_START * SECTOR, "core.img overlaps the partition"

    mbr = bytearray(Path(boot_img).read_bytes()[:PARTITION_TABLE].ljust(SECTOR, b"\0"))
    struct.pack_into("<Q", mbr, BOOT_IMG_KERNEL_SECTOR, 1)
    mbr[PARTITION_TABLE:PARTITION_TABLE + 16] = partition_entry(PARTITION_START,
                                                                PARTITION_SIZE // SECTOR)
    mbr[510:512] = b"\x55\xaa"
    disk = work / "disk.img"
    with open(disk, "wb") as file:
        file.write(mbr)
        file.write(core)                        # from sector 1
        file.seek(PARTITION_START * SECTOR)
        file.write(partition.read_bytes())
    return disk


@dataclass
class Boot:
    output: str         # the serial console
    seconds: float      # from start until the file's text was on the console
    status: int         # exit status


def boot(command: list[str], stop, stderr_path: Path, env=None) -> Boot:
    """Run `command` until the file's text shows and the guest halts; `stop(proc)`
    ends it if it does not."""
    start = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, env=env)
    try:
        output = read_until(proc, FILE_TEXT, BOOT_TIMEOUT)
        seconds = time.monotonic() - start
        if FILE_TEXT in output:
            try:
                output += proc.communicate(timeout=HALT_TIMEOUT)[0].decode(errors="replace")
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            stop(proc)
        proc.wait(30)
        proc.stdout.close()
    return Boot(output, seconds, proc.returncode)


def stop_pyhyve(proc: subprocess.Popen) -> None:
    """As bhyve: the first SIGTERM presses the power button, the next powers off."""
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            pass


def report(capsys, what: str, result: Boot) -> None:
    with capsys.disabled():
        print(f"\n{what}: GRUB printed the file {result.seconds:.1f} s after start "
              f"(exit status {result.status})")


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_grub_on_pyhyve(grub_disk, tmp_path, capsys):
    seabios = require_file("/usr/share/seabios/bios.bin", "seabios")
    log = tmp_path / "seabios.log"
    command = [sys.executable, "-m", "pyhyve", "-m", "128M", "-l", f"bootrom,{seabios}",
               "-l", "com1,stdio", "-l", f"debugcon,file={log}",
               "-s", f"2,virtio-blk,{grub_disk}", "grub-vm"]
    result = boot(command, stop_pyhyve, tmp_path / "stderr.txt",
                  env=dict(os.environ, PYTHONPATH=str(REPO)))
    report(capsys, "pyhyve", result)
    details = (result.output, (tmp_path / "stderr.txt").read_text(errors="replace"),
               log.read_text(errors="replace")[-3000:] if log.exists() else "")
    assert MARKER in result.output and FILE_TEXT in result.output, details
    assert result.status in (1, 2), details        # powered off, or halted (see above)


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_grub_on_qemu(grub_disk, tmp_path, capsys):
    seabios = require_file("/usr/share/seabios/bios.bin", "seabios")
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    command = [qemu, "-machine", "pc", "-enable-kvm", "-m", "128", "-nodefaults",
               "-nographic", "-serial", "stdio", "-monitor", "none", "-bios", seabios,
               "-drive", f"file={grub_disk},format=raw,if=virtio"]
    result = boot(command, subprocess.Popen.kill, tmp_path / "stderr.txt")
    report(capsys, "QEMU", result)
    assert MARKER in result.output and FILE_TEXT in result.output, result.output
    assert result.status == 0, result.output       # halt powered off through ACPI
