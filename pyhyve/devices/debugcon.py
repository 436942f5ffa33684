"""The debug console port 0x402 (QEMU's isa-debugcon; SeaBIOS logs to it).

Bytes written go to a file (`-l debugcon,file=PATH`); byte reads return
0xE9, which is how firmware probes that the port exists.  bhyve's PM1a enable
register also lives at 0x402 and is 16 bits wide, so only byte accesses are
taken here and word accesses still reach the PM1 block.
"""

from ..lifecycle import Device

DEBUGCON_PORT = 0x402
PROBE_VALUE = 0xE9


class DebugConsole(Device):
    name = "debugcon"
    savable = True          # what it wrote is in its file; it holds nothing

    def __init__(self, context, path: str, append: bool = False):
        """append: go on writing where a saved VM stopped (pyhyve -r)."""
        self.path = path
        self._file = open(path, "ab" if append else "wb", buffering=0)
        context.ports.register_sized("debugcon", DEBUGCON_PORT, frozenset((1,)),
                                self._read, self._write)

    def _read(self, offset: int, size: int) -> int:
        return PROBE_VALUE

    def _write(self, offset: int, size: int, value: int) -> None:
        if self._file is not None:
            self._file.write(bytes((value & 0xFF,)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
