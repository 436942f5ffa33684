"""virtio-net: options, TX/RX framing over a fake tap, and iPXE booting over a real tap
inside a private network namespace."""

import hashlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from fuzzing import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from pyhyve.config import ConfigError
from pyhyve.virtio import net as N
from pyhyve.virtio import device as D
from pyhyve.virtio import pci as V
from pyhyve.virtio import tap as T
from pyhyve.virtio.emulations import VirtioNetPci
from test_virtio import BUFFERS, SLOT, Driver, Ring, VirtioVm, make, wait_for

QUEUES = {N.RX: (0x10000, 0x11000, 0x12000), N.TX: (0x20000, 0x21000, 0x22000)}
LEGACY_PFNS = {N.RX: 0x30, N.TX: 0x50}
FRAME = bytes.fromhex("ffffffffffff00a098010203") + b"\x08\x00" + bytes(range(100))
DATA_VALID = b"\x02" + bytes(11)          # a header a tap without offloads may give


@pytest.fixture
def tap(monkeypatch):
    """A datagram socketpair standing in for the tap: one end for the device."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    device_end.setblocking(False)
    opened = []

    def fake_open(name):
        opened.append(name)
        return os.dup(device_end.fileno())

    monkeypatch.setattr(N, "open_tap", fake_open)
    host_end.settimeout(5)
    yield host_end, opened
    device_end.close()
    host_end.close()


def modern(features, **options):
    vm = VirtioVm()
    device = make(vm, VirtioNetPci, tap="tap0", **options)
    driver = Driver(vm, device)
    assert driver.negotiate(features) & D.STATUS_FEATURES_OK
    rings = {}
    for index, (desc, avail, used) in QUEUES.items():
        driver.set_common(V.COMMON_Q_SELECT, 2, index)
        size = driver.common(V.COMMON_Q_SIZE, 2)
        for offset, address in ((V.COMMON_Q_DESCLO, desc), (V.COMMON_Q_AVAILLO, avail),
                                (V.COMMON_Q_USEDLO, used)):
            driver.set_common(offset, 4, address)
            driver.set_common(offset + 4, 4, 0)
        rings[index] = Ring(vm, desc, avail, used, size)
        driver.set_common(V.COMMON_Q_ENABLE, 2, 1)
    driver.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                      D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)
    return vm, device, driver, rings


def legacy(features, **options):
    vm = VirtioVm()
    device = make(vm, VirtioNetPci, tap="tap0", **options)
    driver = Driver(vm, device)
    driver.legacy_write(V.LEGACY_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER)
    driver.legacy_write(V.LEGACY_GUEST_FEATURES, 4, features)
    rings = {}
    for index, pfn in LEGACY_PFNS.items():
        driver.legacy_write(V.LEGACY_QUEUE_SELECT, 2, index)
        size = driver.legacy_read(V.LEGACY_QUEUE_SIZE, 2)
        desc = pfn << 12
        rings[index] = Ring(vm, desc, desc + 16 * size,
                            (desc + 16 * size + 6 + 2 * size + 4095) & ~4095, size)
        driver.legacy_write(V.LEGACY_QUEUE_PFN, 4, pfn)
    driver.legacy_write(V.LEGACY_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                        D.STATUS_DRIVER_OK)
    return vm, device, driver, rings


def legacy_notify(driver, index):
    driver.legacy_write(V.LEGACY_QUEUE_NOTIFY, 2, index)


# --- options --------------------------------------------------------------------------------------
def test_bhyve_option_syntax():
    assert VirtioNetPci.legacy_options("tap0") == {"backend": "tap0"}
    assert VirtioNetPci.legacy_options("tap0,mac=00:a0:98:00:00:01,mtu=9000") == \
        {"backend": "tap0", "mac": "00:a0:98:00:00:01", "mtu": "9000"}
    assert VirtioNetPci.legacy_options("slirp,hostfwd=tcp::2222-:22") == \
        {"backend": "slirp", "hostfwd": "tcp::2222-:22"}
    assert VirtioNetPci.legacy_options("tap=vm0tap,rom=/x") == {"tap": "vm0tap", "rom": "/x"}


def test_config_space_and_features(tap):
    _, opened = tap
    vm = VirtioVm()
    device = make(vm, VirtioNetPci, tap="tap7", mac="02:00:00:aa:bb:cc", mtu=9000)
    driver = Driver(vm, device)
    assert opened == ["tap7"]
    assert driver.cfg(0x02, 2) == 0x1000 and driver.cfg(0x2E, 2) == 1
    assert driver.cfg(0x0A, 2) == 0x0200                      # class: Ethernet controller
    features = driver.device_features()
    for feature in (N.F_MAC, N.F_STATUS, N.F_MRG_RXBUF, N.F_MTU, D.F_VERSION_1):
        assert features & feature
    config = bytes(driver.read(V.CAP_DEVICE_CFG, i, 1) for i in range(12))
    assert config == bytes.fromhex("020000aabbcc") + struct.pack("<HHH", 1, 1, 9000)
    vm.close()


def test_default_mac_is_bhyves(tap):
    vm = VirtioVm()
    vm.name = "vm-one"
    device = make(vm, VirtioNetPci, tap="tap0")
    digest = hashlib.md5(f"{SLOT}-0-vm-one".encode()).digest()
    assert device.model.mac == b"\x00\xa0\x98" + digest[:3]
    assert device.model.config[:6] == device.model.mac
    assert not device.device_features & N.F_MTU
    assert N.generate_mac(f"{SLOT}-0", "vm-one") == device.model.mac != \
        N.generate_mac(f"{SLOT + 1}-0", "vm-one")
    vm.close()


def test_rom_ids_patched_as_qemu_does(tap, tmp_path):
    """iPXE's virtio-net ROM names 1af4:1041; firmware runs only a ROM naming the device."""
    rom = bytearray(512)
    rom[0:3] = b"\x55\xaa\x01"
    rom[0x18:0x1A] = (0x40).to_bytes(2, "little")
    rom[0x40:0x48] = b"PCIR" + struct.pack("<HH", 0x1AF4, 0x1041)
    rom[-1] = (-sum(rom)) & 0xFF
    path = tmp_path / "virtio.rom"
    path.write_bytes(rom)
    vm = VirtioVm()
    device = make(vm, VirtioNetPci, tap="tap0", rom=path)
    assert struct.unpack_from("<HH", device.rom, 0x44) == (0x1AF4, 0x1000)
    assert sum(device.rom[:512]) % 256 == 0
    assert device.rom[:6] == rom[:6] and device.rom[7:0x44] == rom[7:0x44]
    vm.close()


