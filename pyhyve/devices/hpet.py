"""The High Precision Event Timer (IA-PC HPET 1.0a) at 0xFED00000.

QEMU's PC and bhyve (vmm's vhpet) both give the guest an HPET, described by
the ACPI HPET table; Linux then uses it as a clocksource and, with the
legacy replacement route, as its boot clockevent and to calibrate the TSC.
KVM has no HPET, so it lives here, shaped as QEMU's: a 64-bit main counter
at 100 MHz, three comparators, legacy replacement, no FSB (MSI) delivery.

The main counter is derived from the host's monotonic clock while ENABLE_CNF
is set and frozen while it is not.  Each comparator matches when the counter
(or its low 32 bits, for a timer in 32-bit mode) passes its value: a one-shot
timer matches again only after the counter wraps, a periodic one adds its
period to the comparator each time, skipping the periods a late host missed.
A thread named "hpet" runs while some enabled timer may match and sleeps until
the earliest match.  Edge-triggered timers pulse their line; level-triggered
ones set their GINTR_STA bit and hold the line until the guest writes 1 there.

Interrupt lines: in legacy replacement mode (LEG_RT_CNF) timer 0 drives ISA
IRQ 0 and timer 1 IRQ 8, and the PIT's and RTC's own outputs are cut off
(`set_legacy_route`, as QEMU does); otherwise each timer drives the GSI its
INT_ROUTE_CNF names, one of INT_ROUTE_CAP's (GSIs 16-23).

Threading: MMIO accesses come from vCPU threads, matches from the thread;
one condition variable guards all state.  Registers are 64 bits wide; any
access that stays within one register works (drivers use 4 or 8 bytes).
"""

import threading
import time
from collections.abc import Callable

from ..boot import aml
from ..layout import HPET_BASE
from ..lifecycle import ACPI_SYSTEM, Device, StateError, bits, expect_keys

HPET_SIZE = 0x400
TIMERS = 3
PERIOD_FS = 10_000_000          # 10 ns per tick: 100 MHz, as QEMU's
TICK_NS = PERIOD_FS // 1_000_000
VENDOR_ID = 0x8086
REVISION = 1

CAP_COUNT_SIZE_64 = 1 << 13
CAP_LEGACY_ROUTE = 1 << 15
CAPABILITIES = (PERIOD_FS << 32) | (VENDOR_ID << 16) | CAP_LEGACY_ROUTE | \
    CAP_COUNT_SIZE_64 | ((TIMERS - 1) << 8) | REVISION

GCAP_ID, GEN_CONF, GINTR_STA, MAIN_COUNTER = 0x000, 0x010, 0x020, 0x0F0
TIMER_BASE, TIMER_STRIDE = 0x100, 0x20
TN_CONF, TN_COMPARATOR, TN_FSB_ROUTE = 0x00, 0x08, 0x10

ENABLE_CNF = 1 << 0
LEG_RT_CNF = 1 << 1
TN_INT_LEVEL = 1 << 1
TN_INT_ENB = 1 << 2
TN_PERIODIC = 1 << 3
TN_PER_INT_CAP = 1 << 4
TN_SIZE_CAP = 1 << 5
TN_VAL_SET = 1 << 6
TN_32BIT = 1 << 8
TN_ROUTE_SHIFT, TN_ROUTE_MASK = 9, 0x1F << 9
TN_WRITABLE = TN_INT_LEVEL | TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | TN_32BIT | TN_ROUTE_MASK
ROUTE_CAP = 0x00FF0000          # GSIs 16-23: the I/O APIC pins no ISA device uses
TN_FIXED = (ROUTE_CAP << 32) | TN_PER_INT_CAP | TN_SIZE_CAP
LEGACY_IRQS = (0, 8)
MAX_SLEEP = 3600.0              # a 64-bit wrap is centuries away: wake now and then            # timer 0 and timer 1 in legacy replacement mode

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1


