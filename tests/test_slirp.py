"""virtio-net's user-mode network (pyhyve/virtio/slirp.py) on the real libslirp, no
guest needed: frames built here go in as a guest's would, and what libslirp answers
(ARP, DHCP, DNS forwarded to a resolver the test starts, TCP from a host port
forward) is parsed; the ctypes structures are checked against libslirp.h."""

import ctypes
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from inetsum import inet_checksum

from pyhyve.config import ConfigError
from pyhyve.virtio import net as N
from pyhyve.virtio import device as D
from pyhyve.virtio import pci as V
from pyhyve.virtio import slirp as S
from pyhyve.virtio.emulations import VirtioNetPci
from test_virtio import BUFFERS, SLOT, Driver, Ring, VirtioVm, make, wait_for

GUEST_MAC = bytes.fromhex("5254000a0b0c")
GUEST_IP = "10.0.2.15"
BROADCAST = b"\xff" * 6
ETH_IP, ETH_ARP = 0x0800, 0x0806
DHCP_DISCOVER, DHCP_OFFER = 1, 2
TCP_SYN, TCP_ACK = 0x02, 0x10
HEADER = bytes(S.HDR_LEN)

def _libslirp_present() -> bool:
    try:
        S.load_library()
    except ConfigError:
        return False
    return True


needs_libslirp = pytest.mark.skipif(not _libslirp_present(),
                                    reason="libslirp0 is not installed")


# --- frames, built and parsed as a guest's network stack would -----------------------------
def ethernet(destination: bytes, ethertype: int, payload: bytes) -> bytes:
    return destination + GUEST_MAC + struct.pack("!H", ethertype) + payload


def arp_request(target_ip: str, sender_ip: str = GUEST_IP) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 1) + GUEST_MAC + socket.inet_aton(sender_ip) \
        + bytes(6) + socket.inet_aton(target_ip)
    return ethernet(BROADCAST, ETH_ARP, body)


def udp_packet(source: str, destination: str, source_port: int, destination_port: int,
               payload: bytes, mac: bytes) -> bytes:
    udp = struct.pack("!HHHH", source_port, destination_port, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(source), socket.inet_aton(destination))
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return ethernet(mac, ETH_IP, ip + udp)


def dhcp_discover(xid: int) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), GUEST_MAC, b"", b"")
    options = b"\x63\x82\x53\x63" + bytes([53, 1, DHCP_DISCOVER, 255])
    return udp_packet("0.0.0.0", "255.255.255.255", 68, 67, bootp + options, BROADCAST)


def dns_query(name: str, query_id: int) -> bytes:
    question = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + \
        struct.pack("!HH", 1, 1)


def parse_ipv4(frame: bytes):
    """(source, destination, protocol, payload) of an IPv4 frame, else None."""
    if len(frame) < 34 or struct.unpack_from("!H", frame, 12)[0] != ETH_IP:
        return None
    header_length = (frame[14] & 0xF) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    return (socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), frame[23],
            frame[14 + header_length:14 + total])


def dhcp_options(bootp: bytes) -> dict[int, bytes]:
    options, at = {}, 240
    while at < len(bootp) and bootp[at] != 255:
        if bootp[at] == 0:
            at += 1
            continue
        options[bootp[at]] = bootp[at + 2:at + 2 + bootp[at + 1]]
        at += 2 + bootp[at + 1]
    return options


# --- the backend alone, its device end played by the test ----------------------------------
class Wire:
    """The device's end of a SlirpBackend: frames in and out, header stripped."""

    def __init__(self, backend: S.SlirpBackend):
        self.backend = backend

    def send(self, frame: bytes) -> None:
        os.write(self.backend.fd, HEADER + frame)

    def receive(self, accept, timeout: float = 10.0) -> bytes:
        """The first frame from libslirp for which accept(frame) is true."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.backend.fd], [], [], left)[0]:
                break
            data = os.read(self.backend.fd, S.FRAME_BUFFER)
            assert data[:S.HDR_LEN] == HEADER
            if accept(data[S.HDR_LEN:]):
                return data[S.HDR_LEN:]
        raise AssertionError("libslirp sent no such frame")

    def introduce(self) -> None:
        """ARP for the gateway, which also teaches libslirp the guest's MAC."""
        self.send(arp_request(S.HOST))
        self.receive(lambda f: struct.unpack_from("!H", f, 12)[0] == ETH_ARP)


@pytest.fixture
def wire():
    backends = []

    def start(forwards=(), **options):
        backend = S.SlirpBackend(list(forwards), 1500, **options)
        backends.append(backend)
        return Wire(backend)
    yield start
    for backend in backends:
        backend.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_libslirp
