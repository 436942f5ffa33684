"""Legacy platform devices driven through the port bus: RTC/CMOS, i8042, and the
system control ports (0x92, 0xCF9, POST codes at 0x80)."""

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from fakevm import FakeVm
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from pyhyve.devices import rtc as rtc_module
from pyhyve.devices.i8042 import I8042
from pyhyve.devices.rtc import Rtc
from pyhyve.devices.syscontrol import PostCodes, ResetControl, SystemControlPortA
from pyhyve.iobus import BusConflict
from pyhyve.layout import GiB, MiB
from pyhyve.vcpu import ExitStatus

SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR, CENTURY = 0, 2, 4, 6, 7, 8, 9, 0x32
SEC_ALARM, MIN_ALARM, HOUR_ALARM = 1, 3, 5
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
B_SET, B_PIE, B_AIE, B_UIE, B_BINARY, B_24H = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
TIME_FIELDS = (SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR, CENTURY)


def cmos_read(vm, index: int) -> int:
    vm.port_write(0x70, 1, index)
    return vm.port_read(0x71, 1)


def cmos_write(vm, index: int, value: int) -> None:
    vm.port_write(0x70, 1, index)
    vm.port_write(0x71, 1, value)


def cmos_word(vm, index: int, length: int = 2) -> int:
    return sum(cmos_read(vm, index + i) << (8 * i) for i in range(length))


def read_time(vm) -> datetime:
    """The RTC's time, read as a careful guest does: twice, until both readings agree."""
    while True:
        raw = {index: cmos_read(vm, index) for index in TIME_FIELDS}
        if raw == {index: cmos_read(vm, index) for index in TIME_FIELDS}:
            break
    mode = cmos_read(vm, REG_B)

    def number(byte):
        return byte if mode & B_BINARY else (byte >> 4) * 10 + (byte & 0x0F)

    hour = raw[HOUR]
    if mode & B_24H:
        hour = number(hour)
    else:
        hour = number(hour & 0x7F) % 12 + (12 if hour & 0x80 else 0)
    moment = datetime(number(raw[CENTURY]) * 100 + number(raw[YEAR]), number(raw[MONTH]),
                      number(raw[MDAY]), hour, number(raw[MIN]), number(raw[SEC]))
    assert number(raw[WDAY]) == moment.isoweekday() % 7 + 1
    return moment


