"""Devices for test guests and firmware, driven by guests that use them as
kvm-unit-tests and EDK II do: isa-debug-exit (tests/guests/debugexit.S),
pc-testdev (testdev.S) and the bootrom's variable file (bootvars.S).  Where
QEMU has the same device, the same guest runs there too and must see the
same; where it does not, the test says why.

Under QEMU the guests power off through an isa-debug-exit at 0x404, the port
pyhyve's PM1a control register has (QEMU's PM is not set up without
firmware): POWEROFF writes 0x3400 there, and QEMU exits with
(0x3400 << 1 | 1) & 0xff = 1, pyhyve's "powered off"."""

import subprocess
from pathlib import Path

import pytest

from build import ROM_SIZE, build_rom
from firmware import require_program
from guestrun import Result, run_pyhyve, run_rom
from pyhyve import snapshot
from pyhyve.config import Config
from pyhyve.layout import HIGHMEM_BASE, MiB
from pyhyve.vcpu import ExitStatus
from pyhyve.vm import VirtualMachine

pytestmark = pytest.mark.usefixtures("needs_kvm")

QEMU_POWEROFF = ["-device", "isa-debug-exit,iobase=0x404,iosize=2"]
PAGE = 4096


def pyhyve(tmp_path: Path, guest: str, *args: str, defines: dict | None = None) -> Result:
    return run_rom(tmp_path, guest, "-o", f"control.socket={tmp_path / 'ctl.sock'}", *args,
                   defines=defines)


def qemu(tmp_path: Path, *args: str) -> Result:
    binary = require_program("qemu-system-x86_64", "qemu-system-x86")
    debug = tmp_path / "qemu.debug"
    proc = subprocess.run([binary, "-machine", "pc", "-enable-kvm", "-nodefaults",
                           "-display", "none", "-m", "128", *args,
                           "-chardev", f"file,id=dbg,path={debug}",
                           "-device", "isa-debugcon,iobase=0x402,chardev=dbg"],
                          capture_output=True, text=True, timeout=120)
    text = debug.read_text(errors="replace") if debug.exists() else ""
    return Result(proc.returncode, text, proc.stderr)


def values(debug: str) -> dict[str, int]:
    """The guest's "what HEX" lines."""
    return {what: int(value, 16) for what, value in
            (line.split() for line in debug.splitlines())}


def one_error_line(result, text: str) -> None:
    """`result`: a Result or a CompletedProcess."""
    assert getattr(result, "status", getattr(result, "returncode", None)) == \
        ExitStatus.ERROR, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith("pyhyve: ") and text in lines[0], \
        result.stderr


# --- isa-debug-exit -------------------------------------------------------------------------
AT_F4 = "isa-debug-exit,iobase=0xf4,iosize=4"


@pytest.mark.parametrize("defines, device, status, missed", [
    (dict(WIDTH=1, VALUE=0x21), AT_F4, 0x43, False),
    (dict(WIDTH=2, VALUE=0x1234, PORT=0xf6), AT_F4, 0x69, False),        # 0x2469: low 8 bits
    (dict(WIDTH=4, VALUE=0x12345, PORT=0xf7), AT_F4, 0x8b, False),
    (dict(WIDTH=2, VALUE=5, PORT=0x501, END_PORT=0x501), "isa-debug-exit", 0x0b, False),
    (dict(PORT=0xf8), AT_F4, 0xfd, True),      # past its ports: 0x7e at 0xf4 ends it
], ids=["byte", "word", "dword", "qemu-defaults", "outside"])
def test_debug_exit_ends_pyhyve_with_the_guests_status_as_qemu(tmp_path, defines, device,
                                                               status, missed):
    ours = pyhyve(tmp_path, "debugexit", "-l", device, defines=defines)
    assert ours.status == status, ours.stderr
    assert ("missed" in ours.debug) == missed
    rom = build_rom("debugexit", **defines)
    reference = qemu(tmp_path, "-bios", str(rom), "-device", device)
    assert (reference.status, "missed" in reference.debug) == (status, missed), reference.stderr


def test_pc_testdev_brings_bhyves_debug_exit_unless_one_is_given(tmp_path):
    """bhyve's pc-testdev has an isa-debug-exit at 0xf4 (QEMU's has none);
    an isa-debug-exit given on its own takes its place."""
    assert pyhyve(tmp_path, "debugexit", "-l", "pc-testdev").status == 0x43
    elsewhere = pyhyve(tmp_path, "debugexit", "-l", "pc-testdev", "-l", "isa-debug-exit",
                       defines=dict(END_PORT=0x501))
    assert (elsewhere.status, elsewhere.debug) == (0xfd, "missed\n"), elsewhere.stderr


