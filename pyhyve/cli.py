"""The `pyhyve` command: bhyve's command line, filling bhyve's config tree."""

import gc
# Start-up makes thousands of objects that live as long as the VM (modules,
# classes, functions, devices) and frees almost none: the 26 cyclic
# collections it would trigger free under 200 objects and cost about 6 ms of
# a 50 ms start.  So the collector is off while this module's imports and the
# VM's build run (_run), and what they made is then frozen (gc.freeze): else
# the first collection after each pause would go through all of it (2 to 3
# ms).  _run thaws it all (gc.unfreeze) once its VM is closed, so that a
# program running main() again collects the last VM's cycles; the command
# itself (command()) freezes it again, as its process ends.
gc.disable()

import os
import re
import signal
import sys
import threading
import time

from .commandlog import CommandLog
from .config import Config, ConfigError, write_user_file
from .ctl import ControlServer, default_socket_path
from .devices.debugexit import (DEFAULT_IOBASE as DEBUG_EXIT_IOBASE,
                                DEFAULT_IOSIZE as DEBUG_EXIT_IOSIZE)
from .kvm import KvmError, KvmUnavailable
from .sandbox import confine, remove_at_exit
from .vcpu import ExitStatus

gc.freeze()
gc.enable()

USAGE = """\
usage: pyhyve [-ACDeHhPSuvwxY] [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]
              [-f name,string=TEXT|file=PATH] [-G [w][address:]port] [-k config_file]
              [-K layout] [-l lpcdev[,conf]] [-m memsize[K|M|G|T]] [-o var=value]
              [-p vcpu:hostcpu] [-R host:port] [-r file] [-s pci] [-U uuid] vmname
       pyhyve -l help | -s help | -o help | -h | --help | --version
       pyhyve --serve=SOCKET

Virtual machine:
  -c cpus        vCPUs and topology, bhyve syntax (cpus=N,sockets=S,cores=C,threads=T)
  -m memsize     guest memory, with a K, M, G or T suffix (default 256M)
  -p vcpu:hostcpu  pin vCPU vcpu's thread to host CPU hostcpu (repeatable: several
                 -p for one vCPU give it several host CPUs; vcpu.N.cpuset)
  -S             wire guest memory (mlock)
  -C             include guest memory in core dumps (default: left out, MADV_DONTDUMP)
  -U uuid        the VM's UUID (fw_cfg); default: derived from host and VM names
  -D             destroy the VM on power-off: accepted; a KVM VM is always destroyed
                 when its process exits, which pyhyve does at every power-off
Devices:
  -s [bus:]slot[:func],emulation[,conf]  a PCI device (pyhyve -s help lists emulations
                 and their options); a hostbridge at 0:0 and an lpc bridge at 31:0 are
                 added unless given
  -l bootrom,FILE[,VARS]   firmware mapped to end at 4 GiB; the BSP starts at its reset vector;
                           VARS: a variable file mapped below it, kept across runs (UEFI)
  -l com1,stdio|pty[,link=PATH]|file=PATH|unix=PATH|tcp=HOST:PORT
                           a serial port (com1 to com4); pty: a pseudo-terminal whose
                           path pyhyve prints (com1: /dev/pts/N) for cu -l, screen or
                           pyhyvectl --console; link=PATH: a symbolic link to it
  -l debugcon,file=PATH    port 0x402 debug console (SeaBIOS's log) written to PATH
  -l fwcfg,qemu            QEMU's fw_cfg interface (present by default)
  -l isa-debug-exit[,iobase=N][,iosize=N]   a test device: a write of V to its ports
                           ends pyhyve with status (V << 1) | 1 (default ports 0x501+2)
  -l pc-testdev            QEMU's and bhyve's test device for kvm-unit-tests (scratch
                           ports 0xe0, IRQ lines 0x2000, memory 0xff000000; with an
                           isa-debug-exit at 0xf4+4 unless one is given)
  -f name,string=TEXT|file=PATH   add a file to fw_cfg (names start with opt/)
  -K layout      keyboard layout of the VNC console (-s N,fbuf): us_unix, the US
                 layout, only (others exit with status 4)
Kernel boot:
  -f kexec,KERNEL[,INITRD[,"CMDLINE"]]   boot a kernel: a bzImage (at its 64-bit entry, else
                  through its 16-bit setup code), a PVH ELF kernel, or a multiboot kernel
                  (ELF or a.out kludge), whose INITRD lists modules: "mod1 args,mod2 args"
                  (,, for a comma; quote CMDLINE then).  With -l bootrom as well, the
                  firmware boots it (a bzImage or multiboot kernel) through QEMU's option
                  ROM from fw_cfg, as QEMU's -kernel does (-o kexec.romdir=DIR: where
                  linuxboot_dma.bin and multiboot_dma.bin are; default /usr/share/qemu)
  -Y              no MP table for a directly booted kernel (x86.mptable=false)
  -A              generate ACPI tables: accepted, pyhyve always does (for firmware
                  through fw_cfg, for a kernel in the BIOS area; -o acpi_tables=false
                  leaves them out)
Configuration:
  -k config_file  read bhyve_config(5) key=value lines
  -o var=value    set a config key (e.g. -o memory.size=1G; -o help lists them all);
                  -o config.dump=1 prints the tree;
                  -o control.socket=PATH moves the pyhyvectl socket (default /run/pyhyve/NAME.sock);
                  -o qmp.socket=PATH serves QMP (QEMU's monitor protocol) on a unix socket;
                  -o pidfile=PATH writes the process's PID there once the VM is set up;
                  -o poweroff.grace=SECONDS powers off that long after a SIGTERM the guest ignored
                  -o console.escape=CHAR sets the stdio console's escape (default ~,
                  ^X for a control key, none: off)
Console escapes (stdio, at the start of a line; Ctrl-C goes to the guest):
  ~.  power off the VM (as pyhyvectl --force-poweroff: exit status 1)
  ~?  list the escapes          ~~  send one ~ to the guest
Logging (lines start with the date and time, to the millisecond):
  -v              log what pyhyve does (logging.level=info); -vv: debug
  -o logging.level=debug|info|warning|error   (default warning)
  -o logging.file=PATH      append the log to PATH instead of stderr (opened before
                            privileges are dropped); errors still go to stderr
Least privilege (applied once devices, disks and sockets are open, before the guest runs):
  -o process.user=NAME      run the VM as user NAME (name or uid), with its groups
  -o process.seccomp=BOOL   refuse system calls the running VM does not need (default true;
                            needs libseccomp2)
  -o process.landlock=BOOL  open files by name only to read Python's own, write snapshots
                            and remove sockets at exit (default true; Linux 5.13 or later)
  -o snapshot.dir=DIR       where pyhyvectl --checkpoint/--suspend may write snapshots
x86:
  -e              exit on unemulated I/O (x86.strictio); default: reads return all ones
  -H              yield the host CPU when the guest halts: accepted, always so (KVM's
                  in-kernel LAPIC)
  -P              exit on PAUSE: accepted, KVM's pause-loop exiting (PLE) already
                  takes a vCPU spinning on PAUSE off its host CPU
  -w              ignore accesses to unknown MSRs (default: #GP, x86.strictmsr)
  -x              offer x2APIC mode to the guest (x86.x2apic)
Clock:
  -u              the RTC keeps UTC (default: local time)
Debugging:
  -G [w][addr:]port  GDB stub on TCP (default address 127.0.0.1); w: wait for gdb before the BSP runs
Other:
  -h, --help      this help; --version: pyhyve's version
  --serve=SOCKET  a fork server: import pyhyve once, then start each VM a client asks for
                  on the unix socket SOCKET (pyhyve.forkserver.start) as its own process,
                  without an interpreter's start-up
  -r file         restore a VM saved by pyhyvectl --suspend/--checkpoint; give
                  the VM's own options too (a snapshot carries state, not them);
                  one of another machine, or one pyhyve cannot read, is refused
                  with exit status 4
  -R host:port    receive a VM by live migration (pyhyvectl --migrate on its source),
                  listening on host:port (port 0: a free one, printed); give the VM's
                  own options as for -r, and -o migration.key=PATH, the source's key
Live migration:
  -o migration.key=PATH     a secret (16 bytes or more, mode 0600) both ends must hold;
                            on a source it also lets the VM open TCP connections
  -o migration.downtime=MS  the pause to aim for (default 300)
  -o migration.bandwidth=N  bytes a second at most (K, M, G suffixes; default unlimited)

Exit status (as bhyve): 0 reset, 1 powered off, 2 halted, 3 triple fault, 4 error
(a bad option or config value among them, said in one line on stderr); with
isa-debug-exit, also whatever odd status the guest chose."""