@pytest.mark.parametrize("options, message", [
    ({}, "no backend given"),
    ({"backend": "tap0", "tap": "tap1"}, "either a backend or tap=, not both"),
    ({"tap": "tap0", "hostfwd": "tcp::2222-:22"}, "hostfwd= needs the slirp backend"),
    ({"tap": "tap0", "mac": "00:a0:98:00:00"}, "is not xx:xx"),
    ({"tap": "tap0", "mac": "01:00:5e:00:00:01"}, "multicast or zero"),
    ({"tap": "tap0", "mac": "00:00:00:00:00:00"}, "multicast or zero"),
    ({"tap": "tap0", "mtu": "big"}, "mtu: 'big' is not a number"),
    ({"tap": "tap0", "mtu": "20"}, "mtu '20'"),
    ({"tap": "tap0", "speed": "10"}, "unknown option 'speed'"),
])
def test_bad_options(tap, options, message):
    vm = VirtioVm()
    with pytest.raises(ConfigError, match=message):
        vm.pci.add(SLOT, 0, VirtioNetPci, options)
    vm.close()


def test_tap_errors(monkeypatch):
    with pytest.raises(ConfigError, match="not a valid interface name"):
        T.open_tap("a-name-far-too-long")
    monkeypatch.setattr(T, "TUN_PATH", "/nonexistent/tun")
    with pytest.raises(ConfigError, match=r"^virtio-net: /nonexistent/tun is missing"):
        T.open_tap("tap0")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may open any tap")
