"""Least privilege (pyhyve.sandbox): `-o process.user=NAME` and the seccomp
filter.  The filter and the user change are irreversible for a process, so
every test that applies them does it in a child process."""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from build import build_rom
from guestrun import REPO, run_rom
from pyhyve import sandbox
from pyhyve.config import ConfigError
from pyhyve.ctl import ControlClient, ControlError
from pyhyve.vcpu import ExitStatus
from test_slirp import needs_libslirp

NOBODY = pwd.getpwnam("nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")


def _run_python(script: str, *args: str) -> dict:
    """Run SCRIPT in a fresh interpreter; it prints one JSON object last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _status_fields(path: Path) -> dict[str, str]:
    """/proc/PID/status (or a task's) as name -> value."""
    return dict(line.split(":\t", 1) for line in path.read_text().splitlines()
                if ":\t" in line)


@needs_root
@pytest.mark.usefixtures("needs_kvm")
def test_guest_runs_to_its_normal_end_as_nobody_under_seccomp(tmp_path):
    result = run_rom(tmp_path, "hello64", "-o", "process.user=nobody",
                     "-o", "process.seccomp=true",
                     "-o", f"control.socket={tmp_path / 'ctl.sock'}")
    assert result.debug == "hello from long mode\n"
    assert result.status == ExitStatus.POWEROFF, result.stderr
    assert result.stderr == ""


@needs_root
@pytest.mark.usefixtures("needs_kvm")
def test_a_vm_that_became_nobody_still_logs(tmp_path):
    """The first record loads Python's logging (pyhyve.log); nobody may not
    read the interpreter's files (this machine's lives under /root), so it is
    loaded before the user changes: a fatal exit as nobody is said as always."""
    result = run_rom(tmp_path, "probe", "-e", "-o", "process.user=nobody",
                     "-o", f"control.socket={tmp_path / 'ctl.sock'}")
    assert result.status == ExitStatus.ERROR
    assert result.stderr == "pyhyve: unhandled port read at 0x99 (size 1)\n"


@needs_root
@pytest.mark.usefixtures("needs_kvm")
def test_running_vm_every_thread_is_nobody_and_filtered(tmp_path):
    """While the guest counts, each of pyhyve's threads (vCPUs, control socket,
    virtio I/O, halt watcher) has nobody's ids, no capabilities and the filter
    (the vCPU threads a second one of their own); checkpoints go to
    snapshot.dir only; then SIGTERM (power button, ignored by the guest) and a
    second SIGTERM power it off, as without the sandbox."""
    debug = tmp_path / "debug"
    snapshots = Path(tempfile.mkdtemp())        # tmp_path's parents are 0700: nobody
    os.chown(snapshots, NOBODY.pw_uid, NOBODY.pw_gid)
    rom = build_rom("counter", TARGET=1 << 30, EVERY=5, DELAY=2000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-c", "2", "-s", "3,virtio-rnd",
         "-l", f"bootrom,{rom}", "-l", f"debugcon,file={debug}",
         "-o", f"control.socket={tmp_path / 'ctl.sock'}", "-o", f"snapshot.dir={snapshots}",
         "-o", "process.user=nobody", "-o", "process.seccomp=true", "sandboxed"],
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        while "count 5\n" not in (debug.read_text() if debug.exists() else ""):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        tasks = {task.name: _status_fields(task / "status")
                 for task in Path(f"/proc/{proc.pid}/task").iterdir()}
        # The control socket answers after the drop: what its requests import
        # on first use (pyhyve.deferred) was imported before it (Python's own
        # modules are under /root, 0700, here).
        with ControlClient(str(tmp_path / "ctl.sock")) as control:
            assert control.request("get-stats")["queued_writes"] > 0     # its debug bytes
            key = {"type": "key", "data": {"down": True, "key": {"type": "qcode", "data": "a"}}}
            assert control.request("send-input", events=[key]) == {"ok": True, "vm": "sandboxed"}
            with pytest.raises(ControlError, match="the VM has no display"):
                control.request("screendump")
            saved = control.request("checkpoint", path=f"{snapshots}/vm.snap")
            assert os.stat(saved["path"]).st_mode & 0o777 == 0o600
            assert os.listdir(snapshots) == ["vm.snap"]
            with pytest.raises(ControlError, match="is outside snapshot.dir"):
                control.request("checkpoint", path=f"{tmp_path}/elsewhere.snap")
        assert not (tmp_path / "elsewhere.snap").exists()
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)           # two signals sent at once can arrive as one
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == ExitStatus.POWEROFF
    finally:
        proc.kill()
        proc.wait()
    shutil.rmtree(snapshots)
    # main, two vCPUs, control socket, virtio I/O, halt watcher
    assert len(tasks) >= 6, tasks
    # The two vCPU threads (Python 3.11 does not name threads in /proc) alone
    # have a second filter.  KVM's own worker (kvm-nx-lpage-recovery), which
    # a vCPU's KVM_RUN starts as a task of the process, inherits it.
    filters = sorted(fields["Seccomp_filters"] for fields in tasks.values()
                     if not fields["Name"].startswith("kvm-"))
    assert filters == ["1"] * (len(filters) - 2) + ["2", "2"], filters
    groups = {str(gid) for gid in os.getgrouplist(NOBODY.pw_name, NOBODY.pw_gid)}
    for tid, fields in tasks.items():
        assert fields["Uid"].split() == [str(NOBODY.pw_uid)] * 4, tid
        assert fields["Gid"].split() == [str(NOBODY.pw_gid)] * 4, tid
        assert set(fields["Groups"].split()) == groups, tid
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0, tid
        assert fields["Seccomp"] == "2" and fields["NoNewPrivs"] == "1", tid
    assert proc.stderr.read() == ""
    counts = debug.read_text().splitlines()
    assert counts == [f"count {5 * n}" for n in range(1, len(counts) + 1)]


