"""Direct kernel boot (-f kexec,KERNEL,INITRD,CMDLINE) with test kernels that
stand in for Linux (tests/guests/linux/): a bzImage entered at its 64-bit
entry and a PVH ELF entered in 32-bit protected mode.  Each kernel reports on
COM1 what its boot protocol handed it (see tests/guests/linux/testkernel.c);
QEMU's -kernel on the same machine boots the same files as the reference.

pyhyve's ACPI tables for direct boot are not integrated yet: until they are,
pyhyve's kernels print "FAIL acpi: no rsdp" and halt (exit status 2), and only
the ACPI tests (test_pyhyve_acpi_*) fail.  The other facts are tested apart.
"""

import os
import re
import subprocess
import time
from dataclasses import dataclass

import pytest

from conftest import kvm_usable
from firmware import require_program
from guestrun import run_pyhyve
from kernels import build_bzimage, build_pvh
from pyhyve.vcpu import ExitStatus

MiB = 1 << 20
MEMORY_MIB = 256
CPUS = 2
CMDLINE = "console=ttyS0 pyhyve-test"
INITRD_SIZE = 50_000            # not a page multiple: the size must come through exactly
BOOT_TIMEOUT = 120

# The line each kernel prints once its boot protocol's structure checked out.
KERNELS = {"bzimage": (build_bzimage, "bootproto ok"), "pvh": (build_pvh, "pvh ok")}


def fnv1a(data: bytes) -> int:
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


@dataclass
class Boot:
    kind: str
    status: int | None          # exit status; None for a QEMU run stopped by the test
    console: str                # what the guest wrote on COM1
    stderr: str

    def fact(self, pattern: str) -> re.Match | None:
        # Not anchored at the line's start: under QEMU, SeaBIOS's last message
        # ("Booting from ROM..") shares the kernel's first line.
        return re.search(pattern + r"$", self.console, re.M)

    def failures(self) -> list[str]:
        return re.findall(r"FAIL (.*)$", self.console, re.M)


@pytest.fixture(scope="module")
def initrd(tmp_path_factory):
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(os.urandom(INITRD_SIZE))
    return path


@pytest.fixture(scope="module", params=sorted(KERNELS))
def kernel(request):
    reason = kvm_usable()
    if reason:
        pytest.skip(reason)
    return request.param, KERNELS[request.param][0]()


@pytest.fixture(scope="module")
def pyhyve_boot(kernel, initrd, tmp_path_factory) -> Boot:
    kind, image = kernel
    console = tmp_path_factory.mktemp("pyhyve") / "com1.txt"
    proc = run_pyhyve(["-m", f"{MEMORY_MIB}M", "-c", str(CPUS), "-l", f"com1,file={console}",
                       "-f", f'kexec,{image},{initrd},"{CMDLINE}"', f"kexec-{kind}"],
                      timeout=BOOT_TIMEOUT)
    return Boot(kind, proc.returncode, console.read_text(errors="replace"), proc.stderr)


