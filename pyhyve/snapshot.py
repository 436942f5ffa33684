"""Save a paused VM to one file and build a running VM back from it
(bhyve's `bhyvectl --suspend` / `bhyve -r`).

The snapshot is one file:

    b"PYHYVE-SNAPSHOT\\n"          16 bytes of magic
    manifest length               8 bytes, little endian
    manifest CRC-32               4 bytes, little endian
    manifest                      JSON, UTF-8
    data                          the binary parts the manifest points into
    zeros                         up to the next 4 KiB boundary of the file
    memory                        guest RAM's pages that are not all zero

The manifest is {"format": "pyhyve-snapshot", "version": 7, "config": {...},
"vcpus": [...], "vm": {...}, "devices": {...}, "memory": [...],
"data_size": N, "data_crc32": N, "memory_bytes": N, "memory_crc32": N}.
Binary parts are [offset, length] pairs into the data area: per vCPU the raw KVM structures of regs, sregs,
fpu, xsave (with KVM_CAP_XSAVE), xcrs (with KVM_CAP_XCRS), lapic and
vcpu_events, plus mp_state and the MSRs of KVM_GET_MSR_INDEX_LIST and the
machine-check banks (mce.bank_msrs) that KVM_GET_MSRS reads ({"index":
value} in hex); the irqchip (PIC master,
PIC slave, IOAPIC), PIT2 state and kvmclock.  Guest RAM (its backing, so
shadowed BIOS-area RAM too) is stored sparsely: "memory" lists runs
[gpa, length, offset] of 4 KiB pages that are not all zero, the offset
into the memory area, which starts page aligned so that a restore maps
the runs into guest RAM copy-on-write (GuestMemory.map_file) instead of
reading them: the guest runs at once and its pages come from the page
cache as it touches them, as Firecracker restores.  Everything else is
zero after a restore.  The manifest's CRC-32 (before it is parsed), the
data area's size and CRC-32, and the file's size are checked before
anything is restored, so a truncated or corrupt file is refused, as is a
snapshot of another format version; the memory area's CRC-32 is checked
too with -o snapshot.check_memory=true (reading all of it first).  A CRC
catches accidents, not forgery, and a snapshot needs no more trust than
that: it carries state, never authority (a changed page of guest memory
is the guest's own business).
"config" records the options the VM ran with, for the operator to read; a
restore builds the VM from the operator's own options (pyhyve -r, as bhyve
-r and QEMU -incoming: disks, consoles, firmware, taps, sockets and the
sandbox come only from the command line or -k) and refuses a snapshot
whose machine differs: memory size, CPU topology, the devices by name and
emulation.

Devices are saved by walking the VM's device list (lifecycle.Device):
"devices" maps each device's name ("rtc", "com1", "pci.0.3.0", ...) to what
its save_state() returned; a PCI function's state names its emulation, and
holds config space, BAR and ROM addresses, MSI/MSI-X state and the INTx
condition, and for virtio devices the transport and each queue's layout
and ring positions.  While it is saved, every device is quiesced
(Device.quiesce): the vCPUs are paused already, virtio devices serve what
the driver offered and stop taking work, virtio-blk syncs its disk, so no
request is caught half done and guest memory, saved last, holds every
completion.

A restore puts back memory, the
irqchip, clock and vCPUs, then hands each device its saved state (the set
of names must match the VM's exactly), once interrupts can be delivered:
BARs decode where the guest put them, the chipset's PAM shadowing and PIRQ
routes follow its registers, and virtio devices look at their live queues
once, since notifications do not survive.  Saved state is data, not code:
each device checks every field and refuses what does not fit (StateError).
Interrupt lines are not saved as levels: once the irqchip is back, every
wired line is lowered and each device raises again what its registers ask
for (an edge-triggered line then gives the guest a fresh edge for a
condition it has not served yet, rather than none).
A device that does not declare itself savable (Device.savable) makes save()
refuse with SnapshotError naming it, rather than write a snapshot that
would not run.  Not saved: the GDB stub's connection, a frame virtio-net
read from its tap and not yet delivered (the network sees one lost packet),
the host side of character backends (the operator's options open
them again), and what disks and the bootrom's variable file hold: those are
the operator's files, synced when the snapshot is taken and used as they are
when it is restored (the variable store's command state is saved, and its
size must match).

A VM asleep in ACPI S3 is saved as it sleeps ("vm": {"suspended": true}):
its vCPUs are stopped already, and the restored VM starts asleep, waiting
for a wake event (vm.py), as QEMU's migration keeps a suspended guest
suspended.
"""

