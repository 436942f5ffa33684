"""virtio-net end to end: a guest with its own legacy virtio-net driver
(tests/guests/netdriver.S) answers ARP and ping on 10.0.0.2; the host pings
it through a tap in a private network namespace.  The same guest runs on
pyhyve and on QEMU, the reference.  The guest powers off after PINGS echo
replies, so an extra reply (to a frame it should have dropped) shows up as a
missing one at the host."""

import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from build import build_rom
from guestrun import REPO
from inetsum import inet_checksum

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("needs_kvm")]

HOST_IP, GUEST_IP = "10.0.0.1", "10.0.0.2"
GUEST_MAC = "52:54:00:6e:65:74"
PINGS = 3
SLOT = 3
POWEROFF = 1            # pyhyve's exit status, and QEMU's isa-debug-exit code for the S5 write
READY_TIMEOUT = 120     # seconds: the guest's code is emulated on the test hosts
BIG_MTU = 9000


@pytest.fixture
def netns():
    """A private network namespace with tap `tap0` holding HOST_IP/24;
    yields (namespace, ip command)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and taps")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")
    from firmware import require_program
    ip = require_program("ip", "iproute2")
    require_program("ping", "iputils-ping")
    namespace = f"pyhyve-net-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run([ip, "netns", "add", namespace], check=True)
    try:
        for command in (["tuntap", "add", "dev", "tap0", "mode", "tap"],
                        ["addr", "add", f"{HOST_IP}/24", "dev", "tap0"],
                        ["link", "set", "tap0", "up"]):
            subprocess.run([ip, "-n", namespace, *command], check=True)
        yield namespace, ip
    finally:
        subprocess.run([ip, "netns", "delete", namespace])


def vm_command(kind: str, rom: Path, debug: Path) -> list[str]:
    if kind == "pyhyve":
        return [sys.executable, "-m", "pyhyve", "-s", f"{SLOT},virtio-net,tap=tap0,mac={GUEST_MAC}",
                "-l", f"bootrom,{rom}", "-l", f"debugcon,file={debug}", "net-guest"]
    from firmware import require_program
    qemu = require_program("qemu-system-x86_64", "qemu-system-x86")
    return [qemu, "-enable-kvm", "-machine", "pc", "-nodefaults", "-display", "none",
            "-bios", str(rom),
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,disable-modern=on,addr={SLOT},mac={GUEST_MAC}",
            "-chardev", f"file,id=dbg,path={debug}",
            "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
            "-device", "isa-debug-exit,iobase=0x404,iosize=2"]


class Guest:
    """The netdriver guest running in the namespace, and what it printed."""

    def __init__(self, kind: str, namespace: str, ip: str, tmp_path: Path):
        self.debug = tmp_path / "guest.debug"
        self.log = open(tmp_path / "vm.log", "w+")
        rom = build_rom("netdriver", PINGS=PINGS)
        self.proc = subprocess.Popen(
            [ip, "netns", "exec", namespace, *vm_command(kind, rom, self.debug)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO)))

    def text(self) -> str:
        return self.debug.read_text(errors="replace") if self.debug.exists() else ""

    def output(self) -> str:
        self.log.seek(0)
        return f"guest:\n{self.text()}\nvm:\n{self.log.read()}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while "net ready" not in self.text():
            assert self.proc.poll() is None, f"the VM exited early\n{self.output()}"
            assert time.monotonic() < deadline, f"no 'net ready'\n{self.output()}"
            time.sleep(0.2)

    def wait_exit(self) -> int:
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(params=["pyhyve", "qemu"])
def guest(request, netns, tmp_path):
    namespace, ip = netns
    vm = Guest(request.param, namespace, ip, tmp_path)
    try:
        yield vm
    finally:
        vm.close()


def ping(namespace: str, ip: str, *options: str) -> str:
    return subprocess.run([ip, "netns", "exec", namespace, "ping", *options, GUEST_IP],
                          capture_output=True, text=True, timeout=60).stdout


def check_pinged(guest: Guest, namespace: str, ip: str) -> None:
    """PINGS pings get PINGS good replies; then the guest says so and powers off."""
    output = ping(namespace, ip, "-c", str(PINGS), "-W", "5")
    assert f"{PINGS} packets transmitted, {PINGS} received" in output, \
        output + guest.output()
    assert "BAD CHECKSUM" not in output and "DUP!" not in output, output
    assert guest.wait_exit() == POWEROFF, guest.output()
    lines = guest.text().splitlines()
    assert lines[-1] == f"pinged {PINGS:x}", guest.output()


def test_guest_answers_ping(guest, netns):
    namespace, ip = netns
    guest.wait_ready()
    lines = guest.text().splitlines()
    assert lines[0].startswith(f"virtio-net 00:{SLOT:02x}.0 io 0x"), guest.output()
    assert f"mac {GUEST_MAC}" in lines, guest.output()
    check_pinged(guest, namespace, ip)


# --- frames the guest must drop ------------------------------------------------------------
def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def echo_request(host_mac: bytes, payload: bytes = b"pyhyve" * 8, dst_mac: bytes | None = None,
                 dst_ip: str = GUEST_IP, frag: int = 0, ihl: int = 5,
                 ip_checksum_delta: int = 0, icmp_checksum_delta: int = 0,
                 total: int | None = None) -> bytes:
    """An Ethernet frame holding an ICMP echo request, correct unless told otherwise."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", (inet_checksum(icmp) + icmp_checksum_delta) & 0xFFFF) \
        + icmp[4:]
    options = bytes(max(ihl - 5, 0) * 4)
    if total is None:
        total = 4 * max(ihl, 5) + len(icmp)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, 1, 0,
                         bytes(map(int, HOST_IP.split("."))),
                         bytes(map(int, dst_ip.split(".")))) + options
    header = header[:10] + struct.pack("!H", (inet_checksum(header) + ip_checksum_delta)
                                       & 0xFFFF) + header[12:]
    ethernet = (dst_mac or mac_bytes(GUEST_MAC)) + host_mac + b"\x08\x00"
    return ethernet + header + icmp