def test_tap_permission_denied():
    if not os.path.exists(T.TUN_PATH):
        pytest.skip(f"{T.TUN_PATH} is missing")
    with pytest.raises(ConfigError, match="virtio-net: cannot"):
        T.open_tap("pyhvdenied0")


# --- transmit -------------------------------------------------------------------------------------
def test_tx_modern(tap):
    host, _ = tap
    vm, device, driver, rings = modern(D.F_VERSION_1 | N.F_MRG_RXBUF | N.F_MAC)
    vm.memory.write(BUFFERS, b"\x01" * 12)                  # the driver's header is not passed on
    vm.memory.write(BUFFERS + 0x100, FRAME[:50])
    vm.memory.write(BUFFERS + 0x200, FRAME[50:])
    rings[N.TX].offer([(BUFFERS, 12, False), (BUFFERS + 0x100, 50, False),
                       (BUFFERS + 0x200, len(FRAME) - 50, False)])
    driver.notify(N.TX)
    assert host.recv(4096) == bytes(12) + FRAME
    assert rings[N.TX].completed() == [(0, 0)]
    # header and data in one buffer
    vm.memory.write(BUFFERS, bytes(12) + FRAME)
    rings[N.TX].offer([(BUFFERS, 12 + len(FRAME), False)])
    driver.notify(N.TX)
    assert host.recv(4096) == bytes(12) + FRAME
    assert device.model.tx_dropped == 0
    vm.close()


def test_tx_legacy_header(tap):
    host, _ = tap
    vm, device, driver, rings = legacy(N.F_MAC)
    vm.memory.write(BUFFERS, bytes(10) + FRAME)
    rings[N.TX].offer([(BUFFERS, 10 + len(FRAME), False)])
    legacy_notify(driver, N.TX)
    assert host.recv(4096) == bytes(12) + FRAME
    vm.close()


def test_tx_drops_bad_frames(tap):
    host, _ = tap
    vm, device, driver, rings = modern(D.F_VERSION_1, mtu=100)
    vm.memory.write(BUFFERS, bytes(12 + 200))
    rings[N.TX].offer([(BUFFERS, 8, False)])                 # no room for the header
    rings[N.TX].offer([(BUFFERS, 12, False)])                # a header, no frame
    rings[N.TX].offer([(BUFFERS, 12 + 100 + 19, False)])     # over MTU + Ethernet + VLAN
    rings[N.TX].offer([(BUFFERS, 12 + 100 + 18, False)])     # just fits
    driver.notify(N.TX)
    assert len(rings[N.TX].completed()) == 4
    assert device.model.tx_dropped == 3
    assert host.recv(4096) == bytes(12 + 118)
    host.settimeout(0.1)
    with pytest.raises(TimeoutError):
        host.recv(4096)
    vm.close()


# Chains of up to four buffers, some device-writable (which TX ignores), of lengths
# around the header size and the MTU below.
FUZZ_MTU = 100
TX_SEGMENTS = st.lists(st.tuples(st.one_of(st.integers(1, 14), st.integers(1, 2 * FUZZ_MTU)),
                                 st.booleans(), st.binary(min_size=1, max_size=1)),
                       min_size=1, max_size=4)


@fuzz_settings(60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chains=st.lists(TX_SEGMENTS, min_size=1, max_size=6),
       driver_kind=st.sampled_from([("modern", D.F_VERSION_1, N.HDR_LEN),
                                    ("legacy", N.F_MRG_RXBUF, N.HDR_LEN),
                                    ("legacy", N.F_MAC, N.LEGACY_HDR_LEN)]))
