"""Density: how fast VMs can be created, run to their first exit and destroyed,
pyhyve vs QEMU, 50 one after another and 10 at once.

The guest is tests/guests/exits.S with COUNT=1: one write to the debug port
(its first exit that reaches the VMM), then power-off.  Each VM is a whole
process, as a user or a test suite starts them:
  pyhyve  python3 -m pyhyve -m 64M -l bootrom,ROM ... (exit status 1), python3
          in a venv as the README installs pyhyve (--python: which one);
  qemu    qemu-system-x86_64 -enable-kvm -m 64 -bios ROM with isa-debug-exit
          on the power-off port.
A third way is pyhyve's warm start, `pyhyve --serve=SOCKET`: a fork server
that has imported pyhyve once forks a process per VM (pyhyve.forkserver),
timed from the request to the exit status as the others.  A fourth figure
is pyhyve as a library: VirtualMachine(...).run() and close() in one
Python process, which skips interpreter start-up.
Figures are VMs per second (higher is better) for each way, and for the
processes the CPU time (user and system) each VM took, which is what bounds
starting 10 at once on a machine with few cores.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, build_rom, fork_server, save, venv_python

from pyhyve import forkserver
from pyhyve.config import Config
from pyhyve.vcpu import ExitStatus
from pyhyve.vm import VirtualMachine

PM1A_CNT = 0x404
MEMORY_MIB = 64


def pyhyve_command(python: str, rom: Path, work: Path, index: int) -> list[str]:
    return [python, "-m", "pyhyve", "-m", f"{MEMORY_MIB}M", "-l", f"bootrom,{rom}",
            "-l", f"debugcon,file={work}/p{index}.txt",
            "-o", f"control.socket={work}/p{index}.sock", f"density{index}"]


def qemu_command(qemu: str, rom: Path, work: Path, index: int) -> list[str]:
    return [qemu, "-machine", "pc", "-enable-kvm", "-m", str(MEMORY_MIB), "-nodefaults",
            "-display", "none", "-bios", str(rom),
            "-chardev", f"file,id=d,path={work}/q{index}.txt",
            "-device", "isa-debugcon,iobase=0x402,chardev=d",
            "-device", f"isa-debug-exit,iobase={PM1A_CNT:#x},iosize=2"]


def run_batch(commands: list[list[str]], env: dict, expect: int) -> tuple[float, float]:
    """Start all the commands at once and wait for every one; the wall time and
    the CPU time (user and system) they took together."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    procs = [subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env) for command in commands]
    failures = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode != expect:
            failures.append(f"{proc.args[0]} exited {proc.returncode}: {stderr.decode()[-300:]}")
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if failures:
        raise SystemExit("\n".join(failures))
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def sequential(make, count: int, env: dict, expect: int) -> tuple[float, float]:
    """VMs per second, one process after another, and the CPU seconds a VM took."""
    runs = [run_batch([make(i)], env, expect) for i in range(count)]
    return count / sum(wall for wall, _ in runs), sum(cpu for _, cpu in runs) / count


def served(server: Path, commands: list[list[str]], expect: int) -> float:
    """Start the VMs through the fork server at once, wait for every one; wall time."""
    start = time.perf_counter()
    with open(os.devnull, "r+b") as null:
        vms = [forkserver.start(str(server), command[3:], stdin=null.fileno(),
                                stdout=null.fileno(), stderr=null.fileno())
               for command in commands]
        statuses = [vm.wait() for vm in vms]
    elapsed = time.perf_counter() - start
    if any(status != expect for status in statuses):
        raise SystemExit(f"served VMs ended with {statuses}")
    return elapsed


