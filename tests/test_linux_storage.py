"""Linux 6.1's storage drivers on pyhyve's disk and file-sharing devices, and
on QEMU's at the same addresses.

One boot per side carries every storage device: AHCI with a disk and a CD
(Linux's ahci, sd and sr), NVMe (nvme), virtio-scsi with a read-write and a
read-only LUN (virtio_scsi, sd), and two virtio-9p shares, one read-only
(v9fs).  The guest's script checks each in turn and prints sections that the
tests below compare with the images and directories it left on the host.  A
boot takes minutes on this host's emulated KVM, so the devices share it.

Under QEMU the kernel takes QEMU_SKIP_PRT: every device here interrupts through
MSI or MSI-X, and QEMU's _PRT costs 30 s a PCI device on this host.
"""

import hashlib
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from firmware import require_program
from linuxguest import (DISK_SIZE, FILL, QEMU_SKIP_PRT, GuestRun, check_discard,
                        check_disk_sections, discard_script, disk_script, pyhyve_command,
                        pyhyve_env, qemu_command, sections, with_script)
from test_linux_guest import debugfs_cat
from test_virtio_9p import tree

pytestmark = [pytest.mark.linux, pytest.mark.usefixtures("needs_kvm")]

MiB = 1 << 20
# PCI slots, the same on both sides: the script finds each disk by its function.
AHCI, NVME, SCSI, SHARE_RW, SHARE_RO = 3, 4, 5, 6, 7
AHCI_SERIAL, NVME_SERIAL = "PYHYVE-AHCI-1", "PYHYVE-NVME-1"
CD_TEXT = "read from the ahci cd by linux"
SCSI_RO_SIZE = MiB
SCSI_HOST_TEXT = b"written by mke2fs -d on the host\n"
SCSI_RO_PATTERN = b"read-only LUN\n" * 300
NUMBERS = "".join(f"{n}\n" for n in range(1, 20001))

SCRIPT = rf"""
for b in /sys/block/sd*; do case $(readlink -f $b) in
  */0000:00:0{AHCI}.0/*) ahci=/dev/${{b##*/}};;
  */0000:00:0{SCSI}.0/*:0:0:0/block/*) scsi_rw=/dev/${{b##*/}};;
  */0000:00:0{SCSI}.0/*:0:0:1/block/*) scsi_ro=/dev/${{b##*/}};;
esac; done
section ahci
b=${{ahci#/dev/}}
cat /sys/block/$b/size /sys/block/sr0/size /sys/block/$b/queue/rotational
cat /sys/block/$b/device/vendor /sys/block/$b/device/model
cat /sys/block/sr0/device/vendor /sys/block/sr0/device/model
dd if=/sys/block/$b/device/vpd_pg80 bs=1 skip=4 count=20 2>/dev/null; echo
section ahci-cd
mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/hello.txt && umount /mnt && echo unmounted
{disk_script("$ahci", "ahci")}
section ahci-irqs
grep -c ahci /proc/interrupts
section nvme
cat /sys/block/nvme0n1/size /sys/block/nvme0n1/queue/logical_block_size
cat /sys/class/nvme/nvme0/serial /sys/class/nvme/nvme0/model
{disk_script("/dev/nvme0n1", "nvme")}
section nvme-irqs
grep nvme /proc/interrupts | wc -l
section scsi-luns
for b in ${{scsi_rw#/dev/}} ${{scsi_ro#/dev/}}; do d=/sys/block/$b; l=$(readlink $d/device)
  echo "${{l##*/}}" $(cat $d/size $d/ro $d/device/vendor $d/device/model \
    $d/queue/discard_max_bytes); done
section scsi-ext2
mount -t ext2 $scsi_rw /mnt && echo mounted
cat /mnt/host.txt
seq 0 299 | sed 's/.*/scsi line &/' > /mnt/lines.txt
dd if={FILL} of=/mnt/data.bin bs=4096 count=32 2>/dev/null
sync
sha256sum /mnt/lines.txt /mnt/data.bin
umount /mnt && echo unmounted
section scsi-ro
dd if=$scsi_ro bs=4096 count=1 2>/dev/null | sha256sum
blockdev --setrw $scsi_ro
dd if=/dev/zero of=$scsi_ro bs=4096 count=1 oflag=direct 2>/dev/null; echo "write status $?"
d=$scsi_rw
{discard_script("scsi")}
section 9p-mount
mkdir -p /mnt/rw /mnt/ro
mount -t 9p -o trans=virtio,version=9p2000.L hostshare /mnt/rw && echo MOUNT-RW-OK
mount -t 9p -o trans=virtio,version=9p2000.L roshare /mnt/ro && echo MOUNT-RO-OK
section 9p-read
cat /mnt/rw/from-host.txt
section 9p-write
echo "written by linux" > /mnt/rw/from-guest.txt
chmod 600 /mnt/rw/from-guest.txt
mkdir /mnt/rw/made
seq 1 20000 > /mnt/rw/made/numbers.txt
mv /mnt/rw/made/numbers.txt /mnt/rw/made/renamed.txt
ln -s renamed.txt /mnt/rw/made/link
ln -s /etc/passwd /mnt/rw/made/absolute
tail -n 1 /mnt/rw/made/link
md5sum /mnt/rw/made/renamed.txt
echo doomed > /mnt/rw/doomed && rm /mnt/rw/doomed && echo RM-OK
section 9p-ls
ls -l /mnt/rw/made
section 9p-escape
cat /mnt/rw/hostlink/secret 2>&1 || echo ESCAPE-FAILED
section 9p-ro
cat /mnt/ro/ro.txt
if (echo x > /mnt/ro/new) 2>/dev/null; then echo RO-WRITE-SUCCEEDED; else echo RO-WRITE-FAILED; fi
if rm /mnt/ro/ro.txt 2>/dev/null; then echo RO-RM-SUCCEEDED; else echo RO-RM-FAILED; fi
section 9p-umount
umount /mnt/rw && umount /mnt/ro && echo UMOUNT-OK
section end
"""