@pytest.fixture(scope="module")
def qemu_boot(kernel, initrd, tmp_path_factory) -> Boot:
    """QEMU's -kernel on the same image, stopped once the kernel's last line appeared."""
    kind, image = kernel
    console = tmp_path_factory.mktemp("qemu") / "com1.txt"
    proc = subprocess.Popen(
        [require_program("qemu-system-x86_64", "qemu-system-x86"), "-machine", "q35",
         "-enable-kvm", "-m", str(MEMORY_MIB), "-smp", str(CPUS), "-nographic", "-nodefaults",
         "-serial", f"file:{console}", "-monitor", "none", "-kernel", str(image),
         "-initrd", str(initrd), "-append", CMDLINE],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    status = None
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            try:
                status = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            text = console.read_text(errors="replace") if console.exists() else ""
            if re.search(r"^(poweroff|halt)$", text, re.M):
                try:            # the kernel wrote its power-off: give QEMU a moment
                    status = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                break
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    return Boot(kind, status, console.read_text(errors="replace") if console.exists() else "",
                stderr)


# --- what both hypervisors must hand over --------------------------------------

def check_protocol(boot: Boot) -> None:
    assert boot.fact(re.escape(KERNELS[boot.kind][1])), boot.console


def check_cmdline(boot: Boot) -> None:
    line = boot.fact(r"cmdline: (.*)")
    assert line, boot.console
    assert line.group(1) == CMDLINE


def check_memory_map(boot: Boot) -> None:
    found = boot.fact(r"(e820|memmap): (\d+) entries, (\d+) ram")
    assert found, boot.console                  # printed only if sorted and non-overlapping
    ram = int(found.group(3))
    # pyhyve keeps 0xA0000-0xFFFFF out of RAM; QEMU's BIOS a little more.
    assert (MEMORY_MIB - 1) * MiB <= ram <= MEMORY_MIB * MiB


def check_initrd(boot: Boot, initrd) -> None:
    found = boot.fact(r"initrd: (\d+) bytes fnv1a=([0-9a-f]+)")
    assert found, boot.console
    assert int(found.group(1)) == INITRD_SIZE
    assert int(found.group(2), 16) == fnv1a(initrd.read_bytes())


def check_acpi(boot: Boot) -> re.Match:
    assert boot.fact(r"acpi ok (\d+) tables"), boot.console
    assert boot.fact(rf"madt cpus={CPUS}"), boot.console
    mcfg = boot.fact(r"mcfg (base=0x[0-9a-f]+|none)")
    assert mcfg, boot.console
    assert boot.fact("poweroff"), boot.console
    assert boot.failures() == []
    return mcfg


# --- pyhyve ----------------------------------------------------------------------

@pytest.mark.e2e
def test_pyhyve_boot_protocol(pyhyve_boot):
    check_protocol(pyhyve_boot)


@pytest.mark.e2e
def test_pyhyve_cmdline_byte_for_byte(pyhyve_boot):
    check_cmdline(pyhyve_boot)


@pytest.mark.e2e
def test_pyhyve_memory_map_matches_m(pyhyve_boot):
    check_memory_map(pyhyve_boot)


@pytest.mark.e2e
def test_pyhyve_initrd_arrives_intact(pyhyve_boot, initrd):
    check_initrd(pyhyve_boot, initrd)


@pytest.mark.e2e
def test_pyhyve_no_failures_outside_acpi(pyhyve_boot):
    assert [f for f in pyhyve_boot.failures() if not f.startswith("acpi")] == []
    assert "Traceback" not in pyhyve_boot.stderr


@pytest.mark.e2e
def test_pyhyve_acpi_tables_and_power_off(pyhyve_boot):
    """Needs pyhyve's ACPI tables for direct boot: the RSDP where the kernel finds
    it (PVH: rsdp_paddr or the BIOS area; bzImage: acpi_rsdp_addr or the BIOS
    area), valid checksums, a MADT with both CPUs, the MCFG at pyhyve's ECAM, and
    a FADT whose PM1a control block powers the VM off."""
    mcfg = check_acpi(pyhyve_boot)
    assert mcfg.group(1) == "base=0xe0000000"
    assert pyhyve_boot.status == ExitStatus.POWEROFF, pyhyve_boot.stderr


# --- QEMU, the reference -------------------------------------------------------------

@pytest.mark.e2e
def test_qemu_boots_the_same_kernel(qemu_boot, initrd):
    check_protocol(qemu_boot)
    check_cmdline(qemu_boot)
    check_memory_map(qemu_boot)
    check_initrd(qemu_boot, initrd)
    mcfg = check_acpi(qemu_boot)
    print(f"QEMU q35 {qemu_boot.kind}: mcfg {mcfg.group(1)}")
    # The kernel wrote the DSDT's \_S5 value to the FADT's PM1a_CNT: QEMU powers off.
    assert qemu_boot.status == 0, qemu_boot.stderr


# --- files the loader must refuse, before any vCPU runs ----------------------------------

def refused(tmp_path, kernel, initrd=None, cmdline=CMDLINE, memory="256M") -> str:
    """pyhyve's stderr for a boot that must fail with one line and exit status 4."""
    reason = kvm_usable()
    if reason:
        pytest.skip(reason)
    console = tmp_path / "com1.txt"
    spec = f"kexec,{kernel},{initrd or ''},\"{cmdline}\""
    proc = run_pyhyve(["-m", memory, "-l", f"com1,file={console}", "-f", spec, "refused"],
                      timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == ExitStatus.ERROR, proc.stderr
    assert len(lines) == 1, proc.stderr
    # No vCPU ran: the kernel's first line would be on COM1 otherwise.
    assert not console.exists() or console.read_text() == ""
    return lines[0]


def test_refuses_a_file_neither_bzimage_nor_elf(tmp_path):
    kernel = tmp_path / "notakernel"
    kernel.write_bytes(b"#!/bin/sh\necho this is no kernel\n" * 200)
    assert "neither a bzImage nor an ELF file" in refused(tmp_path, kernel)


def test_refuses_a_bzimage_older_than_protocol_2_06(tmp_path):
    image = bytearray(build_bzimage().read_bytes())
    image[0x206:0x208] = (0x0205).to_bytes(2, "little")       # the setup header's version
    kernel = tmp_path / "old.bzImage"
    kernel.write_bytes(image)
    assert "2.05" in refused(tmp_path, kernel) and "2.06" in refused(tmp_path, kernel)


def test_refuses_an_elf_without_a_pvh_note(tmp_path):
    image = bytearray(build_pvh().read_bytes())
    note = image.index(b"Xen\0") - 4                          # the note's type field
    assert int.from_bytes(image[note:note + 4], "little") == 18
    image[note:note + 4] = (17).to_bytes(4, "little")         # some other Xen note
    kernel = tmp_path / "nopvh.elf"
    kernel.write_bytes(image)
    assert "without a PVH entry point" in refused(tmp_path, kernel)


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_refuses_an_initrd_larger_than_memory(tmp_path, kind):
    initrd = tmp_path / "huge.img"
    with open(initrd, "wb") as file:                         # sparse: costs no disk
        file.truncate(40 * MiB)
    line = refused(tmp_path, KERNELS[kind][0](), initrd, memory="32M")
    assert line.endswith("huge.img is 41943040 bytes, more than 33554432, the guest's "
                         "memory size: it cannot fit")


def test_refuses_a_command_line_longer_than_cmdline_size(tmp_path):
    image = build_bzimage()
    cmdline_size = int.from_bytes(image.read_bytes()[0x238:0x23C], "little")
    assert cmdline_size == 2047
    line = refused(tmp_path, image, cmdline="x" * (cmdline_size + 1))
    assert f"at most {cmdline_size}" in line
    # One byte less is within the limit; that it boots is the e2e tests' business.
