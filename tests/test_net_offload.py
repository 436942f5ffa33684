"""virtio-net checksum and segmentation offloads: the features offered follow what
the tap accepts, the tap is told the guest's receive offloads at DRIVER_OK and
none on reset, headers pass through both ways only when negotiated.  First on a
socketpair standing in for the tap, then on a real tap in a private network
namespace, where the kernel reports the tap's offloads, segments what a guest
without TSO cannot take, and completes checksums a guest left partial."""

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import socket
import struct
import subprocess

import pytest
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from inetsum import ones_complement_sum
from test_slirp import needs_libslirp
from test_virtio import BUFFERS, Driver, VirtioVm, make, wait_for
from test_virtio_net import legacy, legacy_notify, modern

from pyhyve.virtio import net as N
from pyhyve.virtio import device as D
from pyhyve.virtio import pci as V
from pyhyve.virtio import tap as T
from pyhyve.virtio.emulations import VirtioNetPci

ALL_TAP_OFFLOADS = T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6 | T.TUN_F_TSO_ECN
OFFLOAD_BITS = (N.F_CSUM | N.F_GUEST_CSUM | N.F_HOST_TSO4 | N.F_HOST_TSO6 | N.F_HOST_ECN |
                N.F_GUEST_TSO4 | N.F_GUEST_TSO6 | N.F_GUEST_ECN)
MODERN = D.F_VERSION_1 | N.F_MRG_RXBUF
GUEST_MAC, HOST_IP, GUEST_IP = bytes.fromhex("525400000002"), "10.0.0.1", "10.0.0.2"
ETH, IP, TCP, UDP = 14, 20, 20, 8
TCP_CHECK_AT, UDP_CHECK_AT = 16, 6      # offsets of the checksums in their headers


# --- frames, as a network stack builds them -----------------------------------------------------
def pseudo_header_sum(source: str, destination: str, protocol: int, length: int) -> int:
    return ones_complement_sum(socket.inet_aton(source) + socket.inet_aton(destination) +
                               struct.pack("!BBH", 0, protocol, length))


def ipv4_frame(destination_mac: bytes, source: str, destination: str, protocol: int,
               transport: bytes, check_at: int, partial: bool) -> bytes:
    """Ethernet and IPv4 around `transport`, whose checksum (at `check_at`) is filled
    in complete, or as the pseudo-header sum a driver leaves for NEEDS_CSUM."""
    transport = bytearray(transport)
    start = pseudo_header_sum(source, destination, protocol, len(transport))
    check = start if partial else ~ones_complement_sum(bytes(transport), start) & 0xFFFF
    struct.pack_into("!H", transport, check_at, check)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, IP + len(transport), 1, 0x4000, 64,
                               protocol, 0, socket.inet_aton(source),
                               socket.inet_aton(destination)))
    struct.pack_into("!H", ip, 10, ~ones_complement_sum(bytes(ip)) & 0xFFFF)
    return destination_mac + GUEST_MAC + b"\x08\x00" + bytes(ip) + bytes(transport)


def tcp_frame(destination_mac: bytes, payload: bytes, partial: bool = False,
              source: str = HOST_IP, destination: str = GUEST_IP, ports=(5001, 5002),
              seq: int = 1000, ack: int = 0, flags: int = 0x18) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", *ports, seq, ack, (TCP // 4) << 4, flags, 65535, 0, 0)
    return ipv4_frame(destination_mac, source, destination, socket.IPPROTO_TCP,
                      tcp + payload, TCP_CHECK_AT, partial)


def checksum_is_complete(frame: bytes) -> bool:
    """Whether the TCP or UDP checksum of an IPv4 frame verifies."""
    source, destination = (socket.inet_ntoa(frame[ETH + 12:ETH + 16]),
                           socket.inet_ntoa(frame[ETH + 16:ETH + 20]))
    transport = frame[ETH + IP:ETH + struct.unpack_from("!H", frame, ETH + 2)[0]]
    start = pseudo_header_sum(source, destination, frame[ETH + 9], len(transport))
    return ones_complement_sum(transport, start) == 0xFFFF