@needs_root
@pytest.mark.usefixtures("needs_kvm")
def test_tcp_console_accepts_after_the_drop(tmp_path):
    """The console's listener was opened as root; the connection arrives once
    pyhyve is nobody and filtered, and the guest echoes through it."""
    debug = tmp_path / "debug"
    with socket.socket() as probe:          # a free port for the console
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-l", f"bootrom,{build_rom('uartecho')}",
         "-l", f"com1,tcp=127.0.0.1:{port}", "-l", f"debugcon,file={debug}",
         "-o", f"control.socket={tmp_path / 'ctl.sock'}",
         "-o", "process.user=nobody", "-o", "process.seccomp=true", "echo"],
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        while "ready" not in (debug.read_text() if debug.exists() else ""):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as console:
            console.sendall(b"sandboxed")
            echoed = b""
            while len(echoed) < len(b"sandboxed"):
                chunk = console.recv(64)
                assert chunk, "the console closed"
                echoed += chunk
            console.sendall(b"q")
            status = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert echoed == b"sandboxed"
    assert status == ExitStatus.POWEROFF
    assert proc.stderr.read() == ""


FORBIDDEN = """
    import ctypes, errno, json, os, socket, sys, threading
    from pyhyve.config import Config
    from pyhyve.vm import VirtualMachine
    from pyhyve import sandbox

    def refused(call):
        try:
            call()
        except PermissionError:
            return "EPERM"
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return "allowed"

    rom, debug, scratch = sys.argv[1:4]
    vm = VirtualMachine(Config({"name": "filtered", "lpc.bootrom": rom,
                                "lpc.debugcon.path": debug}))
    sandbox.install_seccomp(inet_sockets=False)
    status = vm.run()
    vm.close()
    libc = ctypes.CDLL(None, use_errno=True)

    def libc_call(function, *args):
        if function(*args) < 0:
            raise OSError(ctypes.get_errno(), function.__name__)

    def write_file():
        with open(scratch, "w") as f:
            f.write("written after the filter")

    worker = threading.Thread(target=lambda: None)
    results = {
        "vm_status": int(status),
        "execv": refused(lambda: os.execv("/bin/true", ["true"])),
        "fork": refused(os.fork),
        "posix_spawn": refused(lambda: os.posix_spawn("/bin/true", ["true"], {})),
        "af_packet": refused(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
        "af_unix": refused(lambda: socket.socket(socket.AF_UNIX)),
        "af_inet": refused(lambda: socket.socket(socket.AF_INET)),
        "ptrace": refused(lambda: libc_call(libc.ptrace, 0, 0, None, None)),
        "mount": refused(lambda: libc_call(libc.mount, b"none", b"/mnt", b"tmpfs", 0, None)),
        "setuid": refused(lambda: os.setuid(0)),
        "unshare": refused(lambda: libc_call(libc.unshare, 0x40000000)),   # CLONE_NEWNET
        "thread": refused(worker.start),
        "write_file": refused(write_file),
        "seccomp": open("/proc/self/status").read().split("Seccomp:\\t")[1][0],
    }
    worker.join()
    print(json.dumps(results))
"""


