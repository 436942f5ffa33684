"""Display over VNC: full-screen updates per second and host CPU per update,
pyhyve's fbuf vs QEMU's -vga std, on the same guest.

The guest is SeaBIOS with no disk: it draws its text screen (720x400) and
waits.  Each side then serves one client (a minimal RFB client here, Raw
encoding, 32-bit pixels) that asks for the whole screen, non-incrementally,
as fast as the answers come, for --seconds.  Frames per second is updates
received over that time; CPU per update is the VMM process's user+system
time (from /proc) spent meanwhile, over the updates: the cost of encoding
and sending a full screen (the text screen does not change, so neither
side redraws it).  Both servers pace their answers, QEMU by its display
refresh timer (which slows down while the screen is idle), pyhyve at 30
updates a second, so updates/s compares pacing; CPU per update compares
cost.  The sides take turns --repeat times; the best run of each counts.
"""

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, require_program, save

SEABIOS = "/usr/share/seabios/bios.bin"
READY = "No bootable device."
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 5900:
            return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return bytes(data)


def connect(port: int) -> tuple[socket.socket, int, int]:
    """An RFB 3.8 session (security None, Raw), its screen's size."""
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    recv_exact(sock, 12)
    sock.sendall(b"RFB 003.008\n")
    count = recv_exact(sock, 1)[0]
    if 1 not in recv_exact(sock, count):
        raise RuntimeError("the server wants authentication")
    sock.sendall(b"\x01")
    if struct.unpack(">I", recv_exact(sock, 4))[0]:
        raise RuntimeError("security handshake failed")
    sock.sendall(b"\x01")
    width, height = struct.unpack(">HH", recv_exact(sock, 4))
    recv_exact(sock, 16)
    recv_exact(sock, struct.unpack(">I", recv_exact(sock, 4))[0])
    pixel_format = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    sock.sendall(b"\x00\x00\x00\x00" + pixel_format)
    sock.sendall(struct.pack(">BxHi", 2, 1, 0))
    return sock, width, height


def full_update(sock: socket.socket, width: int, height: int) -> None:
    sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
    while True:
        kind = recv_exact(sock, 1)[0]
        if kind == 0:
            break
        if kind == 2:               # Bell
            continue
        raise RuntimeError(f"unexpected server message {kind}")
    rects = struct.unpack(">xH", recv_exact(sock, 3))[0]
    for _ in range(rects):
        x, y, w, h, encoding = struct.unpack(">HHHHi", recv_exact(sock, 12))
        if encoding != 0:
            raise RuntimeError(f"encoding {encoding}, not Raw")
        recv_exact(sock, w * h * 4)


def measure(pid: int, port: int, seconds: float) -> dict:
    sock, width, height = connect(port)
    try:
        full_update(sock, width, height)            # warm: the first frame is drawn
        cpu_before, start, frames = cpu_seconds(pid), time.monotonic(), 0
        while time.monotonic() - start < seconds:
            full_update(sock, width, height)
            frames += 1
        elapsed, cpu = time.monotonic() - start, cpu_seconds(pid) - cpu_before
    finally:
        sock.close()
    return {"size": [width, height], "frames_per_s": frames / elapsed,
            "cpu_ms_per_frame": 1000 * cpu / max(frames, 1)}


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the guest did not reach {text!r}")
        time.sleep(0.5)


def run_side(name: str, work: Path, seconds: float) -> dict:
    port, debug = free_port(), work / f"{name}.log"
    debug.unlink(missing_ok=True)
    if name == "pyhyve":
        command = [sys.executable, "-m", "pyhyve", "-m", "128M", "-l", f"bootrom,{SEABIOS}",
                   "-l", "fwcfg,qemu", "-l", f"debugcon,file={debug}",
                   "-s", f"3,fbuf,tcp=127.0.0.1:{port}", "bench-display"]
    else:
        command = [require_program("qemu-system-x86_64", "qemu-system-x86"), "-machine", "pc",
                   "-enable-kvm", "-m", "128", "-nodefaults", "-vga", "std",
                   "-vnc", f"127.0.0.1:{port - 5900}", "-bios", SEABIOS, "-chardev",
                   f"file,id=dbg,path={debug}", "-device",
                   "isa-debugcon,iobase=0x402,chardev=dbg"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        wait_for(debug, READY, proc)
        time.sleep(1)
        return measure(proc.pid, port, seconds)
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    runs = {"pyhyve": [], "qemu": []}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.repeat):
            for name in runs:
                runs[name].append(run_side(name, Path(work), args.seconds))
    best = {name: max(results, key=lambda r: r["frames_per_s"]) for name, results in runs.items()}
    for name, figures in best.items():
        print(f"{name:7s} {figures['size'][0]}x{figures['size'][1]}: "
              f"{figures['frames_per_s']:8.1f} full updates/s, "
              f"{figures['cpu_ms_per_frame']:6.2f} ms host CPU each")
    ratio = best["pyhyve"]["frames_per_s"] / best["qemu"]["frames_per_s"]
    print(f"pyhyve/QEMU: {ratio:.2f}x the updates per second, "
          f"{best['pyhyve']['cpu_ms_per_frame'] / best['qemu']['cpu_ms_per_frame']:.1f}x "
          f"the CPU per update")
    save("display", {"runs": runs, "best": best, "fps_ratio": ratio})


if __name__ == "__main__":
    main()
