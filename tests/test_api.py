"""The embedding API (pyhyve.api), used the way a program would: only the
names it exports, a VM run on a thread of the caller's, and no signal
handler asked of the caller."""

import subprocess
import sys
import textwrap
import time

import pytest

from firmware import require_file
from guestrun import REPO

pytestmark = pytest.mark.usefixtures("needs_kvm")

PROGRAM = textwrap.dedent("""
    import signal, sys, threading, time
    from pyhyve.api import ExitStatus, MemoryConsole, PciSlot, Vm, VmSpec

    console = MemoryConsole()
    spec = VmSpec("apitest", memory="128M", bootrom=sys.argv[1],
                  pci=[PciSlot(3, "virtio-rnd")], consoles={"com1": console},
                  config={"control.socket": sys.argv[2] + "/ctl.sock"})
    with Vm(spec) as vm:
        vm.start()
        print("banner", console.wait_for("SeaBIOS (version", timeout=120), flush=True)
        # from another thread than the one that started it
        worker = threading.Thread(target=lambda: (vm.pause(), vm.snapshot(sys.argv[2] + "/s"),
                                                  vm.resume()))
        worker.start()
        worker.join(60)
        print("running", vm.wait(0.5) is None, flush=True)
        vm.pause()                  # a snapshot of a paused VM leaves it paused
        vm.snapshot(sys.argv[2] + "/s2")
        time.sleep(0.5)             # a resumed vCPU would have left its pause by now
        print("stays paused", all(vcpu.paused for vcpu in vm.machine.vcpus), flush=True)
        vm.resume()
        print("stopped", vm.stop(ExitStatus.POWEROFF).name, flush=True)
    print("python handler", signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL)
    print("threads", [t.name for t in threading.enumerate() if t.name != "MainThread"])
""")


def test_a_program_boots_seabios_and_reads_its_banner_through_the_api(tmp_path):
    bios = require_file("/usr/share/seabios/bios.bin", "seabios")
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(bios), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == ["banner True", "running True", "stays paused True",
                         "stopped POWEROFF"], result.stdout
    assert "python handler True" in lines                 # nothing asked of the caller
    assert (tmp_path / "s").stat().st_size > 0             # the snapshot was written
    leftover = [name for name in eval(lines[-1].removeprefix("threads ")) if "ctl" in name]
    assert not leftover, lines[-1]                         # closed with the VM


def test_spec_errors_are_config_errors_with_the_command_lines_words():
    from pyhyve.api import ConfigError, PciSlot, Vm, VmSpec
    bios = require_file("/usr/share/seabios/bios.bin", "seabios")
    with pytest.raises(ConfigError, match="unknown PCI emulation 'virtio-rng'"):
        Vm(VmSpec("bad", bootrom=bios, pci=[PciSlot(3, "virtio-rng")]))
    with pytest.raises(ConfigError, match="no COM port named com9"):
        Vm(VmSpec("bad", bootrom=bios, consoles={"com9": "stdio"}))
    with pytest.raises(ConfigError, match="bootrom /dev/null is empty"):
        Vm(VmSpec("bad", bootrom="/dev/null"))


def test_the_readme_example_runs(tmp_path):
    import re
    require_file("/usr/share/seabios/bios.bin", "seabios")
    example = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    example = example.replace("/tmp/demo.snap", str(tmp_path / "demo.snap"))
    example = example.replace('VmSpec("demo", ', f'VmSpec("demo", config={{"control.socket": '
                                                  f'"{tmp_path}/ctl.sock"}}, ')
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "POWEROFF" and (tmp_path / "demo.snap").exists()


def test_reset_reboots_in_process_with_ram_kept_and_the_chipset_reset(tmp_path):
    """The guest resets itself (0xCF9) twice: after each reset() the BSP starts
    at the reset vector again, RAM still holds the boot count, and port 0x92
    reads as at power-on although the guest set it before resetting."""
    from pyhyve.api import ExitStatus, Vm, VmSpec
    from build import build_rom
    debug = tmp_path / "debug"
    spec = VmSpec("reboots", memory="64M", bootrom=str(build_rom("reboots")),
                  config={"lpc.debugcon.path": str(debug)})
    statuses = []
    with Vm(spec) as vm:
        for _ in range(3):
            vm.start()
            statuses.append(vm.wait(60))
            if statuses[-1] == ExitStatus.RESET:
                vm.reset()
    assert statuses == [ExitStatus.RESET, ExitStatus.RESET, ExitStatus.POWEROFF]
    assert debug.read_text().splitlines() == [f"boot {n}, port 0x92 = 0" for n in (1, 2, 3)]


def test_seabios_boots_again_after_a_reset():
    """SeaBIOS shadows itself into RAM through the host bridge's PAM registers;
    after reset() the BIOS area is ROM again and it runs its POST once more,
    as under QEMU's system_reset (its shadow copy from the first boot is in RAM
    that a warm reset keeps)."""
    from pyhyve.api import ExitStatus, MemoryConsole, Vm, VmSpec
    from pyhyve.kvm.abi import KVM_MP_STATE_UNINITIALIZED
    bios = require_file("/usr/share/seabios/bios.bin", "seabios")
    console = MemoryConsole()
    with Vm(VmSpec("twice", memory="128M", cpus=2, bootrom=bios,
                   consoles={"com1": console})) as vm:
        vm.start()
        assert console.wait_for("No bootable device", timeout=120), console.output
        assert vm.stop(ExitStatus.RESET) == ExitStatus.RESET
        with pytest.raises(RuntimeError, match="was started already"):
            vm.start()
        ap = vm.machine.vcpus[1].kvm_vcpu       # SeaBIOS woke it to count the CPUs
        assert ap.get_mp_state() != KVM_MP_STATE_UNINITIALIZED
        vm.reset()
        assert ap.get_mp_state() == KVM_MP_STATE_UNINITIALIZED     # waits for SIPI again
        vm.start()
        deadline = time.monotonic() + 120
        while console.output.count(b"No bootable device") < 2:
            assert time.monotonic() < deadline, console.output
            time.sleep(0.1)
        assert console.output.count(b"SeaBIOS (version") == 2
        with pytest.raises(RuntimeError, match="is running"):
            vm.reset()
