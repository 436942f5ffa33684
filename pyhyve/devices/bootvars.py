"""The bootrom's variable store (bhyve's `-l bootrom,CODE,VARS`): the VARS
file, mapped just below the bootrom, where UEFI firmware keeps its variables
across runs.

As bhyve does, the store answers the few CFI flash commands that convince
EDK II's flash driver the area is persistent flash rather than RAM or ROM:
a write normally sets the command; after WRITE_BYTE (0x10) the next write
stores its bytes into the file; after CLEAR_STATUS (0x50) or READ_STATUS
(0x70) the next read returns 0 (ready, no error); everything else reads
the file (READ_ARRAY).  A plain write therefore never changes a variable,
on bhyve as on real flash.

The file is mapped shared and handed to KVM as a read-only memslot, so the
guest reads it at memory speed and every write exits to this device, which
writes through the mapping into the file.  While a status command waits
for its read, the memslot is taken away so that reads exit too.  The file
is synced (fsync, which on Linux also writes the mapping's dirty pages)
when a snapshot is taken and when the VM closes.

A snapshot keeps the command state, not the file's contents: like a disk,
the file is the operator's, and a restore uses it as it is then (it must be
the same size).

Threading: vCPU threads call in; a lock orders the command state machine
and the memslot changes.
"""

import contextlib
import mmap
import os
import threading

from ..lifecycle import Device, StateError, expect_keys, uint

WRITE_BYTE = 0x10
CLEAR_STATUS = 0x50
READ_STATUS = 0x70
READ_ARRAY = 0xFF
STATUS_COMMANDS = (CLEAR_STATUS, READ_STATUS)


class BootVars(Device):
    name = "bootvars"
    savable = True

    def __init__(self, context, gpa: int, file, backing: mmap.mmap):
        """`file` (open for reading and writing) and `backing` (its shared
        mapping, which guest memory maps at `gpa`) become the device's: it
        syncs them, and closes the file with the VM."""
        self.context = context
        self.gpa, self.size = gpa, len(backing)
        self._file, self._backing = file, backing
        self._lock = threading.Lock()
        self._command = READ_ARRAY
        context.mmio.register(self.name, gpa, self.size, self._read, self._write)

    def _set_command(self, command: int) -> None:
        """Called with the lock held: the memslot is there unless a status read is due."""
        was_status, status = self._command in STATUS_COMMANDS, command in STATUS_COMMANDS
        self._command = command
        if was_status != status:
            self.context.memory.set_guest_mapped(self.gpa, not status)

    def _read(self, offset: int, size: int) -> int:
        """Only while the memslot is away (or a read raced its return)."""
        with self._lock:
            if self._command in STATUS_COMMANDS:
                self._set_command(READ_ARRAY)
                return 0
            return int.from_bytes(self._backing[offset:offset + size], "little")

    def _write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if self._command != WRITE_BYTE:
                self._set_command(value & 0xFF)
                return
            fit = min(size, self.size - offset)
            self._backing[offset:offset + fit] = value.to_bytes(size, "little")[:fit]
            self._set_command(READ_ARRAY)

    # --- lifecycle ------------------------------------------------------------------------
    def save_state(self) -> dict:
        with self._lock:
            return {"command": self._command, "size": self.size}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("command", "size"), self.name)
        command = uint(state["command"], 0xFF, "bootvars command")
        if state["size"] != self.size:
            raise StateError(f"the variable file was {state['size']!r} bytes, "
                             f"it is {self.size} now")
        with self._lock:
            self._set_command(command)

    @contextlib.contextmanager
    def quiesce(self):
        self._sync()
        yield

    def _sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._sync()
        except OSError as exc:
            self.context.warn_once("bootvars-sync", "cannot sync the bootrom variable "
                                   "file: %s", exc.strerror or exc)
        self._file.close()
