"""System control ports: the chipset's single-byte registers that act on the
machine itself rather than on a device.

- 0x92, System Control Port A ("fast A20 and reset"): bit 1 gates A20, and
  bit 0 going from 0 to 1 resets the machine.
- 0xCF9, the PIIX/ICH Reset Control Register: a write with RST_CPU (bit 2)
  resets the machine; SYS_RST (bit 1), which picks the kind of reset, is kept
  for reads.  It is claimed as one byte: 0xCF8 below it is the PCI config
  address register and 0xCFC above it the config data window.
- 0x80, the POST code port: firmware reports its progress there, and Linux
  writes it just to wait (outb_p).  KVM queues those writes
  (iobus.queue_writes): the guest does not leave for them.

Every reset ends the VM with exit status 0, as bhyve does; whoever ran it
starts it again.  KVM cannot gate A20, so the A20 bit is only remembered.
"""

from ..lifecycle import Device, expect_keys, uint
from ..vcpu import ExitStatus

PORT_A = 0x92
PORT_A_RESET = 0x01
RESET_CONTROL = 0xCF9
RC_SYS_RST = 0x02
RC_RST_CPU = 0x04
POST_PORT = 0x80


def _high_ones(size: int) -> int:
    """All ones in the bytes of a wide read that fall on the next ports."""
    return (1 << (8 * size)) - 0x100 if size > 1 else 0


class _ByteRegister(Device):
    """A register whose one byte is all its state."""

    savable = True
    _value = 0

    def save_state(self) -> dict:
        return {"value": self._value}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("value",), self.name)
        self._value = uint(state["value"], 0xFF, f"{self.name} value")


class SystemControlPortA(_ByteRegister):
    """Port 0x92: reads back what was written (A20 in bit 1)."""

    name = "port-a"

    def __init__(self, context):
        self.context = context
        self._value = 0
        context.ports.register("port-a", PORT_A, 1, self._read, self._write)

    def _read(self, offset: int, size: int) -> int:
        return self._value | _high_ones(size)

    def _write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        previous, self._value = self._value, value
        if value & PORT_A_RESET and not previous & PORT_A_RESET:
            self.context.request_stop(ExitStatus.RESET)


class ResetControl(_ByteRegister):
    """Port 0xCF9: hard and soft resets are the same reset here, as in bhyve."""

    name = "reset-control"

    def __init__(self, context):
        self.context = context
        self._value = 0
        context.ports.register("reset-control", RESET_CONTROL, 1, self._read, self._write)

    def _read(self, offset: int, size: int) -> int:
        return self._value | _high_ones(size)

    def _write(self, offset: int, size: int, value: int) -> None:
        self._value = value & RC_SYS_RST
        if value & RC_RST_CPU:
            self.context.request_stop(ExitStatus.RESET)


class PostCodes(Device):
    """Port 0x80: `last` is the last code written, `count` how many writes there were."""

    name = "post"
    savable = True

    def __init__(self, context):
        self.last = 0
        self.count = 0
        port = context.ports.register("post", POST_PORT, 1, self._read, self._write)
        context.ports.queue_writes(port, POST_PORT, 1)

    def _read(self, offset: int, size: int) -> int:
        return self.last | _high_ones(size)

    def _write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF
        self.count += 1

    def save_state(self) -> dict:
        return {"last": self.last, "count": self.count}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("last", "count"), self.name)
        self.last = uint(state["last"], 0xFF, "post last")
        self.count = uint(state["count"], (1 << 64) - 1, "post count")
