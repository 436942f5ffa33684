"""pyhyve's own Linux 6.1 guest (pyhyve/guestkit/source.py) as a test client.

build() makes it into the kit's persistent cache, where the quick start's
`pyhyve-guest run` finds it too (minutes once, then seconds), and returns the
kernel, vmlinux and initramfs.  A test hands the
guest a shell script: with_script() appends it to the initramfs as /test.sh,
which the guest's /init runs after printing LINUX-USERSPACE-OK.  Scripts
print sections (`section NAME` in SCRIPT_PRELUDE) that sections() splits the
console output into, so one boot, which takes minutes under this host's
emulated KVM, answers many tests.

GuestRun starts pyhyve or QEMU on the guest with its serial console on a
pipe, collects what it prints, waits for markers and can write to the
console, so a test can talk to the guest's script while it runs.
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyhyve.guestkit import Guest, KitError, default_cache, source
from pyhyve.guestkit.initramfs import EXECUTABLE, newc_archive

REPO = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 1800             # seconds: a boot takes 2 to 4 minutes here alone, more beside others
QEMU = "qemu-system-x86_64"

# The kernel keeps logging (dmesg has it all) but no longer onto the console,
# where a late warning (a clocksource watchdog on a loaded host) would land
# inside a section.
SCRIPT_PRELUDE = """#!/bin/sh
export PATH=/bin
dmesg -n 1
section() { echo "@@@ $1"; }
"""
SECTION = re.compile(r"^@@@ (\S+)\r?$", re.M)


def build() -> Guest:
    """Build (or find built) the guest; fails, rather than skips, when it cannot:
    these tests are the project's main end-to-end client."""
    try:
        return source.build(default_cache() / "source")
    except KitError as exc:
        pytest.fail(f"building the Linux guest failed: {exc}")


def with_script(guest: Guest, directory: Path, script: str,
                files: dict[str, bytes] | None = None) -> Path:
    """The guest's initramfs with /test.sh (SCRIPT_PRELUDE + script) and `files`
    (executable: helper scripts such as udhcpc's) appended as a second archive;
    returns its path."""
    entries = [("test.sh", EXECUTABLE, (SCRIPT_PRELUDE + script).encode())]
    entries += [(name, EXECUTABLE, data) for name, data in sorted((files or {}).items())]
    path = directory / "test-initrd.cpio"
    path.write_bytes(guest.initrd.read_bytes() + newc_archive(entries))
    return path


def sections(output: str) -> dict[str, str]:
    """The console output after each `section NAME` line, up to the next one."""
    found = {}
    marks = list(SECTION.finditer(output))
    for mark, following in zip(marks, marks[1:] + [None]):
        end = following.start() if following else len(output)
        found[mark.group(1)] = output[mark.end():end].replace("\r\n", "\n").strip("\n")
    return found


