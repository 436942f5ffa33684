"""The debug console port 0x402 (QEMU's isa-debugcon; SeaBIOS logs to it).

Bytes written go to a file (`-l debugcon,file=PATH`, through a
chardev.FileBackend, so it has the same size limit); byte reads return
0xE9, which is how firmware probes that the port exists.  bhyve's PM1a enable
register also lives at 0x402 and is 16 bits wide, so only byte accesses are
taken here and word accesses still reach the PM1 block.

The guest sees nothing of its bytes once written, so KVM queues the byte
writes (iobus.queue_writes) rather than exit for each: a firmware's log
costs the guest no exits.  They reach the file at the port's next read,
when KVM's ring is full, when the VM pauses or stops, or within the flush
thread's 20 ms.
"""

from ..lifecycle import Device
from .chardev import FileBackend

DEBUGCON_PORT = 0x402
PROBE_VALUE = 0xE9


class DebugConsole(Device):
    name = "debugcon"
    savable = True          # what it wrote is in its file; it holds nothing

    def __init__(self, context, path: str, append: bool = False, limit: int | None = None):
        """append: go on writing where a saved VM stopped (pyhyve -r)."""
        self.path = path
        self._file = FileBackend("debugcon", path, *(() if limit is None else (limit,)),
                                 truncate=not append)
        port = context.ports.register_sized("debugcon", DEBUGCON_PORT, frozenset((1,)),
                                            self._read, self._write)
        context.ports.queue_writes(port, DEBUGCON_PORT, 1)  # a PM1 word write is wider: exits

    def _read(self, offset: int, size: int) -> int:
        return PROBE_VALUE

    def _write(self, offset: int, size: int, value: int) -> None:
        self._file.write(bytes((value & 0xFF,)))

    def close(self) -> None:
        self._file.close()