class Images:
    """What the boot is given: disk images, a CD, the shares and a directory
    beside them the guest must not reach; and their state before the boot."""

    def __init__(self, tmp: Path):
        self.ahci, self.nvme = tmp / "ahci.img", tmp / "nvme.img"
        self.scsi_rw, self.scsi_ro = tmp / "lun0.img", tmp / "lun1.img"
        for image in (self.ahci, self.nvme, self.scsi_rw):
            with open(image, "wb") as file:
                file.truncate(DISK_SIZE)
        self.scsi_ro.write_bytes(SCSI_RO_PATTERN.ljust(SCSI_RO_SIZE, b"\0"))
        content = tmp / "scsi-content"
        content.mkdir()
        (content / "host.txt").write_bytes(SCSI_HOST_TEXT)
        # an 8 MiB ext2 at the start, the rest left for the discard check at 20 MiB
        subprocess.run([require_program("mke2fs", "e2fsprogs"), "-q", "-F", "-t", "ext2",
                        "-b", "1024", "-d", str(content), str(self.scsi_rw), "8192"],
                       check=True, capture_output=True, timeout=60)
        cd = tmp / "cd"
        cd.mkdir()
        (cd / "hello.txt").write_text(CD_TEXT + "\n")
        self.iso = tmp / "cd.iso"
        subprocess.run([require_program("xorriso", "xorriso"), "-as", "mkisofs", "-quiet",
                        "-o", str(self.iso), str(cd)], check=True, capture_output=True,
                       timeout=60)
        self.share_rw, self.share_ro, self.outside = tmp / "rw", tmp / "ro", tmp / "outside"
        for path in (self.share_rw, self.share_ro, self.outside):
            path.mkdir()
        (self.share_rw / "from-host.txt").write_text("made on the host\n")
        (self.share_ro / "ro.txt").write_text("read-only content\n")
        (self.outside / "secret").write_text("host secret\n")
        os.symlink(self.outside, self.share_rw / "hostlink")
        self.before_ro, self.before_outside = tree(self.share_ro), tree(self.outside)


def pyhyve_storage(guest, initrd, images: Images, tmp: Path):
    """The pyhyve command with its default sandbox (Landlock and seccomp), which
    the 9p shares widen."""
    return pyhyve_command(
        guest, initrd,
        "-s", f"{AHCI},ahci,hd:{images.ahci},ser={AHCI_SERIAL},nmrr=1,cd:{images.iso}",
        "-s", f"{NVME},nvme,{images.nvme},ser={NVME_SERIAL}",
        "-s", f"{SCSI},virtio-scsi,lun0={images.scsi_rw},lun1={images.scsi_ro},ro",
        "-s", f"{SHARE_RW},virtio-9p,hostshare={images.share_rw}",
        "-s", f"{SHARE_RO},virtio-9p,roshare={images.share_ro},ro",
        "-o", f"control.socket={tmp / 'ctl.sock'}", name="linuxstorage"), pyhyve_env()


