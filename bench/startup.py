"""Start-up: from process start to the guest's first instruction, and the
memory pyhyve itself uses, pyhyve vs QEMU on the same guest in one run.

The guest is tests/guests/exits.S built with EXIT_PORT=0x402: its first
instruction after the reset vector's jump writes the debug port, so "first
instruction" is when the debug console file stops being empty.  Both sides
are polled the same way.  pyhyve queues the debug port's byte writes in KVM's
coalesced ring (pyhyve/coalesced.py), so its first byte shows only once the
guest's loop has filled the ring and the vCPU exits (about 0.3 ms here): that
delay counts against pyhyve.  pyhyve starts as its installed `pyhyve` command
does: the console script imports pyhyve.cli and calls command.  Memory: the resident set of the process while the
guest runs with 256 MiB, minus the resident part of the guest's RAM mapping
(almost nothing: the guest runs from ROM), so the figure is the VMM's own
footprint.  pyhyve runs as the README installs it: under a venv of the
interpreter (--python), so the .pth files of that interpreter's own
installation do not run at its start (pyhyve itself comes from this checkout).
Also timed: the interpreter starting and exiting with nothing to do (`python
-c pass`), the part of pyhyve's figure that is Python's own, in the venv and
as installed (where its site module runs every .pth file there).
The warm path is timed too: a `pyhyve --serve` fork server (started once,
under the same interpreter) forks the VM's process on request, timed from
the request (pyhyve.forkserver.start) to the first instruction.
Goals (issues 9, 22): start-up faster than QEMU; pyhyve's own memory under 40 MiB.
"""

import argparse
import compileall
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, build_rom, fork_server, save, venv_python

from pyhyve import forkserver

POLL = 0.0005
GUEST_BYTES = 256 << 20
# What the `pyhyve` script pip installs runs (pyproject.toml: pyhyve.cli:command),
# its import of re included.
CONSOLE_SCRIPT = ("import re; import sys; from pyhyve.cli import command; "
                  "sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0]); "
                  "sys.exit(command())")


def _vmm_rss(pid: int) -> int:
    """Resident bytes of the process minus those of its guest RAM: the anonymous
    mapping exactly GUEST_BYTES long (pyhyve's low memory, QEMU's pc.ram)."""
    total = guest = 0
    size, anonymous = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:          # a mapping's header
                start, end = (int(part, 16) for part in fields[0].split("-"))
                size, anonymous = end - start, len(fields) == 5
            elif fields[0] == "Rss:":
                resident = int(fields[1]) * 1024
                total += resident
                if size == GUEST_BYTES and anonymous:
                    guest += resident
    return total - guest


def _first_byte_and_rss(command: list[str], debug: Path, env=None) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        while not (debug.exists() and debug.stat().st_size):
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited early ({proc.returncode})")
            time.sleep(POLL)
        first = time.perf_counter() - start
        time.sleep(1.0)             # settled: devices up, guest looping
        return first, _vmm_rss(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def _served_first_byte(server: Path, argv: list[str], debug: Path) -> float:
    """Request to first instruction of a VM the fork server forks; the VM is
    then sent SIGKILL."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        start = time.perf_counter()
        vm = forkserver.start(str(server), argv, stdin=null, stdout=null, stderr=null)
        try:
            while not (debug.exists() and debug.stat().st_size):
                time.sleep(POLL)
            return time.perf_counter() - start
        finally:
            os.kill(vm.pid, signal.SIGKILL)
            vm.wait()
    finally:
        os.close(null)


def _interpreter_seconds(python: str, repeat: int) -> float:
    """The best time of `python -c pass`: the interpreter's own start and exit."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([python, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs pyhyve (default: this one), e.g. "
                             "/usr/bin/python3, which the README installs pyhyve with")
    args = parser.parse_args()
    # Bytecode as an installed package has it (even where PYTHONDONTWRITEBYTECODE is set).
    compileall.compile_dir(str(REPO / "pyhyve"), quiet=1)
    rom = build_rom("exits", COUNT=10**9, EXIT_PORT=0x402)
    qemu = shutil.which("qemu-system-x86_64")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results = {"pyhyve": [], "qemu": []}
    warm = []
    with tempfile.TemporaryDirectory() as work:
        python = venv_python(args.python, Path(work))
        figures = {"pyhyve_python": args.python,
                   "interpreter_alone_s": _interpreter_seconds(python, 3 * args.repeat),
                   "interpreter_installed_alone_s": _interpreter_seconds(args.python,
                                                                         3 * args.repeat)}
        with fork_server(Path(work), env, python) as server:
            for run in range(args.repeat):
                debug = Path(work) / f"w{run}"
                warm.append(_served_first_byte(server, [
                    "-m", "256M", "-o", f"control.socket={work}/w{run}.sock",
                    "-l", f"bootrom,{rom}", "-l", f"debugcon,file={debug}", f"warm{run}"], debug))
        for run in range(args.repeat):
            debug = Path(work) / f"p{run}"
            results["pyhyve"].append(_first_byte_and_rss(
                [python, "-c", CONSOLE_SCRIPT, "-m", "256M", "-o",
                 f"control.socket={work}/s{run}.sock", "-l", f"bootrom,{rom}",
                 "-l", f"debugcon,file={debug}", f"bench{run}"], debug, env))
            if qemu:
                debug = Path(work) / f"q{run}"
                results["qemu"].append(_first_byte_and_rss(
                    [qemu, "-machine", "pc", "-enable-kvm", "-m", "256", "-nodefaults",
                     "-display", "none", "-bios", str(rom), "-chardev",
                     f"file,id=d,path={debug}", "-device", "isa-debugcon,iobase=0x402,chardev=d"],
                    debug))
    figures |= {"pyhyve_served_startup_s": min(warm),
                "pyhyve_python_version": subprocess.run(
                    [args.python, "-c", "import platform; print(platform.python_version())"],
                    capture_output=True, text=True, check=True).stdout.strip()}
    for side, runs in results.items():
        if runs:
            figures[f"{side}_startup_s"] = min(first for first, _ in runs)
            figures[f"{side}_rss_mib"] = min(rss for _, rss in runs) / (1 << 20)
    print(f"start-up to first instruction: pyhyve {figures['pyhyve_startup_s'] * 1000:.0f} ms "
          f"(the interpreter alone {figures['interpreter_alone_s'] * 1000:.1f} ms in its venv, "
          f"{figures['interpreter_installed_alone_s'] * 1000:.1f} ms as installed)", end="")
    if "qemu_startup_s" in figures:
        print(f", qemu {figures['qemu_startup_s'] * 1000:.0f} ms, ratio "
              f"{figures['pyhyve_startup_s'] / figures['qemu_startup_s']:.2f} (goal < 1)")
    else:
        print()
    print(f"warm start through pyhyve --serve, request to first instruction: "
          f"{figures['pyhyve_served_startup_s'] * 1000:.1f} ms", end="")
    if "qemu_startup_s" in figures:
        warm_ratio = figures["pyhyve_served_startup_s"] / figures["qemu_startup_s"]
        print(f", ratio to qemu {warm_ratio:.2f}")
    else:
        print()
    print(f"resident memory, 256 MiB guest: pyhyve {figures['pyhyve_rss_mib']:.1f} MiB", end="")
    if "qemu_rss_mib" in figures:
        print(f", qemu {figures['qemu_rss_mib']:.1f} MiB (goal: pyhyve < 40 MiB)")
    else:
        print()
    print(f"results: {save('startup', figures).relative_to(REPO)}")


if __name__ == "__main__":
    main()
