"""The GDB stub with Debian's gdb in batch mode, and the raw protocol.

Tested here: hardware breakpoints, single-step, registers, memory by virtual
and physical address, Ctrl-C, detach, the target description (a plain
`target remote` is x86-64, with the system registers) and the monitor
commands.  Software breakpoints (int3) cannot be tested on these machines:
the host's instruction emulator does not execute int3, so a vCPU reaching
one never exits (see ../shared/ENVIRONMENT.md).
"""

import os
import socket
import subprocess
import sys
import time
from xml.etree import ElementTree

import pytest

from build import build_rom, rom_symbols
from firmware import require_program
from guestrun import REPO, free_port, run_pyhyve
from pyhyve import gdbstub
from pyhyve.vcpu import ExitStatus

needs_kvm = pytest.mark.usefixtures("needs_kvm")


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


def _gdb(port: int, *commands: str) -> str:
    """gdb in batch mode on the stub: `target remote`, then commands; stdout
    and stderr together (gdb prints some errors and monitor output on either)."""
    gdb = require_program("gdb", "gdb")
    args = [gdb, "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{port}"]
    args += [arg for command in commands for arg in ("-ex", command)]
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120).stdout


def _line(output: str, start: str) -> str:
    """The first line of output that starts with start."""
    return next(line for line in output.splitlines() if line.startswith(start))


@needs_kvm
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
        self.post(payload)
        return self.reply()

    def post(self, payload: str) -> None:
        data = payload.encode()
        self.sock.sendall(b"$%s#%02x" % (data, sum(data) & 0xFF))

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


@needs_kvm
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


@needs_kvm
def test_busy_gdb_port_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_pyhyve(["-G", str(port), "-l", f"bootrom,{build_rom('hello16')}", "vm"],
                          timeout=30)
    assert proc.returncode == ExitStatus.ERROR
    assert proc.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr


@needs_kvm
def test_plain_gdb_gets_x86_64_the_monitor_and_physical_addresses(tmp_path):
    """No `set architecture`: the target description makes it x86-64."""
    symbols = rom_symbols("gdbtarget")
    known, alias = symbols["known_phys"], symbols["alias_virt"] + symbols["known_phys"]
    port = free_port()
    proc, debug = _start(build_rom("gdbtarget"), port, tmp_path)
    output = _gdb(port, "show architecture", f"hbreak *{symbols['breakhere']:#x}", "continue",
                  "info registers rip rax", "monitor help", "monitor info registers",
                  f"x/gx {alias:#x}", "monitor phys on", f"x/gx {known:#x}", f"x/gx {alias:#x}",
                  "monitor phys off", "monitor frobnicate 3", "detach")
    status = proc.wait(timeout=60)
    assert 'The target architecture is set to "auto" (currently "i386:x86-64")' in output
    assert f"rip            {symbols['breakhere']:#x}" in output
    assert "rax            0x1122334455667788" in output
    assert all(line in output.splitlines() for line in gdbstub.MONITOR_HELP.splitlines())
    assert _line(output, "vcpu0:") == "vcpu0: long mode, 64-bit code"
    monitor_cr0 = _line(output, "cr0        0x")                  # gdb's own lines differ
    assert {"PE", "PG"} <= set(monitor_cr0.split("[")[1].split())
    assert "LMA" in _line(output, "efer       0x").split("[")[1].split()
    assert "\ncs   0x0018  base=0x0000000000000000 limit=0xffffffff" in output
    # virtual ALIAS + KNOWN is physical KNOWN; with phys on it is physical ALIAS + KNOWN (0)
    assert f"{alias:#x}:\t0x0123456789abcdef" in output
    assert f"{known:#x}:\t0x0123456789abcdef" in output
    assert f"{alias:#x}:\t0x0000000000000000" in output
    assert output.index(f"{alias:#x}:\t0x0123") < output.index(f"{alias:#x}:\t0x0000")
    assert _line(output, "unknown monitor command") == \
        "unknown monitor command 'frobnicate 3'; 'monitor help' lists them"
    assert "detached" in output
    assert debug.read_text() == "gdb guest done\n"
    assert status == ExitStatus.POWEROFF


@needs_kvm
def test_gdb_info_registers_of_a_real_mode_vcpu_at_the_reset_vector(tmp_path):
    port = free_port()
    proc, debug = _start(build_rom("gdbtarget"), port, tmp_path)
    output = _gdb(port, "info registers", "info registers cr0 efer", "monitor info registers",
                  "detach")
    status = proc.wait(timeout=60)
    assert "0x00000000fffffff0 in ?? ()" in output
    assert "rip            0xfffffff0" in output                    # CS.base + IP
    assert "cs             0xf000" in output
    assert "cr0            0x60000010          [ ET NW CD ]" in output
    assert "efer           0x0                 [ ]" in output
    assert _line(output, "vcpu0:") == "vcpu0: real mode"
    assert "\ncs   0xf000  base=0x00000000ffff0000 limit=0x0000ffff" in output
    assert debug.read_text() == "gdb guest done\n"
    assert status == ExitStatus.POWEROFF


def _register_numbers(document: str) -> dict[str, int]:
    target = ElementTree.fromstring(document)
    assert target.findtext("architecture") == "i386:x86-64"
    return {reg.get("name"): int(reg.get("regnum")) for reg in target.iter("reg")}


