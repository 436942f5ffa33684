"""Snapshots: pyhyvectl --suspend/--checkpoint and pyhyve -r, on a guest that counts
in RAM (tests/guests/counter.S) and on a guest that drives virtio-blk with its
own driver (tests/guests/blkdriver.S), suspended with requests in flight; the
device state a snapshot carries (PCI, virtio transport, queue positions); and
the snapshots pyhyve must refuse."""

import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from test_blkdriver import checksum, pattern
from test_virtio import (BUFFERS, LEGACY_PFN, MODERN_BLK, MSI_ADDRESS, SLOT, Driver, Ring,
                         VirtioVm, blk_do, blk_request, make)

from build import build_rom
from guestrun import REPO, run_pyhyve
from pyhyve import ctlclient, snapshot
from pyhyve.cli import parse_args
from pyhyve.config import Config
from pyhyve.kvm import abi
from pyhyve.layout import MiB
from pyhyve.pci import PciDevice
from pyhyve.pci import regs as R
from pyhyve.pci.intx import IOAPIC_PIN_BASE, link_for
from pyhyve.pci.testdev import PciTestDevice
from pyhyve.vcpu import ExitStatus, install_kick_handler
from pyhyve.virtio import blk as B
from pyhyve.virtio import device as D
from pyhyve.virtio import pci as V
from pyhyve.virtio.emulations import VirtioBlockPci
from pyhyve.virtio.emulations import VirtioRandomPci
from pyhyve.vm import VirtualMachine

needs_kvm = pytest.mark.usefixtures("needs_kvm")

TARGET, EVERY, DELAY = 80, 5, 300000
ALL_COUNTS = [f"count {n}" for n in range(EVERY, TARGET + 1, EVERY)]


def counter_rom() -> Path:
    return build_rom("counter", TARGET=TARGET, EVERY=EVERY, DELAY=DELAY)


def counter_args(debug: Path, sock: Path, devices: list[str] = ()) -> list[str]:
    """The counter VM's options: the same start it and restore it.  Snapshots
    go beside the debug file (the sandbox lets them go to snapshot.dir only)."""
    return ["-l", f"bootrom,{counter_rom()}", *devices, "-l", f"debugcon,file={debug}",
            "-o", f"control.socket={sock}", "-o", f"snapshot.dir={debug.parent}",
            "snapcounter"]


