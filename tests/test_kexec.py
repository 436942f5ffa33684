"""Direct kernel boot (-f kexec,KERNEL,INITRD,CMDLINE) with test kernels that
stand in for Linux (tests/guests/linux/): a bzImage entered at its 64-bit
entry and a PVH ELF entered in 32-bit protected mode.  Each kernel reports on
COM1 what its boot protocol handed it (see tests/guests/linux/testkernel.c);
QEMU's -kernel on the same machine boots the same files as the reference.
A bzImage with no 64-bit entry (tests/guests/setup16.S) is entered through
its 16-bit setup code and reports on the debug port; multiboot kernels are
tested in test_multiboot.py.

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

from build import build_setup16
from conftest import kvm_usable
from firmware import require_program
from guestrun import run_pyhyve, run_qemu_debugcon
from kernels import build_bzimage, build_pvh, fnv1a
from pyhyve.vcpu import ExitStatus

MiB = 1 << 20
MEMORY_MIB = 256
CPUS = 2
CMDLINE = "console=ttyS0 pyhyve-test"
INITRD_SIZE = 50_000            # not a page multiple: the size must come through exactly
BOOT_TIMEOUT = 120

# The line each kernel prints once its boot protocol's structure checked out.
KERNELS = {"bzimage": (build_bzimage, "bootproto ok"), "pvh": (build_pvh, "pvh ok")}


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


def test_refuses_a_file_that_is_no_kernel_and_says_what_it_is(tmp_path):
    kernel = tmp_path / "notakernel"
    kernel.write_bytes(b"#!/bin/sh\necho this is no kernel\n" * 200)
    assert refused(tmp_path, kernel).endswith(f"kernel {kernel}: a script, not a kernel pyhyve "
                                              "boots (neither a bzImage, a PVH or multiboot ELF, "
                                              "nor a multiboot image)")


def test_refuses_a_zimage(tmp_path):
    image = bytearray(build_setup16().read_bytes())
    image[0x211] &= ~0x01                                     # loadflags: not LOADED_HIGH
    kernel = tmp_path / "zImage"
    kernel.write_bytes(image)
    assert refused(tmp_path, kernel).endswith(
        "a bzImage with boot protocol 2.02, a zImage (not loaded high): pyhyve loads only "
        "bzImages")


def test_refuses_a_setup_header_older_than_protocol_2_00(tmp_path):
    image = bytearray(build_setup16().read_bytes())
    image[0x206:0x208] = (0x0105).to_bytes(2, "little")       # the setup header's version
    kernel = tmp_path / "old.bzImage"
    kernel.write_bytes(image)
    assert refused(tmp_path, kernel).endswith(
        "a bzImage with boot protocol 1.05: pyhyve needs 2.00 or later")


def test_a_protocol_2_05_bzimage_has_no_64_bit_entry(tmp_path):
    """XLF_KERNEL_64 means something from protocol 2.12 on: an older kernel's
    64-bit test kernel is entered through its setup code instead (here refused
    for its command line, which 2.05 limits to 255 bytes, before any vCPU runs)."""
    image = bytearray(build_bzimage().read_bytes())
    image[0x206:0x208] = (0x0205).to_bytes(2, "little")
    kernel = tmp_path / "old.bzImage"
    kernel.write_bytes(image)
    assert refused(tmp_path, kernel, cmdline="x" * 256).endswith(
        "a bzImage with boot protocol 2.05 and no 64-bit entry: the command line is 256 "
        "bytes; this kernel takes at most 255")


def test_refuses_an_elf_without_a_pvh_note(tmp_path):
    image = bytearray(build_pvh().read_bytes())
    note = image.index(b"Xen\0") - 4                          # the note's type field
    assert int.from_bytes(image[note:note + 4], "little") == 18
    image[note:note + 4] = (17).to_bytes(4, "little")         # some other Xen note
    kernel = tmp_path / "nopvh.elf"
    kernel.write_bytes(image)
    assert refused(tmp_path, kernel).endswith(
        "an ELF32 file without a PVH note (XEN_ELFNOTE_PHYS32_ENTRY, CONFIG_PVH for Linux) "
        "or multiboot header")


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


# --- a bzImage without a 64-bit entry: its 16-bit setup code ------------------------------

SETUP16_CMDLINE = "console=ttyS0 vga=ext setup16-test"
SETUP16 = {     # protocol: (setup segment, SP = heap end, heap_end_ptr, command line)
    0x0202: (0x9000, 0xE000, 0xDE00, 0x9E000),     # cmd_line_ptr, the heap to 0xE000
    0x0201: (0x9000, 0x9800, 0x9600, 0x99800),     # 0xA33F magic: the line in the segment
}


@dataclass
class Setup16:
    text: str

    def fact(self, pattern: str) -> re.Match:
        found = re.search(rf"^{pattern}$", self.text, re.M)
        assert found, f"no line matching {pattern!r} in:\n{self.text}"
        return found

    def entry(self) -> dict[str, int]:
        line = self.fact(r"entry (.*)").group(1)
        return {key: int(value, 16) for key, value in re.findall(r"(\w+)=(\w+)", line)}

    def header(self) -> dict[str, int]:
        line = self.fact(r"header (.*)").group(1)
        return {key: int(value, 16) for key, value in re.findall(r"(\w+)=(\w+)", line)}


@pytest.fixture(scope="module", params=sorted(SETUP16))
def setup16(request):
    reason = kvm_usable()
    if reason:
        pytest.skip(reason)
    return request.param, build_setup16(request.param)


@pytest.fixture(scope="module")
def setup16_pyhyve(setup16, initrd, tmp_path_factory) -> Setup16:
    _, image = setup16
    debug = tmp_path_factory.mktemp("setup16") / "debug.txt"
    proc = run_pyhyve(["-m", f"{MEMORY_MIB}M", "-l", f"debugcon,file={debug}",
                       "-f", f'kexec,{image},{initrd},"{SETUP16_CMDLINE}"', "kexec-setup16"],
                      timeout=BOOT_TIMEOUT)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == ExitStatus.POWEROFF, proc.stderr
    return Setup16(debug.read_text(errors="replace"))


@pytest.fixture(scope="module")
def setup16_qemu(setup16, initrd, tmp_path_factory) -> Setup16:
    _, image = setup16
    text = run_qemu_debugcon(tmp_path_factory.mktemp("setup16-qemu"),
                             ["-kernel", str(image), "-initrd", str(initrd),
                              "-append", SETUP16_CMDLINE], timeout=BOOT_TIMEOUT,
                             memory_mib=MEMORY_MIB)
    return Setup16(text[text.index("entry cs="):])         # after SeaBIOS's log


def check_setup16(report: Setup16, initrd) -> None:
    """What any 16-bit boot loader must hand the setup code, wherever it puts it."""
    entry, header = report.entry(), report.header()
    segment = entry["ds"]
    assert entry["es"] == entry["fs"] == entry["gs"] == entry["ss"] == segment
    assert entry["cs"] == segment + 0x20 and entry["ip"] == 0
    assert entry["if"] == 0
    assert header["loadflags"] & 0x81 == 0x81          # LOADED_HIGH kept, CAN_USE_HEAP set
    assert entry["sp"] <= header["heap_end_ptr"] + 0x200     # the stack within the heap
    assert header["type_of_loader"] != 0
    assert header["vid_mode"] == 0xFFFE                 # vga=ext on the command line
    assert report.fact(r"cmdline: (.*)").group(1) == SETUP16_CMDLINE
    found = report.fact(r"initrd: (\w+) bytes at (\w+) fnv1a=(\w+)")
    assert int(found.group(1), 16) == INITRD_SIZE
    assert int(found.group(3), 16) == fnv1a(initrd.read_bytes())
    report.fact("kernel: signature at 0x100000 ok")


@pytest.mark.e2e
def test_pyhyve_enters_setup16_as_a_16_bit_loader(setup16_pyhyve, setup16, initrd):
    check_setup16(setup16_pyhyve, initrd)
    segment, heap_end, heap_end_ptr, cmdline = SETUP16[setup16[0]]
    entry, header = setup16_pyhyve.entry(), setup16_pyhyve.header()
    assert (entry["ds"], entry["sp"], header["heap_end_ptr"]) == (segment, heap_end,
                                                                   heap_end_ptr)
    assert header["type_of_loader"] == 0xFF
    assert int(setup16_pyhyve.fact(r"cmdline_ptr=(\w+)").group(1), 16) == cmdline


@pytest.mark.e2e
def test_qemu_enters_setup16_the_same_way(setup16_qemu, setup16, initrd):
    check_setup16(setup16_qemu, initrd)
    entry, header = setup16_qemu.entry(), setup16_qemu.header()
    # Where QEMU differs by design: its linuxboot ROM puts a 2.02+ kernel's
    # setup at 0x10000 (boot.rst allows any address then; pyhyve keeps GRUB's
    # 0x90000 for every protocol), starts SP 16 bytes below the heap's end,
    # and gives its own loader ID (0xB0) where pyhyve gives 0xFF, "undefined".
    assert entry["ds"] == (0x1000 if setup16[0] >= 0x0202 else 0x9000)
    assert header["type_of_loader"] == 0xB0
