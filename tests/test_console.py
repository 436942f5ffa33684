"""The interactive console (issue #17): the escape key of a stdio console, pty
consoles, and pyhyvectl --console, driven as users drive them, through real
pseudo-terminals, on tests/guests/uartecho.S (which echoes COM1 and powers
off on 'q', so no typed text here has a q in it)."""

import os
import pty
import pwd
import select
import shutil
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from build import build_rom
from guestrun import REPO, free_port, run_pyhyve
from pyhyve.config import ConfigError
from pyhyve.ctl import ControlClient
from pyhyve.escape import HELP, QUIT, EscapeFilter, describe, help_text, parse_escape
from pyhyve.vcpu import ExitStatus

ENV = dict(os.environ, PYTHONPATH=str(REPO))
TIMEOUT = 30.0
POWER_OFF_HELP = help_text(b"~", "power off the VM (as pyhyvectl --force-poweroff)")


# --- the escape filter ----------------------------------------------------------------
def feed_all(chunks, escape=b"~") -> list:
    keys = EscapeFilter(escape)
    return [item for chunk in chunks for item in keys.feed(chunk)]


def joined(items) -> list:
    """Adjacent bytes merged: how they are split says nothing."""
    out = []
    for item in items:
        if isinstance(item, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += item
        elif item != b"":
            out.append(item)
    return out


@pytest.mark.parametrize("typed, result", [
    (b"~.", [QUIT]),                                    # the session starts at a line start
    (b"ls\r~.rest", [b"ls\r", QUIT]),                   # nothing after ~. goes anywhere
    (b"ls\n~.", [b"ls\n", QUIT]),
    (b"a~.", [b"a~."]),                                 # mid-line: plain keys
    (b"~~", [b"~"]),
    (b"x\r~~y", [b"x\r~y"]),
    (b"~~~.", [b"~~."]),                                # after ~~ the line has begun
    (b"~?~.", [HELP, QUIT]),                            # after ~? the line has not
    (b"a\r~?b", [b"a\r", HELP, b"b"]),
    (b"~x", [b"~x"]),                                   # unknown: both go on, as in cu
    (b"~\r~.", [b"~\r", QUIT]),
    (b"\x03", [b"\x03"]),                               # Ctrl-C is the guest's
])
def test_escape_sequences(typed, result):
    assert joined(feed_all([typed])) == result
    assert joined(feed_all([bytes((b,)) for b in typed])) == result   # a key at a time


def test_a_held_escape_waits_for_its_key():
    keys = EscapeFilter(b"~")
    assert keys.feed(b"\r~") == [b"\r"]
    assert keys.feed(b".") == [QUIT]


@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"q", b"")), max_size=8),
       st.sampled_from([b"~", b"\x1d", b"."]))
def test_how_input_is_split_changes_nothing(chunks, escape):
    whole = joined(feed_all([b"".join(chunks)], escape))
    assert joined(feed_all(chunks, escape)) == whole
    if escape not in b"".join(chunks):
        assert whole == ([b"".join(chunks)] if b"".join(chunks) else [])


@given(st.binary(max_size=64))
def test_no_escape_passes_everything(data):
    assert joined(EscapeFilter(None).feed(data)) == ([data] if data else [])


def test_parse_escape():
    assert parse_escape("~") == b"~" and parse_escape("%") == b"%"
    assert parse_escape("^]") == b"\x1d" and parse_escape("^a") == b"\x01"
    assert parse_escape("^?") == b"\x7f" and parse_escape("none") is None
    assert [describe(e) for e in (b"~", b"\x1d", b"\x7f")] == ["~", "^]", "^?"]
    assert parse_escape("^") == b"^"                     # a caret alone is a character
    for bad in ("", "ab", "é", "^1", "\r", "^M", "^J", "^@"):
        with pytest.raises(ConfigError, match="^console.escape="):
            parse_escape(bad)


