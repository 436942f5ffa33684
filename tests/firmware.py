"""Debian firmware and tools the end-to-end tests boot, installed when missing."""

import os
import selectors
import shutil
import subprocess
import time

import pytest


def _install(package: str) -> None:
    """apt-get install `package` where we may (as root on Debian); failures show later."""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", package], capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def require_file(path: str, package: str) -> str:
    """The path of a file from a Debian package, installing the package as root."""
    if not os.path.exists(path):
        _install(package)
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing and Debian package {package} could not be installed")
    return path


def require_program(name: str, package: str) -> str:
    """A program from a Debian package, on PATH or in /usr/sbin (mke2fs), installing
    the package as root."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin"])
    found = shutil.which(name, path=search)
    if found is None:
        _install(package)
        found = shutil.which(name, path=search)
    if found is None:
        pytest.skip(f"{name} is missing and Debian package {package} could not be installed")
    return found


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Collect proc's stdout until `text` appears (or timeout); returns what was read."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    output = b""
    deadline = time.monotonic() + timeout
    needle = text.encode()
    while needle not in output and time.monotonic() < deadline:
        if not selector.select(max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        output += chunk
    selector.close()
    return output.decode(errors="replace")