def test_arp_for_the_gateway_is_answered(wire):
    link = wire()
    link.send(arp_request(S.HOST))
    reply = link.receive(lambda f: struct.unpack_from("!H", f, 12)[0] == ETH_ARP)
    operation, = struct.unpack_from("!H", reply, 20)
    assert reply[:6] == GUEST_MAC and operation == 2
    assert reply[22:28] == reply[6:12]                         # the gateway's own MAC
    assert socket.inet_ntoa(reply[28:32]) == S.HOST
    assert reply[32:38] == GUEST_MAC and socket.inet_ntoa(reply[38:42]) == GUEST_IP


@needs_libslirp
def test_frames_the_device_does_not_take_are_dropped_and_counted(wire):
    """With nobody reading the device's end, libslirp's replies fill the socket; the
    rest are dropped and counted, and the network keeps running."""
    link = wire()
    requests = 2000
    for _ in range(requests):
        select.select([], [link.backend.fd], [], 5)
        link.send(arp_request(S.HOST))
    assert wait_for(lambda: link.backend.dropped > 0, timeout=10)
    received = 0
    while select.select([link.backend.fd], [], [], 0.5)[0]:
        os.read(link.backend.fd, S.FRAME_BUFFER)
        received += 1
    assert received + link.backend.dropped == requests
    link.send(arp_request(S.HOST))                              # still answering
    link.receive(lambda f: struct.unpack_from("!H", f, 12)[0] == ETH_ARP)


def offer_for(xid: int):
    def accept(frame: bytes) -> bool:
        packet = parse_ipv4(frame)
        return packet is not None and packet[2] == 17 and \
            struct.unpack_from("!H", packet[3], 2)[0] == 68 and \
            struct.unpack_from("!I", packet[3], 12)[0] == xid
    return accept


def check_offer(frame: bytes) -> None:
    source, _, _, udp = parse_ipv4(frame)
    bootp = udp[8:]
    options = dhcp_options(bootp)
    assert source == S.HOST
    assert socket.inet_ntoa(bootp[16:20]) == GUEST_IP          # yiaddr
    assert options[53] == bytes([DHCP_OFFER])
    assert socket.inet_ntoa(options[54]) == S.HOST             # the server
    assert socket.inet_ntoa(options[3]) == S.HOST              # the router
    assert socket.inet_ntoa(options[6]) == S.NAMESERVER
    assert socket.inet_ntoa(options[1]) == S.NETMASK


@needs_libslirp
def test_dhcp_discover_gets_an_offer(wire):
    link = wire()
    link.send(dhcp_discover(0x1234ABCD))
    check_offer(link.receive(offer_for(0x1234ABCD)))


@needs_libslirp
def test_dhcp_offer_names_the_boot_file(wire, tmp_path):
    link = wire(tftp=str(tmp_path), bootfile="boot.ipxe")
    link.send(dhcp_discover(7))
    udp = parse_ipv4(link.receive(offer_for(7)))[3]
    assert udp[8 + 108:8 + 236].rstrip(b"\0") == b"boot.ipxe"      # BOOTP's file field


@needs_libslirp
def test_host_forward_reaches_the_guest_as_a_syn(wire):
    port = free_port()
    link = wire(S.parse_hostfwd(f"tcp:127.0.0.1:{port}-:22"))
    link.introduce()
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        def syn_to_guest(frame: bytes) -> bool:
            packet = parse_ipv4(frame)
            return packet is not None and packet[2] == 6 and \
                struct.unpack_from("!H", packet[3], 2)[0] == 22
        source, destination, _, tcp = parse_ipv4(link.receive(syn_to_guest))
        assert destination == GUEST_IP and source == S.HOST
        assert tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN
    finally:
        client.close()


@needs_libslirp
def test_host_forward_on_a_busy_port_is_one_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^virtio-net: hostfwd tcp:127.0.0.1:{port}-"
                           rf"10.0.2.15:22: cannot listen on 127.0.0.1:{port}: "):
            S.SlirpBackend(S.parse_hostfwd(f"tcp:127.0.0.1:{port}-:22"), 1500)


DNS_PROBE = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path[:0] = sys.argv[1:3]
    import test_slirp as T
    from pyhyve.virtio import slirp as S
    work = sys.argv[3]
    subprocess.run(["mount", "--bind", os.path.join(work, "resolv.conf"), "/etc/resolv.conf"],
                   check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolver = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
         "--no-hosts", "--listen-address=127.0.0.1", "--bind-interfaces", "--port=53",
         "--address=/pyhyve.test/192.0.2.7", "--pid-file=" + os.path.join(work, "pid")])
    try:
        time.sleep(0.5)
        backend = S.SlirpBackend([], 1500)
        link = T.Wire(backend)
        link.introduce()
        print(T.resolve(link, "www.pyhyve.test").hex())
        backend.close()
    finally:
        resolver.terminate()
        resolver.wait()