# --- driving real terminals -------------------------------------------------------------
class Terminal:
    """A pseudo-terminal: the test types on the master and reads what the
    program on the slave writes there."""

    def __init__(self):
        self.master, self.slave = pty.openpty()
        self.mode = termios.tcgetattr(self.slave)    # a fresh pty's: cooked, echo
        self.buffer = b""

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def _read(self, timeout: float) -> None:
        if select.select([self.master], [], [], timeout)[0]:
            try:
                self.buffer += os.read(self.master, 4096)
            except OSError:                 # EIO: nobody holds the slave any more
                time.sleep(timeout)

    def expect(self, needle: bytes, timeout: float = TIMEOUT) -> bytes:
        """Everything up to and including NEEDLE, which must appear in time."""
        deadline = time.monotonic() + timeout
        while needle not in self.buffer:
            assert time.monotonic() < deadline, f"no {needle!r} in {self.buffer!r}"
            self._read(0.05)
        end = self.buffer.index(needle) + len(needle)
        seen, self.buffer = self.buffer[:end], self.buffer[end:]
        return seen

    def quiet(self, seconds: float = 0.3) -> bytes:
        """What arrives within SECONDS."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read(0.05)
        seen, self.buffer = self.buffer, b""
        return seen

    def wait_raw(self, timeout: float = TIMEOUT) -> None:
        """Until the program on the slave has put it in raw (non-canonical) mode."""
        deadline = time.monotonic() + timeout
        while termios.tcgetattr(self.slave)[3] & termios.ICANON:
            assert time.monotonic() < deadline, "the terminal stayed in cooked mode"
            time.sleep(0.02)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal():
    term = Terminal()
    yield term
    term.close()


@pytest.fixture
def short():
    """A short directory: AF_UNIX paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="pyhyve-con-") as directory:
        yield Path(directory)