def net_header(flags=0, gso_type=N.GSO_NONE, gso_size=0, csum=(0, 0), hdr_len=0) -> bytes:
    return N._NET_HDR.pack(flags, gso_type, hdr_len, gso_size, *csum)


NEEDS_TCP_CSUM = dict(flags=N.HDR_F_NEEDS_CSUM, csum=(ETH + IP, TCP_CHECK_AT))


# --- a socketpair standing in for a tap that accepts some offloads ---------------------------
class FakeTap:
    """The host end of the socketpair, the offloads the tap accepts, and what it was told."""

    def __init__(self, host: socket.socket):
        self.host = host
        self.accepts = ALL_TAP_OFFLOADS
        self.told: list[int] = []


@pytest.fixture
def tap(monkeypatch):
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    device_end.setblocking(False)
    host_end.settimeout(5)
    fake = FakeTap(host_end)
    monkeypatch.setattr(N, "open_tap", lambda name: os.dup(device_end.fileno()))
    monkeypatch.setattr(N, "probe_offloads", lambda fd: fake.accepts)
    monkeypatch.setattr(N, "set_offloads", lambda fd, flags: fake.told.append(flags))
    yield fake
    device_end.close()
    host_end.close()


# --- the probe, against the kernel's rules for TUNSETOFFLOAD ---------------------------------
def kernel_set_offload(accepts: int):
    """tun's set_offload: TSO only with CSUM, ECN only with TSO, EINVAL for anything
    left over, and for what this kernel lacks."""
    calls = []

    def set_offloads(fd, flags):
        calls.append(flags)
        rest = flags
        if rest & T.TUN_F_CSUM:
            rest &= ~T.TUN_F_CSUM
            if rest & (T.TUN_F_TSO4 | T.TUN_F_TSO6):
                rest &= ~(T.TUN_F_TSO4 | T.TUN_F_TSO6 | T.TUN_F_TSO_ECN)
        if rest or flags & ~accepts:
            raise OSError(errno.EINVAL, "Invalid argument")
    return set_offloads, calls


@pytest.mark.parametrize("accepts", [0, T.TUN_F_CSUM, T.TUN_F_CSUM | T.TUN_F_TSO4,
                                     T.TUN_F_CSUM | T.TUN_F_TSO6 | T.TUN_F_TSO_ECN,
                                     ALL_TAP_OFFLOADS])
def test_probe_finds_what_the_tap_accepts_and_leaves_none_set(monkeypatch, accepts):
    set_offloads, calls = kernel_set_offload(accepts)
    monkeypatch.setattr(T, "set_offloads", set_offloads)
    assert T.probe_offloads(99) == accepts
    assert (calls[-1] == 0) if accepts else (0 not in calls)


def test_probe_of_an_fd_that_is_no_tap_finds_none():
    first, second = socket.socketpair()
    with first, second:
        assert T.probe_offloads(first.fileno()) == 0


# --- features offered ------------------------------------------------------------------------
@pytest.mark.parametrize("accepts, offered", [
    (0, 0),
    (T.TUN_F_CSUM, N.F_CSUM | N.F_GUEST_CSUM),
    (T.TUN_F_CSUM | T.TUN_F_TSO4, N.F_CSUM | N.F_GUEST_CSUM | N.F_HOST_TSO4 | N.F_GUEST_TSO4),
    (ALL_TAP_OFFLOADS, OFFLOAD_BITS),
])
def test_features_follow_the_probe(tap, accepts, offered):
    tap.accepts = accepts
    vm = VirtioVm()
    device = make(vm, VirtioNetPci, tap="tap0")
    assert Driver(vm, device).device_features() & OFFLOAD_BITS == offered
    assert tap.told == []                     # nothing to tell before a driver comes
    vm.close()


@needs_libslirp
def test_user_networking_offers_no_offloads(monkeypatch):
    def no_tap(*_):
        raise AssertionError("user networking is no tap")
    monkeypatch.setattr(N, "probe_offloads", no_tap)
    monkeypatch.setattr(N, "set_offloads", no_tap)
    vm = VirtioVm()
    device = make(vm, VirtioNetPci, backend="slirp")
    driver = Driver(vm, device)
    assert driver.device_features() & OFFLOAD_BITS == 0
    # A driver taking them anyway is refused, and its headers are not passed on.
    assert not driver.negotiate(MODERN | N.F_CSUM) & D.STATUS_FEATURES_OK
    vm.close()