def start_counter(tmp_path: Path, debug: Path, sock: Path,
                  devices: list[str] = ()) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "pyhyve", *counter_args(debug, sock, devices)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(debug: Path, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if debug.exists() and debug.read_text().count("\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the guest printed too little: {debug.read_text()!r}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@needs_kvm
def test_suspend_then_restore_in_a_new_process(tmp_path):
    """With PCI devices the guest leaves alone: they come back as they were."""
    debug, sock, snap = tmp_path / "debug.txt", tmp_path / "c.sock", tmp_path / "vm.snap"
    devices = ["-s", "4,virtio-rnd", "-s", "5,pci-testdev",
               "-s", f"6,virtio-console,con={tmp_path / 'con.sock'}"]
    vm = start_counter(tmp_path, debug, sock, devices)
    try:
        wait_for_lines(debug, 2)
        assert ctlclient.main([f"--socket={sock}", f"--suspend={snap}"]) == 0
        assert vm.wait(timeout=30) == 1          # bhyve exits after --suspend
    finally:
        vm.kill()
        vm.wait()
    before = lines(debug)
    assert 2 <= len(before) < len(ALL_COUNTS), "suspended too late to test anything"
    assert before == ALL_COUNTS[:len(before)]
    # The restored VM appends to the same debug console file and counts on.
    restored = run_pyhyve(["-r", str(snap), *counter_args(debug, tmp_path / "r.sock", devices)],
                          timeout=120)
    assert restored.returncode == 1, restored.stderr
    assert lines(debug) == ALL_COUNTS            # every count once, in order, to the end


@needs_kvm
def test_checkpoint_lets_the_vm_run_on_and_can_be_restored(tmp_path):
    debug, sock, snap = tmp_path / "debug.txt", tmp_path / "c.sock", tmp_path / "vm.snap"
    vm = start_counter(tmp_path, debug, sock)
    try:
        wait_for_lines(debug, 2)
        assert ctlclient.main([f"--socket={sock}", f"--checkpoint={snap}"]) == 0
        at_checkpoint = len(lines(debug))
        assert vm.wait(timeout=120) == 1          # ran on to the target and powered off
    finally:
        vm.kill()
        vm.wait()
    assert lines(debug) == ALL_COUNTS
    # Restored into another debug file, it prints what followed the checkpoint.
    other = tmp_path / "other.txt"
    restored = run_pyhyve(["-r", str(snap), *counter_args(other, tmp_path / "r.sock")],
                          timeout=120)
    assert restored.returncode == 1, restored.stderr
    after = lines(other)
    assert after and after[-1] == ALL_COUNTS[-1]
    assert after == ALL_COUNTS[len(ALL_COUNTS) - len(after):]
    assert len(ALL_COUNTS) - len(after) in (at_checkpoint, at_checkpoint - 1, at_checkpoint + 1)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A snapshot of a VM that has not started (the reset state), made in-process."""
    vm = VirtualMachine(Config({"name": "snapunit", "lpc.bootrom": str(counter_rom()),
                                "lpc.debugcon.path": str(tmp_path / "unit.txt")}))
    try:
        vm.memory.write(0x123000, b"pattern")
        path = tmp_path / "unit.snap"
        snapshot.save(vm, str(path))
    finally:
        vm.close()
    return path


@needs_kvm
def test_sparse_memory_and_round_trip_in_process(saved, tmp_path):
    snap = snapshot.read(str(saved))
    manifest = snap.manifest
    assert manifest["format"] == "pyhyve-snapshot" and manifest["version"] == snapshot.VERSION
    assert manifest["config"]["name"] == "snapunit"
    assert [run[:2] for run in manifest["memory"]] == [[0x123000, 4096]]
    assert manifest["vcpus"][0]["msrs"]
    vm = VirtualMachine(Config(manifest["config"]))
    try:
        vm.memory.write(0x200000, b"before")
        snapshot.restore_into(vm, snap)
        assert vm.memory.read(0x123000, 7) == b"pattern"
        assert vm.memory.read(0x200000, 6) == bytes(6)       # not in the snapshot: zero
        assert vm.vcpus[0].kvm_vcpu.get_regs().rip == 0xFFF0
        vm.memory.write(0x123000, b"changed")               # copy-on-write: the file keeps its own
        assert snapshot.read(str(saved)).manifest["memory_crc32"] == \
            zlib.crc32(saved.read_bytes()[_areas(saved.read_bytes())[2]:])
        _flip_memory_byte(saved)                            # unchecked, a page is the guest's
        snapshot.restore_into(vm, snapshot.read(str(saved)))
        assert vm.memory.read(0x123000, 7) == b"pa" + bytes([ord("t") ^ 0xFF]) + b"tern"
    finally:
        vm.close()


@needs_kvm
def test_snapshot_file_is_private_and_replaces_what_was_there(tmp_path):
    """0600 whatever the umask; a symlink at the path is replaced, not
    followed; a file planted where the old temporary name was is left alone;
    nothing but the snapshot is left in the directory."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    directory = tmp_path / "snaps"
    directory.mkdir()
    target = directory / "vm.snap"
    target.symlink_to(victim)
    planted = directory / f"vm.snap.tmp{os.getpid()}"
    planted.symlink_to(victim)
    vm = VirtualMachine(Config({"name": "private", "lpc.bootrom": str(counter_rom())}))
    umask = os.umask(0)
    try:
        snapshot.save(vm, str(target))
    finally:
        os.umask(umask)
        vm.close()
    assert victim.read_bytes() == b"not yours"
    assert not target.is_symlink() and target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["vm.snap", planted.name]
    assert snapshot.read(str(target)).manifest["config"]["name"] == "private"


def _areas(data: bytes) -> tuple[dict, int, int]:
    """A snapshot's manifest, where its data area starts and where its memory does."""
    start = len(snapshot.MAGIC) + 12
    length = struct.unpack_from("<Q", data, len(snapshot.MAGIC))[0]
    manifest = json.loads(data[start:start + length])
    data_start = start + length
    return manifest, data_start, -(-(data_start + manifest["data_size"]) // 4096) * 4096


def _rewrite_manifest(path: Path, change) -> None:
    """As a forger would: the manifest changed, its length, CRC and the memory
    area's alignment made to fit."""
    data = path.read_bytes()
    manifest, data_start, memory_start = _areas(data)
    areas = data[data_start:data_start + manifest["data_size"]]
    change(manifest)
    encoded = json.dumps(manifest).encode()
    head = (snapshot.MAGIC + struct.pack("<QI", len(encoded), zlib.crc32(encoded)) + encoded
            + areas)
    path.write_bytes(head + bytes(-len(head) % 4096) + data[memory_start:])


OLD_VERSION = snapshot.VERSION - 1


def _old_version(path: Path) -> None:
    _rewrite_manifest(path, lambda m: m.update(version=OLD_VERSION))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])


def _truncate_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def _flip_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[_areas(data)[1] + 10] ^= 0xFF          # a vCPU's registers
    path.write_bytes(bytes(data))


def _flip_memory_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[_areas(data)[2] + 2] ^= 0xFF           # the guest's "pattern" page
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a snapshot at all\n")


def _missing(path: Path) -> None:
    path.unlink()


def _nested_manifest(path: Path) -> None:
    encoded = b"[" * 100000 + b"]" * 100000      # deeper than json can parse
    path.write_bytes(snapshot.MAGIC + struct.pack("<QI", len(encoded), zlib.crc32(encoded))
                     + encoded)


def _flip_manifest_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(snapshot.MAGIC) + 40] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_old_version, f"has format version {OLD_VERSION}; this pyhyve reads version "
                   f"{snapshot.VERSION}"),
    (_truncate, "is truncated"),
    (_truncate_header, "is truncated"),
    (_flip_data_byte, "is corrupt (checksum mismatch)"),
    (_flip_memory_byte, "is corrupt (memory checksum mismatch)"),
    (_garbage, "is not a pyhyve snapshot"),
    (_missing, "cannot read snapshot"),
    (_nested_manifest, "is corrupt (bad manifest)"),
    (_flip_manifest_byte, "is corrupt (manifest checksum mismatch)"),
])
@needs_kvm
def test_bad_snapshots_are_refused_with_one_line(saved, damage, message):
    damage(saved)
    result = run_pyhyve(["-r", str(saved), "-o", "snapshot.check_memory=true"], timeout=60)
    assert result.returncode == 4
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("pyhyve: ")
    assert message in result.stderr


