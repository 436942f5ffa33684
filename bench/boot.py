"""Boot: wall time from process start until GRUB has read a file from virtio-blk
and printed it on the serial console, pyhyve vs QEMU on the same disk.

Both run Debian's SeaBIOS, which boots GRUB 2 from a virtio-blk disk
(tests/guests/grubdisk.py builds it); GRUB's grub.cfg `cat`s a file from
ext2.  The serial console goes to a file that both sides' runs poll the same
way; the time is taken when the file's text appears, and the VMM is then
killed (GRUB's halt takes different paths on the two).  The sides take
turns run by run; the best run of each counts.
Goal (issue 9): pyhyve no slower than 1.2x QEMU.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, require_program, save
from grubdisk import BOOT_IMG, FILE_TEXT, build_grub_disk

SEABIOS = "/usr/share/seabios/bios.bin"
MEMORY_MIB = 128
TIMEOUT = 300
POLL = 0.01
GOAL = 1.2


def seconds_to_text(command: list[str], console: Path, env=None) -> float:
    """Start `command` (its stdout is the serial console) and time it until the
    file's text is on the console."""
    with open(console, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = start + TIMEOUT
        while FILE_TEXT.encode() not in console.read_bytes():
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise SystemExit(f"{command[0]} did not boot GRUB (exit {proc.returncode}):\n"
                                 + console.read_text(errors="replace")[-2000:])
            time.sleep(POLL)
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for path, package in ((SEABIOS, "seabios"), (BOOT_IMG, "grub-pc-bin")):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: apt-get install {package}")
    mkimage = require_program("grub-mkimage", "grub-common")
    mke2fs = require_program("mke2fs", "e2fsprogs")
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    times = {"pyhyve": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-boot-") as work:
        disk = build_grub_disk(Path(work), BOOT_IMG, mkimage, mke2fs)
        console = Path(work) / "console.txt"
        commands = {
            "pyhyve": [sys.executable, "-m", "pyhyve", "-m", f"{MEMORY_MIB}M",
                       "-l", f"bootrom,{SEABIOS}", "-l", "com1,stdio",
                       "-o", f"control.socket={work}/bench.sock",
                       "-s", f"2,virtio-blk,{disk}", "bench-boot"],
            "qemu": [qemu, "-machine", "pc", "-enable-kvm", "-m", str(MEMORY_MIB),
                     "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none",
                     "-bios", SEABIOS, "-drive", f"file={disk},format=raw,if=virtio"],
        }
        for _ in range(args.repeat):
            for side, command in commands.items():
                times[side].append(seconds_to_text(command, console, env))
    best = {side: min(runs) for side, runs in times.items()}
    ratio = best["pyhyve"] / best["qemu"]
    for side, runs in times.items():
        print(f"{side:7}: {best[side]:6.2f} s (runs: {', '.join(f'{t:.2f}' for t in runs)})")
    print(f"ratio pyhyve/qemu: {ratio:.2f}  (goal <= {GOAL})")
    path = save("boot", {"memory_mib": MEMORY_MIB, "runs_s": times,
                         "pyhyve_s": best["pyhyve"], "qemu_s": best["qemu"],
                         "ratio_pyhyve_qemu": ratio, "goal": GOAL})
    print(f"results: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
