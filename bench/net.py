"""virtio-net transmit and receive throughput: pyhyve vs QEMU on the same guest,
through a tap.

The guest is tests/guests/netdriver.S built with BLAST_FRAMES=N and
FRAME_SIZE=S: its own legacy virtio-net driver sends N broadcast frames of S
bytes (Ethernet header included, no FCS), keeping its transmit ring full and
polling the used ring, then powers off.  It runs on
  pyhyve  an in-process VirtualMachine with -s 3,virtio-net,tap=TAP;
  qemu    qemu-system-x86_64 -enable-kvm with a legacy virtio-net-pci at the
          same slot (addr=3) on the same tap, isa-debug-exit on the power-off port.
The tap lives in a network namespace of this process's own (unshare(2) at
start-up: both sides and every `ip` command inherit it, and it disappears with
the process).  What reached the host is read from the tap's counters (rx
packets and bytes: frames the tap accepted from the VM) before and after each
run; a run that lost frames is reported beside the guest's count.
Each side runs a big and a tiny (one-frame) blast; the rate is the difference
in frames over the difference in time, so start-up, the guest's long-mode entry
and PCI scan cancel out.  The best of --repeat runs counts; the two sides take
turns, so that a busy spell on the host hits both.  Two frame sizes: full
(1514 bytes: Mbit/s) and small (64 bytes: packets per second).
The host's stack drops the frames once the tap has taken them (no protocol
handles 0x88B5), so the figure is the VMM's transmit path and the tap.
Receive: the guest built with RECV_FRAMES=N counts N frames of type 0x88B5
(re-posting each of its 16 receive buffers as it is done with it) while a
process of this benchmark sends such broadcast frames out of the tap towards
the VM, up to FLOOD_BATCH every millisecond, from before the VM starts until
it ended; what the VMM cannot take in time the tap drops.  The big and tiny
runs' difference is again the rate.
Each side's host CPU a frame (user and system, the guest's emulation
included) says what a side needs of the host: where another process shares
the cores, the side that needs more slows first.
Where the guest's code is emulated (the test hosts), the guest's own loop (about
15 instructions a frame) may be what limits both sides.
"""

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import build_rom, require_program, run_guest_on_pyhyve, run_guest_on_qemu, save

SLOT = 3
MEMORY_MIB = 64
TAP = "benchtap0"
CLONE_NEWNET = 0x40000000
TINY_FRAMES = 1
FLOOD_BATCH = 256           # frames a millisecond: 256,000 a second at most
# The flooding process: broadcast 0x88B5 frames of argv[2] bytes out of tap argv[1].
FLOOD = """
import socket, sys, time
size, tap = int(sys.argv[2]), sys.argv[1]
frame = b"\\xff" * 6 + b"\\x02\\x00\\x00\\x00\\x00\\x01\\x88\\xb5" + bytes(size - 14)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind((tap, 0))
while True:
    for _ in range(int(sys.argv[3])):
        try:
            sock.send(frame)
        except OSError:     # no VMM on the tap yet, or its queue is full
            pass
    time.sleep(0.001)
"""


