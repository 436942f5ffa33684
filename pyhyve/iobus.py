"""Port-I/O and MMIO dispatch (bhyve's inout.c and mem.c).

Devices claim address ranges with a read and a write callback:
    read(offset, size) -> int        write(offset, size, value) -> None
where `offset` is relative to the start of the claimed range.  Port lookups
are a dict hit per port; MMIO ranges are found by bisection.

A device that only needs to know that the guest wrote somewhere (a virtio
queue's notify register) asks the bus for a write notifier: an eventfd that
the hypervisor signals without leaving the guest (KVM's ioeventfd, set up
by the VM as the bus's `notifier`).  Where there is none, or it refuses,
add_notifier() says so and the write exits to the range's callback as any
other: a device never talks to KVM itself.

A device whose register only stores what the guest writes, with nothing to
show for it until the guest's next access to the device (an index register,
a byte on its way out), lets the hypervisor queue those writes
(queue_writes(): KVM's coalesced MMIO and PIO) and saves the guest an exit
each.  The bus then has the queue flushed before every read or write that
reaches the device, so the device sees its accesses in the guest's order.
"""

import bisect
from collections.abc import Callable

Read = Callable[[int, int], int]
Write = Callable[[int, int, int], None]


class BusConflict(Exception):
    """Two devices claimed overlapping ranges."""


class NotifierUnavailable(Exception):
    """A write notifier cannot be set up; the message says why."""


# notifier(fd, address, size, datamatch, deassign): the hypervisor's half
Notifier = Callable[[int, int, int, "int | None", bool], None]


class _Notifiers:
    """Write notifiers, shared by both buses."""

    notifier: Notifier | None = None

    @property
    def notifies(self) -> bool:
        """Whether add_notifier() can work at all on this bus."""
        return self.notifier is not None

    def add_notifier(self, fd: int, address: int, size: int,
                     datamatch: int | None = None) -> None:
        """Writes of `size` bytes at `address` (of value `datamatch`, if given)
        signal eventfd `fd` and reach no callback; NotifierUnavailable if not."""
        if self.notifier is None:
            raise NotifierUnavailable("the hypervisor offers no write notifiers")
        self.notifier(fd, address, size, datamatch, False)

    def remove_notifier(self, fd: int, address: int, size: int,
                        datamatch: int | None = None) -> None:
        if self.notifier is not None:
            self.notifier(fd, address, size, datamatch, True)


class WriteQueue:
    """The hypervisor's half of queue_writes (an interface:
    coalesced.CoalescedWrites has it)."""

    def queue(self, address: int, size: int, pio: bool, on: bool) -> bool: ...

    def flush(self) -> None: ...


class _QueuedWrites:
    """Writes the hypervisor queues rather than exits for, shared by both buses."""

    write_queue: WriteQueue | None = None
    pio = False

    def queue_writes(self, entry: "Range", address: int, size: int) -> bool:
        """Writes of the guest inside [address, address + size), a part of
        ENTRY, wait in the hypervisor's queue and reach entry's write callback
        later, in order, and always before the next access that exits to
        ENTRY.  False where the hypervisor cannot queue them: they exit as
        before."""
        if not entry.base <= address < address + size <= entry.end:
            raise ValueError(f"{entry.name}: {address:#x}+{size} is outside {entry!r}")
        if self.write_queue is None:
            return False
        self.flush_first(entry)
        if not self.write_queue.queue(address, size, self.pio, True):
            return False
        if entry.queued is None:
            entry.queued = set()
        entry.queued.add((address, size))
        return True

    def flush_first(self, entry: "Range") -> None:
        """Have the queue flushed before every access that exits to ENTRY:
        a range with queued writes, or one whose registers decide what
        another range's queued writes do (the VGA's ports, for its window)."""
        if self.write_queue is None or entry.direct_write is not None:
            return
        flush, read, write = self.write_queue.flush, entry.read, entry.write

        def flushed_read(offset: int, size: int) -> int:
            flush()
            return read(offset, size)

        def flushed_write(offset: int, size: int, value: int) -> None:
            flush()
            write(offset, size, value)
        entry.read, entry.write, entry.direct_write = flushed_read, flushed_write, write

    def flush_queued(self) -> None:
        """Hand every queued write to its device now (for a device that is
        reached other than through this bus: a PCI BAR's registers, its
        display thread)."""
        if self.write_queue is not None:
            self.write_queue.flush()

    def unqueue_writes(self, entry: "Range", address: int, size: int) -> None:
        """Writes inside [address, address + size) exit again (once the
        queue's earlier ones reach their device, at the next flush)."""
        if entry.queued and (address, size) in entry.queued:
            entry.queued.discard((address, size))
            self.write_queue.queue(address, size, self.pio, False)

    def _unqueue_all(self, entry: "Range") -> None:
        """ENTRY leaves the bus: what the guest queued for it arrives first,
        and the addresses it queued exit again, to whoever claims them next."""
        if entry.queued:
            self.write_queue.flush()
            for address, size in list(entry.queued):
                self.unqueue_writes(entry, address, size)


