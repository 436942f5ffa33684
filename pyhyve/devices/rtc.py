"""The MC146818 real-time clock and its CMOS NVRAM, at ports 0x70-0x73.

bhyve keeps this device in the kernel (vmm's vrtc); KVM has no RTC, so it
lives here.  Port 0x70 selects a byte of bank 0 (bit 7 is the NMI mask, which
is not modelled), 0x71 reads or writes it; 0x72/0x73 do the same for the
extended bank (bytes 0x80-0xFF), as ICH chipsets have (QEMU 7.2's RTC has
no such bank: the ports read all ones there).  Writes to
the index ports only choose a byte, so KVM queues them (iobus.queue_writes,
as QEMU coalesces 0x70) and the guest leaves only for the data port.

The clock is the host clock (local time, or UTC when bhyve's -u asks for it)
plus an offset that changes when the guest sets the time.  While the guest
holds the clock (SET in register B, or the divider in reset) the time
registers are plain bytes; when it lets go they are read back as the new
time.  If they do not form a valid date the clock stays stopped until the
guest writes one that does, as bhyve's vrtc does.  The daylight-saving bit
of register B is kept but does nothing: local time already follows the host.

Register C's flags are computed from the time that passed since they were
last looked at: PF at the periodic rate, UF at each second, AF when a second
matches the alarm.  A thread named "rtc" runs only while PIE, UIE or AIE is
enabled, waking at the next such event to raise IRQ 8; reading register C
clears the flags and lowers the line.

ACPI S3: as the machine goes to sleep the CMOS shutdown status (byte 0x0F)
becomes 0xFE, which tells SeaBIOS at the reset vector to resume through the
FACS waking vector, as QEMU's RTC does; while it sleeps (the thread runs on)
an alarm with AIE set asks the machine to wake (the PM device's RTC_EN
decides whether it does).
"""

import math
import threading
import time

from ..boot import aml
from ..lifecycle import (ACPI_ISA, Device, decode, encode, expect_keys, flag, number,
                         uint)
from ..layout import KiB, MiB

RTC_PORT = 0x70
RTC_IRQ = 8

SEC, SEC_ALARM, MIN, MIN_ALARM, HOUR, HOUR_ALARM = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
WDAY, MDAY, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32                  # where the ACPI FADT says the century lives
TIME_REGISTERS = frozenset((SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR, CENTURY))
ALARMS = ((SEC_ALARM, SEC), (MIN_ALARM, MIN), (HOUR_ALARM, HOUR))
ALARM_DONT_CARE = 0xC0          # an alarm byte >= 0xC0 matches any value

A_UIP = 0x80                    # update in progress (read-only)
A_DIVIDER_RESET = 0x60          # divider 11x: the time base is held in reset
A_RATE = 0x0F
B_SET = 0x80                    # the guest holds the clock to set it
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_BINARY = 0x04                 # binary rather than BCD
B_24HOUR = 0x02
C_IRQF = 0x80
C_PF, C_AF, C_UF = B_PIE, B_AIE, B_UIE      # each flag sits under its enable bit
D_VRT = 0x80                    # the battery is fine
HOUR_PM = 0x80                  # in 12-hour mode

POWER_ON_A = 0x26               # 32.768 kHz time base, 1024 Hz periodic rate
POWER_ON_B = B_24HOUR           # 24-hour BCD, no interrupts
UIP_LEAD = 0.001                # UIP rises this long before a second ends...
UIP_TAIL = 0.002                # ...and falls this long after (hardware: 244 us, 1984 us)
MIN_PERIOD = 1 / 1024           # faster periodic rates are served at 1024 Hz