@needs_kvm
def test_target_description_in_pieces_and_the_register_numbers(tmp_path):
    port = free_port()
    proc, _ = _start(build_rom("gdbtarget"), port, tmp_path)
    try:
        remote = Remote(port)
        assert "qXfer:features:read+" in remote.send("qSupported:xmlRegisters=i386").split(";")
        pieces = []
        while True:                                         # 0x100 bytes at a time
            reply = remote.send(f"qXfer:features:read:target.xml:{len(''.join(pieces)):x},100")
            pieces.append(reply[1:])
            if reply[0] == "l":
                break
            assert reply[0] == "m" and len(reply) == 0x101
        document = "".join(pieces)
        assert len(pieces) > 3 and document.encode() == gdbstub.TARGET_XML
        assert remote.send(f"qXfer:features:read:target.xml:{len(document):x},100") == "l"
        assert remote.send(f"qXfer:features:read:target.xml:{len(document) + 1:x},100") == "E01"
        assert remote.send("qXfer:features:read:target.xm:0,100") == "E00"
        assert remote.send("qXfer:features:read:target.xml:zz") == "E00"
        assert remote.send("qXfer:features:read:target.xml:0,0") == "E00"
        assert remote.send("qXfer:threads:read::0,100") == ""
        numbers = _register_numbers(document)
        assert sorted(numbers.values()) == list(range(len(numbers)))
        assert [numbers[name] for name in ("rax", "rbx", "rip", "eflags", "gs", "st0",
                                           "xmm0", "mxcsr")] == [0, 1, 16, 17, 23, 24, 40, 56]

        def read(name: str) -> int:
            return int.from_bytes(bytes.fromhex(remote.send(f"p{numbers[name]:x}")), "little")
        g = bytes.fromhex(remote.send("g"))
        assert len(g) == sum(int(reg.get("bitsize")) // 8
                             for reg in ElementTree.fromstring(document).iter("reg"))
        assert read("rip") == 0xFFFFFFF0 == int.from_bytes(g[16 * 8:17 * 8], "little")
        cr0 = 8 * (numbers["cr0"] - len(numbers))       # the system registers come last
        assert read("cr0") == 0x60000010 == int.from_bytes(g[cr0:cr0 + 8], "little")
        assert read("efer") == 0 and read("fctrl") == 0x37F and read("ftag") == 0xFFFF
        assert remote.send(f"p{len(numbers):x}") == "E22"
        assert remote.send(f"P{numbers['cr0']:x}=0100000000000000") == "E01"   # refused
        assert remote.send(f"P{numbers['cs']:x}=08000000") == "E01"
        assert read("cr0") == 0x60000010
        kernel_gs = (0xFFFF888000001000).to_bytes(8, "little").hex()      # canonical
        assert remote.send(f"P{numbers['k_gs_base']:x}={kernel_gs}") == "OK"
        assert read("k_gs_base") == 0xFFFF888000001000
        assert remote.send(f"P{numbers['xmm7']:x}=" + bytes(range(16)).hex()) == "OK"
        assert read("xmm7") == int.from_bytes(bytes(range(16)), "little")
        assert remote.send(f"P{numbers['cr8']:x}=01") == "E22"          # wrong size
        # G: the refused registers may come back unchanged, but not changed
        g = bytes.fromhex(remote.send("g"))
        assert remote.send("G" + (b"\x05" + g[1:]).hex()) == "OK" and read("rax") == 5
        cs = 17 * 8 + 4                                 # after rax..r15, rip and eflags
        assert remote.send("G" + (g[:cs] + b"\x08" + g[cs + 1:]).hex()) == "E01"
        remote.post("qRcmd," + b"help".hex())                 # O packets, then OK
        lines = []
        while (reply := remote.reply()) != "OK":
            assert reply[0] == "O"
            lines.append(bytes.fromhex(reply[1:]).decode())
        assert "".join(lines) == gdbstub.MONITOR_HELP
        assert remote.send("D") == "OK"
        remote.sock.close()
    finally:
        proc.kill()
        proc.wait()


def test_target_description_pieces_are_escaped(monkeypatch):
    """Binary qXfer data escapes '#', '$', '}' and '*' (none is in target.xml)."""
    monkeypatch.setattr(gdbstub, "TARGET_XML", b"a#b$c}d*e")
    assert gdbstub.GdbStub._xfer(b"qXfer:features:read:target.xml:0,4") == b"ma}\x03b}\x04"
    assert gdbstub.GdbStub._xfer(b"qXfer:features:read:target.xml:4,100") == \
        b"lc}]d}\x0ae"


def test_target_description_lists_every_register_once():
    numbers = _register_numbers(gdbstub.TARGET_XML.decode())
    assert list(numbers) == [register.name for register in gdbstub.REGISTERS]
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "k_gs_base", "fs_base", "gs_base"):
        assert name in numbers
    target = ElementTree.fromstring(gdbstub.TARGET_XML)
    features = {feature.get("name"): [reg.get("name") for reg in feature.iter("reg")]
                for feature in target.iter("feature")}
    assert features["org.pyhyve.x86.system"] == ["k_gs_base", "cr0", "cr2", "cr3", "cr4",
                                                 "cr8", "efer"]