@pytest.mark.parametrize("orphan", [N.F_GUEST_TSO4, N.F_GUEST_TSO6, N.F_HOST_TSO4,
                                    N.F_HOST_TSO6, N.F_GUEST_CSUM | N.F_GUEST_ECN,
                                    N.F_CSUM | N.F_HOST_ECN])
def test_modern_driver_taking_an_offload_without_its_base_is_refused(tap, orphan):
    vm = VirtioVm()
    driver = Driver(vm, make(vm, VirtioNetPci, tap="tap0"))
    assert not driver.negotiate(MODERN | orphan) & D.STATUS_FEATURES_OK
    assert driver.negotiate(MODERN | N.F_CSUM | N.F_GUEST_CSUM | N.F_HOST_TSO4 |
                            N.F_GUEST_TSO6 | orphan) & D.STATUS_FEATURES_OK
    vm.close()


def test_legacy_driver_orphaned_offload_is_ignored(tap):
    """A legacy driver has no FEATURES_OK: GUEST_TSO4 without GUEST_CSUM is not given
    to the tap, and a segmentation request without CSUM is dropped."""
    vm, device, driver, rings = legacy(N.F_GUEST_TSO4 | N.F_HOST_TSO4 | N.F_MAC)
    assert tap.told == []
    frame = tcp_frame(b"\xff" * 6, bytes(3000))
    vm.memory.write(BUFFERS, net_header(gso_type=N.GSO_TCPV4, gso_size=1000) + frame)
    rings[N.TX].offer([(BUFFERS, 10 + len(frame), False)])
    legacy_notify(driver, N.TX)
    assert device.model.tx_dropped == 1
    vm.close()


# --- the tap is told the guest's receive offloads ---------------------------------------------
@pytest.mark.parametrize("features, told", [
    (N.F_CSUM | N.F_HOST_TSO4, []),           # transmit offloads need nothing from the tap
    (N.F_GUEST_CSUM, [T.TUN_F_CSUM]),
    (N.F_GUEST_CSUM | N.F_GUEST_TSO4, [T.TUN_F_CSUM | T.TUN_F_TSO4]),
    (N.F_GUEST_CSUM | N.F_GUEST_TSO4 | N.F_GUEST_TSO6 | N.F_GUEST_ECN, [ALL_TAP_OFFLOADS]),
])
def test_tap_told_at_driver_ok_and_on_reset(tap, features, told):
    vm = VirtioVm()
    device = make(vm, VirtioNetPci, tap="tap0")
    driver = Driver(vm, device)
    assert driver.negotiate(MODERN | features) & D.STATUS_FEATURES_OK
    assert tap.told == []
    driver.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                      D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)
    assert tap.told == told
    driver.set_common(V.COMMON_STATUS, 1, 0)
    assert tap.told == told + [0] * len(told)
    vm.close()


def test_legacy_driver_offloads_set_at_driver_ok(tap):
    vm, device, driver, _ = legacy(N.F_GUEST_CSUM | N.F_GUEST_TSO6)
    assert tap.told == [T.TUN_F_CSUM | T.TUN_F_TSO6]
    driver.legacy_write(V.LEGACY_STATUS, 1, 0)
    assert tap.told[-1] == 0
    vm.close()


def test_restored_device_tells_the_tap_again(tap):
    vm, device, _, _ = modern(MODERN | N.F_GUEST_CSUM | N.F_GUEST_TSO4)
    state = json.loads(json.dumps(device.save_state()))
    vm.close()
    tap.told.clear()
    vm = VirtioVm()
    make(vm, VirtioNetPci, tap="tap0").restore_state(state)
    assert tap.told == [T.TUN_F_CSUM | T.TUN_F_TSO4]
    vm.close()