EQUIPMENT = 0x14
EQUIPMENT_FPU = 0x02            # no floppy drives, VGA/EGA display, no PS/2 mouse
CHECKSUM = 0x2E                 # 16-bit sum of 0x10-0x2D, big-endian
BASE_MEMORY = 0x15              # KiB below 1 MiB
EXT_MEMORY = 0x17               # KiB above 1 MiB (and again at 0x30)
EXT_MEMORY_COPY = 0x30
MEMORY_ABOVE_16M = 0x34         # 64 KiB units between 16 MiB and the PCI hole
MEMORY_ABOVE_4G = 0x5B          # 64 KiB units above 4 GiB, 24 bits
SHUTDOWN_STATUS = 0x0F          # what the firmware does at the reset vector
SHUTDOWN_S3_RESUME = 0xFE       # SeaBIOS: resume through the FACS waking vector
CPU_COUNT = 0x5F                # CPUs - 1, where SeaBIOS looks for it under QEMU
BOOT_ORDER_FIRST = 0x3D         # QEMU's boot order nibbles: 1 floppy, 2 disk, 3 CD
BOOT_ORDER_THIRD = 0x38         # high nibble: third device; bit 0: skip floppy check
BOOT_DISK, BOOT_FLOPPY, BOOT_CDROM = 2, 1, 3

DAY = 86400
GREGORIAN_CYCLE = 146097        # days in 400 years of the Gregorian calendar
CALENDAR_SPAN = 24 * GREGORIAN_CYCLE * DAY      # years 1-9600: 24 cycles
LAST_YEAR = 9600
_DAYS_TO_1970 = 719468          # from 0000-03-01, where days_from_date's cycles start