# getopt(3)'s: a colon follows a letter that takes a value
SHORT_OPTIONS = "ACc:Def:G:Hhk:K:l:m:o:Pp:R:r:s:SU:uvwxY"


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
    "bootrom": "bootrom,FILE[,VARS]: firmware image mapped to end at 4 GiB, and its "
               "variable file below it",
    "com1": "com1,stdio|pty[,link=PATH]|file=PATH|unix=PATH|tcp=HOST:PORT: 16550A UART at "
            "0x3f8, IRQ 4",
    "com2": "com2,...: UART at 0x2f8, IRQ 3",
    "com3": "com3,...: UART at 0x3e8, IRQ 4",
    "com4": "com4,...: UART at 0x2e8, IRQ 3",
    "debugcon": "debugcon,file=PATH: port 0x402 debug console (SeaBIOS's log)",
    "fwcfg": "fwcfg,qemu: QEMU's fw_cfg interface (the default)",
    "isa-debug-exit": "isa-debug-exit[,iobase=N][,iosize=N]: test device; a write of V "
                      "ends pyhyve with status (V << 1) | 1 (default 0x501, 2 ports)",
    "pc-testdev": "pc-testdev: test device for kvm-unit-tests (with an isa-debug-exit "
                  "at 0xf4)",
}
LPC_OPTIONAL = ("isa-debug-exit", "pc-testdev")     # devices that need no setting
DEBUG_EXIT_OPTIONS = ("iobase", "iosize")


