"""Run every benchmark in turn: `python -m bench` (from the repository root).

Each one prints pyhyve's figure beside its reference measured in the same run
and writes JSON to bench/results/.
"""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BENCHMARKS = ("exits.py", "blk.py", "net.py", "startup.py", "boot.py", "density.py",
              "snapshot.py")


def main() -> int:
    failed = 0
    for script in BENCHMARKS:
        print(f"== {script[:-3]} ==", flush=True)
        failed += subprocess.run([sys.executable, str(BENCH / script)]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
