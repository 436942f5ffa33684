"""vm_loop speed: port-I/O exits per second.

The same guest (tests/guests/exits.S: COUNT `out` instructions to port 0x92,
System Control Port A, then power-off) runs three ways in one run:
  bare    a minimal loop of fcntl.ioctl(KVM_RUN) reading the exit reason, the
          ceiling for any Python VMM on this host;
  pyhyve  the full vm_loop: handler table, port bus, device, counters;
  qemu    qemu-system-x86_64 -enable-kvm, when QEMU is installed.
pyhyve's and QEMU's rates come from two runs of different COUNT, so that
creating and tearing down the VM cancels out; the bare loop times the loop
alone.  The bare loop and pyhyve take turns --repeat times and the best rate
of each counts: a busy spell on a shared host slows single runs by 10%.
Also printed: the time pyhyve adds to each exit beyond the bare loop, and
the same on a warm cache: both loops with KVM_RUN stood in for by a Python
call that leaves the run page as the guest's port 0x92 write left it, so no
guest runs between exits (with each part of vm_loop's port-I/O path), which
tells the Python's own cost from what running the guest between exits adds
to it (caches left cold).
Goal (issue 22): pyhyve at least 0.95x the bare loop.
"""

import argparse
import fcntl
import shutil
import struct
import subprocess
import time
import types

from common import build_rom, save

from pyhyve.boot.bootrom import load_bootrom, set_reset_state
from pyhyve.config import Config
from pyhyve.kvm import Kvm, abi
from pyhyve.layout import MiB
from pyhyve.memory import GuestMemory
from pyhyve import vcpu as vcpu_module
from pyhyve.vcpu import ExitStatus
from pyhyve.vm import VirtualMachine

PM1A_CNT = 0x404


def bare_loop(rom_path: str) -> tuple[int, float]:
    """KVM_RUN in a tight loop until the guest writes PM1a_CNT; (exits, seconds)."""
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFEFFD000)
    vm.set_identity_map_addr(0xFEFFC000)
    vm.create_irqchip()
    vm.create_pit2()
    memory = GuestMemory(vm, 16 * MiB)
    memory.map_bootrom(load_bootrom(rom_path))
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.supported_cpuid())
    set_reset_state(vcpu)
    page, fd, run = vcpu.run_page, vcpu.fd, abi.KVM_RUN
    io_port = struct.Struct("<H").unpack_from
    exits = 0
    start = time.perf_counter()
    while True:
        fcntl.ioctl(fd, run)    # as vm_loop calls it: no third argument to parse
        exits += 1
        if page[8] != abi.KVM_EXIT_IO or io_port(page, 34)[0] == PM1A_CNT:
            break
    elapsed = time.perf_counter() - start
    vcpu.close()
    vm.close()
    kvm.close()
    return exits, elapsed


def warm_cache_costs(rom_path: str, exits: int = 300_000, repeat: int = 7) -> dict[str, float]:
    """ns an exit with KVM_RUN stood in for (see the module docstring): the
    bare loop; vm_loop with a port-I/O handler that returns at once, that
    only reads the exit's port and count, that also looks the port up, and
    the real one."""
    vm = VirtualMachine(Config({"name": "bench-warm", "lpc.bootrom": rom_path}))
    thread = vm.vcpus[0]
    page = thread.kvm_vcpu.run_page
    struct.pack_into("<I", page, abi.RUN_OFFSET_EXIT_REASON, abi.KVM_EXIT_IO)
    data_offset = len(page) - 8
    vcpu_module._IO_EXIT.pack_into(page, abi.RUN_OFFSET_EXIT_UNION, abi.KVM_EXIT_IO_OUT, 1,
                                   0x92, 1, data_offset)
    page[data_offset] = 0

    def stand_in():
        """A KVM_RUN that returns at once, EXITS times; then StopIteration ends the loop."""
        left = iter(range(exits))
        return lambda fd, request: next(left)

    def bare():
        run, fd, io_port = stand_in(), thread.kvm_vcpu.fd, struct.Struct("<H").unpack_from
        try:
            while True:
                run(fd, abi.KVM_RUN)
                if page[8] != abi.KVM_EXIT_IO or io_port(page, 34)[0] == PM1A_CNT:
                    break
        except StopIteration:
            pass

    def read_only(words=thread._words, at=vcpu_module._IO_WORD):
        words[at] >> 16, words[at + 1]

    def read_and_look_up(words=thread._words, at=vcpu_module._IO_WORD,
                         look_up=thread._port_lookup):
        look_up(words[at] >> 16), words[at + 1]

    def vm_loop_with(handler):
        def run():
            thread._handlers[abi.KVM_EXIT_IO] = handler
            vcpu_module.fcntl = types.SimpleNamespace(ioctl=stand_in())
            try:
                thread._vm_loop()
            except StopIteration:
                pass
            finally:
                vcpu_module.fcntl = fcntl
        return run

    ways = {"bare loop": bare, "vm_loop, a handler that returns": vm_loop_with(lambda: None),
            "vm_loop, reading the exit": vm_loop_with(read_only),
            "vm_loop, and looking the port up": vm_loop_with(read_and_look_up),
            "vm_loop, the real handler and device": vm_loop_with(thread._exit_io)}
    best = {name: float("inf") for name in ways}
    try:
        for _ in range(repeat):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                best[name] = min(best[name], (time.perf_counter() - start) / exits * 1e9)
    finally:
        vm.close()
    return best