@needs_kvm
def test_a_snapshot_grants_no_authority(saved, tmp_path):
    """Keys a crafted snapshot holds (a console file to create, a control socket,
    a host file for fw_cfg, the sandbox off) are never applied: the VM is the
    operator's options; a disk the operator did not give makes it another
    machine; and without the operator's options there is nothing to restore."""
    created, evil_socket = tmp_path / "created", tmp_path / "evil.sock"
    victim = tmp_path / "victim"
    victim.write_bytes(b"host data")
    _rewrite_manifest(saved, lambda m: m["config"].update({
        "lpc.com1.path": f"file={created}", "control.socket": str(evil_socket),
        "fwcfg.file.0": f"opt/victim,file={victim}", "process.seccomp": "false"}))
    out = tmp_path / "out.txt"
    operator = ["-l", f"bootrom,{counter_rom()}", "-l", f"debugcon,file={out}",
                "-o", f"control.socket={tmp_path / 'r.sock'}", "snapunit"]
    restored = run_pyhyve(["-r", str(saved), *operator], timeout=120)
    assert restored.returncode == 1, restored.stderr
    assert lines(out)[-1] == ALL_COUNTS[-1]          # it ran, from the saved reset state
    assert not created.exists() and not evil_socket.exists()

    _rewrite_manifest(saved, lambda m: m["config"].update({
        "pci.0.7.0.device": "virtio-blk", "pci.0.7.0.path": str(victim)}))
    another = run_pyhyve(["-r", str(saved), *operator], timeout=60)
    assert (another.returncode, another.stderr) == (4, (
        f"pyhyve: snapshot {saved} is of another machine: PCI 7.0 nothing, saved virtio-blk\n"))
    bigger = run_pyhyve(["-r", str(saved), "-m", "512M", "-c", "2", *operator], timeout=60)
    assert bigger.returncode == 4 and "memory 536870912 bytes, saved 268435456" in bigger.stderr
    assert "CPU topology Topology(sockets=2" in bigger.stderr
    bare = run_pyhyve(["-r", str(saved)], timeout=60)
    assert bare.returncode == 4 and "needs the VM's own options" in bare.stderr
    assert victim.read_bytes() == b"host data"


