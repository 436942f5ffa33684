"""The control socket: what bhyvectl reaches through /dev/vmm, for pyhyve.

bhyvectl talks to vmm.ko; a pyhyve VM lives in one process, so that process
serves a per-VM AF_UNIX stream socket instead (`/run/pyhyve/NAME.sock`).
The protocol is one JSON object per line each way:

    {"command": "get-rip", "vcpu": 0}
        -> {"ok": true, "vcpu": 0, "register": "rip", "value": 65520}
    {"command": "bogus"}
        -> {"ok": false, "error": "unknown command 'bogus'"}

Commands: get-stats (the vCPU's exit counters by reason, and the VM's
"queued_writes": port and MMIO writes KVM queued instead of exiting,
pyhyve.coalesced), get-all, get-REG, set-REG (with "value"), pause, resume,
inject-nmi, powerdown, wakeup (from ACPI S3; an error when the guest does
not sleep), force-reset, force-poweroff, destroy, checkpoint and
suspend (with "path": pyhyve.snapshot; the answer has the file's "size"),
describe (what pyhyvectl --list shows), migrate (with "host" and "port":
a live migration, pyhyve.migration; answered when it has ended, with QEMU's
MigrationInfo as "migration": "status", "ram", "total-time", "downtime"),
migrate-status (that of the latest migration), migrate-cancel, consoles (each console's name,
device and backend: {"name": "com1", "device": "uart", "kind": "pty",
"path": "/dev/pts/5"}, with "link" for a linked pty, "address" [host, port]
for tcp; pyhyvectl --console attaches to one), send-input (with "events",
QMP input-send-event's list: pyhyve.inputevents); those about one vCPU take
"vcpu" (default 0).  A command that changes the VM answers with its name,
"vm" (for pyhyvectl's "vm NAME: paused"), and the stopping ones with the
exit status the VM will have, "status".  Register access runs on the
vCPU's own thread (VcpuThread.call), so it sees the vCPU between two
KVM_RUNs.
"""

import binascii
import functools
import os
import socket
import time

from .config import ConfigError
from .sandbox import snapshot_refusal
from .kvm import KvmError, abi
from .sockservice import (MAX_CLIENTS, MAX_LINE, MAX_PENDING_OUTPUT, Client,  # noqa: F401
                          SocketService, decode, encode, is_listening)
from .vcpu import ExitStatus

SOCKET_DIR = "/run/pyhyve"

GENERAL_REGISTERS = tuple(name for name, _ in abi.kvm_regs._fields_)
CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
SEGMENT_REGISTERS = {"cs": "cs", "ds": "ds", "es": "es", "fs": "fs", "gs": "gs",
                     "ss": "ss", "tr": "tr", "ldtr": "ldt"}     # bhyve name: kvm_sregs field
TABLE_REGISTERS = {"gdtr": "gdt", "idtr": "idt"}
REGISTERS = (GENERAL_REGISTERS + CONTROL_REGISTERS + tuple(SEGMENT_REGISTERS)
             + tuple(TABLE_REGISTERS))
_SEGMENT_FIELDS = {"selector": 16, "base": 64, "limit": 32, "access": 32}
_TABLE_FIELDS = {"base": 64, "limit": 16}
# bhyve reports segment attributes in VT-x's access-rights layout.
_ACCESS_BITS = (("type", 0, 0xF), ("s", 4, 1), ("dpl", 5, 3), ("present", 7, 1),
                ("avl", 12, 1), ("l", 13, 1), ("db", 14, 1), ("g", 15, 1),
                ("unusable", 16, 1))


class RequestError(Exception):
    """A request the server cannot carry out; the message is the error answer."""


class ControlError(Exception):
    """The VM answered a request with an error; the message is its answer."""


