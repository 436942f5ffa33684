"""Unit tests of the core pieces: memory bounds, buses, config, fatal exits."""

import mmap
import struct

import pytest

from build import build_rom
from fakevm import RecordingKvmVm
from pyhyve.cli import parse_args
from pyhyve.config import Config, ConfigError, parse_size
from pyhyve.iobus import BusConflict, MmioBus, PortBus
from pyhyve.kvm import abi
from pyhyve.layout import GiB, MiB
from pyhyve.memory import GuestMemory, GuestMemoryError
from pyhyve.vcpu import ExitStatus


# --- guest memory -------------------------------------------------------------------
def test_layout_splits_at_the_pci_hole():
    memory = GuestMemory(RecordingKvmVm(), 4 * GiB)
    assert memory.ram_ranges() == [(0, 3 * GiB), (4 * GiB, 1 * GiB)]


@pytest.mark.parametrize("gpa, length", [
    (16 * MiB - 1, 2), (16 * MiB, 1), (-1, 1), (0, -1), (2**64, 1), (0, 16 * MiB + 1)])
def test_accessors_refuse_ranges_outside_memory(gpa, length):
    memory = GuestMemory(RecordingKvmVm(), 16 * MiB)
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)


def test_accessors_round_trip_and_rom_is_read_only():
    kvm_vm = RecordingKvmVm()
    memory = GuestMemory(kvm_vm, 16 * MiB)
    rom = mmap.mmap(-1, 64 * 1024)
    rom[:4] = b"ROM!"
    memory.map_bootrom(rom)
    memory.write_u64(0x1000, 0x1122334455667788)
    assert memory.read_u32(0x1004) == 0x11223344
    assert memory.read(0xF0000, 4) == b"ROM!" == memory.read(0xFFFF0000, 4)
    with pytest.raises(GuestMemoryError):
        memory.write(0xF0000, b"x")
    slots = {gpa: flags for gpa, size, flags in kvm_vm.memslots.values()}
    assert slots[0xF0000] & abi.KVM_MEM_READONLY
    assert slots[0xFFFF0000] & abi.KVM_MEM_READONLY
    assert not slots[0x100000] & abi.KVM_MEM_READONLY


def test_bios_area_switches_between_rom_and_ram():
    memory = GuestMemory(RecordingKvmVm(), 16 * MiB)
    rom = mmap.mmap(-1, 128 * 1024)
    rom[-16:] = b"reset vector...."
    memory.map_bootrom(rom)
    memory.set_bios_area(0xF0000, "ram")
    assert memory.read(0xFFFF0, 16) == bytes(16)
    memory.write(0xFFFF0, b"shadowed copy...")
    memory.set_bios_area(0xF0000, "ram-ro")
    assert memory.read(0xFFFF0, 16) == b"shadowed copy..."
    with pytest.raises(GuestMemoryError):
        memory.write(0xFFFF0, b"x")
    memory.set_bios_area(0xF0000, "rom")
    assert memory.read(0xFFFF0, 16) == b"reset vector...."


# --- buses ---------------------------------------------------------------------------
def test_port_bus_refuses_overlaps_and_out_of_range():
    bus = PortBus()
    bus.register("a", 0x3F8, 8, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(BusConflict):
        bus.register("b", 0x3FF, 2, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(BusConflict):
        bus.register("c", 0xFFFF, 2, lambda o, s: 0, lambda o, s, v: None)
    assert bus.lookup(0x3FC).name == "a" and bus.lookup(0x400) is None


def test_sized_port_shares_a_port_by_access_width():
    bus = PortBus()
    seen = []
    bus.register("pm", 0x400, 4, lambda o, s: 0x1234 >> (8 * (o - 2)) if o >= 2 else 0,
                 lambda o, s, v: seen.append(("pm", o, s, v)))
    entry = bus.register_sized("debugcon", 0x402, frozenset((1,)), lambda o, s: 0xE9,
                               lambda o, s, v: seen.append(("debugcon", o, s, v)))
    assert bus.lookup(0x402).read(0, 1) == 0xE9
    assert bus.lookup(0x402).read(0, 2) == 0x1234
    bus.lookup(0x402).write(0, 1, 0x41)
    bus.lookup(0x402).write(0, 2, 0x100)
    assert seen == [("debugcon", 0, 1, 0x41), ("pm", 2, 2, 0x100)]
    bus.unregister(entry)
    assert bus.lookup(0x402).name == "pm"


def test_mmio_bus_lookup_and_conflicts():
    bus = MmioBus()
    first = bus.register("a", 0x1000, 0x100, lambda o, s: 1, lambda o, s, v: None)
    bus.register("b", 0x2000, 0x100, lambda o, s: 2, lambda o, s, v: None)
    with pytest.raises(BusConflict):
        bus.register("c", 0x10FF, 0x10, lambda o, s: 3, lambda o, s, v: None)
    assert bus.lookup(0x10FF) is first and bus.lookup(0x1100) is None
    bus.unregister(first)
    assert bus.lookup(0x1000) is None


# --- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    ("512", 512 * MiB), ("128M", 128 * MiB), ("2g", 2 * GiB), ("1T", 1 << 40),
    ("64K", 64 * 1024), (str(4 * MiB), 4 * MiB), ("1GiB", GiB)])
def test_memory_sizes_parse_like_bhyve(text, size):
    assert parse_size(text) == size


