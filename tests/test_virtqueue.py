"""The split virtqueue against a tiny in-test driver: chains, indirect tables,
index wrap-around, interrupt and notification suppression, and every way a
guest can break the rules, including arbitrary bytes in all guest-owned parts."""

import mmap
import re
import struct
import time

import pytest
from fakevm import FakeVm
from fuzzing import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

from pyhyve.layout import MiB
from pyhyve.virtio.queue import (AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT,
                                 DESC_F_WRITE, MAX_CHAIN_BYTES, MAX_INDIRECT,
                                 USED_F_NO_NOTIFY, Chain, SplitQueue, VirtqueueError)

DESC, AVAIL, USED = 0x10000, 0x20000, 0x30000
TABLE = 0x40000            # where tests put indirect tables
DATA = 0x80000             # where tests put buffers
ROM = 16 * MiB             # a read-only region right after FakeVm's 16 MiB of RAM
NEXT, WRITE, INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT


def pack_desc(addr: int, length: int, flags: int = 0, next_index: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, next_index)


class Driver:
    """The driver's half, just enough to lay out rings and offer chains."""

    def __init__(self, memory, size: int = 8, event_idx: bool = False, start: int = 0,
                 desc: int = DESC, avail: int = AVAIL, used: int = USED):
        self.memory = memory
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.avail_idx = self.last_used = start
        self.free = 0
        memory.write_u16(avail + 2, start)
        memory.write_u16(used + 2, start)
        self.queue = SplitQueue(memory, size, event_idx)
        self.queue.desc_addr, self.queue.avail_addr, self.queue.used_addr = desc, avail, used
        self.queue.last_avail = self.queue.used_idx = start
        self.queue.activate()

    def desc(self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0,
             table: int | None = None) -> None:
        table = self.desc_addr if table is None else table
        self.memory.write(table + 16 * index, pack_desc(addr, length, flags, next_index))

    def offer(self, head: int) -> None:
        self.memory.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    def add(self, readable=(), writable=()) -> int:
        """Chain (gpa, length) buffers through the next free descriptors and offer them."""
        buffers = [(gpa, length, 0) for gpa, length in readable]
        buffers += [(gpa, length, WRITE) for gpa, length in writable]
        indices = [(self.free + i) % self.size for i in range(len(buffers))]
        self.free += len(buffers)
        for i, (gpa, length, flags) in enumerate(buffers):
            more = i + 1 < len(buffers)
            self.desc(indices[i], gpa, length, flags | (NEXT if more else 0),
                      indices[i + 1] if more else 0)
        self.offer(indices[0])
        return indices[0]

    def used(self) -> list[tuple[int, int]]:
        """The used elements the device produced since the last call."""
        idx = self.memory.read_u16(self.used_addr + 2)
        elements = []
        while self.last_used != idx:
            slot = self.used_addr + 4 + 8 * (self.last_used % self.size)
            elements.append((self.memory.read_u32(slot), self.memory.read_u32(slot + 4)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return elements

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail_addr + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used_addr + 4 + 8 * self.size)


@pytest.fixture
def memory():
    memory = FakeVm().memory
    memory.add_rom("rom", ROM, mmap.mmap(-1, 4096), 0, 4096)
    return memory


@pytest.fixture
def driver(memory):
    return Driver(memory)


# --- construction and activation --------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 6, 65536, -1])
def test_size_must_be_a_power_of_two_up_to_32768(memory, size):
    with pytest.raises(ValueError):
        SplitQueue(memory, size)


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_valid_sizes(memory, size):
    queue = SplitQueue(memory, size)
    assert (queue.size, queue.ready, queue.last_avail, queue.used_idx) == (size, False, 0, 0)
    assert (queue.desc_addr, queue.avail_addr, queue.used_addr) == (0, 0, 0)


@pytest.mark.parametrize("field, addr", [
    ("desc_addr", 16 * MiB - 16 * 8 + 16),    # one descriptor past the end of RAM
    ("avail_addr", 16 * MiB - 6 - 2 * 8 + 1),
    ("used_addr", 16 * MiB - 6 - 8 * 8 + 1),
    ("used_addr", ROM),                       # the device writes the used ring
    ("desc_addr", 2 ** 64 - 16),
])
def test_activate_rejects_rings_outside_ram(memory, field, addr):
    queue = SplitQueue(memory, 8)
    queue.desc_addr, queue.avail_addr, queue.used_addr = DESC, AVAIL, USED
    setattr(queue, field, addr)
    with pytest.raises(VirtqueueError):
        queue.activate()
    assert not queue.ready


def test_activate_accepts_rings_ending_at_the_end_of_ram(memory):
    queue = SplitQueue(memory, 8)
    queue.desc_addr, queue.avail_addr = 16 * MiB - 16 * 8, 16 * MiB - 6 - 2 * 8
    queue.used_addr = 16 * MiB - 6 - 8 * 8
    queue.activate()
    assert queue.ready


def test_activate_rechecks_the_size_the_driver_wrote(memory):
    queue = SplitQueue(memory, 8)
    queue.desc_addr, queue.avail_addr, queue.used_addr = DESC, AVAIL, USED
    queue.size = 12
    with pytest.raises(VirtqueueError):
        queue.activate()


def test_reset_returns_to_the_initial_state(driver):
    queue = driver.queue
    driver.add(readable=[(DATA, 4)])
    queue.push(queue.pop().head, 0)
    queue.size = 4
    queue.reset()
    assert (queue.ready, queue.last_avail, queue.used_idx, queue.size) == (False, 0, 0, 8)
    assert (queue.desc_addr, queue.avail_addr, queue.used_addr) == (0, 0, 0)
    assert queue.pop() is None and not queue.pending() and not queue.needs_interrupt()
    queue.push(0, 0)                  # a late completion is dropped, not written
    assert driver.memory.read_u16(USED + 2) == 1


# --- chains ---------------------------------------------------------------------
def test_simple_chain_round_trip(driver, memory):
    queue = driver.queue
    memory.write(DATA, b"hello, ")
    memory.write(DATA + 0x100, b"world")
    assert not queue.pending() and queue.pop() is None
    head = driver.add(readable=[(DATA, 7), (DATA + 0x100, 5)],
                      writable=[(DATA + 0x200, 4), (DATA + 0x300, 8)])
    assert queue.pending()
    chain = queue.pop()
    assert isinstance(chain, Chain) and chain.head == head == 0
    assert chain.readable == [(DATA, 7), (DATA + 0x100, 5)]
    assert chain.writable == [(DATA + 0x200, 4), (DATA + 0x300, 8)]
    assert chain.read_all(memory) == b"hello, world"
    assert [bytes(v) for v in chain.readable_views(memory)] == [b"hello, ", b"world"]
    views = chain.writable_views(memory)
    assert [len(v) for v in views] == [4, 8] and not any(v.readonly for v in views)
    assert not queue.pending() and queue.pop() is None
    assert chain.write(memory, b"abcdefghij") == 10
    assert memory.read(DATA + 0x200, 4) == b"abcd"
    assert memory.read(DATA + 0x300, 8) == b"efghij\0\0"
    queue.push(chain.head, 10)
    assert driver.used() == [(head, 10)]
    assert queue.used_idx == 1


def test_write_scatters_from_an_offset_and_truncates(driver, memory):
    driver.add(writable=[(DATA, 3), (DATA + 0x10, 3), (DATA + 0x20, 3)])
    chain = driver.queue.pop()
    assert chain.write(memory, b"XYZW", offset=2) == 4
    assert memory.read(DATA, 3) == b"\0\0X" and memory.read(DATA + 0x10, 3) == b"YZW"
    assert chain.write(memory, b"0123456789", offset=5) == 4
    assert memory.read(DATA + 0x10, 3) == b"YZ0" and memory.read(DATA + 0x20, 3) == b"123"
    assert chain.write(memory, b"abc", offset=9) == 0
    assert chain.write(memory, b"") == 0
    assert chain.write(memory, bytearray(b"q")) == 1 and memory.read(DATA, 1) == b"q"


def test_multiple_chains_come_out_in_order(driver):
    queue = driver.queue
    heads = [driver.add(readable=[(DATA + i, 1)], writable=[(DATA + 0x100 + i, 1)])
             for i in range(4)]
    assert heads == [0, 2, 4, 6]
    chains = []
    while (chain := queue.pop()) is not None:
        chains.append(chain)
    assert [c.head for c in chains] == heads
    assert [c.readable for c in chains] == [[(DATA + i, 1)] for i in range(4)]
    for chain in reversed(chains):          # completions may come back out of order
        queue.push(chain.head, 1)
    assert driver.used() == [(h, 1) for h in reversed(heads)]


def test_zero_length_buffers_are_skipped_whatever_their_address(driver):
    driver.desc(0, DATA, 4, NEXT, 1)
    driver.desc(1, 2 ** 64 - 1, 0, NEXT, 2)
    driver.desc(2, 2 ** 63, 0, WRITE | NEXT, 3)
    driver.desc(3, DATA + 0x10, 2, WRITE)
    driver.offer(0)
    chain = driver.queue.pop()
    assert chain.readable == [(DATA, 4)] and chain.writable == [(DATA + 0x10, 2)]


def test_buffers_may_sit_anywhere_in_ram_and_readable_ones_in_rom(memory):
    driver = Driver(memory)
    driver.add(readable=[(0, 1), (16 * MiB - 1, 1), (ROM, 4096)], writable=[(16 * MiB - 8, 8)])
    chain = driver.queue.pop()
    assert chain.readable == [(0, 1), (16 * MiB - 1, 1), (ROM, 4096)]
    assert chain.writable == [(16 * MiB - 8, 8)]


def test_a_chain_may_use_every_descriptor(memory):
    driver = Driver(memory, size=4)
    driver.add(readable=[(DATA, 1)] * 3, writable=[(DATA, 1)])
    chain = driver.queue.pop()
    assert len(chain.readable) == 3 and len(chain.writable) == 1


def test_chain_of_exactly_max_chain_bytes_is_accepted(memory):
    driver = Driver(memory)
    driver.add(readable=[(0, 16 * MiB)] * 2, writable=[(0, 16 * MiB)] * 2)
    chain = driver.queue.pop()
    assert sum(length for _, length in chain.readable + chain.writable) == MAX_CHAIN_BYTES


# --- free-running indices --------------------------------------------------------
@pytest.mark.parametrize("start", [65534, 65535, 65530])
def test_indices_wrap_around(memory, start):
    driver = Driver(memory, size=4, start=start)
    queue = driver.queue
    for round_ in range(3):
        heads = [driver.add(readable=[(DATA + i, 1)]) for i in range(4)]
        popped = [queue.pop().head for _ in range(4)]
        assert popped == heads and queue.pop() is None and not queue.pending()
        for head in heads:
            queue.push(head, round_)
        assert driver.used() == [(h, round_) for h in heads]
    assert queue.last_avail == queue.used_idx == (start + 12) & 0xFFFF
    assert memory.read_u16(USED + 2) == (start + 12) & 0xFFFF


def test_avail_idx_may_run_exactly_size_ahead_across_the_wrap(memory):
    driver = Driver(memory, size=4, start=65533)
    for i in range(4):
        driver.add(readable=[(DATA + i, 1)])
    assert driver.avail_idx == 1
    assert [driver.queue.pop().head for _ in range(4)] == [0, 1, 2, 3]
    assert driver.queue.pop() is None


@pytest.mark.parametrize("start, avail_idx", [(0, 5), (65535, 5), (10, 9), (0, 0x8000)])
def test_avail_idx_more_than_size_ahead(memory, start, avail_idx):
    driver = Driver(memory, size=4, start=start)
    memory.write_u16(AVAIL + 2, avail_idx)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()
    assert driver.queue.last_avail == start


# --- malformed chains --------------------------------------------------------------
def test_head_out_of_range(driver):
    driver.offer(8)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_next_out_of_range(driver):
    driver.desc(0, DATA, 1, NEXT, 8)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


@pytest.mark.parametrize("links", [[0], [1, 0], [1, 2, 3, 4, 5, 6, 7, 3]])
def test_descriptor_loops(driver, links):
    for index, next_index in enumerate(links):
        driver.desc(index, DATA, 1, NEXT, next_index)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_readable_after_writable(driver):
    driver.desc(0, DATA, 1, WRITE | NEXT, 1)
    driver.desc(1, DATA, 1, 0)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_zero_length_readable_after_writable_is_still_out_of_order(driver):
    driver.desc(0, DATA, 1, WRITE | NEXT, 1)
    driver.desc(1, DATA, 0, 0)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


@pytest.mark.parametrize("lengths", [
    [MAX_CHAIN_BYTES + 1],
    [16 * MiB] * 4 + [1],
    [2 ** 32 - 1],
    [2 ** 32 - 1] * 8,
])
def test_chain_larger_than_max_chain_bytes(driver, lengths):
    for index, length in enumerate(lengths):
        more = index + 1 < len(lengths)
        driver.desc(index, 0, length, NEXT if more else 0, index + 1)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


@pytest.mark.parametrize("addr, length, flags", [
    (ROM + 4096, 1, 0),                 # nothing is mapped there
    (16 * MiB - 1, 2, 0),               # straddles the end of RAM (into ROM)
    (2 ** 64 - 1, 1, 0),
    (2 ** 64 - 1, 2 ** 32 - 1, WRITE),
    (ROM, 1, WRITE),                    # the device must not write ROM
    (ROM + 4095, 2, 0),
])
def test_buffer_outside_ram(driver, addr, length, flags):
    driver.desc(0, DATA, 1, NEXT, 1)
    driver.desc(1, addr, length, flags)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


# --- indirect tables -----------------------------------------------------------------
def test_indirect_table(driver):
    driver.desc(0, DATA + 0x30, 5, NEXT, 3, table=TABLE)
    driver.desc(3, DATA + 0x10, 3, NEXT | WRITE, 1, table=TABLE)
    driver.desc(1, DATA + 0x20, 4, WRITE, 0, table=TABLE)
    driver.desc(2, 2 ** 64 - 1, 2 ** 32 - 1, 0, 2, table=TABLE)   # not in the chain
    driver.desc(5, TABLE, 4 * 16, INDIRECT)
    driver.offer(5)
    chain = driver.queue.pop()
    assert chain.head == 5
    assert chain.readable == [(DATA + 0x30, 5)]
    assert chain.writable == [(DATA + 0x10, 3), (DATA + 0x20, 4)]


def test_indirect_table_starts_at_its_first_entry(driver):
    driver.desc(0, DATA, 2, NEXT, 1, table=TABLE)
    driver.desc(1, DATA + 0x10, 3, WRITE, 0, table=TABLE)
    driver.desc(0, TABLE, 2 * 16, INDIRECT | WRITE)      # WRITE on the indirect is ignored
    driver.offer(0)
    chain = driver.queue.pop()
    assert chain.readable == [(DATA, 2)] and chain.writable == [(DATA + 0x10, 3)]


def test_direct_descriptors_then_an_indirect_table(driver):
    driver.desc(0, DATA, 1, 0, 0, table=TABLE)
    driver.desc(0, DATA + 0x20, 1, NEXT, 1)
    driver.desc(1, TABLE, 16, INDIRECT)
    driver.offer(0)
    chain = driver.queue.pop()
    assert chain.readable == [(DATA + 0x20, 1), (DATA, 1)] and chain.writable == []


def test_indirect_table_of_max_entries(driver, memory):
    table = b"".join(pack_desc(DATA + i, 1, NEXT | (WRITE if i >= 100 else 0), i + 1)
                     for i in range(MAX_INDIRECT - 1)) + pack_desc(DATA, 1, WRITE)
    memory.write(TABLE, table)
    driver.desc(0, TABLE, 16 * MAX_INDIRECT, INDIRECT)
    driver.offer(0)
    chain = driver.queue.pop()
    assert len(chain.readable) == 100 and len(chain.writable) == MAX_INDIRECT - 100


@pytest.mark.parametrize("length", [0, 8, 24, 16 * MAX_INDIRECT + 16, 2 ** 32 - 16])
def test_indirect_table_bad_length(driver, length):
    driver.desc(0, TABLE, length, INDIRECT)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


@pytest.mark.parametrize("addr", [16 * MiB - 16, 2 ** 64 - 32])
def test_indirect_table_outside_ram(driver, addr):
    driver.desc(0, addr, 32, INDIRECT)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_indirect_table_in_rom_may_be_read(driver, memory):
    driver.desc(0, ROM, 16, INDIRECT)        # all-zero entry: an empty readable buffer
    driver.offer(0)
    chain = driver.queue.pop()
    assert chain.readable == [] and chain.writable == []


def test_indirect_with_next(driver):
    driver.desc(0, DATA, 1, table=TABLE)
    driver.desc(0, TABLE, 16, INDIRECT | NEXT, 1)
    driver.desc(1, DATA, 1)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_indirect_inside_indirect(driver):
    driver.desc(0, TABLE + 0x100, 16, INDIRECT, table=TABLE)
    driver.desc(0, DATA, 1, table=TABLE + 0x100)
    driver.desc(0, TABLE, 16, INDIRECT)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


@pytest.mark.parametrize("links", [[0], [1, 0], [1, 2, 1]])
def test_indirect_loops(driver, links):
    for index, next_index in enumerate(links):
        driver.desc(index, DATA, 1, NEXT, next_index, table=TABLE)
    driver.desc(0, TABLE, 16 * MAX_INDIRECT, INDIRECT)   # room to loop for 4096 steps
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_indirect_next_beyond_its_table(driver):
    driver.desc(0, DATA, 1, NEXT, 2, table=TABLE)
    driver.desc(2, DATA, 1, 0, table=TABLE)     # present in memory, but not in the table
    driver.desc(0, TABLE, 2 * 16, INDIRECT)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_readable_in_indirect_after_writable_in_the_ring(driver):
    driver.desc(0, DATA, 1, table=TABLE)
    driver.desc(0, DATA, 1, WRITE | NEXT, 1)
    driver.desc(1, TABLE, 16, INDIRECT)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_indirect_buffers_count_towards_max_chain_bytes(driver):
    driver.desc(0, 0, 16 * MiB, NEXT, 1, table=TABLE)
    driver.desc(1, 0, 1, 0, table=TABLE)
    driver.desc(0, 0, 16 * MiB, NEXT, 1)
    driver.desc(1, 0, 16 * MiB, NEXT, 2)
    driver.desc(2, 0, 16 * MiB, NEXT, 3)
    driver.desc(3, TABLE, 32, INDIRECT)
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()


def test_worst_case_chain_is_bounded(memory):
    """A full 32768-entry ring chain ending in a full indirect table, then the
    same ring looping: both finish promptly."""
    size = 32768
    desc = 2 * MiB
    driver = Driver(memory, size=size, desc=desc, avail=3 * MiB, used=4 * MiB)
    ring = b"".join(pack_desc(0, 0, NEXT, i + 1) for i in range(size - 1))
    memory.write(desc, ring + pack_desc(TABLE, 16 * MAX_INDIRECT, INDIRECT))
    memory.write(TABLE, b"".join(pack_desc(DATA, 1, NEXT, i + 1) for i in range(MAX_INDIRECT - 1))
                 + pack_desc(DATA, 1))
    driver.offer(0)
    started = time.monotonic()
    chain = driver.queue.pop()
    assert len(chain.readable) == MAX_INDIRECT
    memory.write(desc + 16 * (size - 1), pack_desc(0, 0, NEXT, 0))
    driver.offer(0)
    with pytest.raises(VirtqueueError):
        driver.queue.pop()
    assert time.monotonic() - started < 5


# --- interrupts -------------------------------------------------------------------------
def test_interrupt_follows_no_interrupt_flag_without_event_idx(driver, memory):
    queue = driver.queue
    assert not queue.needs_interrupt()              # nothing pushed yet
    driver.add(readable=[(DATA, 1)])
    queue.push(queue.pop().head, 0)
    assert queue.needs_interrupt()
    assert not queue.needs_interrupt()              # already reported
    memory.write_u16(AVAIL, AVAIL_F_NO_INTERRUPT)
    driver.add(readable=[(DATA, 1)])
    queue.push(queue.pop().head, 0)
    assert not queue.needs_interrupt()
    memory.write_u16(AVAIL, 0)
    driver.add(readable=[(DATA, 1)])
    queue.push(queue.pop().head, 0)
    assert queue.needs_interrupt()


def test_event_idx_ignores_the_no_interrupt_flag(memory):
    driver = Driver(memory, event_idx=True)
    memory.write_u16(AVAIL, AVAIL_F_NO_INTERRUPT)
    driver.set_used_event(0)
    driver.queue.push(0, 0)
    assert driver.queue.needs_interrupt()


def need_event_reference(event: int, new: int, old: int) -> bool:
    """The driver wants an interrupt when the device writes used entry `event`,
    i.e. when event is one of old, old + 1, ..., new - 1 (mod 2**16)."""
    return event in {(old + k) & 0xFFFF for k in range((new - old) & 0xFFFF)}


def pushes_then_interrupt(memory, old: int, pushes: int, event: int) -> bool:
    driver = Driver(memory, event_idx=True, start=old)
    driver.set_used_event(event)
    for _ in range(pushes):
        driver.queue.push(0, 0)
    return driver.queue.needs_interrupt()


@pytest.mark.parametrize("old, pushes, event, expected", [
    (0, 1, 0, True),
    (0, 1, 1, False),
    (0, 3, 2, True),
    (0, 3, 3, False),
    (5, 2, 4, False),        # the driver asked about an entry already reported
    (65534, 3, 65534, True),
    (65534, 3, 65535, True),
    (65534, 3, 0, True),
    (65534, 3, 1, False),
    (65534, 3, 65533, False),
    (65535, 1, 65535, True),
    (65535, 1, 0, False),
])
def test_event_idx_arithmetic(memory, old, pushes, event, expected):
    assert pushes_then_interrupt(memory, old, pushes, event) is expected
    assert need_event_reference(event, (old + pushes) & 0xFFFF, old) is expected


@fuzz_settings(200)
@given(old=st.integers(0, 0xFFFF), pushes=st.integers(1, 8), event=st.integers(0, 0xFFFF),
       near=st.booleans())
def test_event_idx_matches_its_meaning(old, pushes, event, near):
    if near:
        event = (old + event % 12 - 2) & 0xFFFF
    memory = FakeVm(memory_size=4 * MiB).memory
    new = (old + pushes) & 0xFFFF
    expected = need_event_reference(event, new, old)
    assert pushes_then_interrupt(memory, old, pushes, event) is expected


def test_event_idx_counts_the_pushes_since_the_last_check(memory):
    driver = Driver(memory, event_idx=True)
    queue = driver.queue
    driver.set_used_event(3)
    queue.push(0, 0)
    queue.push(1, 0)
    assert not queue.needs_interrupt()          # used idx 0 -> 2 does not pass entry 3
    queue.push(2, 0)
    queue.push(3, 0)
    assert queue.needs_interrupt()              # 2 -> 4 writes entry 3
    queue.push(4, 0)
    assert not queue.needs_interrupt()          # 4 -> 5: the driver has not moved used_event
    driver.set_used_event(5)
    queue.push(5, 0)
    assert queue.needs_interrupt()
    assert not queue.needs_interrupt()


# --- notifications -------------------------------------------------------------------------
def test_set_notification_without_event_idx(driver, memory):
    queue = driver.queue
    queue.set_notification(False)
    assert memory.read_u16(USED) == USED_F_NO_NOTIFY
    queue.set_notification(True)
    assert memory.read_u16(USED) == 0


def test_notification_setting_survives_activation(memory):
    driver = Driver(memory, event_idx=True)
    queue = driver.queue
    queue.reset()
    queue.set_notification(False)
    queue.desc_addr, queue.avail_addr, queue.used_addr = DESC, AVAIL, USED
    queue.activate()
    memory.write_u16(USED + 4 + 8 * 8, 0xABCD)
    driver.add(readable=[(DATA, 1)])
    queue.pop()
    assert driver.avail_event() == 0xABCD


def test_event_idx_notification_tracks_the_avail_index(memory):
    driver = Driver(memory, size=4, event_idx=True, start=65534)
    queue = driver.queue
    for _ in range(3):
        driver.add(readable=[(DATA, 1)])
    queue.pop()
    assert driver.avail_event() == 65535        # notify when entry 65535 is offered
    queue.set_notification(False)
    queue.pop()
    assert driver.avail_event() == 65535        # left alone while disabled
    queue.set_notification(True)
    assert driver.avail_event() == 1            # caught up with the driver's avail idx
    assert queue.pending()                      # and the device must look again
    queue.pop()
    assert driver.avail_event() == 1 and not queue.pending()
    assert memory.read_u16(USED) == 0           # used->flags is not used with event_idx


# --- arbitrary guest bytes -------------------------------------------------------------------
FUZZ_MEMORY = MiB
FUZZ_TABLES = (0x40000, 0x41000, FUZZ_MEMORY - 32, FUZZ_MEMORY)   # the last is in ROM
FUZZ_ROM_SIZE = 0x1000


def mostly(plausible, anything):
    """Draw from `plausible` about seven times in eight, so that chains get deep
    enough to reach the later checks.  (st.one_of would pick each branch about
    equally often, and mostly the arbitrary one once the small one is exhausted.)"""
    return st.integers(0, 7).flatmap(lambda pick: anything if pick == 0 else plausible)


addresses = mostly(
    st.one_of(st.sampled_from(FUZZ_TABLES + (0, DATA, FUZZ_MEMORY - 1, FUZZ_MEMORY + FUZZ_ROM_SIZE,
                                             2 ** 64 - 1, 2 ** 63)),
              st.integers(0, FUZZ_MEMORY + 2 * FUZZ_ROM_SIZE)),
    st.integers(0, 2 ** 64 - 1))
lengths = mostly(
    st.one_of(st.sampled_from([0, 16, 32, 48, 16 * MAX_INDIRECT, 16 * MAX_INDIRECT + 16,
                               FUZZ_MEMORY, MAX_CHAIN_BYTES, 2 ** 32 - 1, 2 ** 32 - 16]),
              st.integers(0, 0x200)),
    st.integers(0, 2 ** 32 - 1))
descriptors = mostly(
    st.builds(pack_desc, addresses, lengths,
              mostly(st.sampled_from([0, NEXT, NEXT, WRITE, WRITE | NEXT, WRITE | NEXT,
                                      INDIRECT, INDIRECT | WRITE]), st.integers(0, 0xFFFF)),
              mostly(st.integers(0, 8), st.integers(0, 0xFFFF))),
    st.binary(min_size=16, max_size=16))


@fuzz_settings(300, deadline=2000)
@given(last_avail=st.integers(0, 0xFFFF), size=st.sampled_from([1, 2, 4, 16]),
       event_idx=st.booleans(), data=st.data())
def test_arbitrary_guest_bytes_never_escape(last_avail, size, event_idx, data):
    """Whatever the guest puts in its rings and tables, pop() yields chains of
    buffers inside guest memory, or VirtqueueError, and does bounded work."""
    rom = mmap.mmap(-1, FUZZ_ROM_SIZE)
    memory = FakeVm(memory_size=FUZZ_MEMORY).memory
    ahead = data.draw(mostly(st.integers(1, size), st.integers(0, 0xFFFF)), label="ahead")
    avail = struct.pack("<HH", data.draw(st.integers(0, 0xFFFF), label="flags"),
                        (last_avail + ahead) & 0xFFFF)
    avail += data.draw(mostly(
        st.lists(mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF)),
                 min_size=size + 1, max_size=size + 1).map(
            lambda heads: struct.pack(f"<{size + 1}H", *heads)),
        st.binary(min_size=2 * size + 2, max_size=2 * size + 2)), label="avail ring")
    memory.write(DESC, b"".join(data.draw(st.lists(descriptors, min_size=size, max_size=size),
                                          label="descriptor table")))
    memory.write(AVAIL, avail)
    for table in FUZZ_TABLES:
        end = FUZZ_MEMORY if table < FUZZ_MEMORY else FUZZ_MEMORY + FUZZ_ROM_SIZE
        room = min(8, (end - table) // 16)
        entries = b"".join(data.draw(st.lists(descriptors, max_size=room),
                                     label=f"table {table:#x}"))
        if table < FUZZ_MEMORY:
            memory.write(table, entries)
        else:
            rom[table - FUZZ_MEMORY:table - FUZZ_MEMORY + len(entries)] = entries
    memory.add_rom("rom", FUZZ_MEMORY, rom, 0, FUZZ_ROM_SIZE)

    queue = SplitQueue(memory, size, event_idx)
    queue.desc_addr, queue.avail_addr, queue.used_addr = DESC, AVAIL, USED
    queue.last_avail = queue.used_idx = last_avail
    queue.activate()
    started = time.monotonic()
    for _ in range(size + 1):
        try:
            chain = queue.pop()
        except VirtqueueError as error:
            event("rejected: " + re.sub(r"0x[0-9a-f]+|\d+", "N", str(error)))
            break
        if chain is None:
            break
        event(f"chain of {len(chain.readable)}+{len(chain.writable)} buffers")
        assert 0 <= chain.head < size
        total = 0
        for gpa, length in chain.readable:
            assert length > 0 and memory.is_ram(gpa, length)
            total += length
        for gpa, length in chain.writable:
            assert length > 0 and len(memory.view(gpa, length, write=True)) == length
            total += length
        assert total <= MAX_CHAIN_BYTES
        if total <= FUZZ_MEMORY:
            readable = sum(length for _, length in chain.readable)
            assert len(chain.read_all(memory)) == readable
            assert chain.write(memory, bytes(64)) == min(64, total - readable)
        queue.push(chain.head, 0)
    assert time.monotonic() - started < 1.5