def write_time(vm, moment: datetime) -> None:
    """Set the clock the way Linux does: hold it with SET, write, let go."""
    mode = cmos_read(vm, REG_B)

    def byte(value):
        return value if mode & B_BINARY else (value // 10) << 4 | value % 10

    if mode & B_24H:
        hour = byte(moment.hour)
    else:
        hour = byte(moment.hour % 12 or 12) | (0x80 if moment.hour >= 12 else 0)
    cmos_write(vm, REG_B, mode | B_SET)
    cmos_write(vm, HOUR, hour)
    for index, value in ((SEC, moment.second), (MIN, moment.minute),
                         (WDAY, moment.isoweekday() % 7 + 1), (MDAY, moment.day),
                         (MONTH, moment.month), (YEAR, moment.year % 100),
                         (CENTURY, moment.year // 100)):
        cmos_write(vm, index, byte(value))
    cmos_write(vm, REG_B, mode)


def wait_for(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return bool(predicate())


def rtc_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "rtc"]


class FakeClock:
    """Stands in for the `time` module inside the RTC, so time moves only when told."""

    localtime = staticmethod(time.localtime)     # before `time` below shadows the module

    def __init__(self):
        self.wall = 1_700_000_000.25
        self.mono = 5000.25

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def vm():
    return FakeVm()


@pytest.fixture
def rtc(vm):
    device = Rtc(vm.context, 128 * MiB, 0, use_utc=True, cpus=1)
    yield device
    device.close()


@pytest.fixture
def clock(monkeypatch):
    """The RTC's clock under the test's control; ask for it before `rtc`."""
    fake = FakeClock()
    monkeypatch.setattr(rtc_module, "time", fake)
    return fake


# --- RTC: the CMOS bytes firmware reads --------------------------------------------------
@pytest.mark.parametrize("low, high, cpus, expect", [
    (1 * MiB, 0, 1, {0x15: 640, 0x17: 0, 0x30: 0, 0x34: 0, 0x5B: 0, 0x5F: 0}),
    (16 * MiB, 0, 1, {0x15: 640, 0x17: 15 * 1024, 0x30: 15 * 1024, 0x34: 0, 0x5F: 0}),
    (128 * MiB, 0, 2, {0x15: 640, 0x17: 0xFFFF, 0x30: 0xFFFF, 0x34: 112 * 16, 0x5B: 0,
                       0x5F: 1}),
    (3 * GiB, GiB // 2, 4, {0x15: 640, 0x17: 0xFFFF, 0x34: (3072 - 16) * 16,
                            0x5B: 512 * 16, 0x5F: 3}),
    (3 * GiB, 2048 * GiB, 255, {0x34: (3072 - 16) * 16, 0x5B: 0xFFFFFF, 0x5F: 254}),
])
def test_cmos_memory_and_cpus(vm, low, high, cpus, expect):
    device = Rtc(vm.context, low, high, use_utc=True, cpus=cpus)
    widths = {0x5B: 3, 0x5F: 1}
    for index, value in expect.items():
        assert cmos_word(vm, index, widths.get(index, 2)) == value, hex(index)
    device.close()


def test_cmos_fixed_bytes(vm, rtc):
    assert cmos_read(vm, 0x0E) == 0         # diagnostic status
    assert cmos_read(vm, 0x0F) == 0         # shutdown status
    assert cmos_read(vm, 0x10) == 0         # no floppy drives
    assert cmos_read(vm, 0x14) == 0x02      # equipment: FPU
    checksum = sum(cmos_read(vm, index) for index in range(0x10, 0x2E))
    assert cmos_read(vm, 0x2E) << 8 | cmos_read(vm, 0x2F) == checksum
    year = datetime.now(timezone.utc).year
    assert cmos_read(vm, CENTURY) == (year // 1000) << 4 | (year // 100) % 10
    assert cmos_read(vm, REG_A) & 0x7F == 0x26
    assert cmos_read(vm, REG_B) == B_24H
    assert cmos_read(vm, REG_D) == 0x80


def test_nvram_banks_and_nmi_bit(vm, rtc):
    cmos_write(vm, 0x40, 0x12)
    cmos_write(vm, 0x80 | 0x41, 0x34)       # bit 7 of the index masks NMI: same byte 0x41
    assert cmos_read(vm, 0x41) == 0x34
    vm.port_write(0x72, 1, 0x40)            # extended bank: byte 0xC0
    vm.port_write(0x73, 1, 0x56)
    assert cmos_read(vm, 0x40) == 0x12
    vm.port_write(0x72, 1, 0x40)
    assert vm.port_read(0x73, 1) == 0x56
    vm.port_write(0x70, 2, 0x7842)          # a word write: index, then data
    assert cmos_read(vm, 0x42) == 0x78
    assert vm.port_read(0x70, 1) == 0xFF    # the index port is write-only


# --- RTC: time of day ------------------------------------------------------------------
@pytest.mark.parametrize("use_utc", [True, False])
@pytest.mark.parametrize("mode", [B_24H, B_24H | B_BINARY, 0, B_BINARY],
                         ids=["bcd24", "bin24", "bcd12", "bin12"])
def test_time_follows_host_clock(vm, use_utc, mode):
    device = Rtc(vm.context, 128 * MiB, 0, use_utc=use_utc, cpus=1)
    cmos_write(vm, REG_B, mode)
    seen = read_time(vm)
    host = datetime.now(timezone.utc).replace(tzinfo=None) if use_utc else datetime.now()
    assert abs(seen - host) < timedelta(seconds=3)
    device.close()


def test_bcd_and_binary_agree(vm, clock, rtc):
    cmos_write(vm, REG_B, B_24H)
    bcd = read_time(vm)
    cmos_write(vm, REG_B, B_24H | B_BINARY)
    assert read_time(vm) == bcd
    cmos_write(vm, REG_B, 0)
    assert read_time(vm) == bcd
    assert bcd == datetime(2023, 11, 14, 22, 13, 20)   # 1_700_000_000 in UTC
    assert cmos_read(vm, HOUR) == 0x80 | 0x10          # 10 PM, BCD, 12-hour


def test_set_holds_the_clock_and_guest_time_persists(vm, clock, rtc):
    cmos_write(vm, REG_B, B_24H | B_SET)
    held = read_time(vm)
    clock.advance(10)
    assert read_time(vm) == held            # SET stops updates
    cmos_write(vm, REG_B, B_24H)
    write_time(vm, datetime(2024, 2, 29, 23, 59, 58))
    assert read_time(vm) == datetime(2024, 2, 29, 23, 59, 58)
    clock.advance(3.5)
    assert read_time(vm) == datetime(2024, 3, 1, 0, 0, 1)
    cmos_write(vm, REG_B, B_24H | B_BINARY)
    assert read_time(vm) == datetime(2024, 3, 1, 0, 0, 1)


def test_guest_time_in_binary_12_hour_mode(vm, clock, rtc):
    cmos_write(vm, REG_B, B_BINARY)
    write_time(vm, datetime(1999, 12, 31, 13, 5, 0))
    cmos_write(vm, REG_B, B_24H)
    assert read_time(vm) == datetime(1999, 12, 31, 13, 5, 0)


def test_time_register_written_while_running(vm, clock, rtc):
    before = read_time(vm)
    cmos_write(vm, YEAR, 0x31)              # BCD: 2031
    assert read_time(vm) == before.replace(year=2031)


def test_invalid_date_stops_the_clock_until_fixed(vm, clock, rtc):
    cmos_write(vm, REG_B, B_24H | B_SET)
    cmos_write(vm, MONTH, 0x13)
    cmos_write(vm, REG_B, B_24H)
    assert any("invalid" in warning for warning in vm.warnings)
    clock.advance(5)
    assert cmos_read(vm, MONTH) == 0x13     # what the guest wrote, clock stopped
    cmos_write(vm, MONTH, 0x04)
    started = read_time(vm)
    clock.advance(5)
    assert read_time(vm) == started + timedelta(seconds=5)


EPOCH = datetime(1970, 1, 1)


@fuzz_settings(300)
@given(st.dates(min_value=datetime(1, 1, 1).date(), max_value=datetime(9600, 12, 31).date()))
def test_calendar_arithmetic_agrees_with_datetime(day):
    """The RTC counts days itself (pyhyve.devices.rtc: datetime's import costs
    start-up); Python's datetime, the proleptic Gregorian calendar, is the oracle."""
    days = (day - EPOCH.date()).days
    assert rtc_module.days_from_date(day.year, day.month, day.day) == days
    assert rtc_module.date_from_days(days) == (day.year, day.month, day.day)


@fuzz_settings(150)
@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9600, 12, 31, 23, 59, 59)),
       st.sampled_from([B_24H, B_24H | B_BINARY, 0, B_BINARY]))
