"""Resource limits (issue #10): a guest that floods the console, virtqueue
notifications or interrupts from one vCPU neither makes pyhyve's memory grow
nor starves its other vCPU.

tests/guests/flood.S floods one target from its AP, forever, while its BSP
prints "tick N" on the debug port; the BSP powers off once it has ticked
TICKS times and the AP has flooded FLOOD_TARGET iterations, so both vCPUs must
keep running for the run to end (a generous timeout, no timing asserted).
While the flood runs, pyhyve's resident set (VmRSS) is sampled; its growth
from the first sample (taken once the guest floods and, where the run
warns, once the warning is out: the first record pyhyve logs loads Python's
logging module, about 1 MB, once) must stay below half of what the least leak would keep
over the run: one byte per console byte the guest sent (a buffer or a copy of
undelivered or delivered output), one pointer (8 bytes) per notification or
interrupt (one reference per event in a list).  Each run checks that this
bound is above RSS's run-to-run noise, so that a leak would cross it.
"""

import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from build import build_rom
from guestrun import REPO
from pyhyve.devices.chardev import StdioBackend
from pyhyve.vcpu import ExitStatus

FLOOD_UART, FLOOD_NOTIFY, FLOOD_MSI = 1, 2, 3   # as in flood.S
BLOCK = 4096                  # bytes per FLOOD_UART iteration (flood.S)
TICKS = 10
WORK_LOOPS = 500_000          # a tick: about 0.2 s of emulated guest code here
CONSOLE_BLOCKS = 64           # each console flood sends at least 256 KiB
EVENTS = 50_000               # notifications or interrupts, at least
RUN_TIMEOUT = 120.0
SAMPLE_INTERVAL = 0.05       # often enough for several samples where guests run natively
MIB = 1 << 20
GROWTH_CAP = 30 * MIB         # the bound, however big the flood
NOISE_FLOOR = 128 * 1024      # RSS moves by under 32 KiB in these runs without a leak
POINTER = 8                   # bytes a leak keeps per event, at the least
DROP_WARNING = "is not taking output"
FILE_LIMIT_WARNING = "reached its limit of 65536 bytes"


@dataclass
class FloodRun:
    status: int
    ticks: list[str]
    flood: int                # iterations the AP had done when the BSP stopped
    irqs: int                 # interrupts the BSP's IDT took
    stderr: str
    rss: list[int]            # VmRSS samples in bytes, first once the flood runs
    stdout: bytes | None      # what a stdout pipe held at the end

    @property
    def growth(self) -> int:
        return max(self.rss) - self.rss[0]


def run_flood(tmp_path: Path, flood: int, *args: str, target: int,
              stdout=subprocess.DEVNULL, connect=None, warning: str | None = None,
              **defines: int) -> FloodRun:
    """Boot flood.S with FLOOD=flood on `pyhyve -c 2 ARGS`, sampling its RSS
    (from when stderr holds WARNING, if given); `connect()`, if given, runs
    once pyhyve has started."""
    rom = build_rom("flood", FLOOD=flood, TICKS=TICKS, WORK_LOOPS=WORK_LOOPS,
                    FLOOD_TARGET=target, **defines)
    debug = tmp_path / "flood.debug"
    with open(tmp_path / "stderr", "w+") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyhyve", "-c", "2", *args, "-l", f"bootrom,{rom}",
             "-l", f"debugcon,file={debug}", "flood"],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=errors,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            if connect is not None:
                connect()
            rss = _sample_rss(proc, debug, Path(errors.name), warning)
            proc.wait(RUN_TIMEOUT)
            output = proc.stdout.read() if proc.stdout is not None else None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors.seek(0)
        stderr = errors.read()
    lines = debug.read_text().splitlines()
    counts = {key: int(value) for key, _, value in (line.partition(" ") for line in lines)
              if key in ("flood", "irqs")}
    assert "flood" in counts, f"the BSP never finished: {lines[-3:]}\n{stderr}"
    return FloodRun(proc.returncode, [line for line in lines if line.startswith("tick ")],
                    counts["flood"], counts["irqs"], stderr, rss, output)


