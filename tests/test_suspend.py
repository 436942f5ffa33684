"""ACPI S3, suspend to RAM, as QEMU does it: tests/guests/s3guest.S counts,
writes its FACS waking vector, sleeps through _S3, and once woken counts on
and reports PM1_STS's wake bits and whether its memory is intact.  It boots
from a disk under Debian's SeaBIOS (whose resume path finds the CMOS
shutdown status 0xFE and jumps to the waking vector) and as a kernel booted
directly (pyhyve jumps to the vector itself; QEMU's -kernel still has
SeaBIOS).  QEMU runs the same guest, and prints the same lines: the RTC
alarm wakes both; QMP's system_wakeup wakes QEMU, where pyhyve is woken by
pyhyvectl --wakeup and its power button (QEMU's power button does not wake
a sleeping guest; its system_wakeup sets PWRBTN_STS, as both do here)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from build import build_boot_disk, build_boot_program
from firmware import require_file, require_program
from guestrun import REPO, run_pyhyve, run_qemu_debugcon
from pyhyve import ctlclient
from pyhyve.ctl import ControlClient
from pyhyve.vcpu import ExitStatus

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("needs_kvm")]

SEABIOS = "/usr/share/seabios/bios.bin"
WAK_RTC, WAK_BUTTON = "8400", "8100"        # WAK_STS with RTC_STS, with PWRBTN_STS
TIMEOUT = 120


def expected(*wakes: str) -> list[str]:
    """What the guest prints when woken once per entry of WAKES (PM1_STS bits)."""
    lines, count = ["s3: started"], 0
    for bits in wakes:
        lines += [f"s3: count {count + n:04x}" for n in (1, 2, 3)]
        lines += ["s3: sleeping", f"s3: resumed, PM1_STS wake bits {bits}", "s3: memory intact"]
        count += 3
    return lines + [f"s3: count {count + n:04x}" for n in (1, 2, 3)] + ["s3: done"]


def guest_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("s3: ")]


@pytest.fixture(scope="module")
def seabios():
    return require_file(SEABIOS, "seabios")


def run_to_the_end(args: list[str], debug: Path, name: str) -> str:
    proc = run_pyhyve(["-m", "128M", "-l", f"debugcon,file={debug}", *args, name],
                      timeout=TIMEOUT)
    text = debug.read_text(errors="replace") if debug.exists() else ""
    assert proc.returncode == ExitStatus.POWEROFF, (proc.stderr, text[-2000:])  # _S5
    return text


def test_rtc_alarm_wakes_a_guest_of_seabios_as_under_qemu(seabios, tmp_path):
    disk = build_boot_disk(tmp_path / "rtc.img", "s3guest", WAKE_RTC=1)
    text = run_to_the_end(["-l", f"bootrom,{seabios}", "-s", f"2,virtio-blk,{disk}"],
                          tmp_path / "pyhyve.log", "s3-rtc")
    assert guest_lines(text) == expected(WAK_RTC), text[-3000:]
    assert "In resume (status=254)" in text and "Jump to resume vector" in text
    reference = run_qemu_debugcon(tmp_path, ["-bios", seabios, "-drive",
                                             f"file={disk},format=raw,if=virtio"],
                                  until="s3: done", timeout=TIMEOUT, memory_mib=128)
    assert guest_lines(reference) == guest_lines(text)


def test_kernel_booted_directly_resumes_at_its_waking_vector(tmp_path):
    """No firmware: pyhyve enters the FACS waking vector in real mode itself."""
    kernel = build_boot_program("s3guest", WAKE_RTC=1)
    text = run_to_the_end(["-f", f"kexec,{kernel}"], tmp_path / "pyhyve.log", "s3-kernel")
    assert guest_lines(text) == expected(WAK_RTC), text
    reference = run_qemu_debugcon(tmp_path, ["-kernel", str(kernel)], until="s3: done",
                                  timeout=TIMEOUT, memory_mib=128)
    assert guest_lines(reference) == guest_lines(text)


# --- woken from outside, and saved while asleep --------------------------------------------
def wait_for(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def printed(debug: Path, line: str) -> int:
    return guest_lines(debug.read_text(errors="replace") if debug.exists() else "").count(line)


class QmpEvents:
    """A QMP connection that records the events it hears, on a thread."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.events: list[str] = []
        self.answers: list[dict] = []
        self._answered = threading.Condition()
        json.loads(self.file.readline())                    # the greeting
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.execute("qmp_capabilities")

    def _read(self) -> None:
        for line in self.file:
            message = json.loads(line)
            with self._answered:
                if "event" in message:
                    self.events.append(message["event"])
                else:
                    self.answers.append(message)
                    self._answered.notify_all()

    def execute(self, command: str) -> dict:
        with self._answered:
            before = len(self.answers)
            self.sock.sendall(json.dumps({"execute": command}).encode())
            assert self._answered.wait_for(lambda: len(self.answers) > before, 30)
            return self.answers[-1]

    def close(self) -> None:
        self.sock.close()


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyhyve", *args],
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def state(sock: Path) -> str:
    with ControlClient(str(sock)) as client:
        return client.request("describe")["state"]