class UnsavedDevice(PciDevice):
    """A device type that does not say its state can be saved."""

    emulation_name = "unsaved-test"


@needs_kvm
def test_devices_with_unsaved_state_make_save_refuse(tmp_path):
    vm = VirtualMachine(Config({"name": "snaprefuse", "lpc.bootrom": str(counter_rom()),
                                "pci.0.3.0.device": "virtio-rnd"}))
    try:
        vm.pci.add(7, 0, UnsavedDevice, {})
        with pytest.raises(snapshot.SnapshotError, match=r"device unsaved-test at PCI 00:07.0"):
            snapshot.save(vm, str(tmp_path / "x.snap"))
        assert not (tmp_path / "x.snap").exists()
    finally:
        vm.close()


# --- device state on the fake VM of tests/test_virtio.py ------------------------------------------
def _json(state: dict) -> dict:
    """The state as it comes back from a snapshot's manifest."""
    return json.loads(json.dumps(state))


def _moved_to(new_vm: VirtioVm, old_vm: VirtioVm) -> None:
    """The new VM's RAM as the old one left it (what a snapshot carries)."""
    new_vm.memory.write(0, old_vm.memory.read(0, old_vm.memory.size))


@pytest.fixture
def small_disk(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 256)
    return path


def test_virtio_blk_state_round_trips(small_disk):
    """Queue positions, the BAR the guest moved, MSI-X and a request offered
    but not yet taken all carry over to a freshly built device."""
    old = VirtioVm()
    device = make(old, VirtioBlockPci, path=small_disk)
    driver = Driver(old, device)
    first_bar4 = driver.bar(4)
    driver.cfg_write(R.BAR0 + 16, 4, 0xC1000000)       # the guest moves BAR 4
    driver.enable_msix(2)
    ring = driver.start(MODERN_BLK, vector=1, config_vector=0)
    for sector in (1, 2):
        assert blk_do(driver, ring, B.T_IN, sector=sector, in_length=512)[0] == B.S_OK
    status = blk_request(old, ring, B.T_IN, sector=3, in_length=512)   # not notified
    state = _json(device.save_state())
    assert state["virtio"]["queues"][0]["last_avail"] == 2
    old.close()

    new = VirtioVm(ioeventfd=True)
    _moved_to(new, old)
    restored = make(new, VirtioBlockPci, path=small_disk)
    new.msis.clear()
    restored.restore_state(state)
    # The offered request was taken where the old device stopped, and completed.
    ring.memory = new.memory
    assert ring.completed() == [(6, 513)]
    assert new.memory.read_u8(status) == B.S_OK
    assert new.memory.read(BUFFERS + 0x20000, 512) == small_disk.read_bytes()[1536:2048]
    assert new.msis == [(MSI_ADDRESS, 0x41)]            # vector 1, as the guest programmed
    # BAR 4 decodes where the guest put it, with the notify ioeventfd there.
    assert new.mmio.lookup(first_bar4) is None
    assert (0xC1000000 + V.MODERN_NOTIFY, 2, False, None) in new.kvm_vm.ioeventfds
    driver = Driver(new, restored)
    assert driver.status() == D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER | \
        D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK
    status, length, data = blk_do(driver, ring, B.T_IN, sector=4, in_length=512)
    assert (status, length) == (B.S_OK, 513)
    assert data == small_disk.read_bytes()[2048:2560]
    assert restored.queues[0].last_avail == restored.queues[0].used_idx == 4
    new.close()


