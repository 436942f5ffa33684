"""HPET counter reads: TSC cycles one read of the main counter takes, as Linux
times it when it calibrates the TSC against the HPET (tsc_read_refs() gives
up after five reads of 50000 cycles or more each; then the TSC is marked
unstable and the guest keeps time with the HPET, every read an exit).

tests/guests/hpetread.S reads the counter 32 times with rdtsc around each and
prints the fastest and slowest read; pyhyve and QEMU (-machine pc) run it in
turns, best of --repeat runs each.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, build_rom, require_program, save

LINUX_LIMIT = 50000             # SMI_TRESHOLD in arch/x86/kernel/tsc.c


def parse(text: str) -> tuple[int, int]:
    words = text.split()
    if words[:2] != ["hpet-read", "min"]:
        raise SystemExit(f"the guest did not report its reads: {text!r}")
    return int(words[2], 16), int(words[4], 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    rom = build_rom("hpetread")
    runs = {"pyhyve": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-hpet-") as work:
        debug = Path(work) / "debug.txt"
        commands = {
            "pyhyve": [sys.executable, "-m", "pyhyve", "-m", "16M", "-l", f"bootrom,{rom}",
                       "-l", f"debugcon,file={debug}", "bench-hpet"],
            "qemu": [qemu, "-machine", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities",
                     "-m", "16", "-nodefaults", "-display", "none", "-bios", str(rom),
                     "-device", "isa-debug-exit,iobase=0x404,iosize=2",
                     "-chardev", f"file,id=dbg,path={debug}",
                     "-device", "isa-debugcon,iobase=0x402,chardev=dbg"],
        }
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for _ in range(args.repeat):
            for side, command in commands.items():
                debug.unlink(missing_ok=True)
                subprocess.run(command, capture_output=True, timeout=120, env=env)
                runs[side].append(parse(debug.read_text() if debug.exists() else ""))
    best = {side: min(fastest for fastest, _ in results) for side, results in runs.items()}
    for side, results in runs.items():
        print(f"{side:7}: fastest read {best[side]:6d} TSC cycles (runs, min/max: "
              f"{', '.join(f'{a}/{b}' for a, b in results)}); Linux's limit {LINUX_LIMIT}")
    ratio = best["pyhyve"] / best["qemu"]
    print(f"ratio pyhyve/qemu: {ratio:.2f}")
    path = save("hpet", {"runs_cycles": runs, "pyhyve_cycles": best["pyhyve"],
                         "qemu_cycles": best["qemu"], "linux_limit_cycles": LINUX_LIMIT,
                         "ratio_pyhyve_qemu": ratio})
    print(f"results: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