def on_terminal(term: Terminal | None) -> dict:
    """Popen arguments that run a program with TERM as its controlling terminal
    (setsid -c), its stdin and stdout; stderr stays a pipe of its own."""
    if term is None:
        return {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    return {"stdin": term.slave, "stdout": term.slave}


def start_echo(short: Path, *args: str, term: Terminal | None = None,
               name: str = "echo") -> subprocess.Popen:
    """pyhyve on the echo guest, once the guest says it is ready."""
    debug = short / f"{name}.debug"
    command = [sys.executable, "-m", "pyhyve", "-l", f"bootrom,{build_rom('uartecho')}",
               "-l", f"debugcon,file={debug}", "-o", f"control.socket={short / name}.sock",
               *args, name]
    proc = subprocess.Popen(["setsid", "-c", *command] if term else command, env=ENV,
                            stderr=subprocess.PIPE, **on_terminal(term))
    deadline = time.monotonic() + TIMEOUT
    while not (debug.exists() and b"ready" in debug.read_bytes()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the guest never got ready: {proc.stderr.read()!r}")
        time.sleep(0.02)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Exit status and stderr of a process that must end by itself."""
    try:
        status = proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running: {proc.stderr.read()!r}") from None
    return status, proc.stderr.read().decode()


@pytest.fixture
def cleanup():
    """Processes a test started, killed if the test left them running."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stats(short: Path, name: str = "echo") -> dict:
    with ControlClient(str(short / f"{name}.sock")) as client:
        return client.request("get-stats")


# --- pyhyve -l com1,stdio ---------------------------------------------------------------
@pytest.mark.usefixtures("needs_kvm")
def test_stdio_escape_on_a_real_terminal(short, terminal, cleanup):
    """`~?` lists the escapes on the terminal and not to the guest, `~~` sends
    one ~, a ~ in the middle of a line is a plain key, Ctrl-C is the guest's,
    and `~.` powers off as pyhyvectl --force-poweroff does (exit status 1),
    leaving the terminal as it was."""
    vm = start_echo(short, "-l", "com1,stdio", term=terminal)
    cleanup.append(vm)
    terminal.type(b"x\r~~y")
    assert terminal.expect(b"y") == b"x\r~y"
    terminal.type(b"a~~b")
    assert terminal.expect(b"b") == b"a~~b"
    terminal.type(b"\x03")                             # raw: no SIGINT, the guest gets it
    assert terminal.expect(b"\x03") == b"\x03"
    terminal.type(b"\r~?")
    terminal.expect(POWER_OFF_HELP)
    terminal.type(b"z")
    seen = terminal.expect(b"z")
    assert seen in (b"z", b"\rz")                      # the guest got the \r, never ~?
    assert vm.poll() is None
    terminal.type(b"\r~.")
    assert finish(vm) == (ExitStatus.POWEROFF, "pyhyve: com1: ~.: powered off\n")
    assert termios.tcgetattr(terminal.slave) == terminal.mode
    assert not (short / "echo.sock").exists()


@pytest.mark.usefixtures("needs_kvm")
def test_escape_character_is_configurable(short, terminal, cleanup):
    vm = start_echo(short, "-l", "com1,stdio", "-o", "console.escape=^]", term=terminal)
    cleanup.append(vm)
    terminal.type(b"\r~.~?\r~~")                       # ~ is a plain key now
    assert terminal.expect(b"~~") == b"\r~.~?\r~~"
    terminal.type(b"\r\x1d?")
    assert b" ^].  power off the VM" in terminal.expect(b"start of a line.)\r\n")
    terminal.type(b"\r\x1d.")
    assert finish(vm) == (ExitStatus.POWEROFF, "pyhyve: com1: ^].: powered off\n")
    assert termios.tcgetattr(terminal.slave) == terminal.mode


@pytest.mark.usefixtures("needs_kvm")
def test_escape_none_lets_a_paste_through(short, terminal, cleanup):
    vm = start_echo(short, "-l", "com1,stdio", "-o", "console.escape=none", term=terminal)
    cleanup.append(vm)
    pasted = b"~.\r~?\r~~\r~."
    terminal.type(pasted)
    assert terminal.expect(pasted) == pasted
    assert terminal.quiet() == b"" and vm.poll() is None
    terminal.type(b"q")                                # the guest powers itself off
    assert finish(vm) == (ExitStatus.POWEROFF, "")
    assert termios.tcgetattr(terminal.slave) == terminal.mode


def test_a_bad_escape_is_one_line():
    result = run_pyhyve(["-o", "console.escape=ab", "-l", f"bootrom,{build_rom('uartecho')}",
                         "-l", "com1,stdio", "vm"], timeout=60, stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout) == (ExitStatus.ERROR, "")
    assert result.stderr == ("pyhyve: console.escape='ab': expected one ASCII character, "
                             "^X for a control character, or none\n")


# --- pyhyve -l com1,pty -----------------------------------------------------------------
def read_until(fd: int, needle: bytes, timeout: float = TIMEOUT) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while needle not in data:
        assert time.monotonic() < deadline, f"no {needle!r} in {data!r}"
        if select.select([fd], [], [], 0.05)[0]:
            data += os.read(fd, 4096)
    return data


@pytest.mark.usefixtures("needs_kvm")
def test_pty_console_with_a_link(short, cleanup):
    """One line names the pty; a client may attach through the link, detach and
    attach again; what the guest prints meanwhile waits in the pty; a second
    VM may not take the link; the link goes when the VM ends."""
    link = short / "com1"
    vm = start_echo(short, "-l", f"com1,pty,link={link}")
    cleanup.append(vm)
    pts = os.readlink(link)
    assert pts.startswith("/dev/pts/")
    assert select.select([vm.stderr], [], [], TIMEOUT)[0], "no line names the pty"
    assert vm.stderr.readline() == f"com1: {pts} (link {link})\n".encode()
    for word in (b"ping", b"pong"):
        client = os.open(link, os.O_RDWR | os.O_NOCTTY)
        os.write(client, word)
        assert read_until(client, word) == word
        os.close(client)                               # detach
    client = os.open(link, os.O_RDWR | os.O_NOCTTY)
    os.write(client, b"kept")
    os.close(client)                                   # the echo comes with nobody there
    time.sleep(0.2)
    client = os.open(link, os.O_RDWR | os.O_NOCTTY)
    assert read_until(client, b"kept") == b"kept"
    second = run_pyhyve(["-l", f"bootrom,{build_rom('uartecho')}", "-l", f"com1,pty,link={link}",
                         "-o", f"control.socket={short / 'second.sock'}", "second"],
                        timeout=60, stdin=subprocess.DEVNULL)
    assert second.returncode == ExitStatus.ERROR
    assert second.stderr == (f"pyhyve: com1: pty link {link} already exists; remove it or "
                             "choose another path\n")
    assert os.readlink(link) == pts
    os.write(client, b"q")
    os.close(client)
    assert finish(vm) == (ExitStatus.POWEROFF, "")
    assert not os.path.lexists(link)                   # removed, from under seccomp


@pytest.mark.usefixtures("needs_kvm")
@pytest.mark.skipif(shutil.which("cu") is None, reason="cu is not installed (apt-get install cu)")
def test_cu_attaches_to_a_pty_console(short, cleanup):
    """bhyve's users attach to a console with cu -l; its ~. detaches, and the
    console is there for the next client."""
    link = short / "com1"
    vm = start_echo(short, "-l", f"com1,pty,link={link}")
    cleanup.append(vm)
    if os.geteuid() == 0:               # cu becomes uucp: give it the pty, as a user owns theirs
        os.chown(os.readlink(link), pwd.getpwnam("uucp").pw_uid, -1)
        short.chmod(0o711)              # and a way to the link
    cu = Terminal()
    try:
        session = subprocess.Popen(["setsid", "-c", "cu", "-l", str(link)], stdin=cu.slave,
                                   stdout=cu.slave, stderr=cu.slave)
        cleanup.append(session)
        cu.expect(b"Connected.")
        cu.wait_raw()           # cu says Connected before it leaves cooked mode, whose
        cu.type(b"through cu\r")   # switch would drop what was typed (and echo it locally)
        cu.expect(b"through cu\r")
        cu.type(b"~.")
        assert session.wait(TIMEOUT) == 0
    finally:
        cu.close()
    client = os.open(link, os.O_RDWR | os.O_NOCTTY)
    os.write(client, b"after cu")
    assert read_until(client, b"after cu") == b"after cu"
    os.write(client, b"q")
    os.close(client)
    assert finish(vm)[0] == ExitStatus.POWEROFF


# --- pyhyvectl --console --------------------------------------------------------------------
def pyhyvectl(short: Path, *args: str, term: Terminal | None = None, name: str = "echo"):
    command = [sys.executable, "-m", "pyhyve.ctlclient", f"--socket={short / name}.sock", *args]
    if term is None:
        return subprocess.run(command, env=ENV, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    return subprocess.Popen(["setsid", "-c", *command], env=ENV, stdin=term.slave,
                            stdout=term.slave, stderr=term.slave)


@pytest.mark.usefixtures("needs_kvm")
@pytest.mark.parametrize("kind", ["pty", "unix", "tcp"])
def test_pyhyvectl_console_attaches_and_detaches(short, terminal, cleanup, kind):
    """Found through the control socket; the guest's output shows, keys (Ctrl-C
    too) reach it, `~?` lists pyhyvectl's escapes, `~.` detaches with status 0,
    the terminal comes back as it was, and the VM runs on; twice."""
    spec = {"pty": "pty", "unix": f"unix={short / 'com1.sock'}",
            "tcp": f"tcp=127.0.0.1:{free_port()}"}[kind]
    vm = start_echo(short, "-l", f"com1,{spec}")
    cleanup.append(vm)
    for word in (b"hello", b"again"):
        session = pyhyvectl(short, "--console", term=terminal)
        cleanup.append(session)
        terminal.expect(b"pyhyvectl: attached to com1 (")
        terminal.expect(b"; ~. detaches, ~? lists the escapes\r\n")
        terminal.type(word + b"\x03")
        terminal.expect(word + b"\x03")
        terminal.type(b"\r~?")
        terminal.expect(help_text(b"~", "detach (the VM runs on)"))
        terminal.type(b"\r~.")
        assert session.wait(TIMEOUT) == 0
        terminal.expect(b"pyhyvectl: detached from com1 (the VM runs on)\r\n")
        assert termios.tcgetattr(terminal.slave) == terminal.mode
        assert vm.poll() is None and stats(short)["ok"]
    with ControlClient(str(short / "echo.sock")) as client:
        client.request("force-poweroff")
    assert finish(vm)[0] == ExitStatus.POWEROFF


@pytest.mark.usefixtures("needs_kvm")
def test_pyhyvectl_console_refusals_are_one_line(short, cleanup):
    log = short / "com2.log"
    vm = start_echo(short, "-l", "com1,stdio", "-l", f"com2,file={log}")
    cleanup.append(vm)
    cases = [
        (["--console"], "pyhyvectl: console com1 of VM 'echo' is on the terminal pyhyve runs "
                        "in: pyhyvectl attaches only to pty, unix, tcp consoles (-l com1,pty)"),
        (["--console=com2"], f"pyhyvectl: console com2 of VM 'echo' is written to {log}: "
                             "pyhyvectl attaches only to pty, unix, tcp consoles (-l com2,pty)"),
        (["--console=com3"], "pyhyvectl: VM 'echo' has no console com3 (its consoles: "
                             "com1 (stdio), com2 (file))"),
        (["--console", "--get-rip"], "pyhyvectl: --console cannot be combined with other "
                                     "operations"),
        (["--console", "--escape=xy"], "pyhyvectl: --escape='xy': expected one ASCII "
                                       "character, ^X for a control character, or none"),
    ]
    for args, message in cases:
        result = pyhyvectl(short, "--vm=echo", *args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", message + "\n")
    assert vm.poll() is None
    with ControlClient(str(short / "echo.sock")) as client:
        client.request("force-poweroff")
    assert finish(vm)[0] == ExitStatus.POWEROFF