def days_from_date(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a date of the proleptic Gregorian calendar.
    The year is counted from March, so that February's leap day ends it:
    then each month's first day follows from one formula.  (Arithmetic, not
    Python's datetime, whose module costs every VM about a millisecond of
    start-up.)"""
    year -= month <= 2
    cycle, year_of_cycle = divmod(year, 400)
    day_of_year = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    day_of_cycle = (year_of_cycle * 365 + year_of_cycle // 4 - year_of_cycle // 100
                    + day_of_year)
    return cycle * GREGORIAN_CYCLE + day_of_cycle - _DAYS_TO_1970


def date_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of the date DAYS after 1970-01-01: days_from_date undone."""
    cycle, day_of_cycle = divmod(days + _DAYS_TO_1970, GREGORIAN_CYCLE)
    year_of_cycle = (day_of_cycle - day_of_cycle // 1460 + day_of_cycle // 36524
                     - day_of_cycle // (GREGORIAN_CYCLE - 1)) // 365
    day_of_year = day_of_cycle - (365 * year_of_cycle + year_of_cycle // 4
                                  - year_of_cycle // 100)
    month_from_march = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * month_from_march + 2) // 5 + 1
    month = month_from_march + 3 if month_from_march < 10 else month_from_march - 9
    return cycle * 400 + year_of_cycle + (month <= 2), month, day


FIRST_SECOND = days_from_date(1, 1, 1) * DAY


class Rtc(Device):
    """Time of day, periodic/update/alarm interrupts and 256 bytes of NVRAM."""

    name = "rtc"
    savable = True
    STATE = ("nvram", "index", "ext_index", "a", "b", "flags", "offset", "held")

    def __init__(self, context, memory_size_low: int, memory_size_high: int, use_utc: bool,
                 cpus: int):
        self.context = context
        self._line = context.irq_line(RTC_IRQ, source="rtc")
        self._use_utc = use_utc
        self._nvram = bytearray(256)
        self._index = 0
        self._ext_index = 0
        self._a = POWER_ON_A
        self._b = POWER_ON_B
        self._flags = 0
        self._irq = False
        self._offset = 0.0              # clock seconds minus host seconds
        self._held = False              # the time registers in _nvram are the time
        self._last_second = math.floor(self._now())
        self._period: float | None = None
        self._next_tick = 0.0
        self._set_period()
        self._fill_platform_bytes(memory_size_low, memory_size_high, cpus)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        ports = context.ports.register("rtc", RTC_PORT, 4, self._io_read, self._io_write)
        for index_port in (RTC_PORT, RTC_PORT + 2):
            context.ports.queue_writes(ports, index_port, 1)

    def close(self) -> None:
        """Stop the interrupt thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)

    def acpi_objects(self) -> list[tuple[str, bytes]]:
        return [(ACPI_ISA, aml.device("RTC", aml.name("_HID", aml.eisa_id("PNP0B00")),
                                      aml.name("_CRS", aml.resource_template(
                                          aml.io(RTC_PORT, RTC_PORT, 1, 2),
                                          aml.irq_no_flags(RTC_IRQ)))))]

    # --- snapshots ------------------------------------------------------------------
    def save_state(self) -> dict:
        """NVRAM (time registers included), index registers, control registers,
        pending flags, and the clock as an offset from the host clock."""
        with self._cond:
            return {"nvram": encode(self._nvram), "index": self._index,
                    "ext_index": self._ext_index, "a": self._a, "b": self._b,
                    "flags": self._flags, "offset": self._offset, "held": self._held}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, self.STATE, self.name)
        nvram = decode(state["nvram"], "rtc nvram", length=len(self._nvram))
        registers = {key: uint(state[key], limit, f"rtc {key}") for key, limit in
                     (("index", 0x7F), ("ext_index", 0x7F), ("a", 0xFF), ("b", 0xFF),
                      ("flags", 0xFF))}
        offset = number(state["offset"], "rtc offset")
        held = flag(state["held"], "rtc held")
        with self._cond:
            self._nvram[:] = nvram
            self._index, self._ext_index = registers["index"], registers["ext_index"]
            self._a, self._b, self._flags = registers["a"], registers["b"], registers["flags"]
            self._offset, self._held = offset, held
            self._last_second = math.floor(self._now())
            self._set_period()
            self._start_thread()        # interrupts the guest had enabled go on

    def reset(self, power_on: dict) -> None:
        """The MC146818's RESET line: interrupt enables and flags clear; the
        clock and the CMOS bytes (battery-backed) stay as they are."""
        with self._cond:
            self._b &= ~(B_PIE | B_AIE | B_UIE | B_SQWE)
            self._flags = 0
            self._set_period()
            self._cond.notify()

    def suspend(self) -> None:
        with self._cond:
            self._nvram[SHUTDOWN_STATUS] = SHUTDOWN_S3_RESUME

    # --- what the platform tells firmware ---------------------------------------------
    def _fill_platform_bytes(self, low: int, high: int, cpus: int) -> None:
        """Memory sizes, CPU count and equipment where PC firmware (SeaBIOS, OVMF) and
        QEMU's and bhyve's conventions put them; `low` is the RAM below the PCI hole."""
        ext = min(max(low - MiB, 0) // KiB, 0xFFFF)
        self._put(BASE_MEMORY, min(low // KiB, 640), 2)
        self._put(EXT_MEMORY, ext, 2)
        self._put(EXT_MEMORY_COPY, ext, 2)
        self._put(MEMORY_ABOVE_16M, min(max(low - 16 * MiB, 0) // (64 * KiB), 0xFFFF), 2)
        self._put(MEMORY_ABOVE_4G, min(high // (64 * KiB), 0xFFFFFF), 3)
        self._nvram[CPU_COUNT] = cpus - 1 if 0 < cpus <= 0xFF else 0
        self._nvram[EQUIPMENT] = EQUIPMENT_FPU
        # QEMU's default order "cad": disk, floppy, CD; SeaBIOS reads it from here.
        self._nvram[BOOT_ORDER_FIRST] = BOOT_DISK | (BOOT_FLOPPY << 4)
        self._nvram[BOOT_ORDER_THIRD] = BOOT_CDROM << 4
        checksum = sum(self._nvram[0x10:CHECKSUM])
        self._nvram[CHECKSUM:CHECKSUM + 2] = checksum.to_bytes(2, "big")

    def _put(self, index: int, value: int, length: int) -> None:
        self._nvram[index:index + length] = value.to_bytes(length, "little")

    # --- port I/O: wide accesses are split into bytes, as an 8-bit ISA device sees them
    def _io_read(self, offset: int, size: int) -> int:
        value = 0
        with self._cond:
            for i in range(size):
                value |= self._port_read(offset + i) << (8 * i)
        return value

    def _io_write(self, offset: int, size: int, value: int) -> None:
        with self._cond:
            for i in range(size):
                self._port_write(offset + i, (value >> (8 * i)) & 0xFF)
            self._cond.notify()

    def _port_read(self, port: int) -> int:
        if port == 1:
            return self._read(self._index)
        if port == 3:
            return self._read(0x80 | self._ext_index)
        return 0xFF                     # the index ports are write-only

    def _port_write(self, port: int, value: int) -> None:
        if port == 0:
            self._index = value & 0x7F
        elif port == 1:
            self._write(self._index, value)
        elif port == 2:
            self._ext_index = value & 0x7F
        elif port == 3:
            self._write(0x80 | self._ext_index, value)

    # --- registers ------------------------------------------------------------------
    def _read(self, index: int) -> int:
        if index == REG_A:
            return self._a | (A_UIP if self._updating() else 0)
        if index == REG_B:
            return self._b
        if index == REG_C:
            self._sync()
            value = self._flags | (C_IRQF if self._irq else 0)
            self._flags = 0
            self._update_irq()
            return value
        if index == REG_D:
            return D_VRT
        if index in TIME_REGISTERS and not self._held:
            return self._clock_registers(self._now())[index]
        return self._nvram[index]

    def _write(self, index: int, value: int) -> None:
        if index == REG_A:
            self._sync()
            self._a = value & ~A_UIP
            self._clock_control_changed()
            self._set_period()
        elif index == REG_B:
            self._sync()
            self._b = value & ~B_UIE if value & B_SET else value   # SET clears UIE
            self._clock_control_changed()
            self._update_irq()
            self._start_thread()
        elif index in TIME_REGISTERS:
            if not self._held:
                self._hold()            # the byte replaces one field of the current time
            self._nvram[index] = value
            if not self._halted():
                self._release()
        elif index != REG_C and index != REG_D:     # C and D are read-only
            self._nvram[index] = value

    # --- the clock ------------------------------------------------------------------
    def _host_clock(self) -> float:
        """The host's time in the RTC's time zone, in seconds since 1970-01-01 00:00."""
        now = time.time()
        return now if self._use_utc else now + time.localtime(now).tm_gmtoff

    def _now(self) -> float:
        return self._host_clock() + self._offset

    def _halted(self) -> bool:
        return bool(self._b & B_SET) or self._a & A_DIVIDER_RESET == A_DIVIDER_RESET

    def _clock_control_changed(self) -> None:
        if self._halted() and not self._held:
            self._hold()
        elif not self._halted() and self._held:
            self._release()

    def _hold(self) -> None:
        """Stop the clock, leaving the current time in the time registers."""
        for index, value in self._clock_registers(self._now()).items():
            self._nvram[index] = value
        self._held = True

    def _release(self) -> None:
        """Restart the clock from the time registers, with a fresh second starting now."""
        seconds = self._registers_to_seconds()
        if seconds is None:
            self.context.warn_once("rtc-invalid-time", "guest set an invalid RTC date/time; "
                              "the RTC stops until it is given a valid one")
            return
        self._offset = seconds - self._host_clock()
        self._held = False
        self._last_second = seconds

    def _updating(self) -> bool:
        """UIP: the window around a second boundary in which guests must not read."""
        if self._held:
            return False
        fraction = self._now() % 1
        return fraction >= 1 - UIP_LEAD or fraction < UIP_TAIL

    def _encode(self, value: int) -> int:
        return value if self._b & B_BINARY else (value // 10) << 4 | value % 10

    def _decode(self, byte: int) -> int | None:
        if self._b & B_BINARY:
            return byte
        tens, units = byte >> 4, byte & 0x0F
        return tens * 10 + units if tens < 10 and units < 10 else None

    def _clock_registers(self, seconds: float) -> dict[int, int]:
        """The time registers for a clock reading, in the format register B asks for."""
        seconds = math.floor(seconds)
        if not FIRST_SECOND <= seconds < FIRST_SECOND + CALENDAR_SPAN:
            seconds = FIRST_SECOND + (seconds - FIRST_SECOND) % CALENDAR_SPAN
        days, second_of_day = divmod(seconds, DAY)
        year, month, day = date_from_days(days)
        hour, second_of_hour = divmod(second_of_day, 3600)
        minute, second = divmod(second_of_hour, 60)
        if self._b & B_24HOUR:
            encoded_hour = self._encode(hour)
        else:
            encoded_hour = self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)
        return {SEC: self._encode(second), MIN: self._encode(minute),
                HOUR: encoded_hour,
                WDAY: self._encode((days + 4) % 7 + 1),   # 1970-01-01 a Thursday; Sunday is 1
                MDAY: self._encode(day), MONTH: self._encode(month),
                YEAR: self._encode(year % 100), CENTURY: self._encode(year // 100)}

    def _registers_to_seconds(self) -> int | None:
        """The time the guest wrote into the time registers, or None if it is not a date.
        The day of the week is ignored: it follows from the date."""
        fields = [self._decode(self._nvram[index])
                  for index in (SEC, MIN, MDAY, MONTH, YEAR, CENTURY)]
        hour = self._decode_hour(self._nvram[HOUR])
        if None in fields or hour is None:
            return None
        second, minute, day, month, year, century = fields
        if year > 99 or not 0 < century * 100 + year <= LAST_YEAR:
            return None
        year += century * 100
        days = days_from_date(year, month, day)
        if date_from_days(days) != (year, month, day) or hour > 23 or minute > 59 or second > 59:
            return None         # no such date (a month 13, a 30 February) or time
        return days * DAY + hour * 3600 + minute * 60 + second

    def _decode_hour(self, byte: int) -> int | None:
        if self._b & B_24HOUR:
            return self._decode(byte)
        hour = self._decode(byte & ~HOUR_PM)
        if hour is None or not 1 <= hour <= 12:
            return None
        return hour % 12 + (12 if byte & HOUR_PM else 0)

    # --- interrupts -----------------------------------------------------------------
    def _set_period(self) -> None:
        """The periodic rate: 0 is off, 1 and 2 repeat 8 and 9, n is 65536 >> n Hz."""
        rate = self._a & A_RATE
        if rate == 0 or self._a & A_DIVIDER_RESET == A_DIVIDER_RESET:
            period = None
        else:
            period = max((1 << ((rate + 7 if rate < 3 else rate) - 1)) / 32768, MIN_PERIOD)
        if period != self._period:
            self._period = period
            self._next_tick = time.monotonic() + (period or 0)

    def _sync(self) -> None:
        """Set the register C flags for what happened since they were last looked at.
        AF is checked against the current second only; the thread, awake each second
        while AIE is on, sees every second."""
        if self._period is not None:
            now = time.monotonic()
            if now >= self._next_tick:
                self._flags |= C_PF
                self._next_tick += ((now - self._next_tick) // self._period + 1) * self._period
        if not self._held:
            seconds = self._now()
            second = math.floor(seconds)
            if second > self._last_second:
                self._flags |= C_UF
                registers = self._clock_registers(seconds)
                if all(self._nvram[alarm] >= ALARM_DONT_CARE or
                       self._nvram[alarm] == registers[field] for alarm, field in ALARMS):
                    self._flags |= C_AF
                    if self._b & B_AIE:
                        self.context.wake("rtc")
            self._last_second = second
        self._update_irq()

    def resync_irq(self) -> None:
        """Drive the line from register C again (after a restore lowered it)."""
        with self._cond:
            self._irq = False
            self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self._flags & self._b & (C_PF | C_AF | C_UF))
        if level != self._irq:
            self._irq = level
            self._line.set(level)

    def _next_event(self) -> float | None:
        """Seconds until the next event an enabled interrupt waits for; None if none."""
        delays = []
        if self._b & B_PIE and self._period is not None:
            delays.append(self._next_tick - time.monotonic())
        if self._b & (B_UIE | B_AIE) and not self._held:
            delays.append(1 - self._now() % 1)
        return max(min(delays), 0.0) if delays else None

    def _start_thread(self) -> None:
        if self._b & (B_PIE | B_UIE | B_AIE) and self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="rtc", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while not self._closed and self._b & (B_PIE | B_UIE | B_AIE):
                self._sync()
                self._cond.wait(self._next_event())
            self._thread = None