def test_tap_refusing_the_setting_is_logged_once(tap, monkeypatch, caplog):
    def refuse(fd, flags):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(N, "set_offloads", refuse)
    vm, device, driver, _ = modern(MODERN | N.F_GUEST_CSUM)
    driver.negotiate(MODERN | N.F_GUEST_CSUM)
    driver.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                      D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)
    failures = [r for r in caplog.records if "tap tap0 offloads to 0x1 failed" in r.message]
    assert len(failures) == 1
    assert not device.status & D.STATUS_NEEDS_RESET
    vm.close()


# --- transmit: the driver's header goes to the tap ----------------------------------------------
def test_tx_header_passed_through(tap):
    vm, device, driver, rings = modern(MODERN | N.F_CSUM | N.F_HOST_TSO4)
    small = tcp_frame(b"\xff" * 6, b"x" * 100, partial=True)
    big = tcp_frame(b"\xff" * 6, bytes(range(256)) * 16, partial=True)   # over the MTU
    sent = [(net_header(**NEEDS_TCP_CSUM), small),
            (net_header(gso_type=N.GSO_TCPV4, gso_size=1448, hdr_len=ETH + IP + TCP,
                        **NEEDS_TCP_CSUM), big)]
    for header, frame in sent:
        vm.memory.write(BUFFERS, header + b"\x00\x00" + frame)
        rings[N.TX].offer([(BUFFERS, 12 + len(frame), False)])
        driver.notify(N.TX)
        assert tap.host.recv(70000) == header + b"\x00\x00" + frame
    # A header split over two buffers arrives whole.
    header = sent[1][0]
    vm.memory.write(BUFFERS, header[:4])
    vm.memory.write(BUFFERS + 0x100, header[4:] + b"\x00\x00" + big)
    rings[N.TX].offer([(BUFFERS, 4, False), (BUFFERS + 0x100, 8 + len(big), False)])
    driver.notify(N.TX)
    assert tap.host.recv(70000) == header + b"\x00\x00" + big
    assert device.model.tx_dropped == 0
    vm.close()


def test_tx_legacy_header_passed_through(tap):
    vm, device, driver, rings = legacy(N.F_CSUM)
    frame = tcp_frame(b"\xff" * 6, b"y" * 64, partial=True)
    header = net_header(**NEEDS_TCP_CSUM)
    vm.memory.write(BUFFERS, header + frame)
    rings[N.TX].offer([(BUFFERS, 10 + len(frame), False)])
    legacy_notify(driver, N.TX)
    assert tap.host.recv(4096) == header + b"\x00\x00" + frame
    vm.close()


def test_tx_header_ignored_without_csum(tap):
    """Offered but not taken: the tap sees zeros, and the MTU holds for everything."""
    vm, device, driver, rings = modern(MODERN)
    frame = tcp_frame(b"\xff" * 6, b"z" * 64)
    big = tcp_frame(b"\xff" * 6, bytes(3000))
    for payload in (frame, big):
        vm.memory.write(BUFFERS, net_header(gso_type=N.GSO_TCPV4, gso_size=1000,
                                            **NEEDS_TCP_CSUM) + b"\0\0" + payload)
        rings[N.TX].offer([(BUFFERS, 12 + len(payload), False)])
        driver.notify(N.TX)
    assert tap.host.recv(4096) == bytes(12) + frame
    assert device.model.tx_dropped == 1
    vm.close()


# Headers a driver might write: each field around its edges, gso types known and not.
TX_HEADERS = st.tuples(st.sampled_from([0, 1, 2, 3, 0x81]),
                       st.sampled_from([0, 1, 3, 4, 5, 0x80, 0x81, 0x84, 0xFF]),
                       st.integers(0, 0xFFFF), st.sampled_from([0, 1, 1000, 0xFFFF]),
                       st.integers(0, 300), st.integers(0, 300))
FUZZ_MTU = 100


