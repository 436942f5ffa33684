"""A stand-in for VirtualMachine that device unit tests drive directly.

It has the real port and MMIO buses and real GuestMemory (whose memslot calls
go to a recorder instead of KVM), and records IRQ levels, MSIs and stop
requests, so a device model can be exercised through the same entry points
the vm_loop uses without /dev/kvm.
"""

from pyhyve.config import Config
from pyhyve.devctx import DeviceContext
from pyhyve.iobus import MmioBus, PortBus
from pyhyve.layout import MiB
from pyhyve.memory import GuestMemory


class _NoExtensions:
    def check_extension(self, cap) -> int:
        return 0


class RecordingKvmVm:
    """Accepts the VM ioctls GuestMemory and devices make, and remembers them.
    Dirty logging is accepted and logs nothing: no vCPU writes here."""

    kvm = _NoExtensions()

    def __init__(self):
        self.memslots: dict[int, tuple] = {}
        self.irq_lines: list[tuple[int, int]] = []
        self.msis: list[tuple[int, int]] = []

    def set_user_memory_region(self, slot, gpa, size, host_addr, flags=0):
        if size:
            self.memslots[slot] = (gpa, size, flags)
        else:
            self.memslots.pop(slot, None)

    def get_dirty_log(self, slot, bitmap):
        pass

    def irq_line(self, irq, level):
        self.irq_lines.append((irq, level))

    def signal_msi(self, address, data):
        self.msis.append((address, data))
        return 1


class FakeVm:
    def __init__(self, memory_size: int = 16 * MiB, config: Config | None = None):
        self.name = "fake"
        self.config = config or Config()
        self.kvm_vm = RecordingKvmVm()
        self.memory = GuestMemory(self.kvm_vm, memory_size)
        self.ports = PortBus()
        self.mmio = MmioBus()
        self.irq_levels: dict[int, bool] = {}
        self.irq_sources: dict[int, set] = {}
        self.stops: list = []
        self.suspends = 0               # request_suspend() calls (ACPI S3)
        self.wakes: list[str] = []      # wakeup() sources
        self.warnings: list[str] = []
        self.closables: list = []
        self.devices: list = []
        self.stopping = False
        self.context = DeviceContext(self)

    def add_device(self, device):
        self.devices.append(device)
        return device

    def remove_device(self, device):
        self.devices.remove(device)

    def set_irq_level(self, irq: int, level: bool, source: str = "platform") -> None:
        """Shared lines as VirtualMachine models them: high while any source asserts."""
        sources = self.irq_sources.setdefault(irq, set())
        (sources.add if level else sources.discard)(source)
        self.irq_levels[irq] = bool(sources)

    def stop(self, status, vcpu=None, cause="host") -> None:
        self.stops.append(status)
        self.stopping = True

    def request_suspend(self) -> None:
        self.suspends += 1

    def wakeup(self, source: str = "host") -> bool:
        self.wakes.append(source)
        return False

    def warn_once(self, key, message: str, *args) -> None:
        self.warnings.append(message % args if args else message)

    # what the vm_loop does for an access, for tests
    def port_read(self, port: int, size: int) -> int:
        entry = self.ports.lookup(port)
        if entry is None:
            return (1 << (8 * size)) - 1
        return entry.read(port - entry.base, size) & ((1 << (8 * size)) - 1)

    def port_write(self, port: int, size: int, value: int) -> None:
        entry = self.ports.lookup(port)
        if entry is not None:
            entry.write(port - entry.base, size, value & ((1 << (8 * size)) - 1))

    def mmio_read(self, addr: int, size: int) -> int:
        entry = self.mmio.lookup(addr)
        if entry is None:
            return (1 << (8 * size)) - 1
        return entry.read(addr - entry.base, size) & ((1 << (8 * size)) - 1)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        entry = self.mmio.lookup(addr)
        if entry is not None:
            entry.write(addr - entry.base, size, value & ((1 << (8 * size)) - 1))