""")


def resolve(link: Wire, name: str) -> bytes:
    """Ask 10.0.2.3 for name's A record through libslirp; the answer's payload."""
    link.send(udp_packet(GUEST_IP, S.NAMESERVER, 40000, 53, dns_query(name, 0x5151),
                         arp_mac(link)))

    def answer(frame: bytes) -> bool:
        packet = parse_ipv4(frame)
        return packet is not None and packet[2] == 17 and \
            struct.unpack_from("!H", packet[3], 2)[0] == 40000
    source, _, _, udp = parse_ipv4(link.receive(answer))
    assert source == S.NAMESERVER
    return udp[8:]


def arp_mac(link: Wire) -> bytes:
    link.send(arp_request(S.NAMESERVER))
    reply = link.receive(lambda f: struct.unpack_from("!H", f, 12)[0] == ETH_ARP and
                         socket.inet_ntoa(f[28:32]) == S.NAMESERVER)
    return reply[22:28]


@needs_libslirp
def test_dns_is_forwarded_to_the_hosts_resolver(tmp_path):
    """In a private mount and network namespace whose resolv.conf names a dnsmasq on
    127.0.0.1, a query to 10.0.2.3 comes back with dnsmasq's answer."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount and network namespace")
    for program in ("unshare", "dnsmasq", "ip", "mount"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    probe = subprocess.run(
        ["unshare", "--mount", "--net", sys.executable, "-c", DNS_PROBE, tests,
         os.path.dirname(tests), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    answer = bytes.fromhex(probe.stdout.split()[-1])
    query_id, flags, _, answers = struct.unpack_from("!HHHH", answer)
    assert query_id == 0x5151 and flags & 0x8000 and flags & 0xF == 0 and answers == 1
    assert answer[-4:] == socket.inet_aton("192.0.2.7")


# --- through the virtio-net device ---------------------------------------------------------
QUEUES = {N.RX: (0x10000, 0x11000, 0x12000), N.TX: (0x20000, 0x21000, 0x22000)}


@needs_libslirp
def test_device_gets_a_dhcp_offer():
    vm = VirtioVm()
    device = make(vm, VirtioNetPci, backend="slirp")
    driver = Driver(vm, device)
    assert driver.negotiate(D.F_VERSION_1 | N.F_MRG_RXBUF) & D.STATUS_FEATURES_OK
    rings = {}
    for index, (desc, avail, used) in QUEUES.items():
        driver.set_common(V.COMMON_Q_SELECT, 2, index)
        for offset, address in ((V.COMMON_Q_DESCLO, desc), (V.COMMON_Q_AVAILLO, avail),
                                (V.COMMON_Q_USEDLO, used)):
            driver.set_common(offset, 4, address)
            driver.set_common(offset + 4, 4, 0)
        rings[index] = Ring(vm, desc, avail, used, driver.common(V.COMMON_Q_SIZE, 2))
        driver.set_common(V.COMMON_Q_ENABLE, 2, 1)
    driver.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                      D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)
    try:
        for i in range(4):
            rings[N.RX].offer([(BUFFERS + 0x800 * i, 0x800, True)])
        driver.notify(N.RX)
        discover = dhcp_discover(0xC0FFEE)
        vm.memory.write(BUFFERS + 0x4000, bytes(N.HDR_LEN) + discover)
        rings[N.TX].offer([(BUFFERS + 0x4000, N.HDR_LEN + len(discover), False)])
        driver.notify(N.TX)
        offer = None

        def offered() -> bool:
            nonlocal offer
            for head, length in rings[N.RX].completed():
                frame = vm.memory.read(BUFFERS + 0x800 * head, length)[N.HDR_LEN:]
                if offer_for(0xC0FFEE)(frame):
                    offer = frame
            return offer is not None
        assert wait_for(offered)
        check_offer(offer)
        assert device.model.tx_dropped == device.model.rx_dropped == 0
    finally:
        vm.close()


# --- timers, options, the library missing --------------------------------------------------
def test_timer_heap_fires_due_timers_once():
    timers, fired = S.TimerHeap(), []
    handles = {name: timers.new(fired.append, name)
               for name in ("due", "later", "freed", "moved")}
    assert 0 not in handles.values()
    now = time.monotonic_ns() // 1_000_000
    hour = 3_600_000
    assert timers.run_due() is None                            # none running yet
    timers.modify(handles["later"], now + hour)
    timers.modify(handles["due"], now - 1)
    timers.modify(handles["freed"], now - 1)
    timers.free(handles["freed"])
    timers.modify(handles["moved"], now - 1)
    timers.modify(handles["moved"], now + 2 * hour)
    assert 0 < timers.run_due() <= hour
    assert fired == ["due"]
    timers.modify(handles["later"], now - 1)
    assert hour < timers.run_due() <= 2 * hour
    assert fired == ["due", "later"]
    timers.modify(handles["due"], now - 1)                     # timers are re-armed by modify
    timers.run_due()
    assert fired == ["due", "later", "due"]


@pytest.mark.parametrize("rule, message", [
    ("tcp:2222:22", "is not tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"),
    ("sctp::2222-:22", "is not tcp|udp"),
    ("tcp::2222-:22;", "hostfwd '' is not"),
    ("tcp::0-:22", "port '0' is not a number from 1 to 65535"),
    ("tcp::2222-:65536", "port '65536' is not a number"),
    ("udp::x-:53", "port 'x' is not"),
    ("tcp:1.2.3:2222-:22", "'1.2.3' is not an IPv4 address"),
    ("tcp::2222-10.0.2.256:22", "'10.0.2.256' is not an IPv4 address"),
])
def test_bad_hostfwd_is_one_clear_error(rule, message):
    with pytest.raises(ConfigError, match="^virtio-net: hostfwd ") as error:
        S.parse_hostfwd(rule)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_hostfwd_syntax_as_qemu_and_bhyve_write_it():
    assert S.parse_hostfwd("tcp:2222-:22") == [(False, "0.0.0.0", 2222, GUEST_IP, 22)]
    assert S.parse_hostfwd("tcp::2222-:22;udp:127.0.0.1:5353-10.0.2.16:53") == [
        (False, "0.0.0.0", 2222, GUEST_IP, 22), (True, "127.0.0.1", 5353, "10.0.2.16", 53)]


@pytest.mark.parametrize("options, message", [
    ({"backend": "slirp", "hostfwd": "tcp:22"}, "hostfwd 'tcp:22' is not"),
    ({"backend": "slirp", "tftp": "/nonexistent/dir"}, "tftp directory '/nonexistent/dir'"),
    ({"backend": "slirp", "speed": "10"}, "unknown option 'speed'"),
])
def test_bad_slirp_options(options, message):
    vm = VirtioVm()
    with pytest.raises(ConfigError, match=message):
        vm.pci.add(SLOT, 0, VirtioNetPci, options)
    vm.close()


def test_missing_libslirp_names_the_package(monkeypatch):
    monkeypatch.setattr(S, "LIBRARY", "libslirp-not-installed.so.0")
    vm = VirtioVm()
    with pytest.raises(ConfigError) as error:
        vm.pci.add(SLOT, 0, VirtioNetPci, {"backend": "slirp"})
    assert str(error.value) == "virtio-net: slirp needs libslirp (apt-get install libslirp0)"
    vm.close()


# --- the ctypes layout against libslirp.h ---------------------------------------------------
HEADER_FILE = "/usr/include/slirp/libslirp.h"


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """Sizes and offsets from a C program compiled against libslirp-dev's header."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    if not os.path.exists(HEADER_FILE):
        pytest.skip("libslirp-dev is not installed (the header to check against)")
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <slirp/libslirp.h>",
             "int main(void) {"]
    for struct_type, c_name in ((S.SlirpConfig, "SlirpConfig"), (S.SlirpCb, "SlirpCb")):
        lines.append(f'printf("{c_name} size %zu\\n", sizeof({c_name}));')
        for field, _ in struct_type._fields_:
            lines.append(f'printf("{c_name} {field} %zu\\n", offsetof({c_name}, {field}));')
    lines += ['printf("in6_addr size %zu\\n", sizeof(struct in6_addr));', "return 0; }"]
    work = tmp_path_factory.mktemp("slirp-abi")
    (work / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(work / "abi"), str(work / "abi.c")], check=True)
    output = subprocess.run([str(work / "abi")], capture_output=True, text=True,
                            check=True).stdout
    return {tuple(line.split()[:2]): int(line.split()[2]) for line in output.splitlines()}


@pytest.mark.parametrize("struct_type, c_name", [(S.SlirpConfig, "SlirpConfig"),
                                                  (S.SlirpCb, "SlirpCb")])
def test_field_offsets_match_the_header(c_layout, struct_type, c_name):
    for field, _ in struct_type._fields_:
        assert getattr(struct_type, field).offset == c_layout[(c_name, field)], field


def test_struct_sizes_match_the_header(c_layout):
    assert ctypes.sizeof(S.SlirpCb) == c_layout[("SlirpCb", "size")]
    assert ctypes.sizeof(S.In6Addr) == c_layout[("in6_addr", "size")]
    # pyhyve passes version 1: its SlirpConfig stops before version 2's fields.
    assert ctypes.sizeof(S.SlirpConfig) <= c_layout[("SlirpConfig", "size")]