@fuzz_settings(60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chains=st.lists(st.tuples(TX_HEADERS, st.integers(1, 400)), min_size=1, max_size=8))
def test_tx_fuzz_headers_sent_verbatim_or_counted(tap, chains):
    """With CSUM and HOST_TSO4 (not TSO6, not ECN) taken, a frame goes out with its
    header as the driver wrote it if the header asks only for what was negotiated,
    its checksum lies inside the frame and the frame fits the MTU (64 KiB when it
    is to be segmented); every other chain is completed and counted."""
    vm, device, driver, rings = modern(MODERN | N.F_CSUM | N.F_HOST_TSO4, mtu=FUZZ_MTU)
    expected = []
    for i, ((flags, gso_type, hdr_len, gso_size, start, offset), length) in enumerate(chains):
        header = N._NET_HDR.pack(flags, gso_type, hdr_len, gso_size, start, offset)
        frame = bytes([i]) * length
        address = BUFFERS + 0x1000 * i
        vm.memory.write(address, header + b"\0\0" + frame)
        rings[N.TX].offer([(address, 12 + length, False)])
        csum_inside = not flags & 1 or start + offset + 2 <= length
        size_allowed = length <= FUZZ_MTU + 18 if gso_type == 0 else \
            gso_type == 1 and gso_size > 0
        if csum_inside and size_allowed:
            expected.append(header + b"\0\0" + frame)
    driver.notify(N.TX)
    assert len(rings[N.TX].completed()) == len(chains)
    assert device.model.tx_dropped == len(chains) - len(expected)
    tap.host.setblocking(False)
    for frame in expected:
        assert tap.host.recv(4096) == frame
    with pytest.raises(BlockingIOError):
        tap.host.recv(4096)
    vm.close()


# --- receive: the tap's header goes to the driver -----------------------------------------------
def test_rx_header_passed_through(tap):
    vm, device, driver, rings = modern(MODERN | N.F_GUEST_CSUM | N.F_GUEST_TSO4)
    for i in range(4):
        rings[N.RX].offer([(BUFFERS + 0x1000 * i, 2048, True)])
    driver.notify(N.RX)
    frame = tcp_frame(GUEST_MAC, bytes(range(256)) * 12, partial=True)     # 3126 bytes
    header = net_header(gso_type=N.GSO_TCPV4, gso_size=1448, hdr_len=54, **NEEDS_TCP_CSUM)
    tap.host.send(header + b"\xaa\xbb" + frame)           # num_buffers: pyhyve's to fill
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 2)
    received = vm.memory.read(BUFFERS, 2048) + vm.memory.read(BUFFERS + 0x1000, 2048)
    assert received[:12 + len(frame)] == header + struct.pack("<H", 2) + frame
    vm.close()


def test_rx_legacy_header_passed_through(tap):
    vm, device, driver, rings = legacy(N.F_GUEST_CSUM)
    rings[N.RX].offer([(BUFFERS, 2048, True)])
    legacy_notify(driver, N.RX)
    frame = tcp_frame(GUEST_MAC, b"q" * 100, partial=True)
    header = net_header(**NEEDS_TCP_CSUM)
    tap.host.send(header + b"\xaa\xbb" + frame)
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 1)
    assert vm.memory.read(BUFFERS, 10 + len(frame)) == header + frame
    vm.close()


def test_rx_drops_frames_prepared_for_offloads_not_taken(tap):
    """Frames the tap queued for offloads the driver did not take (before a reset, or
    not negotiated at all) are dropped and counted; the rest arrive."""
    vm, device, driver, rings = modern(MODERN | N.F_GUEST_CSUM | N.F_GUEST_TSO4)
    for i in range(2):
        rings[N.RX].offer([(BUFFERS + 0x1000 * i, 4096, True)])
    driver.notify(N.RX)
    frame = tcp_frame(GUEST_MAC, b"r" * 100)
    tap.host.send(net_header(gso_type=N.GSO_TCPV6, gso_size=1000) + b"\0\0" + frame)
    tap.host.send(net_header(gso_type=N.GSO_TCPV4 | N.GSO_ECN, gso_size=1000) + b"\0\0" + frame)
    tap.host.send(net_header(**NEEDS_TCP_CSUM) + b"\0\0" + frame)
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 1)
    assert device.model.rx_dropped == 2
    vm.close()

    vm, device, driver, rings = modern(MODERN)
    rings[N.RX].offer([(BUFFERS, 4096, True)])
    driver.notify(N.RX)
    tap.host.send(net_header(**NEEDS_TCP_CSUM) + b"\0\0" + frame)
    tap.host.send(net_header(flags=2) + b"\0\0" + frame)        # DATA_VALID: zeroed
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 1)
    assert device.model.rx_dropped == 1
    assert vm.memory.read(BUFFERS, 12 + len(frame)) == struct.pack("<10xH", 1) + frame
    vm.close()