def parse_lpc(config: Config, text: str) -> None:
    """-l DEVICE[,CONF], bhyve's LPC devices (and pyhyve's debugcon)."""
    device, _, options = text.partition(",")
    if device == "help":
        print("\n".join(LPC_DEVICES.values()))
        raise SystemExit(0)
    if device not in LPC_DEVICES:
        raise ConfigError(f"unknown LPC device '{device}' (pyhyve -l help lists them)")
    if not options and device not in LPC_OPTIONAL:
        raise ConfigError(f"-l {device} needs a setting: -l {LPC_DEVICES[device].split(':')[0]}")
    if device == "bootrom":
        rom, _, bootvars = options.partition(",")
        config.set("lpc.bootrom", rom)
        if bootvars:
            config.set("lpc.bootvars", bootvars)
    elif device == "pc-testdev":
        if options:
            raise ConfigError(f"-l pc-testdev takes no settings, not '{options}'")
        config.set("lpc.pc-testdev", "true")
    elif device == "isa-debug-exit":
        parse_debug_exit(config, options)
    elif device == "debugcon":
        key, sep, path = options.partition("=")
        if key != "file" or not path:
            raise ConfigError("-l debugcon needs a file: -l debugcon,file=PATH")
        config.set("lpc.debugcon.path", path)
    elif device == "fwcfg":
        config.set("lpc.fwcfg", options)
    else:
        config.set(f"lpc.{device}.path", options)


def parse_debug_exit(config: Config, options: str) -> None:
    """isa-debug-exit[,iobase=N][,iosize=N]: both keys are set (to QEMU's
    defaults where not given), since they are what puts the device there."""
    values = {"iobase": f"{DEBUG_EXIT_IOBASE:#x}", "iosize": str(DEBUG_EXIT_IOSIZE)}
    for part in filter(None, options.split(",")):
        key, sep, value = part.partition("=")
        if key not in DEBUG_EXIT_OPTIONS or not sep:
            raise ConfigError(f"-l isa-debug-exit: '{part}' is not iobase=N or iosize=N")
        values[key] = value
    for key, value in values.items():
        config.set(f"lpc.isa-debug-exit.{key}", value)


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


def _split_kexec(text: str) -> tuple[str, str, str | None]:
    """KERNEL[,INITRD[,CMDLINE]].  A quoted command line at the end ends the
    INITRD field, which may then hold commas (a multiboot kernel's modules:
    "mod1 args,mod2"); otherwise the fields are split at the first two commas,
    and an unquoted command line keeps any commas of its own."""
    kernel, _, rest = text.partition(",")
    quoted = rest.find(',"')
    if rest.startswith('"') and rest.endswith('"') and len(rest) > 1:
        return kernel, "", rest[1:-1]
    if quoted >= 0 and rest.endswith('"') and len(rest) > quoted + 2:
        return kernel, rest[:quoted], rest[quoted + 2:-1]
    if not rest:
        return kernel, "", None
    initrd, comma, cmdline = rest.partition(",")
    return kernel, initrd, cmdline.strip('"') if comma else None


