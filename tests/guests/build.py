"""Build the test guests in this folder into bootrom images, with a cache.

Each NAME.S is assembled with `gcc -c` (so it may use the C preprocessor),
linked with rom.ld into a 64 KiB image ending at 4 GiB and flattened with
objcopy.  Images are cached by a hash of their sources.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

GUESTS = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("PYHYVE_GUEST_CACHE",
                            Path.home() / ".cache" / "pyhyve" / "guests"))
ROM_SIZE = 64 * 1024
TOOLS = ("gcc", "ld", "objcopy")


class BuildError(Exception):
    pass


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _digest(source: Path, defines: dict[str, int]) -> str:
    sha = hashlib.sha256()
    for path in (source, GUESTS / "rom.ld", GUESTS / "rom.inc", Path(__file__)):
        sha.update(path.read_bytes())
    sha.update(repr(sorted(defines.items())).encode())
    return sha.hexdigest()[:16]


def build_rom(name: str, **defines: int) -> Path:
    """The bootrom image for tests/guests/NAME.S (built once per content)."""
    source = GUESTS / f"{name}.S"
    if not source.exists():
        raise BuildError(f"no guest source {source}")
    image = CACHE / f"{name}-{_digest(source, defines)}.rom"
    if image.exists():
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"{image.stem}.{os.getpid()}"
    work.mkdir(exist_ok=True)
    flags = [f"-D{key}={value}" for key, value in defines.items()]
    commands = [
        ["gcc", "-c", "-m32", "-nostdlib", "-I", str(GUESTS), *flags,
         "-o", str(work / "guest.o"), str(source)],
        ["ld", "-m", "elf_i386", "-T", str(GUESTS / "rom.ld"),
         "-o", str(work / "guest.elf"), str(work / "guest.o")],
        ["objcopy", "-O", "binary", str(work / "guest.elf"), str(work / "guest.bin")],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise BuildError(f"{' '.join(command)}:\n{result.stderr}")
    data = (work / "guest.bin").read_bytes()
    if len(data) != ROM_SIZE:
        raise BuildError(f"{name}: image is {len(data)} bytes, expected {ROM_SIZE}")
    os.replace(work / "guest.bin", image)
    shutil.rmtree(work, ignore_errors=True)
    return image
