"""The command line as an operator meets it, through the real processes:
logging (-v, logging.level, logging.file, timestamps), bhyve's -p, -C, -D,
-A, -H, -P and -K, a fatal exit said once, and one style for the three
commands (pyhyve, pyhyvectl, pyhyve-guest): --version, -h/--help, one line
and the command's error status for a wrong option, a line for what was done."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyhyve
from build import build_rom
from guestrun import REPO, run_pyhyve, run_rom
from pyhyve.vcpu import ExitStatus

needs_kvm = pytest.mark.usefixtures("needs_kvm")

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"     # 2026-12-06 18:00:00.123
LOG_LINE = re.compile(rf"^{STAMP} pyhyve: (\S+): (DEBUG|INFO|WARNING|ERROR): (.*)$")


def log_lines(text: str) -> list[tuple[str, str, str]]:
    """(logger, level, message) of every line, each of which must be a log line."""
    lines = text.splitlines()
    parsed = [LOG_LINE.match(line) for line in lines]
    assert all(parsed), f"not log lines: {[t for t, m in zip(lines, parsed) if not m]}"
    return [match.groups() for match in parsed]


def start_pyhyve(tmp_path: Path, *args: str, name: str = "opts") -> subprocess.Popen:
    """pyhyve on a guest that writes ports for minutes, its socket in tmp_path."""
    rom = build_rom("exits", COUNT=10**8)
    return subprocess.Popen([sys.executable, "-m", "pyhyve", "-l", f"bootrom,{rom}",
                             "-o", f"control.socket={tmp_path / 'ctl.sock'}", *args, name],
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen,
                  timeout: float = 30.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        match = re.search(pattern, text, re.M)
        if match:
            return match
        assert proc.poll() is None, f"pyhyve ended ({proc.returncode}): {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r} in {path}: {text!r}")


def stop(proc: subprocess.Popen) -> str:
    """Power the VM off (SIGINT) and return its stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=30) == ExitStatus.POWEROFF
        return proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# --- logging -----------------------------------------------------------------------------
@needs_kvm
def test_v_logs_the_main_steps_with_timestamps(tmp_path):
    result = run_rom(tmp_path, "hello16", "-v", "-m", "64M", "-c", "2",
                     "-s", "3,virtio-rnd", "-o", f"control.socket={tmp_path / 'c.sock'}")
    assert result.status == ExitStatus.POWEROFF, result.stderr
    lines = log_lines(result.stderr)
    assert {level for _, level, _ in lines} == {"INFO"}         # -v: info, not debug
    messages = [message for _, _, message in lines]
    built = next(m for m in messages if m.startswith("built: "))
    assert built.startswith("built: 64M of memory, 2 vCPUs (sockets=2, cores=1, threads=1)")
    assert "virtio-rnd 00:03.0" in built and "debugcon" in built
    assert "started 2 vCPU threads" in messages
    assert messages[-1] == "stopped: powered off, exit status 1"
    assert any(logger == "pyhyve.test-hello16.vcpu0" and m.startswith("running on thread ")
               for logger, _, m in lines)


@needs_kvm
def test_vv_and_logging_level(tmp_path):
    socket = ["-o", f"control.socket={tmp_path / 'c.sock'}"]
    debug = run_rom(tmp_path, "hello16", "-vv", *socket)
    assert "DEBUG" in {level for _, level, _ in log_lines(debug.stderr)}
    same = run_rom(tmp_path, "hello16", "-o", "logging.level=debug", *socket)
    assert "DEBUG" in {level for _, level, _ in log_lines(same.stderr)}
    quiet = run_rom(tmp_path, "hello16", "-v", "-o", "logging.level=warning", *socket)
    assert (quiet.status, quiet.stderr) == (ExitStatus.POWEROFF, "")     # the last one wins
    default = run_rom(tmp_path, "hello16", *socket)
    assert (default.status, default.stderr) == (ExitStatus.POWEROFF, "")


@needs_kvm
def test_warnings_carry_timestamps_too(tmp_path):
    result = run_rom(tmp_path, "halt", "-o", "memroy.size=64M",
                     "-o", f"control.socket={tmp_path / 'c.sock'}")
    assert result.status == ExitStatus.HALT
    [(logger, level, message)] = log_lines(result.stderr)
    assert (logger, level) == ("pyhyve.test-halt", "WARNING")
    assert message.startswith("unknown config key 'memroy.size'")


