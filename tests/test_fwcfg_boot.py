"""A kernel handed to SeaBIOS (`-l bootrom` with `-f kexec`), which boots it
through QEMU's option ROMs read from fw_cfg, as QEMU's -kernel does
(pyhyve/boot/firmwarekernel.py):
  * linuxboot_dma.bin: the 16-bit-entry test kernel (tests/guests/setup16.S,
    protocols 2.02 and 2.01) reports what it was handed on the debug port,
    compared field by field with QEMU's -kernel on the same file and BIOS;
    the Linux-protocol test kernel (tests/guests/linux/) goes through its
    own setup code to long mode and passes the direct-entry tests' checks;
  * multiboot_dma.bin: the multiboot test kernel (tests/guests/multiboot/),
    with two modules, compared with QEMU;
  * Debian's ipxe.lkrn and syslinux's memdisk, kernels that call the BIOS:
    they get exactly as far under pyhyve as under QEMU on this machine (the
    same console output, then the same missing instruction; see
    ENVIRONMENT.md).
"""

import os
import re
import struct
import subprocess
import time

import pytest

import test_multiboot as mb
from build import build_setup16
from conftest import kvm_usable
from firmware import require_file, require_program
from guestrun import run_pyhyve, run_qemu_debugcon
from kernels import build_bzimage, build_multiboot, build_pvh
from pyhyve.vcpu import ExitStatus
from test_kexec import (CMDLINE, CPUS, INITRD_SIZE, SETUP16_CMDLINE, Boot, Setup16, check_acpi,
                        check_cmdline, check_initrd, check_memory_map, check_protocol,
                        check_setup16)

MEMORY_MIB = 256
BOOT_TIMEOUT = 180
STUCK_TIMEOUT = 600           # iPXE decompresses itself for minutes under emulation
# The BIOS QEMU 7.2's pc machine loads by default; pyhyve is given the same file.
BIOS = "/usr/share/seabios/bios-256k.bin"


@pytest.fixture(scope="module")
def bios():
    reason = kvm_usable()
    if reason:
        pytest.skip(reason)
    require_file("/usr/share/qemu/linuxboot_dma.bin", "qemu-system-data")
    return require_file(BIOS, "seabios")


@pytest.fixture(scope="module")
def initrd(tmp_path_factory):
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(os.urandom(INITRD_SIZE))
    return path


def pyhyve_through_bios(bios, name: str, folder, kernel, initrd="", cmdline="",
                        timeout=BOOT_TIMEOUT, extra=()) -> tuple[subprocess.CompletedProcess,
                                                                  str, str]:
    """pyhyve with SeaBIOS and a kernel; (the process, COM1's text, the debug port's text)."""
    console, debug = folder / "com1.txt", folder / "debug.txt"
    proc = run_pyhyve(["-m", f"{MEMORY_MIB}M", "-l", f"bootrom,{bios}",
                       "-l", f"com1,file={console}", "-l", f"debugcon,file={debug}", *extra,
                       "-f", f'kexec,{kernel},{initrd},"{cmdline}"', name], timeout=timeout)
    assert "Traceback" not in proc.stderr
    return (proc, console.read_text(errors="replace") if console.exists() else "",
            debug.read_text(errors="replace") if debug.exists() else "")


# --- the items as the guest reads them (no KVM needed) ------------------------------------

