"""pyhyve --serve: VMs started through the fork server are ordinary pyhyve
processes: the requester's stdio, directory and environment, their own exit
status; a requester that hangs up powers its VM off; bad requests and a
taken socket path are one line each."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from build import build_rom
from guestrun import REPO, start_fork_server
from pyhyve import forkserver


@pytest.fixture
def server(tmp_path):
    path = tmp_path / "serve.sock"
    proc = start_fork_server(path)
    assert path.stat().st_mode & 0o777 == 0o600
    yield path, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not path.exists()


def vm_args(tmp_path, name: str, *extra: str) -> list[str]:
    rom = build_rom("exits", COUNT=3, EXIT_PORT=0x402)
    return ["-l", f"bootrom,{rom}", "-l", "debugcon,file=debug.txt",
            "-o", f"control.socket={tmp_path / name}.sock", *extra, name]


@pytest.mark.usefixtures("needs_kvm")
def test_served_vms_run_in_the_requesters_directory_with_its_stdio(server, tmp_path):
    path, proc = server
    work = tmp_path / "work"
    work.mkdir()
    with open(tmp_path / "err.txt", "wb") as err:
        vms = [forkserver.start(str(path), vm_args(tmp_path, f"served{n}"), stdin=0,
                                stdout=err.fileno(), stderr=err.fileno(), cwd=str(work))
               for n in range(3)]
    assert len({vm.pid for vm in vms} | {proc.pid}) == 4
    assert [vm.wait() for vm in vms] == [1, 1, 1]          # powered off, as pyhyve ARGS
    assert (work / "debug.txt").read_bytes().count(b"\x00") >= 3
    with open(tmp_path / "err.txt", "wb") as err:
        bad = forkserver.start(str(path), ["-m", "1Z", "bad"], stderr=err.fileno())
        assert bad.wait() == 4
    assert (tmp_path / "err.txt").read_text() == \
        "pyhyve: invalid memory size '1Z': expected a number with an optional K, M, G or T suffix\n"
    assert proc.poll() is None                              # the server serves on


@pytest.mark.usefixtures("needs_kvm")
def test_a_requester_that_hangs_up_powers_its_vm_off(server, tmp_path):
    path, proc = server
    rom = build_rom("exits", COUNT=10**9)              # runs on: firmware ignores the button
    vm = forkserver.start(str(path), ["-l", f"bootrom,{rom}", "-o", "poweroff.grace=0",
                                      "-o", f"control.socket={tmp_path}/spin.sock", "spinner"])
    deadline = time.monotonic() + 30
    while not (tmp_path / "spin.sock").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    vm._sock.close()                                   # the requester hangs up
    while True:
        try:
            os.kill(vm.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline + 30, "the VM outlived its requester"
        time.sleep(0.05)
    assert proc.poll() is None


def test_bad_requests_and_a_taken_path_are_one_line(server, tmp_path):
    path, proc = server
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        payload = json.dumps({"argv": "not a list"}).encode()
        sock.sendall(len(payload).to_bytes(4, "little") + payload)
        reply = sock.recv(4096)
    assert b"bad request" in reply
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall((1 << 30).to_bytes(4, "little"))
        assert b"bad request" in sock.recv(4096)
    second = subprocess.run([sys.executable, "-m", "pyhyve", f"--serve={path}"],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=60)
    assert (second.returncode, second.stderr) == (
        4, f"pyhyve: {path} already exists; remove it or choose another path\n")
    assert proc.poll() is None