@needs_kvm
def test_a_run_that_logs_nothing_never_loads_logging(tmp_path):
    """pyhyve.log loads Python's logging (7-8 ms) only for a record that would
    be shown: not for a clean run, nor for a warning below logging.level; a
    warning at the default level loads it and is shown in the command's format
    (test_warnings_carry_timestamps_too).  Run in a child: main() installs
    signal handlers and confines the process."""
    code = """
import sys
from pyhyve import cli
status = cli.main(sys.argv[1:])
print(status, "logging" in sys.modules)
"""
    common = ["-l", f"bootrom,{build_rom('hello16')}",
              "-o", f"control.socket={tmp_path / 'c.sock'}"]
    for args in ([], ["-o", "memroy.size=64M", "-o", "logging.level=error"],
                 ["-o", "memroy.size=64M"]):
        result = subprocess.run([sys.executable, "-S", "-c", code, *common, *args, "clean"],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        warned = bool(args) and "logging.level=error" not in args
        assert result.stdout.split() == [str(int(ExitStatus.POWEROFF)), str(warned)], \
            result.stderr
        assert ("unknown config key 'memroy.size'" in result.stderr) == warned


@needs_kvm
def test_a_log_file_that_cannot_be_written_is_said_once(tmp_path):
    """/dev/full refuses every write: one line on stderr, then the VM runs on."""
    result = run_rom(tmp_path, "hello16", "-v", "-o", "logging.file=/dev/full",
                     "-o", f"control.socket={tmp_path / 'c.sock'}")
    assert result.status == ExitStatus.POWEROFF
    assert result.stderr == ("pyhyve: cannot write log file /dev/full: No space left on "
                             "device; no more log lines go there\n")


@needs_kvm
def test_logging_file_gets_the_lines_appended(tmp_path):
    log = tmp_path / "pyhyve.log"
    log.write_text("an earlier line\n")
    args = ["-v", "-o", f"logging.file={log}", "-o", f"control.socket={tmp_path / 'c.sock'}"]
    first = run_rom(tmp_path, "hello16", *args)
    second = run_rom(tmp_path, "hello16", *args)
    assert (first.status, first.stderr) == (ExitStatus.POWEROFF, "")
    assert (second.status, second.stderr) == (ExitStatus.POWEROFF, "")
    text = log.read_text()
    assert text.startswith("an earlier line\n")                  # appended, not truncated
    lines = log_lines(text.split("\n", 1)[1])
    stops = [m for _, _, m in lines if m.startswith("stopped: ")]
    assert stops == ["stopped: powered off, exit status 1"] * 2
    assert len([m for _, _, m in lines if m.startswith("built: ")]) == 2


@needs_kvm
def test_logging_file_is_opened_before_privileges_are_dropped(tmp_path):
    """The operator's file, in a directory only root may write: still written
    after the VM became nobody (it is opened at set-up)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    log = private / "vm.log"
    result = run_rom(tmp_path, "hello16", "-v", "-o", "process.user=nobody",
                     "-o", f"logging.file={log}", "-o", f"control.socket={private / 'c.sock'}")
    assert (result.status, result.stderr) == (ExitStatus.POWEROFF, "")
    assert "stopped: powered off, exit status 1" in log.read_text()
    assert (log.stat().st_mode & 0o777) == 0o600


@needs_kvm
def test_a_log_file_behind_a_symbolic_link_is_refused(tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    (tmp_path / "link").symlink_to(target)
    result = run_rom(tmp_path, "hello16", "-o", f"logging.file={tmp_path / 'link'}")
    assert result.status == ExitStatus.ERROR and result.debug == ""
    assert result.stderr == (f"pyhyve: cannot open log file {tmp_path / 'link'}: it is a "
                             "symbolic link (give the file's own path)\n")
    assert target.read_text() == ""


# --- a fatal exit is said once ----------------------------------------------------------------
@needs_kvm
def test_a_fatal_port_access_is_one_line(tmp_path):
    """-e and an unclaimed port: the line was printed by the VM and again by
    the command."""
    result = run_rom(tmp_path, "probe", "-e", "-o", f"control.socket={tmp_path / 'c.sock'}")
    assert result.status == ExitStatus.ERROR
    assert result.stderr == "pyhyve: unhandled port read at 0x99 (size 1)\n"


@needs_kvm
def test_main_pauses_the_collector_while_building_and_thaws_after(tmp_path):
    """main() builds with the cyclic collector off and freezes what it built
    (cli.py says why); once the VM is closed the collector runs again and
    nothing stays frozen, so a program calling main() twice collects the
    first VM's cycles.  Run in a child: main() installs signal handlers and
    confines the process."""
    code = f"""
import gc, sys
from pyhyve import cli, vm as vm_module
imported = gc.get_freeze_count()        # cli froze its own imports
built = []
real_init = vm_module.VirtualMachine.__init__
def init(self, config):
    built.append(gc.isenabled())
    real_init(self, config)
vm_module.VirtualMachine.__init__ = init
real_run = vm_module.VirtualMachine.run
def run(self):
    built.append((gc.isenabled(), gc.get_freeze_count() > imported > 1000))
    return real_run(self)
vm_module.VirtualMachine.run = run
status = cli.main(["-l", "bootrom,{build_rom('hello16')}", "-o",
                   "control.socket={tmp_path / 'c.sock'}", "thaw"])
print(status, built, gc.isenabled(), gc.get_freeze_count())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert result.stdout.split() == [str(int(ExitStatus.POWEROFF)), "[False,", "(True,",
                                     "True)]", "True", "0"], result.stderr


@needs_kvm
def test_the_command_leaves_its_objects_frozen_as_the_process_ends(tmp_path):
    """command(), what the `pyhyve` script and `python -m pyhyve` run, freezes
    what main() left (thawed for a program that goes on), so the interpreter's
    last collection does not walk the closed VM's objects."""
    code = """
import gc, sys
from pyhyve import cli
status = cli.command()
print(status, gc.get_freeze_count() > 1000)
"""
    result = subprocess.run([sys.executable, "-c", code, "-l",
                             f"bootrom,{build_rom('hello16')}",
                             "-o", f"control.socket={tmp_path / 'c.sock'}", "frozen"],
                            capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert result.stdout.split() == [str(int(ExitStatus.POWEROFF)), "True"], result.stderr


@needs_kvm
def test_an_unhandled_exit_is_said_once_with_the_registers(tmp_path, monkeypatch, capsys):
    """An exit reason pyhyve has no handler for, through the command's main():
    one line naming it, then the registers, nothing repeated after them."""
    from pyhyve import cli
    from pyhyve.vcpu import VcpuThread
    monkeypatch.setattr(VcpuThread, "_exit_io", lambda self: self._exit_unknown(99))
    handlers = {signum: signal.getsignal(signum)
                for signum in (*cli.STOP_SIGNALS, signal.SIGTERM)}
    log = tmp_path / "vm.log"
    try:
        status = cli.main(["-l", f"bootrom,{build_rom('hello16')}",
                           "-o", f"control.socket={tmp_path / 'c.sock'}",
                           "-o", "process.seccomp=false", "-o", "process.landlock=false",
                           "-o", f"logging.file={log}",
                           "fatal"])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert status == ExitStatus.ERROR
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "pyhyve: vcpu0: unhandled exit reason 99 (unknown)"
    assert all(not line.startswith("pyhyve:") for line in err[1:]), err
    assert any("rip=" in line for line in err[1:])
    logged = [m for _, level, m in log_lines(log.read_text()) if level == "ERROR"]
    assert logged == ["vcpu0: unhandled exit reason 99 (unknown)"]     # and in the log file


# --- bhyve's -p, -C, -D, -A, -H, -P, -K ---------------------------------------------------
def test_cpusets_read_and_write_as_the_kernel_lists_them():
    from pyhyve.config import ConfigError, format_cpus, parse_cpuset
    from pyhyve.cli import parse_args
    assert parse_cpuset("k", "0,2-3,5") == {0, 2, 3, 5}
    assert format_cpus({5, 0, 3, 2, 7, 6}) == "0,2-3,5-7"
    for bad in ("", "1,", "-1", "1-", "a", "1 ", "3-1", "1024"):
        with pytest.raises(ConfigError, match="^k: "):
            parse_cpuset("k", bad)
    config = parse_args(["-p", "0:1", "-p", "0:3", "-p", "2:0", "vm"])
    assert (config.get("vcpu.0.cpuset"), config.get("vcpu.2.cpuset")) == ("1,3", "0")


def _cpus_allowed(pid: int, tid: int) -> str:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return re.search(r"^Cpus_allowed_list:\s*(\S+)$", status, re.M).group(1)


@needs_kvm
def test_p_pins_the_vcpu_thread(tmp_path):
    """-p 0:1: vCPU 0's thread may run on host CPU 1 only; the other threads
    keep the process's CPUs.  Under the default seccomp filter, too."""
    allowed = os.sched_getaffinity(0)
    if not {0, 1} <= allowed:
        pytest.skip(f"needs host CPUs 0 and 1 (this process may use {sorted(allowed)})")
    log = tmp_path / "vm.log"
    proc = start_pyhyve(tmp_path, "-c", "2", "-p", "0:1", "-p", "1:0", "-p", "1:1",
                        "-v", "-o", f"logging.file={log}")
    try:
        threads, said = {}, {}
        for vcpu in (0, 1):
            match = wait_for_line(log, rf"\.vcpu{vcpu}: INFO: running on thread (\d+), (.*)$",
                                  proc)
            threads[vcpu], said[vcpu] = int(match.group(1)), match.group(2)
        assert said == {0: "pinned to host CPUs 1", 1: "pinned to host CPUs 0-1"}
        assert _cpus_allowed(proc.pid, threads[0]) == "1"
        assert _cpus_allowed(proc.pid, threads[1]) == "0-1"
        assert _cpus_allowed(proc.pid, proc.pid) == _cpus_allowed(os.getpid(), os.getpid())
    finally:
        assert stop(proc) == "pyhyve: SIGINT: powered off\n"


def _guest_ram_flags(pid: int, size_kb: int) -> list[list[str]]:
    """VmFlags of each mapping of exactly the guest's RAM size."""
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    found = []
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps):
        if re.search(rf"^Size:\s+{size_kb} kB$", block, re.M):
            found.append(re.search(r"^VmFlags:(.*)$", block, re.M).group(1).split())
    return found


@needs_kvm
@pytest.mark.parametrize("option, in_core", [(None, False), ("-C", True),
                                             ("memory.guest_in_core=true", True)])
def test_guest_memory_is_left_out_of_core_dumps_unless_C(tmp_path, option, in_core):
    """bhyve's default and -C (memory.guest_in_core): MADV_DONTDUMP shows as
    the mapping's `dd` flag in /proc/PID/smaps."""
    args = {None: [], "-C": ["-C"]}.get(option, ["-o", option])
    log = tmp_path / "vm.log"
    proc = start_pyhyve(tmp_path, "-m", "72M", "-v", "-o", f"logging.file={log}", *args)
    try:
        wait_for_line(log, r"INFO: started 1 vCPU thread$", proc)
        mappings = _guest_ram_flags(proc.pid, 72 * 1024)
        assert len(mappings) == 1, mappings
        assert ("dd" in mappings[0]) == (not in_core), mappings
    finally:
        stop(proc)


@needs_kvm
def test_D_A_H_P_are_accepted(tmp_path):
    """bhyve's -D (destroy on power-off: a KVM VM is destroyed with its
    process), -A (ACPI tables: always), -H (yield on HLT: always) and -P (exit
    on PAUSE: KVM's PLE) set bhyve's keys and change nothing else."""
    dump = run_pyhyve(["-DAHP", "-o", "config.dump=1", "vm"], timeout=30)
    assert dump.returncode == 0 and dump.stderr == ""
    assert {"destroy_on_poweroff=true", "acpi_tables=true", "x86.vmexit_on_hlt=true",
            "x86.vmexit_on_pause=true"} <= set(dump.stdout.splitlines())
    result = run_rom(tmp_path, "hello16", "-D", "-A", "-H", "-P",
                     "-o", f"control.socket={tmp_path / 'c.sock'}")
    assert (result.status, result.stderr) == (ExitStatus.POWEROFF, "")
    assert result.debug == "hello from real mode\n"


def test_usage_tells_what_each_accepted_option_does():
    usage = run_pyhyve(["-h"], timeout=30).stdout
    for option, words in (("-D", "always destroyed"), ("-A", "pyhyve always does"),
                          ("-H", "always so"), ("-P", "(PLE)"), ("-K", "us_unix"),
                          ("-C", "MADV_DONTDUMP"), ("-p", "pin vCPU"), ("-v", "-vv")):
        assert re.search(rf"^  {option} .*{re.escape(words)}", usage, re.M | re.S), option


# --- one style for the three commands -----------------------------------------------------
COMMANDS = {"pyhyve": ("pyhyve", ExitStatus.ERROR),
            "pyhyvectl": ("pyhyve.ctlclient", 1),            # bhyvectl's
            "pyhyve-guest": ("pyhyve.guestkit", ExitStatus.ERROR)}


def _command(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", COMMANDS[name][0], *args],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("name", COMMANDS)
def test_version_and_help_everywhere(name):
    version = _command(name, "--version")
    assert (version.returncode, version.stdout, version.stderr) == \
        (0, f"{name} {pyhyve.__version__}\n", "")
    for flag in ("-h", "--help"):
        shown = _command(name, flag)
        assert shown.returncode == 0 and shown.stderr == ""
        assert shown.stdout.startswith(f"usage: {name} ")


@pytest.mark.parametrize("name", COMMANDS)
def test_a_wrong_option_is_one_line_and_the_error_status(name):
    result = _command(name, "--no-such-option")
    assert result.returncode == COMMANDS[name][1]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{name}: ")
    assert f"{name} --help" in result.stderr or f"{name} -h" in result.stderr
    assert result.stdout == ""


def test_pyhyve_guest_needs_a_command_and_says_so_in_one_line():
    result = _command("pyhyve-guest")
    assert result.returncode == ExitStatus.ERROR and result.stdout == ""
    assert result.stderr == ("pyhyve-guest: the following arguments are required: "
                             "{build,run} (pyhyve-guest --help for help)\n")
    bad = _command("pyhyve-guest", "build", "--kernel", "bogus")
    assert bad.returncode == ExitStatus.ERROR and bad.stderr.count("\n") == 1
    assert "invalid choice: 'bogus'" in bad.stderr


@needs_kvm
def test_pyhyvectl_says_what_it_did_and_snapshots_are_logged(tmp_path):
    log = tmp_path / "vm.log"
    proc = start_pyhyve(tmp_path, "-v", "-o", f"logging.file={log}",
                        "-o", f"snapshot.dir={tmp_path}", name="said")
    try:
        wait_for_line(log, r"INFO: started 1 vCPU thread$", proc)
        sock = f"--socket={tmp_path / 'ctl.sock'}"
        snap = tmp_path / "said.snap"
        # The NMI and the register write come last, on the paused VM: this
        # real-mode guest has no NMI handler and would run into the weeds.
        expected = [
            (["--pause"], "vm said: paused"),
            (["--resume"], "vm said: resumed"),
            (["--powerdown"], "vm said: power button pressed (the guest decides)"),
            ([f"--checkpoint={snap}"], None),
            (["--pause"], "vm said: paused"),
            (["--inject-nmi"], "vm said: NMI injected into vcpu0"),
            (["--set-rbx=0x1234"], "vm said: vcpu0 rbx set to 0x1234"),
            (["--force-poweroff"], "vm said: powered off (exit status 1)"),
        ]
        for args, line in expected:
            done = _command("pyhyvectl", sock, *args)
            assert (done.returncode, done.stderr) == (0, ""), done.stderr
            size = snap.stat().st_size if snap.exists() else 0
            line = line or f"vm said: saved to {snap} ({size} bytes), running on"
            assert done.stdout == line + "\n"
        assert proc.wait(timeout=30) == ExitStatus.POWEROFF
    finally:
        proc.kill()
        proc.wait()
    messages = [m for _, _, m in log_lines(log.read_text())]
    assert f"snapshot: writing {snap}" in messages
    wrote = next(m for m in messages if m.startswith(f"snapshot: wrote {snap}, "))
    assert wrote.startswith(f"snapshot: wrote {snap}, {snap.stat().st_size} bytes (")
    assert messages[-1] == "stopped: powered off, exit status 1"