@pytest.mark.usefixtures("needs_kvm")
def test_forbidden_calls_are_refused_while_a_vm_still_runs(tmp_path):
    debug = tmp_path / "debug"
    results = _run_python(FORBIDDEN, str(build_rom("hello64")), str(debug),
                          str(tmp_path / "scratch"))
    assert results["vm_status"] == ExitStatus.POWEROFF
    assert debug.read_text() == "hello from long mode\n"
    assert results["thread"] == results["write_file"] == "allowed"
    assert (tmp_path / "scratch").read_text() == "written after the filter"
    for call in ("execv", "fork", "posix_spawn", "af_packet", "af_unix", "af_inet",
                 "ptrace", "mount", "setuid", "unshare"):
        assert results[call] == "EPERM", call
    assert results["seccomp"] == "2"


INET = """
    import json, os, socket
    from pyhyve import sandbox

    def outcome(call):
        try:
            call().close()
        except PermissionError:
            return "EPERM"
        return "allowed"

    sandbox.install_seccomp(inet_sockets=True)
    print(json.dumps({
        "inet": outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
        "inet6": outcome(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)),
        "unix": outcome(lambda: socket.socket(socket.AF_UNIX)),
        "netlink": outcome(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
    }))
"""


def test_user_networking_may_open_ip_sockets_only():
    assert _run_python(INET) == {"inet": "allowed", "inet6": "allowed",
                                 "unix": "EPERM", "netlink": "EPERM"}


SLIRP = """
    import json, socket, struct, sys
    sys.path[:0] = sys.argv[1:2]
    import test_slirp as T
    from pyhyve import sandbox
    from pyhyve.virtio import slirp as S

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(30)
    backend = S.SlirpBackend([], 1500)
    sandbox.install_seccomp(inet_sockets=True)
    link = T.Wire(backend)
    link.send(T.arp_request(S.HOST))
    gateway = link.receive(lambda f: struct.unpack_from("!H", f, 12)[0] == T.ETH_ARP)[22:28]
    link.send(T.udp_packet(T.GUEST_IP, S.HOST, 40000, receiver.getsockname()[1],
                           b"through the filter", gateway))
    print(json.dumps({"received": receiver.recv(100).decode()}))
    backend.close()
"""


@needs_libslirp
def test_user_networking_opens_the_guests_connections_under_the_filter():
    """libslirp makes a UDP socket for the guest's datagram to the host only
    once the guest sends it: after the filter is in place."""
    assert _run_python(SLIRP, str(REPO / "tests")) == {"received": "through the filter"}


def test_user_networking_is_read_from_the_config():
    from pyhyve.config import Config
    assert sandbox.uses_user_networking(Config({"pci.0.3.0.device": "virtio-net",
                                                "pci.0.3.0.backend": "slirp"}))
    assert not sandbox.uses_user_networking(Config({"pci.0.3.0.device": "virtio-net",
                                                    "pci.0.3.0.tap": "tap0"}))


DROP = """
    import json, os, threading
    from pathlib import Path
    from pyhyve import sandbox
    from pyhyve.config import ConfigError

    release = threading.Event()
    workers = [threading.Thread(target=release.wait, name=f"worker{i}") for i in range(3)]
    for worker in workers:
        worker.start()
    sandbox.drop_privileges("nobody")
    uids = {task.name: (task / "status").read_text().split("Uid:\\t")[1].split("\\n")[0]
            for task in Path("/proc/self/task").iterdir()}
    try:
        sandbox.drop_privileges("root")
        again = "became root"
    except ConfigError as exc:
        again = str(exc)
    release.set()
    for worker in workers:
        worker.join()
    print(json.dumps({"uids": uids, "again": again}))
"""


