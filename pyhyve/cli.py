"""The `pyhyve` command: bhyve's command line, filling bhyve's config tree."""

import getopt
import logging
import signal
import sys

from .config import Config, ConfigError
from .kvm import KvmError, KvmUnavailable
from .vcpu import ExitStatus

USAGE = """\
usage: pyhyve [-eHhPuwx] [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]
              [-k config_file] [-l lpcdev[,conf]] [-m memsize[K|M|G|T]]
              [-o var=value] vmname

Virtual machine:
  -c cpus        vCPUs and topology, bhyve syntax (cpus=N,sockets=S,cores=C,threads=T)
  -m memsize     guest memory, with a K, M, G or T suffix (default 256M)
LPC devices:
  -l bootrom,FILE          firmware mapped to end at 4 GiB; the BSP starts at its reset vector
  -l debugcon,file=PATH    port 0x402 debug console (SeaBIOS's log) written to PATH
Configuration:
  -k config_file  read bhyve_config(5) key=value lines
  -o var=value    set a config key (e.g. -o memory.size=1G); -o config.dump=1 prints the tree
x86:
  -e              exit on unemulated I/O (x86.strictio); default: reads return all ones
  -H              yield the host CPU when the guest halts (always so with KVM's LAPIC)
  -P              exit on PAUSE (KVM handles PAUSE loops in the kernel)
  -w              ignore accesses to unknown MSRs (default: #GP, x86.strictmsr)
Other:
  -h              this help

Exit status (as bhyve): 0 reset, 1 powered off, 2 halted, 3 triple fault, 4 error."""

SHORT_OPTIONS = "c:eHhk:l:m:o:Pw"


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


def parse_lpc(config: Config, text: str) -> None:
    """-l bootrom,FILE | -l debugcon,file=PATH"""
    device, _, options = text.partition(",")
    if device == "help":
        print("bootrom\ndebugcon")
        raise SystemExit(0)
    if device == "bootrom":
        if not options:
            raise ConfigError("-l bootrom needs a file: -l bootrom,FILE")
        config.set("lpc.bootrom", options.split(",")[0])
    elif device == "debugcon":
        key, sep, path = options.partition("=")
        if key != "file" or not path:
            raise ConfigError("-l debugcon needs a file: -l debugcon,file=PATH")
        config.set("lpc.debugcon.path", path)
    else:
        raise ConfigError(f"unknown LPC device '{device}' (pyhyve -l help lists them)")


def parse_args(argv: list[str]) -> Config | None:
    """The config tree the command line describes; None when only help was asked."""
    if "--help" in argv:
        print(USAGE)
        return None
    try:
        options, rest = getopt.getopt(argv, SHORT_OPTIONS)
    except getopt.GetoptError as exc:
        raise ConfigError(f"{exc.msg} (pyhyve -h for help)") from None
    config = Config()
    for option, value in options:
        if option == "-h":
            print(USAGE)
            return None
        if option == "-c":
            parse_cpus(config, value)
        elif option == "-m":
            config.set("memory.size", value)
        elif option == "-e":
            config.set("x86.strictio", "true")
        elif option == "-w":
            config.set("x86.strictmsr", "false")
        elif option == "-H":
            config.set("x86.vmexit_on_hlt", "true")
        elif option == "-P":
            config.set("x86.vmexit_on_pause", "true")
        elif option == "-k":
            config.load_file(value)
        elif option == "-l":
            parse_lpc(config, value)
        elif option == "-o":
            key, sep, setting = value.partition("=")
            if not sep:
                raise ConfigError(f"invalid -o '{value}': expected var=value")
            config.set(key, setting)
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments after the VM name: {' '.join(rest[1:])}")
    if rest:
        config.set("name", rest[0])
    elif "name" not in config and not config.get_bool("config.dump"):
        raise ConfigError("no VM name given (pyhyve -h for help)")
    return config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING,
                        format="pyhyve: %(name)s: %(levelname)s: %(message)s")
    from .vm import VirtualMachine
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        if config is None:
            return 0
        if config.get_bool("config.dump"):
            print(config.dump())
            return 0
        vm = VirtualMachine(config)
    except (ConfigError, KvmUnavailable, KvmError) as exc:
        print(f"pyhyve: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    try:
        _handle_sigterm(vm)
        status = vm.run()
        if status == ExitStatus.ERROR and vm.exit_detail:
            print(f"pyhyve: {vm.exit_detail}", file=sys.stderr)
        return int(status)
    finally:
        vm.close()


def _handle_sigterm(vm) -> None:
    """bhyve: SIGTERM presses the ACPI power button; a second one powers off."""
    presses = []

    def on_sigterm(signum, frame):
        presses.append(signum)
        if len(presses) == 1:
            vm.press_power_button()
        else:
            vm.stop(ExitStatus.POWEROFF)

    signal.signal(signal.SIGTERM, on_sigterm)