@pytest.mark.parametrize("args, message", [
    (["-l", "isa-debug-exit,iobase=0x402"], "overlap"),
    (["-l", "isa-debug-exit,iobase=0x10000"], "lpc.isa-debug-exit.iobase: 65536 is outside"),
    (["-l", "isa-debug-exit,size=4"], "'size=4' is not iobase=N or iosize=N"),
    (["-l", "pc-testdev,on"], "-l pc-testdev takes no settings"),
    (["-o", "lpc.pc-testdev=maybe"], "lpc.pc-testdev: 'maybe' is not a boolean"),
])
def test_bad_test_device_settings_are_one_line(tmp_path, args, message):
    one_error_line(pyhyve(tmp_path, "hello16", *args), message)


# --- pc-testdev -------------------------------------------------------------------------------
TESTDEV_SEES = {
    "l0": 0x12345678, "b2": 0x12ab5678, "w2": 0x12ab,       # by size and place
    "window-b1": 0x56, "window-l0": 0xcdef5678,             # the byte window, same register
    "window-l2": 0xffffcdef,    # 4 bytes from 0xea: 2 of the window, 2 unclaimed ports
    "r2": 0xcdef,               # 4 bytes from 0xe2: the register's top 2, then 0 (in
                                # QEMU, the flush port's answer to a read it does not take)
    "l2": 0x33445678,           # 4 bytes from 0xe2: the 2 that fit, as QEMU splits it
    "after-flush": 0x33445678,
    "m0": 0xdeadbeef, "m1": 0xbe, "m2": 0xdead, "m10": 0x1234, "mffff": 0x5a, "m20": 0,
    "irq": 2,                   # both raises of the line reached the handler
}


def test_pc_testdev_as_the_guest_sees_it_on_qemu(tmp_path):
    ours = pyhyve(tmp_path, "testdev", "-l", "pc-testdev")
    assert ours.status == ExitStatus.POWEROFF, ours.stderr
    assert values(ours.debug) == TESTDEV_SEES
    reference = qemu(tmp_path, "-bios", str(build_rom("testdev")), "-device", "pc-testdev",
                     *QEMU_POWEROFF)
    assert reference.status == ExitStatus.POWEROFF, reference.stderr
    assert values(reference.debug) == TESTDEV_SEES


def test_pc_testdev_lines_above_15_reach_the_io_apic(tmp_path):
    """Lines 16-23 are I/O APIC pins only, as in bhyve (QEMU's ISA bus has 16
    lines: it aborts on these ports, so it is not asked)."""
    ours = pyhyve(tmp_path, "testdev", "-l", "pc-testdev", defines=dict(IRQ_LINE=17))
    assert values(ours.debug)["irq"] == 2, ours.stderr


def test_pc_testdev_state_survives_a_snapshot(tmp_path):
    config = {"name": "testdev-snap", "lpc.bootrom": str(build_rom("testdev")),
              "lpc.pc-testdev": "true"}
    vm = VirtualMachine(Config(config))
    try:
        vm.ports.lookup(0xe0).write(0, 4, 0xfeedf00d)
        vm.mmio.lookup(0xff000000).write(0x100, 2, 0xbeef)
        vm.ports.lookup(0x2007).write(7, 1, 1)              # line 7 held high
        snapshot.save(vm, str(tmp_path / "vm.snap"))
    finally:
        vm.close()
    vm = VirtualMachine(Config(config))
    try:
        snapshot.restore_into(vm, str(tmp_path / "vm.snap"))
        assert vm.ports.lookup(0xe0).read(0, 4) == 0xfeedf00d
        assert vm.mmio.lookup(0xff000000).read(0x100, 2) == 0xbeef
        assert 7 in {irq for irq, sources in vm._irq_sources.items() if "pc-testdev" in sources}
    finally:
        vm.close()


def test_pc_testdev_memory_must_not_overlap_the_bootrom(tmp_path):
    big = tmp_path / "big.rom"            # a 16 MiB bootrom starts at 0xff000000
    big.write_bytes(bytes(16 * MiB - ROM_SIZE) + build_rom("hello16").read_bytes())
    result = run_pyhyve(["-l", f"bootrom,{big}", "-l", "pc-testdev",
                         "-o", f"control.socket={tmp_path / 'ctl.sock'}", "big"])
    one_error_line(result, "pc-testdev's memory at 0xff000000+0x10000 overlaps the bootrom")


# --- the bootrom's variable file ----------------------------------------------------------------
FIRST_RUN = {"count": 0, "plain": 0, "status": 0, "now": 1, "dword": 0x44332211}