class Range:
    __slots__ = ("name", "base", "end", "read", "write", "under", "direct_write", "queued")

    def __init__(self, name: str, base: int, length: int, read: Read, write: Write):
        self.name = name
        self.base = base
        self.end = base + length
        self.read = read
        self.write = write
        self.under = None
        self.direct_write: Write | None = None  # write, where the bus wrapped it
        self.queued: set[tuple[int, int]] | None = None     # zones of queue_writes

    def __repr__(self) -> str:
        return f"<Range {self.name} {self.base:#x}-{self.end - 1:#x}>"


class PortBus(_Notifiers, _QueuedWrites):
    """The 64 KiB x86 I/O port space."""

    pio = True

    def __init__(self):
        self._ports: dict[int, Range] = {}
        # lookup(port) -> Range | None is the dict's own get: a C call, not a
        # Python frame, on every port exit
        self.lookup = self._ports.get

    def register(self, name: str, base: int, length: int, read: Read, write: Write) -> Range:
        if base < 0 or length <= 0 or base + length > 0x10000:
            raise BusConflict(f"{name}: ports {base:#x}+{length} are outside 0-0xffff")
        clash = [self._ports[p] for p in range(base, base + length) if p in self._ports]
        if clash:
            raise BusConflict(f"{name}: ports {base:#x}+{length} overlap {clash[0]!r}")
        entry = Range(name, base, length, read, write)
        for port in range(base, base + length):
            self._ports[port] = entry
        return entry

    def register_sized(self, name: str, port: int, sizes: frozenset, read: Read,
                       write: Write) -> Range:
        """Take accesses of the given widths at one port, leaving the others to the
        range already there (bhyve's PM1 enable and QEMU's debugcon share 0x402)."""
        under = self._ports.get(port)
        own = Range(name, port, 1, read, write)

        def split_read(offset: int, size: int) -> int:
            if size in sizes:
                return own.read(0, size)
            return under.read(port - under.base, size) if under else (1 << (8 * size)) - 1

        def split_write(offset: int, size: int, value: int) -> None:
            if size in sizes:
                own.write(0, size, value)
            elif under:
                under.write(port - under.base, size, value)

        entry = Range(name, port, 1, split_read, split_write)
        entry.under = under
        self._ports[port] = entry
        return entry

    def unregister(self, entry: Range) -> None:
        self._unqueue_all(entry)
        for port in range(entry.base, entry.end):
            if self._ports.get(port) is entry:
                if entry.under is None:
                    del self._ports[port]
                else:
                    self._ports[port] = entry.under

    def ranges(self) -> list[Range]:
        return sorted(set(self._ports.values()), key=lambda r: r.base)


class MmioBus(_Notifiers, _QueuedWrites):
    """Guest-physical ranges that are not RAM and are served by devices."""

    def __init__(self):
        self._ranges: list[Range] = []
        self._bases: list[int] = []

    def register(self, name: str, base: int, length: int, read: Read, write: Write) -> Range:
        if base < 0 or length <= 0:
            raise BusConflict(f"{name}: invalid MMIO range {base:#x}+{length:#x}")
        entry = Range(name, base, length, read, write)
        index = bisect.bisect(self._bases, base)
        for neighbour in self._ranges[max(index - 1, 0):index + 1]:
            if neighbour.base < entry.end and base < neighbour.end:
                raise BusConflict(f"{name}: MMIO {base:#x}+{length:#x} overlaps {neighbour!r}")
        self._ranges.insert(index, entry)
        self._bases.insert(index, base)
        return entry

    def unregister(self, entry: Range) -> None:
        self._unqueue_all(entry)
        index = self._ranges.index(entry)
        del self._ranges[index]
        del self._bases[index]

    def lookup(self, addr: int) -> Range | None:
        index = bisect.bisect(self._bases, addr) - 1
        if index >= 0:
            entry = self._ranges[index]
            if addr < entry.end:
                return entry
        return None

    def ranges(self) -> list[Range]:
        return list(self._ranges)