def test_any_date_the_guest_sets_runs_on_from_there(moment, mode):
    """Years 1 to 9600 in each register format: the time set reads back, with its
    day of the week (read_time checks it), and a second later it reads one
    second on, across month, year and century ends."""
    moment = moment.replace(microsecond=0)          # the RTC counts whole seconds
    vm, clock = FakeVm(), FakeClock()
    saved = rtc_module.time
    rtc_module.time = clock
    device = Rtc(vm.context, 128 * MiB, 0, use_utc=True, cpus=1)
    try:
        cmos_write(vm, REG_B, mode)
        write_time(vm, moment)
        assert read_time(vm) == moment
        clock.advance(1)
        after = moment + timedelta(seconds=1)
        assert read_time(vm) == (after if after.year <= 9600 else datetime(1, 1, 1))
    finally:
        device.close()
        rtc_module.time = saved


@fuzz_settings(300)
@given(st.integers(1, 99), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99),
       st.integers(0, 99), st.integers(0, 99))
def test_a_time_the_calendar_lacks_stops_the_clock(century, year, month, day, hour, minute):
    """What the guest writes in binary is taken exactly where datetime takes it
    as a date and time (years 1 to 9600); anything else stops the clock."""
    vm, clock = FakeVm(), FakeClock()
    saved = rtc_module.time
    rtc_module.time = clock
    device = Rtc(vm.context, 128 * MiB, 0, use_utc=True, cpus=1)
    try:
        cmos_write(vm, REG_B, B_24H | B_BINARY | B_SET)
        for index, value in ((CENTURY, century), (YEAR, year), (MONTH, month),
                             (MDAY, day), (HOUR, hour), (MIN, minute), (SEC, 30)):
            cmos_write(vm, index, value)
        cmos_write(vm, REG_B, B_24H | B_BINARY)
        try:
            expected = datetime(century * 100 + year, month, day, hour, minute, 30)
        except ValueError:
            expected = None
        if expected is None or expected.year > 9600:
            assert any("invalid" in warning for warning in vm.warnings)
            clock.advance(5)
            assert cmos_read(vm, SEC) == 30                 # stopped
        else:
            assert read_time(vm) == expected
    finally:
        device.close()
        rtc_module.time = saved


