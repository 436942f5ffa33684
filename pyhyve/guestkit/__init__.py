"""`pyhyve-guest`: a Linux guest for pyhyve, made and booted in one command.

    pyhyve-guest run            make the guest if needed, then boot it to a shell
    pyhyve-guest build [DIR]    make it, print the pyhyve command that boots it

The kernel is the one this host can run (host.py): Debian's cloud kernel where
KVM runs guest code natively, else one built from linux-source (source.py).
The userspace is busybox (initramfs.py).  `run` boots it with its console on
the terminal, a virtio disk (formatted and mounted at /mnt on first boot),
user-mode networking configured by DHCP, and virtio-rng; `poweroff` in the
guest ends the VM (exit status 1, bhyve's "powered off").  Everything is
cached under ~/.cache/pyhyve/guest (PYHYVE_GUEST_CACHE) and made only once.

Each step says on stderr what it does and how long it took; the pyhyve
command goes to stdout.  Exit status, aligned with pyhyve's: `build` 0 when the
guest is made; `run` pyhyve's own once the guest boots (0 reset, 1 powered
off, 2 halted, 3 triple fault, 4 error); 4 when the guest cannot be made, the
command line is wrong (one line says why) or a signal stops the making.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from . import cloud, host, source
from .initramfs import READY
from .steps import Guest, KitError, say

__all__ = ["READY", "Guest", "KitError", "default_cache", "make", "main"]

DISK_SIZE = 256 << 20
KINDS = ("auto", "cloud", "source")


def default_cache() -> Path:
    if "PYHYVE_GUEST_CACHE" in os.environ:
        return Path(os.environ["PYHYVE_GUEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "pyhyve" / "guest"


def make(cache: Path, kind: str = "auto") -> Guest:
    """The guest for this host (or of the given kind), made into `cache`."""
    if kind == "auto":
        kind = _host_kind(cache)
    if kind == "cloud":
        return _cloud(cache)
    return source.build(cache / "source")


def _cloud(cache: Path) -> Guest:
    """Debian's cloud kernel, downloaded once (the packages change rarely)."""
    guest = cloud.guest(cache / "cloud")
    if guest.kernel.exists() and guest.initrd.exists():
        say(f"Debian's cloud kernel downloaded already: {guest.kernel}")
        return guest
    return cloud.build(cache / "cloud")


def _host_kind(cache: Path) -> str:
    """"source" where KVM emulates guest code, else "cloud"; a trial boot's
    answer is kept for this host kernel."""
    why = host.emulated_by_module()
    if why:
        say(f"{why}; using a kernel built from linux-source")
        return "source"
    release = os.uname().release
    remembered = cache / "host-kind"
    if remembered.exists():
        kind, _, for_release = remembered.read_text().partition(" ")
        if for_release.strip() == release and kind in ("cloud", "source"):
            return kind
    guest = _cloud(cache)
    say("trying Debian's cloud kernel on this host ...")
    native, what = host.trial_boot(guest, host.pyhyve_program())
    kind = "cloud" if native else "source"
    say(f"{what}; using {'it' if native else 'a kernel built from linux-source'}")
    cache.mkdir(parents=True, exist_ok=True)
    remembered.write_text(f"{kind} {release}\n")
    return kind


def pyhyve_command(guest: Guest, disk: Path | None = None, name: str = "linux0") -> list[str]:
    """The pyhyve command line that boots `guest` with its console on stdio.
    Under emulation one vCPU boots fastest; natively two show SMP."""
    cpus = "2" if guest.kind == "cloud" else "1"
    devices = ["-s", "3,virtio-net,slirp", "-s", "4,virtio-rnd"]
    if disk is not None:
        devices = ["-s", f"2,virtio-blk,{disk}", *devices]
    return [*host.pyhyve_program(), "-m", "256M", "-c", cpus, "-l", "com1,stdio", *devices,
            "-f", f"kexec,{guest.kernel},{guest.initrd},{guest.cmdline}", name]


def _disk(cache: Path) -> Path:
    """The guest's disk: sparse and blank at first (the guest formats it)."""
    disk = cache / "disk.img"
    if not disk.exists():
        with open(disk, "wb") as image:
            image.truncate(DISK_SIZE)
    return disk


ERROR = 4                       # pyhyve's (and bhyve's) exit status for an error


class _Parser(argparse.ArgumentParser):
    """argparse, speaking as pyhyve and pyhyvectl do: a usage error is one line,
    "pyhyve-guest: ... (pyhyve-guest --help for help)", and exit status 4."""

    def error(self, message: str):
        print(f"pyhyve-guest: {message} (pyhyve-guest --help for help)", file=sys.stderr)
        raise SystemExit(ERROR)


def parser() -> argparse.ArgumentParser:
    from .. import __version__
    common = _Parser(add_help=False)
    common.add_argument("--kernel", choices=KINDS, default="auto",
                        help="cloud: Debian's cloud kernel; source: built from linux-source; "
                             "auto (default): what this host can run")
    top = _Parser(prog="pyhyve-guest", description=__doc__.splitlines()[0],
                  epilog="Exit status: build 0 when the guest is made; run pyhyve's once "
                         "the guest boots (0 reset, 1 powered off, 2 halted, 3 triple "
                         "fault, 4 error); 4 when the guest cannot be made or the command "
                         "line is wrong.")
    top.add_argument("--version", action="version", version=f"pyhyve-guest {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="{build,run}")
    build_parser = commands.add_parser("build", parents=[common],
                                       help="make the guest, print how to boot it")
    build_parser.add_argument("directory", type=Path, nargs="?", default=None,
                              help=f"where (default {default_cache()})")
    run_parser = commands.add_parser("run", parents=[common],
                                     help="make the guest if needed and boot it")
    run_parser.add_argument("--name", default="linux0", help="the VM's name (default linux0)")
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:       # --help, --version (0), or a usage error (ERROR)
        return exc.code if isinstance(exc.code, int) else ERROR
    cache = getattr(args, "directory", None) or default_cache()
    try:
        guest = make(cache, args.kernel)
        disk = _disk(cache) if args.command == "run" else None
    except KitError as exc:
        print(f"pyhyve-guest: {exc}", file=sys.stderr)
        return ERROR
    except OSError as exc:
        print(f"pyhyve-guest: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        print("pyhyve-guest: SIGINT while making the guest; stopped", file=sys.stderr)
        return ERROR
    say(f"the guest is ready: kernel {guest.kernel}, initramfs {guest.initrd}"
        + (f", disk {disk}" if disk else ""))
    command = pyhyve_command(guest, disk, getattr(args, "name", "linux0"))
    print(shlex.join(command), flush=True)
    if args.command == "build":
        return 0
    say("booting it; the guest's console is this terminal")
    os.execv(command[0], command)