def test_legacy_virtio_with_intx_round_trips():
    """A legacy driver's queue (by page frame) and an asserted INTx with its ISR."""
    old = VirtioVm()
    device = make(old, VirtioRandomPci)
    driver = Driver(old, device)
    driver.legacy_write(V.LEGACY_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER)
    driver.legacy_write(V.LEGACY_QUEUE_SELECT, 2, 0)
    size = driver.legacy_read(V.LEGACY_QUEUE_SIZE, 2)
    driver.legacy_write(V.LEGACY_QUEUE_PFN, 4, LEGACY_PFN)
    desc = LEGACY_PFN << 12
    avail = desc + 16 * size
    ring = Ring(old, desc, avail, (avail + 6 + 2 * size + 4095) & ~4095, size)
    driver.legacy_write(V.LEGACY_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                        D.STATUS_DRIVER_OK)
    ring.offer([(BUFFERS, 64, True)])
    driver.legacy_write(V.LEGACY_QUEUE_NOTIFY, 2, 0)
    assert ring.completed() == [(0, 64)]
    irq = IOAPIC_PIN_BASE + link_for(SLOT, 1)
    assert old.irq_levels[irq]                          # the guest has not read the ISR
    state = _json(device.save_state())
    old.close()

    new = VirtioVm()
    _moved_to(new, old)
    restored = make(new, VirtioRandomPci)
    assert not new.irq_levels.get(irq)
    restored.restore_state(state)
    assert new.irq_levels[irq]                          # the line is driven again
    driver = Driver(new, restored)
    assert driver.legacy_read(V.LEGACY_QUEUE_PFN, 4) == LEGACY_PFN
    assert driver.legacy_read(V.LEGACY_ISR, 1) == V.ISR_QUEUE
    assert not new.irq_levels[irq]
    ring.memory = new.memory
    ring.offer([(BUFFERS + 0x1000, 32, True)])
    driver.legacy_write(V.LEGACY_QUEUE_NOTIFY, 2, 0)
    assert ring.completed() == [(1, 32)]
    new.close()


def test_pci_testdev_state_round_trips():
    """Its scratch register, and an MSI-X vector raised while masked: the restored
    device sends it once the guest unmasks."""
    old = VirtioVm()
    device = make(old, PciTestDevice)
    driver = Driver(old, device)
    registers, table = driver.bar(0), driver.bar(4)
    old.mmio_write(registers + 4, 4, 0x12345678)
    driver.enable_msix(2)
    old.mmio_write(table + 16 + 12, 4, 1)               # mask vector 1
    old.mmio_write(registers + 8, 4, 1)                 # raise it
    assert old.msis == []
    state = _json(device.save_state())
    old.close()

    new = VirtioVm()
    make(new, PciTestDevice).restore_state(state)
    assert new.mmio_read(registers + 4, 4) == 0x12345678
    assert new.mmio_read(table + device.msix.pba_offset, 8) == 1 << 1
    new.mmio_write(table + 16 + 12, 4, 0)
    assert new.msis == [(MSI_ADDRESS, 0x41)]
    new.close()


