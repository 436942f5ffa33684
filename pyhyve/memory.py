"""Guest physical memory: bhyve's layout, KVM memslots, bounds-checked access.

Low memory runs from 0 up to the 32-bit PCI hole (3 GiB, as bhyve places it);
whatever does not fit continues above 4 GiB.  Every gpa a device or loader
touches goes through `GuestMemory.view`, which refuses anything that is not
entirely inside one region, so guest-supplied addresses can never reach host
memory outside the guest.
"""

import bisect
import ctypes
import mmap
import os
import struct

from .kvm import abi
from .layout import (BIOS_AREA_CHUNKS, BIOS_AREA_END, BIOS_AREA_SIZE, HIGHMEM_BASE,
                     LOWMEM_LIMIT, MiB)

PAGE_SIZE = 4096
DIRTY_CLEAR_CHUNK_WORDS = 4096      # 256K pages (1 GiB) per KVM_CLEAR_DIRTY_LOG
BIOS_AREA_MODES = ("rom", "ram-ro", "ram")
MIN_MEMORY = 1 * MiB


class GuestMemoryError(Exception):
    """A guest physical range is not backed by guest memory."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
MAP_FIXED = 0x10


def _prefer_huge_pages(backing: mmap.mmap) -> None:
    """Transparent huge pages where the host allows them (as QEMU asks):
    fewer TLB misses for the guest, 512 times fewer faults filling it."""
    try:
        backing.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass


def _host_address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class Region:
    """A contiguous range of guest physical memory backed by an mmap."""

    def __init__(self, name: str, gpa: int, backing: mmap.mmap, offset: int,
                 size: int, writable: bool, log_dirty: bool = False):
        self.name = name
        self.log_dirty = log_dirty      # KVM logs the guest's writes to it (dirty_pages)
        self.gpa = gpa
        self.end = gpa + size
        self.size = size
        self.backing = backing
        self.offset = offset
        self.writable = writable
        self.view = memoryview(backing)[offset:offset + size]
        if not writable:
            self.view = self.view.toreadonly()

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"<Region {self.name} {self.gpa:#x}-{self.end:#x} {mode}>"


class GuestMemory:
    """The guest's physical address space, registered with KVM as memslots."""

    def __init__(self, vm, size: int):
        if size < MIN_MEMORY:
            raise ValueError(f"memory size {size} is below the 1 MiB minimum")
        self.vm = vm
        self.size = size
        self.lowmem_size = min(size, LOWMEM_LIMIT)
        self.highmem_size = size - self.lowmem_size
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self._slots: dict[int, int] = {}      # gpa -> memslot number
        self._next_slot = 0
        self._free_slots: list[int] = []
        self._lowmem = self._anonymous(self.lowmem_size)
        self._highmem = self._anonymous(self.highmem_size) if self.highmem_size else None
        self._bios_rom: tuple[mmap.mmap, int, int] | None = None   # rom, offset, gpa
        self._log_ram = False               # log writes to every RAM region (migration)
        self._manual_protect: bool | None = None   # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on
        self._dontdump = False              # RAM left out of core dumps (remapped RAM too)
        self._wired = False                 # RAM locked in host memory (remapped RAM too)
        # Pages pyhyve's own threads may have written (device DMA), which KVM's
        # log does not see: page numbers (gpa // PAGE_SIZE) while tracked, and
        # the writable views a device keeps (virtqueue used rings), by owner.
        self._host_written: set[int] | None = None
        self._lasting_writes: dict[object, tuple[int, int]] = {}
        self._add(Region("lowmem", 0, self._lowmem, 0, self.lowmem_size, True))
        if self._highmem is not None:
            self._add(Region("highmem", HIGHMEM_BASE, self._highmem, 0,
                             self.highmem_size, True))

    @staticmethod
    def _anonymous(size: int) -> mmap.mmap:
        try:
            backing = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                | getattr(mmap, "MAP_NORESERVE", 0))
        except (OSError, OverflowError) as exc:
            raise GuestMemoryError(f"cannot allocate {size} bytes of guest memory: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
        _prefer_huge_pages(backing)
        return backing

    def _ram_backings(self) -> list[mmap.mmap]:
        return [backing for backing in (self._lowmem, self._highmem) if backing is not None]

    def exclude_from_core_dumps(self) -> None:
        """Leave guest RAM out of the process's core dumps (MADV_DONTDUMP), as
        bhyve does unless -C (memory.guest_in_core): a core of a 16 GiB VM is
        then the hypervisor's, not 16 GiB of the guest's data."""
        self._dontdump = True
        for backing in self._ram_backings():
            self._advise(backing, 0, len(backing))

    def _advise(self, backing: mmap.mmap, start: int, length: int) -> None:
        if self._dontdump:
            try:
                backing.madvise(mmap.MADV_DONTDUMP, start, length)
            except OSError as exc:
                raise GuestMemoryError("cannot leave guest memory out of core dumps: "
                                       f"{exc.strerror or exc}") from None

    def wire(self) -> None:
        """Lock guest RAM into host memory (bhyve's -S), failing clearly if not allowed."""
        self._wired = True
        for backing in self._ram_backings():
            self._lock(_host_address(backing), len(backing))

    def _lock(self, address: int, length: int) -> None:
        if self._wired and _libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(length)):
            raise GuestMemoryError(f"cannot wire guest memory: "
                                   f"{os.strerror(ctypes.get_errno())} (see ulimit -l)")

    # --- replacing RAM wholesale (snapshot restore) --------------------------
    def _ram_at(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """The RAM backing holding [gpa, gpa + length) and the offset of gpa in it."""
        for base, backing in reversed(self.backings()):
            if base <= gpa and gpa - base + length <= len(backing):
                return backing, gpa - base
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not guest RAM")

    def _map_over(self, backing: mmap.mmap, offset: int, length: int, flags: int,
                  fd: int, file_offset: int) -> None:
        address = _host_address(backing) + offset
        got = _libc.mmap(ctypes.c_void_p(address), ctypes.c_size_t(length),
                         mmap.PROT_READ | mmap.PROT_WRITE, flags | MAP_FIXED, fd,
                         ctypes.c_long(file_offset))
        if got != address:
            raise GuestMemoryError(f"cannot map guest memory: "
                                   f"{os.strerror(ctypes.get_errno())}")
        self._advise(backing, offset, length)
        self._lock(address, length)

    def zero_ram(self) -> None:
        """Make all guest RAM zero again: fresh anonymous pages (so pages a
        snapshot restore mapped from a file are dropped with their file)."""
        for backing in self._ram_backings():
            self._map_over(backing, 0, len(backing), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                           | getattr(mmap, "MAP_NORESERVE", 0), -1, 0)
            _prefer_huge_pages(backing)

    def map_file(self, gpa: int, length: int, fd: int, offset: int) -> None:
        """Back guest RAM [gpa, gpa + length) with the pages of FD from OFFSET,
        copy-on-write (MAP_PRIVATE), as Firecracker restores a snapshot: the
        guest reads a page from the page cache when it first touches it, and
        its writes stay its own.  All page aligned.  The file must not shrink
        while mapped: the guest's next touch of a lost page would fail KVM_RUN."""
        if (gpa | length | offset) % PAGE_SIZE:
            raise GuestMemoryError(f"file mapping {gpa:#x}+{length:#x} is not page aligned")
        backing, start = self._ram_at(gpa, length)
        self._map_over(backing, start, length, mmap.MAP_PRIVATE, fd, offset)

    # --- layout -----------------------------------------------------------
    def _add(self, region: Region) -> None:
        index = bisect.bisect(self._starts, region.gpa)
        if (index > 0 and self._regions[index - 1].end > region.gpa) or \
           (index < len(self._regions) and self._regions[index].gpa < region.end):
            raise GuestMemoryError(f"{region!r} overlaps existing memory")
        self._regions.insert(index, region)
        self._starts.insert(index, region.gpa)
        if self._free_slots:            # a BAR the guest moves again and again reuses its slot
            slot = self._free_slots.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
        self._slots[region.gpa] = slot
        if self._log_ram and self._is_ram(region):
            region.log_dirty = True
        self._register(region)

    def _register(self, region: Region) -> None:
        flags = 0 if region.writable else abi.KVM_MEM_READONLY
        if region.log_dirty:
            flags |= abi.KVM_MEM_LOG_DIRTY_PAGES
        self.vm.set_user_memory_region(self._slots[region.gpa], region.gpa, region.size,
                                       _host_address(region.backing) + region.offset,
                                       flags)

    def _is_ram(self, region: Region) -> bool:
        return region.writable and (region.backing is self._lowmem
                                    or region.backing is self._highmem)

    def _remove(self, gpa: int) -> Region:
        index = self._starts.index(gpa)
        region = self._regions.pop(index)
        self._starts.pop(index)
        slot = self._slots.pop(gpa)
        self.vm.set_user_memory_region(slot, gpa, 0, 0)
        self._free_slots.append(slot)
        region.view.release()
        return region

    def add_rom(self, name: str, gpa: int, backing: mmap.mmap, offset: int,
                size: int) -> None:
        """Map `size` bytes of `backing` read-only at `gpa`."""
        self._add(Region(name, gpa, backing, offset, size, False))

    def set_guest_mapped(self, gpa: int, mapped: bool) -> None:
        """Show the read-only region at `gpa` to the guest, or take it away so
        that reads too exit to the MMIO bus (flash answering a command rather
        than its data).  Only KVM's memslot changes: the host's view stays."""
        region = self._regions[self._starts.index(gpa)]
        slot = self._slots[gpa]
        if mapped:
            self.vm.set_user_memory_region(slot, gpa, region.size,
                                           _host_address(region.backing) + region.offset,
                                           abi.KVM_MEM_READONLY)
        else:
            self.vm.set_user_memory_region(slot, gpa, 0, 0)

    def carve_hole(self, start: int, end: int) -> None:
        """Take [START, END) out of the guest RAM that covers it, so that the
        guest's accesses there exit to the MMIO bus (the legacy VGA window,
        which a display device serves).  Only KVM's memslots change: the RAM
        behind stays in the backing, as snapshots see it."""
        region = self._region(start, end - start)
        if region.backing is not self._lowmem and region.backing is not self._highmem:
            raise GuestMemoryError(f"{start:#x}-{end:#x} is not in guest RAM")
        self._remove(region.gpa)
        if start > region.gpa:
            self._add(Region(region.name, region.gpa, region.backing, region.offset,
                             start - region.gpa, region.writable, region.log_dirty))
        if end < region.end:
            self._add(Region(f"{region.name}-{end:x}", end, region.backing,
                             region.offset + end - region.gpa, region.end - end,
                             region.writable, region.log_dirty))

    def add_device_ram(self, name: str, gpa: int, backing: mmap.mmap) -> bool:
        """Map a device's own memory (a framebuffer BAR) at GPA, writable by the
        guest without exits; False, changing nothing, where that would overlap
        other memory (a BAR the firmware is sizing at 0xFF000000, say)."""
        try:
            self._add(Region(name, gpa, backing, 0, len(backing), True))
        except GuestMemoryError:
            return False
        return True

    def remove_device_ram(self, gpa: int) -> None:
        """Unmap what add_device_ram() or add_rom() mapped at GPA."""
        self._remove(gpa)

    def map_bootrom(self, rom: mmap.mmap) -> None:
        """Map a bootrom so it ends at 4 GiB, with its tail in the BIOS area."""
        size = len(rom)
        self.add_rom("bootrom", HIGHMEM_BASE - size, rom, 0, size)
        alias = min(size, BIOS_AREA_SIZE)
        alias_start = BIOS_AREA_END - alias
        self._bios_rom = (rom, size - alias, alias_start)
        if self.lowmem_size < BIOS_AREA_END:
            return
        self._remove(0)
        self._add(Region("lowmem", 0, self._lowmem, 0, alias_start, True))
        for start, end in BIOS_AREA_CHUNKS:
            if start >= alias_start:
                self._add(self._bios_region(start, end - start, "rom"))
        self._add(Region("lowmem-above-1m", BIOS_AREA_END, self._lowmem, BIOS_AREA_END,
                         self.lowmem_size - BIOS_AREA_END, True))

    def _bios_region(self, gpa: int, size: int, mode: str) -> Region:
        if mode == "rom":
            rom, offset, alias_start = self._bios_rom
            return Region("bios-rom", gpa, rom, offset + gpa - alias_start, size, False)
        return Region(f"bios-{mode}", gpa, self._lowmem, gpa, size, mode == "ram")

    def set_bios_area(self, gpa: int, mode: str) -> None:
        """Back one shadowable chunk of the BIOS area (see BIOS_AREA_CHUNKS) as the
        chipset's PAM registers say: "rom" (reads hit the bootrom alias), "ram-ro"
        (RAM, writes ignored) or "ram".  Chunks the bootrom does not cover stay RAM."""
        if self._bios_rom is None or mode not in BIOS_AREA_MODES or gpa not in self._starts:
            return
        region = self._regions[self._starts.index(gpa)]
        if not region.name.startswith("bios-") or region.name == f"bios-{mode}":
            return
        self._remove(gpa)
        self._add(self._bios_region(gpa, region.size, mode))

    def backings(self) -> list[tuple[int, mmap.mmap]]:
        """(guest-physical base, mapping) of the RAM below and above the PCI hole,
        whole: a snapshot saves and restores guest RAM through these (shadowed
        BIOS-area RAM included, which the regions may hide behind the ROM)."""
        return [(base, backing) for base, backing in ((0, self._lowmem),
                                                      (HIGHMEM_BASE, self._highmem))
                if backing is not None]

    # --- dirty logging ------------------------------------------------------
    def log_dirty(self, on: bool, gpa: int | None = None) -> None:
        """Start or stop KVM's log of the guest's writes to the region that starts
        at GPA (a framebuffer), or to all guest RAM when GPA is None (live
        migration: RAM regions the chipset re-maps meanwhile keep logging).
        Pages written before logging starts are not reported."""
        if on and self._manual_protect is None:
            # Clearing the log is then a separate, chunked call (collect_dirty),
            # so a large VM does not hold KVM's MMU lock for its whole bitmap.
            self._manual_protect = bool(self.vm.kvm.check_extension(
                abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            if self._manual_protect:
                self.vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                                   abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        if gpa is None:
            self._log_ram = on
            targets = [region for region in self._regions if self._is_ram(region)]
        else:
            targets = [self._regions[self._starts.index(gpa)]]
        for region in targets:
            if region.log_dirty != on:
                region.log_dirty = on
                self._register(region)

    def track_host_writes(self, on: bool) -> None:
        """Start (afresh) or stop noting the pages that writable views cover."""
        self._host_written = set() if on else None

    def host_written_pages(self) -> set[int]:
        """Page numbers of what writable views handed out since tracking began
        covered, and of every lasting view: a superset of what the host wrote
        meanwhile.  Views are noted when made, not when written through, so
        only once the devices are quiesced does this cover every write."""
        pages = set(self._host_written or ())
        for gpa, length in list(self._lasting_writes.values()):
            pages.update(range(gpa // PAGE_SIZE, (gpa + length + PAGE_SIZE - 1) // PAGE_SIZE))
        return pages

    def logged_regions(self) -> list[Region]:
        return [region for region in self._regions if region.log_dirty]

    def collect_dirty(self, region: Region) -> bytes:
        """The pages of REGION the guest wrote since the last call (or since
        logging began): bit N of byte N // 8 (least significant first) is the
        page at region.gpa + 4096 * N.  Those pages are logged afresh."""
        pages = region.size // PAGE_SIZE
        words = (pages + 63) // 64
        bitmap = (ctypes.c_uint64 * words)()
        slot = self._slots[region.gpa]
        self.vm.get_dirty_log(slot, bitmap)
        if self._manual_protect:
            for first_word in range(0, words, DIRTY_CLEAR_CHUNK_WORDS):
                count = min(DIRTY_CLEAR_CHUNK_WORDS, words - first_word)
                chunk = (ctypes.c_uint64 * count).from_buffer(bitmap, first_word * 8)
                if any(chunk):
                    self.vm.clear_dirty_log(slot, first_word * 64,
                                            min(count * 64, pages - first_word * 64), chunk)
        return bytes(bitmap)

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def ram_ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of guest RAM, as an e820 map reports it."""
        ranges = [(0, self.lowmem_size)]
        if self.highmem_size:
            ranges.append((HIGHMEM_BASE, self.highmem_size))
        return ranges

    # --- access -------------------------------------------------------------
    def _region(self, gpa: int, length: int, write: bool = False) -> Region:
        """The region holding the whole range (writable, with `write`), or
        GuestMemoryError."""
        index = bisect.bisect(self._starts, gpa) - 1
        if index >= 0 and length >= 0:
            region = self._regions[index]
            if gpa + length <= region.end:
                if write and not region.writable:
                    raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is read-only")
                return region
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not in guest memory")

    def check(self, gpa: int, length: int, write: bool = False) -> None:
        """view()'s checks without the view: GuestMemoryError where view() would raise."""
        self._region(gpa, length, write)

    def view(self, gpa: int, length: int, write: bool = False) -> memoryview:
        """A memoryview of guest memory; raises GuestMemoryError when out of range."""
        region = self._region(gpa, length, write)
        start = gpa - region.gpa
        if write and self._host_written is not None:
            self._host_written.update(range(gpa // PAGE_SIZE,
                                            (gpa + length + PAGE_SIZE - 1) // PAGE_SIZE))
        return region.view[start:start + length]

    def lasting_view(self, owner, gpa: int, length: int) -> memoryview:
        """A writable view that OWNER keeps and writes through for long (a
        virtqueue's used ring): its pages count as host-written for as long
        as it is OWNER's latest (host_written_pages)."""
        view = self.view(gpa, length, write=True)
        self._lasting_writes[owner] = (gpa, length)
        return view

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        try:
            self._region(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data), write=True)[:] = data

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.view(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.view(gpa, 2, write=True), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self.view(gpa, 4, write=True), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.view(gpa, 8, write=True), 0, value)

    def close(self) -> None:
        """Forget the regions and give guest RAM back to the host now, not when
        the cyclic collector reaches the closed VM (a program running VM after
        VM kept each one's RAM until then): unmapped where no view of it is
        left, else its pages dropped (MADV_DONTNEED), the range itself going
        with the last view."""
        for region in self._regions:
            region.view.release()
        self._regions.clear()
        self._starts.clear()
        for backing in self._ram_backings():
            try:
                backing.close()
            except BufferError:         # a device still holds a view of it
                backing.madvise(mmap.MADV_DONTNEED)
