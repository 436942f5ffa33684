"""Live migration: total time and downtime of a 256 MiB guest migrated over
loopback, idle and while it dirties memory, pyhyve vs QEMU in one run.

The guest is tests/guests/memfill.S: it fills all of its RAM above 1 MiB
(so every page has to go), prints "filled", then a "." every tick; in the
"dirtying" case each tick also changes DIRTY_PAGES pages.  The rate it
dirties memory at is measured on each hypervisor before the migration
(ticks a second, times DIRTY_PAGES pages) and shown: the guest runs under
this host's emulation, at the speed it gets.
Both ends run on this machine: a destination waiting (pyhyve -R; qemu
-incoming tcp:), then the source is told to go (pyhyvectl's migrate request,
which answers when the destination runs the guest; QMP migrate and
query-migrate for QEMU), with the same downtime limit and bandwidth cap.
  total     from the request until the source reports completion
  downtime  the pause, as each source reports it (from stopping the guest
            until the destination runs it)
  sent      bytes the source sent
The best of --repeat runs counts (by total time).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, build_rom, free_port, save
from snapshot import Qmp, stop, wait_for_file_text

from pyhyve.ctl import ControlClient

MEMORY_MIB = 256
DOWNTIME_MS = 300               # QEMU's default downtime-limit
BANDWIDTH = 1 << 30             # bytes a second, for both (QEMU's default is 128 MiB/s)
DIRTY_PAGES = 64                # pages a tick in the dirtying case
RATE_SECONDS = 2.0              # how long the dirty rate is measured
TIMEOUT = 300


def dirty_rate(debug: Path, dirty_pages: int) -> float:
    """MiB a second the guest dirties: its ticks over RATE_SECONDS."""
    before = debug.read_bytes().count(b".")
    time.sleep(RATE_SECONDS)
    ticks = debug.read_bytes().count(b".") - before
    return ticks / RATE_SECONDS * dirty_pages * 4096 / (1 << 20)


def figures(elapsed: float, info: dict, rate: float) -> dict:
    """One run's figures from the source's MigrationInfo (pyhyve's is QEMU's shape)."""
    return {"total_s": elapsed, "downtime_ms": info["downtime"],
            "sent_mib": info["ram"]["transferred"] / (1 << 20), "dirty_mib_s": rate,
            "rounds": info["ram"]["dirty-sync-count"]}


def pyhyve_run(rom: Path, work: Path, env: dict, dirty_pages: int) -> dict:
    key = work / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    port = free_port()
    common = [sys.executable, "-m", "pyhyve", "-m", f"{MEMORY_MIB}M", "-l", f"bootrom,{rom}",
              "-o", f"migration.key={key}", "-o", f"migration.downtime={DOWNTIME_MS}",
              "-o", f"migration.bandwidth={BANDWIDTH}"]
    debug, sock = work / "p-src.txt", work / "p-src.sock"
    for path in (debug, work / "p-dst.txt"):
        path.unlink(missing_ok=True)
    destination = subprocess.Popen(
        [*common, "-R", f"127.0.0.1:{port}", "-l", f"debugcon,file={work / 'p-dst.txt'}",
         "-o", f"control.socket={work / 'p-dst.sock'}", "bench-mig-dst"],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    source = subprocess.Popen(
        [*common, "-l", f"debugcon,file={debug}", "-o", f"control.socket={sock}",
         "bench-mig-src"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for_file_text(debug, b"filled\n.", source)
        rate = dirty_rate(debug, dirty_pages)
        with ControlClient(str(sock)) as client:
            client.set_timeout(TIMEOUT)
            start = time.perf_counter()
            info = client.request("migrate", host="127.0.0.1", port=port)["migration"]
            elapsed = time.perf_counter() - start
        wait_for_file_text(work / "p-dst.txt", b".", destination)
    finally:
        stop(source)
        stop(destination)
    return figures(elapsed, info, rate)


def qemu_run(qemu: str, rom: Path, work: Path, dirty_pages: int) -> dict:
    port = free_port()
    debug, qmp_path = work / "q-src.txt", work / "q-src.qmp"
    for path in (debug, qmp_path, work / "q-dst.txt"):
        path.unlink(missing_ok=True)
    base = [qemu, "-machine", "pc", "-enable-kvm", "-m", str(MEMORY_MIB), "-nodefaults",
            "-display", "none", "-bios", str(rom)]
    destination = subprocess.Popen(
        base + ["-chardev", f"file,id=d,path={work / 'q-dst.txt'}",
                "-device", "isa-debugcon,iobase=0x402,chardev=d",
                "-incoming", f"tcp:127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    source = subprocess.Popen(
        base + ["-chardev", f"file,id=d,path={debug}",
                "-device", "isa-debugcon,iobase=0x402,chardev=d",
                "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qmp = Qmp(qmp_path, source)
        qmp.command("migrate-set-parameters", **{"downtime-limit": DOWNTIME_MS,
                                                 "max-bandwidth": BANDWIDTH})
        wait_for_file_text(debug, b"filled\n.", source)
        rate = dirty_rate(debug, dirty_pages)
        start = time.perf_counter()
        qmp.command("migrate", uri=f"tcp:127.0.0.1:{port}")
        qmp.wait("query-migrate", lambda r: r.get("status") in ("completed", "failed"))
        elapsed = time.perf_counter() - start
        info = qmp.command("query-migrate")
        if info["status"] != "completed":
            raise SystemExit(f"qemu: migration failed: {info}")
        qmp.close()
        wait_for_file_text(work / "q-dst.txt", b".", destination)
    finally:
        stop(source)
        stop(destination)
    return figures(elapsed, info, rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results = {"memory_mib": MEMORY_MIB, "downtime_limit_ms": DOWNTIME_MS,
               "bandwidth": BANDWIDTH, "dirty_pages_per_tick": DIRTY_PAGES}
    print(f"{MEMORY_MIB} MiB guest, every page filled; downtime limit {DOWNTIME_MS} ms, "
          f"bandwidth cap {BANDWIDTH >> 20} MiB/s (best of {args.repeat})")
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-migrate-") as tmp:
        work = Path(tmp)
        for case, pages in (("idle", 0), ("dirtying", DIRTY_PAGES)):
            rom = build_rom("memfill", FILL_END=MEMORY_MIB << 20, DIRTY_PAGES=pages)
            runs = {"pyhyve": [], "qemu": []}
            for _ in range(args.repeat):
                runs["pyhyve"].append(pyhyve_run(rom, work, env, pages))
                if qemu:
                    runs["qemu"].append(qemu_run(qemu, rom, work, pages))
            results[case] = runs
            for side, side_runs in runs.items():
                if not side_runs:
                    print(f"{case:8} {side:7}: not installed")
                    continue
                best = min(side_runs, key=lambda r: r["total_s"])
                results[f"{case}_{side}_best"] = best
                print(f"{case:8} {side:7}: total {best['total_s']:6.3f} s, downtime "
                      f"{best['downtime_ms']:5d} ms, sent {best['sent_mib']:6.1f} MiB in "
                      f"{best['rounds']} rounds, guest dirtying {best['dirty_mib_s']:.1f} MiB/s")
            if runs["qemu"]:
                p, q = results[f"{case}_pyhyve_best"], results[f"{case}_qemu_best"]
                results[f"{case}_ratio_total"] = p["total_s"] / q["total_s"]
                results[f"{case}_ratio_downtime"] = p["downtime_ms"] / max(q["downtime_ms"], 1)
                print(f"{case:8} ratio pyhyve/qemu: total {results[f'{case}_ratio_total']:.2f}, "
                      f"downtime {results[f'{case}_ratio_downtime']:.2f}  (lower is faster)")
    print(f"results: {save('migrate', results).relative_to(REPO)}")


if __name__ == "__main__":
    main()
