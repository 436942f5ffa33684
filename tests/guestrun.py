"""Run pyhyve on a test guest as a user would, and collect what it printed."""

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from build import build_rom

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    status: int
    debug: str          # what the guest wrote to the debug port 0x402
    stderr: str


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_pyhyve(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pyhyve", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def start_fork_server(path: Path) -> subprocess.Popen:
    """`pyhyve --serve=PATH`, returned once it says it serves there."""
    proc = subprocess.Popen([sys.executable, "-m", "pyhyve", f"--serve={path}"],
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline() == f"pyhyve: serving on {path}\n"
    return proc


def run_rom(tmp_path: Path, guest: str, *args: str, defines: dict | None = None,
            timeout: float = 120) -> Result:
    """Boot tests/guests/GUEST.S as a bootrom; the debug port goes to a file."""
    rom = build_rom(guest, **(defines or {}))
    debug = tmp_path / f"{guest}.debug"
    proc = run_pyhyve([*args, "-l", f"bootrom,{rom}", "-l", f"debugcon,file={debug}",
                       f"test-{guest}"], timeout=timeout)
    text = debug.read_text(errors="replace") if debug.exists() else ""
    return Result(proc.returncode, text, proc.stderr)


def run_qemu_debugcon(tmp_path: Path, args: list[str], until: str = "done",
                      timeout: float = 120, memory_mib: int = 256) -> str:
    """QEMU (pc machine, KVM) with the port 0x402 debug console in a file, as
    the reference for a test kernel: stopped once the guest wrote the line
    `until` (QEMU's ACPI power-off port is not bhyve's, so the guest's power-off
    does not end it).  Returns what the guest, and SeaBIOS before it, wrote."""
    import re
    import time
    from firmware import require_program
    debug = tmp_path / "qemu.debug"
    proc = subprocess.Popen(
        [require_program("qemu-system-x86_64", "qemu-system-x86"), "-machine", "pc",
         "-enable-kvm", "-m", str(memory_mib), "-nographic", "-nodefaults", "-monitor", "none",
         "-no-reboot", "-chardev", f"file,id=dbg,path={debug}",
         "-device", "isa-debugcon,iobase=0x402,chardev=dbg", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            text = debug.read_text(errors="replace") if debug.exists() else ""
            if re.search(rf"^{re.escape(until)}$", text, re.M):
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    text = debug.read_text(errors="replace") if debug.exists() else ""
    assert re.search(rf"^{re.escape(until)}$", text, re.M), f"QEMU: {stderr}\n{text[-2000:]}"
    return text
