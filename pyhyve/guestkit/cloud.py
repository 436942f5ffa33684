"""Debian's cloud kernel (linux-image-cloud-amd64), for hosts whose KVM runs
guest code natively.

apt-get downloads the kernel package and busybox-static (no root needed, nothing
installed); the kernel's virtio drivers are modules, so the initramfs carries
virtio_pci, virtio_blk, virtio_net, virtio_console and virtio_rng and what
they depend on (read from each module's .modinfo), for /init to load.
"""

import lzma
import os
import struct
import tempfile
from pathlib import Path

from . import initramfs
from .steps import Guest, KitError, require_programs, run, say, step

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio-rng")
CMDLINE = "console=ttyS0"


def _kernel_package() -> str:
    """The versioned image package the linux-image-cloud-amd64 metapackage depends on."""
    for line in run(["apt-cache", "depends", KERNEL_PACKAGE]).splitlines():
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


def guest(output: Path) -> Guest:
    """Where build(output) puts the guest."""
    return Guest(output / "vmlinuz", None, output / "initrd.img", CMDLINE, "cloud")


def build(output: Path) -> Guest:
    """Download the packages and write output/vmlinuz and output/initrd.img."""
    say("checking for apt-get, apt-cache and dpkg-deb")
    require_programs({"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg"})
    output.mkdir(parents=True, exist_ok=True)
    made = guest(output)
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        os.chmod(work_dir, 0o755)           # apt's download user must write here
        with step(f"finding the kernel package behind {KERNEL_PACKAGE} (apt-cache)"):
            package = _kernel_package()
        with step(f"downloading {package} and {BUSYBOX_PACKAGE} with apt-get"):
            run(["apt-get", "download", package, BUSYBOX_PACKAGE], cwd=work_dir, show=True)
        root = work_dir / "root"
        with step("unpacking them (dpkg-deb)"):
            for deb in work_dir.glob("*.deb"):
                run(["dpkg-deb", "-x", str(deb), str(root)])
        with step(f"writing the kernel and the initramfs (busybox, virtio modules) "
                  f"into {output}"):
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            module_dirs = sorted((root / "lib" / "modules").glob("*"))
            busybox = root / "bin" / "busybox"
            if not kernels or not module_dirs or not busybox.exists():
                raise KitError("the downloaded packages lack a kernel, modules or busybox")
            modules = _collect_modules(module_dirs[-1])
            made.initrd.write_bytes(initramfs.build(busybox, modules))
            made.kernel.write_bytes(kernels[-1].read_bytes())
    return made