def _sample_rss(proc: subprocess.Popen, debug: Path, stderr: Path,
                warning: str | None) -> list[int]:
    """VmRSS every SAMPLE_INTERVAL from when the guest says it floods (and
    stderr holds WARNING) until pyhyve exits."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline and \
            not (debug.exists() and "flooding" in debug.read_text() and
                 (warning is None or warning in stderr.read_text())):
        time.sleep(0.02)
    samples = []
    while proc.poll() is None and time.monotonic() < deadline:
        rss = _vm_rss(proc.pid)
        if rss is None:
            break
        samples.append(rss)
        time.sleep(SAMPLE_INTERVAL)
    return samples


def _vm_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None                 # gone, or a zombie


def check_run(run: FloodRun, leak: int, target: int) -> None:
    """Both vCPUs ran to the end, cleanly, and memory grew by less than half of
    `leak`, the least a leak would have kept."""
    assert run.status == ExitStatus.POWEROFF, run.stderr
    assert len(run.ticks) >= TICKS
    assert run.ticks == [f"tick {n}" for n in range(1, len(run.ticks) + 1)]
    assert run.flood >= target
    assert "Traceback" not in run.stderr, run.stderr
    assert len(run.rss) >= 3, "too few RSS samples"
    bound = min(GROWTH_CAP, leak // 2)
    assert bound >= NOISE_FLOOR, f"a flood this small ({leak} bytes of leak) proves nothing"
    print(f"flood {run.flood} ticks {len(run.ticks)} irqs {run.irqs} samples {len(run.rss)} "
          f"rss {run.rss[0] // 1024} KiB growth {run.growth // 1024} KiB bound {bound // 1024} KiB")
    assert run.growth < bound, f"RSS grew {run.growth} bytes (bound {bound}): {run.rss}"


def drain(client: socket.socket) -> int:
    """Bytes the host end had received, read after pyhyve closed it."""
    client.settimeout(10)
    total = 0
    while chunk := client.recv(1 << 16):
        total += len(chunk)
    return total


def connect_when_listening(family: int, address, timeout: float = 30) -> socket.socket:
    client = socket.socket(family, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.connect(address)
            return client
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                client.close()
                raise
            time.sleep(0.01)


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the console ---------------------------------------------------------------------
def test_console_flood_to_a_unix_client_that_never_reads(needs_kvm, tmp_path):
    path = str(tmp_path / "com1.sock")
    clients = []
    run = run_flood(tmp_path, FLOOD_UART, "-l", f"com1,unix={path}", target=CONSOLE_BLOCKS,
                    connect=lambda: clients.append(connect_when_listening(socket.AF_UNIX, path)),
                    warning=DROP_WARNING)
    with clients[0] as client:
        received = drain(client)
    sent = run.flood * BLOCK
    check_run(run, sent, CONSOLE_BLOCKS)
    assert 0 < received < sent              # the client got some, the rest was dropped
    assert run.stderr.count(DROP_WARNING) == 1, run.stderr


def test_console_flood_to_a_tcp_client_that_never_reads(needs_kvm, tmp_path):
    # The kernel takes megabytes before a loopback TCP client's window closes,
    # so this run may drop nothing; it shows nothing piles up in pyhyve meanwhile.
    port = free_tcp_port()
    clients = []
    run = run_flood(tmp_path, FLOOD_UART, "-l", f"com1,tcp=127.0.0.1:{port}",
                    target=CONSOLE_BLOCKS, connect=lambda: clients.append(
                        connect_when_listening(socket.AF_INET, ("127.0.0.1", port))))
    with clients[0] as client:
        received = drain(client)
    check_run(run, run.flood * BLOCK, CONSOLE_BLOCKS)
    assert received > 0


def test_console_flood_to_a_file_stops_at_its_limit(needs_kvm, tmp_path):
    """A guest printing without end must not fill the host's disk: the file and
    the debug port's file stop at console.file_limit, and the drop is said once."""
    path = tmp_path / "com1.log"
    run = run_flood(tmp_path, FLOOD_UART, "-l", f"com1,file={path}",
                    "-o", "console.file_limit=64K", target=CONSOLE_BLOCKS,
                    warning=FILE_LIMIT_WARNING)
    sent = run.flood * BLOCK
    check_run(run, sent, CONSOLE_BLOCKS)
    assert sent > 64 * 1024 and path.stat().st_size == 64 * 1024
    assert run.stderr.count(FILE_LIMIT_WARNING) == 1, run.stderr