class Items:
    """fw_cfg filled for a kernel as pyhyve fills it, read through its ports
    as firmware reads it: numbers (32-bit items), data items (the length
    from their size item) and files."""
    SIZE_OF = {0x11: 0x08, 0x12: 0x0B, 0x15: 0x14, 0x18: 0x17}     # *_DATA: *_SIZE

    def __init__(self, kernel, initrd: str = "", cmdline: str = ""):
        from fakevm import FakeVm
        from pyhyve.boot.firmwarekernel import hand_to_firmware
        from pyhyve.config import Config
        from pyhyve.devices.fwcfg import FwCfg
        require_file("/usr/share/qemu/linuxboot_dma.bin", "qemu-system-data")
        size = MEMORY_MIB << 20
        self.vm = FakeVm(size)
        config = Config({"kexec.kernel": str(kernel), "kexec.initrd": initrd,
                         "kexec.cmdline": cmdline})
        hand_to_firmware(FwCfg(self.vm.context), self.vm.memory, config,
                         [(0, 0xA0000, 1), (0xA0000, 0x60000, 2),
                          (0x100000, size - 0x100000, 1)])

    def read(self, key: int, count: int) -> bytes:
        self.vm.port_write(0x510, 2, key)
        return bytes(self.vm.port_read(0x511, 1) for _ in range(count))

    def number(self, key: int) -> int:
        return int.from_bytes(self.read(key, 4), "little")

    def data(self, key: int) -> bytes:
        return self.read(key, self.number(self.SIZE_OF[key]))

    def files(self) -> dict[str, bytes]:
        directory = self.read(0x19, 4 + 64 * int.from_bytes(self.read(0x19, 4), "big"))
        entries = [struct.unpack_from(">IHH56s", directory, 4 + 64 * i)
                   for i in range((len(directory) - 4) // 64)]
        return {name.rstrip(b"\0").decode(): self.read(key, size)
                for size, key, _, name in entries}


@pytest.mark.parametrize("protocol, setup_addr, cmdline_addr", [
    (0x0202, 0x10000, 0x20000),         # cmd_line_ptr: QEMU's addresses for 2.02+
    (0x0201, 0x90000, 0x99FE0),         # the line in the setup segment, below 0x9A000
])
def test_linux_items_are_where_qemus_loader_puts_them(tmp_path, protocol, setup_addr,
                                                        cmdline_addr):
    kernel = build_setup16(protocol)
    image = kernel.read_bytes()
    (tmp_path / "initrd").write_bytes(b"\x5a" * 5000)
    cmdline = "console=ttyS0 vga=ext test"          # 26 bytes: 32 below 0x9A000
    items = Items(kernel, str(tmp_path / "initrd"), cmdline)
    setup_size = (image[0x1F1] + 1) * 512
    assert (items.number(0x16), items.number(0x17)) == (setup_addr, setup_size)
    setup = items.data(0x18)
    assert (items.number(0x07), items.data(0x11)) == (0x100000, image[setup_size:])
    assert (items.number(0x13), items.data(0x15)) == (cmdline_addr, cmdline.encode() + b"\0")
    assert items.data(0x12) == b"\x5a" * 5000
    initrd_at = items.number(0x0A)
    assert struct.unpack_from("<II", setup, 0x218) == (initrd_at, 5000)
    assert initrd_at % 4096 == 0 and initrd_at + 5000 <= (MEMORY_MIB << 20) - 256 * 1024
    assert struct.unpack_from("<H", setup, 0x224)[0] == cmdline_addr - setup_addr - 0x200
    assert setup[0x211] & 0x80 and setup[0x210] == 0xFF
    assert struct.unpack_from("<H", setup, 0x1FA)[0] == 0xFFFE           # vga=ext
    if protocol >= 0x0202:
        assert struct.unpack_from("<I", setup, 0x228)[0] == cmdline_addr
    else:
        assert struct.unpack_from("<HH", setup, 0x20) == (0xA33F, cmdline_addr - setup_addr)
    files = items.files()
    with open("/usr/share/qemu/linuxboot_dma.bin", "rb") as rom:
        assert files["genroms/linuxboot_dma.bin"] == rom.read()
    assert files["bootorder"] == b"/rom@genroms/linuxboot_dma.bin\0"


def test_multiboot_items_are_what_qemus_rom_reads(tmp_path):
    module = tmp_path / "module.bin"
    module.write_bytes(os.urandom(10_000))
    items = Items(build_multiboot(aout=True), f"{module} arg", "x=1")
    assert items.number(0x07) == 0x100000 and items.number(0x10) > 0x100000  # load, entry
    blob = items.data(0x11)
    assert items.number(0x0A) == 0x9500                # the information, below 1 MiB
    info = items.data(0x12)
    flags, _, _, _, cmdline_at, mods_count, mods_at = struct.unpack_from("<7I", info)
    assert flags == 0x24D and mods_count == 1
    assert struct.unpack_from("<II", info, 44) == (0, 0x9000)    # the ROM writes the map
    start, end, string_at, _ = struct.unpack_from("<4I", blob, mods_at - 0x100000)
    assert start % 4096 == 0 and blob[start - 0x100000:end - 0x100000] == module.read_bytes()
    string = blob[string_at - 0x100000:].split(b"\0")[0]
    assert string == f"{module} arg".encode()
    assert blob[cmdline_at - 0x100000:].split(b"\0")[0].endswith(b" x=1")
    assert items.files()["bootorder"] == b"/rom@genroms/multiboot_dma.bin\0"


# --- linuxboot_dma.bin: the 16-bit-entry test kernel --------------------------------------

@pytest.fixture(scope="module", params=[0x0202, 0x0201])
def setup16(request, bios):
    return request.param, build_setup16(request.param)


@pytest.fixture(scope="module")
def setup16_pyhyve(setup16, bios, initrd, tmp_path_factory) -> Setup16:
    proc, _, debug = pyhyve_through_bios(bios, "fwcfgboot-setup16",
                                         tmp_path_factory.mktemp("setup16"), setup16[1],
                                         initrd, SETUP16_CMDLINE)
    assert proc.returncode == ExitStatus.POWEROFF, proc.stderr
    assert "Searching bootorder for: /rom@genroms/linuxboot_dma.bin" in debug
    return Setup16(debug[debug.index("entry cs="):])        # after SeaBIOS's log


@pytest.fixture(scope="module")
def setup16_qemu(setup16, initrd, tmp_path_factory) -> Setup16:
    text = run_qemu_debugcon(tmp_path_factory.mktemp("setup16-qemu"),
                             ["-bios", BIOS, "-kernel", str(setup16[1]), "-initrd", str(initrd),
                              "-append", SETUP16_CMDLINE], timeout=BOOT_TIMEOUT,
                             memory_mib=MEMORY_MIB)
    return Setup16(text[text.index("entry cs="):])


@pytest.mark.e2e
def test_setup16_through_linuxboot_rom(setup16_pyhyve, initrd):
    check_setup16(setup16_pyhyve, initrd)
    assert setup16_pyhyve.header()["type_of_loader"] == 0xFF     # pyhyve's: "undefined"


@pytest.mark.e2e
def test_setup16_is_laid_out_as_qemu_lays_it_out(setup16_pyhyve, setup16_qemu, setup16, initrd):
    """Setup segment, stack, heap and command line address by protocol (2.02+:
    0x10000 and 0x20000; before: 0x90000, the line below 0x9A000) are QEMU's.
    Where they differ by design: the loader ID (QEMU's own is 0xB0), and the
    initrd's address, which the ROM puts below the top of RAM the BIOS
    reports, where QEMU keeps 128 KiB more for its ACPI tables."""
    check_setup16(setup16_qemu, initrd)
    assert setup16_pyhyve.entry() == setup16_qemu.entry()
    ours, qemus = setup16_pyhyve.header(), setup16_qemu.header()
    assert {**ours, "type_of_loader": 0xB0} == qemus
    expected_segment = 0x1000 if setup16[0] >= 0x0202 else 0x9000
    assert setup16_pyhyve.entry()["ds"] == expected_segment
    assert setup16_pyhyve.fact(r"cmdline_ptr=(\w+)").group(1) == \
        setup16_qemu.fact(r"cmdline_ptr=(\w+)").group(1)
    initrd_at = [int(r.fact(r"initrd: \w+ bytes at (\w+) .*").group(1), 16)
                 for r in (setup16_pyhyve, setup16_qemu)]
    assert all(at % 4096 == 0 for at in initrd_at)
    assert 0 <= initrd_at[0] - initrd_at[1] <= 256 * 1024


# --- linuxboot_dma.bin: the Linux-protocol test kernel ---------------------------------

@pytest.fixture(scope="module")
def bzimage_boot(bios, initrd, tmp_path_factory) -> Boot:
    proc, console, _ = pyhyve_through_bios(bios, "fwcfgboot-bzimage",
                                           tmp_path_factory.mktemp("bzimage"), build_bzimage(),
                                           initrd, CMDLINE, extra=("-c", str(CPUS)))
    return Boot("bzimage", proc.returncode, console, proc.stderr)


@pytest.mark.e2e
def test_bzimage_through_linuxboot_rom(bzimage_boot, initrd):
    """The direct-entry tests' checks; the ACPI tables are those SeaBIOS
    installed from fw_cfg, and their power-off ends the VM."""
    assert "Booting from ROM" in bzimage_boot.console
    check_protocol(bzimage_boot)
    check_cmdline(bzimage_boot)
    check_memory_map(bzimage_boot)
    check_initrd(bzimage_boot, initrd)
    check_acpi(bzimage_boot)
    assert bzimage_boot.status == ExitStatus.POWEROFF, bzimage_boot.stderr


# --- multiboot_dma.bin ------------------------------------------------------------------

@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modules")
    one, two = folder / "one.txt", folder / "two.bin"
    one.write_bytes(b"the first module\n")
    two.write_bytes(os.urandom(mb.MODULE_TWO_SIZE))
    return f"{one} alpha,{two} key=a,,b", [(one, f"{one} alpha"), (two, f"{two} key=a,b")]


@pytest.fixture(scope="module")
def multiboot_pyhyve(bios, modules, tmp_path_factory):
    kernel = build_multiboot()
    proc, _, debug = pyhyve_through_bios(bios, "fwcfgboot-multiboot",
                                         tmp_path_factory.mktemp("mb"), kernel, modules[0],
                                         mb.CMDLINE)
    assert proc.returncode == ExitStatus.POWEROFF, proc.stderr
    assert "Searching bootorder for: /rom@genroms/multiboot_dma.bin" in debug
    return mb.Report(debug[debug.index("entry eax="):])


@pytest.fixture(scope="module")
def multiboot_qemu(bios, modules, tmp_path_factory):
    text = run_qemu_debugcon(tmp_path_factory.mktemp("mb-qemu"),
                             ["-bios", BIOS, "-kernel", str(build_multiboot()), "-initrd",
                              modules[0], "-append", mb.CMDLINE], timeout=BOOT_TIMEOUT,
                             memory_mib=MEMORY_MIB)
    return mb.Report(text[text.index("entry eax="):])


@pytest.mark.e2e
def test_multiboot_through_multiboot_rom(multiboot_pyhyve, multiboot_qemu, modules):
    """What every multiboot loader hands over, with the memory sizes and map
    the ROM got from the BIOS: the same as under QEMU, whose map differs only
    in the BIOS's reservations (QEMU keeps its ACPI tables at the top of RAM,
    pyhyve has an ECAM window)."""
    kernel = build_multiboot()
    for report in (multiboot_pyhyve, multiboot_qemu):
        mb.check_entry(report)
        mb.check_flags(report)
        mb.check_cmdline(report, kernel)
        mb.check_modules(report, modules)
        mb.check_mmap_shape(report)
    assert multiboot_pyhyve.fact(r"loader: (.*)").group(1) == "pyhyve"
    assert multiboot_pyhyve.modules() == multiboot_qemu.modules()
    sizes = [tuple(int(v) for v in r.fact(r"mem_lower=(\d+) mem_upper=(\d+)").groups())
             for r in (multiboot_pyhyve, multiboot_qemu)]
    assert sizes[0][0] == sizes[1][0] == 639             # below SeaBIOS's 1 KiB EBDA
    # mem_upper: RAM from 1 MiB to the BIOS's reserved top of RAM
    ram_top = [next(base + length for base, length, kind, _ in r.mmap()
                    if kind == 1 and base == 0x100000)
               for r in (multiboot_pyhyve, multiboot_qemu)]
    assert [upper for _, upper in sizes] == [(top - 0x100000) // 1024 for top in ram_top]


# --- kernels that call the BIOS ------------------------------------------------------------

def start_qemu(folder, kernel: str) -> subprocess.Popen:
    """QEMU -kernel with the same BIOS, offering SeaBIOS COM1 as pyhyve does;
    its serial console and stderr go to files in `folder`."""
    sercon = folder / "sercon-port"
    sercon.write_bytes((0x3F8).to_bytes(2, "little"))
    with open(folder / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            [require_program("qemu-system-x86_64", "qemu-system-x86"), "-machine", "pc",
             "-enable-kvm", "-m", str(MEMORY_MIB), "-nographic", "-nodefaults",
             "-monitor", "none", "-serial", f"file:{folder / 'com1.txt'}", "-bios", BIOS,
             "-fw_cfg", f"name=etc/sercon-port,file={sercon}", "-kernel", kernel],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)


def qemu_when_stuck(proc: subprocess.Popen, folder) -> tuple[str, str]:
    """(console, stderr) once KVM reported an emulation failure (QEMU then
    pauses for ever), or once the time is up."""
    errors = folder / "stderr.txt"
    try:
        deadline = time.monotonic() + STUCK_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if "emulation failure" in errors.read_text():
                break
            time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    console = folder / "com1.txt"
    return console.read_text(errors="replace") if console.exists() else "", errors.read_text()


BIOS_KERNELS = {    # name: (path, Debian package, the last console line both reach at least)
    "ipxe": ("/boot/ipxe.lkrn", "ipxe", "iPXE initialising devices..."),
    "memdisk": ("/usr/lib/syslinux/memdisk", "syslinux-common", "Booting from ROM..."),
}
IRET = 0xCF


@pytest.fixture(scope="module", params=sorted(BIOS_KERNELS))
def bios_kernel(request, bios):
    path, package, milestone = BIOS_KERNELS[request.param]
    return request.param, require_file(path, package), milestone


@pytest.mark.e2e
def test_bios_calling_kernel_gets_as_far_as_under_qemu(bios_kernel, bios, tmp_path):
    """Both print the same on the console, then stop on the instruction the
    emulator lacks: a 32-bit iret (KVM's report gives its bytes after their
    count).  memdisk meets it in its BIOS-call thunk, before its first
    message; iPXE after it decompressed itself (minutes here), when it first
    returns from an interrupt in protected mode: that depends on when the
    timer fires, so it stops during device initialisation or after its
    banner, under QEMU as under pyhyve, and the shorter console must be the
    start of the longer.  QEMU runs beside pyhyve, on the other core."""
    name, kernel, milestone = bios_kernel
    (tmp_path / "qemu").mkdir()
    qemu = start_qemu(tmp_path / "qemu", kernel)
    try:
        proc, console, _ = pyhyve_through_bios(bios, f"fwcfgboot-{name}", tmp_path, kernel,
                                               timeout=STUCK_TIMEOUT)
    finally:
        qemu_console, qemu_errors = qemu_when_stuck(qemu, tmp_path / "qemu")
    assert "emulation failure" in qemu_errors, qemu_errors
    assert proc.returncode == ExitStatus.ERROR, proc.stderr
    shorter, longer = sorted((console.rstrip(), qemu_console.rstrip()), key=len)
    assert longer.startswith(shorter), (console, qemu_console)
    assert milestone in shorter, (console, qemu_console)
    ours = re.search(r"internal_error \(suberror 1, data 0x1 (0x\w+)", proc.stderr)
    qemus = re.search(r"extra data\[1\]: (0x\w+)", qemu_errors)
    assert ours and qemus, (proc.stderr, qemu_errors)
    for report in (ours, qemus):
        assert int(report.group(1), 16) >> 8 & 0xFF == IRET
    assert re.search(r"cs: sel=\S+ base=\S+ limit=\S+ type=\d+ dpl=0 l=0 db=1", proc.stderr)
    assert re.search(r"CS =.* CS32", qemu_errors)


# --- what pyhyve refuses, with one line --------------------------------------------------------

def refused(tmp_path, kernel, *extra: str) -> str:
    reason = kvm_usable()
    if reason:
        pytest.skip(reason)
    proc = run_pyhyve(["-m", "64M", "-l", f"bootrom,{BIOS}", *extra, "-f", f"kexec,{kernel}",
                       "fwcfgboot-refused"], timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == ExitStatus.ERROR, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_missing_option_rom_is_one_line(tmp_path):
    line = refused(tmp_path, build_bzimage(), "-o", f"kexec.romdir={tmp_path}")
    assert line.endswith(f"cannot read option ROM {tmp_path}/linuxboot_dma.bin: No such file "
                         "or directory; set kexec.romdir to the directory of QEMU's "
                         "linuxboot_dma.bin (Debian: qemu-system-data)")


def test_a_file_that_is_no_option_rom_is_one_line(tmp_path):
    (tmp_path / "multiboot_dma.bin").write_bytes(b"\0" * 1024)
    line = refused(tmp_path, build_multiboot(), "-o", f"kexec.romdir={tmp_path}")
    assert "multiboot_dma.bin does not start with an option ROM signature (55 AA)" in line


def test_a_pvh_kernel_with_a_bootrom_is_refused(tmp_path):
    line = refused(tmp_path, build_pvh())
    assert line.endswith("with a bootrom pyhyve hands over only bzImages and multiboot kernels "
                         "(QEMU's pvh.bin is not supported); boot it without -l bootrom")