def enter_private_netns() -> None:
    """Move this process (before it starts any thread) into a new network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise SystemExit(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())} "
                         "(the benchmark needs root)")


def create_tap(ip: str) -> None:
    """A persistent tap, up, that both sides attach to in turn."""
    subprocess.run([ip, "tuntap", "add", "dev", TAP, "mode", "tap"], check=True)
    subprocess.run([ip, "link", "set", TAP, "up"], check=True)


def tap_received(ip: str) -> tuple[int, int]:
    """(frames, bytes) the tap has taken from the VM side so far."""
    output = subprocess.run([ip, "-s", "-j", "link", "show", "dev", TAP], check=True,
                            capture_output=True, text=True).stdout
    rx = json.loads(output)[0]["stats64"]["rx"]
    return rx["packets"], rx["bytes"]


def pyhyve_seconds(rom: Path, debug: Path, done: str) -> float:
    return run_guest_on_pyhyve("bench-net", rom, MEMORY_MIB, debug,
                               {f"pci.0.{SLOT}.0.device": "virtio-net",
                                f"pci.0.{SLOT}.0.tap": TAP}, done)


def qemu_seconds(qemu: str, rom: Path, debug: Path, done: str) -> float:
    """Start-up included: the tiny run subtracts it."""
    devices = ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
               "-device", f"virtio-net-pci,netdev=n0,disable-modern=on,addr={SLOT}"]
    return run_guest_on_qemu(qemu, rom, MEMORY_MIB, debug, devices, done)


@contextlib.contextmanager
def flood(frame_size: int):
    """Frames towards the VM while the block runs (receive)."""
    sender = subprocess.Popen([sys.executable, "-c", FLOOD, TAP, str(frame_size),
                               str(FLOOD_BATCH)])
    try:
        yield
    finally:
        sender.kill()
        sender.wait()


def measure(runs: dict, ip: str, direction: str, frame_size: int, frames: int,
            repeat: int) -> dict:
    """Per side: the raw times, what arrived per big transmit run, and the rates
    from the best big and the best tiny run."""
    count = "BLAST_FRAMES" if direction == "transmit" else "RECV_FRAMES"
    roms = {"big": build_rom("netdriver", **{count: frames}, FRAME_SIZE=frame_size),
            "tiny": build_rom("netdriver", **{count: TINY_FRAMES}, FRAME_SIZE=frame_size)}
    done = "blast done" if direction == "transmit" else "receive done"
    figures = {name: {"big_s": [], "tiny_s": [], "big_cpu_s": [], "tiny_cpu_s": [],
                      "arrived_frames": [], "arrived_bytes": []} for name in runs}
    for _ in range(repeat):
        for size, rom in roms.items():
            for name, run in runs.items():
                before = tap_received(ip)
                if direction == "transmit":
                    seconds, cpu = cpu_timed(run, rom, done)
                else:
                    with flood(frame_size):
                        seconds, cpu = cpu_timed(run, rom, done)
                figures[name][f"{size}_s"].append(seconds)
                figures[name][f"{size}_cpu_s"].append(cpu)
                if size == "big" and direction == "transmit":
                    after = tap_received(ip)
                    figures[name]["arrived_frames"].append(after[0] - before[0])
                    figures[name]["arrived_bytes"].append(after[1] - before[1])
    for side in figures.values():
        seconds = min(side["big_s"]) - min(side["tiny_s"])
        pps = (frames - TINY_FRAMES) / seconds if seconds > 0 else None
        side["pps"] = pps
        side["mbit_per_s"] = pps * frame_size * 8 / 1e6 if pps else None
        side["cpu_us_per_frame"] = (min(side["big_cpu_s"]) - min(side["tiny_cpu_s"])) \
            / (frames - TINY_FRAMES) * 1e6
    return figures


def cpu_timed(run, rom: Path, done: str) -> tuple[float, float]:
    """(seconds, host CPU seconds) of one run: this process's CPU (pyhyve runs
    in it: the vCPU thread's guest, emulated by the host kernel, and the I/O
    thread's Python) plus that of the children it waited for meanwhile (QEMU;
    the flooding process is waited for later)."""
    before = os.times()
    seconds = run(rom, done)
    after = os.times()
    cpu = sum(getattr(after, field) - getattr(before, field)
              for field in ("user", "system", "children_user", "children_system"))
    return seconds, cpu


def report(name: str, side: dict | None, frames: int, frame_size: int) -> None:
    if side is None:
        print(f"  {name:7}: not installed")
        return
    times = ", ".join(f"{t:.3f}" for t in side["big_s"])
    tiny_times = ", ".join(f"{t:.3f}" for t in side["tiny_s"])
    print(f"  {name:7}: big runs {times} s; tiny runs {tiny_times} s")
    lost = [frames - arrived for arrived in side["arrived_frames"]]
    if any(lost) or any(b != frames * frame_size for b in side["arrived_bytes"]):
        print(f"  {name:7}: the guest sent {frames} frames per big run; the tap took "
              f"{side['arrived_frames']} ({side['arrived_bytes']} bytes)")
    if side["pps"]:
        print(f"  {name:7}: {side['pps']:10.0f} frames/s {side['mbit_per_s']:8.1f} Mbit/s, "
              f"{side['cpu_us_per_frame']:.1f} us of host CPU a frame")
    else:
        print(f"  {name:7}: no usable difference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200000,
                        help="frames each big run sends")
    parser.add_argument("--sizes", type=lambda text: [int(s) for s in text.split(",")],
                        default=[1514, 64], help="frame sizes in bytes (60 to 1514), "
                        "comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each size")
    parser.add_argument("--directions", default="transmit,receive",
                        help="transmit, receive or both (comma-separated)")
    args = parser.parse_args()
    if any(not 60 <= size <= 1514 for size in args.sizes):
        raise SystemExit("--sizes: each frame size must be 60 to 1514 bytes")
    ip = require_program("ip", "iproute2")
    enter_private_netns()
    create_tap(ip)

    results = {}
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-net-") as tmp:
        debug = Path(tmp) / "debug.txt"
        runs = {"pyhyve": lambda rom, done: pyhyve_seconds(rom, debug, done)}
        qemu_path = shutil.which("qemu-system-x86_64")
        if qemu_path:
            runs["qemu"] = lambda rom, done: qemu_seconds(qemu_path, rom, debug, done)
        for direction in args.directions.split(","):
            for size in args.sizes:
                figures = measure(runs, ip, direction, size, args.frames, args.repeat)
                pyhyve, qemu = figures["pyhyve"], figures.get("qemu")
                ratio = pyhyve["pps"] / qemu["pps"] \
                    if qemu and pyhyve["pps"] and qemu["pps"] else None
                print(f"{direction}, {size}-byte frames: {args.frames} per big run, "
                      f"{TINY_FRAMES} per tiny run (best of {args.repeat})")
                report("pyhyve", pyhyve, args.frames, size)
                report("qemu", qemu, args.frames, size)
                if ratio:
                    print(f"  ratio pyhyve/qemu : {ratio:.2f}")
                results[f"{direction}-{size}"] = {"pyhyve": pyhyve, "qemu": qemu,
                                                  "ratio_pyhyve_qemu": ratio}
    path = save("net", {"frames": args.frames, "repeat": args.repeat, "runs": results})
    print(f"results: {path.relative_to(path.parent.parent.parent)}")


if __name__ == "__main__":
    main()
