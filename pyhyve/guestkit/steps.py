"""What every way of making the guest shares: the result, errors, and steps
that say what they do and how long they took (a kernel build takes minutes,
a download seconds; a silent terminal for that long looks hung)."""

import contextlib
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..record import record


class KitError(Exception):
    """Making the guest failed; the message says which step and what to do."""


@record
class Guest:
    """A bootable guest: kernel, initramfs and the command line they need."""
    kernel: Path
    vmlinux: Path | None        # with symbols, for gdb (the source build only)
    initrd: Path
    cmdline: str
    kind: str                   # "cloud" or "source"


def say(text: str) -> None:
    print(f"pyhyve-guest: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(what: str):
    """Announce a step, then say how long it took (or that it failed)."""
    say(f"{what} ...")
    started = time.monotonic()
    try:
        yield
    except BaseException:
        say(f"{what}: failed after {_duration(time.monotonic() - started)}")
        raise
    say(f"{what}: done in {_duration(time.monotonic() - started)}")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds) // 60} min {int(seconds) % 60} s"


def run(command: list[str], cwd: Path | None = None, show: bool = False) -> str:
    """Run a tool; its output goes to the terminal when `show` (apt's progress),
    else is kept for the error message."""
    result = subprocess.run(command, cwd=cwd, text=True, stdout=None if show else subprocess.PIPE,
                            stderr=None if show else subprocess.PIPE)
    if result.returncode:
        detail = "" if show else f": {(result.stderr or result.stdout).strip()[-400:]}"
        raise KitError(f"{' '.join(command)} failed (exit status {result.returncode}){detail}")
    return result.stdout or ""


def require_programs(programs: dict[str, str]) -> None:
    """programs: name -> the Debian package that has it."""
    missing = sorted({package for program, package in programs.items()
                      if shutil.which(program) is None})
    if missing:
        raise KitError(f"missing tools; install them with: apt-get install {' '.join(missing)}")


def fingerprint(*parts: bytes) -> str:
    """A short digest of a recipe's inputs: a cached result is reused only while
    it matches."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]
