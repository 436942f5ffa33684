"""Multiboot (v1) kernels through -f kexec,KERNEL,"MOD ARGS,MOD ARGS","CMDLINE",
with a test kernel of our own (tests/guests/multiboot/) built twice: as an
ELF32 file, and as a flat binary that only its header's address fields (the
a.out kludge, flag bit 16) say how to load.  The kernel reports on the debug
port what the loader handed it: registers at entry, the information block's
flags, memory sizes, memory map, command line, boot loader name and each
module's size, checksum, alignment and string.

QEMU's -kernel loads the same files with the same module syntax and is the
reference; where the two differ by design, the test says why.
"""

import re
from dataclasses import dataclass

import pytest

from conftest import kvm_usable
from guestrun import run_pyhyve, run_qemu_debugcon
from kernels import build_multiboot, fnv1a
from pyhyve.layout import ECAM_BASE, ECAM_SIZE, IDENTITY_MAP_ADDR, TSS_ADDR
from pyhyve.vcpu import ExitStatus

MiB = 1 << 20
MEMORY_MIB = 256
CMDLINE = "console=ttyS0 mb-test"
MODULE_TWO_SIZE = 30_000        # not a page multiple: the end must come through exactly
BOOT_TIMEOUT = 120
INFO_FLAGS = {"mem": 0, "cmdline": 2, "mods": 3, "mmap": 6, "loader_name": 9}


