"""The control socket and pyhyvectl, driving a real guest that loops on port writes."""

import contextlib
import json
import os
import subprocess
import sys
import re
import signal
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

from guestrun import REPO, run_pyhyve
from types import SimpleNamespace

import pytest

from build import build_rom
import pyhyve
from pyhyve import ctl as ctl_module, ctlclient, sockservice
from pyhyve.devices.pm import PWRBTN_STS
from pyhyve.config import Config, ConfigError
from pyhyve.ctl import ControlClient, ControlError, ControlServer, default_socket_path
from pyhyve.ctl import segment_access, set_segment_access
from pyhyve.kvm import abi
from pyhyve.vcpu import ExitStatus, install_kick_handler
from pyhyve.vm import VirtualMachine

needs_kvm = pytest.mark.usefixtures("needs_kvm")


@pytest.fixture
def socket_dir():
    """A short directory: AF_UNIX paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="pyhyve-ctl-") as directory:
        yield Path(directory)


def make_vm(name="ctltest", cpus=1):
    rom = build_rom("exits", COUNT=10**8)      # minutes of port writes
    return VirtualMachine(Config({"name": name, "cpus": str(cpus), "lpc.bootrom": str(rom)}))


@contextlib.contextmanager
def run_vm(path, cpus=1):
    """A VM running on a thread, with its control server on PATH."""
    install_kick_handler()
    vm = make_vm(cpus=cpus)
    try:
        server = ControlServer(vm, path)
    except BaseException:
        vm.close()
        raise
    statuses = []
    thread = threading.Thread(target=lambda: statuses.append(vm.run()), name="test-vm")
    thread.start()
    guest = SimpleNamespace(vm=vm, server=server, path=path, thread=thread, statuses=statuses)
    try:
        wait_for(lambda: io_exits(guest) > 0)
        yield guest
    finally:
        vm.stop(ExitStatus.POWEROFF)
        thread.join(10)
        server.close()
        vm.close()


@pytest.fixture
def running(socket_dir):
    with run_vm(str(socket_dir / "ctltest.sock")) as guest:
        yield guest


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def ask(path, request) -> dict:
    with ControlClient(path) as client:
        try:
            return client.request(**request)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}


def io_exits(guest) -> int:
    return ask(guest.path, {"command": "get-stats"})["stats"].get("io", 0)


def ctl(capsys, *args) -> tuple[int, str, str]:
    status = ctlclient.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def raw_connection(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def read_line(sock) -> dict:
    """One answer, read a byte at a time: two answers may arrive in one segment."""
    data = b""
    while not data.endswith(b"\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed after {data!r}"
        data += byte
    return json.loads(data)


# --- the running guest --------------------------------------------------------------------
@needs_kvm
def test_stats_grow_pause_freezes_them_resume_lets_them_grow(running, capsys):
    first = io_exits(running)
    wait_for(lambda: io_exits(running) > first)
    assert ask(running.path, {"command": "pause"}) == {"ok": True, "vm": "ctltest"}
    frozen = io_exits(running)
    time.sleep(0.3)
    assert io_exits(running) == frozen
    status, out, _ = ctl(capsys, f"--socket={running.path}", "--get-stats")
    assert status == 0
    assert out.splitlines()[0] == "vcpu0 stats:"
    assert re.search(rf"^vm exits due to io\s+\t{frozen}$", out, re.M), out
    assert re.search(r"^writes queued, not exits \(all vCPUs\)\s+\t\d+$", out, re.M), out
    assert ask(running.path, {"command": "resume"}) == {"ok": True, "vm": "ctltest"}
    wait_for(lambda: io_exits(running) > frozen)


@needs_kvm
def test_get_rip_and_get_all(running, capsys):
    status, out, err = ctl(capsys, "--vm=ctltest", f"--socket={running.path}", "--get-rip")
    assert (status, err) == (0, "")
    assert re.fullmatch(r"rip\[0\]\t\t0x000000000000[0-9a-f]{4}\n", out), out   # 16-bit IP

    answer = ask(running.path, {"command": "get-all"})
    registers = answer["registers"]
    assert registers["cs"]["selector"] == 0xF000 and registers["cs"]["base"] == 0xFFFF0000
    assert registers["cr0"] & 1 == 0                      # real mode
    assert set(registers) >= {"rax", "r15", "rflags", "efer", "cr3", "ldtr", "gdtr", "idtr"}

    status, out, _ = ctl(capsys, f"--socket={running.path}", "--get-all")
    lines = out.splitlines()
    assert status == 0
    assert lines[0].startswith("efer[0]\t\t0x")
    assert "rflags[0]\t0x" in out and "cs[0]\t\t0xf000" in lines
    assert re.search(r"^cs desc\[0\]\t0x00000000ffff0000/0x0000ffff/0x[0-9a-f]{8}$", out, re.M)
    assert re.search(r"^gdtr\[0\]\t\t0x[0-9a-f]{16}/0x[0-9a-f]{8}$", out, re.M)
    assert "vcpu0 stats:" in lines


@needs_kvm
def test_json_prints_the_answers(running, capsys):
    """--json: each answer as the VM gave it, one line each, with its command."""
    status, out, err = ctl(capsys, f"--socket={running.path}", "--json", "--get-rip",
                           "--get-desc-cs", "--get-cs")
    assert (status, err) == (0, "")
    rip, cs = (json.loads(line) for line in out.splitlines())
    assert rip == {"command": "get-rip", "ok": True, "vcpu": 0, "register": "rip",
                   "value": rip["value"]} and 0 < rip["value"] < 0x10000
    assert cs["command"] == "get-cs" and cs["value"]["selector"] == 0xF000
    assert set(cs["value"]) == {"selector", "base", "limit", "access"}

    status, out, _ = ctl(capsys, f"--socket={running.path}", "--json", "--pause",
                         "--get-stats", "--resume")
    lines = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [line["command"] for line in lines] == ["pause", "get-stats",
                                                                    "resume"]
    assert lines[0] == {"command": "pause", "ok": True, "vm": "ctltest"} and lines[1]["stats"]["io"] > 0

    status, out, _ = ctl(capsys, f"--socket={running.path}", "--json", "--get-all")
    everything, stats = (json.loads(line) for line in out.splitlines())
    assert status == 0 and everything["command"] == "get-all" and stats["command"] == "get-stats"
    assert everything["registers"]["cs"]["selector"] == 0xF000

    status, out, err = ctl(capsys, f"--socket={running.path}", "--json", "--cpu=3",
                           "--get-rip")
    assert status == 1 and err == "pyhyvectl: no vcpu 3: the VM has vCPUs 0 to 0\n"
    assert json.loads(out) == {"command": "get-rip", "ok": False,
                               "error": "no vcpu 3: the VM has vCPUs 0 to 0"}

    status, out, err = ctl(capsys, "--list", "--json", f"--socket={running.path}")
    assert (status, err) == (0, "")
    [listed] = json.loads(out)
    assert listed == {"name": "ctltest", "pid": os.getpid(), "vcpus": 1,
                      "memory": running.vm.memory.size, "state": "running",
                      "uptime": listed["uptime"]}


@needs_kvm
def test_set_registers_while_paused(running, capsys):
    ask(running.path, {"command": "pause"})
    status, out, _ = ctl(capsys, f"--socket={running.path}", "--set-rax=0x1122334455667788",
                         "--get-rax")
    assert (status, out) == (0, "vm ctltest: vcpu0 rax set to 0x1122334455667788\n"
                                "rax[0]\t\t0x1122334455667788\n")
    answer = ask(running.path, {"command": "set-rbx", "value": "0xabc"})
    assert answer == {"ok": True, "vm": "ctltest", "vcpu": 0, "register": "rbx", "value": 0xABC}
    assert ask(running.path, {"command": "get-rbx"})["value"] == 0xABC
    rip = ask(running.path, {"command": "get-rip"})["value"]
    assert ask(running.path, {"command": "set-rip", "value": rip})["value"] == rip
    fs = ask(running.path, {"command": "set-fs", "value": {"base": 0x12340, "selector": 0x1234}})
    assert (fs["value"]["base"], fs["value"]["selector"]) == (0x12340, 0x1234)
    status, out, _ = ctl(capsys, f"--socket={running.path}", "--get-desc-fs", "--get-fs")
    assert out == (f"fs desc[0]\t0x0000000000012340/0x0000ffff/0x{fs['value']['access']:08x}\n"
                   "fs[0]\t\t0x1234\n")
    ask(running.path, {"command": "resume"})
    frozen = io_exits(running)
    wait_for(lambda: io_exits(running) > frozen)


@needs_kvm
def test_vcpu_selects_an_ap(socket_dir, capsys):
    with run_vm(str(socket_dir / "smp.sock"), cpus=2) as guest:
        assert ask(guest.path, {"command": "get-rip", "vcpu": 1})["vcpu"] == 1
        error = ask(guest.path, {"command": "get-rip", "vcpu": 2})["error"]
        assert error == "no vcpu 2: the VM has vCPUs 0 to 1"
        status, out, _ = ctl(capsys, f"--socket={guest.path}", "--cpu=1", "--get-stats",
                             "--get-cr0")
        assert status == 0 and out.startswith("cr0[1]\t\t0x") and "vcpu1 stats:" in out
        status, _, err = ctl(capsys, f"--socket={guest.path}", "--cpu=2", "--get-rip")
        assert (status, err) == (1, "pyhyvectl: no vcpu 2: the VM has vCPUs 0 to 1\n")


@needs_kvm
def test_inject_nmi(running, capsys):
    assert ask(running.path, {"command": "inject-nmi"}) == {"ok": True, "vm": "ctltest",
                                                            "vcpu": 0}
    assert ctl(capsys, f"--socket={running.path}", "--inject-nmi") == \
        (0, "vm ctltest: NMI injected into vcpu0\n", "")


@needs_kvm
@pytest.mark.parametrize("option, status, said", [
    ("--force-poweroff", ExitStatus.POWEROFF, "powered off (exit status 1)"),
    ("--force-reset", ExitStatus.RESET, "reset (exit status 0)"),
    ("--destroy", ExitStatus.POWEROFF, "destroyed, powered off (exit status 1)"),
])
def test_stopping_the_vm(running, capsys, option, status, said):
    assert ctl(capsys, f"--socket={running.path}", option) == (0, f"vm ctltest: {said}\n", "")
    running.thread.join(10)
    assert running.statuses == [status]


@needs_kvm
def test_force_poweroff_of_a_paused_vm(running):
    ask(running.path, {"command": "pause"})
    assert ask(running.path, {"command": "force-poweroff"}) == {"ok": True, "vm": "ctltest",
                                                                "status": 1}
    running.thread.join(10)
    assert running.statuses == [ExitStatus.POWEROFF]


# --- the socket -----------------------------------------------------------------------------
@needs_kvm
def test_socket_is_private(running, socket_dir):
    assert stat.S_IMODE(os.stat(running.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(running.path).st_mode)


@needs_kvm
def test_socket_directory_is_created_0700(socket_dir):
    vm = make_vm()
    path = socket_dir / "sub" / "vm.sock"
    server = ControlServer(vm, str(path))
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert [t for t in threading.enumerate() if t.name == "ctl"]
    finally:
        server.close()
        vm.close()
    assert not path.exists()


@needs_kvm
def test_two_clients_and_partial_lines(running):
    first, second = raw_connection(running.path), raw_connection(running.path)
    with first, second:
        first.sendall(b'{"command": "get-')
        second.sendall(b'{"command": "get-stats"}\n')
        assert read_line(second)["ok"]
        first.sendall(b'rip"}\n')
        assert read_line(first)["register"] == "rip"
        second.sendall(b'{"command": "get-rax"}\n{"command": "get-rbx"}\n')
        assert read_line(second)["register"] == "rax"
        assert read_line(second)["register"] == "rbx"


@needs_kvm
@pytest.mark.parametrize("line, error", [
    (b"{not json", "malformed request"),
    (b"[" * 60000, "malformed request"),
    (b'["get-rip"]', "expected a JSON object"),
    (b'{"vcpu": 0}', 'no "command"'),
    (b'{"command": "reboot-into-bios"}', "unknown command 'reboot-into-bios'"),
    (b'{"command": "get-rip", "vcpu": 1}', "no vcpu 1: the VM has vCPUs 0 to 0"),
    (b'{"command": "get-rip", "vcpu": "0"}', 'no vcpu "0"'),
    (b'{"command": "set-rip"}', 'set-rip needs a "value"'),
    (b'{"command": "set-rip", "value": -1}', "value must be a number from 0 to 0xff"),
    (b'{"command": "set-rip", "value": 18446744073709551616}', "value must be a number"),
    (b'{"command": "set-cs", "value": {"colour": 1}}', "set-cs takes a value with any of"),
    (b'{"command": "set-gdtr", "value": 5}', "set-gdtr takes a value with any of"),
])
def test_bad_requests_get_error_answers(running, line, error):
    with raw_connection(running.path) as sock:
        sock.sendall(line + b"\n")
        answer = read_line(sock)
        assert answer["ok"] is False and error in answer["error"], answer
        sock.sendall(b'{"command": "get-rip"}\n')
        assert read_line(sock)["ok"]


@needs_kvm
def test_an_overlong_line_closes_only_that_connection(running):
    with raw_connection(running.path) as sock:
        try:
            sock.sendall(b'{"command": "' + b"x" * 70000)
        except BrokenPipeError:
            pass
        answer = read_line(sock)
        assert answer == {"ok": False, "error": "request longer than 65536 bytes"}
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
    assert ask(running.path, {"command": "get-rip"})["ok"]


@needs_kvm
def test_other_users_are_refused(running, socket_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    os.chmod(socket_dir, 0o711)
    os.chmod(running.path, 0o666)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:                # the child connects as nobody and reports the answer
        try:
            os.setuid(65534)
            with raw_connection(running.path) as sock:
                os.write(writer, json.dumps(read_line(sock)).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    assert json.loads(report) == {"ok": False, "error": "permission denied"}


@needs_kvm
def test_a_second_server_for_a_running_vm_is_refused(running):
    with pytest.raises(ConfigError, match=r"VM ctltest is already running \(control socket "):
        ControlServer(running.vm, running.path)
    assert ask(running.path, {"command": "get-rip"})["ok"]


@needs_kvm
def test_close_after_the_thread_saw_closing(socket_dir):
    """The race a force-poweroff sets up: the control thread finishes its
    request, sees the VM closing and leaves before close() wakes it."""
    vm = make_vm()
    server = ControlServer(vm, str(socket_dir / "race.sock"))
    try:
        server._closing = True
        raw_connection(server.path).close()     # one more turn of the event loop
        server._thread.join(10)
        assert not server._thread.is_alive()
        server._closing = False
        server.close()
        assert not os.path.exists(server.path)
    finally:
        vm.close()


@needs_kvm
def test_a_stale_socket_is_replaced(socket_dir):
    path = str(socket_dir / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)
    leftover.close()            # as a pyhyve killed with SIGKILL leaves it
    vm = make_vm()
    server = ControlServer(vm, path)
    try:
        assert ask(path, {"command": "get-stats"}) == {"ok": True, "vcpu": 0, "stats": {},
                                                       "queued_writes": 0}
    finally:
        server.close()
        vm.close()
    assert not os.path.exists(path)


@needs_kvm
def test_a_file_in_the_way_is_left_alone(socket_dir):
    path = socket_dir / "file.sock"
    path.write_text("precious")
    vm = make_vm()
    try:
        with pytest.raises(ConfigError, match="a file that is not a socket is in the way"):
            ControlServer(vm, str(path))
    finally:
        vm.close()
    assert path.read_text() == "precious"


@needs_kvm
def test_list_names_answering_vms(running, socket_dir, capsys):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_dir / "dead.sock"))
    stale.close()
    status, out, err = ctl(capsys, "--list", f"--socket={running.path}")
    assert (status, err) == (0, "")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "PID", "UPTIME", "VCPUS", "MEMORY", "STATE"]
    name, pid, uptime, vcpus, memory, state = row.split()
    assert (name, pid, vcpus, memory, state) == ("ctltest", str(os.getpid()), "1",
                                                 f"{running.vm.memory.size >> 20}M", "running")
    assert re.fullmatch(r"0:\d\d:\d\d", uptime)
    assert ask(running.path, {"command": "pause"})["ok"]
    assert ctl(capsys, "--list", f"--socket={running.path}")[1].split()[-1] == "paused"


# --- pyhyvectl without a VM ---------------------------------------------------------------------
def test_missing_vm_is_one_line(capsys, socket_dir):
    path = socket_dir / "nope.sock"
    status, out, err = ctl(capsys, "--vm=nope", f"--socket={path}", "--get-rip")
    assert (status, out) == (1, "")
    assert err == f"pyhyvectl: VM 'nope' is not running (no control socket {path})\n"

    status, _, err = ctl(capsys, "--vm=pyhyve-test-no-such-vm", "--get-stats")
    assert status == 1
    assert err == ("pyhyvectl: VM 'pyhyve-test-no-such-vm' is not running (no control socket "
                   f"{default_socket_path('pyhyve-test-no-such-vm')})\n")


def test_list_json_without_vms(capsys, socket_dir):
    assert ctl(capsys, "--list", "--json", f"--socket={socket_dir}/none.sock") == (0, "[]\n", "")
    assert ctl(capsys, "--list", f"--socket={socket_dir}/none.sock") \
        == (0, "NAME                      PID     UPTIME VCPUS   MEMORY  STATE\n", "")


def test_stale_socket_is_reported(capsys, socket_dir):
    path = socket_dir / "dead.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()
    status, _, err = ctl(capsys, "--vm=dead", f"--socket={path}", "--pause")
    assert status == 1
    assert err == f"pyhyvectl: VM 'dead' is not running (stale control socket {path})\n"


@pytest.mark.parametrize("args, message", [
    ([], "--vm=NAME is required"),
    (["--vm=x"], "nothing to do"),
    (["--vm=x", "--bogus"], "option --bogus not recognized"),
    (["--vm=x", "--set-rip=twelve"], "invalid value 'twelve' for --set-rip"),
    (["--vm=x", "--get-rip", "extra"], "unexpected argument 'extra'"),
    (["--vm=../x", "--get-rip"], "VM name '../x' cannot name a control socket"),
])
def test_usage_errors_are_one_line(capsys, args, message):
    status, out, err = ctl(capsys, *args)
    assert (status, out) == (1, "")
    assert err.startswith("pyhyvectl: ") and err.count("\n") == 1 and message in err, err


def test_help(capsys):
    status, out, _ = ctl(capsys, "--help")
    assert status == 0 and "--force-poweroff" in out
    assert ctl(capsys, "-h") == (0, out, "")
    assert ctl(capsys, "--version") == (0, f"pyhyvectl {pyhyve.__version__}\n", "")


@needs_kvm
def test_powerdown_presses_the_power_button(running, capsys):
    """As virsh shutdown: the guest is asked (PWRBTN_STS), the VM runs on."""
    assert not running.vm.pm.status & PWRBTN_STS
    assert ctl(capsys, f"--socket={running.path}", "--powerdown") == \
        (0, "vm ctltest: power button pressed (the guest decides)\n", "")
    assert running.vm.pm.status & PWRBTN_STS
    assert running.thread.is_alive()


@needs_kvm
def test_wakeup_of_a_guest_that_does_not_sleep_is_refused(running, capsys):
    assert ctl(capsys, f"--socket={running.path}", "--wakeup") == \
        (1, "", "pyhyvectl: VM ctltest is not suspended (ACPI S3): nothing to wake\n")
    assert running.thread.is_alive()


def start_pyhyve(*args: str) -> subprocess.Popen:
    """pyhyve as users run it, on a guest that writes ports for minutes."""
    rom = build_rom("exits", COUNT=10**8)
    return subprocess.Popen([sys.executable, "-m", "pyhyve", "-l", f"bootrom,{rom}", *args],
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_file(path: Path, timeout: float = 30.0) -> None:
    wait_for(path.exists, timeout)


@needs_kvm
def test_pidfile_holds_the_pid_while_the_vm_runs(tmp_path):
    """-o pidfile=PATH, as QEMU's -pidfile: there while pyhyve runs, gone after."""
    pidfile, sock = tmp_path / "vm.pid", tmp_path / "pid.sock"
    vm = start_pyhyve("-o", f"pidfile={pidfile}", "-o", f"control.socket={sock}", "pidvm")
    try:
        wait_for_file(pidfile)          # written after the socket, before the guest runs
        assert pidfile.read_text() == f"{vm.pid}\n"
        assert ask(str(sock), {"command": "force-poweroff"})["ok"]
        assert vm.wait(timeout=30) == ExitStatus.POWEROFF, vm.stderr.read()
        assert not pidfile.exists()
    finally:
        vm.kill()
        vm.wait()


