"""Live migration between two pyhyve processes on this machine, over loopback.

The counting guest is blkdriver.S built with NUMBERED, GROUP=1 and its
output on COM1: it writes 1 KiB blocks of its pattern in order, each
flushed, and prints "acked N" (hex) on the serial console after each.  It
is migrated while it writes: the source's console and then the
destination's must hold every N once, in order, and the disk (shared by
path, its lock handed over) every block.  Then the failures: a destination
killed mid-transfer (the source resumes and says why, through QMP here), a
peer without the key (refused both ways, the source runs on).  The wire's
checks (handshake, MACs) and the destination's checks of page runs run
without a guest.  The Linux guest kit is migrated once in the middle of
its script (marked linux)."""

import asyncio
import errno
import fcntl
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from build import build_rom
from guestrun import REPO
from pyhyve import ctlclient, migration, migstream
from pyhyve.config import ConfigError
from test_blkdriver import pattern

BLOCK = 1024
TOTAL_KIB = 4096            # 2.5 to 15 s of writing, by the host: time to migrate in the middle
DEFINES = {"NUMBERED": 1, "GROUP": 1, "CHUNK_KIB": BLOCK // 1024, "TOTAL_KIB": TOTAL_KIB,
           "DEBUG_PORT": 0x3F8}
TIMEOUT = 120