# --- a real tap in a private network namespace ------------------------------------------------
CLONE_NEWNET = 0x40000000
SIOCGIFHWADDR, SIOCETHTOOL = 0x8927, 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_GTSO = 0x16, 0x1E          # what `ethtool -k` shows as
SOL_PACKET, PACKET_VNET_HDR = 263, 15              # tx-checksumming, tcp-segmentation-offload
ETH_P_IP = 0x0800
TAP = "tap0"
SEGMENT = 1000                                     # gso_size of the large TCP segments
PAYLOAD = bytes(range(250)) * 12                   # 3000 bytes: three segments
TCP_SYN, TCP_ACK, TCP_PSH = 0x02, 0x10, 0x08


@pytest.fixture
def netns():
    """A private network namespace with tap `tap0` holding HOST_IP/24, the guest's
    address in its neighbour table and IPv6 off (so the kernel sends the tap no
    frames of its own); yields the namespace's name."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and taps")
    if not os.path.exists(T.TUN_PATH):
        pytest.skip(f"{T.TUN_PATH} is missing")
    from firmware import require_program
    ip = require_program("ip", "iproute2")
    namespace = f"pyhyve-offload-{os.getpid()}"
    subprocess.run([ip, "netns", "add", namespace], check=True)
    try:
        subprocess.run([ip, "netns", "exec", namespace, "sh", "-c",
                        "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
                        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"], check=True)
        for command in (["link", "set", "lo", "up"],
                        ["tuntap", "add", "dev", TAP, "mode", "tap"],
                        ["addr", "add", f"{HOST_IP}/24", "dev", TAP],
                        ["link", "set", TAP, "up"],
                        ["neigh", "add", GUEST_IP, "lladdr", GUEST_MAC.hex(":"), "dev", TAP]):
            subprocess.run([ip, "-n", namespace, *command], check=True)
        yield namespace
    finally:
        subprocess.run([ip, "netns", "delete", namespace])


def _setns(libc, fd: int) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


@contextlib.contextmanager
def inside(namespace: str):
    """This thread in `namespace`: the taps and sockets it opens meanwhile are made
    there, and stay there after it leaves."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            _setns(libc, target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(libc, home)
    finally:
        os.close(home)


def reported_offloads() -> tuple[bool, bool]:
    """(tx-checksumming, tcp-segmentation-offload) of the tap, as the kernel reports
    them to `ethtool -k`."""
    reported = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for command in (ETHTOOL_GTXCSUM, ETHTOOL_GTSO):
            value = ctypes.create_string_buffer(struct.pack("II", command, 0), 8)
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL,
                        struct.pack("16sP16x", TAP.encode(), ctypes.addressof(value)))
            reported.append(bool(struct.unpack("II", value.raw)[1]))
    return tuple(reported)


def tap_mac() -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        answer = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("16s24x", TAP.encode()))
    return answer[18:24]


class Receiver:
    """The driver's receive side: 4 KiB mergeable buffers, reposted as frames arrive."""

    def __init__(self, vm, driver, ring, buffers: int = 16):
        self.vm, self.driver, self.ring = vm, driver, ring
        self.address = {}
        for i in range(buffers):
            address = BUFFERS + 0x1000 * i
            self.address[ring.offer([(address, 4096, True)])] = address
        driver.notify(N.RX)

    def frames(self, count: int, predicate) -> list[tuple[bytes, bytes]]:
        """The next `count` (header, frame) the device delivers that `predicate` takes."""
        taken = []

        def arrived():
            for head, length in self.ring.completed():
                address = self.address.pop(head)
                data = self.vm.memory.read(address, length)
                if predicate(data[12:]):
                    taken.append((data[:12], data[12:]))
                self.address[self.ring.offer([(address, 4096, True)])] = address
                self.driver.notify(N.RX)
            return len(taken) >= count
        assert wait_for(arrived, timeout=30), taken
        return taken


