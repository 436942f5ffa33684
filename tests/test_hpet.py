"""The HPET's registers, counter, comparators and interrupt routing, driven as
Linux's hpet.c drives it (its register sequences), on a recording bus.

What Linux itself makes of the device is in test_linux_guest.py (it must find
the HPET, calibrate with it and use it as a clocksource)."""

import threading
import time
from types import SimpleNamespace

from hypothesis import given, settings, strategies as st

from pyhyve.devices import hpet as hpet_module
from pyhyve.devices.hpet import (ENABLE_CNF, GCAP_ID, GEN_CONF, GINTR_STA, HPET_SIZE,
                                 LEG_RT_CNF, MAIN_COUNTER, TN_32BIT, TN_INT_ENB, TN_INT_LEVEL,
                                 TN_PERIODIC, TN_VAL_SET, Hpet)
from pyhyve.devctx import DeviceContext
from pyhyve.layout import HPET_BASE
from pyhyve.iobus import MmioBus

WAIT = 5.0


def tn_conf(n):
    return 0x100 + 0x20 * n


def tn_cmp(n):
    return 0x108 + 0x20 * n


class Lines:
    """Records each level change per GSI, and the legacy route's state."""

    def __init__(self):
        self.changes: list[tuple[int, bool]] = []
        self.legacy: list[bool] = []
        self.warnings: list = []
        self.cond = threading.Condition()

    def set_irq(self, gsi, level):
        with self.cond:
            self.changes.append((gsi, level))
            self.cond.notify_all()

    def rises(self, gsi):
        return sum(1 for g, level in self.changes if g == gsi and level)

    def level(self, gsi):
        levels = [level for g, level in self.changes if g == gsi]
        return levels[-1] if levels else False

    def wait_rises(self, gsi, count):
        with self.cond:
            return self.cond.wait_for(lambda: self.rises(gsi) >= count, WAIT)

    def warn(self, key, message, *args):
        self.warnings.append(message % args)


def make_hpet():
    lines = Lines()
    bus = MmioBus()
    device = Hpet(DeviceContext(SimpleNamespace(
        memory=None, ports=None, mmio=bus, name="hpet-test", closables=[],
        set_irq_level=lambda gsi, level, source: lines.set_irq(gsi, level),
        warn_once=lines.warn)), lines.legacy.append)
    entry = bus.lookup(HPET_BASE)
    assert (entry.base, entry.end) == (HPET_BASE, HPET_BASE + HPET_SIZE)

    def read(offset, size=4):
        return entry.read(offset, size)

    def write(offset, value, size=4):
        entry.write(offset, size, value)

    return device, lines, read, write


def test_capabilities_as_linux_reads_them():
    device, _, read, _ = make_hpet()
    try:
        low, high = read(GCAP_ID), read(GCAP_ID + 4)
        assert low & 0xFF == 1                       # revision
        assert (low >> 8 & 0x1F) + 1 == 3            # comparators
        assert low & (1 << 13) and low & (1 << 15)   # 64-bit counter, legacy route
        assert low >> 16 == 0x8086
        assert high == 10_000_000                    # fs per tick: 100 MHz
        assert read(GCAP_ID, 8) == high << 32 | low
        for n in range(3):
            conf = read(tn_conf(n), 8)
            assert conf & (1 << 4) and conf & (1 << 5)   # periodic and 64-bit capable
            assert conf >> 32 == 0x00FF0000              # routes: GSIs 16-23
            assert not conf & (1 << 15)                  # no FSB delivery
    finally:
        device.close()


def test_counter_runs_only_while_enabled_and_is_writable_only_when_halted():
    device, lines, read, write = make_hpet()
    try:
        assert read(MAIN_COUNTER, 8) == 0
        write(MAIN_COUNTER, 1000)
        assert read(MAIN_COUNTER, 8) == 1000
        write(GEN_CONF, ENABLE_CNF)
        time.sleep(0.01)
        running = read(MAIN_COUNTER, 8)
        assert running > 1000 + 100_000              # 10 ms at 100 MHz, less slack
        write(MAIN_COUNTER, 5)
        assert read(MAIN_COUNTER, 8) >= running      # ignored while running
        assert lines.warnings
        write(GEN_CONF, 0)
        frozen = read(MAIN_COUNTER, 8)
        time.sleep(0.01)
        assert read(MAIN_COUNTER, 8) == frozen
        assert read(MAIN_COUNTER + 4) == frozen >> 32
    finally:
        device.close()


def test_linux_legacy_periodic_tick():
    """hpet_clkevt_set_state_periodic() with the legacy route: timer 0 on IRQ 0,
    the PIT and RTC cut off, and the comparator advancing by the period."""
    device, lines, read, write = make_hpet()
    try:
        write(GEN_CONF, LEG_RT_CNF)
        assert lines.legacy == [True]
        period = 100_000                             # 1 ms
        write(tn_conf(0), read(tn_conf(0)) | TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | TN_32BIT)
        write(tn_cmp(0), period)
        write(tn_cmp(0), period)                     # Linux writes the period again
        assert not read(tn_conf(0)) & TN_VAL_SET
        write(GEN_CONF, LEG_RT_CNF | ENABLE_CNF)
        assert lines.wait_rises(0, 5)
        assert lines.level(0) is False               # edge: pulses
        assert read(tn_cmp(0)) > period               # moved on by whole periods
        assert read(tn_cmp(0)) % period == 0
        assert read(GINTR_STA) == 0                  # edge timers leave no status
        write(GEN_CONF, ENABLE_CNF)
        assert lines.legacy == [True, False]
    finally:
        device.close()


