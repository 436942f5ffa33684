"""Save a paused VM to one file and build a running VM back from it
(bhyve's `bhyvectl --suspend` / `bhyve -r`).

The snapshot is one file:

    b"PYHYVE-SNAPSHOT\\n"          16 bytes of magic
    manifest length               8 bytes, little endian
    manifest                      JSON, UTF-8
    data                          the binary parts the manifest points into

The manifest is {"format": "pyhyve-snapshot", "version": 4, "config": {...},
"vcpus": [...], "vm": {...}, "devices": {...}, "memory": [...],
"data_size": N, "data_crc32": N}.  Binary parts are [offset, length]
pairs into the data area: per vCPU the raw KVM structures of regs, sregs,
fpu, xsave (with KVM_CAP_XSAVE), xcrs (with KVM_CAP_XCRS), lapic and
vcpu_events, plus mp_state and the MSRs of KVM_GET_MSR_INDEX_LIST that
KVM_GET_MSRS reads ({"index": value} in hex); the irqchip (PIC master,
PIC slave, IOAPIC), PIT2 state and kvmclock.  Guest RAM (its backing, so
shadowed BIOS-area RAM too) is stored sparsely: "memory" lists runs
[gpa, length, offset] of 4 KiB pages that are not all zero; everything
else is zero after a restore.  The data area's size and CRC-32 are
checked before anything is restored, so a truncated or corrupt file is
refused, as is a snapshot of another format version.  (A CRC catches
accidents, not forgery: a snapshot is as trusted as the config it holds.)

Platform devices whose state is plain data are saved: PM1 status/enable/
control, the RTC (NVRAM, index registers, clock offset), the HPET (its
registers and where its main counter stood), UART registers
and pending input, the i8042 controller and the PCI config-address latch.
Each PCI function saves itself (PciDevice.save_state): config space, BAR
and ROM addresses as the guest programmed them, MSI/MSI-X state and the
INTx condition, and for virtio devices the transport (status, features,
selectors, ISR, vectors) and each queue's layout and ring positions, plus
what the device type keeps (virtio-console: port handshake and waiting
input).  While it is saved, every device is quiesced (PciDevice.quiesce):
the vCPUs are paused already, virtio devices serve what the driver offered
and stop taking work, virtio-blk syncs its disk, so no request is caught
half done and guest memory, saved last, holds every completion.

A restore builds the VM from the saved config, then puts back memory, the
platform devices, the irqchip, clock and vCPUs, and last the PCI functions,
whose BARs are decoded (and notify ioeventfds assigned) where the guest put
them, whose PAM shadowing and PIRQ routes follow the chipset registers, and
whose live queues are looked at once, since notifications do not survive.
Interrupt lines are not saved as levels: once the irqchip is back, every
wired line is lowered and each device raises again what its registers ask
for (an edge-triggered line then gives the guest a fresh edge for a
condition it has not served yet, rather than none).
A device type that declares no savable state (PciDevice.savable) makes
save() refuse with SnapshotError naming it, rather than write a snapshot
that would not run.  Not saved: an fw_cfg transfer in progress, the GDB
stub's connection, a frame virtio-net read from its tap and not yet
delivered (the network sees one lost packet), and the host side of
character backends (they are opened again from the config).
"""

import base64
import contextlib
import ctypes
import json
import mmap
import os
import struct
import zlib

from .kvm import abi

MAGIC = b"PYHYVE-SNAPSHOT\n"
FORMAT = "pyhyve-snapshot"
VERSION = 4                     # 3: a CRC-32 of the data area instead of its SHA-256; 4: the HPET
PAGE = 4096
_LENGTH = struct.Struct("<Q")
MAX_MANIFEST = 64 << 20
# Chipset functions: their registers are all their state, and what they drive
# (PAM shadowing, PIRQ routes) follows config_changed() after a restore.
CHIPSET = {"hostbridge", "amd_hostbridge", "lpc"}
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