def test_divider_reset_holds_the_clock(vm, clock, rtc):
    cmos_write(vm, REG_A, 0x66)
    held = read_time(vm)
    clock.advance(7)
    assert read_time(vm) == held
    cmos_write(vm, REG_A, 0x26)
    clock.advance(7)
    assert read_time(vm) == held + timedelta(seconds=7)


def test_uip_around_second_boundary(vm, clock, rtc):
    cmos_write(vm, REG_A, 0xA6)             # UIP is read-only
    clock.wall = 1_700_000_000.5
    assert cmos_read(vm, REG_A) == 0x26
    clock.wall = 1_700_000_000.9995
    assert cmos_read(vm, REG_A) == 0xA6
    clock.wall = 1_700_000_001.0005
    assert cmos_read(vm, REG_A) == 0xA6


def test_register_c_flags_are_read_to_clear(vm, clock, rtc):
    cmos_write(vm, REG_A, 0x2F)             # 2 Hz periodic rate
    cmos_read(vm, REG_C)
    clock.advance(1.0)
    assert cmos_read(vm, REG_C) == C_PF | C_UF      # no enables: flags, no IRQF
    assert cmos_read(vm, REG_C) == 0
    assert not vm.irq_levels.get(8)


def test_alarm_flag(vm, clock, rtc):
    write_time(vm, datetime(2020, 1, 1, 12, 0, 0))
    for alarm, value in ((SEC_ALARM, 0x01), (MIN_ALARM, 0x00), (HOUR_ALARM, 0xC0)):
        cmos_write(vm, alarm, value)        # 12:00:01, any hour
    cmos_read(vm, REG_C)
    clock.advance(1)
    assert cmos_read(vm, REG_C) & C_AF
    clock.advance(1)
    assert not cmos_read(vm, REG_C) & C_AF


def test_enabling_an_interrupt_with_its_flag_set_raises_irq8(vm, clock, rtc):
    clock.advance(1)                        # UF is pending
    cmos_write(vm, REG_B, B_24H | B_UIE)
    assert vm.irq_levels[8] is True
    assert cmos_read(vm, REG_C) & (C_IRQF | C_UF) == C_IRQF | C_UF
    assert vm.irq_levels[8] is False


# --- RTC: interrupts from the timer thread (real time) ------------------------------------
def test_periodic_interrupt_fires(vm, rtc):
    cmos_write(vm, REG_B, B_24H | B_PIE)     # register A's default rate: 1024 Hz
    assert wait_for(lambda: vm.irq_levels.get(8))
    assert cmos_read(vm, REG_C) & (C_IRQF | C_PF) == C_IRQF | C_PF
    assert vm.irq_levels[8] is False
    assert wait_for(lambda: vm.irq_levels.get(8))   # and again after the acknowledgement
    cmos_write(vm, REG_B, B_24H)
    assert wait_for(lambda: not rtc_threads())      # no interrupt enabled, no thread


@pytest.mark.parametrize("enable, flag", [(B_UIE, C_UF), (B_AIE, C_AF)])
def test_update_and_alarm_interrupts_fire(vm, rtc, enable, flag):
    for alarm in (SEC_ALARM, MIN_ALARM, HOUR_ALARM):
        cmos_write(vm, alarm, 0xFF)         # every second
    cmos_write(vm, REG_B, B_24H | enable)
    assert wait_for(lambda: vm.irq_levels.get(8))
    assert cmos_read(vm, REG_C) & (C_IRQF | flag) == C_IRQF | flag


