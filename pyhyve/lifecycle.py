"""The contract every device keeps, platform and PCI alike.

A VM holds its devices in one list (VirtualMachine.devices), in the order it
built them, and drives them all the same way, as propolis's Lifecycle and
Migrate traits do: snapshots save and restore each device by its name
without knowing its class, and closing the VM closes each once.

- `savable`: whether save_state() holds everything the device knows.  Nothing
  is presumed: a device that does not say True makes a snapshot refuse,
  naming it, rather than write one that would not run.
- save_state() -> dict of JSON values, taken while the vCPUs are paused and
  the device is quiesced.  restore_state(state) takes it back into a device
  freshly built from the same config and not yet running; saved data is not
  trusted, so every field is checked (the readers below) and anything that
  does not fit raises StateError, before the device changes.
- reset(power_on): back to the state a machine reset leaves it in.  The
  machine keeps what save_state() gave when the device was added, and the
  default takes that back; a device with state a reset does not touch (the
  RTC's clock and CMOS) overrides.
- suspend(): the guest put the machine to sleep (ACPI S3) and its vCPUs
  have stopped; what the device leaves for the firmware's resume path (the
  RTC marks the CMOS shutdown status, as QEMU's does).  Memory and device
  state stay as they are until the machine wakes.
- wake(power_on): the machine wakes from S3, which is a reset of the
  machine into its firmware, as QEMU makes it; by default reset(power_on).
  A device that firmware finds as it left it on waking overrides (the host
  bridge keeps its PAM registers, as QEMU's i440FX does, so that SeaBIOS's
  resume path runs from its shadow copy in RAM).
- resync_irq(): after a restore or reset lowered every interrupt line, raise
  again what the device's registers ask for.
- pause()/resume(): the VM is paused (its vCPUs are, before pause() is
  called) and the device stops acting on the guest of its own accord (a
  counter that advances, host input written into guest memory) until
  resume(), which the VM calls before its vCPUs run again.
- quiesce(): a context in which the device finishes work in flight and takes
  no more (a snapshot is being written).
- acpi_objects(): what the device adds to the DSDT (bhyve's pe_write_dsdt),
  as (where, AML) pairs; the tables are built from the devices the VM has.
- close(): release threads, files and host resources; idempotent.
"""

import binascii
import contextlib


# where a device's ACPI objects go in the DSDT
ACPI_ISA = "isa"            # behind the LPC bridge (\_SB.PCI0.ISA; \_SB without one)
ACPI_SYSTEM = "system"      # \_SB
ACPI_PCI_ROOT = "pci"       # \_SB.PCI0, beside the PCI functions


class StateError(ValueError):
    """Saved device state that does not fit the device; the message names the field."""


class Device:
    """Defaults for devices that have no threads, no interrupts, nothing to
    release and no state (the chipset's fixed ports)."""

    name = "?"              # unique within the VM: the key of its saved state
    savable = False

    @property
    def description(self) -> str:
        """How messages to a user name it."""
        return self.name

    def save_state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, (), self.name)

    def reset(self, power_on: dict) -> None:
        self.restore_state(power_on)

    def suspend(self) -> None:
        pass

    def wake(self, power_on: dict) -> None:
        self.reset(power_on)

    def resync_irq(self) -> None:
        pass

    def acpi_objects(self) -> list[tuple[str, bytes]]:
        """(ACPI_ISA, ACPI_SYSTEM or ACPI_PCI_ROOT, AML) for each object the
        device describes itself with in the DSDT (an aml.device(), say)."""
        return []

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    @contextlib.contextmanager
    def quiesce(self):
        yield

    def close(self) -> None:
        pass


# --- readers for restore_state: saved data is checked, never trusted ----------------
def expect_keys(state, keys, owner: str) -> None:
    """A dict with exactly these keys."""
    if not isinstance(state, dict):
        raise StateError(f"{owner}: saved state is not an object")
    if set(state) != set(keys):
        raise StateError(f"{owner}: saved state has fields {sorted(state)}, "
                         f"expected {sorted(keys)}")


def uint(value, limit: int, what: str) -> int:
    """An integer in [0, limit]."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise StateError(f"{what} is {value!r}, not an integer from 0 to {limit:#x}")
    return value


def bits(value, mask: int, what: str) -> int:
    """An integer with no bit set outside `mask` (a register's writable bits)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value & ~mask:
        raise StateError(f"{what} is {value!r}, not a number within {mask:#x}")
    return value


def optional_uint(value, limit: int, what: str) -> int | None:
    return None if value is None else uint(value, limit, what)


def flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise StateError(f"{what} is {value!r}, not true or false")
    return value


def number(value, what: str) -> float:
    """A finite real number (times and offsets)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        raise StateError(f"{what} is {value!r}, not a finite number")
    return float(value)


def encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def decode(value, what: str, length: int | None = None, limit: int | None = None) -> bytes:
    """Bytes saved with encode(): exactly `length` of them, or at most `limit`."""
    if not isinstance(value, str):
        raise StateError(f"{what} is {type(value).__name__}, not base64 text")
    try:
        data = binascii.a2b_base64(value, strict_mode=True)
    except ValueError:
        raise StateError(f"{what} is not valid base64") from None
    if length is not None and len(data) != length:
        raise StateError(f"{what} has {len(data)} bytes, not {length}")
    if limit is not None and len(data) > limit:
        raise StateError(f"{what} has {len(data)} bytes, more than {limit}")
    return data