def check_savable(vm) -> None:
    """Raise SnapshotError naming the first device whose state is not saved."""
    for device in vm.pci.devices():
        name = device.emulation_name
        if not device.savable and name not in CHIPSET:
            raise SnapshotError(f"cannot snapshot: device {name} at PCI {device.bdf} "
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
    """[gpa, length, offset] for each run of pages that are not all zero."""
    runs = []
    memory = vm.memory
    for gpa, backing, size in ((0, memory._lowmem, memory.lowmem_size),
                               (0x100000000, memory._highmem, memory.highmem_size)):
        if backing is None or not size:
            continue
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


def _device_state(vm) -> dict:
    pm = vm.pm
    rtc = vm.rtc
    with rtc._cond:
        rtc_state = {"nvram": base64.b64encode(bytes(rtc._nvram)).decode(),
                     "index": rtc._index, "ext_index": rtc._ext_index, "a": rtc._a,
                     "b": rtc._b, "flags": rtc._flags, "offset": rtc._offset,
                     "held": rtc._held}
    i8042 = vm.i8042
    with i8042._lock:
        kbd = {"ram": base64.b64encode(bytes(i8042._ram)).decode(), "sys": i8042._sys,
               "output_port": i8042._output_port, "queue": [list(q) for q in i8042._queue],
               "last_read": i8042._last_read, "last_was_command": i8042._last_was_command,
               "command": i8042._command, "kbd_command": i8042._kbd_command}
    uarts = {name: uart.save_state() for name, uart in vm.uarts.items()}
    pci = [{"slot": device.slot, "func": device.func, "emulation": device.emulation_name,
            "state": device.save_state()} for device in vm.pci.devices()]
    return {"pm": {"status": pm.status, "enable": pm.enable, "control": pm.control},
            "rtc": rtc_state, "hpet": vm.hpet.save_state(), "i8042": kbd, "uarts": uarts,
            "pci_config_address": vm.pci.config_address, "pci": pci}


def save(vm, path: str) -> None:
    """Write VM's state to PATH; every vCPU must be paused (or stopped)."""
    check_savable(vm)
    writer = _Writer()
    msr_indices = vm.kvm.msr_index_list()
    with contextlib.ExitStack() as quiesced:
        # Devices settle first: what they finish may raise interrupts, which
        # the vCPU and irqchip state must then hold.  They stay still until the
        # file is written, since guest memory goes into it as it is.
        for device in vm.pci.devices():
            try:
                quiesced.enter_context(device.quiesce())
            except OSError as exc:             # a disk that cannot sync
                raise SnapshotError(f"cannot snapshot: {device.emulation_name} at PCI "
                                    f"{device.bdf}: {exc.strerror or exc}") from None
        vcpus = [vcpu.call(lambda v: _vcpu_state(vm, v, writer, msr_indices))
                 for vcpu in vm.vcpus]
        kvm_vm = vm.kvm_vm
        state = {"irqchip": [writer.add(kvm_vm.get_irqchip(chip)) for chip in IRQCHIPS],
                 "pit2": writer.add(kvm_vm.get_pit2()),
                 "clock": writer.add(kvm_vm.get_clock())}
        devices = _device_state(vm)
        memory = _memory_runs(vm, writer)
        config = {key: vm.config.get(key) for key in vm.config.keys()}
        manifest = {"format": FORMAT, "version": VERSION, "config": config,
                    "memory_size": vm.memory.size, "vcpus": vcpus, "vm": state,
                    "devices": devices, "memory": memory, "data_size": writer.size,
                    "data_crc32": writer.crc}
        try:
            _write(path, json.dumps(manifest, sort_keys=True).encode(), writer.chunks)
        finally:
            writer.chunks.clear()    # views of guest memory: it may be unmapped later


def _write(path: str, encoded: bytes, chunks: list) -> None:
    """The file appears whole under PATH or not at all."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            out.write(MAGIC + _LENGTH.pack(len(encoded)) + encoded)
            for chunk in chunks:
                out.write(chunk)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SnapshotError(f"cannot write snapshot {path}: {exc.strerror or exc}") from None


# --- reading -------------------------------------------------------------------------
class Snapshot:
    """A snapshot file, checked: manifest and data area."""

    def __init__(self, manifest: dict, data: memoryview):
        self.manifest = manifest
        self.data = data

    def blob(self, where) -> bytes:
        offset, length = where
        return bytes(self.data[offset:offset + length])

    def load(self, ctype, where):
        data = self.blob(where)
        if len(data) != ctypes.sizeof(ctype):
            raise SnapshotError(f"snapshot {ctype.__name__} has {len(data)} bytes, "
                                f"this pyhyve expects {ctypes.sizeof(ctype)}")
        return ctype.from_buffer_copy(data)


def read(path: str) -> Snapshot:
    """Open and check PATH; SnapshotError says in one line what is wrong."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _LENGTH.size)
            if len(head) < len(MAGIC) or head[:len(MAGIC)] != MAGIC:
                raise SnapshotError(f"{path} is not a pyhyve snapshot")
            if len(head) != len(MAGIC) + _LENGTH.size:
                raise SnapshotError(f"snapshot {path} is truncated")
            length = _LENGTH.unpack_from(head, len(MAGIC))[0]
            if length > MAX_MANIFEST:
                raise SnapshotError(f"snapshot {path} is corrupt (manifest length {length})")
            encoded = f.read(length)
            if len(encoded) != length:
                raise SnapshotError(f"snapshot {path} is truncated")
            try:
                manifest = json.loads(encoded)
            except (ValueError, UnicodeDecodeError):
                raise SnapshotError(f"snapshot {path} is corrupt (bad manifest)") from None
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise SnapshotError(f"{path} is not a pyhyve snapshot")
            if manifest.get("version") != VERSION:
                raise SnapshotError(f"snapshot {path} has format version "
                                    f"{manifest.get('version')!r}; this pyhyve reads "
                                    f"version {VERSION}")
            start = len(MAGIC) + _LENGTH.size + length
            data_size = manifest.get("data_size")
            if not isinstance(data_size, int) or \
                    os.fstat(f.fileno()).st_size != start + data_size:
                raise SnapshotError(f"snapshot {path} is truncated or has trailing data")
            # Mapped, not read: the file's pages go from the page cache straight
            # into guest memory, with no copy in between.
            mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE,
                               prot=mmap.PROT_READ)
            data = memoryview(mapped)[start:start + data_size]
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    if zlib.crc32(data) != manifest.get("data_crc32"):
        raise SnapshotError(f"snapshot {path} is corrupt (checksum mismatch)")
    for key in ("config", "vcpus", "vm", "devices", "memory"):
        if key not in manifest:
            raise SnapshotError(f"snapshot {path} is corrupt (no {key})")
    return Snapshot(manifest, data)