def parse_fwcfg_file(config: Config, text: str) -> None:
    """-f name,string=TEXT|file=PATH: a file for fw_cfg (read and checked when
    the VM is built, as those from -k are); or
    -f kexec,KERNEL[,INITRD[,"CMDLINE"]], the direct kernel boot of xhyve."""
    if text.startswith("kexec,"):
        kernel, initrd, cmdline = _split_kexec(text[len("kexec,"):])
        if not kernel:
            raise ConfigError('-f kexec needs a kernel: -f kexec,KERNEL[,INITRD[,"CMDLINE"]]')
        config.set("kexec.kernel", kernel)
        if initrd:
            config.set("kexec.initrd", initrd)
        if cmdline is not None:
            config.set("kexec.cmdline", cmdline)
        return
    index = len(config.subtree("fwcfg.file"))
    config.set(f"fwcfg.file.{index}", text)


def parse_pin(config: Config, text: str) -> None:
    """-p vcpu:hostcpu, as bhyve's pincpu_parse: one more host CPU in
    vcpu.N.cpuset (checked against the VM's vCPUs and the host's CPUs when
    the VM is built)."""
    vcpu, sep, cpu = text.partition(":")
    if not (sep and re.fullmatch(r"[0-9]+", vcpu) and re.fullmatch(r"[0-9]+", cpu)):
        raise ConfigError(f"invalid -p '{text}': expected vcpu:hostcpu, such as -p 0:1")
    key = f"vcpu.{int(vcpu)}.cpuset"
    before = config.get(key)
    config.set(key, f"{before},{int(cpu)}" if before else str(int(cpu)))


# bhyve's options that set one config key
FLAG_KEYS = {
    "-C": ("memory.guest_in_core", "true"),
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
VALUE_KEYS = {"-m": "memory.size", "-U": "uuid", "-K": "keyboard.layout",
              "-R": "migration.listen"}
VERBOSITY = ("info", "debug")       # logging.level for -v, -vv


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
    verbosity = 0
    for option, value in options:
        if option == "-h":
            print(USAGE)
            return None
        if option == "-v":
            verbosity += 1
            config.set("logging.level", VERBOSITY[min(verbosity, len(VERBOSITY)) - 1])
        elif option == "-p":
            parse_pin(config, value)
        elif option in FLAG_KEYS:
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
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("--serve"):
        return _serve(argv)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupted)
    try:
        return _main(argv)
    except Interrupted as exc:
        print(f"pyhyve: {exc} while setting up; stopped", file=sys.stderr)
        return ExitStatus.ERROR


def command() -> int:
    """The `pyhyve` command itself (its console script, `python -m pyhyve`):
    main(), then what the run left is frozen out of the collector, since the
    interpreter ends next and its last collection would walk every object of
    the VM just closed (5 to 8 ms of CPU, a sixth of a short VM's whole life)."""
    status = main()
    gc.freeze()
    return status


def _serve(argv: list[str]) -> int:
    from .forkserver import ServeError, serve
    option, _, path = argv[0].partition("=")
    if option != "--serve" or not path or len(argv) > 1:
        print("pyhyve: usage: pyhyve --serve=SOCKET", file=sys.stderr)
        return ExitStatus.ERROR
    try:
        return serve(path)
    except ServeError as exc:
        print(f"pyhyve: {exc}", file=sys.stderr)
        return ExitStatus.ERROR


def _main(argv: list[str] | None) -> int:
    log = CommandLog()
    try:
        return _run(argv, log)
    finally:
        log.close()


