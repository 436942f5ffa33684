"""Shared by the benchmarks: test-guest builds and result files."""

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests" / "guests"))
sys.path.insert(0, str(REPO))

from build import build_rom  # noqa: E402  (tests/guests is not a package)


def require_program(name: str, package: str) -> str:
    """A program from a Debian package (PATH or /usr/sbin), installed with apt-get
    where it is missing and we are root: the benchmarks' own set-up step."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin"])
    found = shutil.which(name, path=search)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", package], capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        found = shutil.which(name, path=search)
    if found is None:
        raise SystemExit(f"{name} is missing: apt-get install {package}")
    return found


def save(name: str, figures: dict) -> Path:
    """Write one benchmark's figures as JSON, stamped with date and machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": platform.node(), "python": platform.python_version(), **figures}
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


__all__ = ["build_rom", "require_program", "save", "REPO"]
