"""The `pyhyve` command: bhyve's command line, filling bhyve's config tree."""

import logging
import os
import signal
import sys

from .config import Config, ConfigError, parse_size, write_user_file
from .ctl import ControlServer, default_socket_path
from .kvm import KvmError, KvmUnavailable
from .sandbox import confine
from .vcpu import ExitStatus

USAGE = """\
usage: pyhyve [-ADeHhPSuwxY] [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]
              [-f name,string=TEXT|file=PATH] [-G [w][address:]port] [-k config_file]
              [-l lpcdev[,conf]]
              [-m memsize[K|M|G|T]] [-o var=value] [-s pci] [-U uuid] vmname

Virtual machine:
  -c cpus        vCPUs and topology, bhyve syntax (cpus=N,sockets=S,cores=C,threads=T)
  -m memsize     guest memory, with a K, M, G or T suffix (default 256M)
  -S             wire guest memory (mlock)
  -U uuid        the VM's UUID (fw_cfg); default: derived from host and VM names
  -D             destroy the VM on power-off (always so: a KVM VM ends with its process)
Devices:
  -s [bus:]slot[:func],emulation[,conf]  a PCI device (pyhyve -s help lists emulations);
                 a hostbridge at 0:0 and an lpc bridge at 31:0 are added unless given
  -l bootrom,FILE          firmware mapped to end at 4 GiB; the BSP starts at its reset vector
  -l com1,stdio|file=PATH|unix=PATH|tcp=HOST:PORT   a serial port (com1 to com4)
  -l debugcon,file=PATH    port 0x402 debug console (SeaBIOS's log) written to PATH
  -l fwcfg,qemu            QEMU's fw_cfg interface (present by default)
  -f name,string=TEXT|file=PATH   add a file to fw_cfg (names start with opt/)
Direct kernel boot (no firmware):
  -f kexec,KERNEL[,INITRD[,"CMDLINE"]]   a bzImage (64-bit boot protocol) or a PVH ELF kernel
  -Y              no MP table for a directly booted kernel (x86.mptable=false)
  -A              ACPI tables (the default: for firmware through fw_cfg, for a kernel in
                  the BIOS area; -o acpi_tables=false leaves them out)
Configuration:
  -k config_file  read bhyve_config(5) key=value lines
  -o var=value    set a config key (e.g. -o memory.size=1G; -o help lists them all);
                  -o config.dump=1 prints the tree;
                  -o control.socket=PATH moves the pyhyvectl socket (default /run/pyhyve/NAME.sock);
                  -o qmp.socket=PATH serves QMP (QEMU's monitor protocol) on a unix socket;
                  -o pidfile=PATH writes the process's PID there once the VM is set up
Least privilege (applied once devices, disks and sockets are open, before the guest runs):
  -o process.user=NAME      run the VM as user NAME (name or uid), with its groups
  -o process.seccomp=BOOL   refuse system calls the running VM does not need (default true;
                            needs libseccomp2)
x86:
  -e              exit on unemulated I/O (x86.strictio); default: reads return all ones
  -H              yield the host CPU when the guest halts (always so with KVM's LAPIC)
  -P              exit on PAUSE (KVM handles PAUSE loops in the kernel)
  -w              ignore accesses to unknown MSRs (default: #GP, x86.strictmsr)
  -x              offer x2APIC mode to the guest (x86.x2apic)
Clock:
  -u              the RTC keeps UTC (default: local time)
Debugging:
  -G [w][addr:]port  GDB stub on TCP (default address 127.0.0.1); w: wait for gdb before the BSP runs
Other:
  -h, --help      this help; --version: pyhyve's version
  -r file         restore a VM saved by pyhyvectl --suspend/--checkpoint; give
                  the VM's own options too (a snapshot carries state, not them);
                  one of another machine, or one pyhyve cannot read, is refused
                  with exit status 4

Exit status (as bhyve): 0 reset, 1 powered off, 2 halted, 3 triple fault, 4 error."""

SHORT_OPTIONS = "Ac:Def:G:Hhk:l:m:o:Pr:s:SU:uwxY"   # getopt(3)'s: a colon follows a valued letter