def test_tx_fuzz_every_chain_is_sent_or_counted(tap, chains, driver_kind):
    """Whatever chains the driver offers, each valid one is completed: sent whole when
    its data past the header is a frame no longer than the MTU allows, else dropped
    and counted.  A chain with a readable buffer after a writable one breaks the ring
    rules: the device stops there and asks for a reset.  Nothing else goes out."""
    host, _ = tap
    kind, features, header_length = driver_kind
    vm, device, driver, rings = (modern if kind == "modern" else legacy)(features,
                                                                         mtu=FUZZ_MTU)
    expected, served, broken, address = [], 0, False, BUFFERS
    for segments in chains:
        buffers, data, seen_writable = [], b"", False
        for length, writable, fill in segments:
            vm.memory.write(address, fill * length)
            buffers.append((address, length, writable))
            broken |= seen_writable and not writable
            seen_writable |= writable
            if not writable:
                data += fill * length
            address += 0x100                  # a segment is at most 2 * FUZZ_MTU long
        rings[N.TX].offer(buffers)
        if broken:
            continue
        served += 1
        frame = data[header_length:]
        if len(data) > header_length and len(frame) <= FUZZ_MTU + N.ETHER_OVERHEAD:
            expected.append(frame)
    if kind == "modern":
        driver.notify(N.TX)
    else:
        legacy_notify(driver, N.TX)
    assert len(rings[N.TX].completed()) == served
    assert bool(device.status & D.STATUS_NEEDS_RESET) == broken
    assert device.model.tx_dropped == served - len(expected)
    host.setblocking(False)
    for frame in expected:
        assert host.recv(4096) == bytes(N.HDR_LEN) + frame
    with pytest.raises(BlockingIOError):
        host.recv(4096)
    host.setblocking(True)
    vm.close()


# --- the device config: the MAC is the only thing a driver may write -------------------------
def test_legacy_driver_may_set_the_mac(tap):
    vm, device, driver, _ = legacy(N.F_MAC)
    config = V.LEGACY_CONFIG
    for i, byte in enumerate(bytes.fromhex("0200c0ffee01")):
        driver.legacy_write(config + i, 1, byte)
    assert bytes(driver.legacy_read(config + i, 1) for i in range(6)) == \
        bytes.fromhex("0200c0ffee01")
    assert device.model.config_writes_dropped == 0
    driver.legacy_write(config + 6, 2, 0)                     # status: read-only
    driver.legacy_write(config + 4, 4, 0xFFFFFFFF)            # runs past the MAC
    driver.legacy_write(config + 0x20, 1, 0xFF)               # past the config
    assert device.model.config_writes_dropped == 3
    assert driver.legacy_read(config + 6, 2) == N.S_LINK_UP
    assert bytes(device.model.config[4:6]) == bytes.fromhex("ee01")
    driver.legacy_write(V.LEGACY_STATUS, 1, 0)                # reset: the configured MAC
    assert bytes(device.model.config[:6]) == device.model.mac
    vm.close()


def test_modern_driver_cannot_write_config(tap):
    vm, device, driver, _ = modern(D.F_VERSION_1 | N.F_MAC, mtu=9000)
    before = bytes(device.model.config)
    for offset, size in ((0, 1), (0, 4), (4, 2), (6, 2), (10, 2), (0x100, 4)):
        driver.write(V.CAP_DEVICE_CFG, offset, size, (1 << (8 * size)) - 1)
    assert bytes(device.model.config) == before
    assert device.model.config_writes_dropped == 6
    assert not driver.status() & D.STATUS_NEEDS_RESET
    vm.close()