def test_restore_refuses_state_that_does_not_fit(small_disk):
    old = VirtioVm()
    device = make(old, VirtioBlockPci, path=small_disk)
    Driver(old, device).start(MODERN_BLK)
    state = _json(device.save_state())
    old.close()
    ring_outside, position_too_big = _json(state), _json(state)
    ring_outside["virtio"]["queues"][0]["used"] = 1 << 40
    position_too_big["virtio"]["queues"][0]["last_avail"] = 0x10000
    ready_text, missing_field = _json(state), _json(state)
    ready_text["virtio"]["queues"][0]["ready"] = "yes"
    del missing_field["virtio"]["queues"][0]["notify"]
    status_text, isr_bits, model_field = _json(state), _json(state), _json(state)
    status_text["virtio"]["status"] = "15"
    isr_bits["virtio"]["isr"] = 4
    model_field["virtio"]["device"] = {"capacity": 8}     # virtio-blk's model keeps nothing
    for bad, message in ((ring_outside, "queue 0: ring not in guest RAM"),
                         (position_too_big, "queue 0 last_avail is 65536, not an integer"),
                         (ready_text, "queue 0 ready is 'yes', not true or false"),
                         (missing_field, "queue 0: saved state has fields"),
                         (status_text, "virtio status is '15'"),
                         (isr_bits, "virtio ISR is 4"),
                         (model_field, "virtio-blk: saved state has fields")):
        new = VirtioVm()
        try:
            with pytest.raises(ValueError, match=message):
                make(new, VirtioBlockPci, path=small_disk).restore_state(bad)
        finally:
            new.close()


# --- a virtio-blk guest suspended with requests in flight -----------------------------------------
BLK_TOTAL = 4 * MiB                   # blkdriver.S: write, flush, read back, compare
BLK_CHUNK_KIB = 4
BLK_WRITES = BLK_TOTAL // (BLK_CHUNK_KIB * 1024)
NUMBERED_TOTAL = 8 * MiB              # blkdriver.S NUMBERED: "acked N" after every GROUP
GROUP = 8