# --- restoring -----------------------------------------------------------------------
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


def _restore_memory(vm, snap: Snapshot) -> None:
    memory = vm.memory
    for backing in (memory._lowmem, memory._highmem):
        if backing is None:
            continue
        try:
            backing.madvise(mmap.MADV_DONTNEED)       # private anonymous: now all zero
        except OSError:                               # wired (mlocked) memory
            chunk = bytes(1 << 20)
            for start in range(0, len(backing), len(chunk)):
                end = min(start + len(chunk), len(backing))
                backing[start:end] = chunk[:end - start]
    for gpa, length, offset in snap.manifest["memory"]:
        if gpa >= 0x100000000:
            backing, base, size = memory._highmem, 0x100000000, memory.highmem_size
        else:
            backing, base, size = memory._lowmem, 0, memory.lowmem_size
        if backing is None or gpa < base or gpa - base + length > size:
            raise SnapshotError(f"snapshot memory run {gpa:#x}+{length:#x} is outside "
                                "guest memory")
        backing[gpa - base:gpa - base + length] = snap.data[offset:offset + length]


def _restore_platform(vm, devices: dict) -> None:
    pm = devices["pm"]
    vm.pm.status, vm.pm.enable, vm.pm.control = pm["status"], pm["enable"], pm["control"]
    r = devices["rtc"]
    rtc = vm.rtc
    with rtc._cond:
        rtc._nvram[:] = base64.b64decode(r["nvram"])
        rtc._index, rtc._ext_index = r["index"], r["ext_index"]
        rtc._a, rtc._b, rtc._flags = r["a"], r["b"], r["flags"]
        rtc._offset, rtc._held = r["offset"], r["held"]
        rtc._set_period()
    vm.hpet.restore_state(devices["hpet"])
    k = devices["i8042"]
    kbd = vm.i8042
    with kbd._lock:
        kbd._ram[:] = base64.b64decode(k["ram"])
        kbd._sys, kbd._output_port = k["sys"], k["output_port"]
        kbd._queue.clear()
        kbd._queue.extend(tuple(q) for q in k["queue"])
        kbd._last_read, kbd._last_was_command = k["last_read"], k["last_was_command"]
        kbd._command, kbd._kbd_command = k["command"], k["kbd_command"]
    for name, u in devices["uarts"].items():
        uart = vm.uarts.get(name)
        if uart is None:
            raise SnapshotError(f"snapshot has a {name} the restored VM lacks")
        uart.restore_state(u)
    vm.pci.config_address = devices["pci_config_address"]


