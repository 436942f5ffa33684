"""Turning a config into a machine: the platform devices, fw_cfg and the PCI
functions a VirtualMachine gets, and the settings read on the way (CPU
topology, UUID).  The machine (vm.py) owns KVM, memory, buses, vCPUs and the
device list; what goes into them, and in which order, is decided here.
"""

import functools
import os
import re
import socket

try:    # CPython's own MD5, built in: hashlib would load OpenSSL, milliseconds of every start
    from _md5 import md5 as _md5
except ImportError:
    from hashlib import md5 as _md5

from . import cpuid
from .config import Config, ConfigError, format_cpus, parse_cpuset, parse_size
from .devices.debugcon import DebugConsole
from .devices.debugexit import (DEFAULT_IOBASE as DEBUG_EXIT_IOBASE,
                                DEFAULT_IOSIZE as DEBUG_EXIT_IOSIZE, DebugExit)
from .devices.fwcfg import FwCfg, e820_table, parse_fw_cfg_option
from .devices.hpet import Hpet
from .devices.i8042 import I8042
from .devices.pctestdev import PC_TESTDEV_DEBUG_EXIT, PcTestdev
from .devices.pm import PowerManagement
from .devices.rtc import Rtc
from .devices.syscontrol import PostCodes, ResetControl, SystemControlPortA
from .devices.uart import COM_PORTS, Uart16550
from .pci import find_emulation
from .vcpu import ExitStatus

MAX_VCPUS = 255
NAMESPACE_DNS = bytes.fromhex("6ba7b8109dad11d180b400c04fd430c8")   # RFC 4122's


def add_platform_devices(vm, consoles: dict) -> None:
    """The legacy devices bhyve's lpc owns: PM, RTC, keyboard controller,
    reset and POST ports, UARTs, fw_cfg and the debug port."""
    context = vm.context
    vm.pm = vm.add_device(PowerManagement(context))
    vm.rtc = vm.add_device(Rtc(context, vm.memory.lowmem_size, vm.memory.highmem_size,
                               use_utc=not vm.config.get_bool("rtc.use_localtime", True),
                               cpus=vm.topology.cpus))
    vm.i8042 = vm.add_device(I8042(context))
    vm.hpet = vm.add_device(Hpet(context, vm.set_hpet_legacy_route))
    vm.add_device(SystemControlPortA(context))
    vm.add_device(ResetControl(context))
    vm.add_device(PostCodes(context))
    file_limit = parse_size(vm.config.get("console.file_limit", "128M"), "console.file_limit")
    debugcon_path = vm.config.get("lpc.debugcon.path")
    if debugcon_path is not None:
        vm.add_device(DebugConsole(context, debugcon_path,
                                   vm.config.get_bool("lpc.debugcon.append"), file_limit))
    unknown = sorted(set(consoles) - set(COM_PORTS))
    if unknown:
        raise ConfigError(f"no COM port named {unknown[0]} (com1 to com4)")
    vm.uarts = {}
    for name, (port, irq) in COM_PORTS.items():
        spec = vm.config.get(f"lpc.{name}.path")
        backend = consoles.pop(name, None)
        if spec is not None and backend is not None:
            raise ConfigError(f"{name} is given twice: lpc.{name}.path and a console object")
        if spec is not None:
            from .devices.chardev import open_backend
            backend = open_backend(spec, name, file_limit)
        if backend is not None:
            vm.uarts[name] = vm.add_device(Uart16550(context, name, port, irq, backend))
    vm.fwcfg = vm.add_device(build_fwcfg(vm))


def add_test_devices(vm) -> None:
    """QEMU's and bhyve's devices for test guests (kvm-unit-tests): pc-testdev
    and isa-debug-exit.  Built last, so that a port a user gives them that
    another device holds is an error naming both, not a clash for the other."""
    config = vm.config
    debug_exit = "lpc.isa-debug-exit.iobase" in config or "lpc.isa-debug-exit.iosize" in config
    if config.get_bool("lpc.pc-testdev"):
        vm.add_device(PcTestdev(vm.context))
        if not debug_exit:
            # bhyve's pc-testdev brings one at kvm-unit-tests' ports
            vm.add_device(DebugExit(vm.context, PC_TESTDEV_DEBUG_EXIT, 4))
    if debug_exit:
        iobase = config.get_int("lpc.isa-debug-exit.iobase", DEBUG_EXIT_IOBASE, 0, 0xFFFF)
        iosize = config.get_int("lpc.isa-debug-exit.iosize", DEBUG_EXIT_IOSIZE, 1,
                                0x10000 - iobase)
        vm.add_device(DebugExit(vm.context, iobase, iosize))


def configure_consoles(vm) -> None:
    """Arm the escape (vm.console_escape: console.escape, `~` by default) of
    every stdio console: `~.` at the start of a line powers the VM off, as
    pyhyvectl --force-poweroff does, and says so in vm.stopped_by."""
    from .escape import describe
    escape = vm.console_escape
    for name, _, backend in vm.consoles():
        set_escape = getattr(backend, "set_escape", None)
        if set_escape is not None:
            reason = f"{name}: {describe(escape)}." if escape else name
            set_escape(escape, functools.partial(_console_quit, vm, reason))


def _console_quit(vm, reason: str) -> None:
    if not vm.stopping:
        vm.stopped_by = reason
    vm.stop(ExitStatus.POWEROFF, cause="console")


