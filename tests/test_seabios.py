"""Debian's unmodified SeaBIOS on pyhyve, with QEMU on the same machine as the reference."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from firmware import read_until, require_file, require_program
from guestrun import REPO
from pyhyve.vcpu import ExitStatus

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("needs_kvm")]

BANNER = "SeaBIOS (version"
NO_BOOT = "No bootable device."


@pytest.fixture(scope="module")
def seabios():
    return require_file("/usr/share/seabios/bios.bin", "seabios")


def test_seabios_reaches_no_bootable_device(seabios, tmp_path):
    debug = tmp_path / "seabios.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-m", "128M", "-l", f"bootrom,{seabios}",
         "-l", "com1,stdio", "-l", "fwcfg,qemu", "-l", f"debugcon,file={debug}", "seabios-vm"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        console = read_until(proc, NO_BOOT, timeout=120)
        # bhyve's contract: SIGTERM presses the power button (SeaBIOS ignores it),
        # a second SIGTERM powers the VM off.
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)          # two signals sent at once can arrive as one
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert BANNER in console
    assert NO_BOOT in console
    assert status == ExitStatus.POWEROFF
    log = debug.read_text(errors="replace")
    for line in ("Running on QEMU (i440fx)", "Running on KVM", "Found QEMU fw_cfg",
                 "QEMU fw_cfg DMA interface supported", "Found 1 cpu(s)",
                 "sercon: using ioport 0x3f8"):
        assert line in log


def test_qemu_shows_the_same(seabios):
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    proc = subprocess.Popen(
        [qemu, "-machine", "pc", "-enable-kvm", "-m", "128", "-nodefaults", "-nographic",
         "-serial", "stdio", "-monitor", "none", "-bios", seabios],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        console = read_until(proc, NO_BOOT, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert BANNER in console
    assert NO_BOOT in console


def _seabios_log(args: list[str], tmp_path, until: str, qemu: bool = False) -> str:
    """SeaBIOS's debug log from a run that is stopped once `until` was logged."""
    log = tmp_path / ("qemu.log" if qemu else "pyhyve.log")
    if qemu:
        command = [require_program("qemu-system-x86_64", "qemu-system-x86"), "-machine", "pc",
                   "-enable-kvm", "-m", "128", "-nodefaults", "-display", "none",
                   "-bios", "/usr/share/seabios/bios.bin", "-chardev",
                   f"file,id=dbg,path={log}", "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
                   *args]
        env = None
    else:
        command = [sys.executable, "-m", "pyhyve", "-m", "128M", "-l",
                   "bootrom,/usr/share/seabios/bios.bin", "-l", f"debugcon,file={log}", *args, "vm"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(1200):
            if log.exists() and until in log.read_text(errors="replace"):
                break
            try:
                proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.kill()
        proc.wait()
    return log.read_text(errors="replace")


def _bars(log: str, bdf: str) -> dict[int, tuple[int, str]]:
    pattern = rf"PCI: map device bdf={bdf}\s+bar (\d+), addr ([0-9a-f]+), size ([0-9a-f]+) \[(\w+)\]"
    return {int(bar): (int(size, 16), kind) for bar, _, size, kind in re.findall(pattern, log)}


def test_seabios_assigns_every_bar_as_on_qemu(seabios, tmp_path):
    ours = _bars(_seabios_log(["-s", "3,pci-testdev"], tmp_path, "Found 1 cpu"), "00:03.0")
    assert ours == {0: (0x1000, "mem"), 1: (0x100, "io"), 2: (0x100000, "prefmem"),
                    4: (0x2000, "mem")}
    qemu = _bars(_seabios_log(["-device", "pci-testdev,addr=3"], tmp_path, "Found 1 cpu",
                              qemu=True), "00:03.0")
    # QEMU's pci-testdev has BAR0 (registers) and BAR1 (I/O) only; those must agree.
    assert {bar: ours[bar] for bar in qemu} == qemu


@pytest.mark.parametrize("cpus", [2, 4])
def test_seabios_finds_every_cpu(seabios, tmp_path, cpus):
    log = _seabios_log(["-c", str(cpus)], tmp_path, "Found 0 lpt")
    assert f"Found {cpus} cpu(s) max supported {cpus} cpu(s)" in log


def test_seabios_runs_an_option_rom_from_the_rom_bar(seabios, tmp_path):
    """A minimal PCI option ROM (header 55 AA, size in 512-byte blocks, init at
    offset 3 that returns far) served through `rom=PATH`: SeaBIOS finds and runs it."""
    rom = bytearray(512)
    rom[0:3] = b"\x55\xaa\x01"            # signature, 1 block
    rom[3:4] = b"\xcb"                    # init entry: retf
    rom[0x18:0x1A] = (0x40).to_bytes(2, "little")      # PCI data structure offset
    rom[0x40:0x58] = (b"PCIR" + (0x1B36).to_bytes(2, "little") + (0x0005).to_bytes(2, "little")
                      + bytes(2) + (0x18).to_bytes(2, "little") + bytes([0])
                      + bytes([0, 0, 0xFF]) + (1).to_bytes(2, "little") + bytes(2)
                      + bytes([0]) + bytes([0x80]) + bytes(2))
    rom[-1] = (-sum(rom[:-1])) & 0xFF
    path = tmp_path / "test.rom"
    path.write_bytes(bytes(rom))
    log = _seabios_log(["-s", f"3,pci-testdev,rom={path}"], tmp_path, "Space available for UMB")
    assert "Copying option rom (size 512) from" in log or "Running option rom at" in log, log