def socket_directory() -> str:
    """/run/pyhyve for root; a user's own runtime directory otherwise, because
    /dev/kvm is often usable by users who cannot write /run."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and runtime:
        return os.path.join(runtime, "pyhyve")
    return SOCKET_DIR


MAX_SOCKET_PATH = 107          # sun_path's 108 bytes, less the terminating NUL


def default_socket_path(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ConfigError(f"VM name '{name}' cannot name a control socket")
    path = os.path.join(socket_directory(), f"{name}.sock")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"VM name '{name[:20]}...' is too long for a control socket "
                          f"path (at most {MAX_SOCKET_PATH} bytes; -o control.socket=PATH)")
    return path


def segment_access(segment: abi.kvm_segment) -> int:
    return sum((getattr(segment, field) & mask) << shift
               for field, shift, mask in _ACCESS_BITS)


def set_segment_access(segment: abi.kvm_segment, access: int) -> None:
    for field, shift, mask in _ACCESS_BITS:
        setattr(segment, field, (access >> shift) & mask)


def read_register(name: str, regs: abi.kvm_regs, sregs: abi.kvm_sregs):
    """A register as the protocol carries it: a number, or for segments and
    descriptor tables a dict of their parts."""
    if name in GENERAL_REGISTERS:
        return getattr(regs, name)
    if name in CONTROL_REGISTERS:
        return getattr(sregs, name)
    if name in SEGMENT_REGISTERS:
        segment = getattr(sregs, SEGMENT_REGISTERS[name])
        return {"selector": segment.selector, "base": segment.base,
                "limit": segment.limit, "access": segment_access(segment)}
    table = getattr(sregs, TABLE_REGISTERS[name])
    return {"base": table.base, "limit": table.limit}


def _number(value, bits: int, what: str) -> int:
    """A JSON number (or a string such as "0x10") that fits in BITS bits."""
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            pass
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise RequestError(f"{what} must be a number from 0 to {(1 << bits) - 1:#x}")
    return value


def _register_value(name: str, value):
    """Check a set-NAME value: a number; for a segment a selector or a dict of
    selector/base/limit/access; for gdtr/idtr a dict of base/limit."""
    if name in GENERAL_REGISTERS or name in CONTROL_REGISTERS:
        return _number(value, 64, "value")
    fields = _SEGMENT_FIELDS if name in SEGMENT_REGISTERS else _TABLE_FIELDS
    if name in SEGMENT_REGISTERS and not isinstance(value, dict):
        value = {"selector": value}
    if not isinstance(value, dict) or not value or not set(value) <= set(fields):
        raise RequestError(f"set-{name} takes a value with any of: {', '.join(fields)}")
    return {field: _number(part, fields[field], field) for field, part in value.items()}


def _write_register(kvm_vcpu, name: str, value) -> None:
    if name in GENERAL_REGISTERS:
        regs = kvm_vcpu.get_regs()
        setattr(regs, name, value)
        kvm_vcpu.set_regs(regs)
        return
    sregs = kvm_vcpu.get_sregs()
    if name in CONTROL_REGISTERS:
        setattr(sregs, name, value)
    else:
        part = getattr(sregs, SEGMENT_REGISTERS.get(name) or TABLE_REGISTERS[name])
        for field, number in value.items():
            if field == "access":
                set_segment_access(part, number)
            else:
                setattr(part, field, number)
    kvm_vcpu.set_sregs(sregs)


def _registers(vcpu_thread):
    return vcpu_thread.kvm_vcpu.get_regs(), vcpu_thread.kvm_vcpu.get_sregs()


class ControlServer(SocketService):
    """Serves one VM's control socket on a daemon thread named "ctl"."""

    label = "control"
    thread_name = "ctl"

    def __init__(self, vm, path: str | None = None):
        self._commands = {
            "describe": self._describe,
            "get-stats": self._get_stats,
            "get-all": self._get_all,
            "pause": self._pause,
            "resume": self._resume,
            "inject-nmi": self._inject_nmi,
            "powerdown": self._powerdown,
            "wakeup": self._wakeup,
            "force-reset": functools.partial(self._stop, ExitStatus.RESET),
            "force-poweroff": functools.partial(self._stop, ExitStatus.POWEROFF),
            "destroy": functools.partial(self._stop, ExitStatus.POWEROFF),
            "checkpoint": functools.partial(self._snapshot, False),
            "suspend": functools.partial(self._snapshot, True),
            "consoles": self._consoles,
            "screendump": self._screendump,
            "migrate": self._migrate,
            "migrate-status": self._migrate_status,
            "migrate-cancel": self._migrate_cancel,
            "send-input": self._send_input,
        }
        self._screenshot = b""          # the PNG screendump hands out in chunks
        super().__init__(vm, path or default_socket_path(vm.name))

    def already_running(self) -> ConfigError:
        return ConfigError(f"VM {self.vm.name} is already running "
                           f"(control socket {self.path})")

    def refusal(self, message: str) -> dict:
        return _error(message)

    # --- framing: one JSON object a line ---------------------------------------------------
    def received(self, client: Client, data: bytes) -> None:
        client.input += data
        while self.is_connected(client):
            end = client.input.find(b"\n")
            if end < 0:
                break
            line = bytes(client.input[:end])
            del client.input[:end + 1]
            if len(line) > MAX_LINE:
                self.refuse_long_request(client)
            elif line.strip():
                client.last_request = time.monotonic()
                answer = self.handle_line(line)
                if isinstance(answer, Later):
                    client.may_idle = True      # the answer may take minutes
                    answer.start(functools.partial(self._answer_later, client))
                else:
                    self.send(client, answer)
        if self.is_connected(client) and len(client.input) > MAX_LINE:
            self.refuse_long_request(client)

    # --- requests ------------------------------------------------------------------------
    def handle_line(self, line: bytes) -> dict:
        try:
            request = decode(line)
        except (ValueError, RecursionError):
            return _error("malformed request: expected one JSON object per line")
        return self.handle(request)

    def _answer_later(self, client: Client, answer: dict) -> None:
        """From any thread: a Later's answer goes out on the service's thread."""
        def send():
            client.may_idle = False
            self.send(client, answer)
        self.post(send)

    def handle(self, request) -> "dict | Later":
        """The answer to one request (a dict decoded from JSON), or a Later."""
        if not isinstance(request, dict):
            return _error("malformed request: expected a JSON object")
        command = request.get("command")
        if not isinstance(command, str):
            return _error('malformed request: no "command"')
        try:
            answer = self._dispatch(command, request)
            return answer if isinstance(answer, Later) else {"ok": True, **answer}
        except (RequestError, KvmError) as exc:
            return _error(str(exc))
        except Exception as exc:
            self.log.exception("control command %s failed", command)
            return _error(f"{command} failed: {exc}")

    def _dispatch(self, command: str, request: dict) -> dict:
        handler = self._commands.get(command)
        if handler is not None:
            return handler(request)
        verb, _, register = command.partition("-")
        if verb == "get" and register in REGISTERS:
            return self._get_register(register, request)
        if verb == "set" and register in REGISTERS:
            return self._set_register(register, request)
        raise RequestError(f"unknown command '{command}'")

    def _vcpu(self, request: dict):
        index = request.get("vcpu", 0)
        count = len(self.vm.vcpus)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            import json
            raise RequestError(f"no vcpu {json.dumps(index)}: the VM has vCPUs 0 to {count - 1}")
        return self.vm.vcpus[index]

    def _send_input(self, request: dict) -> dict:
        from . import inputevents
        try:
            inputevents.send(self.vm.context.input, request.get("events"))
        except inputevents.InputEventError as exc:
            raise RequestError(f"send-input: {exc}") from None
        return {"vm": self.vm.name}

    def _describe(self, request: dict) -> dict:
        """What pyhyvectl --list shows of a VM: its process, size and state."""
        vm = self.vm
        started = vm.started_at
        return {"name": vm.name, "pid": os.getpid(), "vcpus": len(vm.vcpus),
                "memory": vm.memory.size,
                "state": "suspended" if vm.suspended else
                         "paused" if all(vcpu.paused for vcpu in vm.vcpus) else "running",
                "uptime": 0.0 if started is None else round(time.monotonic() - started, 1)}

    def _get_stats(self, request: dict) -> dict:
        vcpu = self._vcpu(request)
        return {"vcpu": vcpu.id, "stats": self.vm.exit_stats()[vcpu.id],
                "queued_writes": self.vm.coalesced.delivered}

    def _get_all(self, request: dict) -> dict:
        vcpu = self._vcpu(request)
        regs, sregs = vcpu.call(_registers)
        return {"vcpu": vcpu.id,
                "registers": {name: read_register(name, regs, sregs) for name in REGISTERS}}

    def _get_register(self, name: str, request: dict) -> dict:
        vcpu = self._vcpu(request)
        regs, sregs = vcpu.call(_registers)
        return {"vcpu": vcpu.id, "register": name, "value": read_register(name, regs, sregs)}

    def _set_register(self, name: str, request: dict) -> dict:
        """Write on the vCPU thread, and answer with what KVM kept."""
        vcpu = self._vcpu(request)
        if "value" not in request:
            raise RequestError(f'set-{name} needs a "value"')
        value = _register_value(name, request["value"])

        def write_and_read(vcpu_thread):
            _write_register(vcpu_thread.kvm_vcpu, name, value)
            return _registers(vcpu_thread)
        regs, sregs = vcpu.call(write_and_read)
        return {"vm": self.vm.name, "vcpu": vcpu.id, "register": name,
                "value": read_register(name, regs, sregs)}

    def _inject_nmi(self, request: dict) -> dict:
        vcpu = self._vcpu(request)
        vcpu.call(lambda vcpu_thread: vcpu_thread.kvm_vcpu.nmi())
        self.log.info("control: NMI injected into vcpu%d", vcpu.id)
        return {"vm": self.vm.name, "vcpu": vcpu.id}

    def _pause(self, request: dict) -> dict:
        self.vm.pause()
        self.log.info("control: paused")
        return {"vm": self.vm.name}

    def _resume(self, request: dict) -> dict:
        self.vm.resume()
        self.log.info("control: resumed")
        return {"vm": self.vm.name}

    def _powerdown(self, request: dict) -> dict:
        """The ACPI power button, as virsh shutdown presses it; the guest decides."""
        self.vm.press_power_button()
        self.log.info("control: power button pressed")
        return {"vm": self.vm.name}

    def _wakeup(self, request: dict) -> dict:
        """Wake the guest from ACPI S3, as QEMU's system_wakeup does."""
        if not self.vm.wakeup("host"):
            raise RequestError(f"VM {self.vm.name} is not suspended (ACPI S3): "
                               "nothing to wake")
        self.log.info("control: woken")
        return {"vm": self.vm.name}

    def _consoles(self, request: dict) -> dict:
        """Where each console's host end is, for a client to attach to."""
        return {"consoles": [{"name": name, "device": device, **backend.describe()}
                             for name, device, backend in self.vm.consoles()]}

    def _screendump(self, request: dict) -> dict:
        """The display as PNG, in base64 chunks that fit an answer line: offset 0
        takes a fresh screenshot, later offsets read the same one.  The client
        writes the file: this process (sandboxed) creates none."""
        offset = request.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise RequestError('"offset" must be a byte offset')
        if offset == 0:
            from .display import find_display, imagefile
            display = find_display(self.vm.devices)
            if display is None:
                raise RequestError("the VM has no display (-s SLOT,fbuf)")
            update = display.screen.refresh()
            self._screenshot = imagefile.png(update.width, update.height, update.pixels)
        chunk = self._screenshot[offset:offset + SCREENDUMP_CHUNK]
        return {"vm": self.vm.name, "total": len(self._screenshot), "offset": offset,
                "data": binascii.b2a_base64(chunk, newline=False).decode()}

    def _stop(self, status: ExitStatus, request: dict) -> dict:
        self.log.info("control: %s", request.get("command"))
        self.vm.stop(status, cause="control")
        return {"vm": self.vm.name, "status": int(status)}

    def _snapshot(self, suspend: bool, request: dict) -> dict:
        """checkpoint: pause, save to "path", resume (unless it was paused before);
        suspend: the same, then stop the VM with exit status 1 (as bhyve exits)."""
        path = request.get("path")
        if not isinstance(path, str) or not path:
            raise RequestError('this command needs a "path"')
        path = os.path.abspath(path)
        refusal = snapshot_refusal(path, self.vm.config)
        if refusal:
            raise RequestError(refusal)
        from . import snapshot
        try:
            snapshot.check_savable(self.vm)
        except snapshot.SnapshotError as exc:
            raise RequestError(str(exc)) from None
        try:
            size = self.vm.checkpoint(path, stay_paused=suspend)
        except snapshot.SnapshotError as exc:
            raise RequestError(str(exc)) from None
        if suspend:
            self.vm.exit_detail = f"suspended to {path}"
            self.vm.stop(ExitStatus.POWEROFF, cause="control")
        return {"vm": self.vm.name, "path": path, "size": size}


    def _migrations(self):
        if self.vm.migration is None:
            raise RequestError("this VM cannot migrate: it was started without "
                               "-o migration.key=PATH")
        return self.vm.migration

    def _migrate(self, request: dict) -> "Later":
        """Live-migrate to "host":"port"; the answer comes once it has ended: a
        completed one's just before this VM stops (close() sends it)."""
        from .migstream import MigrationError
        host, port = request.get("host"), request.get("port")
        if not isinstance(host, str) or not host:
            raise RequestError('migrate needs a "host"')
        port = _number(port, 16, "port")
        name = self.vm.name

        def start(reply):
            def ended(info: dict) -> None:
                if info["status"] == "completed":
                    reply({"ok": True, "vm": name, "host": host, "port": port,
                           "migration": info})
                else:
                    reply(_error(f"migration to {host}:{port} {info['status']}: "
                                 f"{info.get('error-desc', '')}"))
            try:
                self._migrations().start(host, port, ended)
            except MigrationError as exc:
                reply(_error(str(exc)))
        self._migrations()
        self.log.info("control: migrating to %s:%d", host, port)
        return Later(start)

    def _migrate_status(self, request: dict) -> dict:
        return {"vm": self.vm.name, "migration": self._migrations().info()}

    def _migrate_cancel(self, request: dict) -> dict:
        self._migrations().cancel()
        return {"vm": self.vm.name}


class Later:
    """An answer that comes when something ends: start(reply) begins it, and
    REPLY (callable from any thread, once) sends the answer."""

    def __init__(self, start):
        self.start = start


SCREENDUMP_CHUNK = 256 * 1024       # base64 of it stays well inside an answer line


def _error(message: str) -> dict:
    return {"ok": False, "error": message}


class ControlClient:
    """One connection to a VM's control socket; request() raises ControlError
    when the VM refuses, OSError when the connection fails."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")

    def set_timeout(self, seconds: float | None) -> None:
        """How long request() waits for an answer (None: for ever)."""
        self._sock.settimeout(seconds)

    def request(self, command: str, **fields) -> dict:
        self._sock.sendall(encode({"command": command, **fields}))
        line = self._file.readline(MAX_PENDING_OUTPUT)
        if not line.endswith(b"\n"):
            raise ConnectionError("the VM closed the control connection")
        answer = decode(line)
        if not answer.get("ok"):
            raise ControlError(answer.get("error", "request failed"))
        return answer

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
