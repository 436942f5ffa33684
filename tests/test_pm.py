"""ACPI PM1 event/control blocks and PM timer at bhyve's ports."""

import time

from hypothesis import given, strategies as st

from fakevm import FakeVm
from fuzzing import fuzz_settings
from pyhyve.devices.pm import (PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TMR_PORT, PM_TIMER_HZ,
                               PWRBTN_EN, PWRBTN_STS, RTC_EN, RTC_STS, SCI_IRQ, SLP_EN,
                               SLP_TYP_S3, WAK_STS, PowerManagement)
from pyhyve.vcpu import ExitStatus


def make():
    vm = FakeVm()
    return vm, PowerManagement(vm.context)


def test_s5_powers_off_s3_suspends_and_other_sleep_types_are_refused():
    vm, pm = make()
    vm.port_write(PM1A_CNT_PORT, 2, (2 << 10) | SLP_EN)      # no _S2/_S4 in the DSDT
    assert vm.stops == [] and vm.suspends == 0
    assert vm.warnings == ["guest asked for sleep type 2, which the DSDT does not offer "
                           "(only _S3 = 1 and _S5 = 5): refused, it runs on"]
    assert vm.port_read(PM1A_CNT_PORT, 2) & SLP_EN == 0        # SLP_EN reads as 0
    vm.port_write(PM1A_CNT_PORT, 2, (SLP_TYP_S3 << 10) | SLP_EN)
    assert vm.suspends == 1 and vm.stops == []
    vm.port_write(PM1A_CNT_PORT, 2, (5 << 10) | SLP_EN)
    assert vm.stops == [ExitStatus.POWEROFF]


def test_wake_sets_wak_sts_and_the_sources_status():
    """As QEMU's ACPI: the RTC sets RTC_STS, the power button and a host's
    wakeup PWRBTN_STS; the RTC may wake the machine only with RTC_EN."""
    vm, pm = make()
    assert not pm.wake_enabled("rtc") and pm.wake_enabled("power-button")
    vm.port_write(PM1A_EVT_PORT + 2, 2, RTC_EN)
    assert pm.wake_enabled("rtc")
    for source, bits in (("rtc", WAK_STS | RTC_STS), ("power-button", WAK_STS | PWRBTN_STS),
                         ("host", WAK_STS | PWRBTN_STS)):
        pm.woken(source)
        assert vm.port_read(PM1A_EVT_PORT, 2) == bits
        vm.port_write(PM1A_EVT_PORT, 2, bits)                   # write 1 to clear
        assert vm.port_read(PM1A_EVT_PORT, 2) == 0


def test_power_button_raises_sci_only_when_enabled_and_clears_on_write():
    vm, pm = make()
    pm.press_power_button()
    assert vm.port_read(PM1A_EVT_PORT, 2) & PWRBTN_STS
    assert not vm.irq_levels.get(SCI_IRQ)
    vm.port_write(PM1A_EVT_PORT + 2, 2, PWRBTN_EN)               # PM1_EN, word access
    assert vm.irq_levels[SCI_IRQ]
    vm.port_write(PM1A_EVT_PORT, 2, PWRBTN_STS)                  # write 1 to clear
    assert not vm.port_read(PM1A_EVT_PORT, 2) & PWRBTN_STS
    assert vm.irq_levels[SCI_IRQ] is False


def test_pm_timer_counts_at_3_579545_mhz():
    vm, _ = make()
    first = vm.port_read(PM_TMR_PORT, 4)
    time.sleep(0.05)
    ticks = (vm.port_read(PM_TMR_PORT, 4) - first) & 0xFFFFFFFF
    assert 0.04 * PM_TIMER_HZ < ticks < 1.0 * PM_TIMER_HZ


@fuzz_settings(300)
@given(st.lists(st.tuples(st.integers(0x400, 0x40B), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF)), max_size=30))
def test_guest_writes_never_raise(accesses):
    vm, _ = make()
    for port, size, value in accesses:
        if (port, size) == (PM1A_CNT_PORT, 2) and value & SLP_EN:
            value &= ~SLP_EN
        vm.port_write(port, size, value)
        vm.port_read(port, size)
