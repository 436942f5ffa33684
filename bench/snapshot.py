"""Snapshot: time to suspend a 256 MiB guest to a file and to restore it, pyhyve vs
QEMU in one run.

The guest is tests/guests/memfill.S: it fills all of its RAM above 1 MiB with
a non-zero pattern (so no page is left out as empty), prints "filled", then
prints a "." every few thousand loops for ever.
  suspend  pyhyve: `pyhyvectl --suspend=FILE` (called in this process), from
           the request until the snapshot is written and the command returns;
           QEMU: QMP `stop` then `migrate` to "exec:cat > FILE", from the
           `stop` until query-migrate says completed (QEMU's way to save a
           VM to a file).
  restore  from starting the process (pyhyve -r FILE; qemu -incoming
           "exec:cat FILE" then QMP `cont` once the state is in) until the
           restored guest's first "." shows on its debug console: the VM
           runs again.  For pyhyve also the restore itself (what its log
           reports: the file read and checked, memory mapped, vCPUs and
           devices set), apart from the interpreter's start-up and building
           the VM, which a restore shares with any start.
The best of --repeat runs counts; the sizes of both files are shown.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, build_rom, save

from pyhyve import ctlclient

MEMORY_MIB = 256
POLL = 0.002
TIMEOUT = 180


def wait_for_file_text(path: Path, text: bytes, proc: subprocess.Popen) -> None:
    deadline = time.perf_counter() + TIMEOUT
    while not (path.exists() and text in path.read_bytes()):
        if proc.poll() is not None or time.perf_counter() > deadline:
            raise SystemExit(f"{proc.args[0]}: no {text!r} on the debug console "
                             f"(exit {proc.returncode})")
        time.sleep(POLL)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class Qmp:
    """Just enough of QEMU's machine protocol: connect, capabilities, commands."""

    def __init__(self, path: Path, proc: subprocess.Popen):
        deadline = time.perf_counter() + TIMEOUT
        while True:             # the socket's file appears at bind(), before listen()
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise SystemExit(f"qemu exited before its QMP socket listened ({proc.returncode})")
            time.sleep(POLL)
        self.reader = self.sock.makefile("r")
        self._reply()                                # the greeting
        self.command("qmp_capabilities")

    def _reply(self) -> dict:
        while True:
            message = json.loads(self.reader.readline())
            if "event" not in message:
                return message

    def command(self, name: str, **arguments) -> dict:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
        reply = self._reply()
        if "error" in reply:
            raise SystemExit(f"qemu {name}: {reply['error']}")
        return reply["return"]

    def wait(self, query: str, done) -> None:
        deadline = time.perf_counter() + TIMEOUT
        while not done(self.command(query)):
            if time.perf_counter() > deadline:
                raise SystemExit(f"qemu: {query} never finished")
            time.sleep(POLL)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


RESTORED = re.compile(rb"restored from .* in ([0-9.]+) ms")


def pyhyve_run(rom: Path, work: Path, env: dict) -> tuple[float, float, int, float]:
    snap, sock = work / "p.snap", work / "p.sock"
    debug, restored_debug = work / "p.txt", work / "p-restored.txt"
    for path in (snap, debug, restored_debug):
        path.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "pyhyve", "-m", f"{MEMORY_MIB}M",
                             "-l", f"bootrom,{rom}", "-l", f"debugcon,file={debug}",
                             "-o", f"control.socket={sock}", "-o", f"snapshot.dir={work}",
                             "bench-snap"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for_file_text(debug, b"filled\n.", proc)
        start = time.perf_counter()
        if ctlclient.main([f"--socket={sock}", f"--suspend={snap}"]) != 0:
            raise SystemExit("pyhyvectl --suspend failed")
        suspend = time.perf_counter() - start
        proc.wait(TIMEOUT)
    finally:
        stop(proc)
    log = work / "p-restore.log"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pyhyve", "-v", "-r", str(snap),
                             "-m", f"{MEMORY_MIB}M", "-l", f"bootrom,{rom}",
                             "-l", f"debugcon,file={restored_debug}",
                             "-o", f"control.socket={work}/r.sock", "bench-snap"],
                            stdin=subprocess.DEVNULL, stderr=log.open("wb"), env=env)
    try:
        wait_for_file_text(restored_debug, b".", proc)
        restore = time.perf_counter() - start
    finally:
        stop(proc)
    found = RESTORED.search(log.read_bytes())
    if found is None:
        raise SystemExit("pyhyve logged no restore time")
    return suspend, restore, snap.stat().st_size, float(found.group(1)) / 1000