class GuestRun:
    """One pyhyve or QEMU process with the guest's console on a pipe."""

    def __init__(self, command: list[str], env: dict | None = None, log: Path | None = None):
        """`log`, if given, gets a copy of the console output as it comes."""
        self.command = command
        self._log = open(log, "wb") if log else None
        self.started = time.monotonic()
        self.started_wall = time.time()     # for clocks the guest reports
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._output = bytearray()
        self._cond = threading.Condition()
        self.times: dict[str, float] = {}      # marker -> seconds from start to when seen
        self.section_times: dict[str, float] = {}   # section -> seconds from start to its mark
        self._scanned = 0                      # where the section scan resumes in the output
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            data = self.proc.stdout.read1(65536)
            if self._log:
                self._log.write(data)
                self._log.flush()
            with self._cond:
                if not data:
                    self._cond.notify_all()
                    return
                self._output += data
                self._note_sections()
                self._cond.notify_all()

    def _note_sections(self) -> None:
        """Time each `section NAME` mark as it arrives (complete lines only), so
        that a slow boot says which part of its script took the time."""
        end = self._output.rfind(b"\n") + 1
        if end <= self._scanned:
            return
        now = time.monotonic() - self.started
        for mark in SECTION.finditer(self._output[self._scanned:end].decode(errors="replace")):
            self.section_times.setdefault(mark.group(1), now)
        self._scanned = end

    def timing(self) -> str:
        """One line: seconds from start to each section's mark."""
        return " ".join(f"{name}@{seconds:.0f}s" for name, seconds in self.section_times.items())

    @property
    def output(self) -> str:
        with self._cond:
            return self._output.decode(errors="replace")

    def expect(self, marker: str, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until the console shows `marker`; seconds since start.  Fails with
        the tail of the output if the process ends or time runs out first."""
        needle = marker.encode()
        with self._cond:
            found = self._cond.wait_for(
                lambda: needle in self._output or not self._reader.is_alive(), timeout)
            if needle not in self._output:
                tail = self._output[-4000:].decode(errors="replace")
                self.kill()
                pytest.fail(f"{marker!r} not seen ({'timed out' if not found else 'exited'}) "
                            f"from {' '.join(self.command[:3])}...:\n{tail}")
        self.times.setdefault(marker, time.monotonic() - self.started)
        return self.times[marker]

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = BOOT_TIMEOUT) -> int:
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.command[0]} did not stop:\n{self.output[-4000:]}")
        self._reader.join(5)
        return status

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def pyhyve_command(guest: Guest, initrd: Path, *args: str, cpus: int = 1,
                   memory: str = "128M", name: str = "linux", extra_cmdline: str = ""
                   ) -> list[str]:
    cmdline = f"{guest.cmdline} {extra_cmdline}".strip()
    return [sys.executable, "-m", "pyhyve", "-m", memory, "-c", str(cpus),
            "-l", "com1,stdio", *args,
            "-f", f"kexec,{guest.kernel},{initrd},{cmdline}", name]


def pyhyve_env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


# For tests that compare one device model with QEMU's: Linux then takes PCI
# interrupt routing from the MP table instead of evaluating the DSDT's _PRT,
# which under QEMU's pc machine waits out ACPICA's 30 s loop timeout once per
# PCI device on this host's instruction emulator (minutes of CI per boot).
# The devices compared interrupt through MSI or MSI-X, which _PRT does not route.
QEMU_SKIP_PRT = "acpi=noirq"


def qemu_command(guest: Guest, initrd: Path, *args: str, machine: str = "pc",
                 memory: str = "128M", cpus: int = 1, extra_cmdline: str = "") -> list[str]:
    """QEMU on the same kernel and initramfs, its console on stdio as pyhyve's."""
    # -cpu host: the CPUID pyhyve gives (KVM's supported set); QEMU's default qemu64
    # model is a family-15 AMD, for which Linux runs x87 code the host cannot emulate.
    # Without -arch-capabilities QEMU aborts here: KVM refuses its MSR 0x10a value.
    return [QEMU, "-machine", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", memory,
            "-smp", str(cpus),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(guest.kernel), "-initrd", str(initrd),
            "-append", f"{guest.cmdline} {extra_cmdline}".strip(), *args]


# --- a disk device as Linux's own driver uses it -------------------------------------------
DISK_SIZE = 32 << 20             # the image the disk checks below expect, in bytes


# Bytes for the guest to write: the start of its busybox binary, already in its
# RAM.  /dev/urandom would take a minute a MiB under this host's emulated KVM,
# and a byte-at-a-time tool (tr, cmp, head -c) seconds a MiB; dd and sha256sum
# are what the scripts below use.
FILL = "/bin/busybox"
ZERO_MIB_SHA256 = hashlib.sha256(bytes(1 << 20)).hexdigest()


def disk_script(device: str, tag: str) -> str:
    """The guest's side of a disk device's check (the host's side is
    check_disk_sections): an ext2 filesystem made on `device`, files written,
    their sums, a read-only remount; then 2 MiB written at 20 MiB and the first
    of them discarded (blkdiscard), the device read back.  Its sections are
    TAG-ext2 and TAG-discard, so that one boot can check several disks."""
    return rf"""
section {tag}-ext2
d={device}
mke2fs -q $d 16384 && echo made
mount -t ext2 $d /mnt && echo mounted
seq 0 499 | sed 's/.*/{tag} line &/' > /mnt/lines.txt
dd if={FILL} of=/mnt/data.bin bs=4096 count=64 2>/dev/null
sync
sha256sum /mnt/lines.txt /mnt/data.bin
umount /mnt && echo unmounted
mount -t ext2 -o ro $d /mnt && sha256sum /mnt/data.bin && umount /mnt
""" + discard_script(tag)


def discard_script(tag: str) -> str:
    """The discard half, section TAG-discard, on the disk $d names (disk_script's,
    or a test's own): MiB 20 and 21 filled, MiB 20 discarded, both read back."""
    return rf"""section {tag}-discard
dd if={FILL} of=$d bs=1M seek=20 count=1 oflag=direct 2>/dev/null &&
  dd if={FILL} of=$d bs=1M seek=21 count=1 oflag=direct 2>/dev/null && echo filled
blkdiscard -o 20971520 -l 1048576 $d && echo discarded
for m in 20 21; do dd if=$d bs=1M skip=$m count=1 iflag=direct 2>/dev/null | sha256sum; done
"""


def check_disk_sections(found: dict, image: Path, tag: str) -> None:
    """What disk_script printed and the image it left agree: the host reads
    the guest's files (debugfs) with the sums the guest printed, and the
    discarded MiB reads as zeros on both sides."""
    from test_linux_guest import debugfs_cat
    ext2 = found[f"{tag}-ext2"]
    assert "made" in ext2 and "mounted" in ext2 and "unmounted" in ext2, ext2
    sums = dict(reversed(line.split()) for line in ext2.splitlines()
                if re.match(r"^[0-9a-f]{64}\s", line))
    lines = debugfs_cat(image, "lines.txt")
    assert lines == b"".join(b"%s line %d\n" % (tag.encode(), i) for i in range(500))
    assert hashlib.sha256(lines).hexdigest() == sums["/mnt/lines.txt"]
    data = debugfs_cat(image, "data.bin")
    assert len(data) == 64 * 4096 and data.count(0) < len(data) // 2
    assert hashlib.sha256(data).hexdigest() == sums["/mnt/data.bin"]
    check_discard(found[f"{tag}-discard"], image)


def check_discard(section: str, image: Path) -> None:
    """discard_script's discarded MiB reads as zeros on both sides; the next,
    untouched, holds what the guest wrote and read there (not zeros)."""
    discard = section.splitlines()
    assert discard[:2] == ["filled", "discarded"], discard
    discarded, kept = (line.split()[0] for line in discard[2:4])
    data = image.read_bytes()
    assert discarded == ZERO_MIB_SHA256 and data[20 << 20:21 << 20] == bytes(1 << 20)
    assert kept == hashlib.sha256(data[21 << 20:22 << 20]).hexdigest() != ZERO_MIB_SHA256