def test_woken_by_pyhyvectl_and_the_power_button_after_a_restore_while_asleep(
        seabios, tmp_path, capsys):
    """Asleep, the VM is saved (pyhyvectl --suspend, bhyve's save-and-stop)
    and restored still asleep; pyhyvectl --wakeup wakes it, it sleeps again,
    and the power button wakes it.  QEMU: system_wakeup both times."""
    disk = build_boot_disk(tmp_path / "button.img", "s3guest", CYCLES=2)
    debug, sock, snap = tmp_path / "pyhyve.log", tmp_path / "ctl.sock", tmp_path / "s3.snap"
    args = ["-m", "128M", "-l", f"bootrom,{seabios}", "-s", f"2,virtio-blk,{disk}",
            "-l", f"debugcon,file={debug}", "-o", f"control.socket={sock}",
            "-o", f"snapshot.dir={tmp_path}"]
    first = start([*args, "s3-button"])
    try:
        wait_for(lambda: printed(debug, "s3: sleeping") == 1 and state(sock) == "suspended",
                 "the guest to sleep")
        assert ctlclient.main(["--socket", str(sock), "--suspend", str(snap)]) == 0
        assert first.wait(30) == ExitStatus.POWEROFF
    finally:
        first.kill()
        first.wait()
    qmp_path = tmp_path / "qmp.sock"
    restored = start(["-r", str(snap), *args, "-o", f"qmp.socket={qmp_path}", "s3-button"])
    try:
        wait_for(lambda: qmp_path.exists() or restored.poll() is not None, "QMP")
        qmp = QmpEvents(str(qmp_path))
        assert qmp.execute("query-status")["return"] == {"running": False,
                                                         "status": "suspended"}
        assert state(sock) == "suspended" and printed(debug, "s3: sleeping") == 1
        capsys.readouterr()
        assert ctlclient.main(["--socket", str(sock), "--wakeup"]) == 0
        assert "woken from suspend to RAM" in capsys.readouterr().out
        wait_for(lambda: printed(debug, "s3: sleeping") == 2, "the guest to sleep again")
        wait_for(lambda: state(sock) == "suspended", "the second suspend")
        assert ctlclient.main(["--socket", str(sock), "--powerdown"]) == 0
        assert restored.wait(TIMEOUT) == ExitStatus.POWEROFF, restored.stderr.read()
        assert qmp.events == ["WAKEUP", "SUSPEND", "POWERDOWN", "WAKEUP", "SHUTDOWN"]
        qmp.close()
    finally:
        restored.kill()
        restored.wait()
    text = debug.read_text(errors="replace")
    assert guest_lines(text) == expected(WAK_BUTTON, WAK_BUTTON), text[-3000:]
    assert guest_lines(qemu_woken_by_system_wakeup(tmp_path, seabios, disk)) == \
        guest_lines(text)


def qemu_woken_by_system_wakeup(tmp_path: Path, seabios: str, disk: Path) -> str:
    """QEMU with the same disk, woken by QMP's system_wakeup each time it sleeps."""
    debug, qmp_path = tmp_path / "qemu.log", tmp_path / "qemu-qmp.sock"
    proc = subprocess.Popen(
        [require_program("qemu-system-x86_64", "qemu-system-x86"), "-machine", "pc",
         "-enable-kvm", "-m", "128", "-nodefaults", "-display", "none", "-no-reboot",
         "-bios", seabios, "-drive", f"file={disk},format=raw,if=virtio",
         "-chardev", f"file,id=dbg,path={debug}", "-device",
         "isa-debugcon,iobase=0x402,chardev=dbg", "-qmp", f"unix:{qmp_path},server,nowait"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: qmp_path.exists(), "QEMU's QMP socket")
        qmp = QmpEvents(str(qmp_path))
        for sleeps in (1, 2):
            wait_for(lambda: printed(debug, "s3: sleeping") == sleeps and
                     qmp.execute("query-status")["return"]["status"] == "suspended",
                     "QEMU's guest to sleep")
            assert "return" in qmp.execute("system_wakeup")
        wait_for(lambda: printed(debug, "s3: done") == 1 or proc.poll() is not None,
                 "QEMU's guest to finish")
        qmp.close()
    finally:
        proc.kill()
        proc.wait()
    return debug.read_text(errors="replace")
