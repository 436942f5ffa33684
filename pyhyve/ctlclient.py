"""The `pyhyvectl` command: bhyvectl's options, carried over a VM's control socket.

As bhyvectl, one run may combine several operations; they happen in bhyvectl's
order (after --pause, before --resume): register writes, --inject-nmi,
register reads, --get-stats, --checkpoint, --suspend, --migrate, then --resume, --wakeup,
--powerdown, --force-reset, --force-poweroff, --destroy.  (--suspend is
bhyvectl's: save and stop.  A guest that suspends itself to RAM, ACPI S3, is
woken with --wakeup; --resume ends a --pause.)  --console is an operation of its
own: the terminal on a console of the VM (pyhyve.attach) until `~.`.

--json prints the VM's answers themselves, one JSON object a line in the
order of the requests, each with the request's "command" first; a refusal is
printed the same way ({"command": ..., "ok": false, "error": ...}) before
pyhyvectl fails.  Register reads ask for each register named (get-REG) or
for all of them (get-all).  --list --json prints a JSON array of the VMs.
"""

import binascii
import getopt
import json
import os
import socket
import sys

from . import escape as escapes
from .attach import AttachError, attach, choose
from .config import ConfigError
from .migstream import DEFAULT_PORT as DEFAULT_MIGRATION_PORT
from .ctl import (CONTROL_REGISTERS, GENERAL_REGISTERS, REGISTERS, SEGMENT_REGISTERS,
                  TABLE_REGISTERS, ControlClient, ControlError, default_socket_path,
                  socket_directory)

USAGE = """\
usage: pyhyvectl --vm=NAME [--cpu=N] [--socket=PATH] [--json] OPERATION...
       pyhyvectl --vm=NAME [--socket=PATH] --console[=comN] [--escape=CHAR]
       pyhyvectl --list [--socket=PATH] [--json]
       pyhyvectl -h | --help | --version

  --vm=NAME            the VM, reached through /run/pyhyve/NAME.sock
  --cpu=N              the vCPU that register operations act on (default 0)
  --socket=PATH        use this control socket instead of NAME's
  --json               print the VM's answers as JSON, one object a line
  --list               the running VMs (those whose socket answers, in the socket
                       directory or in --socket's directory): name, PID, uptime,
                       vCPUs, memory and state (running, paused or suspended)
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
  --screenshot=FILE    the display (-s SLOT,fbuf) as a PNG image, written to FILE here
  --wakeup             wake a guest asleep in ACPI S3 (suspend to RAM), as QEMU's
                       system_wakeup; the power button wakes it too
  --migrate=HOST[,PORT]  live-migrate the VM to a pyhyve -R HOST:PORT (default port
                       24983; both started with -o migration.key=PATH); waits until
                       the destination runs it (the VM here then stops), or fails
                       and the VM runs on here
  --powerdown          press the ACPI power button: the guest shuts down (virsh shutdown)
  --force-reset        stop the VM with exit status 0 (reset)
  --force-poweroff     stop the VM with exit status 1 (power off)
  --destroy            stop the VM (power off)
Console:
  --console[=NAME]     attach this terminal (raw mode: Ctrl-C goes to the guest) to
                       console NAME (default com1): a pty, unix or tcp console, or a
                       virtio-console port by its name; at the start of a line
                       ~. detaches (the VM runs on), ~? lists the escapes, ~~ sends ~
  --escape=CHAR        the escape character instead of ~ (^X: a control key; none)"""

SCALARS = GENERAL_REGISTERS + CONTROL_REGISTERS
# bhyvectl's print order for --get-all.
PRINT_ORDER = ("efer", "cr0", "cr2", "cr3", "cr4", "cr8", "rsp", "rip", "rax", "rbx", "rcx",
               "rdx", "rsi", "rdi", "rbp", *(f"r{n}" for n in range(8, 16)), "rflags")
DESC_ORDER = ("ds", "es", "fs", "gs", "ss", "cs", "tr", "ldtr", "gdtr", "idtr")
SELECTOR_ORDER = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")
DESCRIPTORS = tuple(SEGMENT_REGISTERS) + tuple(TABLE_REGISTERS)
ACTIONS = ("pause", "inject-nmi", "get-stats", "get-all", "resume", "wakeup", "powerdown",
           "force-reset", "force-poweroff", "destroy")
