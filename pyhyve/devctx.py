"""What a device may use of the machine it is plugged into.

A device gets a DeviceContext, not the VirtualMachine: guest memory (the
bounds-checked views), the port and MMIO buses to register on (and to ask
for write notifiers, which the machine backs with KVM ioeventfds), interrupt
lines by number, MSI, a way to ask the machine to stop, the per-VM I/O
thread, the VM's input router (where keyboard and pointer devices register), and a log-once for guest mistakes.  That is all of the machine a
device author has to understand, and all a test has to provide (as propolis
gives a device an IntrPin rather than the VM).  Nothing here calls KVM
itself: the machine behind it does.

Threading: every method may be called from any thread (vCPU threads, the
I/O thread, device timers).
"""

from .inputroute import InputRouter
from .iothread import IoThread


class IrqLine:
    """One wired interrupt line (an ISA IRQ or I/O APIC pin) as one source
    drives it; lines shared by several sources are high while any holds them."""

    __slots__ = ("irq", "source", "_machine")

    def __init__(self, machine, irq: int, source: str):
        self._machine, self.irq, self.source = machine, irq, source

    def set(self, level: bool) -> None:
        self._machine.set_irq_level(self.irq, level, self.source)


class DeviceContext:
    """The narrow handle a device is built with (see the module docstring)."""

    def __init__(self, machine):
        self._machine = machine
        self.memory = machine.memory
        self.ports = machine.ports
        self.mmio = machine.mmio
        self._io_thread: IoThread | None = None
        self.input = InputRouter()      # keyboards and pointers, fed by the consoles

    @property
    def vm_name(self) -> str:
        return self._machine.name

    def irq_line(self, irq: int, source: str = "platform") -> IrqLine:
        return IrqLine(self._machine, irq, source)

    def signal_msi(self, address: int, data: int) -> None:
        self._machine.signal_msi(address, data)

    def request_stop(self, status: int) -> None:
        """End the VM with bhyve's exit status (an ExitStatus): a reset or
        power-off the guest asked the chipset for; or, for a test device
        only, with any other status as a plain int (isa-debug-exit's)."""
        self._machine.stop(status, cause="guest")

    def request_suspend(self) -> None:
        """The guest put the machine to sleep (ACPI S3, through the PM device)."""
        self._machine.request_suspend()

    def wake(self, source: str) -> None:
        """A wake event ("rtc": the RTC alarm): wakes the machine if it sleeps
        and the PM device lets that source wake it; otherwise nothing."""
        self._machine.wakeup(source)

    def warn_once(self, key, message: str, *args) -> None:
        """Log a guest-caused problem the first time it happens (per key, per VM)."""
        self._machine.warn_once(key, message, *args)

    def plug(self, device) -> None:
        """For buses: a device now on the bus becomes one of the machine's
        (saved, paused and closed with it, described in its ACPI tables)."""
        self._machine.add_device(device)

    def unplug(self, device) -> None:
        """For buses: a device taken off the bus leaves the machine's list,
        and the firmware tables no longer describe it."""
        self._machine.remove_device(device)

    def io_thread(self) -> IoThread:
        """The VM's I/O thread, started on first use and closed with the machine."""
        if self._io_thread is None:
            self._io_thread = IoThread()
            self._machine.closables.append(self._io_thread)
        return self._io_thread
