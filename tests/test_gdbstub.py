"""The GDB stub with Debian's gdb in batch mode, and the raw protocol.

Tested here: hardware breakpoints, single-step, registers, memory by virtual
and physical address, Ctrl-C, detach.  Software breakpoints (int3) cannot be
tested on these machines: the host's instruction emulator does not execute
int3, so a vCPU reaching one never exits (see ../shared/ENVIRONMENT.md).
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from build import build_rom, rom_symbols
from firmware import require_program
from guestrun import REPO, free_port, run_pyhyve
from pyhyve.vcpu import ExitStatus

pytestmark = pytest.mark.usefixtures("needs_kvm")


def _start(rom, port, tmp_path, *extra):
    debug = tmp_path / "debug.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", *extra, "-G", f"w{port}", "-l", f"bootrom,{rom}",
         "-l", f"debugcon,file={debug}", "gdbvm"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    for _ in range(100):          # connecting to probe would itself attach a debugger
        if _listening(port):
            break
        time.sleep(0.1)
    return proc, debug


def _listening(port: int) -> bool:
    with open("/proc/net/tcp") as table:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in table.readlines()[1:])


def test_gdb_breakpoint_registers_memory_step_detach(tmp_path):
    gdb = require_program("gdb", "gdb")
    symbols = rom_symbols("gdbtarget")
    port = free_port()
    proc, debug = _start(build_rom("gdbtarget"), port, tmp_path)
    commands = ["set architecture i386:x86-64", f"target remote 127.0.0.1:{port}",
                f"hbreak *{symbols['breakhere']:#x}", "continue", "info registers rip rax",
                f"x/15cb {symbols['message']:#x}", "stepi", "info registers rip rax", "detach"]
    args = [gdb, "-batch", "-nx"] + [arg for c in commands for arg in ("-ex", c)]
    output = subprocess.run(args, capture_output=True, text=True, timeout=120).stdout
    status = proc.wait(timeout=60)
    assert f"rip            {symbols['breakhere']:#x}" in output
    assert "rax            0x1122334455667788" in output
    assert "103 'g'\t100 'd'\t98 'b'" in output                 # "gdb guest done"
    assert f"rip            {symbols['after']:#x}" in output
    assert "rax            0x1122334455667789" in output
    assert "detached" in output
    assert debug.read_text() == "gdb guest done\n"
    assert status == ExitStatus.POWEROFF


class Remote:
    """A minimal RSP client, for what gdb's batch mode cannot do (Ctrl-C)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""

    def send(self, payload: str) -> str:
        data = payload.encode()
        self.sock.sendall(b"$%s#%02x" % (data, sum(data) & 0xFF))
        return self.reply()

    def reply(self) -> str:
        while True:
            start = self.buffer.find(b"$")
            end = self.buffer.find(b"#", start)
            if start >= 0 and end >= 0 and len(self.buffer) >= end + 3:
                payload = self.buffer[start + 1:end]
                self.buffer = self.buffer[end + 3:]
                self.sock.sendall(b"+")
                return payload.decode()
            self.buffer += self.sock.recv(4096)


def test_ctrl_c_stops_a_running_guest_and_physical_memory_reads(tmp_path):
    rom = build_rom("exits", COUNT=10**8)
    port = free_port()
    proc, _ = _start(rom, port, tmp_path, "-c", "2")
    try:
        remote = Remote(port)
        assert remote.send("?") == "T05thread:1;"
        assert remote.send("qfThreadInfo") == "m1,2"
        remote.sock.sendall(b"$c#63")
        time.sleep(1.0)
        remote.sock.sendall(b"\x03")
        assert remote.reply() == "T02thread:1;"
        registers = bytes.fromhex(remote.send("g"))
        rip = int.from_bytes(registers[16 * 8:17 * 8], "little")
        assert 0xFFFF0000 <= rip < 0x100000000            # real mode: linear PC in the ROM
        assert remote.send("Qqemu.PhyMemMode:1") == "OK"
        assert bytes.fromhex(remote.send(f"m{rom.stat().st_size - 16 + 0xFFFF0000:x},2")) == \
            rom.read_bytes()[-16:-14]
        assert remote.send("Hg2") == "OK"
        assert len(remote.send("g")) == len(registers) * 2
        assert remote.send("D") == "OK"
        remote.sock.close()
        proc.terminate()
        proc.terminate()
    finally:
        proc.kill()
        proc.wait()


def test_busy_gdb_port_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_pyhyve(["-G", str(port), "-l", f"bootrom,{build_rom('hello16')}", "vm"],
                          timeout=30)
    assert proc.returncode == ExitStatus.ERROR
    assert proc.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
