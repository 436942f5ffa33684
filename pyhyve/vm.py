"""The machine: KVM VM, memory, buses, vCPUs and the device list, and its
lifecycle.

Construction follows bhyve's order: parse and check every user setting, then
create the KVM VM, memory, irqchip and PIT, the devices (which builder.py
chooses from the config), the boot method's part, and vCPUs.  `run()`
starts the BSP, then the APs (which wait in KVM for INIT/SIPI), and returns
bhyve's exit status once any vCPU or device stops the VM.

Whatever watches the machine from outside (QMP's events) registers a
listener: `vm.listeners.append(callable)`, called as listener(event, details)
on the thread where the event happened, so it must not block:

- "paused", "resumed": pause() and resume() changed the VM's state;
- "power-button": press_power_button();
- "reset": the machine was reset in place (request_reset(), reset());
  details: cause;
- "stopping": the VM stops for good (stop(); run() returns); details:
  status (the ExitStatus), cause;
- "suspend": the guest put the machine to sleep (ACPI S3);
- "wakeup": it woke; details: source ("rtc", "power-button", "host").

Suspend to RAM (ACPI S3), as QEMU does it: the guest's SLP_EN write (pm.py)
stops every vCPU; memory and device state stay (each device's suspend()
hook runs, and the RTC keeps its alarm).  run() then sleeps until a wake
event: the RTC alarm (with RTC_EN), the power button (SIGTERM, pyhyvectl
--powerdown, QMP system_powerdown: a button press wakes a sleeping machine,
as on hardware; QEMU's does not) or wakeup() itself (pyhyvectl --wakeup,
QMP system_wakeup).  Waking resets the machine into its firmware, as QEMU's
pc machine does (every vCPU, the irqchip and PIT, each device's wake()),
sets WAK_STS, and the boot method starts the BSP again (boot/methods.py:
the firmware's reset vector, where SeaBIOS finds the CMOS shutdown status
0xFE and jumps to the FACS waking vector; a kernel booted directly is
resumed at the waking vector by pyhyve itself).  A reset or stop while it
sleeps acts as it would on a running machine.

A cause is who asked: "guest" (the guest itself, through a vCPU exit or a
device), else the word the caller gave stop() or request_reset() ("signal",
"control" for pyhyvectl, "qmp", "host" by default).
"""

import sys
import threading
import time

from . import builder, cpuid, mce
from .boot.methods import method_for
from .boot.acpi import build_tables, platform_from_vm
from .coalesced import CoalescedWrites
from .boot.mptable import build_mptable
from .config import Config, ConfigError, parse_size
from .configkeys import unknown_keys
from .devctx import DeviceContext
from .escape import DEFAULT as DEFAULT_ESCAPE, parse_escape
from .devices.fwcfg import E820_RAM, E820_RESERVED
from .devices.rtc import RTC_IRQ
from .gsiroutes import CASCADE_IRQ, IOAPIC_PINS, GsiRoutes
from .imagelocks import ImageLocks
from .iobus import MmioBus, NotifierUnavailable, PortBus
from .kvm import Kvm, KvmError, abi
from .layout import (ECAM_BASE, ECAM_SIZE, IDENTITY_MAP_ADDR, LEGACY_HOLE, MPTABLE_BASE,
                     TSS_ADDR)
from .log import getLogger
from .memory import MIN_MEMORY, GuestMemory, GuestMemoryError
from .pci.bus import PciBus
from .pci.intx import IOAPIC_PIN_BASE, link_for
from .pci.regs import INTERRUPT_PIN
from .vcpu import ExitStatus, VcpuThread, install_kick_handler

HALT_PROBE_INTERVAL = 0.5
# how the log says each exit status
STATUS_WORDS = {ExitStatus.RESET: "reset", ExitStatus.POWEROFF: "powered off",
                ExitStatus.HALT: "halted", ExitStatus.TRIPLEFAULT: "triple fault",
                ExitStatus.ERROR: "error"}
DEFAULT_MEMORY = "256M"
# how the log says each wake source
WAKE_WORDS = {"rtc": "the RTC alarm", "power-button": "the power button",
              "host": "a wakeup request"}


def describe_status(status: int) -> str:
    """bhyve's words for an exit status; an isa-debug-exit guest's own is a number."""
    return STATUS_WORDS.get(status, "the guest's own exit")

