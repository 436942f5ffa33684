"""QMP (`-o qmp.socket=PATH`): pyhyve driven by the qemu.qmp library's QMPClient,
as QEMU is, on real guests; the protocol's edges over a raw socket; and the
same conversation held with QEMU's own QMP, to compare shapes."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from qemu.qmp import ExecuteError, QMPClient

import pyhyve
from build import build_rom
from firmware import require_program
from guestrun import REPO
from pyhyve import sockservice
from pyhyve.config import Config
from pyhyve.qmp import QmpServer, shutdown_reason
from pyhyve.vcpu import ExitStatus
from pyhyve.vm import VirtualMachine

pytestmark = pytest.mark.usefixtures("needs_kvm")

COMMANDS = {"qmp_capabilities", "query-commands", "query-version", "query-name",
            "query-status", "query-cpus-fast", "stop", "cont", "system_powerdown",
            "system_wakeup", "system_reset", "quit", "screendump", "migrate", "query-migrate",
            "migrate_cancel", "migrate-set-parameters", "query-migrate-parameters",
            "input-send-event"}
GREETING = {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0},
                                "package": f"pyhyve {pyhyve.__version__}"},
                    "capabilities": []}}
NOT_NEGOTIATED = {"class": "CommandNotFound",
                  "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
TIMEOUT = 20.0


@pytest.fixture
def socket_dir():
    """A short directory: AF_UNIX paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="pyhyve-qmp-") as directory:
        yield Path(directory)


def counter_rom() -> Path:
    """Counts in RAM for minutes, printing "count N" every 5; reset, it starts over."""
    return build_rom("counter", TARGET=1 << 30, EVERY=5, DELAY=2000)


@contextlib.contextmanager
def pyhyve_process(directory: Path, rom: Path, *args: str, name: str = "qmpvm"):
    """pyhyve as users run it, with QMP on DIRECTORY/qmp.sock and the guest's
    debug port in DIRECTORY/debug."""
    guest = SimpleNamespace(qmp=str(directory / "qmp.sock"), ctl=str(directory / "ctl.sock"),
                            debug=directory / "debug")
    guest.proc = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-l", f"bootrom,{rom}",
         "-l", f"debugcon,file={guest.debug}", "-o", f"qmp.socket={guest.qmp}",
         "-o", f"control.socket={guest.ctl}", *args, name],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(guest.qmp) or guest.proc.poll() is not None, 30)
        assert guest.proc.poll() is None, guest.proc.stderr.read()
        yield guest
    finally:
        guest.proc.kill()
        guest.proc.wait()


@pytest.fixture
def counter(socket_dir):
    with pyhyve_process(socket_dir, counter_rom(), "-c", "2") as guest:
        wait_for(lambda: debug_text(guest).count("\n") > 0)
        yield guest


