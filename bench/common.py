"""Shared by the benchmarks: test-guest builds and result files."""

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PM1A_CNT = 0x404                # the test guests power off here (ACPI PM1a, S5)
sys.path.insert(0, str(REPO / "tests" / "guests"))
sys.path.insert(0, str(REPO))

from build import build_rom  # noqa: E402  (tests/guests is not a package)


def require_program(name: str, package: str) -> str:
    """A program from a Debian package (PATH or /usr/sbin), installed with apt-get
    where it is missing and we are root: the benchmarks' own set-up step."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin"])
    found = shutil.which(name, path=search)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", package], capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        found = shutil.which(name, path=search)
    if found is None:
        raise SystemExit(f"{name} is missing: apt-get install {package}")
    return found


def run_guest_on_pyhyve(name: str, rom: Path, memory_mib: int, debug: Path,
                        devices: dict[str, str], marker: str) -> float:
    """Seconds vm.run() takes for a test-guest ROM (VM creation and teardown
    excluded), with the debug console in `debug` and `devices` as config keys.
    The guest must print `marker` and power off: a failed run would time nothing."""
    from pyhyve.config import Config
    from pyhyve.vcpu import ExitStatus
    from pyhyve.vm import VirtualMachine
    vm = VirtualMachine(Config({"name": name, "memory.size": f"{memory_mib}M",
                                "lpc.bootrom": str(rom), "lpc.debugcon.path": str(debug),
                                **devices}))
    try:
        start = time.perf_counter()
        status = vm.run()
        elapsed = time.perf_counter() - start
    finally:
        vm.close()
    _require_marker(debug, marker, f"pyhyve exit status {status}")
    if status != ExitStatus.POWEROFF:
        raise SystemExit(f"pyhyve: the guest ended with exit status {status}, not power-off")
    return elapsed


def run_guest_on_qemu(qemu: str, rom: Path, memory_mib: int, debug: Path,
                      devices: list[str], marker: str) -> float:
    """Seconds from QEMU's start to its exit for a test-guest ROM, with the debug
    console in `debug`, the guest's power-off port as isa-debug-exit, and
    `devices` (QEMU arguments).  The guest must print `marker`."""
    command = [qemu, "-machine", "pc", "-enable-kvm", "-m", str(memory_mib), "-nodefaults",
               "-display", "none", "-bios", str(rom), *devices,
               "-device", f"isa-debug-exit,iobase={PM1A_CNT:#x},iosize=2",
               "-chardev", f"file,id=dbg,path={debug}",
               "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    _require_marker(debug, marker, f"qemu exit code {proc.returncode}: {proc.stderr.strip()}")
    return elapsed


def _require_marker(debug: Path, marker: str, context: str) -> None:
    """The guest printed `marker` on its debug console (the file is removed)."""
    text = debug.read_text(errors="replace") if debug.exists() else ""
    debug.unlink(missing_ok=True)
    if marker not in text:
        raise SystemExit(f"the guest did not print {marker!r} ({context}):\n{text}")


@contextlib.contextmanager
def fork_server(work: Path, env: dict, python: str = sys.executable):
    """A `pyhyve --serve` under PYTHON with its socket in WORK, until the block
    ends; the block gets the socket's path."""
    path = work / "serve.sock"
    proc = subprocess.Popen([python, "-m", "pyhyve", f"--serve={path}"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        if not proc.stderr.readline().startswith(b"pyhyve: serving on"):
            raise SystemExit("pyhyve --serve did not start")
        yield path
    finally:
        proc.terminate()
        proc.wait()


def venv_python(python: str, work: Path) -> str:
    """PYTHON as the README installs pyhyve with it: in a venv of its own (made
    in WORK, without pip), which leaves out the site-packages of PYTHON's own
    installation and whatever .pth files run there at each start (on the
    development machine a CA hook of its sandbox and the editable checkout:
    27 ms of the pyenv interpreter's 37).  pyhyve still comes from the
    checkout (PYTHONPATH), so the figures are this tree's."""
    venv = work / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save(name: str, figures: dict) -> Path:
    """Write one benchmark's figures as JSON, stamped with date and machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": platform.node(), "python": platform.python_version(), **figures}
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


__all__ = ["build_rom", "fork_server", "free_port", "require_program", "run_guest_on_pyhyve",
           "run_guest_on_qemu", "save", "PM1A_CNT", "REPO"]