def _run(argv: list[str] | None, log: "CommandLog") -> int:
    gc.disable()                    # see the top of this module
    vm = None
    try:
        from .vm import VirtualMachine
        try:
            config = parse_args(sys.argv[1:] if argv is None else argv)
        finally:
            sys.stdout.flush()      # help text: a reader that is gone shows here
        if config is None:
            return 0
        snap = None
        if "restore.path" in config:
            config, snap = _restore_config(config)
        elif "migration.listen" in config:
            _require_own_options(config, "receiving a VM (-R)")
        if config.get_bool("config.dump"):
            print(config.dump())
            return 0
        grace = _grace_seconds(config)
        log.configure(config)       # the log file opens here, before any privilege drop
        vm = VirtualMachine(config)
    except (ConfigError, KvmUnavailable, KvmError) as exc:
        print(f"pyhyve: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    except BrokenPipeError:         # help piped into `head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if vm is not None:
            gc.freeze()
        gc.enable()
    stopped_by = _handle_signals(vm, grace)    # from here a stop signal stops the VM, run or not
    _announce_ptys(vm)
    if snap is not None:
        from .snapshot import SnapshotError, restore_into
        started = time.perf_counter()
        try:
            restore_into(vm, snap)
        except (SnapshotError, KvmError) as exc:
            vm.close()
            print(f"pyhyve: cannot restore: {exc}", file=sys.stderr)
            return ExitStatus.ERROR
        vm.log.info("restored from %s in %.1f ms", snap.path,
                    (time.perf_counter() - started) * 1000)
    last_words = []                 # said once the terminal is out of raw mode
    try:
        try:
            incoming = _migration_setup(vm)
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
            last_words.append(str(exc))
            return ExitStatus.ERROR
        if incoming is not None:
            from .migration import Listener, MigrationError
            try:
                channel = incoming.receive(vm)      # confined: the stream is data
            except MigrationError as exc:
                last_words.append(f"migration failed: {exc}")
                return ExitStatus.ERROR
            finally:
                incoming.close()
            Listener.confirm(vm, channel)
        status = vm.run()           # a fatal exit has said why already (vm.fatal)
        if stopped_by:
            last_words.append(f"{stopped_by[0]}: powered off")
        elif vm.stopped_by:
            last_words.append(f"{vm.stopped_by}: powered off")
        return int(status)
    finally:
        vm.close()
        gc.unfreeze()
        for line in last_words:
            print(f"pyhyve: {line}", file=sys.stderr)


def _migration_setup(vm):
    """What a live migration needs opened before the sandbox: with
    migration.key, the key (and the VM may migrate: vm.migration); with -R,
    the listening socket, returned (a migration.Listener)."""
    listener = None
    if "migration.listen" in vm.config:
        from .migration import Listener
        listener = Listener(vm.config)
        vm.closables.append(listener)
    if vm.config.get("migration.key"):
        from .migration import Migrations
        vm.migration = Migrations(vm)
    return listener


def _announce_ptys(vm) -> None:
    """One line on stderr for each pty console: where to attach (`cu -l PATH`)."""
    for _, _, backend in vm.consoles():
        info = backend.describe()
        if info["kind"] == "pty":
            where = info["path"] + (f" (link {info['link']})" if "link" in info else "")
            # a stdio console may have put the terminal in raw mode already
            end = "\r\n" if sys.stderr.isatty() else "\n"
            sys.stderr.write(f"{backend.name}: {where}{end}")
    sys.stderr.flush()


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
        snap = read_snapshot(path, check_memory=options.get_bool("snapshot.check_memory"))
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
    _require_own_options(config, f"restoring {path}")
    _check_same_machine(config, Config(saved), path)
    config.set_default("lpc.debugcon.append", "true")
    return config, snap


def _require_own_options(config: Config, doing: str) -> None:
    if not (config.get("lpc.bootrom") or config.get("kexec.kernel")):
        raise ConfigError(f"{doing} needs the VM's own options (its bootrom or kernel, "
                          "memory, CPUs, -s devices and their files), as when it was "
                          "started: the saved state does not supply them")


def _check_same_machine(config: Config, saved: Config, path: str) -> None:
    from .snapshot import machine_differences
    differences = machine_differences(config, saved)
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
        remove_at_exit(path)

    def close(self) -> None:
        try:
            with open(self.path) as current:
                if current.read().strip() == str(self.pid):
                    os.unlink(self.path)
        except OSError:             # gone already, or not ours to remove after a drop
            pass


def _grace_seconds(config: Config) -> float | None:
    text = config.get("poweroff.grace")
    if text is None or text == "none":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86400:
        raise ConfigError(f"poweroff.grace: '{text}' is not a number of seconds "
                          "from 0 to 86400 (or none)")
    return seconds


def _handle_signals(vm, grace: float | None) -> list[str]:
    """While the guest runs.  bhyve: SIGTERM presses the ACPI power button; a
    second one powers off.  With `-o poweroff.grace=SECONDS` (as systemd's
    TimeoutStopSec, where a guest that ignores the button, such as firmware,
    would otherwise be killed with SIGKILL and leave its sockets behind), the
    VM also powers off that long after the first.  SIGINT, SIGHUP, SIGQUIT
    power off at once; the list returned gets their names (or why)."""
    presses, stopped_by = [], []

    def after_grace():
        stopped_by.append(f"SIGTERM: the guest did not power off within {grace:g} s")
        vm.stop(ExitStatus.POWEROFF, cause="signal")

    def on_sigterm(signum, frame):
        presses.append(signum)
        if len(presses) == 1:
            vm.press_power_button()
            if grace is not None:
                timer = threading.Timer(grace, after_grace)
                timer.daemon = True
                timer.start()
        else:
            vm.stop(ExitStatus.POWEROFF, cause="signal")

    def on_stop_signal(signum, frame):
        stopped_by.append(signal.Signals(signum).name)
        vm.stop(ExitStatus.POWEROFF, cause="signal")

    signal.signal(signal.SIGTERM, on_sigterm)
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)
    return stopped_by