REQUIRED_CAPS = ((abi.KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING"),
                 (abi.KVM_CAP_IRQFD, "KVM_CAP_IRQFD"))


def _size(size: int) -> str:
    """A memory size as -m writes it: 256M, 1G, 1536K."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return f"{size} bytes"


class VirtualMachine:
    """One guest: memory, buses, devices and vCPU threads."""

    def __init__(self, config: Config, consoles: dict | None = None):
        """`consoles` maps COM port names ("com1") to chardev.Backend objects
        (a MemoryConsole, say) for ports the config gives no path for."""
        self.config = config
        self._given_consoles = dict(consoles or {})
        self.name = builder.vm_name(config)
        self.log = getLogger(f"pyhyve.{self.name}")
        self.exit_status: int | None = None      # an ExitStatus, or a test device's
        self.exit_detail = ""
        self.started_at: float | None = None     # time.monotonic() of the first run()
        self.stopped_by = ""            # a user's stop from a console (`com1: ~.`)
        self.stopping = False
        self.paused = False             # by pause(), until resume()
        self.listeners: list = []       # see the module docstring
        self._reset_cause: str | None = None    # request_reset() is pending
        self.suspended = False          # ACPI S3: from the guest's SLP_EN write to the wake
        self._wake_source: str | None = None    # what wakeup() was asked by
        self._wake = threading.Event()  # a sleeping run() looks up: wakeup, reset or stop
        self._asleep_already = False    # restored asleep: the devices were suspended then
        self._pause_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self._warned: set = set()
        self._irq_lock = threading.Lock()
        self._irq_sources: dict[int, set] = {}
        self._irq_cut_off: set[tuple[int, str]] = set()
        self.unclaimed_accesses = 0
        self.devices: list = []         # lifecycle.Device, in the order they were built
        self.closables: list = []       # devices and services, closed in reverse order
        self.vcpus: list[VcpuThread] = []
        self.has_run = False            # the guest has run: tables in its memory are its own
        self._device_power_on: dict[str, dict] = {}
        self._closing = False

        builder.pci_slots(config)       # a malformed slot is an error, not an unknown key
        for key, near in unknown_keys(config.keys()):
            self.log.warning("unknown config key '%s'%s; ignored", key,
                             f" (did you mean '{near}'?)" if near else "")
        memory_size = parse_size(config.get("memory.size", DEFAULT_MEMORY), "memory size")
        if memory_size < MIN_MEMORY:
            raise ConfigError(f"memory size {memory_size} bytes is below the 1 MiB minimum")
        self.topology = builder.topology(config)
        self.cpusets = builder.vcpu_cpusets(config, self.topology.cpus)     # -p
        layout = config.get("keyboard.layout")
        if layout is not None:
            from .vnc.keysyms import US_LAYOUTS     # 0.2 ms: only where -K names one
            if layout not in US_LAYOUTS:
                raise ConfigError(f"keyboard.layout (-K): '{layout}': the VNC console "
                                  "types with the US layout only (us_unix)")
        self.uuid = builder.vm_uuid(config, self.name)
        self.strict_io = config.get_bool("x86.strictio")
        self.strict_msr = config.get_bool("x86.strictmsr", True)
        try:
            self.hidden_features = cpuid.feature_mask(config.get("cpu.features", ""))
        except cpuid.FeatureError as exc:
            raise ConfigError(str(exc)) from None
        self.boot = method_for(config)
        self.console_escape = parse_escape(config.get("console.escape", DEFAULT_ESCAPE))

        # A live migration's destination opens its disks unlocked until the
        # source hands their locks over (imagelocks.py); the source lets go.
        self.image_locks = ImageLocks(deferred="migration.listen" in config)
        self.migration = None           # pyhyve.migration.Migrations, on first use
        self.kvm = Kvm()
        try:
            with self.image_locks.collecting():
                self._create(memory_size)
        except BaseException:
            self.close()
            raise

    def _create(self, memory_size: int) -> None:
        self.kvm_vm = self.kvm.create_vm()
        self.kvm_vm.set_tss_addr(TSS_ADDR)
        self.kvm_vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        # RAM and the boot method's memory before the in-kernel irqchip: on this
        # project's hosts the first memslot change after KVM_CREATE_IRQCHIP takes
        # 5 to 7 ms and those before it 0.2 ms, so the cost moves off the path to
        # the first instruction (to the first BAR or ROM the guest maps, if any).
        try:
            self.memory = GuestMemory(self.kvm_vm, memory_size)
            if not self.config.get_bool("memory.guest_in_core"):        # -C keeps it in
                self.memory.exclude_from_core_dumps()
            if self.config.get_bool("memory.wired"):
                self.memory.wire()
        except GuestMemoryError as exc:
            raise ConfigError(str(exc)) from None
        self.boot.map_memory(self.memory)
        self.kvm_vm.create_irqchip()
        self.kvm_vm.create_pit2()
        if self.kvm.check_extension(abi.KVM_CAP_X86_USER_SPACE_MSR):
            self.kvm_vm.enable_cap(abi.KVM_CAP_X86_USER_SPACE_MSR,
                                   abi.KVM_MSR_EXIT_REASON_UNKNOWN |
                                   abi.KVM_MSR_EXIT_REASON_INVAL)
        for cap, name in REQUIRED_CAPS:
            if not self.kvm.check_extension(cap):
                raise KvmError(f"this host's KVM lacks {name}, which pyhyve needs")
        self.gsi_routes = GsiRoutes(self.kvm_vm)
        self.closables.append(self.gsi_routes)
        self.ports = PortBus()
        self.mmio = MmioBus()
        self.coalesced = CoalescedWrites(self.kvm, self.kvm_vm, self.ports, self.mmio,
                                         self.device_failed)
        self.ports.write_queue = self.mmio.write_queue = self.coalesced
        self.context = DeviceContext(self)      # what devices get of this machine
        if self.kvm.check_extension(abi.KVM_CAP_IOEVENTFD):
            self.ports.notifier = self._ioeventfd_notifier(pio=True)
            self.mmio.notifier = self._ioeventfd_notifier(pio=False)
        builder.add_platform_devices(self, self._given_consoles)
        self.boot.add_devices(self)
        self.pci = PciBus(self.context)
        self.add_device(self.pci)
        builder.add_pci_devices(self)
        builder.add_test_devices(self)
        builder.configure_consoles(self)
        self.acpi_tables = None
        self._install_tables()
        self.gdb = None
        if "gdb.port" in self.config:
            from .gdbstub import GdbStub
            self.gdb = GdbStub(self, self.config.get("gdb.address", "127.0.0.1"),
                               self.config.get_int("gdb.port", 0, 0, 65535),
                               self.config.get_bool("gdb.wait"))
            self.closables.append(self.gdb)
        supported = self.kvm.supported_cpuid()
        self.mcg_cap = 0                # the machine-check banks each vCPU has (mce.py)
        for index in range(self.topology.cpus):
            # KVM's vCPU id is the initial APIC ID, which encodes the topology.
            kvm_vcpu = self.kvm_vm.create_vcpu(self.topology.apic_id(index))
            entries = cpuid.vcpu_cpuid(supported, self.topology, index,
                                       self.config.get_bool("x86.x2apic"), self.hidden_features)
            kvm_vcpu.set_cpuid2(entries)
            if index == 0:
                self.coalesced.map_ring(kvm_vcpu.fd)
                self.mcg_cap = mce.mcg_cap(self.kvm, entries, self.log)
            if self.mcg_cap:
                kvm_vcpu.setup_mce(self.mcg_cap)
            self.vcpus.append(VcpuThread(self, kvm_vcpu, index))
        self._check_hidden_features()
        self.boot.start(self)
        from . import snapshot
        self._kvm_power_on = snapshot.kvm_power_on_state(self)
        self.log.info("built: %s", self.summary())

    def summary(self) -> str:
        """What the VM is made of, in one line (the log's "built" line)."""
        topology = self.topology
        cpus = len(self.vcpus)
        shape = (f" (sockets={topology.sockets}, cores={topology.cores}, "
                 f"threads={topology.threads})" if cpus > 1 else "")
        pci = ", ".join(f"{d.emulation_name} {d.bdf}" for d in self.pci.devices())
        platform = ", ".join(d.name for d in self.devices
                             if d is not self.pci and not d.name.startswith("pci."))
        boot = " and ".join(f"{key}={self.config.get(key)}"
                            for key in ("lpc.bootrom", "kexec.kernel") if self.config.get(key))
        return (f"{_size(self.memory.size)} of memory, {cpus} vCPU{'s' if cpus > 1 else ''}"
                f"{shape}, {boot}; PCI: {pci}; platform: {platform}")

    def _check_hidden_features(self) -> None:
        """Say so when KVM kept a feature cpu.features hides: kvm_pvm, for one,
        rewrites CPUID leaves 1 and 7 with the host CPU's flags on KVM_SET_CPUID2."""
        if not self.hidden_features:
            return
        kept = self.vcpus[0].kvm_vcpu.get_cpuid2()
        for name in sorted(self.hidden_features):
            if cpuid.visible(kept, name):
                leaf = cpuid.FEATURES[name][0]
                self.log.warning("cpu.features: this host's KVM put '%s' back into CPUID "
                                 "leaf %#x; the guest still sees it", name, leaf)

    def add_device(self, device):
        """Make `device` (a lifecycle.Device) one of the VM's: snapshots save it
        under its name and close() closes it.  Returns it."""
        if any(known.name == device.name for known in self.devices):
            raise ValueError(f"two devices are named {device.name}")
        self.devices.append(device)
        self.closables.append(device)
        self._device_power_on[device.name] = device.save_state()    # what reset() restores
        return device

    def consoles(self) -> list[tuple[str, str, object]]:
        """(name, device, chardev.Backend) of each console: the COM ports, then
        each virtio-console port (named as its port, device "virtio-console S.F")."""
        found = [(name, "uart", uart.backend) for name, uart in self.uarts.items()
                 if uart.backend is not None]
        for device in self.pci.devices():
            host_consoles = getattr(getattr(device, "model", None), "host_consoles", None)
            if host_consoles is not None:
                where = f"{device.emulation_name} {device.slot}.{device.func}"
                found += [(name, where, backend) for name, backend in host_consoles()]
        return found

    def remove_device(self, device) -> None:
        """A device taken off its bus (pci.PciBus.remove): no longer saved,
        paused or closed with the VM, and gone from the ACPI tables."""
        self.devices.remove(device)
        self.closables.remove(device)
        del self._device_power_on[device.name]
        if not self._closing:
            self._install_tables()

    def _install_tables(self) -> None:
        """bhyve's -A: ACPI tables built from the devices the VM has now, placed
        where the boot method's guest looks (fw_cfg, read afresh at each
        firmware boot; or guest memory, only before the guest runs)."""
        if not self.config.get_bool("acpi_tables", True):
            return
        if self.acpi_tables is not None and not self.boot.can_replace_tables(self):
            self.log.info("ACPI tables not rebuilt: the guest holds them already")
            return
        self.acpi_tables = build_tables(platform_from_vm(self))
        self.boot.install_tables(self, self.acpi_tables)

    def _ioeventfd_notifier(self, pio: bool):
        """The buses' write notifiers (iobus): KVM ioeventfds in port or MMIO space."""
        def notifier(fd: int, address: int, size: int, datamatch: int | None,
                     deassign: bool) -> None:
            try:
                self.kvm_vm.ioeventfd(fd, address, size, pio, datamatch, deassign)
            except KvmError as exc:
                raise NotifierUnavailable(str(exc)) from None
        return notifier

    def write_mptable(self) -> None:
        """An MP table at MPTABLE_BASE, for a kernel that reads it rather than ACPI."""
        leaf1 = next(e for e in self.kvm.supported_cpuid() if e.function == 1)
        wired = [(d.slot, d.config[INTERRUPT_PIN], IOAPIC_PIN_BASE +
                  link_for(d.slot, d.config[INTERRUPT_PIN]))
                 for d in self.pci.devices() if d.config[INTERRUPT_PIN]]
        self.memory.write(MPTABLE_BASE, build_mptable([v.kvm_vcpu.id for v in self.vcpus],
                                                      leaf1.eax, leaf1.edx, wired))

    def e820(self, firmware: bool = False) -> list[tuple[int, int, int]]:
        """The memory map: RAM, and what must not be used as RAM or for BARs.
        Firmware (SeaBIOS) carves its own low areas out of the RAM it is given;
        a directly booted kernel is told about the legacy BIOS hole itself."""
        ram = [(gpa, size, E820_RAM) for gpa, size in self.memory.ram_ranges()]
        if not firmware:
            low = ram.pop(0)[1]
            ram[:0] = [(0, LEGACY_HOLE[0], E820_RAM),
                       (LEGACY_HOLE[0], LEGACY_HOLE[1] - LEGACY_HOLE[0], E820_RESERVED),
                       (LEGACY_HOLE[1], low - LEGACY_HOLE[1], E820_RAM)]
        reserved = [(ECAM_BASE, ECAM_SIZE, E820_RESERVED),
                    # KVM's identity-map and TSS pages must not be handed out as RAM or BARs.
                    (IDENTITY_MAP_ADDR, TSS_ADDR + 3 * 4096 - IDENTITY_MAP_ADDR, E820_RESERVED)]
        return sorted(ram + reserved)

    # --- lifecycle ----------------------------------------------------------------
    def run(self) -> int:
        """Run until the guest or a user stops the VM; returns bhyve's exit status
        (an ExitStatus), or the one a test device asked for (see stop()).  A
        request_reset() meanwhile resets the machine and runs it on."""
        install_kick_handler()          # from any thread: see vcpu.install_kick_handler
        first_run, self.has_run = not self.has_run, True
        if first_run:
            self.started_at = time.monotonic()
        if self.gdb is not None and first_run:
            self.gdb.start()
        while True:
            if not self.suspended:      # a VM restored while it slept starts asleep
                self._run_vcpus()
            if self.suspended and self._reset_cause is None:
                if not self._sleep():
                    break
                if self._reset_cause is None:
                    continue
            if not self._reset_in_place():
                break
        status = self.exit_status
        # an error's reason was printed, and logged, as it happened (fatal())
        detail = f": {self.exit_detail}" if self.exit_detail and status != ExitStatus.ERROR else ""
        self.log.info("stopped: %s, exit status %d%s", describe_status(status), status, detail)
        return status

    def _run_vcpus(self) -> None:
        """Start every vCPU and return once they stopped (stop, reset or suspend)."""
        for vcpu in self.vcpus:             # BSP first; APs wait for SIPI in KVM
            vcpu.start()
        self.log.info("started %d vCPU thread%s", len(self.vcpus),
                      "s" if len(self.vcpus) > 1 else "")
        watcher = threading.Thread(target=self._watch_halt, name=f"{self.name}-halt",
                                   daemon=True)
        watcher.start()
        flusher = threading.Thread(target=self.coalesced.flush_until, args=(self._stopped,),
                                   name=f"{self.name}-flush", daemon=True)
        flusher.start()
        while not self._stopped.wait(0.2):
            pass
        for vcpu in self.vcpus:
            vcpu.kick()
        for vcpu in self.vcpus:
            vcpu.join(5.0)
        watcher.join(5.0)
        flusher.join(5.0)
        self.coalesced.flush()          # what the guest queued last, before anyone looks

    def request_suspend(self) -> None:
        """ACPI S3, as the guest asks for it (pm.py, on a vCPU thread): every
        vCPU stops and run() sleeps until a wake event (the module docstring)."""
        with self._stop_lock:
            if self.exit_status is not None or self._reset_cause is not None:
                return
            self.suspended = True
            self.stopping = True
            self._wake.clear()          # what woke it last time, or a reset's
        self.log.info("guest suspended to RAM (S3)")
        for vcpu in self.vcpus:
            vcpu.kick()
        self._stopped.set()

    def restore_suspended(self) -> None:
        """A snapshot taken while the guest slept in S3 was restored into this
        VM, not yet run: run() starts it asleep (its devices were told so when
        it went to sleep, and their state came back with the snapshot)."""
        if self.has_run:
            raise RuntimeError(f"VM {self.name} has run: restore only into a fresh VM")
        self.suspended = True
        self._asleep_already = True

    def wakeup(self, source: str = "host") -> bool:
        """Wake a machine that sleeps in S3, from any thread: "rtc" (the RTC
        alarm, only while the guest enabled RTC_EN), "power-button", or "host"
        (pyhyvectl --wakeup, QMP system_wakeup).  Whether it was asleep and
        SOURCE may wake it."""
        with self._stop_lock:
            if not self.suspended or self.exit_status is not None or \
                    not self.pm.wake_enabled(source):
                return False
            if self._wake_source is None:
                self._wake_source = source
        self._wake.set()
        return True

    def _sleep(self) -> bool:
        """run()'s part of S3, once the vCPUs stopped: the devices go to sleep,
        then wait for wakeup(), a reset or a stop; on a wake the machine is
        reset into its firmware and run on.  False when the VM stopped."""
        if any(vcpu.running for vcpu in self.vcpus):
            self.log.error("suspend: a vCPU did not stop; powering off")
            self.stop(ExitStatus.ERROR, cause="host")
            return False
        if not self._asleep_already:
            for device in self.devices:
                device.suspend()
            self._notify("suspend")
        self._asleep_already = False
        source = None
        while source is None:
            self._wake.wait()
            with self._stop_lock:
                source, self._wake_source = self._wake_source, None
                self._wake.clear()
                if self.exit_status is not None:
                    return False
                if self._reset_cause is not None:   # _reset_in_place() takes it from here
                    self.suspended = False
                    return True
        self.log.info("woken from S3 by %s", WAKE_WORDS[source])
        self._wake_machine(source)
        with self._stop_lock:
            self.suspended = False
            if self.exit_status is not None:        # stopped while it woke
                return False
            self.stopping = False
            self._stopped.clear()
        self._notify("wakeup", source=source)
        return True

    def _wake_machine(self, source: str) -> None:
        from . import snapshot
        snapshot.reset_kvm(self, self._kvm_power_on)
        self.lower_irq_lines()
        for device in self.devices:
            device.wake(self._device_power_on[device.name])
        self.pm.woken(source)
        for device in self.devices:
            device.resync_irq()
        self.boot.wake(self)

    def _reset_in_place(self) -> bool:
        """After run()'s vCPUs stopped: reset the machine if request_reset()
        asked and nothing stopped the VM meanwhile; whether it was."""
        with self._stop_lock:
            cause = self._reset_cause
            if cause is None or self.exit_status is not None:
                return False
        if any(vcpu.running for vcpu in self.vcpus):
            self.log.error("reset: a vCPU did not stop; powering off")
            self.stop(ExitStatus.ERROR, cause="host")
            return False
        self._reset_machine()
        with self._stop_lock:
            self._reset_cause = None
            self.suspended = False
            if self.exit_status is not None:        # stopped while it was reset
                return False
            self.stopping = False
            self._stopped.clear()
        self._notify("reset", cause=cause)
        return True

    def request_reset(self, cause: str = "host") -> None:
        """A reset button, from any thread: the vCPUs stop, the machine is reset
        as reset() does, and run() boots the guest again (paused if the VM is).
        RuntimeError once the VM stops for good."""
        with self._stop_lock:
            if self.exit_status is not None:
                raise RuntimeError(f"VM {self.name} is stopping")
            self._reset_cause = cause
            self.stopping = True
        for vcpu in self.vcpus:
            vcpu.kick()
        self._stopped.set()
        self._wake.set()            # a machine asleep in S3 is reset too

    def reset(self) -> None:
        """QEMU's system_reset, in-process, once run() has returned: every vCPU,
        the interrupt controllers and the PIT as KVM had them when the VM was
        built, every device reset (Device.reset), and the boot method starts
        over (the firmware's reset vector, or the kernel loaded afresh); RAM is
        kept, as a warm reset keeps it.  run() then boots the guest again.
        pyhyve's command follows bhyve instead: a reset ends it with status 0
        (request_reset() is the reset button while run() runs)."""
        if any(vcpu.running for vcpu in self.vcpus):
            raise RuntimeError(f"VM {self.name} is running: reset it after run() returns")
        self._reset_machine()
        self.exit_status, self.exit_detail, self.stopped_by = None, "", ""
        self._reset_cause = None
        self.suspended = False
        self._wake.clear()
        self.stopping = False
        self._stopped.clear()
        self._notify("reset", cause="host")

    def _reset_machine(self) -> None:
        from . import snapshot
        snapshot.reset_kvm(self, self._kvm_power_on)
        self.lower_irq_lines()
        for device in self.devices:
            device.reset(self._device_power_on[device.name])
        for device in self.devices:
            device.resync_irq()
        self.boot.install_tables(self, self.acpi_tables)
        self.boot.start(self)

    def stop(self, status: int, vcpu: VcpuThread | None = None,
             cause: str = "host") -> None:
        """Stop every vCPU; the first status given is the VM's exit status.
        That is one of bhyve's (an ExitStatus), or any other number a test
        device (isa-debug-exit) passes as a plain int, kept as it is: the
        guest chose it, and pyhyve's process exits with it.  CAUSE: who asked
        ("guest" when a vCPU or device acts for the guest)."""
        first = False
        with self._stop_lock:
            if self.exit_status is None:
                first = True
                self.exit_status = status if isinstance(status, ExitStatus) else int(status)
                self.log.debug("stopping: %s%s", describe_status(self.exit_status),
                               f" (vcpu{vcpu.id})" if vcpu else "")
            self.stopping = True
        if first:       # before run() may return: listeners hear it while they listen
            self._notify("stopping", status=self.exit_status, cause=cause)
        for other in self.vcpus:
            if other is not vcpu:
                other.kick()
        self._stopped.set()
        self._wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def pause(self) -> None:
        """vCPUs first, then the devices (lifecycle.Device.pause)."""
        with self._pause_lock:
            was_paused, self.paused = self.paused, True
            for vcpu in self.vcpus:
                vcpu.pause()
            self.coalesced.flush()      # devices pause (and are saved) with every write
            for device in self.devices:
                device.pause()
        if not was_paused:
            self._notify("paused")

    def resume(self) -> None:
        """Devices first, so that no vCPU runs while a device is still paused."""
        with self._pause_lock:
            was_paused, self.paused = self.paused, False
            for device in self.devices:
                device.resume()
            for vcpu in self.vcpus:
                vcpu.resume()
        if was_paused:
            self._notify("resumed")

    def checkpoint(self, path: str, stay_paused: bool = False) -> int:
        """Save a snapshot to `path` with vCPUs and devices paused; afterwards the
        VM runs on if it ran before, unless `stay_paused` (a suspend, which stops
        it next).  Returns the file's size.  snapshot.SnapshotError if it cannot
        be saved; a failed save leaves the VM as it was."""
        from . import snapshot
        # vCPUs of a machine asleep in S3 are stopped, not paused
        was_paused = self.paused or (not self.suspended and
                                     all(vcpu.paused for vcpu in self.vcpus))
        self.pause()
        try:
            size = snapshot.save(self, path)
        except BaseException:
            if not was_paused:
                self.resume()
            raise
        if not stay_paused and not was_paused:
            self.resume()
        return size

    def press_power_button(self) -> None:
        """The ACPI power button: the guest decides, or it wakes a sleeping machine."""
        self._notify("power-button")       # before a wake's own event
        if not self.wakeup("power-button"):
            self.pm.press_power_button()

    def _notify(self, event: str, **details) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, details)
            except Exception:       # a watcher's bug must not stop the machine
                self.log.exception("listener for %s failed", event)

    def _watch_halt(self) -> None:
        """bhyve's VM_SUSPEND_HALT: every active vCPU halted with interrupts off."""
        while not self._stopped.wait(HALT_PROBE_INTERVAL):
            try:
                states = [vcpu.call(VcpuThread.halt_state) for vcpu in self.vcpus]
            except KvmError:
                continue
            if "running" not in states and "halted" in states:
                self.exit_detail = "all vCPUs halted with interrupts disabled"
                self.stop(ExitStatus.HALT, cause="guest")

    def close(self) -> None:
        """Release devices, vCPUs, memory and KVM descriptors."""
        self._closing = True
        for device in reversed(list(self.closables)):     # a bus unplugs as it closes
            device.close()
        self.closables.clear()
        if getattr(self, "coalesced", None) is not None:
            self.coalesced.close()
        for vcpu in self.vcpus:
            vcpu.kvm_vcpu.close()
        self.vcpus.clear()
        if getattr(self, "memory", None) is not None:
            self.memory.close()
        if getattr(self, "kvm_vm", None) is not None:
            self.kvm_vm.close()
        self.kvm.close()

    # --- services for vCPUs and devices ---------------------------------------------
    def set_irq_level(self, irq: int, level: bool, source: str = "platform") -> None:
        """Drive an interrupt line that several sources may share (wired-OR): a PCI
        link routed to the UART's IRQ must not lower it while the UART holds it."""
        with self._irq_lock:
            sources = self._irq_sources.setdefault(irq, set())
            was_high = self._irq_high(irq)
            (sources.add if level else sources.discard)(source)
            self._irq_update(irq, was_high)

    def lower_irq_lines(self) -> None:
        """Every wired line low, in KVM and here: after a restore, KVM's irqchip
        holds line levels no source here stands for, and a source raising a line
        KVM already thinks high would give no edge.  Devices then raise again
        what their state asks for (resync_irq)."""
        with self._irq_lock:
            self._irq_sources.clear()
            for gsi in range(IOAPIC_PINS):
                if gsi != CASCADE_IRQ:
                    self.kvm_vm.irq_line(gsi, 0)

    def connect_irq_source(self, irq: int, source: str, connected: bool) -> None:
        """Cut a source off its line, or connect it again (the chipset gating a
        device: the HPET's legacy route takes IRQ 8 from the RTC)."""
        with self._irq_lock:
            was_high = self._irq_high(irq)
            (self._irq_cut_off.discard if connected else self._irq_cut_off.add)((irq, source))
            self._irq_update(irq, was_high)

    def _irq_high(self, irq: int) -> bool:
        return any((irq, source) not in self._irq_cut_off
                   for source in self._irq_sources.get(irq, ()))

    def _irq_update(self, irq: int, was_high: bool) -> None:
        high = self._irq_high(irq)
        if high != was_high:
            self.kvm_vm.irq_line(irq, int(high))

    def set_hpet_legacy_route(self, taken: bool) -> None:
        """The HPET's legacy replacement route takes IRQ 0 from the PIT (which KVM
        emulates: its HPET_LEGACY flag silences channel 0) and IRQ 8 from the RTC."""
        pit = self.kvm_vm.get_pit2()
        pit.flags = (pit.flags & ~abi.KVM_PIT_FLAGS_HPET_LEGACY) | \
            (abi.KVM_PIT_FLAGS_HPET_LEGACY if taken else 0)
        self.kvm_vm.set_pit2(pit)
        self.connect_irq_source(RTC_IRQ, "rtc", not taken)

    def signal_msi(self, address: int, data: int) -> None:
        """Raise an MSI (through its irqfd, see gsiroutes)."""
        self.gsi_routes.signal(address, data)

    def warn_once(self, key, message: str, *args) -> None:
        """Log a guest-caused problem the first time it happens."""
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning(message, *args)

    def fatal(self, detail: str, more: str = "") -> None:
        """Why the VM stops with an error, as bhyve says it: one line on stderr
        (then `more`, a vCPU's registers), printed here and only here; kept in
        exit_detail for whoever runs the VM.  Logged too where logging is set
        up, for a log file, marked "printed": the pyhyve command's stderr
        handler leaves it out (and without handlers, logging's last resort
        would print it a second time)."""
        self.exit_detail = detail
        print(f"pyhyve: {detail}" + (f"\n{more}" if more else ""), file=sys.stderr)
        if self.log.hasHandlers():
            self.log.error("%s", detail, extra={"printed": True})

    def device_failed(self, name: str, addr: int) -> None:
        if name not in self._warned:
            self._warned.add(name)
            self.log.exception("device %s failed on access at %#x; access ignored", name, addr)

    def unclaimed_io(self, kind: str, addr: int, size: int, is_write: bool,
                     page, offset: int, count: int) -> ExitStatus | None:
        """An access nobody claims: all ones and dropped writes, or, for ports under
        -e (bhyve's x86.strictio), stop the VM."""
        self.unclaimed_accesses += 1
        if self.strict_io and kind == "port":
            self.fatal(f"unhandled {kind} {'write' if is_write else 'read'} "
                       f"at {addr:#x} (size {size})")
            return ExitStatus.ERROR
        if not is_write and 0 <= offset and offset + size * count <= len(page):
            page[offset:offset + size * count] = b"\xff" * (size * count)
        return None

    def unknown_msr(self, vcpu: VcpuThread, index: int, value: int | None) -> int:
        """An MSR KVM does not know: #GP (x86.strictmsr, the default) or ignore (-w)."""
        access = "read" if value is None else f"write {value:#x}"
        self.warn_once(("msr", index), "vcpu%d: unknown MSR %#x (%s)%s", vcpu.id, index,
                       access, ": #GP" if self.strict_msr else ": ignored")
        return 1 if self.strict_msr else 0

    def debug_exit(self, vcpu: VcpuThread) -> ExitStatus | None:
        """A KVM_EXIT_DEBUG: only the GDB stub asks for those."""
        if self.gdb is not None:
            self.gdb.debug_exit(vcpu)
        return None

    def exit_stats(self) -> list[dict[str, int]]:
        """Exit counters by reason name, one dict per vCPU."""
        return [{abi.EXIT_REASON_NAMES.get(reason, str(reason)): count
                 for reason, count in enumerate(vcpu.exit_counts) if count}
                for vcpu in self.vcpus]