def test_one_shot_fires_once_on_its_route():
    device, lines, read, write = make_hpet()
    try:
        write(tn_conf(2), TN_INT_ENB | (20 << 9))
        write(GEN_CONF, ENABLE_CNF)
        write(tn_cmp(2), read(MAIN_COUNTER) + 200_000, 8)
        assert lines.wait_rises(20, 1)
        time.sleep(0.05)
        assert lines.rises(20) == 1                  # next match only when the counter wraps
        assert {gsi for gsi, _ in lines.changes} == {20}
    finally:
        device.close()


def test_level_triggered_timer_holds_its_line_until_status_is_cleared():
    device, lines, read, write = make_hpet()
    try:
        write(tn_conf(1), TN_INT_ENB | TN_INT_LEVEL | (17 << 9))
        write(GEN_CONF, ENABLE_CNF)
        write(tn_cmp(1), read(MAIN_COUNTER) + 100_000, 8)
        assert lines.wait_rises(17, 1)
        assert read(GINTR_STA) == 0b010 and lines.level(17) is True
        write(GINTR_STA, 0b101)                      # other bits: no effect
        assert read(GINTR_STA) == 0b010 and lines.level(17) is True
        write(GINTR_STA, 0b010)
        assert read(GINTR_STA) == 0 and lines.level(17) is False
    finally:
        device.close()


def test_unoffered_route_raises_nothing_and_is_reported():
    device, lines, read, write = make_hpet()
    try:
        write(tn_conf(2), TN_INT_ENB | (3 << 9))
        write(GEN_CONF, ENABLE_CNF)
        write(tn_cmp(2), read(MAIN_COUNTER) + 10_000, 8)
        time.sleep(0.05)
        assert lines.changes == []
        assert any("GSI 3" in warning for warning in lines.warnings)
    finally:
        device.close()


def test_32bit_mode_truncates_the_comparator():
    device, _, read, write = make_hpet()
    try:
        write(tn_cmp(0), 0x1234_5678_9ABC_DEF0, 8)
        assert read(tn_cmp(0), 8) == 0x1234_5678_9ABC_DEF0
        write(tn_conf(0), TN_32BIT)
        assert read(tn_cmp(0), 8) == 0x9ABC_DEF0
    finally:
        device.close()


def test_state_survives_save_restore_save():
    device, lines, read, write = make_hpet()
    other, other_lines, other_read, _ = make_hpet()
    try:
        write(tn_conf(0), TN_INT_ENB | TN_PERIODIC | TN_VAL_SET)
        write(tn_cmp(0), 50_000_000, 8)
        write(tn_conf(1), TN_INT_ENB | TN_INT_LEVEL | (18 << 9))
        write(tn_cmp(1), 42, 8)
        write(GEN_CONF, ENABLE_CNF | LEG_RT_CNF)
        time.sleep(0.01)
        write(GEN_CONF, LEG_RT_CNF)                  # halted: the saved counter is exact
        state = device.save_state()
        other.restore_state(state)
        assert other.save_state() == state
        assert other_lines.legacy == [True]
        assert other_read(MAIN_COUNTER, 8) == read(MAIN_COUNTER, 8)
        assert other_read(tn_cmp(0), 8) == 50_000_000
    finally:
        device.close()
        other.close()


def test_restore_refuses_state_that_does_not_fit():
    device, _, _, _ = make_hpet()
    try:
        good = device.save_state()
        for bad in ({**good, "config": "1"}, {**good, "counter": -1},
                    {**good, "timers": good["timers"][:2]}, {**good, "status": True}):
            try:
                device.restore_state(bad)
            except ValueError:
                continue
            raise AssertionError(f"accepted {bad}")
    finally:
        device.close()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, HPET_SIZE - 1), st.sampled_from([1, 2, 4, 8]),
       st.integers(0, (1 << 64) - 1), st.booleans())
def test_any_guest_access_is_answered(offset, size, value, is_write):
    device, lines, read, write = make_hpet()
    try:
        value &= (1 << (8 * size)) - 1
        if is_write:
            write(offset, value, size)
        assert 0 <= read(offset, size) < 1 << (8 * size)
    finally:
        device.close()


def test_the_thread_stops_with_the_device():
    device, lines, read, write = make_hpet()
    write(GEN_CONF, ENABLE_CNF)
    assert any(t.name == "hpet" for t in threading.enumerate())
    device.close()
    time.sleep(0.05)
    assert device._thread is None
    assert hpet_module.TIMERS == 3


def test_a_paused_vm_finds_the_counter_and_its_timers_where_they_stood():
    """As under QEMU, whose HPET runs on the virtual clock: paused, the main counter
    stands still and no comparator fires; resumed, both go on from there."""
    device, lines, read, write = make_hpet()
    try:
        write(tn_conf(2), TN_INT_ENB | TN_INT_LEVEL | (17 << 9))
        write(tn_cmp(2), 3_000_000, 8)               # 30 ms after the start
        write(GEN_CONF, ENABLE_CNF)
        device.pause()
        stood = read(MAIN_COUNTER, 8)
        time.sleep(0.1)
        assert read(MAIN_COUNTER, 8) == stood < 3_000_000
        assert lines.rises(17) == 0                  # the match did not come while paused
        device.resume()
        assert lines.wait_rises(17, 1)
        assert read(MAIN_COUNTER, 8) >= 3_000_000 > stood
    finally:
        device.close()