@dataclass
class Report:
    text: str

    def fact(self, pattern: str) -> re.Match:
        found = re.search(rf"^{pattern}$", self.text, re.M)
        assert found, f"no line matching {pattern!r} in:\n{self.text}"
        return found

    def mmap(self) -> list[tuple[int, int, int, int]]:
        return [(int(b, 16), int(n, 16), int(t), int(s)) for b, n, t, s in
                re.findall(r"^mmap ([0-9a-f]+) ([0-9a-f]+) (\d+) size=(\d+)$", self.text, re.M)]

    def modules(self) -> list[tuple[int, int, int, str]]:
        return [(int(size), int(hash_, 16), int(aligned), string) for size, hash_, aligned, string
                in re.findall(r"^mod \d+ (\d+) bytes fnv1a=([0-9a-f]+) aligned=(\d) string: (.*)$",
                              self.text, re.M)]


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    """Two modules, each with its own arguments; the second's holds a comma
    (',,' in the list), as QEMU's -initrd takes them."""
    folder = tmp_path_factory.mktemp("modules")
    one, two = folder / "one.txt", folder / "two.bin"
    one.write_bytes(b"the first module\n")
    two.write_bytes(bytes((i * 7 + i // 251) & 0xFF for i in range(MODULE_TWO_SIZE)))
    spec = f"{one} alpha beta,{two} key=a,,b"
    expected = [(one, f"{one} alpha beta"), (two, f"{two} key=a,b")]
    return spec, expected


@pytest.fixture(scope="module", params=["elf", "aout"])
def kernel(request):
    reason = kvm_usable()
    if reason:
        pytest.skip(reason)
    return build_multiboot(aout=request.param == "aout")


@pytest.fixture(scope="module")
def pyhyve_report(kernel, modules, tmp_path_factory):
    debug = tmp_path_factory.mktemp("pyhyve") / "debug.txt"
    proc = run_pyhyve(["-m", f"{MEMORY_MIB}M", "-l", f"debugcon,file={debug}",
                       "-f", f'kexec,{kernel},{modules[0]},"{CMDLINE}"', "multiboot-test"],
                      timeout=BOOT_TIMEOUT)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == ExitStatus.POWEROFF, proc.stderr
    return Report(debug.read_text(errors="replace"))


@pytest.fixture(scope="module")
def qemu_report(kernel, modules, tmp_path_factory):
    text = run_qemu_debugcon(tmp_path_factory.mktemp("qemu"),
                             ["-kernel", str(kernel), "-initrd", modules[0],
                              "-append", CMDLINE], timeout=BOOT_TIMEOUT, memory_mib=MEMORY_MIB)
    return Report(text[text.index("entry eax="):])     # after SeaBIOS's log


# --- what every multiboot loader must hand over ------------------------------------

def check_entry(report: Report) -> None:
    entry = report.fact(r"entry eax=(\w+) cr0=(\w+) eflags=(\w+) cs=(\w+) ds=(\w+) ss=(\w+)")
    eax, cr0, eflags = (int(entry.group(i), 16) for i in (1, 2, 3))
    assert eax == 0x2BADB002
    assert cr0 & 1 and not cr0 & (1 << 31)             # protected mode, no paging
    assert not eflags & (1 << 9) and not eflags & (1 << 17)    # IF and VM clear
    assert entry.group(5) == entry.group(6)            # DS = SS, both flat data


def check_flags(report: Report) -> int:
    flags = int(report.fact(r"flags=(\w+)").group(1), 16)
    missing = [name for name, bit in INFO_FLAGS.items() if not flags >> bit & 1]
    assert missing == [], f"flags {flags:#x}"
    return flags


def check_cmdline(report: Report, kernel) -> None:
    # GRUB and QEMU both start a multiboot command line with the kernel's path.
    assert report.fact(r"cmdline: (.*)").group(1) == f"{kernel} {CMDLINE}"


def check_modules(report: Report, modules) -> None:
    _, expected = modules
    assert report.fact(r"mods: (\d+)").group(1) == "2"
    found = report.modules()
    assert found == [(path.stat().st_size, fnv1a(path.read_bytes()), 1, string)
                     for path, string in expected]


def check_mmap_shape(report: Report) -> list:
    entries = report.mmap()
    assert entries, report.text
    assert {size for *_, size in entries} == {20}      # the size field, not counting itself
    assert entries == sorted(entries)
    for (base, length, _, _), (following, *_) in zip(entries, entries[1:]):
        assert base + length <= following               # no overlaps
    return entries


# --- pyhyve -------------------------------------------------------------------------

@pytest.mark.e2e
def test_pyhyve_entry_state(pyhyve_report):
    check_entry(pyhyve_report)


@pytest.mark.e2e
def test_pyhyve_information_flags(pyhyve_report):
    flags = check_flags(pyhyve_report)
    assert not flags & (1 << 1)     # no boot_device: pyhyve loaded the kernel from no BIOS disk


@pytest.mark.e2e
def test_pyhyve_memory_sizes_match_m(pyhyve_report):
    sizes = pyhyve_report.fact(r"mem_lower=(\d+) mem_upper=(\d+)")
    assert int(sizes.group(1)) == 640                           # RAM up to 0xA0000
    assert int(sizes.group(2)) == (MEMORY_MIB - 1) * 1024       # from 1 MiB to the end of RAM


@pytest.mark.e2e
def test_pyhyve_memory_map_is_the_vms_e820(pyhyve_report):
    entries = check_mmap_shape(pyhyve_report)
    ram, reserved = 1, 2
    assert [entry[:3] for entry in entries] == [
        (0, 0xA0000, ram), (0xA0000, 0x60000, reserved),
        (0x100000, MEMORY_MIB * MiB - 0x100000, ram),
        (ECAM_BASE, ECAM_SIZE, reserved),
        (IDENTITY_MAP_ADDR, TSS_ADDR + 3 * 4096 - IDENTITY_MAP_ADDR, reserved)]


@pytest.mark.e2e
def test_pyhyve_cmdline_and_boot_loader_name(pyhyve_report, kernel):
    check_cmdline(pyhyve_report, kernel)
    assert pyhyve_report.fact(r"loader: (.*)").group(1) == "pyhyve"


@pytest.mark.e2e
def test_pyhyve_modules_with_their_arguments(pyhyve_report, modules):
    check_modules(pyhyve_report, modules)


# --- QEMU, the reference ---------------------------------------------------------------

@pytest.mark.e2e
def test_qemu_hands_over_the_same(qemu_report, pyhyve_report, kernel, modules):
    check_entry(qemu_report)
    check_flags(qemu_report)
    check_cmdline(qemu_report, kernel)
    check_modules(qemu_report, modules)
    # Where they differ by design:
    # * the boot loader's name is QEMU's own;
    assert qemu_report.fact(r"loader: (.*)").group(1) == "qemu"
    # * QEMU's memory map is SeaBIOS's E820 (its option ROM asks the BIOS), in
    #   which the BIOS keeps the EBDA below 640 KiB and its own pages at the top
    #   of RAM: a little less RAM than pyhyve's, whose map is the VM's e820
    #   (the legacy hole reserved, the rest RAM).  Both describe -m.
    lower, upper = (int(v) for v in qemu_report.fact(r"mem_lower=(\d+) mem_upper=(\d+)").groups())
    assert 600 <= lower <= 640 and (MEMORY_MIB - 2) * 1024 <= upper <= (MEMORY_MIB - 1) * 1024
    ram = sum(length for _, length, kind, _ in check_mmap_shape(qemu_report) if kind == 1)
    assert (MEMORY_MIB - 1) * MiB <= ram <= MEMORY_MIB * MiB
    # * the module list is the same but for where each module lies.
    assert qemu_report.modules() == pyhyve_report.modules()


# --- files and modules pyhyve must refuse, before any vCPU runs -----------------------------

def refused(tmp_path, kernel, initrd="", memory="256M") -> str:
    """pyhyve's stderr for a boot that must fail with one line and exit status 4."""
    reason = kvm_usable()
    if reason:
        pytest.skip(reason)
    debug = tmp_path / "debug.txt"
    proc = run_pyhyve(["-m", memory, "-l", f"debugcon,file={debug}",
                       "-f", f'kexec,{kernel},{initrd},"{CMDLINE}"', "multiboot-refused"],
                      timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == ExitStatus.ERROR, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert not debug.exists() or debug.read_text() == ""    # no vCPU ran
    return lines[0]


HEADER = 24                     # the a.out test kernel's header offset, after its prefix


def aout_image() -> bytearray:
    image = bytearray(build_multiboot(aout=True).read_bytes())
    assert image[HEADER:HEADER + 4] == (0x1BADB002).to_bytes(4, "little")
    return image


def write(tmp_path, name: str, image: bytes):
    path = tmp_path / name
    path.write_bytes(image)
    return path


def set_header(image: bytearray, flags: int | None = None, shift: int = 0) -> None:
    """Change the header's flags or move its five addresses, with a good checksum."""
    if flags is not None:
        image[HEADER + 4:HEADER + 8] = flags.to_bytes(4, "little")
    for at in range(HEADER + 12, HEADER + 32, 4):
        value = int.from_bytes(image[at:at + 4], "little") + shift
        image[at:at + 4] = value.to_bytes(4, "little")
    flags = int.from_bytes(image[HEADER + 4:HEADER + 8], "little")
    image[HEADER + 8:HEADER + 12] = (-(0x1BADB002 + flags) & 0xFFFFFFFF).to_bytes(4, "little")


def test_refuses_a_bad_checksum(tmp_path):
    image = aout_image()
    image[HEADER + 8] ^= 1
    line = refused(tmp_path, write(tmp_path, "badsum.bin", image))
    assert "a file with a multiboot header at offset 0x18 whose checksum is" in line


def test_refuses_a_header_beyond_8_kib(tmp_path):
    image = bytes(8192) + aout_image()
    line = refused(tmp_path, write(tmp_path, "late.bin", image))
    assert "a multiboot header at offset 0x2018, beyond the first 8 KiB" in line


def test_refuses_aout_addresses_outside_memory(tmp_path):
    image = aout_image()
    set_header(image, shift=0x40000000)         # 1 GiB up, in a 256 MiB guest
    line = refused(tmp_path, write(tmp_path, "high.bin", image))
    assert "a multiboot kernel: it loads" in line and "at 0x40100000, outside the guest's RAM" \
        in line


def test_refuses_a_load_end_before_load_addr(tmp_path):
    image = aout_image()
    image[HEADER + 20:HEADER + 24] = (0x1000).to_bytes(4, "little")    # below load_addr
    set_header(image)
    assert "load_end_addr 0x1000 is not between" in refused(tmp_path, write(tmp_path, "e.bin",
                                                                             image))


def test_refuses_required_flags_it_cannot_honour(tmp_path):
    image = aout_image()
    set_header(image, flags=0x00010003 | 1 << 5)
    line = refused(tmp_path, write(tmp_path, "flag5.bin", image))
    assert "requires features pyhyve does not provide (flags 0x10023: bit 5)" in line


def test_accepts_the_video_mode_flag_it_need_not_honour(tmp_path, needs_kvm):
    image = aout_image()
    set_header(image, flags=0x00010003 | 1 << 2)
    debug = tmp_path / "debug.txt"
    proc = run_pyhyve(["-m", "64M", "-l", f"debugcon,file={debug}",
                       "-f", f"kexec,{write(tmp_path, 'video.bin', image)}", "multiboot-video"],
                      timeout=BOOT_TIMEOUT)
    assert proc.returncode == ExitStatus.POWEROFF, proc.stderr
    assert re.search(r"^mods: 0$", debug.read_text(), re.M)


def test_refuses_an_elf_without_a_multiboot_header_or_pvh_note(tmp_path):
    image = bytearray(build_multiboot().read_bytes())
    at = image.index((0x1BADB002).to_bytes(4, "little"))
    image[at] ^= 0xFF
    line = refused(tmp_path, write(tmp_path, "plain.elf", image))
    assert line.endswith("an ELF32 file without a PVH note (XEN_ELFNOTE_PHYS32_ENTRY, "
                         "CONFIG_PVH for Linux) or multiboot header")


def test_refuses_modules_too_large_for_memory(tmp_path):
    big = []
    for name in ("big1.img", "big2.img"):
        with open(tmp_path / name, "wb") as file:       # sparse: costs no disk
            file.truncate(20 * MiB)
        big.append(f"{tmp_path / name} arg")
    line = refused(tmp_path, build_multiboot(), ",".join(big), memory="32M")
    assert "2 modules of 41943040 bytes" in line and "use a larger -m" in line


def test_refuses_a_missing_module_and_an_empty_one(tmp_path):
    kernel = build_multiboot()
    missing = refused(tmp_path, kernel, f"{tmp_path / 'absent.img'} arg")
    assert f"cannot read multiboot module {tmp_path / 'absent.img'}: " in missing
    assert "an empty module path" in refused(tmp_path, kernel, f",{kernel}")


@pytest.mark.parametrize("spec, kernel, initrd, cmdline", [
    ('kexec,/k,/m1 a,/m2 b,,c,"x y"', "/k", "/m1 a,/m2 b,,c", "x y"),   # modules, quoted line
    ('kexec,/k,"x,y"', "/k", None, "x,y"),                          # a quoted line, no initrd
    ("kexec,/k,/i,console=ttyS0,115200 x", "/k", "/i", "console=ttyS0,115200 x"),  # unquoted
    ("kexec,/k,/i", "/k", "/i", None),
])
def test_kexec_fields_split_around_a_quoted_command_line(spec, kernel, initrd, cmdline):
    from pyhyve.cli import parse_fwcfg_file
    from pyhyve.config import Config
    config = Config()
    parse_fwcfg_file(config, spec)
    assert (config.get("kexec.kernel"), config.get("kexec.initrd"),
            config.get("kexec.cmdline")) == (kernel, initrd, cmdline)


def test_module_list_follows_qemus_syntax():
    from pyhyve.boot.multiboot import parse_modules
    assert parse_modules("/a x=1,,2 y,/b,/c ,,,/d") == [
        ("/a", "/a x=1,2 y"), ("/b", "/b"), ("/c", "/c ,"), ("/d", "/d")]