def _restore_pci(vm, saved_functions: list) -> None:
    """Last, once interrupts can be delivered: a restored device may raise one."""
    by_location = {(d.slot, d.func): d for d in vm.pci.devices()}
    for saved in saved_functions:
        device = by_location.get((saved["slot"], saved["func"]))
        if device is None or device.emulation_name != saved["emulation"]:
            raise SnapshotError(f"snapshot's PCI {saved['slot']}:{saved['func']} "
                                f"({saved['emulation']}) is not in the restored VM")
        device.restore_state(saved["state"])
        if device.emulation_name in CHIPSET:
            device.config_changed(0x40, len(device.config) - 0x40)


def restore_into(vm, path: str | Snapshot) -> None:
    """Load a snapshot into VM, freshly built from the snapshot's config and not
    yet running."""
    snap = read(path) if isinstance(path, str) else path
    m = snap.manifest
    try:
        if len(m["vcpus"]) != len(vm.vcpus):
            raise SnapshotError(f"snapshot has {len(m['vcpus'])} vCPUs, the VM "
                                f"{len(vm.vcpus)}")
        if m.get("memory_size", vm.memory.size) != vm.memory.size:
            raise SnapshotError("snapshot's memory size differs from the VM's")
        _restore_memory(vm, snap)
        _restore_platform(vm, m["devices"])
        state = m["vm"]
        for chip, where in zip(IRQCHIPS, state["irqchip"]):
            vm.kvm_vm.set_irqchip(snap.load(abi.kvm_irqchip, where))
        vm.kvm_vm.set_pit2(snap.load(abi.kvm_pit_state2, state["pit2"]))
        clock = snap.load(abi.kvm_clock_data, state["clock"])
        clock.flags = 0
        vm.kvm_vm.set_clock(clock)
        for vcpu_thread, vcpu_state in zip(vm.vcpus, m["vcpus"]):
            _restore_vcpu(vm, vcpu_thread.kvm_vcpu, vcpu_state, snap)
        vm.lower_irq_lines()
        for device in (vm.pm, vm.rtc, vm.hpet, vm.i8042, *vm.uarts.values()):
            device.resync_irq()
        _restore_pci(vm, m["devices"]["pci"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise SnapshotError(f"snapshot is corrupt ({type(exc).__name__}: {exc})") from None
