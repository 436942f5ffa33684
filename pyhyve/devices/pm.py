"""ACPI PM1 event/control blocks and the PM timer, where bhyve puts them.

PM1a_EVT at 0x400 (status, enable), PM1a_CNT at 0x404, PM_TMR at 0x408.
Writing SLP_EN with SLP_TYP 5 (S5, bhyve's value) powers the VM off; with
SLP_TYP 1 (S3, QEMU's value) the machine sleeps (VirtualMachine's suspend
to RAM); the DSDT's _S5 and _S3 say so.  Any other sleep type (S1, S4: the
DSDT offers none) is refused with a log line and the guest runs on.  The
power button (SIGTERM to pyhyve, as in bhyve) sets PWRBTN_STS and raises
the SCI.

Waking from S3 resets the machine, this device included; woken() then
sets WAK_STS and the status bit of what woke it, as QEMU does: RTC_STS for
the RTC alarm (a wake source only while RTC_EN is set in PM1_EN),
PWRBTN_STS for the power button and for a host's wakeup (QEMU's
system_wakeup pretends to be the power button too).
"""

import time

from ..lifecycle import Device, expect_keys, uint
from ..vcpu import ExitStatus

PM1A_EVT_PORT = 0x400
PM1A_CNT_PORT = 0x404
PM_TMR_PORT = 0x408
SCI_IRQ = 9
PM_TIMER_HZ = 3579545
PWRBTN_STS = 1 << 8
PWRBTN_EN = 1 << 8
RTC_STS = 1 << 10
RTC_EN = 1 << 10
WAK_STS = 1 << 15
TMR_STS = 1 << 0
SCI_EN = 1 << 0
SLP_EN = 1 << 13
SLP_TYP_SHIFT = 10
SLP_TYP_S5 = 5
SLP_TYP_S3 = 1
SLP_TYP_MASK = 7
# what woke the machine (VirtualMachine.wakeup's source): its PM1_STS bits
WAKE_STATUS = {"rtc": WAK_STS | RTC_STS, "power-button": WAK_STS | PWRBTN_STS,
               "host": WAK_STS | PWRBTN_STS}
PM1_STS_WRITABLE = 0x8D31       # WAK, RTC, SLPBTN, PWRBTN, GBL, BM, TMR


class PowerManagement(Device):
    """bhyve's pm.c registers on the VM's port bus."""

    name = "pm"
    savable = True          # the PM timer runs from the host clock: no state

    def __init__(self, context):
        self.context = context
        self._sci = context.irq_line(SCI_IRQ)
        self.status = 0
        self.enable = 0
        self.control = SCI_EN       # the FADT has no SMI_CMD: ACPI is always on
        self._epoch = time.monotonic_ns()
        context.ports.register("pm1a-evt", PM1A_EVT_PORT, 4, self._evt_read, self._evt_write)
        context.ports.register("pm1a-cnt", PM1A_CNT_PORT, 2, self._cnt_read, self._cnt_write)
        context.ports.register("pm-tmr", PM_TMR_PORT, 4, self._tmr_read, self._ignore)

    def timer(self) -> int:
        """The 3.579545 MHz PM timer, 32 bits wide (FADT TMR_VAL_EXT)."""
        elapsed = time.monotonic_ns() - self._epoch
        return (elapsed * PM_TIMER_HZ // 1_000_000_000) & 0xFFFFFFFF

    def _tmr_read(self, offset: int, size: int) -> int:
        return self.timer() >> (8 * offset)

    def _ignore(self, offset: int, size: int, value: int) -> None:
        self.context.warn_once("pm-tmr-write", "guest wrote to the read-only PM timer")

    def _evt_read(self, offset: int, size: int) -> int:
        value = self.status | (self.enable << 16)
        return value >> (8 * offset)

    def _evt_write(self, offset: int, size: int, value: int) -> None:
        value = (value << (8 * offset)) & ((1 << (8 * (offset + size))) - 1)
        lanes = ((1 << (8 * size)) - 1) << (8 * offset)
        if lanes & 0xFFFF:
            self.status &= ~(value & PM1_STS_WRITABLE)     # write 1 to clear
        if lanes & 0xFFFF0000:
            self.enable = (value >> 16) & 0xFFFF
        self._update_sci()

    def _cnt_read(self, offset: int, size: int) -> int:
        return self.control >> (8 * offset)

    def _cnt_write(self, offset: int, size: int, value: int) -> None:
        value = (value << (8 * offset)) & 0xFFFF
        mask = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFF
        self.control = (self.control & ~mask) | (value & mask & ~SLP_EN)
        if not value & SLP_EN:
            return
        sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
        if sleep_type == SLP_TYP_S5:
            self.context.request_stop(ExitStatus.POWEROFF)
        elif sleep_type == SLP_TYP_S3:
            self.context.request_suspend()
        else:
            self.context.warn_once(("pm-sleep-type", sleep_type),
                                   "guest asked for sleep type %d, which the DSDT does not "
                                   "offer (only _S3 = %d and _S5 = %d): refused, it runs on",
                                   sleep_type, SLP_TYP_S3, SLP_TYP_S5)

    def wake_enabled(self, source: str) -> bool:
        """Whether SOURCE may wake the machine: the RTC alarm only with RTC_EN;
        the power button and the host always."""
        return source != "rtc" or bool(self.enable & RTC_EN)

    def woken(self, source: str) -> None:
        """After the reset that woke the machine: what the firmware and OS read
        in PM1_STS about the wake."""
        self.status |= WAKE_STATUS[source]
        self._update_sci()

    def press_power_button(self) -> None:
        """What the ACPI power button does: PWRBTN_STS, then an SCI if enabled."""
        self.status |= PWRBTN_STS
        self._update_sci()

    @property
    def acpi_enabled(self) -> bool:
        return bool(self.control & SCI_EN)

    def save_state(self) -> dict:
        return {"status": self.status, "enable": self.enable, "control": self.control}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("status", "enable", "control"), self.name)
        registers = {key: uint(state[key], 0xFFFF, f"pm {key}") for key in state}
        self.status, self.enable, self.control = (registers["status"], registers["enable"],
                                                  registers["control"])

    def resync_irq(self) -> None:
        """Drive the SCI from the PM1 registers again (after a restore lowered it)."""
        self._update_sci()

    def _update_sci(self) -> None:
        self._sci.set(bool(self.status & self.enable & 0xFFFF))