def build_fwcfg(vm) -> FwCfg:
    flavour = vm.config.get("lpc.fwcfg", "qemu")
    if flavour != "qemu":
        raise ConfigError(f"fw_cfg flavour '{flavour}' is not supported: use -l fwcfg,qemu")
    fwcfg = FwCfg(vm.context, cpus=vm.topology.cpus, uuid=vm.uuid)
    fwcfg.add_file("etc/e820", e820_table(vm.e820(firmware=True)))
    # As QEMU's default -boot reboot-timeout=-1: no retry after a failed boot.
    fwcfg.add_file("etc/boot-fail-wait", (0xFFFFFFFF).to_bytes(4, "little"))
    if "com1" in vm.uarts:
        # SeaBIOS prints on the serial console only when told where it is.
        fwcfg.add_file("etc/sercon-port", COM_PORTS["com1"][0].to_bytes(2, "little"))
    for key, value in sorted(vm.config.subtree("fwcfg.file").items()):
        name, data = parse_fw_cfg_option(value)
        fwcfg.add_file(name, data)
    return fwcfg


def pci_slots(config: Config) -> dict[tuple[int, int], str]:
    """(slot, function) -> emulation name, from the pci.0.SLOT.FUNC.device keys,
    with the chipset bhyve users write as `-s 0,hostbridge -s 31,lpc` where the
    config lacks it; a slot that is not a number is an error."""
    slots = {}
    for key, name in config.subtree("pci.0").items():
        parts = key.split(".")
        if len(parts) == 3 and parts[2] == "device":
            if not (parts[0].isdigit() and parts[1].isdigit()):
                raise ConfigError(f"pci.0.{key}: '{parts[0]}.{parts[1]}' is not a "
                                  "SLOT.FUNCTION pair of numbers")
            slots[int(parts[0]), int(parts[1])] = name
    names = set(slots.values())
    if not names & {"hostbridge", "amd_hostbridge"} and (0, 0) not in slots:
        slots[0, 0] = "hostbridge"
    if "lpc" not in names and (31, 0) not in slots:
        slots[31, 0] = "lpc"
    return slots


def add_pci_devices(vm) -> None:
    """Instantiate every PCI function pci_slots() names."""
    slots = pci_slots(vm.config)
    for (slot, func), name in sorted(slots.items()):
        cls = find_emulation(name)
        if cls is None:
            raise ConfigError(f"unknown PCI emulation '{name}' (pyhyve -s help lists them)")
        options = {k: v for k, v in vm.config.subtree(f"pci.0.{slot}.{func}").items()
                   if k != "device"}
        vm.pci.add(slot, func, cls, options)


def vm_name(config: Config) -> str:
    """The VM's name: printable text, since it names threads, logs, the
    control socket and the default UUID."""
    name = config.get("name") or "vm"
    try:
        name.encode()
    except UnicodeEncodeError:
        raise ConfigError("the VM name is not UTF-8 text") from None
    if not name.isprintable():
        raise ConfigError(f"the VM name {name!r} has characters that are not printable")
    return name


def topology(config: Config) -> cpuid.Topology:
    cpus = config.get_int("cpus", 1, 1, MAX_VCPUS)
    sockets = config.get_int("sockets", 0, 0, MAX_VCPUS)
    cores = config.get_int("cores", 0, 0, MAX_VCPUS)
    threads = config.get_int("threads", 0, 0, MAX_VCPUS)
    if not (sockets or cores or threads):
        return cpuid.Topology(sockets=cpus)
    topology = cpuid.Topology(sockets or 1, cores or 1, threads or 1)
    if "cpus" in config and topology.cpus != cpus:
        raise ConfigError(f"cpus={cpus} does not match sockets*cores*threads="
                          f"{topology.cpus}")
    return topology


def vm_uuid(config: Config, name: str) -> bytes:
    """-U, or as bhyve does, a stable UUID from the host and VM names (RFC 4122
    version 3); its 16 bytes as fw_cfg hands them to firmware.  (The uuid module
    would do, but costs milliseconds of start-up.)"""
    text = config.get("uuid")
    if text is None:
        name_bytes = f"{socket.gethostname()}{name}".encode()
        digest = bytearray(_md5(NAMESPACE_DNS + name_bytes).digest())
        digest[6] = digest[6] & 0x0F | 0x30        # version 3
        digest[8] = digest[8] & 0x3F | 0x80        # RFC 4122 variant
        return bytes(digest)
    digits = text.removeprefix("urn:uuid:").strip("{}").replace("-", "")
    if len(digits) != 32 or not set(digits) <= set("0123456789abcdefABCDEF"):
        raise ConfigError(f"invalid UUID '{text}'")
    return bytes.fromhex(digits)


def vcpu_cpusets(config: Config, cpus: int) -> dict[int, frozenset[int]]:
    """vCPU -> the host CPUs its thread is pinned to (vcpu.N.cpuset, bhyve's -p):
    a vCPU the VM does not have, or a host CPU this process may not run on, is an
    error before anything runs."""
    allowed = os.sched_getaffinity(0)
    pinned = {}
    for key, value in config.subtree("vcpu").items():
        index, _, leaf = key.partition(".")
        if leaf != "cpuset" or not re.fullmatch(r"[0-9]+", index):
            continue                    # an unknown key, which the VM warns of
        name = f"vcpu.{index}.cpuset"
        if int(index) >= cpus:
            raise ConfigError(f"{name}: no vCPU {index}: the VM has vCPUs 0 to {cpus - 1} "
                              "(-p VCPU:HOSTCPU)")
        wanted = parse_cpuset(name, value)
        outside = sorted(wanted - allowed)
        if outside:
            raise ConfigError(f"{name}: host CPU {outside[0]} is not one pyhyve may run on "
                              f"(it may use {format_cpus(allowed)})")
        pinned[int(index)] = frozenset(wanted)
    return pinned
