"""Which kernel this host can run: whether its KVM runs guest code natively.

Where KVM has hardware virtualization (VT-x, SVM), Debian's cloud kernel boots
in seconds.  Where it runs guest code in its instruction emulator (the
kvm_pvm module; nested hosts without VT-x), a stock kernel stops on the first
instruction the emulator lacks (XRSTOR, INT3, SYSCALL from user mode), so the
kit builds its own kernel.  The module decides at once; elsewhere a short
trial boot of the cloud kernel does, and the answer is kept per host kernel.
"""

import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .initramfs import READY
from .steps import Guest

PVM_MODULE = Path("/sys/module/kvm_pvm")
TRIAL_SECONDS = 90.0            # natively the cloud kernel reaches its shell in a few seconds


def emulated_by_module() -> str | None:
    """Why guest code is emulated here, if a loaded module says so."""
    if PVM_MODULE.exists():
        return "the kvm_pvm module is loaded: this host's KVM emulates guest code"
    return None


def trial_boot(guest: Guest, pyhyve: list[str]) -> tuple[bool, str]:
    """Boot `guest` until its shell is ready, pyhyve stops, or TRIAL_SECONDS
    pass; (whether it ran natively, what happened)."""
    with tempfile.TemporaryDirectory() as work:
        command = [*pyhyve, "-m", "256M", "-l", "com1,stdio",
                   "-o", f"control.socket={work}/trial.sock",
                   "-f", f"kexec,{guest.kernel},{guest.initrd},{guest.cmdline}",
                   f"pyhyve-guest-trial-{os.getpid()}"]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        started = time.monotonic()
        try:
            console, ended = _read_until(proc, READY.encode(), started + TRIAL_SECONDS)
            seconds = time.monotonic() - started
            if READY.encode() in console:
                return True, f"Debian's cloud kernel reached its shell in {seconds:.0f} s"
            if ended:
                proc.wait(30)               # its console closed: it is exiting
                errors = proc.stderr.read().decode(errors="replace").strip().splitlines()
                why = errors[0] if errors else f"exit status {proc.returncode}"
                return False, f"Debian's cloud kernel stopped after {seconds:.0f} s ({why})"
            return False, f"Debian's cloud kernel did not reach its shell in {TRIAL_SECONDS:.0f} s"
        finally:
            proc.kill()
            proc.wait()


def _read_until(proc: subprocess.Popen, marker: bytes, deadline: float) -> tuple[bytes, bool]:
    """The console output until `marker`, its end, or `deadline`; and whether it ended."""
    output = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while marker not in output:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                return bytes(output), True
            output += data
    return bytes(output), False


def pyhyve_program() -> list[str]:
    """The pyhyve beside this pyhyve-guest (the same install), else this Python's."""
    beside = Path(sys.argv[0]).resolve().parent / "pyhyve"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "pyhyve"]