def pyhyve_loop(rom_path: str) -> tuple[int, float]:
    """(exits, seconds) of one VM run to power-off, start and stop included."""
    vm = VirtualMachine(Config({"name": "bench-exits", "lpc.bootrom": rom_path}))
    try:
        start = time.perf_counter()
        status = vm.run()
        elapsed = time.perf_counter() - start
        assert status == ExitStatus.POWEROFF, status
        return sum(vm.exit_stats()[0].values()), elapsed
    finally:
        vm.close()


def pyhyve_rate(count: int) -> tuple[float, int]:
    """pyhyve's exits/s from the difference of a long and a short run, and the
    long run's exits."""
    short_exits, short_time = pyhyve_loop(str(build_rom("exits", COUNT=count // 10)))
    exits, elapsed = pyhyve_loop(str(build_rom("exits", COUNT=count)))
    return (exits - short_exits) / (elapsed - short_time), exits


def qemu_rate(count: int) -> float | None:
    """QEMU's exits/s from the difference of a long and a short run."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    times = []
    for n in (count // 10, count):
        rom = build_rom("exits", COUNT=n)
        start = time.perf_counter()
        subprocess.run([qemu, "-machine", "pc", "-enable-kvm", "-m", "16", "-nodefaults",
                        "-display", "none", "-bios", str(rom), "-device",
                        f"isa-debug-exit,iobase={PM1A_CNT:#x},iosize=2"],
                       check=False, capture_output=True, timeout=600)
        times.append(time.perf_counter() - start)
    return (count - count // 10) / (times[1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000, help="exits per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each loop")
    args = parser.parse_args()
    rom = str(build_rom("exits", COUNT=args.count))
    bare_rates, pyhyve_rates = [], []
    for _ in range(args.repeat):
        bare_exits, bare_time = bare_loop(rom)
        bare_rates.append(bare_exits / bare_time)
        rate, vm_exits = pyhyve_rate(args.count)
        pyhyve_rates.append(rate)
    bare, pyhyve = max(bare_rates), max(pyhyve_rates)
    qemu = qemu_rate(args.count)
    print(f"bare KVM_RUN loop : {bare:10.0f} exits/s ({bare_exits} exits; best of "
          f"{', '.join(f'{rate:.0f}' for rate in bare_rates)})")
    print(f"pyhyve vm_loop    : {pyhyve:10.0f} exits/s ({vm_exits} exits; best of "
          f"{', '.join(f'{rate:.0f}' for rate in pyhyve_rates)})")
    if qemu:
        print(f"qemu              : {qemu:10.0f} exits/s")
    print(f"pyhyve adds {1e9 / pyhyve - 1e9 / bare:.0f} ns of Python to each exit's "
          f"{1e9 / bare:.0f} ns")
    warm = warm_cache_costs(rom)
    print("on a warm cache (KVM_RUN stood in for), ns an exit:")
    for name, ns in warm.items():
        print(f"  {name:38}{ns:6.0f}")
    print(f"  pyhyve adds {warm['vm_loop, the real handler and device'] - warm['bare loop']:.0f} "
          "ns there")
    print(f"ratio pyhyve/bare : {pyhyve / bare:.2f}  (goal >= 0.95)")
    if qemu:
        print(f"ratio pyhyve/qemu : {pyhyve / qemu:.2f}")
    path = save("exits", {"count": args.count, "repeat": args.repeat,
                          "bare_runs": bare_rates, "pyhyve_runs": pyhyve_rates,
                          "bare_exits_per_s": bare,
                          "pyhyve_exits_per_s": pyhyve, "qemu_exits_per_s": qemu,
                          "ratio_pyhyve_bare": pyhyve / bare,
                          "pyhyve_added_ns_per_exit": 1e9 / pyhyve - 1e9 / bare,
                          "warm_cache_ns_per_exit": warm,
                          "ratio_pyhyve_qemu": pyhyve / qemu if qemu else None})
    print(f"results: {path.relative_to(path.parent.parent.parent)}")


if __name__ == "__main__":
    main()