def qemu_run(qemu: str, rom: Path, work: Path) -> tuple[float, float, int]:
    snap, qmp_path = work / "q.snap", work / "q.qmp"
    debug, restored_debug = work / "q.txt", work / "q-restored.txt"
    for path in (snap, debug, restored_debug, qmp_path):
        path.unlink(missing_ok=True)
    base = [qemu, "-machine", "pc", "-enable-kvm", "-m", str(MEMORY_MIB), "-nodefaults",
            "-display", "none", "-bios", str(rom), "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(base + ["-chardev", f"file,id=d,path={debug}",
                                    "-device", "isa-debugcon,iobase=0x402,chardev=d"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qmp = Qmp(qmp_path, proc)
        wait_for_file_text(debug, b"filled\n.", proc)
        start = time.perf_counter()
        qmp.command("stop")
        qmp.command("migrate", uri=f"exec:cat > {snap}")
        qmp.wait("query-migrate", lambda r: r.get("status") in ("completed", "failed"))
        suspend = time.perf_counter() - start
        if qmp.command("query-migrate")["status"] != "completed":
            raise SystemExit("qemu: migration to the file failed")
        qmp.close()
    finally:
        stop(proc)
    qmp_path.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(base + ["-chardev", f"file,id=d,path={restored_debug}",
                                    "-device", "isa-debugcon,iobase=0x402,chardev=d",
                                    "-incoming", f"exec:cat {snap}"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qmp = Qmp(qmp_path, proc)
        qmp.wait("query-status", lambda r: r.get("status") != "inmigrate")
        qmp.command("cont")
        wait_for_file_text(restored_debug, b".", proc)
        restore = time.perf_counter() - start
        qmp.close()
    finally:
        stop(proc)
    return suspend, restore, snap.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rom = build_rom("memfill", FILL_END=MEMORY_MIB << 20)
    qemu = shutil.which("qemu-system-x86_64")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = {"pyhyve": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-snapshot-") as tmp:
        work = Path(tmp)
        for _ in range(args.repeat):
            runs["pyhyve"].append(pyhyve_run(rom, work, env))
            if qemu:
                runs["qemu"].append(qemu_run(qemu, rom, work))
    figures = {"memory_mib": MEMORY_MIB, "runs": runs}
    print(f"{MEMORY_MIB} MiB guest, every page written (best of {args.repeat})")
    for side, results in runs.items():
        if not results:
            print(f"{side:7}: not installed")
            continue
        suspend = min(r[0] for r in results)
        restore = min(r[1] for r in results)
        size = results[-1][2]
        figures.update({f"{side}_suspend_s": suspend, f"{side}_restore_s": restore,
                        f"{side}_file_mib": size / (1 << 20)})
        inside = ""
        if side == "pyhyve":
            figures["pyhyve_restore_itself_s"] = min(r[3] for r in results)
            inside = f" (the restore itself {figures['pyhyve_restore_itself_s'] * 1000:.1f} ms)"
        print(f"{side:7}: suspend {suspend:6.3f} s, restore {restore:6.3f} s{inside}, "
              f"file {size / (1 << 20):.1f} MiB")
    if runs["qemu"]:
        for what in ("suspend", "restore"):
            ratio = figures[f"pyhyve_{what}_s"] / figures[f"qemu_{what}_s"]
            figures[f"ratio_{what}"] = ratio
            print(f"ratio pyhyve/qemu, {what}: {ratio:.2f}  (lower is faster)")
    print(f"results: {save('snapshot', figures).relative_to(REPO)}")


if __name__ == "__main__":
    main()