LONG_OPTIONS = (["help", "version", "list", "json", "vm=", "cpu=", "socket=", "desc-base=",
                 "desc-limit=", "desc-access=", "checkpoint=", "suspend=", "screenshot=",
                 "console=", "escape=", "migrate=",
                 *ACTIONS]
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
        # --console's value is optional: a bare --console is --console= (com1)
        argv = ["--console=" if arg == "--console" else arg for arg in argv]
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
        self.migrate: tuple[str, int] | None = None    # --migrate's HOST, PORT
        self.console: str | None = None     # --console's NAME ("": the default)
        self.screenshot: str | None = None  # --screenshot's FILE
        self.escape = escapes.DEFAULT
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
        elif option == "console":
            self.console = value
        elif option == "escape":
            self.escape = value
        elif option == "screenshot":
            if not value:
                raise UsageError("--screenshot needs a file: --screenshot=FILE.png")
            self.screenshot = os.path.abspath(value)
        elif option in ("checkpoint", "suspend"):
            if not value:
                raise UsageError(f"--{option} needs a file: --{option}=FILE")
            self.snapshots[option] = os.path.abspath(value)
        elif option == "migrate":
            host, _, port = value.partition(",")
            if not host or (port and not port.isdigit()) or int(port or 0) > 65535:
                raise UsageError(f"--migrate takes HOST[,PORT], not '{value}'")
            self.migrate = (host, int(port or DEFAULT_MIGRATION_PORT))
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
        operations = plan.actions or plan.snapshots or plan.sets or plan.desc_sets or \
            plan.reads() or plan.screenshot or plan.migrate
        if plan.console is not None:
            if operations:
                raise UsageError("--console cannot be combined with other operations")
            escape = escapes.parse_escape(plan.escape, "--escape")
            with _connect(plan.name or path, path) as client:
                consoles = client.request("consoles")["consoles"]
            return attach(choose(consoles, plan.console, plan.name or path), escape)
        if not operations:
            raise UsageError("nothing to do (pyhyvectl --help lists the operations)")
        with _connect(plan.name or path, path) as client:
            run(plan, client)
    except (UsageError, ConfigError, ControlError, AttachError) as exc:
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


LIST_COLUMNS = "{:<20} {:>8} {:>10} {:>5} {:>8}  {}"


def list_vms(directory: str, as_json: bool = False) -> int:
    """bhyvectl --list, with what virsh list and ps would add: the VMs whose
    control socket answers, a line each, under a header (with --json, a JSON
    array of what each VM says of itself: pyhyve.ctl's describe)."""
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        entries = []
    except OSError as exc:
        return _fail(f"cannot list {directory}: {exc.strerror}")
    found = [vm for vm in (_describe(os.path.join(directory, entry), entry[:-len(".sock")])
                           for entry in entries if entry.endswith(".sock")) if vm is not None]
    if as_json:
        print(json.dumps(found))
        return 0
    print(LIST_COLUMNS.format("NAME", "PID", "UPTIME", "VCPUS", "MEMORY", "STATE"))
    for vm in found:
        if "pid" not in vm:
            print(LIST_COLUMNS.format(vm["name"], "-", "-", "-", "-", vm["state"]))
            continue
        seconds = int(vm["uptime"])
        uptime = f"{seconds // 3600}:{seconds // 60 % 60:02}:{seconds % 60:02}"
        print(LIST_COLUMNS.format(vm["name"], vm["pid"], uptime, vm["vcpus"],
                                  _size(vm["memory"]), vm["state"]))
    return 0


def _describe(path: str, name: str) -> dict | None:
    """What the VM at PATH says of itself; None when nothing answers there (a
    stale socket, another user's VM).  A VM too busy to answer is listed with
    its name alone."""
    try:
        with ControlClient(path, timeout=2.0) as client:
            answer = client.request("describe")
    except (ConnectionRefusedError, FileNotFoundError, PermissionError):
        return None
    except (OSError, ControlError, ValueError):
        return {"name": name, "state": "not answering"}
    answer.pop("ok", None)
    return answer


def _size(size: int) -> str:
    for unit in "GM":
        scale = 1 << (30 if unit == "G" else 20)
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size >> 20}M"


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
    """The operations, in bhyvectl's order; each that changes the VM says what
    it did in one line, "vm NAME: ...", among what the reads print."""
    cpu = plan.cpu
    request = _Requester(client, plan.json)

    def did(answer: dict, what: str) -> None:
        if not plan.json:
            print(f"vm {answer.get('vm') or plan.name or client.path}: {what}", flush=True)

    if "pause" in plan.actions:
        did(request("pause"), "paused")
    for name, value in plan.sets.items():
        answer = request(f"set-{name}", vcpu=cpu, value=value)
        did(answer, f"vcpu{cpu} {name} set to {_register_text(answer['value'])}")
    for name in plan.desc_sets:
        parts = dict(plan.desc)
        if name in TABLE_REGISTERS:
            del parts["access"]
        answer = request(f"set-{name}", vcpu=cpu, value=parts)
        did(answer, f"vcpu{cpu} {name} descriptor set to "
                    + ", ".join(f"{part} {answer['value'][part]:#x}" for part in parts))
    if "inject-nmi" in plan.actions:
        did(request("inject-nmi", vcpu=cpu), f"NMI injected into vcpu{cpu}")
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
        answer = request("get-stats", vcpu=cpu)
        if not plan.json:
            for line in format_stats(answer["stats"], cpu, answer.get("queued_writes")):
                print(line)
    if plan.screenshot is not None:
        did(save_screenshot(client, plan.screenshot), f"screenshot saved to {plan.screenshot}")
    for action in ("checkpoint", "suspend"):
        if action in plan.snapshots:
            answer = request(action, path=plan.snapshots[action])
            then = "running on" if action == "checkpoint" else "stopped (exit status 1)"
            did(answer, f"saved to {answer['path']} ({answer['size']} bytes), {then}")
    if plan.migrate:
        migrate(plan, client, request, did)
    for action in ("resume", "wakeup", "powerdown", "force-reset", "force-poweroff", "destroy"):
        if action in plan.actions:
            answer = request(action)
            did(answer, DONE[action] + (f" (exit status {answer['status']})"
                                        if "status" in answer else ""))


