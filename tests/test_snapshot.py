"""Snapshots: pyhyvectl --suspend/--checkpoint and pyhyve -r, on a guest that counts
in RAM (tests/guests/counter.S), and the snapshots pyhyve must refuse."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from build import build_rom
from guestrun import REPO, run_pyhyve
from pyhyve import ctlclient, snapshot
from pyhyve.config import Config
from pyhyve.vm import VirtualMachine

pytestmark = pytest.mark.usefixtures("needs_kvm")

TARGET, EVERY, DELAY = 80, 5, 300000
ALL_COUNTS = [f"count {n}" for n in range(EVERY, TARGET + 1, EVERY)]


def counter_rom() -> Path:
    return build_rom("counter", TARGET=TARGET, EVERY=EVERY, DELAY=DELAY)


def start_counter(tmp_path: Path, debug: Path, sock: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "pyhyve", "-l", f"bootrom,{counter_rom()}",
                             "-l", f"debugcon,file={debug}", "-o", f"control.socket={sock}",
                             "snapcounter"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_lines(debug: Path, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if debug.exists() and debug.read_text().count("\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the guest printed too little: {debug.read_text()!r}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_suspend_then_restore_in_a_new_process(tmp_path):
    debug, sock, snap = tmp_path / "debug.txt", tmp_path / "c.sock", tmp_path / "vm.snap"
    vm = start_counter(tmp_path, debug, sock)
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
    restored = run_pyhyve(["-r", str(snap), "-o", f"control.socket={tmp_path / 'r.sock'}"],
                          timeout=120)
    assert restored.returncode == 1, restored.stderr
    assert lines(debug) == ALL_COUNTS            # every count once, in order, to the end


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
    restored = run_pyhyve(["-r", str(snap), "-o", f"lpc.debugcon.path={other}",
                           "-o", f"control.socket={tmp_path / 'r.sock'}"], timeout=120)
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


def test_sparse_memory_and_round_trip_in_process(saved, tmp_path):
    snap = snapshot.read(str(saved))
    manifest = snap.manifest
    assert manifest["format"] == "pyhyve-snapshot" and manifest["version"] == 1
    assert manifest["config"]["name"] == "snapunit"
    assert [run[:2] for run in manifest["memory"]] == [[0x123000, 4096]]
    assert manifest["vcpus"][0]["msrs"]
    vm = VirtualMachine(Config(manifest["config"]))
    try:
        snapshot.restore_into(vm, snap)
        assert vm.memory.read(0x123000, 7) == b"pattern"
        assert vm.vcpus[0].kvm_vcpu.get_regs().rip == 0xFFF0
    finally:
        vm.close()


def _rewrite_manifest(path: Path, change) -> None:
    data = path.read_bytes()
    start = len(snapshot.MAGIC) + 8
    length = struct.unpack_from("<Q", data, len(snapshot.MAGIC))[0]
    manifest = json.loads(data[start:start + length])
    change(manifest)
    encoded = json.dumps(manifest).encode()
    path.write_bytes(snapshot.MAGIC + struct.pack("<Q", len(encoded)) + encoded
                     + data[start + length:])


def _version_2(path: Path) -> None:
    _rewrite_manifest(path, lambda m: m.update(version=2))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])


def _truncate_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def _flip_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a snapshot at all\n")


def _missing(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage, message", [
    (_version_2, "has format version 2; this pyhyve reads version 1"),
    (_truncate, "is truncated"),
    (_truncate_header, "is truncated"),
    (_flip_data_byte, "is corrupt (checksum mismatch)"),
    (_garbage, "is not a pyhyve snapshot"),
    (_missing, "cannot read snapshot"),
])
def test_bad_snapshots_are_refused_with_one_line(saved, damage, message):
    damage(saved)
    result = run_pyhyve(["-r", str(saved)], timeout=60)
    assert result.returncode == 4
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("pyhyve: ")
    assert message in result.stderr


def test_devices_with_unsaved_state_make_save_refuse(tmp_path):
    vm = VirtualMachine(Config({"name": "snaprefuse", "lpc.bootrom": str(counter_rom()),
                                "pci.0.3.0.device": "virtio-rnd"}))
    try:
        with pytest.raises(snapshot.SnapshotError, match=r"device virtio-rnd at PCI "):
            snapshot.save(vm, str(tmp_path / "x.snap"))
        assert not (tmp_path / "x.snap").exists()
    finally:
        vm.close()