# --- receive --------------------------------------------------------------------------------------
def test_rx_waits_for_buffers_then_delivers(tap):
    host, _ = tap
    vm, device, driver, rings = modern(D.F_VERSION_1 | N.F_MRG_RXBUF)
    host.send(DATA_VALID + FRAME)                            # the tap's header is not passed on
    # No buffers: the frame waits and the tap leaves the I/O thread.
    assert wait_for(lambda: device.model._rx_frame is not None and not device.model._rx_armed)
    host.send(DATA_VALID + FRAME[::-1])
    vm.memory.write(BUFFERS, b"\xee" * 4096)
    rings[N.RX].offer([(BUFFERS, 2048, True)])
    rings[N.RX].offer([(BUFFERS + 2048, 2048, True)])
    driver.notify(N.RX)
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 2)
    header = struct.pack("<10xH", 1)
    assert vm.memory.read(BUFFERS, 12 + len(FRAME)) == header + FRAME
    assert vm.memory.read(BUFFERS + 2048, 12 + len(FRAME)) == header + FRAME[::-1]
    assert rings[N.RX].completed() == [(0, 12 + len(FRAME)), (1, 12 + len(FRAME))]
    assert device.model._rx_armed
    vm.close()


def test_rx_mergeable_and_drops(tap):
    host, _ = tap
    vm, device, driver, rings = modern(D.F_VERSION_1 | N.F_MRG_RXBUF)
    big = bytes(range(256)) * 12                             # 3072 bytes: three 1100-byte buffers
    for i in range(3):
        rings[N.RX].offer([(BUFFERS + 0x1000 * i, 1100, True)])
    driver.notify(N.RX)
    host.send(bytes(12) + big)
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 3)
    assert rings[N.RX].completed() == [(0, 1100), (1, 1100), (2, 3084 - 2200)]
    received = b"".join(vm.memory.read(BUFFERS + 0x1000 * i, 1100) for i in range(3))
    assert received[:12] == struct.pack("<10xH", 3) and received[12:3084] == big
    vm.close()

    vm, device, driver, rings = modern(D.F_VERSION_1)         # no merging: one buffer a frame
    rings[N.RX].offer([(BUFFERS, 1100, True)])
    rings[N.RX].offer([(BUFFERS + 0x1000, 4000, True)])
    driver.notify(N.RX)
    host.send(bytes(12) + big)
    host.send(bytes(12) + big)
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 2)
    assert rings[N.RX].completed() == [(0, 0), (1, 3084)]
    assert device.model.rx_dropped == 1
    assert vm.memory.read(BUFFERS + 0x1000, 3084) == struct.pack("<10xH", 1) + big
    vm.close()


def test_rx_buffer_without_room_for_the_header(tap):
    """A 4-byte receive buffer cannot hold the header: that frame is dropped, counted,
    the buffer returned empty; the next frame goes to the next buffer."""
    host, _ = tap
    vm, device, driver, rings = modern(D.F_VERSION_1 | N.F_MRG_RXBUF)
    rings[N.RX].offer([(BUFFERS, 4, True)])
    rings[N.RX].offer([(BUFFERS + 0x1000, 2048, True)])
    driver.notify(N.RX)
    host.send(bytes(12) + FRAME)
    host.send(bytes(12) + FRAME[::-1])
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 2)
    assert rings[N.RX].completed() == [(0, 0), (1, 12 + len(FRAME))]
    assert device.model.rx_dropped == 1
    assert vm.memory.read(BUFFERS + 0x1000 + 12, len(FRAME)) == FRAME[::-1]
    vm.close()


def test_rx_legacy_header(tap):
    host, _ = tap
    vm, device, driver, rings = legacy(N.F_MAC)
    rings[N.RX].offer([(BUFFERS, 2048, True)])
    legacy_notify(driver, N.RX)
    host.send(DATA_VALID + FRAME)
    assert wait_for(lambda: vm.memory.read_u16(rings[N.RX].used + 2) == 1)
    assert rings[N.RX].completed() == [(0, 10 + len(FRAME))]
    assert vm.memory.read(BUFFERS, 10 + len(FRAME)) == bytes(10) + FRAME
    vm.close()


