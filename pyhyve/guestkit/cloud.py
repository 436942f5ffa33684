"""`pyhyve-guest build DIR`: a Linux guest for pyhyve from Debian's packages.

It downloads the distribution's cloud kernel (linux-image-cloud-amd64) and
busybox-static with apt-get, and writes DIR/vmlinuz and DIR/initrd.img: an
initramfs whose /init loads the virtio modules the kernel ships (virtio_pci,
virtio_blk, virtio_net, virtio_console, virtio_rng, and what they depend on,
read from each module's .modinfo) and starts a shell on ttyS0.  The guest
needs no network when it runs.  Then:

    pyhyve -m 512M -c 2 -l com1,stdio -s 2,virtio-rnd \\
        -f kexec,DIR/vmlinuz,DIR/initrd.img,"console=ttyS0" linux0
"""

import argparse
import io
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio-rng")
READY = "pyhyve guest ready"
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do
    insmod /modules/$module.ko 2>/dev/null
done
echo "%s"
exec setsid cttyhack sh
""" % READY


class KitError(Exception):
    """Building the guest failed; the message says which step."""


def _run(command: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise KitError(f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}")
    return result.stdout


def _kernel_package() -> str:
    """The versioned image package the linux-image-cloud-amd64 metapackage depends on."""
    for line in _run(["apt-cache", "depends", KERNEL_PACKAGE]).splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    raise KitError(f"apt-cache knows no kernel behind {KERNEL_PACKAGE}")


def _modinfo_depends(module: bytes) -> list[str]:
    """The depends= list in a kernel module's .modinfo ELF section."""
    shoff, = struct.unpack_from("<Q", module, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", module, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", module, shoff + i * shentsize)
                for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    for name, _, _, _, offset, size in sections:
        end = module.index(b"\0", names_offset + name)
        if module[names_offset + name:end] == b".modinfo":
            for item in module[offset:offset + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
    return []


def _collect_modules(module_dir: Path) -> dict[str, bytes]:
    """The wanted modules and their dependencies, in load order."""
    files = {}
    for path in module_dir.rglob("*.ko*"):
        name = path.name.split(".ko")[0]
        files[name.replace("-", "_")] = path
    order: dict[str, bytes] = {}

    def add(name: str) -> None:
        key = name.replace("-", "_")
        if key in order or key not in files:
            return                  # loaded already, or built into the kernel
        data = files[key].read_bytes()
        if files[key].suffix == ".xz":
            data = lzma.decompress(data)
        for dependency in _modinfo_depends(data):
            add(dependency)
        order[key] = data

    for module in MODULES:
        add(module)
    return order


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (what the kernel unpacks as an initramfs)."""
    out = io.BytesIO()
    for inode, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        out.write(header.encode() + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def build(output: Path) -> tuple[Path, Path]:
    """Download the packages and write output/vmlinuz and output/initrd.img."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise KitError(f"{tool} is missing: pyhyve-guest needs Debian's package tools")
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        os.chmod(work_dir, 0o755)           # apt's download user must write here
        _run(["apt-get", "download", _kernel_package(), BUSYBOX_PACKAGE], cwd=work_dir)
        root = work_dir / "root"
        for deb in work_dir.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        module_dirs = sorted((root / "lib" / "modules").glob("*"))
        busybox = root / "bin" / "busybox"
        if not kernels or not module_dirs or not busybox.exists():
            raise KitError("the downloaded packages lack a kernel, modules or busybox")
        modules = _collect_modules(module_dirs[-1])
        entries = [("bin", 0o40755, b""), ("modules", 0o40755, b""),
                   ("bin/busybox", 0o100755, busybox.read_bytes()),
                   ("init", 0o100755, INIT.encode()),
                   ("modules.order", 0o100644, "\n".join(modules).encode() + b"\n")]
        entries += [(f"modules/{name}.ko", 0o100644, data) for name, data in modules.items()]
        kernel, initrd = output / "vmlinuz", output / "initrd.img"
        shutil.copyfile(kernels[-1], kernel)
        initrd.write_bytes(_cpio(entries))
    return kernel, initrd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyhyve-guest", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="download and assemble the guest")
    build_parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        kernel, initrd = build(args.directory)
    except KitError as exc:
        print(f"pyhyve-guest: {exc}", file=sys.stderr)
        return 1
    print(f"pyhyve -m 512M -c 2 -l com1,stdio -s 2,virtio-rnd "
          f'-f kexec,{kernel},{initrd},"console=ttyS0" linux0')
    return 0


if __name__ == "__main__":
    sys.exit(main())