import contextlib
import ctypes
import os
import struct
import time
import zlib

from . import mce
from .config import write_user_file
from .kvm import abi
from .lifecycle import StateError
from .memory import GuestMemoryError

MAGIC = b"PYHYVE-SNAPSHOT\n"
FORMAT = "pyhyve-snapshot"
VERSION = 7         # 5: devices by name; 6: the manifest's CRC in the header; 7: memory mapped
PAGE = 4096
_HEADER = struct.Struct("<QI")      # manifest length, its CRC-32
MAX_MANIFEST = 64 << 20
KVM_CAP_XCRS = 56
MSR_TSC_DEADLINE = 0x6E0
IRQCHIPS = (0, 1, 2)            # KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC
_ZERO_PAGE = bytes(PAGE)


class SnapshotError(Exception):
    """A snapshot cannot be written or read; the message is fit for a user."""


# --- saving --------------------------------------------------------------------------
class _Writer:
    def __init__(self):
        self.chunks: list[bytes] = []
        self.size = 0
        self.crc = 0

    def add(self, data) -> list[int]:
        """Keep `data` for the file.  Guest memory comes as memoryviews, kept as they
        are (no copy of the guest: its vCPUs stay paused until the file is written)."""
        if not isinstance(data, memoryview):
            data = bytes(data)
        where = [self.size, len(data)]
        self.chunks.append(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return where


def check_savable(vm, doing: str = "snapshot") -> None:
    """Raise SnapshotError naming the first device whose state is not saved
    ("cannot DOING: ...")."""
    for device in vm.devices:
        if not device.savable:
            raise SnapshotError(f"cannot {doing}: device {device.description} "
                                f"has state pyhyve does not save")


def _readable_msrs(kvm_vcpu, indices: list[int]) -> dict[int, int]:
    """The MSRs KVM_GET_MSRS reads: it stops at the first it refuses, so skip that one."""
    values: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = kvm_vcpu.get_msrs(rest)
        values.update(got)
        rest = rest[len(got) + 1:]
    return values


def _vcpu_state(vm, vcpu_thread, writer: _Writer, msr_indices: list[int]) -> dict:
    kvm_vcpu = vcpu_thread.kvm_vcpu
    state = {"id": vcpu_thread.id, "apic_id": kvm_vcpu.id,
             "regs": writer.add(kvm_vcpu.get_regs()),
             "sregs": writer.add(kvm_vcpu.get_sregs()),
             "fpu": writer.add(kvm_vcpu.get_fpu()),
             "lapic": writer.add(kvm_vcpu.get_lapic()),
             "mp_state": kvm_vcpu.get_mp_state(),
             "vcpu_events": writer.add(kvm_vcpu.get_vcpu_events())}
    if vm.kvm.check_extension(abi.KVM_CAP_XSAVE):
        state["xsave"] = writer.add(kvm_vcpu.get_xsave())
    if vm.kvm.check_extension(KVM_CAP_XCRS):
        state["xcrs"] = writer.add(kvm_vcpu.get_xcrs())
    msrs = _readable_msrs(kvm_vcpu, msr_indices)
    state["msrs"] = {f"{index:#x}": f"{value:#x}" for index, value in msrs.items()}
    return state


def _memory_runs(vm, writer: _Writer) -> list[list[int]]:
    """[gpa, length, offset] for each run of pages that are not all zero,
    written to WRITER (the memory area: every offset stays page aligned)."""
    runs = []
    for gpa, backing in vm.memory.backings():
        size = len(backing)
        view = memoryview(backing)
        start = None
        for page in range(0, size, PAGE):
            zero = view[page:page + PAGE] == _ZERO_PAGE
            if not zero and start is None:
                start = page
            elif zero and start is not None:
                where = writer.add(view[start:page])
                runs.append([gpa + start, page - start, where[0]])
                start = None
        if start is not None:
            where = writer.add(view[start:size])
            runs.append([gpa + start, size - start, where[0]])
    return runs


@contextlib.contextmanager
def quiesced(vm):
    """Every device settled and still until the context ends (Device.quiesce):
    what they finish may raise interrupts, which the vCPU and irqchip state
    must then hold, and guest memory, saved last, holds every completion.
    SnapshotError names a device that cannot (a disk that cannot sync)."""
    with contextlib.ExitStack() as stack:
        for device in vm.devices:
            try:
                stack.enter_context(device.quiesce())
            except OSError as exc:
                raise SnapshotError(f"cannot snapshot: device {device.description}: "
                                    f"{exc.strerror or exc}") from None
        yield


def machine_state(vm, writer: _Writer) -> dict:
    """The manifest of everything but guest memory: the vCPUs, the irqchip, PIT
    and clock, whether the guest sleeps in S3, every device, and the config
    for the reader to compare; the binary parts go to WRITER.  The vCPUs are
    paused and the devices quiesced."""
    msr_indices = vm.kvm.msr_index_list() + mce.bank_msrs(vm.mcg_cap)
    vcpus = [vcpu.call(lambda v: _vcpu_state(vm, v, writer, msr_indices))
             for vcpu in vm.vcpus]
    kvm_vm = vm.kvm_vm
    state = {"irqchip": [writer.add(kvm_vm.get_irqchip(chip)) for chip in IRQCHIPS],
             "pit2": writer.add(kvm_vm.get_pit2()),
             "clock": writer.add(kvm_vm.get_clock())}
    if vm.suspended:
        state["suspended"] = True
    devices = {device.name: device.save_state() for device in vm.devices}
    config = {key: vm.config.get(key) for key in vm.config.keys()}
    return {"format": FORMAT, "version": VERSION, "config": config,
            "memory_size": vm.memory.size, "vcpus": vcpus, "vm": state, "devices": devices}


def encoded_machine_state(vm) -> tuple[bytes, bytes]:
    """machine_state() as JSON, and its binary parts joined (what a live
    migration sends once the VM is paused and quiesced)."""
    writer = _Writer()
    manifest = machine_state(vm, writer)
    manifest["data_size"] = writer.size
    return _encoded(manifest), b"".join(writer.chunks)


def save(vm, path: str) -> int:
    """Write VM's state to PATH; every vCPU must be paused (or stopped).
    Returns the file's size in bytes."""
    check_savable(vm)
    vm.log.info("snapshot: writing %s", path)
    started = time.monotonic()
    writer, ram = _Writer(), _Writer()
    # The devices stay still until the file is written, since guest memory
    # goes into it as it is.
    with quiesced(vm):
        manifest = machine_state(vm, writer)
        memory = _memory_runs(vm, ram)
        manifest.update(memory=memory, data_size=writer.size, data_crc32=writer.crc,
                        memory_bytes=ram.size, memory_crc32=ram.crc)
        try:
            size = _write(path, _encoded(manifest), writer.chunks, ram.chunks)
        finally:
            ram.chunks.clear()       # views of guest memory: it may be unmapped later
    vm.log.info("snapshot: wrote %s, %d bytes (%d of them guest memory) in %.1f s", path,
                size, sum(run[1] for run in memory), time.monotonic() - started)
    return size


def _encoded(manifest: dict) -> bytes:
    """The manifest as the file holds it: JSON.  Every VM imports this module
    as it is built (kvm_power_on_state) and only some save one, so json is
    imported here, not with the module: it costs each start about a
    millisecond (pyhyve.deferred)."""
    import json
    return json.dumps(manifest, sort_keys=True).encode()


def _decoded(encoded: bytes):
    """_encoded undone; ValueError (or RecursionError) where it is not JSON."""
    import json
    return json.loads(encoded)


def _write(path: str, encoded: bytes, chunks: list, memory: list) -> int:
    """The file appears whole under PATH or not at all, mode 0600: the guest's
    RAM is in it (config.write_user_file).  Returns its size."""
    header = MAGIC + _HEADER.pack(len(encoded), zlib.crc32(encoded)) + encoded
    parts = [header, *chunks]
    size = sum(len(part) for part in parts)
    parts.append(bytes(_page_align(size) - size))
    parts += memory
    try:
        write_user_file(path, parts)
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot {path}: {exc.strerror or exc}") from None
    return sum(len(part) for part in parts)


def _page_align(offset: int) -> int:
    return -(-offset // PAGE) * PAGE


# --- reading -------------------------------------------------------------------------
class Snapshot:
    """A snapshot file, checked: manifest and data area, and the open file
    whose memory area (from byte memory_start) restore_into maps."""

    def __init__(self, manifest: dict, data: memoryview, fd: int = -1, memory_start: int = 0,
                 path: str = ""):
        self.path = path
        self.manifest = manifest
        self.data = data
        self.fd = fd
        self.memory_start = memory_start

    def close(self) -> None:
        """The file may go: guest RAM mapped from it keeps its pages."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def blob(self, where) -> bytes:
        offset, length = where
        return bytes(self.data[offset:offset + length])

    def load(self, ctype, where):
        data = self.blob(where)
        if len(data) != ctypes.sizeof(ctype):
            raise SnapshotError(f"snapshot {ctype.__name__} has {len(data)} bytes, "
                                f"this pyhyve expects {ctypes.sizeof(ctype)}")
        return ctype.from_buffer_copy(data)


def read(path: str, check_memory: bool = False) -> Snapshot:
    """Open and check PATH (its memory area's CRC too with CHECK_MEMORY);
    SnapshotError says in one line what is wrong."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _HEADER.size)
            if len(head) < len(MAGIC) or head[:len(MAGIC)] != MAGIC:
                raise SnapshotError(f"{path} is not a pyhyve snapshot")
            if len(head) != len(MAGIC) + _HEADER.size:
                raise SnapshotError(f"snapshot {path} is truncated")
            length, manifest_crc = _HEADER.unpack_from(head, len(MAGIC))
            if length > MAX_MANIFEST:
                raise SnapshotError(f"snapshot {path} is corrupt (manifest length {length}), "
                                    "or from an older pyhyve")
            encoded = f.read(length)
            if len(encoded) != length:
                raise SnapshotError(f"snapshot {path} is truncated")
            if zlib.crc32(encoded) != manifest_crc:
                raise SnapshotError(f"snapshot {path} is corrupt (manifest checksum mismatch), "
                                    "or from an older pyhyve")
            try:
                manifest = _decoded(encoded)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise SnapshotError(f"snapshot {path} is corrupt (bad manifest)") from None
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise SnapshotError(f"{path} is not a pyhyve snapshot")
            if manifest.get("version") != VERSION:
                raise SnapshotError(f"snapshot {path} has format version "
                                    f"{manifest.get('version')!r}; this pyhyve reads "
                                    f"version {VERSION}")
            data_size, memory_bytes = manifest.get("data_size"), manifest.get("memory_bytes")
            if not (isinstance(data_size, int) and isinstance(memory_bytes, int)):
                raise SnapshotError(f"snapshot {path} is corrupt (no area sizes)")
            memory_start = _page_align(len(MAGIC) + _HEADER.size + length + data_size)
            if os.fstat(f.fileno()).st_size != memory_start + memory_bytes:
                raise SnapshotError(f"snapshot {path} is truncated or has trailing data")
            data = f.read(data_size)
            if zlib.crc32(data) != manifest.get("data_crc32"):
                raise SnapshotError(f"snapshot {path} is corrupt (checksum mismatch)")
            if check_memory and _file_crc(f, memory_start) != manifest.get("memory_crc32"):
                raise SnapshotError(f"snapshot {path} is corrupt (memory checksum mismatch)")
            fd = os.dup(f.fileno())
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    for key in ("config", "vcpus", "vm", "devices", "memory"):
        if key not in manifest:
            os.close(fd)
            raise SnapshotError(f"snapshot {path} is corrupt (no {key})")
    return Snapshot(manifest, memoryview(data), fd, memory_start, path)


def _file_crc(f, start: int) -> int:
    f.seek(start)
    crc = 0
    while chunk := f.read(1 << 20):
        crc = zlib.crc32(chunk, crc)
    return crc


def machine_differences(config, saved) -> list[str]:
    """How the machine that CONFIG builds differs from the one SAVED (a Config
    a snapshot or a migration source recorded) describes: memory size, CPU
    topology, the PCI functions' emulations; an empty list when they match."""
    from .builder import pci_slots, topology
    from .config import parse_size
    from .vm import DEFAULT_MEMORY
    differences = []
    sizes = [parse_size(c.get("memory.size", DEFAULT_MEMORY), "memory size")
             for c in (config, saved)]
    if sizes[0] != sizes[1]:
        differences.append(f"memory {sizes[0]} bytes, saved {sizes[1]}")
    shapes = [topology(c) for c in (config, saved)]
    if shapes[0] != shapes[1]:
        differences.append(f"CPU topology {shapes[0]}, saved {shapes[1]}")
    slots = [pci_slots(c) for c in (config, saved)]
    for where in sorted(set(slots[0]) | set(slots[1])):
        given, had = (s.get(where, "nothing") for s in slots)
        if given != had:
            differences.append(f"PCI {where[0]}.{where[1]} {given}, saved {had}")
    return differences


# --- the power-on state: what a reset puts back --------------------------------------
def kvm_power_on_state(vm) -> Snapshot:
    """KVM's state of a VM just built (no vCPU has run; the boot method has set
    the BSP up): every vCPU, the PICs, the I/O APIC and the PIT, kept as a
    snapshot without memory or devices, for VirtualMachine.reset()."""
    writer = _Writer()
    msr_indices = vm.kvm.msr_index_list()
    vcpus = [_vcpu_state(vm, vcpu, writer, msr_indices) for vcpu in vm.vcpus]
    state = {"irqchip": [writer.add(vm.kvm_vm.get_irqchip(chip)) for chip in IRQCHIPS],
             "pit2": writer.add(vm.kvm_vm.get_pit2())}
    return Snapshot({"vcpus": vcpus, "vm": state}, memoryview(b"".join(writer.chunks)))


def reset_kvm(vm, power_on: Snapshot) -> None:
    """Put KVM back into kvm_power_on_state(); no vCPU may be running."""
    _restore_chips(vm, power_on)
    for vcpu, state in zip(vm.vcpus, power_on.manifest["vcpus"]):
        _restore_vcpu(vm, vcpu.kvm_vcpu, state, power_on)


# --- restoring -----------------------------------------------------------------------
def _restore_chips(vm, snap: Snapshot) -> None:
    state = snap.manifest["vm"]
    for where in state["irqchip"]:
        vm.kvm_vm.set_irqchip(snap.load(abi.kvm_irqchip, where))
    vm.kvm_vm.set_pit2(snap.load(abi.kvm_pit_state2, state["pit2"]))


def _restore_vcpu(vm, kvm_vcpu, state: dict, snap: Snapshot) -> None:
    kvm_vcpu.set_sregs(snap.load(abi.kvm_sregs, state["sregs"]))
    kvm_vcpu.set_regs(snap.load(abi.kvm_regs, state["regs"]))
    if "xsave" in state and vm.kvm.check_extension(abi.KVM_CAP_XSAVE):
        kvm_vcpu.set_xsave(snap.load(abi.kvm_xsave, state["xsave"]))
    else:
        kvm_vcpu.set_fpu(snap.load(abi.kvm_fpu, state["fpu"]))
    if "xcrs" in state and vm.kvm.check_extension(KVM_CAP_XCRS):
        kvm_vcpu.set_xcrs(snap.load(abi.kvm_xcrs, state["xcrs"]))
    msrs = {int(index, 16): int(value, 16) for index, value in state["msrs"].items()}
    pending = list(msrs.items())
    while pending:                   # KVM_SET_MSRS stops at the first it refuses
        done = kvm_vcpu.set_msrs(dict(pending))
        if done < len(pending):
            vm.log.debug("restore: MSR %#x not accepted", pending[done][0])
        pending = pending[done + 1:]
    kvm_vcpu.set_lapic(snap.load(abi.kvm_lapic_state, state["lapic"]))
    if MSR_TSC_DEADLINE in msrs:
        # KVM ignores this MSR unless the LAPIC timer is in TSC-deadline mode, which
        # it is only now: written with the rest, a Linux guest's timer never fired.
        kvm_vcpu.set_msrs({MSR_TSC_DEADLINE: msrs[MSR_TSC_DEADLINE]})
    kvm_vcpu.set_mp_state(state["mp_state"])
    kvm_vcpu.set_vcpu_events(snap.load(abi.kvm_vcpu_events, state["vcpu_events"]))


def clear_memory(vm) -> None:
    """Make all guest RAM read as zero (what a restore starts from)."""
    vm.memory.zero_ram()


def _restore_memory(vm, snap: Snapshot) -> None:
    """Guest RAM becomes the snapshot's: zero, with its runs mapped from the file."""
    area = snap.manifest["memory_bytes"]
    clear_memory(vm)
    for gpa, length, offset in snap.manifest["memory"]:
        if not all(isinstance(value, int) and value >= 0 for value in (gpa, length, offset)) \
                or offset + length > area:
            raise SnapshotError(f"snapshot memory run {gpa!r}+{length!r} at {offset!r} is "
                                "outside its memory area")
        try:
            vm.memory.map_file(gpa, length, snap.fd, snap.memory_start + offset)
        except GuestMemoryError as exc:
            raise SnapshotError(f"snapshot memory run {gpa:#x}+{length:#x}: {exc}") from None


def _restore_devices(vm, saved: dict) -> None:
    """Each device takes back its own state, then raises the interrupts that
    state asks for (every wired line was lowered first)."""
    if not isinstance(saved, dict):
        raise SnapshotError("snapshot is corrupt (devices)")
    names = [device.name for device in vm.devices]
    if set(saved) != set(names):
        missing, extra = set(names) - set(saved), set(saved) - set(names)
        raise SnapshotError("snapshot's devices differ from the VM's: "
                            + "; ".join(part for part in (
                                missing and f"not saved: {', '.join(sorted(missing))}",
                                extra and f"not in the VM: {', '.join(sorted(extra))}")
                                if part))
    vm.lower_irq_lines()
    for device in vm.devices:
        try:
            device.restore_state(saved[device.name])
        except StateError as exc:
            raise SnapshotError(f"snapshot does not fit device {device.description}: "
                                f"{exc}") from None
    for device in vm.devices:
        device.resync_irq()


def restore_into(vm, path: str | Snapshot) -> None:
    """Load a snapshot into VM, freshly built from the snapshot's config and not
    yet running."""
    snap = read(path) if isinstance(path, str) else path
    try:
        try:
            _check_shape(vm, snap.manifest)
            _restore_memory(vm, snap)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise SnapshotError(f"snapshot is corrupt ({type(exc).__name__}: {exc})") \
                from None
        restore_machine(vm, snap)
    finally:
        snap.close()


def _check_shape(vm, manifest: dict) -> None:
    if len(manifest["vcpus"]) != len(vm.vcpus):
        raise SnapshotError(f"snapshot has {len(manifest['vcpus'])} vCPUs, the VM "
                            f"{len(vm.vcpus)}")
    if manifest.get("memory_size", vm.memory.size) != vm.memory.size:
        raise SnapshotError("snapshot's memory size differs from the VM's")
    if not isinstance(manifest["vm"].get("suspended", False), bool):   # asleep in ACPI S3
        raise SnapshotError("snapshot is corrupt (vm suspended)")


def restore_machine(vm, snap: Snapshot) -> None:
    """Everything machine_state() saved, into VM (its memory already holds the
    guest's): the irqchip, clock, vCPUs, then the devices, and S3 sleep.  Every
    field is checked; SnapshotError says what does not fit."""
    m = snap.manifest
    try:
        _check_shape(vm, m)
        state = m["vm"]
        _restore_chips(vm, snap)
        clock = snap.load(abi.kvm_clock_data, state["clock"])
        clock.flags = 0
        vm.kvm_vm.set_clock(clock)
        for vcpu_thread, vcpu_state in zip(vm.vcpus, m["vcpus"]):
            _restore_vcpu(vm, vcpu_thread.kvm_vcpu, vcpu_state, snap)
        _restore_devices(vm, m["devices"])
        if state.get("suspended", False):
            vm.restore_suspended()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise SnapshotError(f"snapshot is corrupt ({type(exc).__name__}: {exc})") from None
