"""PCI end to end: a long-mode guest (tests/guests/pcitest.S) drives pyhyve's
PCI bus as an OS would, through config mechanism #1, BAR sizing and moving,
MSI-X and INTx through the I/O APIC, and reports on the debug port."""

import pytest

from guestrun import run_rom
from pyhyve.vcpu import ExitStatus

pytestmark = pytest.mark.usefixtures("needs_kvm")

HOSTBRIDGE = ["pci 00:00.0 8086:1237"]
LPC = ["pci 00:1f.0 8086:7000"]


def pci_testdev_lines(function: int) -> list[str]:
    """pci-testdev's enumeration and BARs: BAR4 is the MSI-X table (4 vectors:
    the table, then the pending-bit array on the next 4 KiB page)."""
    bdf = f"00:03.{function}"
    return [f"pci {bdf} 1b36:0005",
            f"bar {bdf} 0 mem32 size=0x1000",
            f"bar {bdf} 1 io size=0x100",
            f"bar {bdf} 2 mem64 size=0x100000",
            f"bar {bdf} 4 mem32 size=0x2000"]


RESULTS = ["moved ok", "io moved ok", "msix ok", "intx ok"]


@pytest.mark.parametrize("devices, functions", [
    (["-s", "3,pci-testdev"], [0]),
    # a second function makes 00:03.0 multifunction: the guest must find 03.1
    (["-s", "3,pci-testdev", "-s", "3:1,pci-testdev"], [0, 1]),
], ids=["single", "multifunction"])
def test_guest_enumerates_sizes_moves_and_takes_interrupts(tmp_path, devices, functions):
    result = run_rom(tmp_path, "pcitest", *devices)
    expected = HOSTBRIDGE + [line for f in functions for line in pci_testdev_lines(f)] + LPC + RESULTS
    assert result.debug.splitlines() == expected, result.stderr
    assert result.status == ExitStatus.POWEROFF, result.stderr