def qemu_storage(guest, initrd, images: Images, tmp: Path):
    """QEMU's devices of the same kinds at the same addresses."""
    return qemu_command(
        guest, initrd,
        "-device", f"ahci,id=a,addr={AHCI}",
        "-drive", f"file={images.ahci},format=raw,if=none,id=h,discard=unmap",
        "-device", f"ide-hd,drive=h,bus=a.0,serial={AHCI_SERIAL},rotation_rate=1,"
                   "model=PYHYVE SATA DISK",
        "-drive", f"file={images.iso},format=raw,if=none,id=c,media=cdrom,readonly=on",
        "-device", "ide-cd,drive=c,bus=a.1",
        "-drive", f"file={images.nvme},format=raw,if=none,id=n,discard=unmap",
        "-device", f"nvme,drive=n,serial={NVME_SERIAL},addr={NVME}",
        "-device", f"virtio-scsi-pci,id=scsi0,addr={SCSI}",
        "-drive", f"file={images.scsi_rw},format=raw,if=none,id=d0,discard=unmap",
        "-device", "scsi-hd,drive=d0,bus=scsi0.0,scsi-id=0,lun=0",
        "-drive", f"file={images.scsi_ro},format=raw,if=none,id=d1,readonly=on",
        "-device", "scsi-hd,drive=d1,bus=scsi0.0,scsi-id=0,lun=1",
        "-fsdev", f"local,id=f0,path={images.share_rw},security_model=none",
        "-device", f"virtio-9p-pci,fsdev=f0,mount_tag=hostshare,addr={SHARE_RW}",
        "-fsdev", f"local,id=f1,path={images.share_ro},security_model=none,readonly=on",
        "-device", f"virtio-9p-pci,fsdev=f1,mount_tag=roshare,addr={SHARE_RO}",
        extra_cmdline=QEMU_SKIP_PRT), dict(os.environ)


class StorageBoot:
    """One boot of SCRIPT: its sections, how the VM ended, what it left."""

    def __init__(self, side: str, guest, tmp: Path):
        self.side = side
        self.images = Images(tmp)
        initrd = with_script(guest, tmp, SCRIPT)
        argv, env = {"pyhyve": pyhyve_storage, "qemu": qemu_storage}[side](
            guest, initrd, self.images, tmp)
        with GuestRun(argv, env, tmp / "console.log") as run:
            run.expect("@@@ end")
            self.status = run.wait()
        print(f"{side}: {run.timing()}")
        self.output = run.output
        self.sections = sections(run.output)


@pytest.fixture(scope="module", params=["pyhyve", "qemu"])
def storage(request, linux_guest, tmp_path_factory):
    """The storage boot under pyhyve, then under QEMU (the reference)."""
    if request.param == "qemu":
        require_program("qemu-system-x86_64", "qemu-system-x86")
    return StorageBoot(request.param, linux_guest,
                       tmp_path_factory.mktemp(f"linux-storage-{request.param}"))


def test_the_script_ran_to_its_power_off(storage):
    """poweroff -f: bhyve's exit status 1 under pyhyve, 0 from QEMU's process."""
    assert storage.status == (1 if storage.side == "pyhyve" else 0), storage.output[-3000:]
    assert "Traceback" not in storage.output and " ERROR " not in storage.output


