"""Where vm_loop's time an exit goes while a guest runs between exits.

bench/exits.py finds that pyhyve adds three to four times as much to an
exit with the guest running as on a warm cache.  This benchmark splits that
real cost, on the same guest (tests/guests/exits.S: port 0x92 COUNT times),
by timing the CPU the looping thread takes an exit (RUSAGE_THREAD: the time
the thread waits for anything is left out) in four loops, taking turns:
  bare           bench/exits.py's bare loop, in the main thread;
  bare, vCPU     the same loop run in a pyhyve vCPU thread, on pyhyve's VM
                 with its other threads (flush, halt watcher) running;
  vm_loop        pyhyve as it is;
  folded         vm_loop with the one-byte port write handled inside the
                 loop rather than by the handler table's port-I/O handler:
                 what bypassing bhyve's table would save, which pyhyve does
                 not do.
Medians over --repeat runs, as ns an exit over the bare loop's.
"""

import argparse
import fcntl
import resource
import statistics
import struct
import time

from common import build_rom, save
from exits import PM1A_CNT, bare_loop

from pyhyve.config import Config
from pyhyve.kvm import abi
from pyhyve.vcpu import ExitStatus
from pyhyve.vm import VirtualMachine

OUT_ONE_BYTE = abi.KVM_EXIT_IO_OUT | 1 << 8    # the first word of kvm_run.io, port aside


def thread_cpu_ns() -> int:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


def bare_loop_in(thread):
    """bench/exits.py's bare loop, as thread's vm_loop (serving the halt
    watcher's requests when it kicks the vCPU)."""
    page, fd = thread._page, thread.kvm_vcpu.fd
    io_port = struct.Struct("<H").unpack_from

    def loop():
        while True:
            try:
                fcntl.ioctl(fd, abi.KVM_RUN)
            except InterruptedError:
                thread._serve_requests()
                continue
            thread.exit_counts[abi.KVM_EXIT_IO] += 1
            if page[8] != abi.KVM_EXIT_IO or io_port(page, 34)[0] == PM1A_CNT:
                return ExitStatus.POWEROFF
    return loop


def folded_loop_in(thread):
    """vm_loop with one-byte port writes handled in the loop; every other
    exit goes to the table as in vm_loop."""
    page, fd, vm = thread._page, thread.kvm_vcpu.fd, thread.vm
    handlers, counts, look_up = thread._handlers, thread.exit_counts, thread._port_lookup
    page_size = len(page)

    def loop():
        with memoryview(page).cast("I") as words:
            while True:
                try:
                    fcntl.ioctl(fd, abi.KVM_RUN)
                except InterruptedError:
                    if vm.stopping:
                        return None
                    thread._serve_requests()
                    continue
                reason = words[2]
                counts[reason] += 1
                if reason == abi.KVM_EXIT_IO:
                    io = words[8]
                    entry = look_up(io >> 16)
                    if entry is not None and io & 0xFFFF == OUT_ONE_BYTE and words[9] == 1 \
                            and words[10] < page_size:
                        try:
                            entry.write((io >> 16) - entry.base, 1, page[words[10]])
                        except Exception:
                            vm.device_failed(entry.name, io >> 16)
                        continue
                verdict = handlers[reason]()
                if verdict is not None:
                    return verdict
    return loop


def pyhyve_cpu(rom: str, loop_in) -> float:
    """CPU ns an exit of pyhyve's vCPU thread, its loop replaced by
    loop_in(thread) unless that is None."""
    vm = VirtualMachine(Config({"name": "bench-cold", "lpc.bootrom": rom}))
    thread = vm.vcpus[0]
    loop = thread._vm_loop if loop_in is None else loop_in(thread)
    spent = []

    def timed():
        start = thread_cpu_ns()
        try:
            return loop()
        finally:
            spent.append(thread_cpu_ns() - start)
    thread._vm_loop = timed
    try:
        vm.run()
        return spent[0] / sum(vm.exit_stats()[0].values())
    finally:
        vm.close()


def bare_cpu(rom: str) -> float:
    start = thread_cpu_ns()
    exits, _ = bare_loop(rom)
    return (thread_cpu_ns() - start) / exits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60_000, help="exits per run")
    parser.add_argument("--repeat", type=int, default=30, help="runs of each loop")
    args = parser.parse_args()
    rom = str(build_rom("exits", COUNT=args.count))
    ways = {"bare": lambda: bare_cpu(rom),
            "bare, vCPU": lambda: pyhyve_cpu(rom, bare_loop_in),
            "vm_loop": lambda: pyhyve_cpu(rom, None),
            "folded": lambda: pyhyve_cpu(rom, folded_loop_in)}
    runs = {name: [] for name in ways}
    start = time.perf_counter()
    for _ in range(args.repeat):
        for name, way in ways.items():
            runs[name].append(way())
    median = {name: statistics.median(values) for name, values in runs.items()}
    print(f"CPU an exit of the looping thread, median of {args.repeat} runs "
          f"({time.perf_counter() - start:.0f} s):")
    for name, ns in median.items():
        print(f"  {name:12}{ns:8.0f} ns  {ns - median['bare']:+6.0f}  "
              f"ratio {median['bare'] / ns:.3f}")
    path = save("exits_cold", {"count": args.count, "repeat": args.repeat,
                               "cpu_ns_per_exit_runs": runs,
                               "cpu_ns_per_exit_median": median})
    print(f"results: {path.relative_to(path.parent.parent.parent)}")


if __name__ == "__main__":
    main()
