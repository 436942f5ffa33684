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
TOOLS = ("gcc", "ld", "objcopy", "nm")


class BuildError(Exception):
    pass


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _digest(source: Path, defines: dict[str, int]) -> str:
    sha = hashlib.sha256()
    # every .inc: a guest may include any of them (longmode.inc, rom.inc)
    for path in (source, GUESTS / "rom.ld", *sorted(GUESTS.glob("*.inc")), Path(__file__)):
        sha.update(path.read_bytes())
    sha.update(repr(sorted(defines.items())).encode())
    return sha.hexdigest()[:16]


def _assemble(name: str, suffix: str, defines: dict[str, int], ld_flags: list[str],
              objcopy_flags: list[str], check) -> Path:
    """gcc -c, ld, objcopy -O binary, cached by content; `check(data)` returns
    an error message for a bad image, or None."""
    source = GUESTS / f"{name}.S"
    if not source.exists():
        raise BuildError(f"no guest source {source}")
    image = CACHE / f"{name}-{_digest(source, defines)}{suffix}"
    if image.exists():
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"{image.stem}.{os.getpid()}"
    work.mkdir(exist_ok=True)
    flags = [f"-D{key}={value}" for key, value in defines.items()]
    commands = [
        ["gcc", "-c", "-m32", "-nostdlib", "-I", str(GUESTS), *flags,
         "-o", str(work / "guest.o"), str(source)],
        ["ld", "-m", "elf_i386", *ld_flags, "-o", str(work / "guest.elf"), str(work / "guest.o")],
        ["objcopy", "-O", "binary", *objcopy_flags, str(work / "guest.elf"),
         str(work / "guest.bin")],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise BuildError(f"{' '.join(command)}:\n{result.stderr}")
    problem = check((work / "guest.bin").read_bytes())
    if problem:
        raise BuildError(f"{name}: {problem}")
    os.replace(work / "guest.elf", image.with_suffix(".elf"))
    os.replace(work / "guest.bin", image)
    shutil.rmtree(work, ignore_errors=True)
    return image


def build_rom(name: str, **defines: int) -> Path:
    """The bootrom image for tests/guests/NAME.S (built once per content)."""
    return _assemble(name, ".rom", defines, ["-T", str(GUESTS / "rom.ld")], [],
                     lambda data: None if len(data) == ROM_SIZE else
                     f"image is {len(data)} bytes, expected {ROM_SIZE}")


def rom_symbols(name: str, **defines: int) -> dict[str, int]:
    """Addresses of the labels in a built guest (from its ELF, with nm)."""
    elf = build_rom(name, **defines).with_suffix(".elf")
    output = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in
            (line.split() for line in output.splitlines()) if len(parts) == 3}


BOOT_SECTOR_SIZE = 512
BOOT_SECTOR_BASE = 0x7C00


def build_boot_sector(name: str) -> Path:
    """The 512-byte boot sector for tests/guests/NAME.S, linked at 0x7C00 where
    the BIOS loads it (built once per content)."""
    return _assemble(name, ".mbr", {}, [f"-Ttext={BOOT_SECTOR_BASE:#x}", "-e", "_start"],
                     ["-j", ".text"],
                     lambda data: None if len(data) == BOOT_SECTOR_SIZE and
                     data[-2:] == b"\x55\xaa" else
                     f"boot sector is {len(data)} bytes or lacks 55 AA")


def build_boot_program(name: str, **defines: int) -> Path:
    """tests/guests/NAME.S: a boot sector (55 AA at its end) and the sectors
    after it that it loads itself, linked at 0 to run in the segment it is
    loaded at (built once per content)."""
    def check(data: bytes) -> str | None:
        if not data or len(data) % BOOT_SECTOR_SIZE or data[510:512] != b"\x55\xaa":
            return f"program is {len(data)} bytes, not whole sectors, or lacks 55 AA"
        return None
    return _assemble(name, ".boot", defines, ["-Ttext=0", "-e", "_start"],
                     ["-j", ".text"], check)


def build_boot_disk(path: Path, name: str, **defines: int) -> Path:
    """A 1 MiB disk image that starts with build_boot_program(NAME)."""
    image = bytearray(1 << 20)
    program = build_boot_program(name, **defines).read_bytes()
    image[:len(program)] = program
    path.write_bytes(image)
    return path


SETUP16_SIZE = 4 * 512          # boot sector, two setup sectors, one "kernel" sector


def build_mbr_disk(path: Path, sector2_text: str) -> Path:
    """A 1 MiB disk image: the mbr boot sector, which reads sector 2 through
    int 13h and prints it, and SECTOR2_TEXT there."""
    image = bytearray(1 << 20)
    image[:512] = build_boot_sector("mbr").read_bytes()
    text = (sector2_text + "\r\n").encode()
    image[512:512 + len(text)] = text
    path.write_bytes(image)
    return path


def build_setup16(protocol: int = 0x0202) -> Path:
    """setup16.S: a bzImage with only a 16-bit entry, speaking boot protocol
    `protocol` (built once per content)."""
    def check(data: bytes) -> str | None:
        if len(data) != SETUP16_SIZE or data[0x202:0x206] != b"HdrS":
            return f"image is {len(data)} bytes or lacks its HdrS header"
        if data[0x238:0x23C] != (255).to_bytes(4, "little"):
            return "the setup header's fields are not at the boot protocol's offsets"
        return None
    return _assemble("setup16", ".bzImage", {"PROTOCOL": protocol},
                     ["-Ttext=0", "-e", "_start"], ["-j", ".text"], check)


def build_linux_program(name: str) -> Path:
    """tests/guests/NAME.c as a static, freestanding x86-64 Linux executable for
    the Linux test guest's initramfs (no libc; built once per content)."""
    source = GUESTS / f"{name}.c"
    program = CACHE / f"{name}-{_digest(source, {})}.elf"
    if program.exists():
        return program
    CACHE.mkdir(parents=True, exist_ok=True)
    work = program.with_suffix(f".{os.getpid()}")
    command = ["gcc", "-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-pie", "-no-pie",
               "-fno-stack-protector", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables",
               "-o", str(work), str(source)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise BuildError(f"{' '.join(command)}:\n{result.stderr}")
    os.replace(work, program)
    return program
