"""Shared by the benchmarks: test-guest builds and result files."""

import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests" / "guests"))
sys.path.insert(0, str(REPO))

from build import build_rom  # noqa: E402  (tests/guests is not a package)


def save(name: str, figures: dict) -> Path:
    """Write one benchmark's figures as JSON, stamped with date and machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": platform.node(), "python": platform.python_version(), **figures}
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


__all__ = ["build_rom", "save", "REPO"]
