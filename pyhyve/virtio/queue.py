"""The split virtqueue (virtio 1.2, section 2.7), device side.

The driver keeps three structures in guest memory: the descriptor table, the
available ring it fills, and the used ring the device fills.  Every number in
them is guest-controlled, so `SplitQueue.pop` checks each index, flag
combination, length and address before a device sees a buffer, and raises
`VirtqueueError` (the device then sets DEVICE_NEEDS_RESET) rather than touch
memory outside the guest, allocate without bound or follow a loop forever.

A queue is driven by one thread at a time; the transport serialises
activation and reset against the device's data path.
"""

import struct
import threading

from ..layout import MiB
from ..lifecycle import StateError, expect_keys, flag, uint
from ..memory import GuestMemoryError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
MAX_INDIRECT = 4096             # entries one indirect table may hold
MAX_CHAIN_BYTES = 64 * MiB      # the most one request may make a device read or write

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len


STATE_KEYS = ("size", "desc", "avail", "used", "event_idx", "ready", "last_avail",
              "used_idx", "notify")


class VirtqueueError(Exception):
    """The guest broke the virtqueue rules; the device must set DEVICE_NEEDS_RESET."""


def _valid_size(size: int) -> bool:
    return 1 <= size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


def split_buffers(pairs: list[tuple[int, int]], count: int):
    """(the first `count` bytes of a buffer list, the rest), as (gpa, length) lists."""
    head, rest = [], []
    for gpa, length in pairs:
        if count >= length:
            head.append((gpa, length))
            count -= length
        elif count:
            head.append((gpa, count))
            rest.append((gpa + count, length - count))
            count = 0
        else:
            rest.append((gpa, length))
    return head, rest


class Chain:
    """One validated descriptor chain: the buffers the device reads, then those it writes.

    Buffers are kept as (gpa, length) pairs, each non-empty and inside one
    guest memory region, so the views below cannot fail unless the memory
    layout changes under the request.
    """

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[tuple[int, int]],
                 writable: list[tuple[int, int]]):
        self.head = head
        self.readable = readable
        self.writable = writable

    def __repr__(self) -> str:
        return f"<Chain head={self.head} readable={self.readable} writable={self.writable}>"

    def read_all(self, memory) -> bytes:
        """The readable buffers concatenated (at most MAX_CHAIN_BYTES, checked by pop)."""
        return b"".join([memory.view(gpa, length) for gpa, length in self.readable])

    def readable_views(self, memory) -> list[memoryview]:
        return [memory.view(gpa, length) for gpa, length in self.readable]

    def writable_views(self, memory) -> list[memoryview]:
        return [memory.view(gpa, length, write=True) for gpa, length in self.writable]

    def write(self, memory, data, offset: int = 0) -> int:
        """Scatter `data` into the writable buffers, starting `offset` bytes into
        them; returns how many bytes fitted."""
        data = memoryview(data).cast("B")
        total = len(data)
        done = 0
        for gpa, length in self.writable:
            if done == total:
                break
            if offset >= length:
                offset -= length
                continue
            count = min(length - offset, total - done)
            memory.view(gpa + offset, count, write=True)[:] = data[done:done + count]
            done += count
            offset = 0
        return done