def test_config_file_and_dump(tmp_path):
    path = tmp_path / "vm.conf"
    path.write_text("# a VM\nname=fromfile\nmemory.size=64M\n\ncpus=2\n")
    config = parse_args(["-k", str(path), "-o", "x86.strictio=true"])
    assert config.get("name") == "fromfile" and config.get_bool("x86.strictio")
    assert config.dump() == "cpus=2\nmemory.size=64M\nname=fromfile\nx86.strictio=true"


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("no equals sign here\n")
    with pytest.raises(ConfigError, match="bad.conf:1: expected key=value"):
        Config().load_file(str(bad))
    with pytest.raises(ConfigError, match="not a boolean"):
        Config({"x86.strictio": "maybe"}).get_bool("x86.strictio")
    with pytest.raises(ConfigError, match="is outside 1..255"):
        Config({"cpus": "0"}).get_int("cpus", 1, 1, 255)


def test_config_dump_from_the_command_line(capsys):
    from pyhyve.cli import main
    assert main(["-c", "cpus=2,sockets=2", "-m", "1G", "-o", "config.dump=1", "vm"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "config.dump=1", "cpus=2", "memory.size=1G", "name=vm", "sockets=2"]


# --- fatal exits ----------------------------------------------------------------------------
@pytest.fixture
def real_vm(needs_kvm):
    from pyhyve.vm import VirtualMachine
    vm = VirtualMachine(Config({"name": "fatal", "lpc.bootrom": str(build_rom("hello16"))}))
    yield vm
    vm.close()


@pytest.mark.parametrize("reason, words", [
    (abi.KVM_EXIT_INTERNAL_ERROR, "internal_error (suberror 1"),
    (abi.KVM_EXIT_FAIL_ENTRY, "fail_entry (hardware reason 0x1)"),
    (99, "unhandled exit reason 99 (unknown)")])
def test_fatal_exits_print_registers_and_exit_4(real_vm, capsys, reason, words):
    vcpu = real_vm.vcpus[0]
    page = vcpu.kvm_vcpu.run_page
    struct.pack_into("<I", page, abi.RUN_OFFSET_EXIT_REASON, reason)
    struct.pack_into("<IIQ", page, abi.RUN_OFFSET_EXIT_UNION, 1, 0, 7)
    handler = vcpu._handlers[reason] if reason < len(vcpu._handlers) else None
    status = handler() if handler else vcpu._exit_unknown(reason)
    assert status == ExitStatus.ERROR
    err = capsys.readouterr().err
    assert words in err
    assert "rip=0x000000000000fff0" in err and "cs: sel=0xf000" in err


def test_uuid_x2apic_and_wired_memory_options(needs_kvm):
    import uuid
    from pyhyve.cli import parse_args
    from pyhyve.devices.fwcfg import FW_CFG_UUID
    from pyhyve.vm import VirtualMachine
    rom = str(build_rom("hello16"))
    chosen = "5a3b4c2d-1111-2222-3333-444455556666"
    vm = VirtualMachine(parse_args(["-U", chosen, "-x", "-S", "-l", f"bootrom,{rom}", "vm"]))
    try:
        assert vm.uuid == uuid.UUID(chosen).bytes
        assert vm.fwcfg._items[FW_CFG_UUID] == uuid.UUID(chosen).bytes
    finally:
        vm.close()
    first = VirtualMachine(parse_args(["-l", f"bootrom,{rom}", "samename"]))
    second = VirtualMachine(parse_args(["-l", f"bootrom,{rom}", "samename"]))
    assert first.uuid == second.uuid            # stable, as bhyve derives it
    import socket
    assert first.uuid == uuid.uuid3(uuid.NAMESPACE_DNS, f"{socket.gethostname()}samename").bytes
    first.close()
    second.close()
    with pytest.raises(ConfigError, match="invalid UUID 'nope'"):
        VirtualMachine(parse_args(["-U", "nope", "-l", f"bootrom,{rom}", "vm"]))


def test_x2apic_is_offered_only_with_x(needs_kvm):
    from pyhyve.cpuid import CPUID_X2APIC, Topology, vcpu_cpuid
    from pyhyve.kvm import Kvm
    supported = Kvm().supported_cpuid()
    leaf1 = [e for e in vcpu_cpuid(supported, Topology(), 0) if e.function == 1][0]
    assert not leaf1.ecx & CPUID_X2APIC
    leaf1 = [e for e in vcpu_cpuid(supported, Topology(), 0, x2apic=True) if e.function == 1][0]
    assert leaf1.ecx & CPUID_X2APIC


def test_the_boot_method_follows_the_config(tmp_path):
    from pyhyve.boot.methods import FirmwareBoot, FirmwareKernelBoot, KernelBoot, method_for
    rom = tmp_path / "rom.bin"
    rom.write_bytes(b"\xf4" * 4096)
    assert type(method_for(Config({"kexec.kernel": "/vmlinuz"}))) is KernelBoot
    firmware = method_for(Config({"lpc.bootrom": str(rom)}))
    assert type(firmware) is FirmwareBoot and len(firmware.rom) == 4096
    both = method_for(Config({"lpc.bootrom": str(rom), "kexec.kernel": "/vmlinuz"}))
    assert type(both) is FirmwareKernelBoot and len(both.rom) == 4096
    with pytest.raises(ConfigError, match="give a bootrom"):
        method_for(Config({}))


def test_write_notifiers_go_to_the_hypervisor_or_say_why_not():
    from pyhyve.iobus import MmioBus, NotifierUnavailable, PortBus
    for bus in (PortBus(), MmioBus()):
        assert not bus.notifies
        with pytest.raises(NotifierUnavailable):
            bus.add_notifier(7, 0xC010, 2, 1)
        bus.remove_notifier(7, 0xC010, 2, 1)          # nothing to withdraw: no error
        calls = []
        bus.notifier = lambda *args: calls.append(args)
        assert bus.notifies
        bus.add_notifier(7, 0xC010, 2, 1)
        bus.remove_notifier(7, 0xC010, 2)
        assert calls == [(7, 0xC010, 2, 1, False), (7, 0xC010, 2, None, True)]