def getopt(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """bhyve's getopt(3) over SHORT_OPTIONS: letters may be grouped (-eH), a value
    follows its letter (-m1G) or is the next word, and options end at `--` or at
    the first word that is not one.  Returns ([(option, value)], the other words).
    (Python's getopt module would do, but imports gettext: start-up time.)"""
    options, words = [], list(argv)
    while words and words[0].startswith("-") and words[0] != "-":
        word = words.pop(0)
        if word == "--":
            break
        if word.startswith("--"):
            raise ConfigError(f"option {word.partition('=')[0]} not recognized "
                              "(pyhyve -h for help)")
        letters = word[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            at = SHORT_OPTIONS.find(letter)
            if letter == ":" or at < 0:
                raise ConfigError(f"option -{letter} not recognized (pyhyve -h for help)")
            if SHORT_OPTIONS[at + 1:at + 2] != ":":
                options.append((f"-{letter}", ""))
                continue
            if not letters:
                if not words:
                    raise ConfigError(f"option -{letter} requires argument "
                                      "(pyhyve -h for help)")
                letters = words.pop(0)
            options.append((f"-{letter}", letters))
            letters = ""
    return options, words


def parse_cpus(config: Config, text: str) -> None:
    """-c [[cpus=]N][,sockets=S][,cores=C][,threads=T]"""
    for index, part in enumerate(text.split(",")):
        key, sep, value = part.partition("=")
        if not sep and index == 0:
            key, value = "cpus", part
        if key not in ("cpus", "sockets", "cores", "threads") or not value.isdigit():
            raise ConfigError(f"invalid -c '{text}': expected "
                              "[cpus=]N[,sockets=S][,cores=C][,threads=T]")
        config.set(key, value)


LPC_DEVICES = {
    "bootrom": "bootrom,FILE: firmware image mapped to end at 4 GiB",
    "com1": "com1,stdio|file=PATH|unix=PATH|tcp=HOST:PORT: 16550A UART at 0x3f8, IRQ 4",
    "com2": "com2,...: UART at 0x2f8, IRQ 3",
    "com3": "com3,...: UART at 0x3e8, IRQ 4",
    "com4": "com4,...: UART at 0x2e8, IRQ 3",
    "debugcon": "debugcon,file=PATH: port 0x402 debug console (SeaBIOS's log)",
    "fwcfg": "fwcfg,qemu: QEMU's fw_cfg interface (the default)",
}


def parse_lpc(config: Config, text: str) -> None:
    """-l DEVICE[,CONF], bhyve's LPC devices (and pyhyve's debugcon)."""
    device, _, options = text.partition(",")
    if device == "help":
        print("\n".join(LPC_DEVICES.values()))
        raise SystemExit(0)
    if device not in LPC_DEVICES:
        raise ConfigError(f"unknown LPC device '{device}' (pyhyve -l help lists them)")
    if not options:
        raise ConfigError(f"-l {device} needs a setting: -l {LPC_DEVICES[device].split(':')[0]}")
    if device == "bootrom":
        config.set("lpc.bootrom", options.split(",")[0])
    elif device == "debugcon":
        key, sep, path = options.partition("=")
        if key != "file" or not path:
            raise ConfigError("-l debugcon needs a file: -l debugcon,file=PATH")
        config.set("lpc.debugcon.path", path)
    elif device == "fwcfg":
        config.set("lpc.fwcfg", options)
    else:
        config.set(f"lpc.{device}.path", options)


def parse_pci(config: Config, text: str) -> None:
    """-s [bus:]slot[:func],emulation[,options]: fills pci.BUS.SLOT.FUNC.*"""
    if text == "help":
        from .pci import describe, emulations
        from .pci.options import describe as describe_options
        for name, cls in emulations().items():
            print(f"{name:16} {describe(cls)}")
            for line in describe_options(cls.options):
                print(f"{'':18}{line}")
        raise SystemExit(0)
    location, _, rest = text.partition(",")
    name, _, options = rest.partition(",")
    numbers = location.split(":")
    if not name or not 1 <= len(numbers) <= 3 or not all(n.isdigit() for n in numbers):
        raise ConfigError(f"invalid -s '{text}': expected [bus:]slot[:func],emulation[,options]")
    values = [int(n) for n in numbers]
    bus, slot, func = {1: lambda: (0, values[0], 0), 2: lambda: (0, values[0], values[1]),
                       3: lambda: tuple(values)}[len(values)]()
    if bus != 0:
        raise ConfigError(f"-s '{text}': only PCI bus 0 exists")
    if slot > 31 or func > 7:
        raise ConfigError(f"-s '{text}': slots are 0-31 and functions 0-7")
    prefix = f"pci.{bus}.{slot}.{func}"
    if f"{prefix}.device" in config:
        raise ConfigError(f"-s '{text}': slot {slot}:{func} is already in use")
    from .pci import find_emulation
    cls = find_emulation(name)
    if cls is None:
        raise ConfigError(f"unknown PCI emulation '{name}' (pyhyve -s help lists them)")
    config.set(f"{prefix}.device", name)
    for key, value in cls.legacy_options(options).items():
        config.set(f"{prefix}.{key}", value)


def parse_fwcfg_file(config: Config, text: str) -> None:
    """-f name,string=TEXT|file=PATH: a file for fw_cfg (read and checked when
    the VM is built, as those from -k are); or
    -f kexec,KERNEL[,INITRD[,"CMDLINE"]], the direct kernel boot of xhyve."""
    if text.startswith("kexec,"):
        parts = text.split(",", 3)[1:]
        if not parts[0]:
            raise ConfigError('-f kexec needs a kernel: -f kexec,KERNEL[,INITRD[,"CMDLINE"]]')
        config.set("kexec.kernel", parts[0])
        if len(parts) > 1 and parts[1]:
            config.set("kexec.initrd", parts[1])
        if len(parts) > 2:
            config.set("kexec.cmdline", parts[2].strip('"'))
        return
    index = len(config.subtree("fwcfg.file"))
    config.set(f"fwcfg.file.{index}", text)


# bhyve's options that set one config key
FLAG_KEYS = {
    "-e": ("x86.strictio", "true"),
    "-w": ("x86.strictmsr", "false"),
    "-u": ("rtc.use_localtime", "false"),
    "-D": ("destroy_on_poweroff", "true"),
    "-S": ("memory.wired", "true"),
    "-x": ("x86.x2apic", "true"),
    "-H": ("x86.vmexit_on_hlt", "true"),
    "-P": ("x86.vmexit_on_pause", "true"),
    "-Y": ("x86.mptable", "false"),
    "-A": ("acpi_tables", "true"),
}
VALUE_KEYS = {"-m": "memory.size", "-U": "uuid"}


def parse_args(argv: list[str]) -> Config | None:
    """The config tree the command line describes; None when only help was asked."""
    if "--help" in argv:
        print(USAGE)
        return None
    if "--version" in argv:
        from . import __version__
        print(f"pyhyve {__version__}")
        return None
    options, rest = getopt(argv)
    config = Config()
    for option, value in options:
        if option == "-h":
            print(USAGE)
            return None
        if option in FLAG_KEYS:
            config.set(*FLAG_KEYS[option])
        elif option in VALUE_KEYS:
            config.set(VALUE_KEYS[option], value)
        elif option == "-c":
            parse_cpus(config, value)
        elif option == "-k":
            config.load_file(value)
        elif option == "-l":
            parse_lpc(config, value)
        elif option == "-s":
            parse_pci(config, value)
        elif option == "-f":
            parse_fwcfg_file(config, value)
        elif option == "-G":
            from .gdbstub import parse_gdb_option
            wait, address, port = parse_gdb_option(value)
            config.set("gdb.port", str(port))
            config.set("gdb.address", address)
            config.set("gdb.wait", "true" if wait else "false")
        elif option == "-r":
            config.set("restore.path", value)
        elif option == "-o":
            if value == "help":
                from .configkeys import describe
                print(describe())
                return None
            key, sep, setting = value.partition("=")
            if not sep:
                raise ConfigError(f"invalid -o '{value}': expected var=value")
            config.set(key, setting)
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments after the VM name: {' '.join(rest[1:])}")
    if rest:
        config.set("name", rest[0])
    if not config.get("name") and not config.get_bool("config.dump") \
            and "restore.path" not in config:
        raise ConfigError("no VM name given (pyhyve -h for help)")
    return config


STOP_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(Exception):
    """A stop signal arrived while the VM was being set up."""


def _interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """SIGINT, SIGHUP and SIGQUIT end pyhyve the same way at any point: while
    setting up, what was opened is closed; once the guest runs, the VM stops
    (as a power-off) and its sockets and files are cleaned up; one line says so."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupted)
    try:
        return _main(argv)
    except Interrupted as exc:
        print(f"pyhyve: {exc} while setting up; stopped", file=sys.stderr)
        return ExitStatus.ERROR


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING,
                        format="pyhyve: %(name)s: %(levelname)s: %(message)s")
    from .vm import VirtualMachine
    try:
        try:
            config = parse_args(sys.argv[1:] if argv is None else argv)
        finally:
            sys.stdout.flush()      # help text: a reader that is gone shows here
        if config is None:
            return 0
        snap = None
        if "restore.path" in config:
            config, snap = _restore_config(config)
        if config.get_bool("config.dump"):
            print(config.dump())
            return 0
        vm = VirtualMachine(config)
    except (ConfigError, KvmUnavailable, KvmError) as exc:
        print(f"pyhyve: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    except BrokenPipeError:         # help piped into `head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    stopped_by = _handle_signals(vm)    # from here a stop signal stops the VM, run or not
    if snap is not None:
        from .snapshot import SnapshotError, restore_into
        try:
            restore_into(vm, snap)
        except (SnapshotError, KvmError) as exc:
            vm.close()
            print(f"pyhyve: cannot restore: {exc}", file=sys.stderr)
            return ExitStatus.ERROR
    try:
        try:
            path = config.get("control.socket") or default_socket_path(vm.name)
            vm.closables.append(ControlServer(vm, path))
            if config.get("qmp.socket"):
                from .qmp import QmpServer
                vm.closables.append(QmpServer(vm, config.get("qmp.socket")))
            pidfile = config.get("pidfile")
            if pidfile:
                vm.closables.append(PidFile(pidfile))
            confine(config)         # everything needing root is open; no vCPU has run
        except ConfigError as exc:
            print(f"pyhyve: {exc}", file=sys.stderr)
            return ExitStatus.ERROR
        status = vm.run()
        if stopped_by:
            print(f"pyhyve: {stopped_by[0]}: powered off", file=sys.stderr)
        elif status == ExitStatus.ERROR and vm.exit_detail:
            print(f"pyhyve: {vm.exit_detail}", file=sys.stderr)
        return int(status)
    finally:
        vm.close()


def _restore_config(options: Config):
    """-r FILE: the VM is the operator's options (command line and -k), never
    the snapshot's, which carries state and no authority: a crafted file must
    not name host files, sockets or sandbox settings.  The saved options only
    show that the machine is the same one (memory, CPU topology, the PCI
    functions); the devices' names and state are checked when restored.  A
    snapshot that cannot be read is bad user input (ConfigError)."""
    from .snapshot import SnapshotError
    from .snapshot import read as read_snapshot
    path = options.get("restore.path")
    try:
        snap = read_snapshot(path)
    except SnapshotError as exc:
        raise ConfigError(str(exc)) from None
    saved = snap.manifest["config"]
    if not isinstance(saved, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in saved.items()):
        raise ConfigError(f"snapshot {path} is corrupt (config)")
    config = Config()
    for key in options.keys():
        if key != "restore.path":
            config.set(key, options.get(key))
    if not (config.get("lpc.bootrom") or config.get("kexec.kernel")):
        raise ConfigError(f"restoring {path} needs the VM's own options (its bootrom or "
                          "kernel, memory, CPUs, -s devices and their files), as when it "
                          "was started: a snapshot does not supply them")
    _check_same_machine(config, Config(saved), path)
    config.set_default("lpc.debugcon.append", "true")
    return config, snap


def _check_same_machine(config: Config, saved: Config, path: str) -> None:
    from .builder import pci_slots, topology
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
    if differences:
        raise ConfigError(f"snapshot {path} is of another machine: " + "; ".join(differences))


class PidFile:
    """-o pidfile=PATH, as QEMU's -pidfile: the process's PID, written whole
    (a fresh file renamed into place) once the VM is set up, and removed when
    it ends if it still holds this PID."""

    def __init__(self, path: str):
        self.path, self.pid = path, os.getpid()
        try:
            write_user_file(path, [f"{self.pid}\n".encode()], mode=0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        try:
            with open(self.path) as current:
                if current.read().strip() == str(self.pid):
                    os.unlink(self.path)
        except OSError:             # gone already, or not ours to remove after a drop
            pass


def _handle_signals(vm) -> list[str]:
    """While the guest runs.  bhyve: SIGTERM presses the ACPI power button; a
    second one powers off.  SIGINT, SIGHUP, SIGQUIT power off at once; the
    list returned gets their names."""
    presses, stopped_by = [], []

    def on_sigterm(signum, frame):
        presses.append(signum)
        if len(presses) == 1:
            vm.press_power_button()
        else:
            vm.stop(ExitStatus.POWEROFF, cause="signal")

    def on_stop_signal(signum, frame):
        stopped_by.append(signal.Signals(signum).name)
        vm.stop(ExitStatus.POWEROFF, cause="signal")

    signal.signal(signal.SIGTERM, on_sigterm)
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)
    return stopped_by
