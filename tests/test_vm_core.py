"""The core VMM on real guests: boot paths, exit statuses, buses, vCPU threads."""

import threading

import pytest

from build import build_rom
from guestrun import run_pyhyve, run_rom
from pyhyve.config import Config
from pyhyve.vcpu import ExitStatus
from pyhyve.vm import VirtualMachine

pytestmark = pytest.mark.usefixtures("needs_kvm")


def test_real_mode_guest_prints_and_powers_off(tmp_path):
    result = run_rom(tmp_path, "hello16")
    assert result.debug == "hello from real mode\n"
    assert result.status == ExitStatus.POWEROFF, result.stderr


def test_long_mode_guest_prints_with_string_io(tmp_path):
    result = run_rom(tmp_path, "hello64")
    assert result.debug == "hello from long mode\n"
    assert result.status == ExitStatus.POWEROFF, result.stderr


def test_triple_fault_exits_3(tmp_path):
    result = run_rom(tmp_path, "tripfault")
    assert result.status == ExitStatus.TRIPLEFAULT
    assert "triple fault" in result.stderr


def test_halt_with_interrupts_disabled_exits_2(tmp_path):
    result = run_rom(tmp_path, "halt")
    assert result.debug == "halting\n"
    assert result.status == ExitStatus.HALT


def test_unclaimed_ports_and_rom_writes(tmp_path):
    result = run_rom(tmp_path, "probe")
    assert result.debug == "unclaimed ports read all ones\nrom writes ignored\n"
    assert result.status == ExitStatus.POWEROFF


def test_strict_io_stops_on_unclaimed_port(tmp_path):
    result = run_rom(tmp_path, "probe", "-e")
    assert result.status == ExitStatus.ERROR
    assert "unhandled port read at 0x99" in result.stderr
    assert result.debug == ""


def test_every_vcpu_thread_ends_with_the_vm(tmp_path):
    rom = build_rom("exits", COUNT=20000)     # long enough for every AP to start
    config = Config({"name": "threads", "cpus": "4", "lpc.bootrom": str(rom)})
    vm = VirtualMachine(config)
    try:
        names = []
        original_stop = vm.stop

        def record_threads_then_stop(status, vcpu=None, **how):
            names.extend(t.name for t in threading.enumerate())
            original_stop(status, vcpu, **how)
        vm.stop = record_threads_then_stop
        assert vm.run() == ExitStatus.POWEROFF
        assert {"vcpu0", "vcpu1", "vcpu2", "vcpu3"} <= set(names)
        alive = {t.name for t in threading.enumerate()}
        assert not alive & {"vcpu0", "vcpu1", "vcpu2", "vcpu3", "threads-halt"}
        assert vm.exit_stats()[0]["io"] > 0
    finally:
        vm.close()


class RecordingDevice:
    """An MMIO device that logs accesses and reads back a fixed pattern."""

    def __init__(self):
        self.accesses = []

    def read(self, offset, size):
        self.accesses.append(("read", offset, size))
        return 0x0123456789ABCDEF & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        self.accesses.append(("write", offset, size, value))


def test_mmio_dispatch_at_every_width():
    config = Config({"name": "mmio", "lpc.bootrom": str(build_rom("mmio"))})
    vm = VirtualMachine(config)
    device = RecordingDevice()
    vm.mmio.register("recorder", 0xC0000000, 0x1000, device.read, device.write)
    try:
        assert vm.run() == ExitStatus.POWEROFF
    finally:
        vm.close()
    assert device.accesses == [
        ("write", 0, 1, 0x11), ("write", 2, 2, 0x2222), ("write", 4, 4, 0x44444444),
        ("write", 8, 8, 0x8888888888888888),
        ("read", 0x10, 1), ("write", 0x100, 8, 0xEF),
        ("read", 0x10, 2), ("write", 0x100, 8, 0xCDEF),
        ("read", 0x10, 4), ("write", 0x100, 8, 0x89ABCDEF),
        ("read", 0x10, 8), ("write", 0x100, 8, 0x0123456789ABCDEF),
    ]


