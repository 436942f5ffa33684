"""QEMU's isa-debug-exit: a test guest ends the VM, and pyhyve's process,
with a status of its own choosing.

A write of VALUE (1, 2 or 4 bytes, anywhere in the claimed ports) stops the
VM with status (VALUE << 1) | 1, as QEMU's exit() does; the process exits
with its low 8 bits, which is all a parent sees of any exit status.  Reads
return 0, as bhyve's pc-testdev answers them.  kvm-unit-tests and similar
third-party test kernels report pass or fail this way (at 0xf4, 4 ports).

A test device only: its statuses overlap bhyve's (1 is "powered off", 3
"triple fault"), so whoever runs a guest with it must know the guest's
convention.  Nothing is saved: the device has no state.
"""

from ..config import ConfigError
from ..iobus import BusConflict
from ..lifecycle import Device

DEFAULT_IOBASE = 0x501          # QEMU's defaults
DEFAULT_IOSIZE = 2


class DebugExit(Device):
    name = "isa-debug-exit"
    savable = True

    def __init__(self, context, iobase: int = DEFAULT_IOBASE, iosize: int = DEFAULT_IOSIZE):
        self.context = context
        self.iobase, self.iosize = iobase, iosize
        try:
            context.ports.register(self.name, iobase, iosize, self._read, self._write)
        except BusConflict as exc:
            raise ConfigError(str(exc)) from None

    def _read(self, offset: int, size: int) -> int:
        return 0

    def _write(self, offset: int, size: int, value: int) -> None:
        self.context.request_stop(((value << 1) | 1) & 0xFF)