def save_screenshot(client: ControlClient, path: str) -> dict:
    """Fetch the VM's screendump chunk by chunk and write it to PATH (this
    process writes the file: pyhyve's sandbox lets it create none)."""
    data = bytearray()
    while True:
        answer = client.request("screendump", offset=len(data))
        chunk = binascii.a2b_base64(answer["data"])
        data += chunk
        if not chunk or len(data) >= answer["total"]:
            break
    try:
        with open(path, "wb") as file:
            file.write(data)
    except OSError as exc:
        raise ControlError(f"cannot write {path}: {exc.strerror}") from None
    return answer


def migrate(plan: Plan, client: ControlClient, request, did) -> None:
    """The answer comes once the migration has ended: the destination runs the
    VM (and the VM here stops), or it failed (ControlError says why)."""
    host, port = plan.migrate
    client.set_timeout(None)
    answer = request("migrate", host=_address_of(host), port=port)
    info = answer["migration"]
    did(answer, f"migrated to {host}:{port} ({info['ram']['transferred']} bytes in "
                f"{info['total-time']} ms, paused {info.get('downtime', 0)} ms)")


def _address_of(host: str) -> str:
    """HOST's address, resolved here: the VM's sandbox lets it read no resolver
    configuration, so it is given an address."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"--migrate: cannot resolve {host}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None


# what each action's line says it did
DONE = {"resume": "resumed", "wakeup": "woken from suspend to RAM",
        "powerdown": "power button pressed (the guest decides)",
        "force-reset": "reset", "force-poweroff": "powered off",
        "destroy": "destroyed, powered off"}


def _register_text(value) -> str:
    """A register's value as set: a number, or a segment's selector."""
    if isinstance(value, dict):
        return f"selector {value['selector']:#x}"
    return f"{value:#x}"


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


def format_stats(stats: dict, cpu: int, queued_writes: int | None = None) -> list[str]:
    """bhyvectl's counter lines; then the writes KVM queued instead of exiting,
    which every vCPU of the VM made together."""
    lines = [f"vcpu{cpu} stats:", f"{'total number of vm exits':<40}\t{sum(stats.values())}"]
    lines += [f"{'vm exits due to ' + reason:<40}\t{count}" for reason, count in stats.items()]
    if queued_writes is not None:
        lines.append(f"{'writes queued, not exits (all vCPUs)':<40}\t{queued_writes}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