@needs_kvm
def test_sigterm_grace_powers_off_a_guest_that_ignores_the_button(tmp_path):
    """-o poweroff.grace=SECONDS: the exits guest ignores the power button; one
    SIGTERM is enough, and the sockets and pidfile go with it.  Without the
    option the VM runs on (bhyve's way) until a force-poweroff."""
    pidfile, sock = tmp_path / "vm.pid", tmp_path / "grace.sock"
    vm = start_pyhyve("-o", "poweroff.grace=0.5", "-o", f"pidfile={pidfile}",
                      "-o", f"control.socket={sock}", "gracevm")
    bhyve = start_pyhyve("-o", f"control.socket={tmp_path / 'bhyve.sock'}", "nogracevm")
    try:
        wait_for_file(pidfile)
        wait_for_file(tmp_path / "bhyve.sock")
        vm.send_signal(signal.SIGTERM)
        bhyve.send_signal(signal.SIGTERM)
        assert vm.wait(timeout=60) == ExitStatus.POWEROFF
        assert vm.stderr.read() == ("pyhyve: SIGTERM: the guest did not power off "
                                    "within 0.5 s: powered off\n")
        assert not sock.exists() and not pidfile.exists()
        assert bhyve.poll() is None
        assert ask(str(tmp_path / "bhyve.sock"), {"command": "force-poweroff"})["ok"]
        assert bhyve.wait(timeout=30) == ExitStatus.POWEROFF
    finally:
        for proc in (vm, bhyve):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("value", ["-1", "soon", "1e9", "nan"])