def tcp_ports(frame: bytes) -> tuple[int, int]:
    if frame[12:14] != b"\x08\x00" or frame[ETH + 9] != socket.IPPROTO_TCP:
        return (0, 0)
    return struct.unpack_from("!HH", frame, ETH + IP)


def send_from_host(frame: bytes, header: bytes) -> None:
    """Send `frame` out of the tap from the namespace's side, as the host's stack
    would, with a virtio-net header saying what is left to do (a packet socket
    with PACKET_VNET_HDR takes one)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP)) as sock:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((TAP, ETH_P_IP))
        sock.send(header + frame)


def test_real_tap_probe_and_setting(netns):
    """The probe finds what this kernel's tun offers; the tap's offloads, as the kernel
    reports them, follow the driver: on with GUEST_CSUM and GUEST_TSO4, off after a
    reset, off for a driver taking only the transmit offloads."""
    with inside(netns):
        assert reported_offloads() == (False, False)
        vm, device, driver, _ = modern(MODERN | N.F_GUEST_CSUM | N.F_GUEST_TSO4)
        print(f"tap offloads probed: {device.model.tap_offloads:#x}; features offered: "
              f"{driver.device_features() & OFFLOAD_BITS:#x}")
        assert device.model.tap_offloads & T.TUN_F_CSUM
        assert device.device_features & OFFLOAD_BITS == sum(
            bits for flag, bits in N.OFFLOAD_FEATURES if device.model.tap_offloads & flag)
        assert reported_offloads() == (True, True)
        driver.set_common(V.COMMON_STATUS, 1, 0)
        assert reported_offloads() == (False, False)
        vm.close()
        vm, device, driver, _ = modern(MODERN | N.F_CSUM | N.F_HOST_TSO4)
        assert reported_offloads() == (False, False)
        vm.close()
        vm, device, driver, _ = modern(MODERN | N.F_GUEST_CSUM)
        assert reported_offloads() == (True, False)
        vm.close()


def test_real_tap_large_segment_to_the_guest(netns):
    """The host's stack hands the tap one 3000-byte TCP segment to be cut in 1000s:
    a guest taking GUEST_TSO4 receives it whole with the kernel's header, a guest
    taking no offloads receives three segments with complete checksums."""
    with inside(netns):
        host_mac = tap_mac()
        frame = tcp_frame(GUEST_MAC, PAYLOAD, partial=True)
        header = net_header(gso_type=N.GSO_TCPV4, gso_size=SEGMENT, hdr_len=ETH + IP + TCP,
                            **NEEDS_TCP_CSUM)

        def ours(data: bytes) -> bool:
            return data[6:12] == host_mac and tcp_ports(data) == (5001, 5002)

        vm, device, driver, rings = modern(MODERN | N.F_GUEST_CSUM | N.F_GUEST_TSO4)
        receiver = Receiver(vm, driver, rings[N.RX])
        send_from_host(frame[:6] + host_mac + frame[12:], header)
        [(got_header, got)] = receiver.frames(1, ours)
        flags, gso_type, _, gso_size, start, offset = N._NET_HDR.unpack(got_header[:10])
        assert (flags & N.HDR_F_NEEDS_CSUM, gso_type, gso_size, start, offset) == \
            (N.HDR_F_NEEDS_CSUM, N.GSO_TCPV4, SEGMENT, ETH + IP, TCP_CHECK_AT)
        assert got == frame[:6] + host_mac + frame[12:]
        vm.close()

        vm, device, driver, rings = modern(MODERN)
        receiver = Receiver(vm, driver, rings[N.RX])
        send_from_host(frame[:6] + host_mac + frame[12:], header)
        segments = receiver.frames(len(PAYLOAD) // SEGMENT, ours)
        assert all(got_header == struct.pack("<10xH", 1) for got_header, _ in segments)
        assert all(checksum_is_complete(got) for _, got in segments)
        assert all(len(got) == ETH + IP + TCP + SEGMENT for _, got in segments)
        assert b"".join(got[ETH + IP + TCP:] for _, got in segments) == PAYLOAD
        assert device.model.rx_dropped == 0
        vm.close()


class GuestTx:
    """The driver's transmit side: one frame a chain, behind a 12-byte header."""

    def __init__(self, vm, driver, ring):
        self.vm, self.driver, self.ring, self.slot = vm, driver, ring, 0

    def send(self, frame: bytes, header: bytes = bytes(10)) -> None:
        address = BUFFERS + 0x100000 + 0x10000 * (self.slot % 16)
        self.slot += 1
        self.vm.memory.write(address, header + b"\0\0" + frame)
        self.ring.offer([(address, 12 + len(frame), False)])
        self.driver.notify(N.TX)
        assert wait_for(lambda: self.ring.completed())