def arp(host_mac: bytes, oper: int, target_ip: str) -> bytes:
    return (b"\xff" * 6 + host_mac + b"\x08\x06" +
            struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, oper, host_mac,
                        bytes(map(int, HOST_IP.split("."))), bytes(6),
                        bytes(map(int, target_ip.split(".")))))


def bad_frames(host_mac: bytes) -> list[bytes]:
    """Frames that must get no answer: broken or not for the guest, and one that is too
    big for its 2 KiB receive buffers (which the device must drop, not split)."""
    good = echo_request(host_mac)
    rng = random.Random(6)
    return [
        echo_request(host_mac, icmp_checksum_delta=1),
        echo_request(host_mac, ip_checksum_delta=1),
        echo_request(host_mac, total=len(good) - 14 + 8),   # more than the frame holds
        echo_request(host_mac, total=20 + 4),               # no room for the ICMP header
        echo_request(host_mac, frag=0x2000),                # first fragment (MF)
        echo_request(host_mac, frag=0x0010),                # a later fragment
        echo_request(host_mac, ihl=4),
        echo_request(host_mac, dst_ip="10.0.0.3"),
        echo_request(host_mac, dst_mac=b"\x02\x00\x00\x00\x00\x01"),
        echo_request(host_mac, dst_mac=b"\xff" * 6),        # broadcast ping: not answered
        echo_request(host_mac, payload=bytes(3000)),        # over the guest's buffers
        good[:30], good[:14],
        arp(host_mac, 1, "10.0.0.3"),                       # for someone else
        arp(host_mac, 2, GUEST_IP),                         # a reply, not a request
        arp(host_mac, 1, GUEST_IP)[:41],                    # truncated
        *(mac_bytes(GUEST_MAC) + bytes(rng.randrange(256) for _ in range(rng.randrange(
            0, 1500))) for _ in range(20)),
    ]


SENDER = """import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
for line in sys.stdin.read().split():
    s.send(bytes.fromhex(line))
"""


def test_guest_drops_bad_frames_then_answers_ping(guest, netns):
    """No echo reply for any of bad_frames(): the guest counts its replies, so one
    would end it before the last ping."""
    namespace, ip = netns
    guest.wait_ready()
    subprocess.run([ip, "-n", namespace, "link", "set", "tap0", "mtu", str(BIG_MTU)],
                   check=True)
    host_mac = subprocess.run([ip, "-n", namespace, "-br", "link", "show", "tap0"],
                              capture_output=True, text=True, check=True).stdout.split()[2]
    frames = bad_frames(mac_bytes(host_mac))
    subprocess.run([ip, "netns", "exec", namespace, sys.executable, "-c", SENDER],
                   input="\n".join(frame.hex() for frame in frames), text=True, check=True,
                   timeout=60)
    check_pinged(guest, namespace, ip)