def wait_for(predicate, timeout: float = TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def acked(*paths: Path) -> list[int]:
    """The N of each complete "acked N" line on console files read as one
    stream (a line the guest began on the source may end on the destination)."""
    text = "".join(path.read_text(errors="replace") for path in paths if path.exists())
    return [int(line[len("acked "):], 16) for line in text.split("\n")[:-1]
            if line.startswith("acked ")]


class Pyhyve:
    """A pyhyve process on the counting guest, its COM1 in a file, its log in another."""

    def __init__(self, tmp: Path, name: str, disk: Path, key: Path | None, *args: str):
        self.console, self.log = tmp / f"{name}.com1", tmp / f"{name}.log"
        self.socket = tmp / f"{name}.sock"
        rom = build_rom("blkdriver", **DEFINES)
        command = [sys.executable, "-m", "pyhyve", "-v", "-m", "16M",
                   "-s", f"3,virtio-blk,{disk}", "-l", f"bootrom,{rom}",
                   "-l", f"com1,file={self.console}", "-o", f"control.socket={self.socket}",
                   *(["-o", f"migration.key={key}"] if key else []), *args, f"test-mig-{name}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log,
                                         env=dict(os.environ, PYTHONPATH=str(REPO)))

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @classmethod
    def destination(cls, tmp: Path, disk: Path, key: Path, processes: list):
        """A destination on 127.0.0.1 and the port it listens on."""
        destination = cls(tmp, "dst", disk, key, "-R", "127.0.0.1:0")
        processes.append(destination)
        return destination, destination.listening_port()

    def listening_port(self) -> int:
        """The port a -R 127.0.0.1:0 destination printed."""
        def found():
            return re.search(r"waiting on 127\.0\.0\.1:(\d+)", self.output)
        wait_for(lambda: found() or self.proc.poll() is not None,
                 what="the destination to listen")
        assert found(), self.output
        return int(found().group(1))

    def wait(self) -> int:
        return self.proc.wait(TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def shared(tmp_path):
    """The shared storage: the disk and the key file both ends name."""
    disk, key = tmp_path / "disk.img", tmp_path / "key"
    with open(disk, "wb") as f:
        f.truncate(TOTAL_KIB * 1024)
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    return disk, key


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        process.kill()


def locked_elsewhere(disk: Path) -> bool:
    """Whether another open file description holds a lock on DISK."""
    fd = os.open(disk, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    except OSError as exc:
        assert exc.errno in (errno.EAGAIN, errno.EACCES)
        return True
    finally:
        os.close(fd)
    return False


# --- the counting guest --------------------------------------------------------------------
@pytest.mark.usefixtures("needs_kvm")
def test_counting_guest_carries_on_after_migration(tmp_path, shared, processes, capsys):
    disk, key = shared
    destination, port = Pyhyve.destination(tmp_path, disk, key, processes)
    source = Pyhyve(tmp_path, "src", disk, key)
    processes.append(source)
    wait_for(lambda: len(acked(source.console)) >= 64, what="the guest to write")
    assert ctlclient.main([f"--socket={source.socket}", f"--migrate=127.0.0.1,{port}"]) == 0
    said = capsys.readouterr().out
    assert re.search(rf"migrated to 127\.0\.0\.1:{port} \(\d+ bytes in \d+ ms, paused \d+ ms\)",
                     said), said
    assert source.wait() == 1, source.output        # bhyve's power-off status
    assert f"exit status 1: migrated to 127.0.0.1:{port}" in source.output
    wait_for(lambda: acked(destination.console), what="the destination's console")
    assert destination.proc.poll() is None
    assert locked_elsewhere(disk), "the destination did not take the disk's lock"
    assert destination.wait() == 1, destination.output
    before, after = acked(source.console), acked(destination.console)
    blocks = TOTAL_KIB * 1024 // BLOCK
    assert before and after and before[-1] < blocks, (before[-3:], after[:3])
    assert acked(source.console, destination.console) == list(range(1, blocks + 1)), \
        (before[-3:], after[:3])
    assert destination.console.read_text().endswith("blk done\n")
    assert disk.read_bytes() == pattern(TOTAL_KIB * 1024)


@pytest.mark.usefixtures("needs_kvm")
def test_source_resumes_when_the_destination_dies_mid_transfer(tmp_path, shared, processes):
    """The source, limited to 16 KiB/s through QMP, is cut off by SIGKILL on the
    destination: it resumes, query-migrate says why, the guest finishes there."""
    from test_qmp import qmp_session
    disk, key = shared
    destination, port = Pyhyve.destination(tmp_path, disk, key, processes)
    qmp_path = tmp_path / "qmp.sock"
    source = Pyhyve(tmp_path, "src", disk, key, "-o", f"qmp.socket={qmp_path}")
    processes.append(source)
    wait_for(lambda: len(acked(source.console)) >= 16, what="the guest to write")

    async def start(client):
        await client.execute("migrate-set-parameters", {"max-bandwidth": 16 * 1024})
        await client.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        return await client.execute("query-migrate")
    assert qmp_session(str(qmp_path))(start)["status"] in ("setup", "active")
    wait_for(lambda: "migration: receiving from" in destination.output,
             what="the transfer to begin")

    async def transferred(client):
        while not (await client.execute("query-migrate")).get("ram", {}).get("transferred"):
            await asyncio.sleep(0.05)
    # Killed as soon as bytes are on the wire, not after a fixed time: on a
    # host that runs the guest fast, its writes end (and the source powers
    # off) within 2.5 s of the migration's start.
    qmp_session(str(qmp_path))(transferred)
    assert source.proc.poll() is None, "the guest finished before the destination died"
    destination.proc.send_signal(signal.SIGKILL)
    destination.wait()

    async def follow(client):
        while (info := await client.execute("query-migrate"))["status"] not in \
                ("failed", "completed"):
            await asyncio.sleep(0.1)
        return info, await client.execute("query-status")
    info, status = qmp_session(str(qmp_path))(follow)
    assert info["status"] == "failed", info
    assert "lost the connection" in info["error-desc"], info
    assert status == {"running": True, "status": "running"}
    assert source.wait() == 1, source.output
    assert acked(source.console) == list(range(1, TOTAL_KIB * 1024 // BLOCK + 1))
    assert "migration to 127.0.0.1" in source.output and "failed" in source.output


@pytest.mark.usefixtures("needs_kvm")
def test_source_resumes_when_the_destination_cannot_take_the_disk(tmp_path, shared, processes,
                                                                  capsys):
    """After the pause: the destination restores the state, but another
    process holds its disk's lock, so it refuses; the source takes its own
    disk's lock back and the guest, paused meanwhile, runs on there."""
    disk, key = shared
    other = tmp_path / "other.img"
    other.write_bytes(disk.read_bytes())
    holder = os.open(other, os.O_RDWR)
    fcntl.fcntl(holder, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))
    try:
        destination, port = Pyhyve.destination(tmp_path, other, key, processes)
        source = Pyhyve(tmp_path, "src", disk, key)
        processes.append(source)
        wait_for(lambda: acked(source.console), what="the guest to write")
        assert ctlclient.main([f"--socket={source.socket}",
                               f"--migrate=127.0.0.1,{port}"]) == 1
        said = capsys.readouterr().err
        assert "cannot take over the disks" in said and "in use elsewhere" in said, said
        assert source.proc.poll() is None and locked_elsewhere(disk)     # its lock back
        assert destination.wait() == 4
        assert "pyhyve: migration failed: cannot take over the disks" in destination.output
        assert source.wait() == 1, source.output
    finally:
        os.close(holder)
    assert acked(source.console) == list(range(1, TOTAL_KIB * 1024 // BLOCK + 1))
    assert disk.read_bytes() == pattern(TOTAL_KIB * 1024)


@pytest.mark.usefixtures("needs_kvm")
def test_source_stays_paused_when_the_destination_may_hold_its_disk(tmp_path, shared,
                                                                    processes, capsys):
    """A destination (the test's own) that takes the disk's lock once the state
    came, then drops the connection without saying RUNNING: it may be running
    the guest, so the source must not resume it."""
    import threading
    disk, key = shared
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    holder = []

    def destination():
        sock, _ = listener.accept()
        channel = migstream.Channel.destination(sock, key.read_bytes())
        channel.receive()
        channel.send(migstream.ACCEPT)
        while channel.receive()[0] != migstream.STATE:
            pass
        holder.append(os.open(disk, os.O_RDWR))
        fcntl.fcntl(holder[0], fcntl.F_OFD_SETLK,
                    struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        channel.close()
    thread = threading.Thread(target=destination, daemon=True)
    thread.start()
    source = Pyhyve(tmp_path, "src", disk, key)
    processes.append(source)
    try:
        wait_for(lambda: acked(source.console), what="the guest to write")
        assert ctlclient.main([f"--socket={source.socket}",
                               f"--migrate=127.0.0.1,{port}"]) == 1
        said = capsys.readouterr().err
        assert "the destination may be running the guest" in said, said
        assert "this VM stays paused" in said, said
        count = len(acked(source.console))
        time.sleep(1.0)
        assert len(acked(source.console)) == count and source.proc.poll() is None
        assert ctlclient.main([f"--socket={source.socket}", "--json", "--list"]) == 0
        assert '"state": "paused"' in capsys.readouterr().out
    finally:
        thread.join(10)
        listener.close()
        for fd in holder:
            os.close(fd)


@pytest.mark.usefixtures("needs_kvm")
def test_a_peer_without_the_key_is_refused(tmp_path, shared, processes, capsys):
    disk, key = shared
    destination, port = Pyhyve.destination(tmp_path, disk, key, processes)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(os.urandom(32))
    other_key.chmod(0o600)
    source = Pyhyve(tmp_path, "src", disk, other_key)
    processes.append(source)
    wait_for(lambda: acked(source.console), what="the guest to write")
    # a source with another key: refused both ways, it runs on
    assert ctlclient.main([f"--socket={source.socket}", f"--migrate=127.0.0.1,{port}"]) == 1
    said = capsys.readouterr().err
    assert "failed" in said and "migration key" in said, said
    count = len(acked(source.console))
    wait_for(lambda: len(acked(source.console)) > count, what="the source to run on")
    # a peer that knows no key at all, and one that speaks another protocol
    for greeting in (migstream.MAGIC + bytes(32 + 32), b"GET / HTTP/1.0\r\n\r\n" + bytes(64)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
            peer.sendall(greeting)
            assert peer.recv(len(migstream.MAGIC)) == migstream.MAGIC     # the challenge
            assert closed_by_peer(peer)
    wait_for(lambda: destination.output.count("migration: refused 127.0.0.1") == 3,
             what="three refusals")
    assert destination.proc.poll() is None          # still waiting for its source
    source.kill()
    assert disk.read_bytes()[:BLOCK] == pattern(BLOCK)
    assert not locked_elsewhere(disk)               # the destination never locked it


def closed_by_peer(peer: socket.socket) -> bool:
    """Whether the peer closes the connection (what it sent may be left unread)."""
    try:
        while peer.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.usefixtures("needs_kvm")
def test_a_destination_needs_the_key(tmp_path, capsys):
    from pyhyve.cli import main
    rom = build_rom("halt")
    assert main(["-R", "127.0.0.1:0", "-l", f"bootrom,{rom}", "-o", "process.landlock=false",
                 "-o", f"control.socket={tmp_path / 'ctl.sock'}", "test-mig-nokey"]) == 4
    assert capsys.readouterr().err.strip().splitlines() == [
        "pyhyve: -R: a migration destination needs the key its source has: "
        "-o migration.key=PATH"]


# --- the wire, without a guest ---------------------------------------------------------------
def channels(source_key: bytes, destination_key: bytes):
    """Both ends of a handshake over a socket pair (the destination's on a thread)."""
    import threading
    left, right = socket.socketpair()
    got = {}

    def destination():
        try:
            got["destination"] = migstream.Channel.destination(right, destination_key)
        except migstream.MigrationError as exc:
            got["destination"] = exc
            right.close()
    thread = threading.Thread(target=destination)
    thread.start()
    try:
        got["source"] = migstream.Channel.source(left, source_key)
    except migstream.MigrationError as exc:
        got["source"] = exc
    thread.join(10)
    return got["source"], got["destination"]


def test_handshake_with_one_key_then_authenticated_messages():
    source, destination = channels(b"k" * 32, b"k" * 32)
    source.send(migstream.HELLO, b"{}")
    source.send(migstream.PAGES, b"a", b"bc")
    assert destination.receive() == (migstream.HELLO, b"{}")
    assert destination.receive() == (migstream.PAGES, b"abc")
    destination.send(migstream.ACCEPT)
    assert source.receive() == (migstream.ACCEPT, b"")


def test_handshake_with_another_key_is_refused_by_both():
    source, destination = channels(b"k" * 32, b"x" * 32)
    assert isinstance(destination, migstream.PeerRefused)
    assert isinstance(source, migstream.PeerRefused)


@pytest.mark.parametrize("tamper", ["payload", "replay", "reflect"])
def test_altered_replayed_or_reflected_messages_fail_their_mac(tamper):
    source, destination = channels(b"k" * 32, b"k" * 32)
    if tamper == "payload":
        header = struct.pack("<BI", migstream.PAGES, 3)
        source.sock.sendall(header + b"abd" + bytes(migstream.DIGEST))
    elif tamper == "replay":
        source.send(migstream.HELLO, b"{}")
        assert destination.receive() == (migstream.HELLO, b"{}")
        source._sent -= 1                   # the same message, sequence number and all
        source.send(migstream.HELLO, b"{}")
    else:                                   # what the destination would send, sent back
        source._send_key = destination._send_key
        source.send(migstream.ACCEPT)
    with pytest.raises(migstream.MigrationError, match="authentication"):
        destination.receive()


def test_key_file_must_be_private_and_long_enough(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="read by others"):
        migstream.read_key(str(key))
    key.chmod(0o600)
    assert migstream.read_key(str(key)) == key.read_bytes()
    key.write_bytes(b"short")
    with pytest.raises(ConfigError, match="16 to 4096 bytes"):
        migstream.read_key(str(key))


class _Memory:
    def __init__(self):
        self.low, self.high = bytearray(16 * 4096), bytearray(4 * 4096)

    def backings(self):
        return [(0, self.low), (1 << 32, self.high)]


class _Vm:
    def __init__(self):
        self.memory = _Memory()


def _pages(runs, data=b""):
    return (struct.pack("<I", len(runs)) + b"".join(struct.pack("<QI", gpa, count)
                                                    for gpa, count in runs) + data)


def test_page_runs_land_in_guest_ram():
    vm = _Vm()
    migration._write_pages(vm, _pages([(0x1000, 2), (1 << 32, 1)], b"a" * 8192 + b"b" * 4096),
                           with_data=True)
    assert vm.memory.low[0x1000:0x3000] == b"a" * 8192 and vm.memory.high[:4096] == b"b" * 4096
    migration._write_pages(vm, _pages([(0x2000, 1)]), with_data=False)
    assert vm.memory.low[0x1000:0x3000] == b"a" * 4096 + bytes(4096)


@pytest.mark.parametrize("payload", [
    _pages([(16 * 4096, 1)], bytes(4096)),              # past the end of low RAM
    _pages([(15 * 4096, 2)], bytes(8192)),              # straddles the end
    _pages([(0x800, 1)], bytes(4096)),                  # not page aligned
    _pages([(0x1000, 1)], bytes(4095)),                 # data short
    _pages([(0x1000, 1)], bytes(4097)),                 # data left over
    _pages([(0x1000, 0)]),                              # an empty run
    _pages([(0x1000, 1)])[:-2],                         # a truncated run table
    struct.pack("<I", 1 << 30),                         # a count with no table
    _pages([((1 << 64) - 4096, 1)], bytes(4096)),       # beyond any RAM
], ids=["past-ram", "straddles", "unaligned", "short", "left-over", "empty-run",
        "truncated-table", "no-table", "far-away"])
def test_page_runs_outside_guest_ram_or_malformed_are_refused(payload):
    vm = _Vm()
    with pytest.raises(migstream.MigrationError):
        migration._write_pages(vm, payload, with_data=True)
    assert not any(vm.memory.low) and not any(vm.memory.high)


@pytest.mark.parametrize("payload", [b"", b"\xff\xff\xff\x7f{}", struct.pack("<I", 2) + b"{}",
                                     struct.pack("<I", 4) + b"[1,2]",
                                     struct.pack("<I", 2) + b'{}' + b"extra"],
                         ids=["empty", "long", "no-format", "not-object", "data-size"])
def test_malformed_state_is_refused(payload):
    with pytest.raises(migstream.MigrationError, match="malformed"):
        migration._restore_state(_Vm(), payload)


def test_addresses_parse():
    assert migration.parse_address("127.0.0.1:80", "-R") == ("127.0.0.1", 80)
    assert migration.parse_address("[::1]:80", "-R") == ("::1", 80)
    for bad in ("127.0.0.1", ":80", "host:port", "host:99999"):
        with pytest.raises(ConfigError):
            migration.parse_address(bad, "-R")


# --- the Linux guest kit ---------------------------------------------------------------------
LINUX_SCRIPT = r"""
section before
mke2fs -q /dev/vda && mkdir -p /mnt/a && mount -t ext2 /dev/vda /mnt/a && echo mounted
echo "written before the migration" > /mnt/a/before.txt
dd if=/bin/busybox of=/tmp/blob bs=64k count=16 2>/dev/null
md5sum /tmp/blob
(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; done) &
echo MIGRATE-NOW
read answer
section after
echo "resumed-with: $answer"
kill $!
md5sum /tmp/blob
echo "written after the migration" > /mnt/a/after.txt
cat /mnt/a/before.txt /mnt/a/after.txt
sync; umount /mnt/a && echo unmounted
reboot -f
"""


@pytest.mark.linux
@pytest.mark.usefixtures("needs_kvm")
def test_linux_finishes_its_script_on_the_destination(linux_guest, tmp_path, shared, capsys):
    from linuxguest import GuestRun, pyhyve_command, pyhyve_env, sections, with_script
    disk, key = shared
    with open(disk, "wb") as image:
        image.truncate(16 << 20)
    initrd = with_script(linux_guest, tmp_path, LINUX_SCRIPT)
    argv = pyhyve_command(linux_guest, initrd, "-s", f"2,virtio-blk,{disk}",
                          "-o", f"migration.key={key}", name="test-mig-linux")
    source_socket = tmp_path / "src.sock"
    with GuestRun([*argv[:3], "-R", "127.0.0.1:0", "-o", f"control.socket={tmp_path / 'dst'}",
                   *argv[3:]], pyhyve_env(), tmp_path / "dst.log") as destination, \
            GuestRun([*argv[:3], "-o", f"control.socket={source_socket}", *argv[3:]],
                     pyhyve_env(), tmp_path / "src.log") as source:
        destination.expect("migration: waiting on")
        port = re.search(r"waiting on 127\.0\.0\.1:(\d+)", destination.output).group(1)
        source.expect("MIGRATE-NOW")
        assert ctlclient.main([f"--socket={source_socket}",
                               f"--migrate=127.0.0.1,{port}"]) == 0, capsys.readouterr()
        assert source.wait() == 1
        destination.send("from the destination\n")
        assert destination.wait() == 0            # reboot -f: bhyve's reset status
    before = sections(source.output)["before"].splitlines()
    after = sections(destination.output)["after"].splitlines()
    assert "MIGRATE-NOW" not in destination.output and "resumed-with" not in source.output
    assert after[0] == "resumed-with: from the destination"
    blob = [line.split()[0] for line in before + after if line.endswith("/tmp/blob")]
    assert len(blob) == 2 and blob[0] == blob[1], (before, after)     # RAM, intact
    written = [line for line in after if line.startswith("written ")]
    assert written == ["written before the migration", "written after the migration"]
    assert "unmounted" in after, after
