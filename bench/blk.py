"""virtio-blk sequential read throughput: pyhyve vs QEMU on the same guest.

The guest is tests/guests/blkdriver.S built with READ_ONLY=1: its own legacy
virtio-blk driver reads TOTAL_KIB from sector 0 in CHUNK_KIB requests, one in
flight, polling the used ring, then powers off.  It runs on
  pyhyve  an in-process VirtualMachine with -s 3,virtio-blk,DISK;
  qemu    qemu-system-x86_64 -enable-kvm with a legacy virtio-blk-pci at the
          same slot (addr=3) and isa-debug-exit on the power-off port.
Each side runs a big read and a tiny one (one request); the throughput is the
difference in bytes over the difference in time, so start-up, the guest's
long-mode entry and PCI scan cancel out.  The best of --repeat runs counts;
the two sides take turns, so that a busy spell on the host hits both.
The disk is a file of random bytes, read once beforehand so that both sides
read from the host's page cache: the figure is the virtio path, not the disk.
Goal: pyhyve at least 0.8x QEMU.
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from common import build_rom, run_guest_on_pyhyve, run_guest_on_qemu, save

SLOT = 3
MEMORY_MIB = 64
GOAL = 0.8


def pyhyve_seconds(rom: Path, disk: Path, debug: Path) -> float:
    return run_guest_on_pyhyve("bench-blk", rom, MEMORY_MIB, debug,
                               {f"pci.0.{SLOT}.0.device": "virtio-blk",
                                f"pci.0.{SLOT}.0.path": str(disk)}, "read done")


def qemu_seconds(qemu: str, rom: Path, disk: Path, debug: Path) -> float:
    """Start-up included: the tiny run subtracts it."""
    devices = ["-drive", f"file={disk},format=raw,if=none,id=d0",
               "-device", f"virtio-blk-pci,drive=d0,disable-modern=on,addr={SLOT}"]
    return run_guest_on_qemu(qemu, rom, MEMORY_MIB, debug, devices, "read done")


def measure(runs: dict, big_rom: Path, tiny_rom: Path, big: int, tiny: int,
            repeat: int) -> dict:
    """Bytes/s per side from its best big and best tiny run, with the raw times.
    The sides take turns run by run, so a busy spell on the host falls on both."""
    times = {name: {"big_s": [], "tiny_s": []} for name in runs}
    for _ in range(repeat):
        for rom, key in ((big_rom, "big_s"), (tiny_rom, "tiny_s")):
            for name, run in runs.items():
                times[name][key].append(run(rom))
    for figures in times.values():
        seconds = min(figures["big_s"]) - min(figures["tiny_s"])
        figures["mb_per_s"] = (big - tiny) / seconds / 1e6 if seconds > 0 else None
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB the big run reads")
    parser.add_argument("--chunk-kib", type=int, default=64, choices=(4, 16, 32, 64, 128),
                        help="KiB per request")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each size")
    args = parser.parse_args()
    big, tiny = args.mib * 1024 * 1024, args.chunk_kib * 1024
    big_rom = build_rom("blkdriver", READ_ONLY=1, TOTAL_KIB=args.mib * 1024,
                        CHUNK_KIB=args.chunk_kib)
    tiny_rom = build_rom("blkdriver", READ_ONLY=1, TOTAL_KIB=args.chunk_kib,
                         CHUNK_KIB=args.chunk_kib)

    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-blk-") as tmp:
        disk, debug = Path(tmp) / "disk.img", Path(tmp) / "debug.txt"
        with open(disk, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1024 * 1024))
        disk.read_bytes()                    # into the page cache for both sides
        runs = {"pyhyve": lambda rom: pyhyve_seconds(rom, disk, debug)}
        qemu_path = shutil.which("qemu-system-x86_64")
        if qemu_path:
            runs["qemu"] = lambda rom: qemu_seconds(qemu_path, rom, disk, debug)
        figures = measure(runs, big_rom, tiny_rom, big, tiny, args.repeat)
    pyhyve, qemu = figures["pyhyve"], figures.get("qemu")

    print(f"read {args.mib} MiB in {args.chunk_kib} KiB requests, one in flight "
          f"(best of {args.repeat}; tiny run: {args.chunk_kib} KiB)")
    for name, side in (("pyhyve", pyhyve), ("qemu", qemu)):
        if side is None:
            print(f"{name:7}: not installed")
            continue
        times = ", ".join(f"{t:.3f}" for t in side["big_s"])
        tiny_times = ", ".join(f"{t:.3f}" for t in side["tiny_s"])
        print(f"{name:7}: big runs {times} s; tiny runs {tiny_times} s")
        speed = side["mb_per_s"]
        print(f"{name:7}: {speed:8.1f} MB/s" if speed else f"{name:7}: no usable difference")
    ratio = None
    if qemu and pyhyve["mb_per_s"] and qemu["mb_per_s"]:
        ratio = pyhyve["mb_per_s"] / qemu["mb_per_s"]
        print(f"ratio pyhyve/qemu : {ratio:.2f}  (goal >= {GOAL:.2f})")
    path = save("blk", {"mib": args.mib, "chunk_kib": args.chunk_kib, "repeat": args.repeat,
                        "pyhyve": pyhyve, "qemu": qemu,
                        "pyhyve_mb_per_s": pyhyve["mb_per_s"],
                        "qemu_mb_per_s": qemu["mb_per_s"] if qemu else None,
                        "ratio_pyhyve_qemu": ratio, "goal": GOAL})
    print(f"results: {path.relative_to(path.parent.parent.parent)}")


if __name__ == "__main__":
    main()
