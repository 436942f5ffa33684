"""Whole-VM fuzzing: tests/guests/portfuzz.S makes thousands of random port
and MMIO accesses (half of them aimed at the legacy ports and at the PCI
devices' configuration space; none at the ports that legitimately reset or
power off the VM), then powers off.  pyhyve must survive all of them: exit
status 1 (powered off, so the guest ran to its end) and no Python traceback."""

import pytest

from fuzzing import SCALE
from guestrun import run_rom
from pyhyve.vcpu import ExitStatus

pytestmark = pytest.mark.usefixtures("needs_kvm")

ITERATIONS = 20000 * SCALE
SEEDS = [1, 2, 0x9E3779B9, 0xDEADBEEF, 0x12345678]


@pytest.mark.parametrize("seed", SEEDS, ids=hex)
def test_random_port_and_mmio_accesses_leave_the_vm_running(tmp_path, seed):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    result = run_rom(tmp_path, "portfuzz", "-s", "3,pci-testdev", "-s", "4,virtio-rnd",
                     "-s", f"5,virtio-blk,{disk}", "-l", f"com1,file={tmp_path / 'com1'}",
                     "-o", f"control.socket={tmp_path / 'ctl.sock'}",
                     defines={"SEED": seed, "ITERATIONS": ITERATIONS})
    assert "Traceback" not in result.stderr, result.stderr
    # the guest's random writes to the debug port may come before it
    assert result.debug.endswith("fuzz done\n"), result.debug[-200:] + result.stderr
    assert result.status == ExitStatus.POWEROFF, result.stderr
