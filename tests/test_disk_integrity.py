"""virtio-blk under SIGKILL: what the device acknowledged is on the disk.

blkdriver.S built with NUMBERED writes 4 KiB blocks of its pattern in order,
FLUSHes after every 8 and prints "acked N" once a flush completed.  pyhyve is
killed with SIGKILL at several points; every block before the last "acked N"
line must then be intact in the disk file."""

import os
import signal
import subprocess
import sys
import time

import pytest

from build import build_rom
from guestrun import REPO
from test_blkdriver import pattern

pytestmark = pytest.mark.usefixtures("needs_kvm")

BLOCK = 4096
TOTAL_KIB = 8192            # a few seconds of writing on the emulating test hosts
DEFINES = {"NUMBERED": 1, "CHUNK_KIB": BLOCK // 1024, "TOTAL_KIB": TOTAL_KIB}


def acked_blocks(debug_text: str) -> int:
    """N from the last complete "acked N" line (hex), 0 if there is none."""
    complete = debug_text.split("\n")[:-1]
    acked = [int(line.removeprefix("acked "), 16) for line in complete
             if line.startswith("acked ")]
    return acked[-1] if acked else 0


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# seconds after the first "acked" line; 0 kills it within a group or two
@pytest.mark.parametrize("delay", [0, 0.05, 0.3, 1.0])
def test_acknowledged_blocks_survive_sigkill(tmp_path, delay):
    rom = build_rom("blkdriver", **DEFINES)
    disk, debug = tmp_path / "disk.img", tmp_path / "debug"
    with open(disk, "wb") as f:
        f.truncate(TOTAL_KIB * 1024)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-s", f"3,virtio-blk,{disk}",
         "-l", f"bootrom,{rom}", "-l", f"debugcon,file={debug}",
         "-o", f"control.socket={tmp_path / 'ctl.sock'}", "disk-integrity"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: debug.exists() and acked_blocks(debug.read_text(errors="replace")), 60)
        time.sleep(delay)
    finally:
        proc.kill()                     # SIGKILL
        _, stderr = proc.communicate(timeout=30)
    text = debug.read_text(errors="replace")
    assert proc.returncode == -signal.SIGKILL, "the guest finished before the kill: " + stderr
    assert "blk done" not in text
    acked = acked_blocks(text)
    assert acked > 0, text
    with open(disk, "rb") as f:
        data = f.read(acked * BLOCK)
    assert data == pattern(acked * BLOCK), f"acked {acked} blocks: {text[-200:]}"