def test_reset_stops_receiving(tap):
    host, _ = tap
    vm, device, driver, rings = modern(D.F_VERSION_1)
    rings[N.RX].offer([(BUFFERS, 2048, True)])
    driver.notify(N.RX)
    assert device.model._rx_armed
    driver.set_common(V.COMMON_STATUS, 1, 0)
    assert not device.model._rx_armed
    host.send(bytes(12) + FRAME)
    time.sleep(0.2)
    assert vm.memory.read_u16(rings[N.RX].used + 2) == 0
    vm.close()


def test_a_late_notification_after_removal_finds_no_device(tap):
    """The I/O thread may be running a queue's notification while the device is
    removed (a VM closing its PCI bus before its I/O thread): once the device is
    off the bus, that kick must find nothing to run, rather than arm the closed
    tap (EBADF from epoll, logged as a device failure)."""
    vm, device, driver, rings = modern(D.F_VERSION_1)
    rings[N.RX].offer([(BUFFERS, 2048, True)])
    driver.notify(N.RX)
    assert device.model._rx_armed
    vm.pci.remove(device)
    assert not device.model._rx_armed
    assert device.kick(N.RX) is False
    assert not device.model._rx_armed and not device.status & D.STATUS_NEEDS_RESET
    vm.close()


# --- end to end: iPXE from Debian's ipxe-qemu boots over DHCP and TFTP -----------------------------
IPXE_OK = "pyhyve-ipxe-ok"
HOST_ADDRESS = "10.77.0.1"