def test_set_bit_clears_uie(vm, rtc):
    cmos_write(vm, REG_B, B_24H | B_SET | B_UIE)
    assert cmos_read(vm, REG_B) == B_24H | B_SET


def test_close_stops_the_thread(vm):
    device = Rtc(vm.context, 128 * MiB, 0, use_utc=True, cpus=1)
    cmos_write(vm, REG_B, B_24H | B_PIE)
    assert rtc_threads()
    device.close()
    assert not rtc_threads()


# --- i8042 ---------------------------------------------------------------------------
@pytest.fixture
def kbc(vm):
    return I8042(vm.context)


def kbc_command(vm, command: int, data: int | None = None) -> None:
    vm.port_write(0x64, 1, command)
    if data is not None:
        vm.port_write(0x60, 1, data)


def drain(vm) -> list[int]:
    out = []
    while vm.port_read(0x64, 1) & 0x01:
        out.append(vm.port_read(0x60, 1))
    return out


def test_i8042_self_test_and_interface_tests(vm, kbc):
    assert not vm.port_read(0x64, 1) & 0x05          # nothing to read, SYS clear
    kbc_command(vm, 0xAA)
    assert vm.port_read(0x64, 1) & 0x01
    assert drain(vm) == [0x55]
    assert vm.port_read(0x64, 1) & 0x04              # SYS set by the self-test
    kbc_command(vm, 0xAB)
    kbc_command(vm, 0xA9)
    assert drain(vm) == [0x00, 0x00]


def test_i8042_command_byte(vm, kbc):
    kbc_command(vm, 0x20)
    assert drain(vm) == [0x43]                       # translating, as firmware leaves it
    kbc_command(vm, 0x60, 0x65)
    kbc_command(vm, 0x20)
    assert drain(vm) == [0x65]
    kbc_command(vm, 0xAE)
    kbc_command(vm, 0xA8)
    kbc_command(vm, 0x20)
    assert drain(vm) == [0x45]
    kbc_command(vm, 0xAD)
    kbc_command(vm, 0xA7)
    kbc_command(vm, 0x20)
    assert drain(vm) == [0x75]
    assert vm.port_read(0x64, 1) & 0x08              # last write was a command


def test_i8042_keyboard_commands(vm, kbc):
    vm.port_write(0x60, 1, 0xFF)
    assert drain(vm) == [0xFA, 0xAA]
    vm.port_write(0x60, 1, 0xF2)
    assert drain(vm) == [0xFA, 0xAB, 0x41]           # 0x83 through the set-1 translation
    for command in (0xED, 0xF3):
        vm.port_write(0x60, 1, command)
        vm.port_write(0x60, 1, 0x02)                 # the parameter
        assert drain(vm) == [0xFA, 0xFA]
    vm.port_write(0x60, 1, 0xF0)
    vm.port_write(0x60, 1, 0x00)
    assert drain(vm) == [0xFA, 0xFA, 0x02]
    for command in (0xF4, 0xF5, 0xF6):
        vm.port_write(0x60, 1, command)
        assert drain(vm) == [0xFA]
    vm.port_write(0x60, 1, 0xEE)
    assert drain(vm) == [0xEE]
    vm.port_write(0x60, 1, 0x42)
    assert drain(vm) == [0xFE]


def test_i8042_keyboard_irq(vm, kbc):
    history = []

    def record(irq, level, source="platform"):
        history.append((irq, level))
        vm.irq_levels[irq] = level

    vm.set_irq_level = record
    vm.port_write(0x60, 1, 0xFF)
    assert vm.irq_levels[1] is True
    history.clear()
    assert vm.port_read(0x60, 1) == 0xFA
    assert history == [(1, False), (1, True)]        # a fresh edge for the next byte
    assert vm.port_read(0x60, 1) == 0xAA
    assert vm.irq_levels[1] is False
    assert vm.port_read(0x60, 1) == 0xAA             # an empty buffer repeats its last byte
    kbc_command(vm, 0x60, 0x00)                      # interrupts off
    kbc_command(vm, 0xAA)
    assert vm.irq_levels[1] is False
    drain(vm)


