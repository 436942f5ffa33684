"""Build the test kernels that stand in for Linux (sources in tests/guests/linux/).

  * build_bzimage(): a bzImage per the x86 boot protocol: setup.S (boot sector,
    setup header, real-mode code that reaches long mode by itself, which QEMU's
    -kernel runs) followed by the protected-mode kernel linked at 1 MiB
    (head64.S with the 64-bit entry at offset 0x200, bzimage.c, testkernel.c);
  * build_pvh(): an ELF32 kernel at 1 MiB with a XEN_ELFNOTE_PHYS32_ENTRY note
    (pvhhead.S, pvh.c, testkernel.c), entered in 32-bit protected mode.
Both print what they found on COM1 (see testkernel.c).

  * build_multiboot(): a multiboot kernel (sources in tests/guests/multiboot/),
    an ELF32 file or, with the a.out kludge's address fields, a flat binary;
    it prints what its loader handed it on the debug port (multiboot.c).
  Built with gcc, ld and
objcopy at test time and cached by a hash of their sources, like build.py's.
"""

import hashlib
import os
import shutil
import struct
import subprocess
from pathlib import Path

from build import CACHE, BuildError

SOURCES = Path(__file__).resolve().parent / "linux"
MULTIBOOT_SOURCES = Path(__file__).resolve().parent / "multiboot"
BOOT_PROTOCOL_VERSION = 0x020F
KERNEL_ADDR = 0x100000
SETUP_SYSSIZE = 0x1F4           # the setup header fields Linux's build tool fills in
SETUP_INIT_SIZE = 0x260

# Freestanding code for a CPU state no libc or loader prepared: no SSE (CR4.OSFXSR
# is off at the entry), no red zone, no CET endbr64, no calls gcc might invent
# for loops (memset idioms) beyond the memset/memcpy testkernel.c defines.
CFLAGS = ["-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-mno-red-zone", "-O2",
          "-mgeneral-regs-only", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
          "-fcf-protection=none", "-fno-tree-loop-distribute-patterns", "-Wall",
          f"-DBOOT_PROTOCOL_VERSION={BOOT_PROTOCOL_VERSION:#x}"]


def _digest(kind: str, sources: Path) -> str:
    sha = hashlib.sha256(kind.encode())
    for path in (*sorted(sources.iterdir()), Path(__file__)):
        sha.update(path.name.encode())
        sha.update(path.read_bytes())
    sha.update(repr(CFLAGS).encode())
    return sha.hexdigest()[:16]


def _run(command: list[str]) -> str:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    if result.returncode:
        raise BuildError(f"{' '.join(map(str, command))}:\n{result.stderr}")
    return result.stdout


def _symbols(elf: Path) -> dict[str, int]:
    return {parts[2]: int(parts[0], 16) for parts in
            (line.split() for line in _run(["nm", elf]).splitlines()) if len(parts) == 3}


def _build(kind: str, suffix: str, make, sources: Path = SOURCES) -> Path:
    """Run make(work) -> bytes once per content of the sources; cache the result."""
    image = CACHE / f"{kind}-{_digest(kind, sources)}{suffix}"
    if image.exists():
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"{image.name}.{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        (work / "image").write_bytes(make(work))
        os.replace(work / "image", image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image


def _compile(work: Path, bits: int, sources: list[str], folder: Path = SOURCES,
             defines: tuple[str, ...] = ()) -> list[Path]:
    objects = []
    for name in sources:
        obj = work / f"{name}.o"
        _run(["gcc", f"-m{bits}", *CFLAGS, *defines, "-I", folder, "-c", "-o", obj,
              folder / name])
        objects.append(obj)
    return objects


def _make_bzimage(work: Path) -> bytes:
    objects = _compile(work, 64, ["head64.S", "bzimage.c", "testkernel.c"])
    _run(["ld", "-m", "elf_x86_64", "-z", "noexecstack", "-T", SOURCES / "bzimage.ld",
          "-o", work / "kernel.elf", *objects])
    _run(["objcopy", "-O", "binary", work / "kernel.elf", work / "kernel.bin"])
    symbols = _symbols(work / "kernel.elf")
    if symbols.get("startup_64") != KERNEL_ADDR + 0x200:
        raise BuildError(f"bzImage: the 64-bit entry is at {symbols.get('startup_64')}, "
                         f"not {KERNEL_ADDR + 0x200:#x}")
    kernel = (work / "kernel.bin").read_bytes()

    setup_obj, = _compile(work, 32, ["setup.S"])
    _run(["ld", "-m", "elf_i386", "-z", "noexecstack", "-Ttext=0", "-e", "0",
          "-o", work / "setup.elf", setup_obj])
    _run(["objcopy", "-O", "binary", "-j", ".text", work / "setup.elf", work / "setup.bin"])
    setup = bytearray((work / "setup.bin").read_bytes())
    if len(setup) != (setup[0x1F1] + 1) * 512:
        raise BuildError(f"bzImage: setup is {len(setup)} bytes, not setup_sects + 1 sectors")
    # What Linux's arch/x86/boot/tools/build.c patches in: the protected-mode
    # part's size in 16-byte units, and the memory it needs at 1 MiB (.bss too).
    struct.pack_into("<I", setup, SETUP_SYSSIZE, (len(kernel) + 15) // 16)
    init_size = (symbols["_end"] - KERNEL_ADDR + 0xFFF) & ~0xFFF
    struct.pack_into("<I", setup, SETUP_INIT_SIZE, init_size)
    return bytes(setup) + kernel


def _make_pvh(work: Path) -> bytes:
    objects = _compile(work, 32, ["pvhhead.S", "pvh.c", "testkernel.c"])
    _run(["ld", "-m", "elf_i386", "-z", "noexecstack", "-T", SOURCES / "pvh.ld",
          "-o", work / "pvh.elf", *objects])
    return (work / "pvh.elf").read_bytes()


def build_bzimage() -> Path:
    """The bzImage test kernel (boot protocol 2.15, 64-bit entry only)."""
    return _build("bzimage", ".bzImage", _make_bzimage)


def build_pvh() -> Path:
    """The PVH test kernel (ELF32 with a XEN_ELFNOTE_PHYS32_ENTRY note)."""
    return _build("pvh", ".elf", _make_pvh)


def _make_multiboot(aout: bool):
    def make(work: Path) -> bytes:
        defines = ("-DAOUT_KLUDGE=1",) if aout else ()
        objects = _compile(work, 32, ["mbhead.S", "multiboot.c"], MULTIBOOT_SOURCES, defines)
        _run(["ld", "-m", "elf_i386", "-z", "noexecstack", "-T",
              MULTIBOOT_SOURCES / "multiboot.ld", "-o", work / "mb.elf", *objects])
        if not aout:
            return (work / "mb.elf").read_bytes()
        _run(["objcopy", "-O", "binary", work / "mb.elf", work / "mb.bin"])
        return (work / "mb.bin").read_bytes()
    return make


def build_multiboot(aout: bool = False) -> Path:
    """The multiboot test kernel: an ELF32 file, or (aout) a flat binary whose
    header gives the load addresses (flag bit 16, the a.out kludge)."""
    if aout:
        return _build("multiboot-aout", ".bin", _make_multiboot(True), MULTIBOOT_SOURCES)
    return _build("multiboot", ".elf", _make_multiboot(False), MULTIBOOT_SOURCES)


def fnv1a(data: bytes) -> int:
    """32-bit FNV-1a, the checksum the test kernels report for modules and initrds."""
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value
