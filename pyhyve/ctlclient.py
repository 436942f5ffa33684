"""The `pyhyvectl` command: bhyvectl's options, carried over a VM's control socket.

As bhyvectl, one run may combine several operations; they happen in bhyvectl's
order (after --pause, before --resume): register writes, --inject-nmi,
register reads, --get-stats, --checkpoint, --suspend, then --resume, --powerdown,
--force-reset, --force-poweroff, --destroy.

--json prints the VM's answers themselves, one JSON object a line in the
order of the requests, each with the request's "command" first; a refusal is
printed the same way ({"command": ..., "ok": false, "error": ...}) before
pyhyvectl fails.  Register reads ask for each register named (get-REG) or
for all of them (get-all).  --list --json prints a JSON array of names.
"""

import getopt
import json
import os
import sys

from .config import ConfigError
from .ctl import (CONTROL_REGISTERS, GENERAL_REGISTERS, REGISTERS, SEGMENT_REGISTERS,
                  TABLE_REGISTERS, ControlClient, ControlError, default_socket_path,
                  is_listening, socket_directory)

USAGE = """\
usage: pyhyvectl --vm=NAME [--cpu=N] [--socket=PATH] [--json] OPERATION...
       pyhyvectl --list [--socket=PATH] [--json]
       pyhyvectl -h | --help | --version

  --vm=NAME            the VM, reached through /run/pyhyve/NAME.sock
  --cpu=N              the vCPU that register operations act on (default 0)
  --socket=PATH        use this control socket instead of NAME's
  --json               print the VM's answers as JSON, one object a line
  --list               name the running VMs (those whose socket answers, in the
                       socket directory or in --socket's directory)
Operations:
  --get-stats          VM exit counters of the vCPU
  --get-all            every register below, then the exit counters
  --get-REG, --set-REG=VALUE     REG: rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip
                       rflags cr0 cr2 cr3 cr4 cr8 efer
  --get-SEG, --set-SEG=SELECTOR  SEG: cs ds es fs gs ss tr ldtr
  --get-desc-SEG       base/limit/access of SEG; also --get-desc-gdtr, --get-desc-idtr
  --set-desc-SEG --desc-base=B --desc-limit=L --desc-access=A   (missing parts are 0)
  --pause, --resume    stop every vCPU at an instruction boundary, or let them run
  --inject-nmi         an NMI to the vCPU
  --checkpoint=FILE    save the VM's state to FILE (pyhyve -r FILE restores it), go on
  --suspend=FILE       save the VM's state to FILE, then stop the VM (exit status 1)
  --powerdown          press the ACPI power button: the guest shuts down (virsh shutdown)
  --force-reset        stop the VM with exit status 0 (reset)
  --force-poweroff     stop the VM with exit status 1 (power off)
  --destroy            stop the VM (power off)"""

SCALARS = GENERAL_REGISTERS + CONTROL_REGISTERS
# bhyvectl's print order for --get-all.
PRINT_ORDER = ("efer", "cr0", "cr2", "cr3", "cr4", "cr8", "rsp", "rip", "rax", "rbx", "rcx",
               "rdx", "rsi", "rdi", "rbp", *(f"r{n}" for n in range(8, 16)), "rflags")
DESC_ORDER = ("ds", "es", "fs", "gs", "ss", "cs", "tr", "ldtr", "gdtr", "idtr")
SELECTOR_ORDER = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")
DESCRIPTORS = tuple(SEGMENT_REGISTERS) + tuple(TABLE_REGISTERS)
ACTIONS = ("pause", "inject-nmi", "get-stats", "get-all", "resume", "powerdown",
           "force-reset", "force-poweroff", "destroy")
LONG_OPTIONS = (["help", "version", "list", "json", "vm=", "cpu=", "socket=", "desc-base=",
                 "desc-limit=", "desc-access=", "checkpoint=", "suspend=", *ACTIONS]
                + [f"get-{name}" for name in SCALARS + tuple(SEGMENT_REGISTERS)]
                + [f"set-{name}=" for name in SCALARS + tuple(SEGMENT_REGISTERS)]
                + [f"get-desc-{name}" for name in DESCRIPTORS]
                + [f"set-desc-{name}" for name in DESCRIPTORS])


