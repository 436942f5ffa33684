"""The prepared Linux 6.1 guest (../shared/linuxguest) as a test client.

build() runs its build.sh into a persistent cache (minutes once, then
seconds) and returns the kernel, vmlinux and initramfs.  A test hands the
guest a shell script: with_script() appends it to the initramfs as /test.sh,
which the guest's /init runs after printing LINUX-USERSPACE-OK.  Scripts
print sections (`section NAME` in SCRIPT_PRELUDE) that sections() splits the
console output into, so one boot, which takes minutes under this host's
emulated KVM, answers many tests.

GuestRun starts pyhyve or QEMU on the guest with its serial console on a
pipe, collects what it prints, waits for markers and can write to the
console, so a test can talk to the guest's script while it runs.
"""

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from build import CACHE

REPO = Path(__file__).resolve().parent.parent
SOURCES = Path(os.environ.get("PYHYVE_LINUXGUEST", REPO.parent / "shared" / "linuxguest"))
OUTPUT = Path(os.environ.get("PYHYVE_LINUX_CACHE", CACHE.parent / "linuxguest"))
PACKAGES = ("linux-source-6.1 busybox-static gcc make flex bison bc libelf-dev libssl-dev "
            "cpio lz4 patch")
BOOT_TIMEOUT = 1800             # seconds: a boot takes 2 to 4 minutes here alone, more beside others
QEMU = "qemu-system-x86_64"

SCRIPT_PRELUDE = """#!/bin/sh
export PATH=/bin
section() { echo "@@@ $1"; }
"""
SECTION = re.compile(r"^@@@ (\S+)\r?$", re.M)


class LinuxGuest(NamedTuple):
    bzimage: Path
    vmlinux: Path
    initrd: Path
    cmdline: str


def build() -> LinuxGuest:
    """Build (or find built) the guest; fails, rather than skips, when it cannot:
    these tests are the project's main end-to-end client."""
    script = SOURCES / "build.sh"
    if not script.exists():
        pytest.fail(f"the Linux guest's sources are not at {SOURCES} (set PYHYVE_LINUXGUEST "
                    f"to the linuxguest folder); its packages: apt-get install {PACKAGES}")
    result = subprocess.run(["bash", str(script), str(OUTPUT)], capture_output=True, text=True)
    if result.returncode:
        pytest.fail(f"building the Linux guest failed (needs: apt-get install {PACKAGES}):\n"
                    f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return LinuxGuest(OUTPUT / "bzImage", OUTPUT / "vmlinux", OUTPUT / "initrd.cpio",
                      (SOURCES / "cmdline.txt").read_text().strip())


def _newc_entry(name: str, data: bytes, mode: int, ino: int) -> bytes:
    """One entry of a newc cpio archive (what Linux's initramfs unpacker reads)."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    entry = header + encoded
    entry += bytes(-len(entry) % 4) + data
    return entry + bytes(-len(entry) % 4)


def with_script(guest: LinuxGuest, directory: Path, script: str,
                files: dict[str, bytes] | None = None) -> Path:
    """The guest's initramfs with /test.sh (SCRIPT_PRELUDE + script) and `files`
    (executable: helper scripts such as udhcpc's) appended as a second archive;
    returns its path."""
    entries = [_newc_entry("test.sh", (SCRIPT_PRELUDE + script).encode(),
                           stat.S_IFREG | 0o755, 1)]
    for ino, (name, data) in enumerate(sorted((files or {}).items()), 2):
        entries.append(_newc_entry(name, data, stat.S_IFREG | 0o755, ino))
    entries.append(_newc_entry("TRAILER!!!", b"", 0, 0))
    path = directory / "test-initrd.cpio"
    path.write_bytes(guest.initrd.read_bytes() + b"".join(entries))
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
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._output = bytearray()
        self._cond = threading.Condition()
        self.times: dict[str, float] = {}      # marker -> seconds from start to when seen
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
                self._cond.notify_all()

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


def pyhyve_command(guest: LinuxGuest, initrd: Path, *args: str, cpus: int = 1,
                   memory: str = "128M", name: str = "linux", extra_cmdline: str = ""
                   ) -> list[str]:
    cmdline = f"{guest.cmdline} {extra_cmdline}".strip()
    return [sys.executable, "-m", "pyhyve", "-m", memory, "-c", str(cpus),
            "-l", "com1,stdio", *args,
            "-f", f"kexec,{guest.bzimage},{initrd},{cmdline}", name]


def pyhyve_env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


def qemu_command(guest: LinuxGuest, initrd: Path, *args: str, machine: str = "pc",
                 memory: str = "128M", cpus: int = 1) -> list[str]:
    """QEMU on the same kernel and initramfs, its console on stdio as pyhyve's."""
    # -cpu host: the CPUID pyhyve gives (KVM's supported set); QEMU's default qemu64
    # model is a family-15 AMD, for which Linux runs x87 code the host cannot emulate.
    # Without -arch-capabilities QEMU aborts here: KVM refuses its MSR 0x10a value.
    return [QEMU, "-machine", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", memory,
            "-smp", str(cpus),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(guest.bzimage), "-initrd", str(initrd),
            "-append", guest.cmdline, *args]