@pytest.fixture
def netns(tmp_path):
    """A private network namespace holding a tap with 10.77.0.1/24 and dnsmasq serving
    DHCP and TFTP on it; yields (namespace, tap)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and taps")
    if not os.path.exists(T.TUN_PATH):
        pytest.skip(f"{T.TUN_PATH} is missing")
    from firmware import require_program
    ip = require_program("ip", "iproute2")
    dnsmasq = require_program("dnsmasq", "dnsmasq")
    namespace, tap_name = f"pyhyve-test-{os.getpid()}", f"pyhvtap{os.getpid() % 1000}"
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    (tftp / "boot.ipxe").write_text(f"#!ipxe\necho {IPXE_OK}\npoweroff\n")
    subprocess.run([ip, "netns", "add", namespace], check=True)
    server = None
    try:
        def inside(*command):
            subprocess.run([ip, "netns", "exec", namespace, *command], check=True)
        inside(ip, "link", "set", "lo", "up")
        inside(ip, "tuntap", "add", "mode", "tap", "name", tap_name)
        inside(ip, "addr", "add", f"{HOST_ADDRESS}/24", "dev", tap_name)
        inside(ip, "link", "set", tap_name, "up")
        server = subprocess.Popen(
            [ip, "netns", "exec", namespace, dnsmasq, "--no-daemon", "--conf-file=/dev/null",
             f"--interface={tap_name}", "--bind-interfaces", "--port=0",
             "--dhcp-range=10.77.0.50,10.77.0.60", "--enable-tftp", f"--tftp-root={tftp}",
             "--dhcp-boot=boot.ipxe", f"--pid-file={tmp_path / 'dnsmasq.pid'}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "dnsmasq.log", "wb"))
        yield namespace, tap_name, ip
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        subprocess.run([ip, "netns", "delete", namespace])


KVM_FAILURES = ("internal_error", "emulation failure")   # pyhyve's and QEMU's words


def _read_console(proc: subprocess.Popen, timeout: float) -> str:
    """proc's output until iPXE's script has spoken, KVM gave up, output ended or
    the timeout passed (QEMU stays up after a KVM internal error)."""
    output, deadline = "", time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while not any(text in output for text in (IPXE_OK, *KVM_FAILURES)):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk.decode(errors="replace")
    return output


def _boot(command: list[str], timeout: float) -> tuple[str, int]:
    """Run a VM until iPXE's script has spoken; then the script's poweroff ends it,
    or two SIGTERMs do.  Returns the console and the exit status."""
    from guestrun import REPO
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        console = _read_console(proc, timeout)
        try:
            status = proc.wait(timeout=30 if IPXE_OK in console else 1)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            time.sleep(1)          # two signals sent at once can arrive as one
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    return console, status


def _skip_if_kvm_gave_up(console: str) -> None:
    if IPXE_OK not in console and any(text in console for text in KVM_FAILURES):
        pytest.skip("iPXE probed virtio-net, then hit an instruction this host's KVM "
                    "cannot emulate (KVM internal error) before DHCP")


@pytest.fixture
def ipxe_rom():
    from firmware import require_file
    require_file("/usr/share/seabios/bios.bin", "seabios")
    return require_file("/usr/lib/ipxe/qemu/pxe-virtio.rom", "ipxe-qemu")


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_ipxe_boots_over_virtio_net(netns, ipxe_rom):
    namespace, tap_name, ip = netns
    console, status = _boot(
        [ip, "netns", "exec", namespace, sys.executable, "-m", "pyhyve", "-m", "128M",
         "-l", "bootrom,/usr/share/seabios/bios.bin", "-l", "com1,stdio", "-l", "fwcfg,qemu",
         "-s", f"3,virtio-net,tap={tap_name},rom={ipxe_rom}", "ipxe-vm"], timeout=240)
    # iPXE's virtio-net driver found the device through the patched ROM and set it up.
    assert "iPXE initialising devices...ok" in console, console
    _skip_if_kvm_gave_up(console)
    assert IPXE_OK in console, console
    assert status == 1                                  # the script powered off


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
@pytest.mark.parametrize("vmm", ["pyhyve", "qemu"])
def test_ipxe_boots_over_slirp(vmm, ipxe_rom, tmp_path):
    """The same boot with DHCP and TFTP from libslirp: no tap, no namespace, no root
    needed for the network; QEMU's -netdev user (with its own virtio ROM) as reference."""
    from firmware import require_program
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    (tftp / "boot.ipxe").write_text(f"#!ipxe\necho {IPXE_OK}\npoweroff\n")
    if vmm == "pyhyve":
        command = [sys.executable, "-m", "pyhyve", "-m", "128M",
                   "-l", "bootrom,/usr/share/seabios/bios.bin", "-l", "com1,stdio",
                   "-l", "fwcfg,qemu", "-s",
                   f"3,virtio-net,slirp,tftp={tftp},bootfile=boot.ipxe,rom={ipxe_rom}",
                   f"ipxe-slirp-{os.getpid()}"]
        powered_off = 1
    else:
        command = [require_program("qemu-system-x86_64", "qemu-system-x86"), "-machine", "pc",
                   "-enable-kvm", "-m", "128", "-nodefaults", "-nographic", "-serial", "stdio",
                   "-monitor", "none", "-bios", "/usr/share/seabios/bios.bin",
                   "-netdev", f"user,id=n0,tftp={tftp},bootfile=boot.ipxe",
                   "-device", "virtio-net-pci,netdev=n0,addr=3"]
        powered_off = 0
    console, status = _boot(command, timeout=240)
    assert "iPXE initialising devices...ok" in console, console
    _skip_if_kvm_gave_up(console)
    assert IPXE_OK in console, console
    assert status == powered_off                        # the script powered off


def test_the_mtu_option_states_the_models_limits():
    """emulations.py writes them out so that listing options imports no model."""
    mtu = next(option for option in VirtioNetPci.options if option.name == "mtu")
    assert mtu.default == str(N.DEFAULT_MTU)
    assert f"{N.MIN_MTU} to {N.MAX_MTU}" in mtu.help
