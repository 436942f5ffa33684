"""Run every benchmark in turn: `python -m bench` (from the repository root).

Each one prints pyhyve's figure beside its reference measured in the same run
and writes JSON to bench/results/.  The set-up step first installs what the
benchmarks run (QEMU, SeaBIOS, GRUB, the guest toolchain) where it is
missing, with apt-get as root.
"""

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import require_program  # noqa: E402  (bench/ is not a package)

BENCHMARKS = ("exits.py", "exits_cold.py", "blk.py", "startup.py", "boot.py", "density.py",
              "snapshot.py", "migrate.py", "net.py", "hpet.py", "linux.py", "display.py")
PROGRAMS = {"qemu-system-x86_64": "qemu-system-x86", "gcc": "gcc", "ld": "binutils",
            "grub-mkimage": "grub-common", "mke2fs": "e2fsprogs", "ip": "iproute2"}
FILES = {"/usr/share/seabios/bios.bin": "seabios",
         "/usr/lib/grub/i386-pc/boot.img": "grub-pc-bin"}


def setup() -> None:
    for program, package in PROGRAMS.items():
        require_program(program, package)
    missing = [package for path, package in FILES.items() if not Path(path).exists()]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def main() -> int:
    setup()
    failed = 0
    for script in BENCHMARKS:
        print(f"== {script[:-3]} ==", flush=True)
        failed += subprocess.run([sys.executable, str(BENCH / script)]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