def test_bootrom_ends_at_4g_and_is_aliased_below_1m():
    rom = build_rom("hello16")
    config = Config({"name": "layout", "lpc.bootrom": str(rom)})
    vm = VirtualMachine(config)
    try:
        image = rom.read_bytes()
        assert vm.memory.read(0x100000000 - len(image), len(image)) == image
        assert vm.memory.read(0x100000 - len(image), len(image)) == image
        regs = vm.vcpus[0].kvm_vcpu.get_regs()
        sregs = vm.vcpus[0].kvm_vcpu.get_sregs()
        assert (sregs.cs.selector, sregs.cs.base, regs.rip) == (0xF000, 0xFFFF0000, 0xFFF0)
    finally:
        vm.close()


@pytest.mark.parametrize("args, message", [
    (["-l", "bootrom,/nonexistent/rom.bin"], "cannot read bootrom /nonexistent/rom.bin"),
    (["-m", "512K"], "below the 1 MiB minimum"),
    (["-m", "lots"], "invalid memory size 'lots'"),
    (["-c", "two"], "invalid -c 'two'"),
    (["-q"], "option -q not recognized"),
    (["-l", "floppy,a.img"], "unknown LPC device 'floppy'"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    rom = build_rom("hello16")
    proc = run_pyhyve(["-l", f"bootrom,{rom}", *args, "vm"], timeout=30)
    assert proc.returncode == ExitStatus.ERROR
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("size, message", [
    (17 * 1024 * 1024, "more than the 16 MiB limit"),
    (4096 + 100, "not a multiple of the 4096-byte page size"),
    (0, "is empty"),
])
def test_bad_bootrom_images(tmp_path, size, message):
    image = tmp_path / "rom.bin"
    image.write_bytes(b"\xf4" * size)
    proc = run_pyhyve(["-l", f"bootrom,{image}", "vm"], timeout=30)
    assert proc.returncode == ExitStatus.ERROR
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_missing_kvm_device_is_one_line(monkeypatch, capsys):
    from pyhyve import cli, vm as vm_module
    from pyhyve.kvm import Kvm

    monkeypatch.setattr(vm_module, "Kvm", lambda: Kvm("/nonexistent/kvm"))
    status = cli.main(["-l", f"bootrom,{build_rom('hello16')}", "vm"])
    assert status == ExitStatus.ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/nonexistent/kvm does not exist" in err


def test_unknown_msr_is_gp_by_default(tmp_path):
    result = run_rom(tmp_path, "msr")
    assert result.status == ExitStatus.TRIPLEFAULT
    assert result.debug == ""


def test_unknown_msr_is_ignored_with_w(tmp_path):
    result = run_rom(tmp_path, "msr", "-w")
    assert result.debug == "unknown msr ignored\n"
    assert result.status == ExitStatus.POWEROFF


def test_keyboard_controller_reset_exits_0(tmp_path):
    result = run_rom(tmp_path, "reset")
    assert result.status == ExitStatus.RESET, result.stderr


@pytest.mark.parametrize("spec, message", [
    ("com1,file=/nonexistent/dir/out", "com1: cannot open file=/nonexistent/dir/out"),
    ("com1,bogus", "com1: unknown backend 'bogus'"),
    ("com2,tcp=127.0.0.1:BUSY", "com2: cannot listen on tcp 127.0.0.1:"),
])
def test_unusable_console_backends_are_one_line(tmp_path, spec, message):
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    spec = spec.replace("BUSY", str(busy.getsockname()[1]))
    try:
        proc = run_pyhyve(["-l", f"bootrom,{build_rom('hello16')}", "-l", spec, "vm"],
                          timeout=30)
    finally:
        busy.close()
    assert proc.returncode == ExitStatus.ERROR
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_pausing_the_vm_pauses_its_devices_and_resuming_resumes_them():
    """vm.pause() reaches every device (the HPET's counter stands still), and
    vm.resume() brings them back before the vCPUs."""
    import time

    from pyhyve.layout import HPET_BASE
    vm = VirtualMachine(Config({"name": "pausing", "lpc.bootrom": str(build_rom("halt"))}))
    try:
        hpet = vm.mmio.lookup(HPET_BASE)
        hpet.write(0x10, 4, 1)                       # GEN_CONF: ENABLE_CNF
        vm.pause()
        stood = hpet.read(0xF0, 8)
        time.sleep(0.02)
        assert hpet.read(0xF0, 8) == stood           # MAIN_COUNTER
        vm.resume()
        time.sleep(0.02)
        assert hpet.read(0xF0, 8) > stood
    finally:
        vm.close()


def fw_cfg_file(vm, wanted: str) -> bytes:
    """A fw_cfg file as firmware reads it: the directory, then the file, by port."""
    ports = vm.ports.lookup(0x510)          # selector at 0x510, data at 0x511

    def read(key: int, length: int) -> bytes:
        ports.write(0, 2, key)
        return bytes(ports.read(1, 1) for _ in range(length))
    count = int.from_bytes(read(0x19, 4), "big")
    directory = read(0x19, 4 + 64 * count)[4:]
    for offset in range(0, len(directory), 64):
        size, key = int.from_bytes(directory[offset:offset + 4], "big"), \
            int.from_bytes(directory[offset + 4:offset + 6], "big")
        if directory[offset + 8:offset + 64].rstrip(b"\0").decode() == wanted:
            return read(key, size)
    raise AssertionError(f"no fw_cfg file {wanted}")


def test_acpi_tables_follow_a_removed_pci_function():
    """The _PRT entry of slot 5 (DWordConst 0x0005FFFF) leaves the tables the
    firmware reads at its next boot, and the function leaves the device list."""
    slot5, slot6 = b"\x0c\xff\xff\x05\x00", b"\x0c\xff\xff\x06\x00"
    rom = build_rom("exits", COUNT=1)
    vm = VirtualMachine(Config({"lpc.bootrom": str(rom), "pci.0.5.0.device": "virtio-rnd",
                                "pci.0.6.0.device": "virtio-rnd"}))
    try:
        assert slot5 in vm.acpi_tables.table("DSDT").data
        assert slot5 in fw_cfg_file(vm, "etc/acpi/tables")
        vm.pci.remove(vm.pci.functions[5, 0])
        assert "pci.0.5.0" not in [device.name for device in vm.devices]
        assert slot5 not in vm.acpi_tables.table("DSDT").data
        assert slot5 not in fw_cfg_file(vm, "etc/acpi/tables")
        assert slot6 in fw_cfg_file(vm, "etc/acpi/tables")
    finally:
        vm.close()


def recording_device(seen: list, wide: int):
    """A device's read and write that note each access in SEEN: reads return
    WIDE plus the offset, wider than any access, so the handler must mask
    them; a write of 0xEE raises, as a device with a bug would."""
    def read(offset, size):
        seen.append(("read", offset, size))
        return wide + offset

    def write(offset, size, value):
        seen.append(("write", offset, size, value))
        if value == 0xEE:
            raise RuntimeError("device bug")
    return read, write


def test_port_exit_dispatch_by_width_direction_and_count():
    """The port-I/O exit handler on a run page filled in as KVM fills it: one-byte
    accesses (the fast path), wider ones and `rep` strings reach the device with
    the port's offset in its range, reads land masked to their width, a device
    that raises leaves the access ignored and the vCPU running, and an exit
    whose data would lie outside the run page is refused (warned once)."""
    import struct
    from pyhyve import vcpu as vcpu_module
    from pyhyve.kvm import abi
    vm = VirtualMachine(Config({"lpc.bootrom": str(build_rom("exits", COUNT=1))}))
    try:
        vcpu = vm.vcpus[0]
        page = vcpu._page
        seen = []
        vm.ports.register("probe", 0x500, 8, *recording_device(seen, 0x1234567890))
        data = 4096                            # where KVM puts port data: the page after

        def exit_io(direction, size, port, count, offset=data):
            struct.pack_into("<I", page, abi.RUN_OFFSET_EXIT_REASON, abi.KVM_EXIT_IO)
            vcpu_module._IO_EXIT.pack_into(page, abi.RUN_OFFSET_EXIT_UNION, direction,
                                           size, port, count, offset)
            return vcpu._exit_io()

        out, inp = abi.KVM_EXIT_IO_OUT, abi.KVM_EXIT_IO_IN
        page[data:data + 8] = bytes(range(0xA1, 0xA9))
        assert exit_io(out, 1, 0x503, 1) is None
        assert exit_io(out, 2, 0x502, 1) is None
        assert exit_io(out, 1, 0x501, 3) is None
        assert seen == [("write", 3, 1, 0xA1), ("write", 2, 2, 0xA2A1),
                        ("write", 1, 1, 0xA1), ("write", 1, 1, 0xA2), ("write", 1, 1, 0xA3)]
        seen.clear()
        exit_io(inp, 1, 0x505, 1)
        assert page[data] == (0x1234567890 + 5) & 0xFF and page[data + 1] == 0xA2
        exit_io(inp, 4, 0x504, 1)
        assert struct.unpack_from("<I", page, data)[0] == (0x1234567890 + 4) & 0xFFFFFFFF
        exit_io(inp, 2, 0x506, 2)
        assert struct.unpack_from("<HH", page, data) == ((0x1234567890 + 6) & 0xFFFF,) * 2
        assert seen == [("read", 5, 1), ("read", 4, 4), ("read", 6, 2), ("read", 6, 2)]
        page[data] = 0xEE
        assert exit_io(out, 1, 0x500, 1) is None       # the device raised: ignored
        assert "probe" in vm._warned
        seen.clear()
        vm._warned.clear()
        assert exit_io(out, 1, 0x500, 1, offset=len(page)) is None
        assert exit_io(out, 4, 0x500, 1, offset=len(page) - 2) is None
        # data_offset is 64 bits: its high half counts, though the handler
        # reads the exit as 32-bit words
        assert exit_io(inp, 1, 0x500, 1, offset=(1 << 32) + data) is None
        assert seen == [] and vm._warned == {"io-exit"}     # malformed, not a device bug
        page[data] = 0
        assert exit_io(inp, 1, 0x5FF, 1) is None and page[data] == 0xFF    # nobody's port
        assert exit_io(out, 1, 0x5FF, 1) is None and vm.unclaimed_accesses == 2
    finally:
        vm.close()


def test_mmio_exit_dispatch_by_width_and_direction():
    """The MMIO handler reads kvm_run.mmio through views of the run page; the
    exits are written here through the ctypes kvm_run, laid out from KVM's
    header, so an offset wrong in the handler shows."""
    from pyhyve.kvm import abi
    vm = VirtualMachine(Config({"lpc.bootrom": str(build_rom("exits", COUNT=1))}))
    try:
        vcpu = vm.vcpus[0]
        run = vcpu._run_state
        seen = []
        base = 0xFED10000
        vm.mmio.register("probe", base, 0x100, *recording_device(seen, 0x1122334455667788AA))

        def exit_mmio(addr, length, is_write, data=b""):
            run.exit_reason = abi.KVM_EXIT_MMIO
            run.u.mmio.phys_addr, run.u.mmio.len, run.u.mmio.is_write = addr, length, is_write
            run.u.mmio.data[:] = list(data.ljust(8, b"\x5a"))
            assert vcpu._exit_mmio() is None
            return bytes(run.u.mmio.data)[:length]

        exit_mmio(base + 8, 4, 1, bytes.fromhex("01020304"))
        exit_mmio(base + 0x10, 8, 1, bytes(range(1, 9)))
        exit_mmio(base + 2, 1, 1, b"\x7f")
        assert exit_mmio(base + 4, 2, 0) == (0x7788AA + 4).to_bytes(3, "little")[:2]
        assert exit_mmio(base + 0x20, 8, 0) == ((0x1122334455667788AA + 0x20)
                                               & (1 << 64) - 1).to_bytes(8, "little")
        assert seen == [("write", 8, 4, 0x04030201), ("write", 0x10, 8, 0x0807060504030201),
                        ("write", 2, 1, 0x7F), ("read", 4, 2), ("read", 0x20, 8)]
        seen.clear()
        exit_mmio(base, 1, 1, b"\xee")                  # the device raised: ignored
        assert "probe" in vm._warned and vm.unclaimed_accesses == 0
        assert exit_mmio(base + 0x100, 4, 0) == b"\xff" * 4      # nobody's address
        assert exit_mmio(base, 3, 0) == b"\xff" * 3              # no such width
        assert seen == [("write", 0, 1, 0xEE)] and vm.unclaimed_accesses == 2
    finally:
        vm.close()


@pytest.mark.parametrize("reason", [63, 64, 1000])
def test_the_vm_loop_stops_on_a_reason_it_has_no_handler_for(monkeypatch, capsys, reason):
    """vm_loop's table is a list indexed by the exit reason: a reason with no
    handler inside it (63) or one beyond it stops the VM with ERROR after the
    exits before it were handled and counted.  KVM_RUN is played here: one
    port write, then REASON; the other ioctls are KVM's.  vm_loop passes
    KVM_RUN no third argument, which fcntl.ioctl would first try as a buffer
    at a cost of 0.6 us on every exit."""
    import fcntl
    import struct
    from pyhyve import vcpu as vcpu_module
    from pyhyve.kvm import abi
    vm = VirtualMachine(Config({"lpc.bootrom": str(build_rom("exits", COUNT=1))}))
    try:
        vcpu = vm.vcpus[0]
        page = vcpu._page
        played = [abi.KVM_EXIT_IO, reason]
        written, run_arguments = [], []
        vm.ports.register("probe", 0x500, 1, lambda offset, size: 0,
                          lambda offset, size, value: written.append(value))

        real_ioctl = fcntl.ioctl

        def kvm_run(fd, request, *args):
            if request != abi.KVM_RUN:              # the registers, for the report
                return real_ioctl(fd, request, *args)
            run_arguments.append(args)
            struct.pack_into("<I", page, abi.RUN_OFFSET_EXIT_REASON, played.pop(0))
            vcpu_module._IO_EXIT.pack_into(page, abi.RUN_OFFSET_EXIT_UNION,
                                           abi.KVM_EXIT_IO_OUT, 1, 0x500, 1, 4096)
            page[4096] = 0x5A
            return 0

        monkeypatch.setattr(fcntl, "ioctl", kvm_run)
        assert vcpu._vm_loop() == ExitStatus.ERROR
        monkeypatch.undo()
        assert written == [0x5A] and played == [] and run_arguments == [(), ()]
        assert vcpu.exit_counts[abi.KVM_EXIT_IO] == 1
        assert vcpu.unknown_exit_counts == {reason: 1}
        assert f"unhandled exit reason {reason} (unknown)" in capsys.readouterr().err
    finally:
        vm.close()


@pytest.mark.parametrize("report_fails", [False, True])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crash_of_the_vm_loop_stops_the_vm_with_an_error(monkeypatch, caplog, report_fails):
    """A bug in pyhyve that escapes the vm_loop ends the VM with ERROR and a
    logged traceback, and still ends it when logging the crash fails too
    (here the report raises): the VM never waits forever for a dead vCPU."""
    from pyhyve.vcpu import VcpuThread

    def crash(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(VcpuThread, "_vm_loop", crash)
    vm = VirtualMachine(Config({"lpc.bootrom": str(build_rom("exits", COUNT=1))}))
    if report_fails:
        class BrokenLog:
            def exception(self, *args, **kwargs):
                raise OSError("the log is gone")

            def __getattr__(self, name):
                return lambda *args, **kwargs: None

        vm.vcpus[0].log = BrokenLog()
    statuses = []
    runner = threading.Thread(target=lambda: statuses.append(vm.run()))
    try:
        runner.start()
        runner.join(60)
        assert statuses == [ExitStatus.ERROR]
        crashed = [r for r in caplog.records if r.getMessage() == "vm_loop crashed"]
        assert len(crashed) == (0 if report_fails else 1)
        assert report_fails or crashed[0].exc_info[0] is RuntimeError
    finally:
        vm.stop(ExitStatus.POWEROFF)
        runner.join(10)
        vm.close()


def _guest_ram_mappings(size: int) -> dict[int, int]:
    """This process's mappings SIZE bytes long: start address -> resident bytes."""
    found, start = {}, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                low, high = (int(part, 16) for part in fields[0].split("-"))
                start = low if high - low == size else None
            elif fields[0] == "Rss:" and start is not None:
                found[start] = int(fields[1]) * 1024
    return found


@pytest.mark.parametrize("view_held", [False, True])
def test_closing_a_vm_gives_its_ram_back_at_once(view_held):
    """vm.close() unmaps guest RAM without waiting for the cyclic collector
    (off here, as a closed VM's objects are cycles); where something still
    holds a view of it, the pages are dropped and the range stays until the
    view goes."""
    import gc
    size = 96 << 20                              # a size nothing else in the process maps
    gc.disable()
    try:
        before = _guest_ram_mappings(size)
        vm = VirtualMachine(Config({"lpc.bootrom": str(build_rom("exits", COUNT=1)),
                                    "memory.size": "96M"}))
        vm.memory.write(0x100000, b"\xA5" * (8 << 20))     # 8 MiB resident
        [ram] = set(_guest_ram_mappings(size)) - set(before)
        assert _guest_ram_mappings(size)[ram] >= 8 << 20
        view = vm.memory.view(0x100000, 16) if view_held else None
        assert vm.run() == ExitStatus.POWEROFF
        vm.close()
        after = _guest_ram_mappings(size)
        if view_held:
            assert after[ram] == 0 and bytes(view) == bytes(16)
            view.release()
        else:
            assert ram not in after
    finally:
        gc.enable()