def in_process(rom: Path, work: Path, count: int) -> float:
    """VMs per second through the library: create, run to power-off, close."""
    start = time.perf_counter()
    for index in range(count):
        vm = VirtualMachine(Config({"name": f"density{index}", "memory.size": f"{MEMORY_MIB}M",
                                    "lpc.bootrom": str(rom),
                                    "lpc.debugcon.path": str(work / f"l{index}.txt")}))
        try:
            status = vm.run()
        finally:
            vm.close()
        if status != ExitStatus.POWEROFF:
            raise SystemExit(f"in-process VM {index} ended with {status}")
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs the pyhyve processes (default: this "
                             "one), e.g. /usr/bin/python3, which the README installs pyhyve with")
    args = parser.parse_args()
    rom = build_rom("exits", COUNT=1, EXIT_PORT=0x402)
    qemu = shutil.which("qemu-system-x86_64")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    figures = {"sequential": args.sequential, "concurrent": args.concurrent,
               "pyhyve_python": args.python}
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-density-") as tmp:
        work = Path(tmp)
        python = venv_python(args.python, work)
        sides = {"pyhyve": (lambda i: pyhyve_command(python, rom, work, i), ExitStatus.POWEROFF)}
        if qemu:
            sides["qemu"] = (lambda i: qemu_command(qemu, rom, work, i), None)
        for side, (make, expect) in sides.items():
            if expect is None:
                expect = qemu_exit_code(make, env)
            rate, cpu = sequential(make, args.sequential, env, expect)
            figures[f"{side}_sequential_vms_per_s"] = rate
            figures[f"{side}_sequential_cpu_ms_per_vm"] = cpu * 1000
            batch = [make(100 + i) for i in range(args.concurrent)]
            wall, cpu = run_batch(batch, env, expect)
            figures[f"{side}_concurrent_vms_per_s"] = args.concurrent / wall
            figures[f"{side}_concurrent_cpu_ms_per_vm"] = cpu * 1000 / args.concurrent
        with fork_server(work, env, python) as server:
            make = sides["pyhyve"][0]
            figures["served_sequential_vms_per_s"] = args.sequential / sum(
                served(server, [make(200 + i)], ExitStatus.POWEROFF)
                for i in range(args.sequential))
            figures["served_concurrent_vms_per_s"] = args.concurrent / served(
                server, [make(300 + i) for i in range(args.concurrent)], ExitStatus.POWEROFF)
        figures["pyhyve_library_vms_per_s"] = in_process(rom, work, args.sequential)
        for run in work.glob("*.txt"):
            if not run.read_bytes():
                raise SystemExit(f"{run.name}: the guest never reached its first exit")
    print(f"{'':8}{'sequential':>14}{'concurrent':>14}   (VMs/s)")
    for side in sides:
        print(f"{side:8}{figures[f'{side}_sequential_vms_per_s']:14.1f}"
              f"{figures[f'{side}_concurrent_vms_per_s']:14.1f}")
    for side in sides:
        print(f"{side:8}{figures[f'{side}_sequential_cpu_ms_per_vm']:14.1f}"
              f"{figures[f'{side}_concurrent_cpu_ms_per_vm']:14.1f}   (ms of CPU a VM)")
    print(f"{'served':8}{figures['served_sequential_vms_per_s']:14.1f}"
          f"{figures['served_concurrent_vms_per_s']:14.1f}   (pyhyve --serve, warm)")
    print(f"{'library':8}{figures['pyhyve_library_vms_per_s']:14.1f}{'':>14}"
          "   (pyhyve in one process)")
    if "qemu" in sides:
        for mode in ("sequential", "concurrent"):
            ratio = figures[f"pyhyve_{mode}_vms_per_s"] / figures[f"qemu_{mode}_vms_per_s"]
            figures[f"ratio_{mode}"] = ratio
            warm = figures[f"served_{mode}_vms_per_s"] / figures[f"qemu_{mode}_vms_per_s"]
            figures[f"ratio_served_{mode}"] = warm
            print(f"ratio pyhyve/qemu, {mode}: {ratio:.2f} cold, {warm:.2f} warm (--serve)")
    print(f"results: {save('density', figures).relative_to(REPO)}")


def qemu_exit_code(make, env: dict) -> int:
    """QEMU's exit status for the guest's power-off write (isa-debug-exit encodes the
    value written), learnt from one run rather than assumed."""
    proc = subprocess.run(make(999), stdin=subprocess.DEVNULL, capture_output=True, env=env,
                          timeout=120)
    if proc.returncode == 0:
        raise SystemExit(f"qemu did not take the power-off write: {proc.stderr.decode()[-300:]}")
    return proc.returncode


if __name__ == "__main__":
    main()
