"""Debian's unmodified SeaBIOS on pyhyve, with QEMU on the same machine as the reference."""

import os
import signal
import subprocess
import sys

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