def blank_disk(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def offered_request(vm, device) -> tuple[int, int] | None:
    """(avail idx, request type) when the driver has offered a request the device
    has not taken yet, else None."""
    queue, memory = device.queues[0], vm.memory
    if not queue.ready:
        return None
    avail_idx = memory.read_u16(queue.avail_addr + 2)
    if avail_idx == queue.last_avail:
        return None
    head = memory.read_u16(queue.avail_addr + 4 + 2 * (queue.last_avail % queue.size))
    header = memory.read_u64(queue.desc_addr + 16 * head)
    return avail_idx, memory.read_u32(header)


def saved_queue(path: Path, slot: int) -> dict:
    manifest = snapshot.read(str(path)).manifest
    return manifest["devices"][f"pci.0.{slot}.0"]["virtio"]["queues"][0]


@needs_kvm
@pytest.mark.parametrize("served, kind", [(1, B.T_OUT), (BLK_WRITES // 2, B.T_OUT),
                                          (BLK_WRITES + 1 + BLK_WRITES // 2, B.T_IN)],
                         ids=["first-write", "mid-writes", "mid-reads"])
def test_blk_guest_suspended_with_a_request_in_flight_loses_no_write(tmp_path, served, kind):
    """The device is held still until the guest has offered a request it has not
    taken (the I/O thread waits with the notification), then the VM is saved,
    and restored in a new process on the same disk."""
    install_kick_handler()
    disk, debug, snap = blank_disk(tmp_path, 2 * BLK_TOTAL), tmp_path / "debug", tmp_path / "s"
    rom = build_rom("blkdriver", CHUNK_KIB=BLK_CHUNK_KIB, TOTAL_KIB=BLK_TOTAL // 1024)
    options = ["-s", f"3,virtio-blk,{disk}", "-l", f"bootrom,{rom}",
               "-l", f"debugcon,file={debug}", "snapblk"]
    vm = VirtualMachine(parse_args(options))
    device = vm.pci.functions[3, 0]
    thread = threading.Thread(target=vm.run, name="snapblk")
    thread.start()
    try:
        wait_until(lambda: device.queues[0].used_idx >= served)
        with device.quiesce():
            wait_until(lambda: offered_request(vm, device) is not None)
            avail_idx, request = offered_request(vm, device)
            vm.pause()
            snapshot.save(vm, str(snap))
    finally:
        vm.stop(ExitStatus.POWEROFF)
        thread.join(10)
        vm.close()
    assert request == kind
    before = debug.read_text()
    assert "write status 00" in before and "blk ok" not in before, before
    queue = saved_queue(snap, 3)
    assert queue["last_avail"] == queue["used_idx"] == avail_idx   # served, then saved

    restored = run_pyhyve(["-r", str(snap), "-o", f"control.socket={tmp_path / 'r.sock'}",
                           *options])
    assert restored.returncode == 1, restored.stderr
    expected = f"{checksum(pattern(BLK_TOTAL)):016x}"
    lines = debug.read_text().splitlines()
    assert lines[3:] == ["write status 00", "flush status 00", f"written checksum {expected}",
                         f"read checksum {expected}", "blk ok"], lines
    data = disk.read_bytes()
    assert data[:BLK_TOTAL] == pattern(BLK_TOTAL) and data[BLK_TOTAL:] == bytes(BLK_TOTAL)


@needs_kvm
@pytest.mark.parametrize("delay", [0, 0.5])
def test_pyhyvectl_suspend_of_a_writing_guest_loses_no_write(tmp_path, delay):
    """pyhyvectl --suspend while the guest writes numbered blocks (delay: seconds
    after its first acknowledged group), then pyhyve -r on the same disk."""
    disk, debug = blank_disk(tmp_path, NUMBERED_TOTAL), tmp_path / "debug"
    sock, snap = tmp_path / "c.sock", tmp_path / "vm.snap"
    rom = build_rom("blkdriver", NUMBERED=1, CHUNK_KIB=4, TOTAL_KIB=NUMBERED_TOTAL // 1024)
    options = ["-s", f"3,virtio-blk,{disk}", "-l", f"bootrom,{rom}",
               "-l", f"debugcon,file={debug}", "-o", f"snapshot.dir={tmp_path}", "snapwriter"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-o", f"control.socket={sock}", *options],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: debug.exists() and "acked" in debug.read_text())
        time.sleep(delay)
        assert ctlclient.main([f"--socket={sock}", f"--suspend={snap}"]) == 0
        assert proc.wait(timeout=30) == 1
    finally:
        proc.kill()
        proc.communicate()
    before = debug.read_text()
    assert "acked" in before and "blk done" not in before, "suspended too late to test anything"

    restored = run_pyhyve(["-r", str(snap), "-o", f"control.socket={tmp_path / 'r.sock'}",
                           *options])
    assert restored.returncode == 1, restored.stderr
    blocks = NUMBERED_TOTAL // 4096
    expected = [f"acked {n:x}" for n in range(GROUP, blocks + 1, GROUP)] + ["blk done"]
    assert debug.read_text().splitlines()[3:] == expected    # each once, in order, to the end
    assert disk.read_bytes() == pattern(NUMBERED_TOTAL)


def _ioapic_line_levels(vm) -> int:
    """KVM's I/O APIC irr: for edge-triggered pins, the level each line is at."""
    return vm.kvm_vm.get_irqchip(2).chip.ioapic.irr


@needs_kvm
def test_interrupt_lines_agree_with_the_irqchip_after_restore(tmp_path):
    """A UART whose THRE interrupt is pending at save has its line high in the
    saved irqchip.  After a restore the line must still fall when the guest
    serves the condition and rise again (a new edge) when it comes back: with
    pyhyve's line bookkeeping out of step with KVM's, the second interrupt never
    reached a Linux guest restored mid-output."""
    config = {"name": "irqsnap", "lpc.bootrom": str(counter_rom()),
              "lpc.com1.path": f"file={tmp_path / 'com1.out'}"}
    vm = VirtualMachine(Config(config))
    try:
        com1 = vm.ports.lookup(0x3F8)
        com1.write(4, 1, 0x08)              # MCR: OUT2 gates the interrupt onto IRQ 4
        com1.write(1, 1, 0x02)              # IER: transmitter empty
        assert _ioapic_line_levels(vm) & 1 << 4
        snapshot.save(vm, str(tmp_path / "irq.snap"))
    finally:
        vm.close()
    restored = VirtualMachine(Config(config))
    try:
        snapshot.restore_into(restored, str(tmp_path / "irq.snap"))
        assert _ioapic_line_levels(restored) & 1 << 4
        com1 = restored.ports.lookup(0x3F8)
        assert com1.read(2, 1) & 0x0F == 0x02       # IIR: THRE, which reading clears
        assert not _ioapic_line_levels(restored) & 1 << 4
        com1.write(1, 1, 0x00)
        com1.write(1, 1, 0x02)
        assert _ioapic_line_levels(restored) & 1 << 4
    finally:
        restored.close()


@needs_kvm
def test_uart_input_survives_and_input_before_the_restore_is_kept(tmp_path):
    """Unread input in the receive FIFO and behind it is saved; what the host types
    while the restored VM is being built comes after it, not instead of it."""
    config = {"name": "uartsnap", "lpc.bootrom": str(counter_rom()),
              "lpc.com1.path": f"file={tmp_path / 'com1.out'}"}
    vm = VirtualMachine(Config(config))
    try:
        com1 = vm.ports.lookup(0x3F8)
        com1.write(2, 1, 0x01)              # FCR: 16-byte FIFOs
        vm.uarts["com1"].receive(b"saved input that is longer than sixteen bytes;")
        state = vm.uarts["com1"].save_state()
        snapshot.save(vm, str(tmp_path / "uart.snap"))
    finally:
        vm.close()
    restored = VirtualMachine(Config(config))
    try:
        restored.uarts["com1"].receive(b"typed early")
        snapshot.restore_into(restored, str(tmp_path / "uart.snap"))
        com1 = restored.ports.lookup(0x3F8)
        received = bytearray()
        while com1.read(5, 1) & 0x01:      # LSR: data ready
            received.append(com1.read(0, 1))
            if len(received) > 100:
                break
        assert bytes(received) == b"saved input that is longer than sixteen bytes;typed early"
        fresh = VirtualMachine(Config(config))
        try:
            fresh.uarts["com1"].restore_state(state)
            assert fresh.uarts["com1"].save_state() == state
            for bad in ({**state, "lcr": 256}, {**state, "overrun": 1},
                        {**state, "pending": "not base64!"}):
                with pytest.raises(ValueError):
                    fresh.uarts["com1"].restore_state(bad)
        finally:
            fresh.close()
    finally:
        restored.close()


@needs_kvm
def test_tsc_deadline_timer_survives_restore(tmp_path):
    """A LAPIC timer in TSC-deadline mode keeps its deadline: KVM takes the
    deadline MSR only once the LAPIC state says TSC-deadline mode."""
    config = {"name": "tscsnap", "lpc.bootrom": str(counter_rom())}
    vm = VirtualMachine(Config(config))
    lvtt, svr = 0x320, 0xF0
    try:
        kvm_vcpu = vm.vcpus[0].kvm_vcpu
        regs = bytearray(bytes(kvm_vcpu.get_lapic()))
        regs[svr:svr + 4] = (0x1FF).to_bytes(4, "little")          # APIC software-enabled
        regs[lvtt:lvtt + 4] = ((2 << 17) | 0xEC).to_bytes(4, "little")  # TSC-deadline mode
        kvm_vcpu.set_lapic(abi.kvm_lapic_state.from_buffer_copy(regs))
        deadline = kvm_vcpu.get_msrs([0x10])[0x10] + (1 << 40)
        kvm_vcpu.set_msrs({0x6E0: deadline})
        assert kvm_vcpu.get_msrs([0x6E0])[0x6E0] == deadline
        snapshot.save(vm, str(tmp_path / "tsc.snap"))
    finally:
        vm.close()
    restored = VirtualMachine(Config(config))
    try:
        snapshot.restore_into(restored, str(tmp_path / "tsc.snap"))
        assert restored.vcpus[0].kvm_vcpu.get_msrs([0x6E0])[0x6E0] == deadline
    finally:
        restored.close()
