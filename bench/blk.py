"""Disk benchmarks: pyhyve vs QEMU on the same guests, measured in one run.

Part one, virtio-blk sequential read and write throughput.  The guest is
tests/guests/blkdriver.S built with READ_ONLY=1 (WRITE_ONLY=1): its own
legacy virtio-blk driver reads (writes) TOTAL_KIB from sector 0 in CHUNK_KIB
requests, one in flight, polling the used ring, then powers off.  It runs on
  pyhyve  an in-process VirtualMachine with -s 3,virtio-blk,DISK;
  qemu    qemu-system-x86_64 -enable-kvm with a legacy virtio-blk-pci at the
          same slot (addr=3) and isa-debug-exit on the power-off port.
Each side runs a big read and a tiny one (one request); the throughput is the
difference in bytes over the difference in time, so start-up, the guest's
long-mode entry and PCI scan cancel out.  The best of --repeat runs counts;
the two sides take turns, so that a busy spell on the host hits both.
The disk is a file of random bytes, read once beforehand so that both sides
read from the host's page cache, and writes land in the page cache too
(pyhyve's default, QEMU's cache=writeback): the figure is the virtio path,
not the disk.
Goal: pyhyve at least 0.8x QEMU.

Part two, 4 KiB transfers on every disk device pyhyve has (DISKS: virtio-blk,
nvme, virtio-scsi, and ahci where pyhyve registers it), through Linux's own
drivers.  The Linux test guest boots once under pyhyve and once under QEMU
with one 64 MiB disk per device at the same slots, and runs
tests/guests/blkload.c on each: sequential and random reads and writes of
4 KiB with O_DIRECT, at queue depth 1 and 32 (32 processes: the guest kernel
has no AIO), timed in the guest.  Same kernel, initramfs, program and
arguments on both sides (QEMU's kernel also takes QEMU_SKIP_PRT: every disk
here interrupts through MSI or MSI-X, and its _PRT costs 30 s a device on an
emulating host); the images are in the host's page cache on both
(pyhyve's default and QEMU's cache=writeback).  Printed as IOPS per side and
the ratio pyhyve/QEMU.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from common import (REPO, build_rom, require_program, run_guest_on_pyhyve, run_guest_on_qemu,
                    save)

sys.path.insert(0, str(REPO / "tests"))

from build import build_linux_program  # noqa: E402  (tests/guests is not a package)
from linuxguest import (QEMU_SKIP_PRT, GuestRun, pyhyve_command,  # noqa: E402
                        pyhyve_env, qemu_command, with_script)
from linuxguest import build as linux_guest  # noqa: E402

SLOT = 3
MEMORY_MIB = 64
GOAL = 0.8


def pyhyve_seconds(rom: Path, disk: Path, debug: Path, done: str) -> float:
    return run_guest_on_pyhyve("bench-blk", rom, MEMORY_MIB, debug,
                               {f"pci.0.{SLOT}.0.device": "virtio-blk",
                                f"pci.0.{SLOT}.0.path": str(disk)}, done)


def qemu_seconds(qemu: str, rom: Path, disk: Path, debug: Path, done: str) -> float:
    """Start-up included: the tiny run subtracts it."""
    devices = ["-drive", f"file={disk},format=raw,if=none,id=d0,cache=writeback",
               "-device", f"virtio-blk-pci,drive=d0,disable-modern=on,addr={SLOT}"]
    return run_guest_on_qemu(qemu, rom, MEMORY_MIB, debug, devices, done)


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


def throughput(args) -> None:
    """Part one: the bare-metal driver's sequential throughput on virtio-blk."""
    big, tiny = args.mib * 1024 * 1024, args.chunk_kib * 1024
    results = {"mib": args.mib, "chunk_kib": args.chunk_kib, "repeat": args.repeat,
               "goal": GOAL}
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-blk-") as tmp:
        disk, debug = Path(tmp) / "disk.img", Path(tmp) / "debug.txt"
        with open(disk, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1024 * 1024))
        disk.read_bytes()                    # into the page cache for both sides
        qemu_path = shutil.which("qemu-system-x86_64")
        for direction, mode in (("read", "READ_ONLY"), ("write", "WRITE_ONLY")):
            big_rom = build_rom("blkdriver", **{mode: 1}, TOTAL_KIB=args.mib * 1024,
                                CHUNK_KIB=args.chunk_kib)
            tiny_rom = build_rom("blkdriver", **{mode: 1}, TOTAL_KIB=args.chunk_kib,
                                 CHUNK_KIB=args.chunk_kib)
            done = f"{direction} done"
            runs = {"pyhyve": lambda rom: pyhyve_seconds(rom, disk, debug, done)}
            if qemu_path:
                runs["qemu"] = lambda rom: qemu_seconds(qemu_path, rom, disk, debug, done)
            figures = measure(runs, big_rom, tiny_rom, big, tiny, args.repeat)
            results[direction] = _report(direction, args, figures)
    print(f"results: {save('blk', results).relative_to(REPO)}")


