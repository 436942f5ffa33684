"""QMP, the QEMU Machine Protocol, on a socket of its own (`-o qmp.socket=PATH`).

Tools that manage QEMU (the qemu.qmp library, qmp-shell, scripts written for
QEMU's monitor) speak QMP; this serves the part of it that maps onto a
pyhyve VM, with QEMU's message shapes (docs/interop/qmp-spec and the QAPI
schema, qapi/*.json):

    <- {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0},
                            "package": "pyhyve 0.1.0"}, "capabilities": []}}
    -> {"execute": "qmp_capabilities"}
    <- {"return": {}}
    -> {"execute": "query-status", "id": 1}
    <- {"return": {"running": true, "status": "running"}, "id": 1}
    -> {"execute": "stop"}
    <- {"return": {}}
    <- {"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 5}}

A client must send qmp_capabilities first; anything else before it gets a
CommandNotFound error, as QEMU answers.  Errors are {"error": {"class":
"GenericError" or "CommandNotFound", "desc": TEXT}} with the request's "id"
when it had one.  Messages need no newline between them (jsonstream.py cuts
the stream); one longer than MAX_LINE bytes is answered and the connection
closed.  The version fields carry pyhyve's own version, not a QEMU release:
pyhyve has only the commands below, so a client that reasons from QEMU
version numbers would reason wrongly.

Commands: qmp_capabilities, query-commands, query-version, query-name,
query-status, query-cpus-fast, stop, cont, system_powerdown (the ACPI power
button: POWERDOWN, then the guest decides; it wakes a guest asleep in S3,
which QEMU's does not), system_wakeup (from S3, as QEMU's: an error when the
guest does not sleep), system_reset (the machine is
reset in place and runs on, as QEMU's; the guest's own reset still ends
pyhyve with bhyve's status 0, as QEMU's -no-reboot does), quit (power-off:
pyhyve exits with bhyve's status 1), input-send-event (keys, absolute moves
and buttons into the VM's input router: pyhyve.inputevents), screendump (the display as a PPM or PNG
file, written by this process, so only where it may write snapshots:
beneath `snapshot.dir`, see sandbox.snapshot_refusal); and live migration (pyhyve.migration,
for a VM started with -o migration.key=PATH): migrate ("uri":
"tcp:HOST:PORT", to a pyhyve -R, not to QEMU: the stream is pyhyve's own;
HOST an address where the sandbox keeps the VM from its resolver's files),
query-migrate, migrate_cancel, migrate-set-parameters and
query-migrate-parameters ("downtime-limit" in ms, "max-bandwidth" in bytes
a second, 0 for none).

Events, to every client past qmp_capabilities, whoever caused them (the
guest, pyhyvectl, a signal, QMP): STOP, RESUME, POWERDOWN, SUSPEND, WAKEUP,
RESET and SHUTDOWN (those two with QEMU's "guest" and "reason").  An event is sent
after the answer to the command that caused it.

The socket is the control socket's kind (sockservice.py): 0600, root's and
the VM owner's only, MAX_CLIENTS at once.  A client past qmp_capabilities
may sit idle for as long as it likes (it is waiting for events); one that
has not negotiated is closed after IDLE_TIMEOUT.
"""

import os
import time

from . import __version__, inputevents
from .display import find_display, imagefile
from .jsonstream import JsonStream
from .sandbox import snapshot_refusal
from .sockservice import MAX_LINE, Client, SocketService
from .vcpu import ExitStatus

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
TARGET = "x86_64"
CAPABILITIES: list[str] = []        # out-of-band execution ("oob") is not offered
KNOWN_CAPABILITIES = ("oob",)


def version() -> dict:
    """pyhyve's version in the shape of QEMU's VersionInfo."""
    numbers = [int(part) if part.isdigit() else 0 for part in __version__.split(".")[:3]]
    major, minor, micro = numbers + [0] * (3 - len(numbers))
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"pyhyve {__version__}"}


def run_state(vm) -> str:
    """The VM's state as QEMU's RunState names it."""
    if vm.exit_status is not None and vm.exit_detail.startswith("migrated to"):
        return "postmigrate"
    if vm.exit_status is not None:
        return "shutdown"
    if vm.suspended:
        return "suspended"
    if vm.paused:
        return "paused"
    if not vm.has_run:
        return "prelaunch"
    if vm.gdb is not None and any(vcpu.paused for vcpu in vm.vcpus):
        return "debug"              # the GDB stub holds vCPUs
    return "running"


