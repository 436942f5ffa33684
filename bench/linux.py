"""Linux: wall time from process start to LINUX-USERSPACE-OK and to power-off,
pyhyve vs QEMU (-machine pc and q35) on the same kernel and initramfs
(the quick start's, built from linux-source into its cache), with a virtio-blk disk and
virtio-rng on each; plus the exits to userspace pyhyve's vCPU took per boot,
and the writes KVM queued instead (coalesced PIO: the console's bytes, the
RTC's index port, the POST port).

The guest's /test.sh prints BENCH-DONE and waits for a line on its console;
there the exit counters are read (pyhyvectl --get-stats), then the line is
sent and the guest powers off.  Time to power-off counts the boot up to
BENCH-DONE plus the time from the line to the process's exit, so the
counter query is left out.  QEMU -machine pc runs its DSDT's _PRT into
ACPICA's loop timeout once per PCI device (tens of seconds each here): that
is what a user of QEMU's pc machine waits for too, so it stays in.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, require_program, save
from pyhyve.ctl import ControlClient

sys.path.insert(0, str(REPO / "tests"))

from linuxguest import (GuestRun, build, pyhyve_command, pyhyve_env,  # noqa: E402
                        qemu_command, with_script)

SCRIPT = "echo BENCH-DONE\nread answer\n"
TIMEOUT = 1800


def boot(command: list[str], env, log: Path, socket: Path | None) -> dict:
    run = GuestRun(command, env, log)
    try:
        userspace = run.expect("LINUX-USERSPACE-OK", TIMEOUT)
        done = run.expect("BENCH-DONE", TIMEOUT)
        exits = queued = None
        if socket is not None:
            with ControlClient(str(socket)) as client:
                answer = client.request("get-stats", vcpu=0)
                exits, queued = answer["stats"], answer["queued_writes"]
        sent = time.monotonic()
        run.send("\n")
        status = run.wait(TIMEOUT)
        poweroff = done + time.monotonic() - sent
    finally:
        run.kill()
    if status not in (0, 1):        # QEMU exits 0 on power-off, pyhyve 1 (bhyve's)
        raise SystemExit(f"{command[0]} ended with status {status}")
    return {"userspace_s": userspace, "poweroff_s": poweroff, "exits": exits,
            "queued_writes": queued}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="pyhyve,qemu-pc,qemu-q35",
                        help="comma-separated: pyhyve, qemu-pc, qemu-q35")
    args = parser.parse_args()
    require_program("qemu-system-x86_64", "qemu-system-x86")
    guest = build_guest()
    results = {}
    with tempfile.TemporaryDirectory(prefix="pyhyve-bench-linux-") as work:
        work = Path(work)
        initrd = with_script(guest, work, SCRIPT)
        disk = work / "disk.img"
        with open(disk, "wb") as image:
            image.truncate(16 << 20)
        socket = work / "ctl.sock"
        commands = {
            "pyhyve": (pyhyve_command(guest, initrd, "-s", f"2,virtio-blk,{disk}",
                                      "-s", "3,virtio-rnd", "-o", f"control.socket={socket}",
                                      name="bench-linux"), pyhyve_env(), socket),
            **{f"qemu-{machine}": (qemu_command(guest, initrd, "-drive",
                                                f"file={disk},format=raw,if=virtio",
                                                "-device", "virtio-rng-pci", machine=machine),
                                   None, None) for machine in ("pc", "q35")},
        }
        for side in args.sides.split(","):
            command, env, sock = commands[side]
            results[side] = boot(command, env, work / f"{side}.log", sock)
            figures = results[side]
            print(f"{side:9}: userspace {figures['userspace_s']:7.1f} s, power-off "
                  f"{figures['poweroff_s']:7.1f} s", flush=True)
    if "pyhyve" in results:
        exits = results["pyhyve"]["exits"]
        print(f"pyhyve exits to userspace per boot: {sum(exits.values())} ({exits}); "
              f"writes queued instead: {results['pyhyve']['queued_writes']}")
        for side in results:
            if side != "pyhyve":
                ratio = results["pyhyve"]["userspace_s"] / results[side]["userspace_s"]
                print(f"ratio pyhyve/{side} to userspace: {ratio:.2f}")
    path = save("linux", {"sides": results})
    print(f"results: {path.relative_to(REPO)}")


def build_guest():
    """The guest, built as the tests build it; a failure is one line."""
    try:
        return build()
    except BaseException as exc:             # pytest.fail outside pytest
        raise SystemExit(f"cannot build the Linux guest: {exc}") from None


if __name__ == "__main__":
    main()