def _report(direction: str, args, figures: dict) -> dict:
    """Print one direction's runs and speeds; its figures with the ratio."""
    pyhyve, qemu = figures["pyhyve"], figures.get("qemu")
    print(f"{direction} {args.mib} MiB in {args.chunk_kib} KiB requests, one in flight "
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
        print(f"{direction} ratio pyhyve/qemu : {ratio:.2f}  (goal >= {GOAL:.2f})")
    return {"pyhyve": pyhyve, "qemu": qemu, "pyhyve_mb_per_s": pyhyve["mb_per_s"],
            "qemu_mb_per_s": qemu["mb_per_s"] if qemu else None, "ratio_pyhyve_qemu": ratio}


# --- part two: 4 KiB transfers on every disk device, through Linux's drivers ------------------
class Disk(NamedTuple):
    """A disk device as both sides spell it, at one PCI slot; it runs under
    pyhyve where pyhyve registers the emulation (so a new one joins by being
    added here)."""
    name: str
    slot: int
    pyhyve: str                 # -s SLOT,... with {path}
    qemu: tuple[str, ...]       # QEMU arguments with {path} and {slot}


DISKS = (
    Disk("virtio-blk", 3, "virtio-blk,{path}",
         ("-drive", "file={path},format=raw,if=none,id=vblk",
          "-device", "virtio-blk-pci,drive=vblk,addr={slot}")),
    Disk("nvme", 4, "nvme,{path}",
         ("-drive", "file={path},format=raw,if=none,id=nvme",
          "-device", "nvme,drive=nvme,serial=bench,addr={slot}")),
    Disk("virtio-scsi", 5, "virtio-scsi,lun0={path}",
         ("-device", "virtio-scsi-pci,id=scsi,addr={slot}",
          "-drive", "file={path},format=raw,if=none,id=vscsi",
          "-device", "scsi-hd,drive=vscsi,bus=scsi.0,scsi-id=0,lun=0")),
    Disk("ahci", 6, "ahci,hd:{path}",
         ("-device", "ahci,id=ahci,addr={slot}",
          "-drive", "file={path},format=raw,if=none,id=sata",
          "-device", "ide-hd,drive=sata,bus=ahci.0")),
)
WORKLOADS = [(mode, depth) for depth in (1, 32)
             for mode in ("seqread", "randread", "seqwrite", "randwrite")]
DISK_MIB = 64
LINUX_MEMORY = "256M"
LINUX_TIMEOUT = 3600
RESULT = re.compile(r"^(\S+) RESULT (\S+) (\d+) (\d+) (\d+)\r?$", re.M)
# /sys/block/X links into the PCI device the disk hangs off: the disk at slot S is
# the one whose path holds 0000:00:SS.0 (a virtio-scsi or AHCI disk below its HBA).
GUEST_SCRIPT = r"""
disk() { for d in /sys/block/*; do case $(readlink $d) in *"/0000:00:$1.0/"*)
  echo /dev/${d##*/}; return;; esac; done; }
"""


def guest_script(disks: list[Disk], ops: int) -> str:
    lines = [GUEST_SCRIPT]
    for disk in disks:
        lines.append(f"d=$(disk {disk.slot:02x})")
        for mode, depth in WORKLOADS:
            lines.append(f"printf '{disk.name} '; /blkload $d {mode} {depth} {ops} {DISK_MIB} "
                         f"|| echo FAILED")
    lines.append("section end")
    return "\n".join(lines) + "\n"


def linux_iops(command: list[str], env, log: Path) -> dict:
    """{(device, mode, depth): IOPS} from one boot that runs the whole script."""
    run = GuestRun(command, env, log)
    try:
        run.expect("@@@ end", LINUX_TIMEOUT)
        run.wait(LINUX_TIMEOUT)
    finally:
        run.kill()
    results = {}
    for name, mode, depth, ops, nanoseconds in RESULT.findall(run.output):
        results[(name, mode, int(depth))] = int(ops) / (int(nanoseconds) / 1e9)
    return results


def four_k(args) -> None:
    """Part two: the same Linux guest and blkload runs under pyhyve, then QEMU."""
    from pyhyve.pci import emulations
    require_program("qemu-system-x86_64", "qemu-system-x86")
    wanted = args.devices.split(",")
    unknown = sorted(set(wanted) - {disk.name for disk in DISKS})
    if unknown:
        raise SystemExit(f"unknown disk devices: {', '.join(unknown)}")
    registered = emulations()
    disks = [disk for disk in DISKS if disk.name in wanted and disk.name in registered]
    skipped = [name for name in wanted if name not in registered]
    guest = linux_guest()
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-blk4k-") as tmp_name:
        tmp = Path(tmp_name)
        initrd = with_script(guest, tmp, guest_script(disks, args.ops),
                             {"blkload": build_linux_program("blkload").read_bytes()})
        paths = {}
        for disk in disks:
            paths[disk.name] = tmp / f"{disk.name}.img"
            with open(paths[disk.name], "wb") as image:
                image.write(os.urandom(DISK_MIB << 20))
        pyhyve_args = [arg for disk in disks for arg in
                       ("-s", f"{disk.slot},{disk.pyhyve.format(path=paths[disk.name])}")]
        qemu_args = [arg.format(path=paths[disk.name], slot=disk.slot)
                     for disk in disks for arg in disk.qemu]
        sides = {
            "pyhyve": (pyhyve_command(guest, initrd, *pyhyve_args, memory=LINUX_MEMORY,
                                      name="bench-blk4k"), pyhyve_env()),
            "qemu": (qemu_command(guest, initrd, *qemu_args, memory=LINUX_MEMORY,
                                  extra_cmdline=QEMU_SKIP_PRT), None),
        }
        figures = {side: linux_iops(command, env, tmp / f"{side}.log")
                   for side, (command, env) in sides.items()}

    print(f"4 KiB O_DIRECT transfers in the Linux guest ({args.ops} per run, within "
          f"{DISK_MIB} MiB; depth 32 from 32 processes); IOPS as the guest timed them")
    if skipped:
        print(f"not in this pyhyve: {', '.join(skipped)}")
    print(f"{'device':12} {'workload':10} {'depth':>5} {'pyhyve':>9} {'qemu':>9} {'ratio':>6}")
    rows = []
    for disk in disks:
        for mode, depth in WORKLOADS:
            key = (disk.name, mode, depth)
            pyhyve, qemu = figures["pyhyve"].get(key), figures["qemu"].get(key)
            ratio = pyhyve / qemu if pyhyve and qemu else None
            rows.append({"device": disk.name, "workload": mode, "depth": depth,
                         "pyhyve_iops": pyhyve, "qemu_iops": qemu, "ratio_pyhyve_qemu": ratio})
            shown = [f"{value:9.0f}" if value else f"{'failed':>9}" for value in (pyhyve, qemu)]
            shown.append(f"{ratio:6.2f}" if ratio else f"{'-':>6}")
            print(f"{disk.name:12} {mode:10} {depth:5} {' '.join(shown)}")
    path = save("blk-4k", {"ops": args.ops, "disk_mib": DISK_MIB, "skipped": skipped,
                           "rows": rows})
    print(f"results: {path.relative_to(path.parent.parent.parent)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "throughput", "4k"), default="all",
                        help="which part to run")
    parser.add_argument("--mib", type=int, default=256, help="MiB the big run reads, then writes")
    parser.add_argument("--chunk-kib", type=int, default=64, choices=(4, 16, 32, 64, 128),
                        help="KiB per request")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each size")
    parser.add_argument("--ops", type=int, default=2000,
                        help="4 KiB transfers per device, workload and depth")
    parser.add_argument("--devices", default=",".join(device.name for device in DISKS),
                        help="comma-separated disk devices for the 4 KiB part")
    args = parser.parse_args()
    if args.part in ("all", "throughput"):
        throughput(args)
    if args.part in ("all", "4k"):
        four_k(args)

if __name__ == "__main__":
    main()
