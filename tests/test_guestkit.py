"""The Linux guest kit: Debian's cloud kernel and a busybox initramfs.

Booting it needs guest code to run natively (VT-x/SVM); on hosts whose KVM
emulates guest instructions (see ../shared/ENVIRONMENT.md) a stock kernel
cannot boot, so the boot test measures a short guest loop and skips there.
"""

import os
import subprocess
import sys
import time

import pytest

from firmware import read_until
from guestrun import REPO, run_rom
from pyhyve.guestkit import READY, KitError, _cpio, build

SPIN = 1_000_000            # two instructions each: a few ms natively, seconds emulated


def _cpio_names(blob: bytes) -> list[str]:
    names, at = [], 0
    while True:
        size, namesize = int(blob[at + 54:at + 62], 16), int(blob[at + 94:at + 102], 16)
        name = blob[at + 110:at + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names.append(name)
        at += 110 + namesize
        at += -at % 4
        at += size + (-size % 4)


def test_cpio_archive_layout():
    blob = _cpio([("init", 0o100755, b"#!/bin/sh\n"), ("bin", 0o40755, b"")])
    assert blob.startswith(b"070701") and len(blob) % 4 == 0
    assert _cpio_names(blob) == ["init", "bin"]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("downloading Debian packages with apt-get needs root")
    try:
        return build(tmp_path_factory.mktemp("guest"))
    except KitError as exc:
        pytest.skip(f"cannot build the guest kit here: {exc}")


def test_kit_has_kernel_busybox_and_virtio_modules(kit):
    kernel, initrd = kit
    assert kernel.read_bytes()[0x202:0x206] == b"HdrS"
    names = _cpio_names(initrd.read_bytes())
    assert {"init", "bin/busybox", "modules.order"} <= set(names)
    for module in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng"):
        assert f"modules/{module}.ko" in names
    ordered = [n[len("modules/"):-3] for n in names if n.startswith("modules/")]
    assert ordered.index("virtio") < ordered.index("virtio_pci")      # dependencies first


def _native(tmp_path) -> float:
    start = time.perf_counter()
    run_rom(tmp_path, "spin", defines={"COUNT": 1})
    empty = time.perf_counter() - start
    start = time.perf_counter()
    run_rom(tmp_path, "spin", defines={"COUNT": SPIN})
    return time.perf_counter() - start - empty


@pytest.mark.e2e
def test_linux_boots_to_a_shell(kit, tmp_path, needs_kvm):
    loop = _native(tmp_path)
    if loop > 0.2:
        pytest.skip(f"guest code runs under instruction emulation here ({loop:.2f} s for "
                    f"{2 * SPIN} instructions): a stock Linux kernel cannot boot")
    kernel, initrd = kit
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-m", "512M", "-c", "2", "-l", "com1,stdio",
         "-s", "2,virtio-rnd", "-o", f"control.socket={tmp_path}/ctl.sock",
         "-f", f"kexec,{kernel},{initrd},console=ttyS0", "linux0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        output = read_until(proc, READY, 120)
        assert READY in output
        proc.stdin.write(b"echo pyhyve-$((6*7))\n")
        proc.stdin.flush()
        assert "pyhyve-42" in read_until(proc, "pyhyve-42", 30)
    finally:
        proc.kill()
        proc.wait()