def test_i8042_aux_port_without_mouse(vm, kbc):
    kbc_command(vm, 0xD3, 0x5A)                      # aux loopback
    assert vm.port_read(0x64, 1) & 0x21 == 0x21
    assert vm.irq_levels[12] is True
    assert drain(vm) == [0x5A]
    assert vm.irq_levels[12] is False
    kbc_command(vm, 0xD4, 0xFF)                      # to the mouse: nobody there
    assert vm.port_read(0x64, 1) & 0x61 == 0x61
    assert drain(vm) == [0xFE]
    kbc_command(vm, 0xD2, 0x12)                      # keyboard loopback
    assert vm.port_read(0x64, 1) & 0x21 == 0x01
    assert drain(vm) == [0x12]


def test_i8042_output_port_and_resets(vm, kbc):
    kbc_command(vm, 0xD0)
    assert drain(vm) == [0x03]
    kbc_command(vm, 0xDD)
    kbc_command(vm, 0xD0)
    assert drain(vm) == [0x01]                       # A20 off
    kbc_command(vm, 0xD1, 0x03)
    assert vm.stops == []
    kbc_command(vm, 0xFF)                            # pulse nothing
    assert vm.stops == []
    kbc_command(vm, 0xFE)
    assert vm.stops == [ExitStatus.RESET]
    kbc_command(vm, 0xD1, 0x02)                      # reset line low
    assert vm.stops == [ExitStatus.RESET, ExitStatus.RESET]


def test_i8042_unknown_command_warns(vm, kbc):
    kbc_command(vm, 0x05)
    assert vm.warnings and vm.stops == []


# --- system control ports ----------------------------------------------------------------
def test_port_92(vm):
    SystemControlPortA(vm.context)
    vm.port_write(0x92, 1, 0x02)
    assert vm.port_read(0x92, 1) == 0x02
    assert vm.stops == []
    vm.port_write(0x92, 1, 0x03)
    assert vm.stops == [ExitStatus.RESET]
    vm.port_write(0x92, 1, 0x03)                     # no new 0 -> 1 transition
    assert vm.stops == [ExitStatus.RESET]


def test_reset_control_register(vm):
    ResetControl(vm.context)
    vm.ports.register("pci-cfgaddr", 0xCF8, 1, lambda o, s: 0, lambda o, s, v: None)
    vm.ports.register("pci-cfgdata", 0xCFC, 4, lambda o, s: 0, lambda o, s, v: None)
    vm.port_write(0xCF9, 1, 0x02)
    assert vm.port_read(0xCF9, 1) == 0x02
    assert vm.stops == []
    vm.port_write(0xCF9, 1, 0x06)
    assert vm.stops == [ExitStatus.RESET]
    assert vm.port_read(0xCF9, 1) == 0x02
    with pytest.raises(BusConflict):                 # it really is 0xCF9 alone
        vm.ports.register("other", 0xCF9, 1, lambda o, s: 0, lambda o, s, v: None)


def test_post_codes(vm):
    post = PostCodes(vm.context)
    for code in (0x10, 0x20, 0x55):
        vm.port_write(0x80, 1, code)
    vm.port_write(0x80, 2, 0x1234)
    assert (post.last, post.count) == (0x34, 4)
    assert vm.port_read(0x80, 1) == 0x34


# --- all of them, under random traffic -------------------------------------------------------
PORTS = (0x60, 0x64, 0x70, 0x71, 0x72, 0x73, 0x80, 0x92, 0xCF9)
ACCESS = st.tuples(st.booleans(), st.sampled_from(PORTS), st.sampled_from((1, 2, 4)),
                   st.integers(0, 0xFFFFFFFF))


@fuzz_settings(150)
@given(st.lists(ACCESS, max_size=80), st.booleans())
def test_random_port_traffic_never_raises(accesses, use_utc):
    vm = FakeVm()
    rtc = Rtc(vm.context, 3 * GiB, GiB, use_utc=use_utc, cpus=4)
    I8042(vm.context)
    SystemControlPortA(vm.context)
    ResetControl(vm.context)
    PostCodes(vm.context)
    try:
        for is_write, port, size, value in accesses:
            if is_write:
                vm.port_write(port, size, value)
            else:
                assert 0 <= vm.port_read(port, size) < 1 << (8 * size)
        for index in range(0x0E):               # whatever state it is in, it reads
            cmos_read(vm, index)
    finally:
        rtc.close()