class Timer:
    """One comparator: its configuration, value and period (in ticks)."""

    def __init__(self, index: int):
        self.index = index
        self.config = 0
        self.comparator = MASK64
        self.period = 0
        self.next_match: int | None = None  # the unwrapped counter value of the next match
        self.line = False                    # the level it drives now

    @property
    def width_mask(self) -> int:
        return MASK32 if self.config & TN_32BIT else MASK64


class Hpet(Device):
    """The HPET's registers, its counter and the thread that fires its comparators.

    `set_legacy_route(taken)` cuts the PIT and RTC off IRQs 0 and 8 (True) or
    connects them again: the PIT is KVM's, so that is the machine's to do."""

    name = "hpet"
    savable = True

    def __init__(self, context, set_legacy_route: Callable[[bool], None]):
        self._context = context
        self._set_legacy_route = set_legacy_route
        self._warn = context.warn_once
        self._cond = threading.Condition(threading.Lock())   # no re-entry: a plain lock
        self._config = 0
        self._status = 0
        self._counter_base = 0       # ticks at _started_ns, or the frozen counter
        self._started_ns = 0
        self._paused = False         # the VM is: the counter stands still, as in QEMU
        self.timers = [Timer(index) for index in range(TIMERS)]
        self._thread: threading.Thread | None = None
        self._closed = False
        context.mmio.register("hpet", HPET_BASE, HPET_SIZE, self._read, self._write)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)

    # --- the counter --------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._config & ENABLE_CNF)

    @property
    def _counting(self) -> bool:
        return self.enabled and not self._paused

    def _ticks(self) -> int:
        """The main counter, unwrapped (it wraps at 2**64 in the register)."""
        if not self._counting:
            return self._counter_base
        return self._counter_base + (time.monotonic_ns() - self._started_ns) // TICK_NS

    # --- registers ------------------------------------------------------------------
    def _register(self, offset: int) -> int:
        if offset == GCAP_ID:
            return CAPABILITIES
        if offset == GEN_CONF:
            return self._config
        if offset == GINTR_STA:
            return self._status
        if offset == MAIN_COUNTER:
            return self._ticks() & MASK64
        timer, field = self._timer_at(offset)
        if timer is None:
            return 0
        if field == TN_CONF:
            return timer.config | TN_FIXED
        if field == TN_COMPARATOR:
            return timer.comparator & timer.width_mask
        return 0                            # FSB route: no FSB delivery

    def _timer_at(self, offset: int) -> tuple[Timer | None, int]:
        index, field = divmod(offset - TIMER_BASE, TIMER_STRIDE)
        if offset < TIMER_BASE or index >= TIMERS:
            return None, 0
        return self.timers[index], field

    def _read(self, offset: int, size: int) -> int:
        if offset == MAIN_COUNTER and size == 4:    # the clocksource read: kept short,
            with self._cond:                        # Linux times it when it calibrates
                return self._ticks() & MASK32
        shift = 8 * (offset & 7)
        if shift + 8 * size > 64:
            self._warn(("hpet-access", size), "HPET: %d-byte access at %#x crosses a register",
                       size, offset)
            return (1 << (8 * size)) - 1
        with self._cond:
            return (self._register(offset & ~7) >> shift) & ((1 << (8 * size)) - 1)

    def _write(self, offset: int, size: int, value: int) -> None:
        shift = 8 * (offset & 7)
        if shift + 8 * size > 64:
            self._warn(("hpet-access", size), "HPET: %d-byte access at %#x crosses a register",
                       size, offset)
            return
        lanes = ((1 << (8 * size)) - 1) << shift
        register = offset & ~7
        with self._cond:
            old = self._register(register)
            new = (old & ~lanes) | ((value << shift) & lanes)
            if register == GEN_CONF:
                self._write_config(new)
            elif register == GINTR_STA:
                self._clear_status(value << shift & lanes)
            elif register == MAIN_COUNTER:
                self._write_counter(new)
            else:
                timer, field = self._timer_at(register)
                if timer is not None and field == TN_CONF:
                    self._write_timer_config(timer, new)
                elif timer is not None and field == TN_COMPARATOR:
                    self._write_comparator(timer, new, lanes)
            self._cond.notify()

    def _write_config(self, value: int) -> None:
        value &= ENABLE_CNF | LEG_RT_CNF
        self._lower_lines()                 # the routes may change; _update_line raises again
        old, self._config = self._config, value
        if (old ^ value) & ENABLE_CNF and not self._paused:
            now_ns = time.monotonic_ns()
            if value & ENABLE_CNF:
                self._started_ns = now_ns
            else:
                self._counter_base += (now_ns - self._started_ns) // TICK_NS
        if (old ^ value) & LEG_RT_CNF:
            self._set_legacy_route(bool(value & LEG_RT_CNF))
        for timer in self.timers:
            self._arm(timer)
            self._update_line(timer)
        self._start_thread()

    def _write_counter(self, value: int) -> None:
        if self.enabled:
            self._warn("hpet-counter-write", "HPET: main counter written while running; "
                       "ignored (the specification asks software to halt it first)")
            return
        self._counter_base = value
        for timer in self.timers:
            self._arm(timer)

    def _write_timer_config(self, timer: Timer, value: int) -> None:
        old = timer.config
        if timer.line:
            self._drive(timer, False)
        timer.config = value & TN_WRITABLE
        route = (timer.config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT
        if (old ^ timer.config) & TN_ROUTE_MASK and not ROUTE_CAP >> route & 1:
            self._warn(("hpet-route", route), "HPET: timer %d routed to GSI %d, which "
                       "INT_ROUTE_CAP does not offer; it raises no interrupt",
                       timer.index, route)
        if timer.config & TN_32BIT:
            timer.comparator &= MASK32
            timer.period &= MASK32
        if not timer.config & TN_INT_LEVEL:
            self._status &= ~(1 << timer.index)
        self._arm(timer)
        self._update_line(timer)
        self._start_thread()

    def _write_comparator(self, timer: Timer, value: int, lanes: int) -> None:
        """Periodic timers: a write with VAL_SET sets the comparator, any write
        sets the period (the lanes written), and VAL_SET clears itself."""
        value &= timer.width_mask
        periodic = timer.config & TN_PERIODIC
        if not periodic or timer.config & TN_VAL_SET:
            timer.comparator = value
        if periodic:
            timer.period = (timer.period & ~lanes | value & lanes) & timer.width_mask
        timer.config &= ~TN_VAL_SET
        self._arm(timer)
        self._start_thread()

    def _clear_status(self, bits: int) -> None:
        self._status &= ~bits
        for timer in self.timers:
            if bits >> timer.index & 1:
                self._update_line(timer)

    # --- matching and interrupts ------------------------------------------------------
    def _arm(self, timer: Timer) -> None:
        """Work out the counter value at which the timer next matches."""
        if not self.enabled:
            timer.next_match = None
            return
        now = self._ticks()
        width = timer.width_mask
        ahead = (timer.comparator - now) & width
        timer.next_match = now + (ahead or width + 1)

    def _route(self, timer: Timer) -> int | None:
        if self._config & LEG_RT_CNF and timer.index < len(LEGACY_IRQS):
            return LEGACY_IRQS[timer.index]
        route = (timer.config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT
        return route if ROUTE_CAP >> route & 1 else None

    def _drive(self, timer: Timer, level: bool) -> None:
        gsi = self._route(timer)
        timer.line = level
        if gsi is not None:
            self._context.irq_line(gsi, "hpet").set(level)

    def _lower_lines(self) -> None:
        for timer in self.timers:
            if timer.line:
                self._drive(timer, False)

    def _update_line(self, timer: Timer) -> None:
        """A level-triggered timer holds its line while its status bit is set."""
        level = bool(self.enabled and timer.config & TN_INT_ENB and
                     timer.config & TN_INT_LEVEL and self._status >> timer.index & 1)
        if level != timer.line:
            self._drive(timer, level)

    def _match(self, timer: Timer, now: int) -> None:
        """The counter passed the comparator: interrupt, then rearm."""
        if timer.config & TN_INT_ENB:
            if timer.config & TN_INT_LEVEL:
                self._status |= 1 << timer.index
                self._update_line(timer)
            else:
                self._drive(timer, True)
                self._drive(timer, False)
        width = timer.width_mask
        if timer.config & TN_PERIODIC and timer.period:
            missed = (now - timer.next_match) // timer.period + 1
            timer.comparator = (timer.comparator + missed * timer.period) & width
            timer.next_match += missed * timer.period
        else:
            timer.next_match += width + 1

    def _next_wait(self) -> float | None:
        """Seconds until the earliest armed match; None when nothing is armed."""
        matches = [timer.next_match for timer in self.timers if timer.next_match is not None]
        if not matches or not self._counting:
            return None
        return min(max(min(matches) - self._ticks(), 0) * TICK_NS / 1e9, MAX_SLEEP)

    def _start_thread(self) -> None:
        if self._counting and self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="hpet", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while not self._closed and self._counting:
                now = self._ticks()
                for timer in self.timers:
                    if timer.next_match is not None and timer.next_match <= now:
                        self._match(timer, now)
                self._cond.wait(self._next_wait())
            self._thread = None

    def resync_irq(self) -> None:
        """Drive the level-triggered lines from GINTR_STA again (after a restore
        lowered them)."""
        with self._cond:
            for timer in self.timers:
                timer.line = False
                self._update_line(timer)

    def acpi_objects(self) -> list[tuple[str, bytes]]:
        """PNP0103, which Linux looks for beside the HPET table."""
        return [(ACPI_SYSTEM, aml.device("HPET", aml.name("_HID", aml.eisa_id("PNP0103")),
                                         aml.name("_UID", 0),
                                         aml.name("_CRS", aml.resource_template(
                                             aml.memory32_fixed(HPET_BASE, HPET_SIZE)))))]

    def pause(self) -> None:
        """Stop the main counter (and so the comparators) where it stands."""
        with self._cond:
            if not self._paused:
                self._counter_base = self._ticks()
                self._paused = True
                self._cond.notify()

    def resume(self) -> None:
        with self._cond:
            if self._paused:
                self._paused = False
                self._started_ns = time.monotonic_ns()
                self._start_thread()
                self._cond.notify()

    # --- snapshots ------------------------------------------------------------------------
    def save_state(self) -> dict:
        with self._cond:
            return {"config": self._config, "status": self._status, "counter": self._ticks(),
                    "timers": [{"config": t.config, "comparator": t.comparator,
                                "period": t.period} for t in self.timers]}

    def restore_state(self, state: dict) -> None:
        """Put back saved registers into a freshly built HPET; the counter carries
        on from its saved value and level-triggered lines rise again."""
        expect_keys(state, ("config", "status", "counter", "timers"), self.name)
        timers = state["timers"]
        if not isinstance(timers, list) or len(timers) != TIMERS:
            raise StateError(f"HPET state must have {TIMERS} timers")
        for saved in timers:
            expect_keys(saved, ("config", "comparator", "period"), "HPET timer")
        saved_timers = [(bits(saved["config"], TN_WRITABLE, "HPET timer config"),
                         bits(saved["comparator"], MASK64, "HPET comparator"),
                         bits(saved["period"], MASK64, "HPET period")) for saved in timers]
        counter = bits(state["counter"], MASK64, "HPET counter")
        status = bits(state["status"], (1 << TIMERS) - 1, "HPET status")
        config = bits(state["config"], ENABLE_CNF | LEG_RT_CNF, "HPET config")
        with self._cond:
            self._counter_base = counter
            self._started_ns = time.monotonic_ns()
            self._status = status
            for timer, (timer_config, comparator, period) in zip(self.timers, saved_timers):
                timer.config, timer.comparator, timer.period = timer_config, comparator, period
            self._write_config(config)
            self._cond.notify()