class SplitQueue:
    """The device's half of one split virtqueue.

    The transport sets size, the three ring addresses and event_idx from what
    the driver wrote, then calls activate(), which checks the layout and takes
    views of the rings; later changes to those attributes take effect only at
    the next activate().  last_avail and used_idx are free-running u16s, as on
    the wire.
    """

    def __init__(self, memory, size: int, event_idx: bool = False):
        if not _valid_size(size):
            raise ValueError(f"virtqueue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.memory = memory
        self._initial = (size, event_idx)
        self._fence = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.size, self.event_idx = self._initial
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.ready = False
        self.last_avail = 0
        self.used_idx = 0
        self._desc = self._avail = self._used = self._used_words = None
        self._mask = 0
        self._used_event_offset = self._avail_event_offset = 0
        self._notify = True
        self._signalled = 0     # used_idx when needs_interrupt last looked

    def activate(self) -> None:
        size = self.size
        if not _valid_size(size):
            raise VirtqueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        memory = self.memory
        try:
            desc = memory.view(self.desc_addr, DESC_SIZE * size)
            avail = memory.view(self.avail_addr, 6 + 2 * size)
            used = memory.lasting_view(self, self.used_addr, 6 + 8 * size)
        except GuestMemoryError as error:
            raise VirtqueueError(f"ring not in guest RAM: {error}") from None
        self._desc, self._avail, self._used = desc, avail, used
        # The fields the driver polls (used->flags, used->idx, avail_event) are
        # written through this u16 view: one store each.  struct.pack_into
        # zeroes its field before it writes it, and a driver polling used->idx
        # in between sees the index fall back to 0.
        self._used_words = used.cast("H")
        self._mask = size - 1
        self._used_event_offset = 4 + 2 * size
        self._avail_event_offset = 4 + 8 * size
        self._signalled = self.used_idx
        self.ready = True

    # --- snapshots ------------------------------------------------------------
    def save_state(self) -> dict:
        """Where the queue stands: its layout and the device's two ring positions
        (the rings themselves are in guest memory, saved with it)."""
        return {"size": self.size, "desc": self.desc_addr, "avail": self.avail_addr,
                "used": self.used_addr, "event_idx": self.event_idx, "ready": self.ready,
                "last_avail": self.last_avail, "used_idx": self.used_idx,
                "notify": self._notify}

    def check_state(self, state, what: str) -> tuple:
        """The saved fields, each checked (lifecycle.StateError names the first
        that does not fit), in the order restore_state() takes them."""
        expect_keys(state, STATE_KEYS, what)
        size = uint(state["size"], self._initial[0], f"{what} size")
        if not _valid_size(size):
            raise StateError(f"{what} size {size} is not a power of two")
        rings = tuple(uint(state[ring], (1 << 64) - 1, f"{what} {ring} ring")
                      for ring in ("desc", "avail", "used"))
        return (size, rings, flag(state["event_idx"], f"{what} event_idx"),
                uint(state["last_avail"], 0xFFFF, f"{what} last_avail"),
                uint(state["used_idx"], 0xFFFF, f"{what} used_idx"),
                flag(state["ready"], f"{what} ready"), flag(state["notify"], f"{what} notify"))

    def restore_state(self, checked: tuple) -> None:
        """Put the queue back where save_state() found it (from check_state()'s
        fields): pop() takes the entry after the last one the device took,
        push() fills the used slot after the last one it filled.
        VirtqueueError if a live queue's rings do not fit in guest memory."""
        self.reset()
        size, rings, event_idx, last_avail, used_idx, ready, notify = checked
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = rings
        self.event_idx = event_idx
        self.last_avail, self.used_idx = last_avail, used_idx
        if ready:
            self.activate()
        self._notify = notify

    # --- driver -> device ---------------------------------------------------
    def pending(self) -> bool:
        return self.ready and _U16.unpack_from(self._avail, 2)[0] != self.last_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None when the driver has offered nothing."""
        if not self.ready:
            return None
        avail = self._avail
        last = self.last_avail
        ahead = (_U16.unpack_from(avail, 2)[0] - last) & 0xFFFF
        if not ahead:
            return None
        size = self._mask + 1
        if ahead > size:
            raise VirtqueueError(f"avail idx runs {ahead} entries ahead in a queue of {size}")
        head = _U16.unpack_from(avail, 4 + 2 * (last & self._mask))[0]
        if head >= size:
            raise VirtqueueError(f"avail ring names descriptor {head} of {size}")
        chain = self._walk(head, size)
        last = (last + 1) & 0xFFFF
        self.last_avail = last
        if self.event_idx and self._notify:
            # Ask to be notified as soon as the driver offers the next entry.
            self._used_words[self._avail_event_offset // 2] = last
        return chain

    def _walk(self, head: int, size: int) -> Chain:
        """Follow a chain from `head`, into at most one indirect table.

        `left` counts the descriptors the current table may still yield, so a
        loop ends after at most size + MAX_INDIRECT reads.
        """
        memory = self.memory
        unpack = _DESC.unpack_from
        table = self._desc
        limit = left = size
        index = head
        indirect = writing = False
        total = 0
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        while True:
            if not left:
                raise VirtqueueError("descriptor chain loops or outgrows its table")
            left -= 1
            addr, length, flags, next_index = unpack(table, DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError("indirect descriptor with NEXT set")
                if not length or length % DESC_SIZE or length > DESC_SIZE * MAX_INDIRECT:
                    raise VirtqueueError(f"indirect table length {length:#x} is invalid")
                try:
                    table = memory.view(addr, length)
                except GuestMemoryError:
                    raise VirtqueueError(
                        f"indirect table {addr:#x}+{length:#x} is not in guest RAM") from None
                indirect = True
                limit = left = length // DESC_SIZE
                index = 0
                continue
            if flags & DESC_F_WRITE:
                writing = True
            elif writing:
                raise VirtqueueError("device-readable descriptor after a device-writable one")
            if length:
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise VirtqueueError(
                        f"descriptor chain holds more than {MAX_CHAIN_BYTES} bytes")
                try:
                    memory.check(addr, length, write=writing)
                except GuestMemoryError:
                    kind = "writable guest RAM" if writing else "guest RAM"
                    raise VirtqueueError(f"buffer {addr:#x}+{length:#x} is not in {kind}") from None
                (writable if writing else readable).append((addr, length))
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable)
            if next_index >= limit:
                raise VirtqueueError(f"descriptor next {next_index} is outside a table of {limit}")
            index = next_index

    # --- device -> driver ---------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes filled in.

        The element is stored before used->idx, and x86 keeps stores in order,
        so the driver never sees the index before the element.  A completion
        arriving after a reset is dropped: the driver has forgotten the request.
        """
        if not self.ready:
            return
        used = self._used
        idx = self.used_idx
        _USED_ELEM.pack_into(used, 4 + 8 * (idx & self._mask), head, written)
        idx = (idx + 1) & 0xFFFF
        self._used_words[1] = idx
        self.used_idx = idx

    def needs_interrupt(self) -> bool:
        """Whether the pushes since the last call should interrupt the driver."""
        if not self.ready:
            return False
        old, new = self._signalled, self.used_idx
        if old == new:
            return False
        self._signalled = new
        self._full_barrier()
        if self.event_idx:
            # vring_need_event: did used->idx just move past used_event?
            event = _U16.unpack_from(self._avail, self._used_event_offset)[0]
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not _U16.unpack_from(self._avail, 0)[0] & AVAIL_F_NO_INTERRUPT

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver to notify (or not) when it offers buffers.

        The driver may have offered buffers before it saw the request, so a
        device that enables notifications must check pending() afterwards.
        """
        self._notify = enabled
        if not self.ready:
            return
        if not self.event_idx:
            self._used_words[0] = 0 if enabled else USED_F_NO_NOTIFY
        elif enabled:
            avail_idx = _U16.unpack_from(self._avail, 2)[0]
            self._used_words[self._avail_event_offset // 2] = avail_idx
        if enabled:
            self._full_barrier()

    def _full_barrier(self) -> None:
        """Order our ring stores before the loads that follow, like smp_mb():
        x86 lets a load pass an earlier store to another address.  Python has
        no fence instruction; an uncontended lock's atomic update is one."""
        with self._fence:
            pass