# --- AHCI: Linux's ahci, sd and sr -----------------------------------------------------------
def test_ahci_disk_and_cd_are_seen(storage):
    """The disk's size, serial and model read the same under QEMU; the CD's
    INQUIRY strings are each controller's own (QEMU's drive says QEMU)."""
    lines = [line.rstrip() for line in storage.sections["ahci"].splitlines()]
    cd_vendor, cd_model = (("PYHYVE", "PYHYVE SATA DVD") if storage.side == "pyhyve"
                           else ("QEMU", "QEMU DVD-ROM"))
    assert lines == [str(DISK_SIZE // 512), str(storage.images.iso.stat().st_size // 512), "0",
                     "ATA", "PYHYVE SATA DISK", cd_vendor, cd_model, AHCI_SERIAL], lines


def test_ahci_cd_mounts_as_iso9660(storage):
    assert storage.sections["ahci-cd"].splitlines() == [CD_TEXT, "unmounted"]


def test_ahci_disk_takes_ext2_and_discard(storage):
    check_disk_sections(storage.sections, storage.images.ahci, "ahci")
    assert int(storage.sections["ahci-irqs"]) >= 1


# --- NVMe: Linux's nvme ----------------------------------------------------------------------
def test_nvme_namespace_and_identity(storage):
    """sysfs shows the serial and model as the controller pads them; the model
    is each controller's own."""
    model = "pyhyve-NVMe" if storage.side == "pyhyve" else "QEMU NVMe Ctrl"
    assert [line.rstrip() for line in storage.sections["nvme"].splitlines()] == [
        str(DISK_SIZE // 512), "512", NVME_SERIAL, model], storage.sections["nvme"]


def test_nvme_takes_ext2_and_discard_through_msix_queues(storage):
    check_disk_sections(storage.sections, storage.images.nvme, "nvme")
    assert int(storage.sections["nvme-irqs"]) >= 2      # admin and I/O queue vectors (MSI-X)


# --- virtio-scsi: Linux's virtio_scsi and sd ---------------------------------------------------
def test_scsi_luns_are_seen(storage):
    """H:C:T:L, 512-byte sectors, read-only flag, vendor, model, discard limit.
    Where QEMU differs: its vendor and model are QEMU's ("QEMU", "QEMU HARDDISK");
    its discard limits are its own, and its scsi-hd may offer UNMAP on a read-only
    drive too (pyhyve offers it only where writes are allowed: LBPME off)."""
    lines = storage.sections["scsi-luns"].splitlines()
    assert [line.split()[0].split(":")[1:] for line in lines] == [["0", "0", "0"],
                                                                 ["0", "0", "1"]], lines
    rw, ro = (line.split()[1:] for line in lines)
    assert rw[:2] == [str(DISK_SIZE // 512), "0"] and ro[:2] == [str(SCSI_RO_SIZE // 512), "1"]
    vendor_model = ["PYHYVE", "VIRTUAL", "DISK"] if storage.side == "pyhyve" else \
        ["QEMU", "QEMU", "HARDDISK"]
    assert rw[2:5] == vendor_model and ro[2:5] == vendor_model, lines
    assert int(rw[5]) > 0, lines                                 # discard on the rw LUN
    if storage.side == "pyhyve":
        assert ro[5] == "0", lines


def test_scsi_reads_the_hosts_ext2_and_the_host_reads_its_files(storage):
    section = storage.sections["scsi-ext2"]
    assert "mounted" in section and SCSI_HOST_TEXT.decode().strip() in section, section
    assert "unmounted" in section, section
    sums = dict(reversed(line.split()) for line in section.splitlines()
                if re.match(r"^[0-9a-f]{64}\s", line))
    lines = debugfs_cat(storage.images.scsi_rw, "lines.txt")
    assert lines == b"".join(b"scsi line %d\n" % i for i in range(300))
    assert hashlib.sha256(lines).hexdigest() == sums["/mnt/lines.txt"]
    data = debugfs_cat(storage.images.scsi_rw, "data.bin")
    assert len(data) == 32 * 4096
    assert hashlib.sha256(data).hexdigest() == sums["/mnt/data.bin"]


def test_scsi_read_only_lun_refuses_writes(storage):
    """Linux is told to write anyway (blockdev --setrw): the device refuses with
    DATA PROTECT, dd fails, the image is unchanged."""
    pattern = SCSI_RO_PATTERN.ljust(SCSI_RO_SIZE, b"\0")
    digest, status = storage.sections["scsi-ro"].splitlines()[-2:]
    assert digest.split()[0] == hashlib.sha256(pattern[:4096]).hexdigest()
    assert status.startswith("write status ") and status != "write status 0", status
    assert storage.images.scsi_ro.read_bytes() == pattern


def test_scsi_discards_through_unmap(storage):
    check_discard(storage.sections["scsi-discard"], storage.images.scsi_rw)


# --- virtio-9p: Linux's v9fs -------------------------------------------------------------------
def test_9p_shares_mount_and_read(storage):
    assert storage.sections["9p-mount"] == "MOUNT-RW-OK\nMOUNT-RO-OK"
    assert storage.sections["9p-read"] == "made on the host"
    assert storage.sections["9p-umount"] == "UMOUNT-OK"


def test_9p_writes_reach_the_host(storage):
    """Files, modes, a directory, a rename, relative and absolute symlinks and
    an unlink, as the host sees them afterwards."""
    found, rw = storage.sections, storage.images.share_rw
    assert found["9p-write"] == f"20000\n{hashlib.md5(NUMBERS.encode()).hexdigest()}  " \
        "/mnt/rw/made/renamed.txt\nRM-OK"
    assert "renamed.txt -> " not in found["9p-ls"] and "link -> renamed.txt" in found["9p-ls"]
    assert "absolute -> /etc/passwd" in found["9p-ls"]
    assert (rw / "from-guest.txt").read_text() == "written by linux\n"
    assert stat.S_IMODE((rw / "from-guest.txt").stat().st_mode) == 0o600
    assert (rw / "made" / "renamed.txt").read_text() == NUMBERS
    assert os.readlink(rw / "made" / "link") == "renamed.txt"
    assert os.readlink(rw / "made" / "absolute") == "/etc/passwd"
    assert not (rw / "made" / "numbers.txt").exists() and not (rw / "doomed").exists()


def test_9p_symlink_out_of_the_share_is_not_followed(storage):
    assert storage.sections["9p-escape"].endswith("ESCAPE-FAILED")
    assert tree(storage.images.outside) == storage.images.before_outside


def test_9p_read_only_share_refuses_changes(storage):
    assert storage.sections["9p-ro"] == "read-only content\nRO-WRITE-FAILED\nRO-RM-FAILED"
    assert tree(storage.images.share_ro) == storage.images.before_ro