@needs_root
def test_the_drop_applies_to_every_thread_and_is_final():
    results = _run_python(DROP)
    assert len(results["uids"]) == 4
    for uid_line in results["uids"].values():
        assert uid_line.split() == [str(NOBODY.pw_uid)] * 4
    assert results["again"] == "process.user: cannot become 'root': only root can change user"


def test_unknown_user_is_a_config_error():
    with pytest.raises(ConfigError, match="process.user: no such user 'no-such-user'"):
        sandbox.drop_privileges("no-such-user")


def test_missing_libseccomp_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(sandbox, "LIBSECCOMP", "libseccomp-missing.so.2")
    with pytest.raises(ConfigError, match="install Debian package libseccomp2"):
        sandbox.install_seccomp()


OUTCOME = """
    import errno, json, os, sys, threading

    def outcome(call):
        try:
            call()
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return "allowed"

    def create(path):
        return lambda: open(path, "w").close()
"""

LANDLOCK = OUTCOME + """
    from pyhyve import sandbox
    from pyhyve.config import Config
    from pyhyve.iothread import IoThread

    snapshots, elsewhere = sys.argv[1:3]
    results, done = {}, threading.Event()
    io = IoThread()         # running before the confinement, as the VM's is

    def on_io_thread():
        results["io thread, elsewhere"] = outcome(create(f"{elsewhere}/io"))
        results["io thread, snapshot.dir"] = outcome(create(f"{snapshots}/io"))
        done.set()

    kick = os.eventfd(0, os.EFD_NONBLOCK)
    io.register(kick, on_io_thread)
    sandbox.remove_at_exit(f"{elsewhere}/vm.sock")
    open(f"{elsewhere}/vm.sock", "w").close()
    open(f"{elsewhere}/other", "w").close()
    sandbox.confine(Config({"process.seccomp": "false", "snapshot.dir": snapshots}))
    os.eventfd_write(kick, 1)
    done.wait(30)
    later = threading.Thread(target=lambda: results.update(
        {"new thread, elsewhere": outcome(create(f"{elsewhere}/new"))}))
    later.start()
    later.join()
    results.update({
        "main, elsewhere": outcome(create(f"{elsewhere}/main")),
        "main, snapshot.dir": outcome(create(f"{snapshots}/main")),
        "replace in snapshot.dir": outcome(
            lambda: os.replace(f"{snapshots}/main", f"{snapshots}/moved")),
        "read /etc/passwd": outcome(lambda: open("/etc/passwd").read()),
        "lazy import": outcome(lambda: __import__("colorsys")),
        "remove the socket": outcome(lambda: os.unlink(f"{elsewhere}/vm.sock")),
        "remove another file beside it": outcome(lambda: os.unlink(f"{elsewhere}/other")),
        "tcp connect": outcome(lambda: __import__("socket").create_connection(
            ("127.0.0.1", 9), timeout=5)),
    })
    io.close()
    print(json.dumps(results))
"""


@pytest.mark.skipif(sandbox.landlock.abi_version() == 0, reason="the kernel has no Landlock")
def test_landlock_confines_running_and_new_threads(tmp_path):
    """Landlock confines one thread at a time: the I/O thread, started before
    confine(), confines itself when it next wakes (sandbox.catch_up), before
    it runs the callback; a thread started later inherits the main thread's
    rules.  Writes succeed in snapshot.dir only; beside a socket the VM removes
    at exit, removal is allowed, and nothing else."""
    snapshots, elsewhere = tmp_path / "snapshots", tmp_path / "elsewhere"
    snapshots.mkdir()
    elsewhere.mkdir()
    results = _run_python(LANDLOCK, str(snapshots), str(elsewhere))
    assert results == {
        "io thread, elsewhere": "EACCES", "io thread, snapshot.dir": "allowed",
        "new thread, elsewhere": "EACCES",
        "main, elsewhere": "EACCES", "main, snapshot.dir": "allowed",
        "replace in snapshot.dir": "allowed",
        "read /etc/passwd": "EACCES", "lazy import": "allowed",
        "remove the socket": "allowed", "remove another file beside it": "allowed",
        "tcp connect": "EACCES",
    }
    assert sorted(os.listdir(elsewhere)) == []
    assert sorted(os.listdir(snapshots)) == ["io", "moved"]