def test_variables_persist_in_the_file_across_runs(tmp_path):
    """The guest reads a count, bumps it with CFI's WRITE_BYTE and powers off;
    the next run sees it.  A plain write is a command, not data, as in bhyve."""
    rom, store = build_rom("bootvars"), tmp_path / "vars"
    store.write_bytes(bytes(PAGE))
    debug = tmp_path / "vars.debug"
    runs = [run_pyhyve(["-l", f"bootrom,{rom},{store}", "-l", f"debugcon,file={debug}",
                        "-o", f"control.socket={tmp_path / 'ctl.sock'}", "vars"])
            for _ in range(2)]
    assert runs[1].returncode == ExitStatus.POWEROFF, runs[1].stderr
    assert values(debug.read_text()) == {**FIRST_RUN, "count": 1, "now": 2}
    data = store.read_bytes()
    assert (len(data), data[0], data[1], data[4:8]) == (PAGE, 2, 0, bytes.fromhex("11223344"))


def test_variables_as_qemus_pflash_sees_them(tmp_path):
    """QEMU maps a second pflash drive where bhyve maps VARS, and speaks the
    same commands; a status read differs: bhyve answers 0, QEMU its status
    register (0x80, ready).  Either is neither the data nor the command,
    which is how EDK II tells flash from RAM and ROM."""
    rom, store = build_rom("bootvars"), tmp_path / "vars"
    store.write_bytes(bytes(PAGE))
    ours = pyhyve(tmp_path, "bootvars", "-o", f"lpc.bootvars={store}")
    assert values(ours.debug) == FIRST_RUN, ours.stderr
    store.write_bytes(bytes(PAGE))
    reference = qemu(tmp_path, "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={rom}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={store}", *QEMU_POWEROFF)
    assert reference.status == ExitStatus.POWEROFF, reference.stderr
    assert values(reference.debug) == {**FIRST_RUN, "status": 0x80}


@pytest.mark.parametrize("size, message", [
    (0, "is 0 bytes, not a non-zero multiple of the 4096-byte page size"),
    (100, "is 100 bytes, not a non-zero multiple of the 4096-byte page size"),
    (16 * MiB, "more than the 16 MiB ROM region"),
    (None, "cannot open bootrom variable file"),
])
def test_bad_variable_files_are_refused_in_one_line(tmp_path, size, message):
    store = tmp_path / "vars"
    if size is not None:
        store.write_bytes(bytes(size))
    one_error_line(pyhyve(tmp_path, "hello16", "-o", f"lpc.bootvars={store}"), message)


def test_a_variable_file_needs_a_bootrom(tmp_path):
    result = run_pyhyve(["-f", f"kexec,{tmp_path / 'kernel'}", "-o",
                         f"lpc.bootvars={tmp_path / 'vars'}",
                         "-o", f"control.socket={tmp_path / 'ctl.sock'}", "kernel"])
    one_error_line(result, "a bootrom variable file (lpc.bootvars) needs a bootrom")


def test_restore_keeps_the_store_and_its_command_and_checks_its_size(tmp_path):
    """A snapshot holds the store's command state, not the file (the
    operator's, like a disk).  Saved while a status read was due, the restored
    guest's first read is that status read: 0, though the file holds 5."""
    rom, store, snap = build_rom("bootvars"), tmp_path / "vars", tmp_path / "vm.snap"
    store.write_bytes(bytes([5]) + bytes(PAGE - 1))
    debug = tmp_path / "restored.debug"
    vm = VirtualMachine(Config({"name": "vars-snap", "lpc.bootrom": str(rom),
                                "lpc.bootvars": str(store), "lpc.debugcon.path": str(debug)}))
    try:
        vm.mmio.lookup(HIGHMEM_BASE - ROM_SIZE - PAGE).write(0, 1, 0x70)   # READ_STATUS
        snapshot.save(vm, str(snap))
    finally:
        vm.close()

    def restore(*bootrom: str):
        return run_pyhyve(["-r", str(snap), "-l", ",".join(["bootrom", str(rom), *bootrom]),
                           "-l", f"debugcon,file={debug}",
                           "-o", f"control.socket={tmp_path / 'ctl.sock'}", "vars-snap"])

    restored = restore(str(store))
    assert restored.returncode == ExitStatus.POWEROFF, restored.stderr
    assert values(debug.read_text())["count"] == 0
    assert store.read_bytes()[0] == 1                        # bumped from what it read
    one_error_line(restore(), "not in the VM: bootvars")
    store.write_bytes(bytes(2 * PAGE))
    one_error_line(restore(str(store)), "the variable file was 4096 bytes, it is 8192 now")