class UsageError(Exception):
    """A command line pyhyvectl cannot act on; the message says why."""


def _number(text: str, option: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"invalid value '{text}' for --{option}") from None


class Plan:
    """What one pyhyvectl run asks for, from its options."""

    def __init__(self, argv: list[str]):
        try:
            options, rest = getopt.gnu_getopt(argv, "h", LONG_OPTIONS)
        except getopt.GetoptError as exc:
            raise UsageError(f"{exc.msg} (pyhyvectl --help for help)") from None
        if rest:
            raise UsageError(f"unexpected argument '{rest[0]}' (pyhyvectl --help for help)")
        self.name = self.socket = None
        self.json = False
        self.cpu = 0
        self.actions: set[str] = set()
        self.sets: dict[str, int] = {}
        self.desc_sets: list[str] = []
        self.desc = {"base": 0, "limit": 0, "access": 0}
        self.gets: set[str] = set()         # scalars and selectors
        self.desc_gets: set[str] = set()
        self.snapshots: dict[str, str] = {}    # checkpoint/suspend: FILE
        for option, value in options:
            self._add("help" if option == "-h" else option[2:], value)

    def _add(self, option: str, value: str) -> None:
        if option in ("help", "version", "list") or option in ACTIONS:
            self.actions.add(option)
        elif option == "json":
            self.json = True
        elif option == "vm":
            self.name = value
        elif option == "socket":
            self.socket = value
        elif option in ("checkpoint", "suspend"):
            if not value:
                raise UsageError(f"--{option} needs a file: --{option}=FILE")
            self.snapshots[option] = os.path.abspath(value)
        elif option == "cpu":
            self.cpu = _number(value, option)
        elif option.startswith("desc-"):
            self.desc[option[5:]] = _number(value, option)
        elif option.startswith("get-desc-"):
            self.desc_gets.add(option[9:])
        elif option.startswith("set-desc-"):
            self.desc_sets.append(option[9:])
        elif option.startswith("get-"):
            self.gets.add(option[4:])
        else:
            self.sets[option[4:]] = _number(value, option)

    def reads(self) -> bool:
        return bool(self.gets or self.desc_gets or "get-all" in self.actions)

    def socket_path(self) -> str:
        if self.socket:
            return self.socket
        if not self.name:
            raise UsageError("--vm=NAME is required (pyhyvectl --help for help)")
        return default_socket_path(self.name)


def main(argv: list[str] | None = None) -> int:
    try:
        plan = Plan(sys.argv[1:] if argv is None else argv)
        if "help" in plan.actions:
            print(USAGE)
            return 0
        if "version" in plan.actions:
            from . import __version__
            print(f"pyhyvectl {__version__}")
            return 0
        if "list" in plan.actions:
            return list_vms(os.path.dirname(plan.socket) if plan.socket else socket_directory(),
                            plan.json)
        path = plan.socket_path()
        if not (plan.actions or plan.snapshots or plan.sets or plan.desc_sets or plan.reads()):
            raise UsageError("nothing to do (pyhyvectl --help lists the operations)")
        with _connect(plan.name or path, path) as client:
            run(plan, client)
    except (UsageError, ConfigError, ControlError) as exc:
        return _fail(str(exc))
    except TimeoutError:
        return _fail("the VM did not answer in time")
    except OSError as exc:
        return _fail(f"lost the control connection: {exc.strerror or exc}")
    return 0


def _fail(message: str) -> int:
    print(f"pyhyvectl: {message}", file=sys.stderr)
    return 1


def _connect(name: str, path: str) -> ControlClient:
    try:
        return ControlClient(path)
    except FileNotFoundError:
        raise UsageError(f"VM '{name}' is not running (no control socket {path})") from None
    except ConnectionRefusedError:
        raise UsageError(f"VM '{name}' is not running (stale control socket {path})") from None
    except OSError as exc:
        raise UsageError(f"cannot connect to control socket {path}: "
                         f"{exc.strerror or exc}") from None


