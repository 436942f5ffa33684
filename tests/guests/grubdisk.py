"""A GRUB 2 boot disk built without loop devices or mounts, for tests/test_grub.py
and bench/boot.py; and a GRUB CD image (El Torito, made by grub-mkrescue) with
the same grub.cfg and file, for tests/test_ahci.py.

The disk: an MBR with GRUB's boot.img as boot code and one partition table
entry, GRUB's core.img (made by grub-mkimage, its embedded prefix naming the
partition) in the sectors after the MBR, where boot.img's kernel sector
pointer finds it, and an ext2 filesystem made by `mke2fs -d` in a file,
copied in at PARTITION_START.  Its grub.cfg prints MARKER, `cat`s a file that
holds FILE_TEXT on the serial console, and halts.
"""

import struct
import subprocess
from pathlib import Path

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
RESCUE_MODULES = ["biosdisk", "iso9660", "serial", "terminal", "cat", "echo", "normal",
                  "configfile", "halt"]


def grub_cfg(file: str) -> str:
    """Print MARKER and the file on the serial console, then halt."""
    return f"""serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
echo {MARKER}
cat {file}
halt
"""


GRUB_CFG = grub_cfg("(hd0,msdos1)/hello.txt")


def _tree(root: Path, cfg: str) -> None:
    (root / "boot" / "grub").mkdir(parents=True, exist_ok=True)
    (root / "boot" / "grub" / "grub.cfg").write_text(cfg)
    (root / "hello.txt").write_text(FILE_TEXT + "\n")


def build_grub_iso(work: Path, mkrescue: str) -> Path:
    """work/grub.iso: GRUB's El Torito CD image from grub-mkrescue (which needs
    xorriso and mtools), hello.txt at the root of its ISO 9660 filesystem; only
    the modules it uses (GRUB then reports the partition maps it lacks)."""
    root = work / "iso-root"
    _tree(root, grub_cfg("/hello.txt"))
    iso = work / "grub.iso"
    subprocess.run([mkrescue, "-o", str(iso), str(root),
                    f"--install-modules={' '.join(RESCUE_MODULES)}", "--fonts=", "--locales=",
                    "--themes="], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return iso


def partition_entry(start: int, sectors: int) -> bytes:
    """An active Linux partition, addressed by LBA (its CHS fields say "beyond 8 GiB")."""
    return struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                       start, sectors)


def build_grub_disk(work: Path, boot_img: str, mkimage: str, mke2fs: str,
                    grub_cfg: str = GRUB_CFG) -> Path:
    """Write work/disk.img (and its parts beside it), GRUB reading GRUB_CFG;
    returns the disk's path."""
    root = work / "root"
    _tree(root, grub_cfg)

    partition = work / "partition.img"
    partition.unlink(missing_ok=True)
    with open(partition, "wb") as file:
        file.truncate(PARTITION_SIZE)
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext2", "-d", str(root), str(partition)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    core_img = work / "core.img"
    subprocess.run([mkimage, "-O", "i386-pc", "-o", str(core_img), "-p",
                    "(hd0,msdos1)/boot/grub", *GRUB_MODULES], check=True, capture_output=True)
    core = core_img.read_bytes()
    if SECTOR + len(core) > PARTITION_START * SECTOR:
        raise ValueError("core.img overlaps the partition")

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