def udp_frame(destination_mac: bytes, payload: bytes, partial: bool) -> bytes:
    udp = struct.pack("!HHHH", 5002, 6000, UDP + len(payload), 0) + payload
    return ipv4_frame(destination_mac, GUEST_IP, HOST_IP, socket.IPPROTO_UDP, udp,
                      UDP_CHECK_AT, partial)


def test_real_tap_completes_a_guests_partial_checksum(netns):
    """A datagram the guest left with a partial checksum reaches the host's UDP socket
    when CSUM is negotiated (the kernel completes it); without CSUM the header is not
    passed on and the host drops it as corrupt.  A complete datagram follows each."""
    with inside(netns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((HOST_IP, 6000))
        server.settimeout(30)
        host_mac = tap_mac()
        header = net_header(flags=N.HDR_F_NEEDS_CSUM, csum=(ETH + IP, UDP_CHECK_AT))
        for features, arrives in ((MODERN | N.F_CSUM, True), (MODERN, False)):
            vm, device, driver, rings = modern(features)
            tx = GuestTx(vm, driver, rings[N.TX])
            tx.send(udp_frame(host_mac, b"partial", partial=True), header)
            tx.send(udp_frame(host_mac, b"complete", partial=False))
            expected = [b"partial", b"complete"] if arrives else [b"complete"]
            assert [server.recv(100) for _ in expected] == expected
            assert device.model.tx_dropped == 0
            vm.close()


def test_real_tap_large_segment_from_the_guest(netns):
    """With HOST_TSO4 the guest sends 3000 bytes as one TCP segment (over the MTU,
    checksum partial) on a connection it opened by hand; the host's socket reads them."""
    with inside(netns), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((HOST_IP, 7000))
        server.listen(1)
        server.settimeout(30)
        host_mac = tap_mac()
        vm, device, driver, rings = modern(MODERN | N.F_CSUM | N.F_HOST_TSO4)
        receiver = Receiver(vm, driver, rings[N.RX])
        tx = GuestTx(vm, driver, rings[N.TX])

        def segment(payload, seq, ack, flags, **header):
            frame = tcp_frame(host_mac, payload, partial=True, source=GUEST_IP,
                              destination=HOST_IP, ports=(40000, 7000), seq=seq, ack=ack,
                              flags=flags)
            tx.send(frame, net_header(**NEEDS_TCP_CSUM, **header))

        segment(b"", 100, 0, TCP_SYN)
        [(_, syn_ack)] = receiver.frames(1, lambda data: tcp_ports(data) == (7000, 40000))
        assert syn_ack[ETH + IP + 13] == TCP_SYN | TCP_ACK
        their_seq = struct.unpack_from("!I", syn_ack, ETH + IP + 4)[0]
        segment(b"", 101, their_seq + 1, TCP_ACK)
        connection, _ = server.accept()
        with connection:
            connection.settimeout(30)
            segment(PAYLOAD, 101, their_seq + 1, TCP_ACK | TCP_PSH, gso_type=N.GSO_TCPV4,
                    gso_size=SEGMENT, hdr_len=ETH + IP + TCP)
            received = b""
            while len(received) < len(PAYLOAD):
                received += connection.recv(65536)
        assert received == PAYLOAD
        assert device.model.tx_dropped == 0
        vm.close()