def test_console_flood_to_stdout_nobody_reads(needs_kvm, tmp_path):
    run = run_flood(tmp_path, FLOOD_UART, "-l", "com1,stdio", target=CONSOLE_BLOCKS,
                    stdout=subprocess.PIPE, warning=DROP_WARNING)
    sent = run.flood * BLOCK
    check_run(run, sent, CONSOLE_BLOCKS)
    assert 0 < len(run.stdout) < sent       # the pipe filled, the rest was dropped
    assert run.stderr.count(DROP_WARNING) == 1, run.stderr


def test_console_flood_to_a_pty_nobody_attached_to(needs_kvm, tmp_path):
    """`-l com1,pty` with no client: the pty's buffer fills, the rest is dropped
    at once (said once), and neither vCPU waits."""
    run = run_flood(tmp_path, FLOOD_UART, "-l", "com1,pty", target=CONSOLE_BLOCKS,
                    warning=DROP_WARNING)
    check_run(run, run.flood * BLOCK, CONSOLE_BLOCKS)
    assert run.stderr.startswith("com1: /dev/pts/"), run.stderr
    assert run.stderr.count(DROP_WARNING) == 1, run.stderr


def test_stdio_output_to_a_stuck_pipe_is_dropped_and_resumes(caplog):
    out_read, out_write = os.pipe()
    in_read, in_write = os.pipe()
    backend = StdioBackend("com1", in_read, out_write)
    chunk = b"x" * BLOCK

    def flood():                                       # 1 MiB; a blocking write never returns
        writer = threading.Thread(target=lambda: [backend.write(chunk) for _ in range(256)],
                                  daemon=True)
        writer.start()
        writer.join(RUN_TIMEOUT)
        assert not writer.is_alive(), "a write to a full pipe blocked"

    capacity = 0
    with caplog.at_level(logging.WARNING, logger="pyhyve.devices.chardev"):
        flood()
        while select.select([out_read], [], [], 0)[0]:
            capacity += len(os.read(out_read, 1 << 16))
        backend.write(b"after")                        # read again: output flows again
        assert os.read(out_read, 100) == b"after"
        flood()
    assert capacity > 0
    assert backend.dropped >= 2 * 256 * BLOCK - 2 * capacity
    assert [r.getMessage() for r in caplog.records] == \
        [f"com1: stdout {DROP_WARNING}; dropping what does not fit"]
    backend.close()
    for fd in (out_read, out_write, in_read, in_write):
        os.close(fd)


def test_stdio_output_from_several_vcpus_at_once():
    out_read, out_write = os.pipe()
    in_read, in_write = os.pipe()
    backend = StdioBackend("com1", in_read, out_write)
    writers = [threading.Thread(target=lambda: [backend.write(b"y") for _ in range(20000)])
               for _ in range(4)]
    for writer in writers:
        writer.start()
    received = 0
    while any(writer.is_alive() for writer in writers) or \
            select.select([out_read], [], [], 0)[0]:
        if select.select([out_read], [], [], 0.01)[0]:
            received += len(os.read(out_read, 1 << 16))
    for writer in writers:
        writer.join()
    assert received + backend.dropped == 4 * 20000     # each byte written or counted
    backend.close()
    for fd in (out_read, out_write, in_read, in_write):
        os.close(fd)


# --- virtqueue notifications ------------------------------------------------------------
@pytest.mark.parametrize("driver_ok", [1, 0], ids=["live-queue", "no-driver"])
def test_virtqueue_notify_flood(needs_kvm, tmp_path, driver_ok):
    # A live queue's notify port is an ioeventfd: KVM counts the writes and the
    # I/O thread wakes for many at once.  Without DRIVER_OK every write exits.
    run = run_flood(tmp_path, FLOOD_NOTIFY, "-s", "4,virtio-rnd", target=EVENTS,
                    DRIVER_OK=driver_ok)
    check_run(run, run.flood * POINTER, EVENTS)


# --- interrupts ---------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [0, 1], ids=["taken", "pending"])
def test_msi_flood(needs_kvm, tmp_path, masked):
    run = run_flood(tmp_path, FLOOD_MSI, "-s", "4,pci-testdev", target=EVENTS, MASKED=masked)
    check_run(run, run.flood * POINTER, EVENTS)
    if masked:
        assert run.irqs == 0
    else:
        assert run.irqs > 0