def test_a_bad_grace_is_one_line(tmp_path, value):
    result = subprocess.run([sys.executable, "-m", "pyhyve", "-o", f"poweroff.grace={value}",
                             "-l", f"bootrom,{build_rom('exits', COUNT=1)}", "badgrace"],
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == ExitStatus.ERROR
    assert result.stderr == (f"pyhyve: poweroff.grace: '{value}' is not a number of seconds "
                             "from 0 to 86400 (or none)\n")


def test_access_rights_round_trip():
    segment = abi.kvm_segment(type=0xB, s=1, dpl=3, present=1, avl=1, l=1, db=0, g=1)
    assert segment_access(segment) == 0xB | 1 << 4 | 3 << 5 | 1 << 7 | 1 << 12 | 1 << 13 | 1 << 15
    copy = abi.kvm_segment()
    set_segment_access(copy, segment_access(segment) | 1 << 16)
    assert segment_access(copy) == segment_access(segment) | 1 << 16 and copy.unusable == 1


def test_pyhyve_and_pyhyvectl_processes(tmp_path):
    """The commands as users run them: a VM with its socket, a second VM of the
    same name refused, pyhyvectl reading stats and powering the VM off."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    socket_path = tmp_path / "ctlvm.sock"
    rom = build_rom("exits", COUNT=10**8)
    args = ["-o", f"control.socket={socket_path}", "-l", f"bootrom,{rom}", "ctlvm"]
    vm = subprocess.Popen([sys.executable, "-m", "pyhyve", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(socket_path)
        second = run_pyhyve(args, timeout=30)
        assert second.returncode == 4
        assert second.stderr.count("\n") == 1 and "already running" in second.stderr
        ctl = [sys.executable, "-m", "pyhyve.ctlclient", f"--socket={socket_path}"]
        stats = subprocess.run([*ctl, "--get-stats"], env=env, capture_output=True, text=True,
                               timeout=30)
        assert stats.returncode == 0 and "vm exits due to io" in stats.stdout
        off = subprocess.run([*ctl, "--force-poweroff"], env=env, capture_output=True,
                             text=True, timeout=30)
        assert off.returncode == 0, off.stderr
        assert vm.wait(timeout=30) == 1, vm.stderr.read()
        assert not socket_path.exists(), vm.stderr.read()
    finally:
        vm.kill()
        vm.wait()


@needs_kvm
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_stop_signals_power_off_and_clean_up(tmp_path, signum):
    """A terminal closing (SIGHUP), Ctrl-C and Ctrl-\\ end a running VM as a
    power-off: the control socket is removed, one line says why, no traceback."""
    socket_path = tmp_path / "sig.sock"
    vm = start_pyhyve("-o", f"control.socket={socket_path}", "sigvm")
    try:
        wait_for_file(socket_path)
        assert ask(str(socket_path), {"command": "get-stats"})["ok"]
        vm.send_signal(signum)
        assert vm.wait(timeout=30) == ExitStatus.POWEROFF
        assert vm.stderr.read() == f"pyhyve: {signal.Signals(signum).name}: powered off\n"
        assert not socket_path.exists()
    finally:
        vm.kill()
        vm.wait()


@needs_kvm
def test_idle_connections_cannot_lock_the_operator_out(running):
    """Every connection taken by clients that never ask anything: the operator
    still gets an answer, and the longest-idle connection is told why it goes."""
    idle = [raw_connection(running.path) for _ in range(ctl_module.MAX_CLIENTS)]
    try:
        wait_for(lambda: len(running.server._clients) == ctl_module.MAX_CLIENTS)
        assert ask(running.path, {"command": "get-rip"})["ok"]
        assert read_line(idle[0]) == {"ok": False,
                                      "error": "connection closed: room needed for a new one"}
        assert idle[0].recv(1) == b""
    finally:
        for sock in idle:
            sock.close()


@needs_kvm
def test_a_connection_idle_too_long_is_closed(socket_dir, monkeypatch):
    monkeypatch.setattr(sockservice, "IDLE_TIMEOUT", 0.4)
    with run_vm(str(socket_dir / "idle.sock")) as guest:
        with raw_connection(guest.path) as quiet, raw_connection(guest.path) as busy:
            for _ in range(6):              # requests keep `busy` open past the timeout
                busy.sendall(b'{"command": "get-rip"}\n')
                assert read_line(busy)["ok"]
                time.sleep(0.15)
            assert read_line(quiet) == {"ok": False,
                                        "error": "connection closed: no request for 0.4 s"}
            assert quiet.recv(1) == b""
            busy.sendall(b'{"command": "get-rip"}\n')
            assert read_line(busy)["ok"]


@needs_kvm
def test_consoles_says_where_each_console_is(socket_dir, capsys):
    """The request pyhyvectl --console finds a console with: each COM port and
    virtio-console port, its backend and where to reach it."""
    rom = build_rom("exits", COUNT=10**8)
    link, sock, log = socket_dir / "com1", socket_dir / "com2.sock", socket_dir / "com4.log"
    vm = VirtualMachine(Config({
        "name": "consoles", "lpc.bootrom": str(rom), "lpc.com1.path": f"pty,link={link}",
        "lpc.com2.path": f"unix={sock}", "lpc.com3.path": "tcp=127.0.0.1:0",
        "lpc.com4.path": f"file={log}", "pci.0.5.0.device": "virtio-console",
        "pci.0.5.0.port.0.name": "hvc", "pci.0.5.0.port.0.path": "pty"}))
    server = ControlServer(vm, str(socket_dir / "consoles.sock"))
    try:
        answer = ask(server.path, {"command": "consoles"})
        port = vm.uarts["com3"].backend.address[1]
        hvc = vm.pci.functions[5, 0].model.ports[0].backend.path
        assert answer == {"ok": True, "consoles": [
            {"name": "com1", "device": "uart", "kind": "pty", "path": os.readlink(link),
             "link": str(link)},
            {"name": "com2", "device": "uart", "kind": "unix", "path": str(sock)},
            {"name": "com3", "device": "uart", "kind": "tcp", "address": ["127.0.0.1", port]},
            {"name": "com4", "device": "uart", "kind": "file", "path": str(log)},
            {"name": "hvc", "device": "virtio-console 5.0", "kind": "pty", "path": hvc}]}
        assert hvc.startswith("/dev/pts/") and hvc != os.readlink(link)
    finally:
        server.close()
        vm.close()
    assert not os.path.lexists(link) and not sock.exists()
