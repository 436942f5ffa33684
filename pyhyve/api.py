"""pyhyve as a library: build a VM from a spec, run it on a thread of its own,
and drive it from any other: pause, resume, snapshot, stop, reset.

    from pyhyve.api import MemoryConsole, PciSlot, Vm, VmSpec

    console = MemoryConsole()
    spec = VmSpec("demo", memory="128M", bootrom="/usr/share/seabios/bios.bin",
                  pci=[PciSlot(3, "virtio-rnd")], consoles={"com1": console})
    with Vm(spec) as vm:
        vm.start()
        console.wait_for("SeaBIOS", timeout=60)
        vm.stop()
    print(vm.exit_status)

This module and what it names are the stable surface; the rest of the
package may change between releases.  Nothing here installs a signal
handler the caller must keep (vCPU kicks use a C-level one set when a VM
first runs off the main thread), and nothing writes to the terminal unless
a console says "stdio".  Errors in the spec raise ConfigError with the
message pyhyve's command line would print.
"""

import threading
from dataclasses import dataclass, field

from .config import Config, ConfigError
from .devices.chardev import Backend, MemoryConsole
from .devices.uart import COM_PORTS
from .vcpu import ExitStatus
from .vm import VirtualMachine

__all__ = ["Backend", "ConfigError", "ExitStatus", "MemoryConsole", "PciSlot", "Vm", "VmSpec"]


@dataclass
class PciSlot:
    """One `-s slot[:func],emulation[,options]`."""
    slot: int
    emulation: str
    options: dict[str, str] = field(default_factory=dict)
    function: int = 0


@dataclass
class VmSpec:
    """What the command line would say, as values.  Give a bootrom or a kernel.
    `consoles` maps COM ports to a Backend object (MemoryConsole) or a spec
    string as -l takes ("stdio", "pty", "file=PATH", "unix=PATH", "tcp=HOST:PORT").
    `config` adds any other config key (`pyhyve -o help` lists them)."""
    name: str
    memory: str = "256M"
    cpus: int = 1
    bootrom: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    pci: list[PciSlot] = field(default_factory=list)
    consoles: dict[str, Backend | str] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)

    def to_config(self) -> Config:
        values = {"name": self.name, "memory.size": self.memory, "cpus": str(self.cpus)}
        if self.bootrom is not None:
            values["lpc.bootrom"] = self.bootrom
        if self.kernel is not None:
            values["kexec.kernel"] = self.kernel
            values["kexec.cmdline"] = self.cmdline
            if self.initrd is not None:
                values["kexec.initrd"] = self.initrd
        for device in self.pci:
            prefix = f"pci.0.{device.slot}.{device.function}"
            values[f"{prefix}.device"] = device.emulation
            values.update({f"{prefix}.{key}": str(value)
                           for key, value in device.options.items()})
        for port, console in self.consoles.items():
            if port not in COM_PORTS:
                raise ConfigError(f"no COM port named {port} (com1 to com4)")
            if isinstance(console, str):
                values[f"lpc.{port}.path"] = console
        values.update(self.config)
        config = Config()
        for key, value in values.items():
            config.set(key, value)
        return config

    def console_objects(self) -> dict[str, Backend]:
        return {port: console for port, console in self.consoles.items()
                if isinstance(console, Backend)}


class Vm:
    """A VM built from a VmSpec (or a Config, with console objects beside it).

    start() runs it on a thread named after it; the other methods are safe
    from any thread.  Leaving a `with` block (or close()) stops it if it still
    runs, with exit status POWEROFF, and releases everything it holds."""

    def __init__(self, spec: VmSpec | Config, consoles: dict[str, Backend] | None = None):
        if isinstance(spec, VmSpec):
            config, consoles = spec.to_config(), {**spec.console_objects(), **(consoles or {})}
        else:
            config = spec
        self._machine = VirtualMachine(config, consoles)
        self._thread: threading.Thread | None = None
        self._status: int | None = None
        self._closed = False

    @property
    def machine(self) -> VirtualMachine:
        """The VM underneath, for what this API does not cover (unstable)."""
        return self._machine

    @property
    def exit_status(self) -> int | None:
        """bhyve's exit status (an ExitStatus) once the VM stopped, else None;
        a plain int where a test device (isa-debug-exit) chose it."""
        return self._status

    def start(self) -> None:
        """Run the VM on its own thread (once, or again after reset())."""
        if self._thread is not None:
            raise RuntimeError(f"VM {self._machine.name} was started already")
        self._thread = threading.Thread(target=self._run, name=f"{self._machine.name}-vm",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._status = self._machine.run()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status once the VM stopped; None if `timeout` passed first."""
        if self._thread is None:
            raise RuntimeError(f"VM {self._machine.name} was not started")
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self._status

    def reset(self) -> None:
        """Once the VM has stopped (the guest rebooted it: exit status RESET, or
        any other way), put it in its power-on state with RAM kept, as a reset
        button would; start() then boots it again."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"VM {self._machine.name} is running: stop it first")
        self._machine.reset()
        self._thread, self._status = None, None

    def pause(self) -> None:
        self._machine.pause()

    def resume(self) -> None:
        self._machine.resume()

    def snapshot(self, path: str) -> None:
        """Save the VM to `path` (snapshot.SnapshotError if it cannot be); it is
        paused meanwhile and runs on afterwards if it ran before."""
        self._machine.checkpoint(path)

    def press_power_button(self) -> None:
        """The ACPI power button, as SIGTERM to pyhyve presses it (it wakes a
        guest asleep in ACPI S3)."""
        self._machine.press_power_button()

    def wakeup(self) -> bool:
        """Wake a guest asleep in ACPI S3, as QEMU's system_wakeup; whether it slept."""
        return self._machine.wakeup("host")

    def stop(self, status: ExitStatus = ExitStatus.POWEROFF,
             timeout: float | None = 30.0) -> int | None:
        """Stop the VM (if it still runs) with `status`; its exit status."""
        self._machine.stop(status)
        return self.wait(timeout) if self._thread is not None else self._status

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self.stop()
        self._machine.close()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
