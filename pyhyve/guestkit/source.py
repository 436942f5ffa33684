"""A Linux 6.1 kernel built from Debian's linux-source-6.1, for hosts whose KVM
emulates guest code (kvm_pvm) and so cannot boot a stock kernel.

The recipe is `linux/config-fragment` merged onto tinyconfig (what the
emulator cannot run is left out; a driver for every pyhyve device is in) and
three patches in `linux/patches/` for instructions the emulator lacks: the
INT3 self-test, SYSCALL (which it runs without leaving user mode), and an
FWAIT.  CMDLINE turns off, by their bit numbers, the CPU features such a host
advertises but cannot emulate.  The build takes 5 to 12 minutes on two cores,
once: its output and source tree stay in the cache until the recipe changes.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

from . import initramfs
from .steps import Guest, KitError, fingerprint, require_programs, run, say, step

RECIPE = Path(__file__).resolve().parent / "linux"
TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
TREE = "linux-source-6.1"
BUSYBOX = Path("/bin/busybox")
PACKAGES = ("linux-source-6.1 busybox-static gcc make flex bison bc libelf-dev libssl-dev "
            "lz4 patch xz-utils")
TOOLS = {"gcc": "gcc", "make": "make", "flex": "flex", "bison": "bison", "bc": "bc",
         "lz4": "lz4", "patch": "patch", "xz": "xz-utils", "tar": "tar"}
HEADERS = {"/usr/include/libelf.h": "libelf-dev", "/usr/include/openssl/ssl.h": "libssl-dev"}

# (word, bit) of X86_FEATURE_* in Linux's cpufeatures.h; clearcpuid= takes word*32+bit
# because this config has no feature names.
UNEMULATED_FEATURES = {
    "rdtscp": (1, 27), "pcid": (4, 17), "popcnt": (4, 23), "rdrand": (4, 30),
    "fsgsbase": (9, 0), "erms": (9, 9), "invpcid": (9, 10), "rdseed": (9, 18),
    "smap": (9, 20), "rdpid": (16, 22), "fsrm": (18, 4),
}
# noxsave: no XRSTOR in the emulator.  ERMS and FSRM only so that memcpy moves
# 8 bytes an emulated step.  lpj: skip delay-loop calibration.  panic=-1: a
# panicking guest resets (pyhyve exits 0) rather than hanging.
CMDLINE = ("console=ttyS0 earlyprintk=serial,ttyS0 noxsave noint3selftest clearcpuid="
           + ",".join(str(word * 32 + bit) for word, bit in UNEMULATED_FEATURES.values())
           + " lpj=1000000 panic=-1")
PROGRESS_EVERY = 20.0           # seconds between "compiled N files" lines
FILES_TO_COMPILE = 1420         # what this config compiles, to show progress as a share


def _check_host() -> None:
    require_programs(TOOLS)
    missing = sorted({package for header, package in HEADERS.items()
                      if not os.path.exists(header)})
    if not TARBALL.exists():
        missing.append("linux-source-6.1")
    if not BUSYBOX.exists() or _is_dynamic(BUSYBOX):
        missing.append("busybox-static")
    if missing:
        raise KitError(f"building the kernel needs: apt-get install {' '.join(missing)}")


def _is_dynamic(program: Path) -> bool:
    """Whether an ELF program has an interpreter (the initramfs has no libc)."""
    return b"ld-linux" in program.read_bytes()[:4096]


def recipe_fingerprint() -> str:
    patches = sorted((RECIPE / "patches").glob("*.patch"))
    return fingerprint((RECIPE / "config-fragment").read_bytes(),
                       *(patch.read_bytes() for patch in patches),
                       f"{TARBALL.stat().st_size}".encode())


def build(output: Path) -> Guest:
    """Build the kernel into output (unless built from this recipe already) and
    write the initramfs; returns the guest."""
    say("checking the build tools and linux-source")
    _check_host()
    output.mkdir(parents=True, exist_ok=True)
    guest = Guest(output / "bzImage", output / "vmlinux", output / "initrd.cpio", CMDLINE,
                  "source")
    stamp = output / ".stamp"
    wanted = recipe_fingerprint()
    if guest.kernel.exists() and stamp.exists() and stamp.read_text() == wanted:
        say(f"kernel built from this recipe already: {guest.kernel}")
    else:
        stamp.unlink(missing_ok=True)
        tree = output / "src"
        prepared = tree / ".pyhyve-recipe"      # unpacked, patched and configured
        if prepared.exists() and prepared.read_text() == wanted:
            say(f"going on with the build in {tree}")
        else:
            _unpack(tree)
            _patch(tree)
            _configure(tree)
            prepared.write_text(wanted)
        _compile(tree, output / "build.log")
        with step(f"copying bzImage, vmlinux, System.map and the config into {output}"):
            for name in ("arch/x86/boot/bzImage", "vmlinux", "System.map"):
                shutil.copyfile(tree / name, output / Path(name).name)
            shutil.copyfile(tree / ".config", output / "config")
        stamp.write_text(wanted)
    archive = initramfs.build(BUSYBOX)
    if not guest.initrd.exists() or guest.initrd.read_bytes() != archive:
        with step(f"writing the initramfs (busybox and pyhyve's /init): {guest.initrd}"):
            guest.initrd.write_bytes(archive)
    else:
        say(f"initramfs up to date: {guest.initrd}")
    return guest


def _unpack(tree: Path) -> None:
    with step(f"unpacking {TARBALL.name} (a minute or two)"):
        shutil.rmtree(tree, ignore_errors=True)
        scratch = tree.with_name("src.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        run(["tar", "-C", str(scratch), "-xf", str(TARBALL)])
        (scratch / TREE).rename(tree)
        scratch.rmdir()


def _patch(tree: Path) -> None:
    patches = sorted((RECIPE / "patches").glob("*.patch"))
    with step(f"applying {len(patches)} patches"):
        for patch in patches:
            run(["patch", "-p1", "-s", "-f", "-i", str(patch)], cwd=tree)


def _configure(tree: Path) -> None:
    with step("configuring: tinyconfig and pyhyve's config fragment"):
        run(["make", "ARCH=x86_64", "tinyconfig"], cwd=tree)
        run(["scripts/kconfig/merge_config.sh", "-m", ".config",
             str(RECIPE / "config-fragment")], cwd=tree)
        run(["make", "ARCH=x86_64", "olddefconfig"], cwd=tree)
        _check_config(tree / ".config")


def _check_config(config: Path) -> None:
    """Every option the fragment sets must survive olddefconfig: one that Kconfig
    dropped (a missing dependency) would fail at boot instead, far from here."""
    have = set(config.read_text().splitlines())
    lost = [line for line in (RECIPE / "config-fragment").read_text().splitlines()
            if line.startswith("CONFIG_") and line not in have]
    if lost:
        raise KitError(f"the kernel configuration dropped {', '.join(lost)}")


def _compile(tree: Path, log_path: Path) -> None:
    jobs = str(os.cpu_count() or 1)
    with step(f"compiling the kernel with {jobs} jobs (5 to 12 minutes on two cores; "
              f"log in {log_path})"), open(log_path, "w", buffering=1) as log:
        make = subprocess.Popen(["make", "ARCH=x86_64", f"-j{jobs}", "bzImage"], cwd=tree,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        compiled, last_report = 0, time.monotonic()
        for line in make.stdout:
            log.write(line)
            compiled += line.startswith("  CC ")
            if time.monotonic() - last_report >= PROGRESS_EVERY:
                share = min(99, 100 * compiled // FILES_TO_COMPILE)
                say(f"  compiled {compiled} files (about {share}%)")
                last_report = time.monotonic()
        if make.wait():
            log.flush()
            tail = "".join(log_path.read_text().splitlines(True)[-20:])
            raise KitError(f"make bzImage failed (exit status {make.returncode}); "
                           f"the end of {log_path}:\n{tail}")