def shutdown_reason(cause: str, status: ExitStatus | None = None) -> tuple[bool, str]:
    """QEMU's (guest, ShutdownCause) for a VM stopping (or resetting) with
    STATUS because CAUSE asked (the VM's word: vm.py's module docstring)."""
    if status == ExitStatus.ERROR:
        return False, "host-error"
    if cause == "guest":
        if status in (ExitStatus.RESET, ExitStatus.TRIPLEFAULT, None):
            return True, "guest-reset"      # QEMU -no-reboot's SHUTDOWN, or a RESET
        return True, "guest-shutdown"       # ACPI S5, or bhyve's halt with IF clear
    if cause == "signal":
        return False, "host-signal"
    if cause == "qmp":
        return False, "host-qmp-system-reset" if status is None else "host-qmp-quit"
    return False, "host-ui"                 # pyhyvectl, the library API, gdb


def event_message(name: str, data: dict | None = None, when: float | None = None) -> dict:
    when = time.time() if when is None else when
    seconds = int(when)
    message = {"event": name,
               "timestamp": {"seconds": seconds, "microseconds": int((when - seconds) * 1e6)}}
    if data is not None:            # QEMU leaves "data" out of events that have none
        message["data"] = data
    return message


class QmpError(Exception):
    """A command's failure: the message is the error's "desc"."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR):
        super().__init__(desc)
        self.error_class = error_class


class _Session:
    def __init__(self):
        self.stream = JsonStream(MAX_LINE)
        self.negotiated = False


class QmpServer(SocketService):
    """Serves QMP for one VM on a daemon thread named "qmp"."""

    label = "QMP"
    thread_name = "qmp"

    def __init__(self, vm, path: str):
        # name: (handler, the arguments it takes)
        self._commands = {
            "qmp_capabilities": (self._qmp_capabilities, ("enable",)),
            "query-commands": (self._query_commands, ()),
            "query-version": (lambda session, arguments: version(), ()),
            "query-name": (lambda session, arguments: {"name": self.vm.name}, ()),
            "query-status": (self._query_status, ()),
            "query-cpus-fast": (self._query_cpus_fast, ()),
            "stop": (self._stop, ()),
            "cont": (self._cont, ()),
            "system_powerdown": (self._system_powerdown, ()),
            "system_wakeup": (self._system_wakeup, ()),
            "system_reset": (self._system_reset, ()),
            "quit": (self._quit, ()),
            "screendump": (self._screendump, ("filename", "device", "head", "format")),
            "migrate": (self._migrate, ("uri", "detach")),
            "query-migrate": (self._query_migrate, ()),
            "migrate_cancel": (self._migrate_cancel, ()),
            "migrate-set-parameters": (self._set_migrate_parameters,
                                       ("downtime-limit", "max-bandwidth")),
            "query-migrate-parameters": (self._query_migrate_parameters, ()),
            "input-send-event": (self._input_send_event, ("events",)),
        }
        super().__init__(vm, path)
        vm.listeners.append(self._vm_event)

    def close(self) -> None:
        try:
            self.vm.listeners.remove(self._vm_event)
        except ValueError:
            pass
        super().close()

    def refusal(self, message: str) -> dict:
        return {"error": {"class": GENERIC_ERROR, "desc": message}}

    # --- framing ---------------------------------------------------------------------------
    def connected(self, client: Client) -> None:
        client.session = _Session()
        self.send(client, {"QMP": {"version": version(), "capabilities": CAPABILITIES}})

    def received(self, client: Client, data: bytes) -> None:
        session = client.session
        for value, error in session.stream.feed(data):
            if not self.is_connected(client):
                return
            client.last_request = time.monotonic()
            self.send(client, self.refusal(error) if error else self.handle(session, value))
            client.may_idle = session.negotiated    # waits for events, maybe for long
        if session.stream.overflowed and self.is_connected(client):
            self.refuse_long_request(client)

    # --- requests --------------------------------------------------------------------------
    def handle(self, session: _Session, request) -> dict:
        """The answer to one request (a JSON value), as qmp_dispatch() checks it."""
        if not isinstance(request, dict):
            return self.refusal("QMP input must be a JSON object")
        reply = {"id": request["id"]} if "id" in request else {}

        def error(desc: str, error_class: str = GENERIC_ERROR) -> dict:
            return {"error": {"class": error_class, "desc": desc}, **reply}

        for key, value in request.items():
            if key == "execute" and not isinstance(value, str):
                return error("QMP input member 'execute' must be a string")
            if key == "arguments" and not isinstance(value, dict):
                return error("QMP input member 'arguments' must be an object")
            if key not in ("execute", "arguments", "id"):     # "exec-oob" too: no oob
                return error(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            return error("QMP input lacks member 'execute'")
        name, arguments = request["execute"], request.get("arguments", {})
        if not session.negotiated and name != "qmp_capabilities":
            return error("Expecting capabilities negotiation with 'qmp_capabilities'",
                         COMMAND_NOT_FOUND)
        if session.negotiated and name == "qmp_capabilities":
            return error("Capabilities negotiation is already complete, command ignored",
                         COMMAND_NOT_FOUND)
        if name not in self._commands:
            return error(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        handler, parameters = self._commands[name]
        for key in arguments:
            if key not in parameters:
                return error(f"Parameter '{key}' is unexpected")
        try:
            return {"return": handler(session, arguments), **reply}
        except QmpError as exc:
            return error(str(exc), exc.error_class)
        except Exception as exc:
            self.log.exception("QMP command %s failed", name)
            return error(f"{name} failed: {exc}")

    def _qmp_capabilities(self, session: _Session, arguments: dict) -> dict:
        enable = arguments.get("enable", [])
        if not isinstance(enable, list):
            raise QmpError("Invalid parameter type for 'enable', expected: array")
        for capability in enable:
            if capability not in KNOWN_CAPABILITIES:
                raise QmpError(f"Parameter 'enable' does not accept value '{capability}'")
            if capability not in CAPABILITIES:
                raise QmpError(f"Capability {capability} not available")
        session.negotiated = True
        return {}

    def _query_commands(self, session: _Session, arguments: dict) -> list:
        return [{"name": name} for name in self._commands]

    def _query_status(self, session: _Session, arguments: dict) -> dict:
        status = run_state(self.vm)
        return {"running": status == "running", "status": status}

    def _query_cpus_fast(self, session: _Session, arguments: dict) -> list:
        """CpuInfoFast for each vCPU.  pyhyve has no QOM tree: "qom-path" (which
        the schema requires) only names the vCPU; "thread-id" is 0 before the
        vCPU's thread first ran."""
        cpus = []
        for vcpu in self.vm.vcpus:
            socket_id, core_id, thread_id = self.vm.topology.location(vcpu.id)
            cpus.append({"cpu-index": vcpu.id, "qom-path": f"/machine/vcpu[{vcpu.id}]",
                         "thread-id": vcpu.native_id or 0, "target": TARGET,
                         "props": {"socket-id": socket_id, "core-id": core_id,
                                   "thread-id": thread_id}})
        return cpus

    def _stop(self, session: _Session, arguments: dict) -> dict:
        if self.vm.exit_status is None:
            self.vm.pause()
        return {}

    def _cont(self, session: _Session, arguments: dict) -> dict:
        if self.vm.exit_status is not None:
            raise QmpError("The VM is shutting down; it cannot continue")
        self.vm.resume()
        return {}

    def _system_powerdown(self, session: _Session, arguments: dict) -> dict:
        self.vm.press_power_button()
        return {}

    def _system_wakeup(self, session: _Session, arguments: dict) -> dict:
        if not self.vm.wakeup("host"):
            raise QmpError("Unable to wake up: guest is not in suspended state")
        return {}

    def _system_reset(self, session: _Session, arguments: dict) -> dict:
        try:
            self.vm.request_reset(cause="qmp")
        except RuntimeError as exc:
            raise QmpError(str(exc)) from None
        return {}

    def _input_send_event(self, session: _Session, arguments: dict) -> dict:
        """QEMU's input-send-event without "device" and "head": the events go
        to the newest ready keyboard or pointer (pyhyve.inputroute)."""
        try:
            inputevents.send(self.vm.context.input, arguments.get("events"))
        except inputevents.InputEventError as exc:
            raise QmpError(f"input-send-event: {exc}") from None
        return {}

    def _quit(self, session: _Session, arguments: dict) -> dict:
        self.vm.stop(ExitStatus.POWEROFF, cause="qmp")
        return {}

    def _migrations(self):
        if self.vm.migration is None:
            raise QmpError("this VM cannot migrate: it was started without "
                           "-o migration.key=PATH")
        return self.vm.migration

    def _migrate(self, session: _Session, arguments: dict) -> dict:
        from .config import ConfigError
        from .migration import parse_address
        from .migstream import MigrationError
        uri = arguments.get("uri")
        if not isinstance(uri, str) or not uri.startswith("tcp:"):
            raise QmpError("pyhyve migrates to a tcp:HOST:PORT uri only")
        try:
            host, port = parse_address(uri[len("tcp:"):], "uri")
            self._migrations().start(host, port)
        except (ConfigError, MigrationError) as exc:
            raise QmpError(str(exc)) from None
        return {}

    def _query_migrate(self, session: _Session, arguments: dict) -> dict:
        return self.vm.migration.info() if self.vm.migration is not None else {}

    def _migrate_cancel(self, session: _Session, arguments: dict) -> dict:
        if self.vm.migration is not None:
            self.vm.migration.cancel()
        return {}

    def _set_migrate_parameters(self, session: _Session, arguments: dict) -> dict:
        """Taken by the next migration (one under way keeps its own)."""
        migrations = self._migrations()
        values = {}
        for name, low, high in (("downtime-limit", 1, 2000000), ("max-bandwidth", 0, 1 << 50)):
            if name in arguments:
                value = arguments[name]
                if not isinstance(value, int) or isinstance(value, bool) \
                        or not low <= value <= high:
                    raise QmpError(f"Parameter '{name}' expects an integer from {low} "
                                   f"to {high}")
                values[name] = value
        migrations.downtime_ms = values.get("downtime-limit", migrations.downtime_ms)
        migrations.bandwidth = values.get("max-bandwidth", migrations.bandwidth)
        return {}

    def _query_migrate_parameters(self, session: _Session, arguments: dict) -> dict:
        migrations = self._migrations()
        return {"downtime-limit": migrations.downtime_ms,
                "max-bandwidth": migrations.bandwidth}

    # --- events ------------------------------------------------------------------------------
    def _screendump(self, session: _Session, arguments: dict) -> dict:
        filename, kind = arguments.get("filename"), arguments.get("format", "ppm")
        if not isinstance(filename, str) or not filename:
            raise QmpError("Parameter 'filename' is missing")
        if kind not in ("ppm", "png"):
            raise QmpError(f"Parameter 'format' does not accept value '{kind}'")
        if arguments.get("head", 0) != 0:
            raise QmpError("the display has one head, 0")
        display = find_display(self.vm.devices)
        if display is None or arguments.get("device", display.description) not in (
                display.description, display.name):
            raise QmpError("no such display device (the VM's display is -s SLOT,fbuf)")
        path = os.path.abspath(filename)
        refusal = snapshot_refusal(path, self.vm.config)
        if refusal:
            raise QmpError(f"screendump: {refusal}")
        update = display.screen.refresh()
        data = getattr(imagefile, kind)(update.width, update.height, update.pixels)
        try:
            with open(path, "wb") as file:
                file.write(data)
        except OSError as exc:
            raise QmpError(f"cannot write {path}: {exc.strerror or exc}") from None
        return {}

    def _vm_event(self, event: str, details: dict) -> None:
        """A VM listener: on whatever thread the event happened; never blocks."""
        when = time.time()
        if event == "paused":
            message = event_message("STOP", when=when)
        elif event == "resumed":
            message = event_message("RESUME", when=when)
        elif event == "power-button":
            message = event_message("POWERDOWN", when=when)
        elif event == "suspend":
            message = event_message("SUSPEND", when=when)
        elif event == "wakeup":
            message = event_message("WAKEUP", when=when)
        elif event == "reset":
            guest, reason = shutdown_reason(details["cause"])
            message = event_message("RESET", {"guest": guest, "reason": reason}, when)
        elif event == "stopping":
            guest, reason = shutdown_reason(details["cause"], details["status"])
            message = event_message("SHUTDOWN", {"guest": guest, "reason": reason}, when)
        else:
            return
        self.post(lambda: self._broadcast(message))

    def _broadcast(self, message: dict) -> None:
        for client in self.connected_clients():
            if client.session is not None and client.session.negotiated:
                self.send(client, message)