SECCOMP_ALONE = OUTCOME + """
    import fcntl, socket, termios
    from pyhyve import sandbox
    from pyhyve.config import Config

    scratch = sys.argv[1]
    open(f"{scratch}/old", "w").close()
    kvm = os.open("/dev/kvm", os.O_RDWR)
    reader, writer = os.pipe()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sandbox.confine(Config({"process.landlock": "false"}))

    def narrowed(call):
        box = {}
        thread = threading.Thread(target=lambda: (sandbox.narrow_vcpu_thread(),
                                                  box.update(result=outcome(call))))
        thread.start()
        thread.join()
        return box["result"]

    print(json.dumps({
        "create": outcome(create(f"{scratch}/new")),
        "read": outcome(lambda: open(f"{scratch}/old").read()),
        "rename": outcome(lambda: os.rename(f"{scratch}/old", f"{scratch}/renamed")),
        "unlink": outcome(lambda: os.unlink(f"{scratch}/old")),
        "KVM_GET_API_VERSION": outcome(lambda: fcntl.ioctl(kvm, 0xAE00)),
        "FIONREAD": outcome(lambda: fcntl.ioctl(reader, termios.FIONREAD, b"\\0" * 4)),
        "SIOCGIFCONF": outcome(lambda: fcntl.ioctl(sock, 0x8912, b"\\0" * 16)),
        "vcpu thread: read": narrowed(lambda: open(f"{scratch}/old").read()),
        "vcpu thread: pipe write": narrowed(lambda: os.write(writer, b"x")),
        "vcpu thread: accept": narrowed(lambda: sock.accept()),
        "main after the vcpu thread: read": outcome(lambda: open(f"{scratch}/old").read()),
        "checkpoint": sandbox.snapshot_refusal(f"{scratch}/vm.snap", Config({})),
    }))
"""


def test_seccomp_without_landlock_opens_for_reading_only_and_filters_ioctls(tmp_path):
    """Where Landlock is not in force, the filter itself refuses opening a file
    for writing, rename and unlink; everywhere, ioctl requests other than
    KVM's, terminals' and taps' are refused; a vCPU thread's own filter
    refuses sockets and leaves reads and writes to open descriptors alone."""
    results = _run_python(SECCOMP_ALONE, str(tmp_path))
    assert results == {
        "create": "EPERM", "read": "allowed", "rename": "EPERM", "unlink": "EPERM",
        "KVM_GET_API_VERSION": "allowed", "FIONREAD": "allowed", "SIOCGIFCONF": "EPERM",
        "vcpu thread: read": "allowed", "vcpu thread: pipe write": "allowed",
        "vcpu thread: accept": "EPERM", "main after the vcpu thread: read": "allowed",
        "checkpoint": "this VM's seccomp filter lets it write no file, as Landlock is not in "
                      "force to say where: start it with -o process.landlock=true (Linux "
                      "5.13 or later) and -o snapshot.dir=DIR, or with -o process.seccomp=false",
    }
    assert os.listdir(tmp_path) == ["old"]


VCPU_THREAD = OUTCOME + """
    from pyhyve import sandbox

    scratch = sys.argv[1]
    sandbox.install_seccomp()               # as with Landlock: files may be created
    box = {}

    def vcpu_thread():
        sandbox.narrow_vcpu_thread()
        box["create"] = outcome(create(f"{scratch}/by-vcpu"))
        box["append"] = outcome(lambda: open(f"{scratch}/by-main", "a").close())

    thread = threading.Thread(target=vcpu_thread)
    thread.start()
    thread.join()
    print(json.dumps({**box, "main": outcome(create(f"{scratch}/by-main"))}))
"""


def test_a_vcpu_thread_cannot_open_files_for_writing_where_the_process_can(tmp_path):
    results = _run_python(VCPU_THREAD, str(tmp_path))
    assert results == {"create": "EPERM", "append": "EPERM", "main": "allowed"}
    assert os.listdir(tmp_path) == ["by-main"]
