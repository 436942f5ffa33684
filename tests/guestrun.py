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


def run_rom(tmp_path: Path, guest: str, *args: str, defines: dict | None = None,
            timeout: float = 120) -> Result:
    """Boot tests/guests/GUEST.S as a bootrom; the debug port goes to a file."""
    rom = build_rom(guest, **(defines or {}))
    debug = tmp_path / f"{guest}.debug"
    proc = run_pyhyve([*args, "-l", f"bootrom,{rom}", "-l", f"debugcon,file={debug}",
                       f"test-{guest}"], timeout=timeout)
    text = debug.read_text(errors="replace") if debug.exists() else ""
    return Result(proc.returncode, text, proc.stderr)