def list_vms(directory: str, as_json: bool = False) -> int:
    """bhyvectl --list: one running VM name a line (a JSON array with --json)."""
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        entries = []
    except OSError as exc:
        return _fail(f"cannot list {directory}: {exc.strerror}")
    names = []
    for entry in entries:
        if entry.endswith(".sock"):
            try:
                if is_listening(os.path.join(directory, entry)):
                    names.append(entry[:-len(".sock")])
            except OSError:         # another user's VM
                pass
    print(json.dumps(names) if as_json else "\n".join(names), end="\n" if as_json or names else "")
    return 0


class _Requester:
    """client.request(), and with --json each answer printed as it comes."""

    def __init__(self, client: ControlClient, as_json: bool):
        self.client, self.as_json = client, as_json

    def __call__(self, command: str, **fields) -> dict:
        try:
            answer = self.client.request(command, **fields)
        except ControlError as exc:
            self._print({"command": command, "ok": False, "error": str(exc)})
            raise
        self._print({"command": command, **answer})
        return answer

    def _print(self, answer: dict) -> None:
        if self.as_json:
            print(json.dumps(answer), flush=True)


def run(plan: Plan, client: ControlClient) -> None:
    cpu = plan.cpu
    request = _Requester(client, plan.json)
    if "pause" in plan.actions:
        request("pause")
    for name, value in plan.sets.items():
        request(f"set-{name}", vcpu=cpu, value=value)
    for name in plan.desc_sets:
        parts = dict(plan.desc)
        if name in TABLE_REGISTERS:
            del parts["access"]
        request(f"set-{name}", vcpu=cpu, value=parts)
    if "inject-nmi" in plan.actions:
        request("inject-nmi", vcpu=cpu)
    if plan.reads():
        everything = "get-all" in plan.actions
        if plan.json and not everything:
            for name in REGISTERS:
                if name in plan.gets or name in plan.desc_gets:
                    request(f"get-{name}", vcpu=cpu)
        else:
            registers = request("get-all", vcpu=cpu)["registers"]
            if not plan.json:
                for line in format_registers(registers, cpu, None if everything else plan.gets,
                                             None if everything else plan.desc_gets):
                    print(line)
    if plan.actions & {"get-stats", "get-all"}:
        stats = request("get-stats", vcpu=cpu)["stats"]
        if not plan.json:
            for line in format_stats(stats, cpu):
                print(line)
    for action in ("checkpoint", "suspend"):
        if action in plan.snapshots:
            request(action, path=plan.snapshots[action])
    for action in ("resume", "powerdown", "force-reset", "force-poweroff", "destroy"):
        if action in plan.actions:
            request(action)


def format_registers(registers: dict, cpu: int, gets: set | None = None,
                     desc_gets: set | None = None) -> list[str]:
    """bhyvectl's lines for the registers asked for (None: all of them)."""
    lines = []
    for name in PRINT_ORDER:
        if gets is None or name in gets:
            tabs = "\t" if len(name) > 4 else "\t\t"
            lines.append(f"{name}[{cpu}]{tabs}0x{registers[name]:016x}")
    for name in DESC_ORDER:
        if desc_gets is None or name in desc_gets:
            desc = registers[name]
            if name in TABLE_REGISTERS:
                lines.append(f"{name}[{cpu}]\t\t0x{desc['base']:016x}/0x{desc['limit']:08x}")
            else:
                lines.append(f"{name} desc[{cpu}]\t0x{desc['base']:016x}/"
                             f"0x{desc['limit']:08x}/0x{desc['access']:08x}")
    for name in SELECTOR_ORDER:
        if gets is None or name in gets:
            lines.append(f"{name}[{cpu}]\t\t0x{registers[name]['selector']:04x}")
    return lines


def format_stats(stats: dict, cpu: int) -> list[str]:
    lines = [f"vcpu{cpu} stats:", f"{'total number of vm exits':<40}\t{sum(stats.values())}"]
    lines += [f"{'vm exits due to ' + reason:<40}\t{count}" for reason, count in stats.items()]
    return lines


if __name__ == "__main__":
    sys.exit(main())