def wait_for(condition, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def debug_text(guest) -> str:
    return guest.debug.read_text() if guest.debug.exists() else ""


def qmp_session(path: str, ends_vm: bool = False):
    """Run `script(client)`, a coroutine function, with a QMPClient connected
    (and negotiated) to PATH; returns what it returns.  ENDS_VM: the script
    ends the VM, so the server hangs up first (which QMPClient.disconnect()
    reports as an EOFError, with QEMU as with pyhyve)."""
    def run(script):
        async def main():
            client = QMPClient("pyhyve-test")
            await asyncio.wait_for(client.connect(path), TIMEOUT)
            try:
                return await asyncio.wait_for(script(client), TIMEOUT)
            finally:
                try:
                    await client.disconnect()
                except EOFError:
                    if not ends_vm:
                        raise
        return asyncio.run(main())
    return run


async def next_event(client, name: str) -> dict:
    """The next event called NAME (QMPClient queues events from its connect on)."""
    async for event in client.events:
        if event["event"] == name:
            return dict(event)
    raise AssertionError(f"no {name} event")


def check_timestamp(event: dict) -> None:
    stamp = event["timestamp"]
    assert set(stamp) == {"seconds", "microseconds"}
    assert abs(stamp["seconds"] - time.time()) < 60 and 0 <= stamp["microseconds"] < 10**6


def grows(guest, seconds=0.3) -> bool:
    before = len(debug_text(guest))
    time.sleep(seconds)
    return len(debug_text(guest)) > before


# --- QMPClient on running guests --------------------------------------------------------------
def test_greeting_negotiation_and_the_queries(counter):
    async def script(client):
        assert client.greeting._asdict() == GREETING
        return (await client.execute("query-version"), await client.execute("query-name"),
                await client.execute("query-commands"))
    version, name, commands = qmp_session(counter.qmp)(script)
    assert version == GREETING["QMP"]["version"]
    assert name == {"name": "qmpvm"}
    assert {entry["name"] for entry in commands} == COMMANDS


def test_migration_needs_the_key_option(counter):
    """A VM started without migration.key neither migrates nor takes parameters
    (tests/test_migration.py migrates through QMP)."""
    async def script(client):
        info = await client.execute("query-migrate")
        for command, arguments in (("migrate", {"uri": "tcp:127.0.0.1:1"}),
                                   ("migrate-set-parameters", {"downtime-limit": 100})):
            with pytest.raises(ExecuteError, match="-o migration.key=PATH"):
                await client.execute(command, arguments)
        return info
    assert qmp_session(counter.qmp)(script) == {}


def test_stop_and_cont(counter):
    """stop: a STOP event, status paused, the guest prints no more; cont: RESUME."""
    async def script(client):
        running = await client.execute("query-status")
        assert await client.execute("stop") == {}
        stop = await next_event(client, "STOP")
        paused = await client.execute("query-status")
        frozen = await asyncio.to_thread(grows, counter)
        assert await client.execute("cont") == {}
        resume = await next_event(client, "RESUME")
        return running, stop, paused, frozen, resume, await client.execute("query-status")
    running, stop, paused, frozen, resume, again = qmp_session(counter.qmp)(script)
    assert running == {"running": True, "status": "running"}
    assert set(stop) == {"event", "timestamp"} and stop["event"] == "STOP"
    check_timestamp(stop)
    assert paused == {"running": False, "status": "paused"}
    assert not frozen
    assert set(resume) == {"event", "timestamp"}
    assert again == {"running": True, "status": "running"}
    printed = len(debug_text(counter))
    wait_for(lambda: len(debug_text(counter)) > printed)


def test_events_come_whoever_pauses(counter):
    """pyhyvectl --pause/--resume: every negotiated QMP client hears STOP and RESUME."""
    ctl = [sys.executable, "-m", "pyhyve.ctlclient", f"--socket={counter.ctl}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    async def script(client):
        other = QMPClient("second")
        await other.connect(counter.qmp)
        try:
            await asyncio.to_thread(subprocess.run, [*ctl, "--pause"], env=env, check=True)
            stops = [await next_event(client, "STOP"), await next_event(other, "STOP")]
            status = await other.execute("query-status")
            await asyncio.to_thread(subprocess.run, [*ctl, "--resume"], env=env, check=True)
            resumes = [await next_event(client, "RESUME"), await next_event(other, "RESUME")]
        finally:
            await other.disconnect()
        return stops, status, resumes
    stops, status, resumes = qmp_session(counter.qmp)(script)
    assert [event["event"] for event in stops + resumes] == ["STOP"] * 2 + ["RESUME"] * 2
    assert status["status"] == "paused"


def test_query_cpus_fast_names_the_vcpu_threads(counter):
    cpus = qmp_session(counter.qmp)(lambda client: client.execute("query-cpus-fast"))
    assert [cpu["cpu-index"] for cpu in cpus] == [0, 1]
    threads = {int(tid) for tid in os.listdir(f"/proc/{counter.proc.pid}/task")}
    ids = [cpu["thread-id"] for cpu in cpus]
    assert len(set(ids)) == 2 and set(ids) <= threads and counter.proc.pid not in ids, \
        (ids, threads)
    for cpu in cpus:
        assert set(cpu) == {"cpu-index", "qom-path", "thread-id", "target", "props"}
        assert cpu["target"] == "x86_64"
    # -c 2 is bhyve's: two sockets of one core
    assert [cpu["props"] for cpu in cpus] == [{"socket-id": n, "core-id": 0, "thread-id": 0}
                                              for n in (0, 1)]


def test_system_reset_resets_in_place(counter):
    """RESET (QEMU's data); the guest starts over (its count restarts) and pyhyve runs on."""
    wait_for(lambda: "count 5\n" in debug_text(counter))

    async def script(client):
        assert await client.execute("system_reset") == {}
        event = await next_event(client, "RESET")
        await asyncio.to_thread(wait_for, lambda: debug_text(counter).count("count 5\n") == 2)
        return event, await client.execute("query-status")
    event, status = qmp_session(counter.qmp)(script)
    assert event["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    check_timestamp(event)
    assert status == {"running": True, "status": "running"}
    assert counter.proc.poll() is None


def test_system_reset_of_a_paused_vm_stays_paused(counter):
    async def script(client):
        await client.execute("stop")
        await client.execute("system_reset")
        await next_event(client, "RESET")
        status = await client.execute("query-status")
        frozen = await asyncio.to_thread(grows, counter)
        await client.execute("cont")
        return status, frozen
    status, frozen = qmp_session(counter.qmp)(script)
    assert status["status"] == "paused" and not frozen
    wait_for(lambda: debug_text(counter).count("count 5\n") == 2)


def test_system_powerdown_a_guest_ignores(counter):
    async def script(client):
        assert await client.execute("system_powerdown") == {}
        event = await next_event(client, "POWERDOWN")
        await asyncio.sleep(0.3)
        return event, await client.execute("query-status")
    event, status = qmp_session(counter.qmp)(script)
    assert set(event) == {"event", "timestamp"}
    assert status["running"] and counter.proc.poll() is None


def test_system_wakeup_of_a_guest_that_does_not_sleep_is_refused(counter):
    """QEMU's error, word for word; a guest asleep in S3 is tests/test_suspend.py's."""
    async def script(client):
        with pytest.raises(ExecuteError) as error:
            await client.execute("system_wakeup")
        return error.value.error.error.desc, await client.execute("query-status")
    desc, status = qmp_session(counter.qmp)(script)
    assert desc == "Unable to wake up: guest is not in suspended state"
    assert status["status"] == "running"


@pytest.mark.parametrize("defines, reason, status", [
    ({}, "guest-shutdown", ExitStatus.POWEROFF),
    ({"REBOOT": 1}, "guest-reset", ExitStatus.RESET),     # QEMU's -no-reboot, as bhyve
])
def test_a_guest_that_listens_to_the_power_button(socket_dir, defines, reason, status):
    """POWERDOWN, then the guest's own power-off or reset: SHUTDOWN by the guest."""
    with pyhyve_process(socket_dir, build_rom("powerbutton", **defines)) as guest:
        wait_for(lambda: "waiting\n" in debug_text(guest))

        async def script(client):
            await client.execute("system_powerdown")
            return await next_event(client, "POWERDOWN"), await next_event(client, "SHUTDOWN")
        powerdown, shutdown = qmp_session(guest.qmp, ends_vm=True)(script)
        assert shutdown["data"] == {"guest": True, "reason": reason}
        assert guest.proc.wait(30) == status
        assert debug_text(guest) == "waiting\nbutton\n"


def test_quit_powers_off(counter):
    """quit: SHUTDOWN (host-qmp-quit), then pyhyve exits with bhyve's power-off status."""
    async def script(client):
        assert await client.execute("quit") == {}
        return await next_event(client, "SHUTDOWN")
    event = qmp_session(counter.qmp, ends_vm=True)(script)
    assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert counter.proc.wait(30) == ExitStatus.POWEROFF
    assert counter.proc.stderr.read() == ""
    assert not os.path.exists(counter.qmp)


def test_a_signal_is_a_host_signal_shutdown(counter):
    async def script(client):
        counter.proc.send_signal(signal.SIGINT)
        return await next_event(client, "SHUTDOWN")
    event = qmp_session(counter.qmp, ends_vm=True)(script)
    assert event["data"] == {"guest": False, "reason": "host-signal"}
    assert counter.proc.wait(30) == ExitStatus.POWEROFF


def test_errors_are_execute_errors(counter):
    async def script(client):
        errors = []
        for command, arguments in (("no-such-command", None), ("query-status", {"x": 1})):
            with pytest.raises(ExecuteError) as caught:
                await client.execute(command, arguments)
            errors.append(caught.value.error.error)      # ErrorResponse's ErrorInfo
        return errors
    unknown, unexpected = qmp_session(counter.qmp)(script)
    assert (unknown.class_, unknown.desc) == ("CommandNotFound",
                                              "The command no-such-command has not been found")
    assert (unexpected.class_, unexpected.desc) == ("GenericError", "Parameter 'x' is unexpected")


def test_input_send_event_checks_the_whole_list(counter):
    """Keys and pointer events go to the VM's input router (the i8042's
    keyboard here; tests/test_linux_desktop.py watches Linux receive them); a
    list with one bad event sends nothing and says which.  The control
    socket's send-input takes the same lists."""
    key = {"type": "key", "data": {"down": True, "key": {"type": "qcode", "data": "a"}}}
    bad = {"type": "key", "data": {"down": True, "key": {"type": "qcode", "data": "nosuch"}}}

    async def script(client):
        assert await client.execute("input-send-event", {"events": [key]}) == {}
        with pytest.raises(ExecuteError) as caught:
            await client.execute("input-send-event", {"events": [key, bad]})
        return caught.value.error.error
    error = qmp_session(counter.qmp)(script)
    assert (error.class_, error.desc) == ("GenericError",
                                          "input-send-event: event 1: unknown qcode 'nosuch'")
    for events, answer in (([key], {"ok": True, "vm": "qmpvm"}),
                           ([bad], {"ok": False, "error": "send-input: event 0: unknown "
                                                          "qcode 'nosuch'"})):
        with socket.socket(socket.AF_UNIX) as control:      # the control socket's send-input
            control.settimeout(TIMEOUT)
            control.connect(counter.ctl)
            control.sendall(json.dumps({"command": "send-input", "events": events}).encode()
                            + b"\n")
            assert json.loads(control.makefile().readline()) == answer


# --- the protocol's edges, on a raw socket ---------------------------------------------------
class RawQmp:
    """A QMP connection by hand: ask() sends bytes or an object and returns the
    next message that is not an event; events are kept in `events`."""

    def __init__(self, path: str, greet: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buffer = b""
        self.events: list[dict] = []
        self.greeting = self.read() if greet else None

    def read(self) -> dict:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed after {self.buffer!r}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def send(self, message) -> None:
        self.sock.sendall(message if isinstance(message, bytes)
                          else json.dumps(message).encode() + b"\n")

    def answer(self) -> dict:
        while True:
            message = self.read()
            if "event" not in message:
                return message
            self.events.append(message)

    def ask(self, message) -> dict:
        self.send(message)
        return self.answer()

    def event(self, name: str) -> dict:
        while True:
            for event in self.events:
                if event["event"] == name:
                    self.events.remove(event)
                    return event
            self.events.append(self.read())

    def close(self) -> None:
        self.sock.close()


def error(desc: str, error_class: str = "GenericError", **reply) -> dict:
    return {"error": {"class": error_class, "desc": desc}, **reply}


def test_commands_before_negotiation_are_refused(counter):
    raw = RawQmp(counter.qmp)
    try:
        assert raw.greeting == GREETING
        assert raw.ask({"execute": "query-status", "id": 7}) == {"error": NOT_NEGOTIATED,
                                                                  "id": 7}
        assert raw.ask({"execute": "quit"}) == {"error": NOT_NEGOTIATED}
        assert raw.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) \
            == error("Capability oob not available")
        assert raw.ask({"execute": "qmp_capabilities", "id": "n"}) == {"return": {}, "id": "n"}
        assert raw.ask({"execute": "qmp_capabilities"}) == error(
            "Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        assert raw.ask({"execute": "query-status"}) == {"return": {"running": True,
                                                                   "status": "running"}}
    finally:
        raw.close()
    assert counter.proc.poll() is None          # the early quit did nothing


def test_events_only_after_negotiation(counter):
    early, late = RawQmp(counter.qmp), RawQmp(counter.qmp)
    try:
        late.ask({"execute": "qmp_capabilities"})
        late.ask({"execute": "stop"})
        assert late.event("STOP")["event"] == "STOP"
        assert early.ask({"execute": "query-name", "id": 1})["id"] == 1
        assert early.events == []           # the STOP went out before this answer
        late.ask({"execute": "cont"})
        late.event("RESUME")
    finally:
        early.close()
        late.close()


@pytest.mark.parametrize("line, answer", [
    (b"{not json}", error("JSON parse error, unexpected 'n'")),
    (b'{"execute": }', error("JSON parse error, unexpected '}'")),
    (b'{"execute": "query-name', error("JSON parse error, control character in a string")),
    (b"[1, 2]", error("QMP input must be a JSON object")),
    (b'"query-name"', error("QMP input must be a JSON object")),
    (b"42", error("QMP input must be a JSON object")),
    (b"{}", error("QMP input lacks member 'execute'")),
    (b'{"execute": 5, "id": 1}', error("QMP input member 'execute' must be a string", id=1)),
    (b'{"execute": "query-name", "arguments": [], "id": 2}',
     error("QMP input member 'arguments' must be an object", id=2)),
    (b'{"execute": "query-name", "colour": 1}', error("QMP input member 'colour' is unexpected")),
    (b'{"exec-oob": "query-name"}', error("QMP input member 'exec-oob' is unexpected")),
    (b'{"execute": "query-name", "arguments": {"x": 1}}', error("Parameter 'x' is unexpected")),
    (b'{"execute": "human-monitor-command", "id": [1, {"a": null}]}',
     error("The command human-monitor-command has not been found", "CommandNotFound",
           id=[1, {"a": None}])),
    (b"[" * 300 + b"]" * 300, error("JSON parse error, nesting too deep")),
])
def test_bad_input_gets_an_error_and_the_connection_goes_on(counter, line, answer):
    raw = RawQmp(counter.qmp)
    try:
        raw.ask({"execute": "qmp_capabilities"})
        assert raw.ask(line + b"\n") == answer
        assert raw.ask({"execute": "query-name", "id": "after"}) == {"return": {"name": "qmpvm"},
                                                                     "id": "after"}
    finally:
        raw.close()


def test_messages_need_no_newline_and_may_be_split(counter):
    """As the qemu.qmp library sends them: back to back, and in pieces."""
    raw = RawQmp(counter.qmp)
    try:
        raw.send(b'{"execute":"qmp_capabilities"}{"execute":"query-name","id":1}'
                 b'  {"execute":"query-status",')
        assert raw.answer() == {"return": {}}
        assert raw.answer() == {"return": {"name": "qmpvm"}, "id": 1}
        time.sleep(0.1)
        raw.send(b'"id":2}')
        assert raw.answer()["id"] == 2
    finally:
        raw.close()


def test_an_overlong_message_closes_only_that_connection(counter):
    raw, other = RawQmp(counter.qmp), RawQmp(counter.qmp)
    try:
        raw.ask({"execute": "qmp_capabilities"})
        try:
            raw.send(b'{"execute": "' + b"x" * 70000)
        except BrokenPipeError:
            pass
        assert raw.answer() == error(f"request longer than {sockservice.MAX_LINE} bytes")
        with pytest.raises((EOFError, ConnectionResetError)):
            raw.read()
        assert other.ask({"execute": "qmp_capabilities"}) == {"return": {}}
    finally:
        raw.close()
        other.close()


# --- the socket itself (the control socket's machinery), in-process ---------------------------
@pytest.fixture
def idle_server(socket_dir):
    """A QMP server on a VM that was built and never run."""
    rom = build_rom("exits", COUNT=10)
    vm = VirtualMachine(Config({"name": "qmpidle", "lpc.bootrom": str(rom)}))
    try:
        server = QmpServer(vm, str(socket_dir / "qmp.sock"))
        try:
            yield server
        finally:
            server.close()
    finally:
        vm.close()
    assert not (socket_dir / "qmp.sock").exists()


def test_prelaunch_status_and_a_private_socket(idle_server):
    assert os.stat(idle_server.path).st_mode & 0o777 == 0o600
    assert [t for t in threading.enumerate() if t.name == "qmp"]
    raw = RawQmp(idle_server.path)
    try:
        raw.ask({"execute": "qmp_capabilities"})
        assert raw.ask({"execute": "query-status"}) == {"return": {"running": False,
                                                                   "status": "prelaunch"}}
        assert raw.ask({"execute": "query-cpus-fast"})["return"][0]["thread-id"] == 0
    finally:
        raw.close()


def test_only_unnegotiated_connections_time_out(idle_server, monkeypatch):
    """A client past qmp_capabilities may wait for events for as long as it likes."""
    monkeypatch.setattr(sockservice, "IDLE_TIMEOUT", 0.4)
    quiet, listening = RawQmp(idle_server.path), RawQmp(idle_server.path)
    try:
        listening.ask({"execute": "qmp_capabilities"})
        assert quiet.read() == error("connection closed: no request for 0.4 s")
        with pytest.raises(EOFError):
            quiet.read()
        time.sleep(0.5)
        assert listening.ask({"execute": "query-name"}) == {"return": {"name": "qmpidle"}}
    finally:
        quiet.close()
        listening.close()


def test_all_connections_taken_the_idlest_makes_room(idle_server):
    idle = [RawQmp(idle_server.path) for _ in range(sockservice.MAX_CLIENTS)]
    try:
        for raw in idle[1:]:
            raw.ask({"execute": "qmp_capabilities"})
        newcomer = RawQmp(idle_server.path)
        assert newcomer.greeting == GREETING
        assert idle[0].read() == error("connection closed: room needed for a new one")
        newcomer.close()
    finally:
        for raw in idle:
            raw.close()


def test_a_halted_guest_is_a_guest_shutdown():
    """bhyve's halt (every vCPU halted with interrupts off) ends the VM for the
    guest's own reason: the VM's listeners hear cause "guest", QMP says so."""
    vm = VirtualMachine(Config({"name": "qmphalt", "lpc.bootrom": str(build_rom("halt"))}))
    heard = []
    vm.listeners.append(lambda event, details: heard.append((event, details)))
    try:
        assert vm.run() == ExitStatus.HALT
    finally:
        vm.close()
    assert heard == [("stopping", {"status": ExitStatus.HALT, "cause": "guest"})]
    assert shutdown_reason("guest", ExitStatus.HALT) == (True, "guest-shutdown")


def test_other_users_are_refused(idle_server, socket_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    os.chmod(socket_dir, 0o711)
    os.chmod(idle_server.path, 0o666)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:                # the child connects as nobody and reports what it got
        try:
            os.setuid(65534)
            raw = RawQmp(idle_server.path, greet=False)
            os.write(writer, json.dumps(raw.read()).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    assert json.loads(report) == error("permission denied")


# --- QEMU's own QMP, for comparison ------------------------------------------------------------
SCRIPT = [      # (request, events it causes)
    ({"execute": "query-status"}, []),
    ({"execute": "stop"}, ["STOP"]),
    ({"execute": "query-status"}, []),
    ({"execute": "cont"}, ["RESUME"]),
    ({"execute": "query-cpus-fast"}, []),
    ({"execute": "query-version"}, []),
    ({"execute": "query-name"}, []),
    ({"execute": "query-commands"}, []),
    ({"execute": "system_reset"}, ["RESET"]),
    ({"execute": "system_powerdown"}, ["POWERDOWN"]),
    ({"execute": "query-status", "arguments": {"x": 1}, "id": 3}, []),
    ({"execute": "qmp_capabilities"}, []),
    ({"execute": "nosuch", "id": "u"}, []),
    ({"execute": "query-name", "arguments": None}, []),
    ({"execute": "query-name", "colour": 1}, []),
    ({"execute": 5}, []),
    ([1], []),
    ({"execute": "quit"}, ["SHUTDOWN"]),
]


def converse(path: str) -> tuple[dict, dict, list]:
    """Greeting, the answer to a command before negotiation, then for each of
    SCRIPT's requests its answer and its events."""
    raw = RawQmp(path)
    try:
        early = raw.ask({"execute": "query-name"})
        raw.ask({"execute": "qmp_capabilities"})
        transcript = []
        for request, events in SCRIPT:
            answer = raw.ask(request)
            transcript.append((answer, [raw.event(name) for name in events]))
        return raw.greeting, early, transcript
    finally:
        raw.close()


def shape(value):
    """A JSON value with each number replaced by its type (timestamps, thread ids)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return value


def test_same_shapes_as_qemus_qmp(socket_dir):
    """One conversation with pyhyve and with QEMU (TCG, SeaBIOS, the same CPU
    topology).  Where they differ, on purpose:
    - the version: QEMU's release and its package; pyhyve's own version (a
      client must not take pyhyve for a QEMU with all of its commands);
    - capabilities: QEMU offers out-of-band execution ("oob"), pyhyve does not;
    - query-status: QEMU 7.2 still has "singlestep" (a TCG setting; deprecated
      in QEMU 8.1 and removed in 9.0), pyhyve never had it;
    - query-cpus-fast's "qom-path": QEMU's QOM tree has the vCPUs where the
      machine created them; pyhyve has no QOM tree and only names the vCPU;
      its "props" are socket, core and thread, a newer QEMU may add more;
    - query-name: the VM's name, which each was given;
    - after quit QEMU exits 0, pyhyve with bhyve's power-off status 1."""
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    path = str(socket_dir / "qemu.sock")
    proc = subprocess.Popen([qemu, "-machine", "pc", "-accel", "tcg", "-nodefaults",
                             "-display", "none", "-smp", "2,sockets=1,cores=2,threads=1",
                             "-name", "qmpvm", "-qmp", f"unix:{path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(path) or proc.poll() is not None)
        if proc.poll() is not None:
            pytest.skip(f"QEMU did not start: {proc.stderr.read().strip()[-200:]}")
        theirs = converse(path)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    with pyhyve_process(socket_dir, counter_rom(), "-c", "cpus=2,sockets=1,cores=2") as guest:
        wait_for(lambda: "count" in debug_text(guest))      # running, as QEMU is
        ours = converse(guest.qmp)
        assert guest.proc.wait(30) == ExitStatus.POWEROFF

    (greeting, early, transcript), (qemu_greeting, qemu_early, qemu_transcript) = ours, theirs
    assert set(qemu_greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    qemu_greeting["QMP"]["version"] = greeting["QMP"]["version"]
    assert qemu_greeting["QMP"].pop("capabilities") == ["oob"]
    assert greeting["QMP"].pop("capabilities") == []
    assert greeting == qemu_greeting
    assert early == qemu_early == {"error": NOT_NEGOTIATED}

    assert len(transcript) == len(qemu_transcript) == len(SCRIPT)
    for (request, _), (answer, events), (qemu_answer, qemu_events) in zip(
            SCRIPT, transcript, qemu_transcript):
        command = request.get("execute") if isinstance(request, dict) else None
        if command == "query-status" and "return" in qemu_answer:
            assert qemu_answer["return"].pop("singlestep", False) is False
        elif command == "query-cpus-fast":
            assert len(answer["return"]) == len(qemu_answer["return"]) == 2
            for cpu, qemu_cpu in zip(answer["return"], qemu_answer["return"]):
                assert cpu["props"].items() <= qemu_cpu["props"].items()
                for entry in (cpu, qemu_cpu):
                    entry["qom-path"], entry["props"] = "(no QOM)", "(compared)"
        elif command == "query-version":
            qemu_answer["return"]["package"] = answer["return"]["package"]
        elif command == "query-commands":   # pyhyve's few, each of them QEMU's
            names = {entry["name"] for entry in answer["return"]}
            assert names == COMMANDS
            assert names <= {entry["name"] for entry in qemu_answer["return"]}
            continue
        assert shape(answer) == shape(qemu_answer), request
        assert shape(events) == shape(qemu_events), request
