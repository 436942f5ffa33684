"""virtio-console driven as a guest driver drives it (config cycles, BAR 4, split
virtqueues in guest memory), with real AF_UNIX sockets as the host ends: bytes
both ways, input held while the guest posts no buffers, the MULTIPORT control
handshake, and control messages that make no sense."""

import base64
import json
import socket
import struct

import pytest
from test_virtio import SLOT, Driver, Ring, VirtioVm, wait_for

from pyhyve.config import ConfigError
from pyhyve.lifecycle import StateError
from pyhyve.pci import emulations
from pyhyve.pci import regs as R
from pyhyve.virtio import console as C
from pyhyve.virtio import device as D
from pyhyve.virtio import pci as V
from pyhyve.virtio.emulations import VirtioConsolePci

QUEUES = 0x100000              # queue i's rings at QUEUES + 0x1000 * i
BUFFERS = 0x200000             # buffer j at BUFFERS + 0x100 * j
BUFFER_SIZE = 0x100


class ConsoleDriver(Driver):
    """A driver with every queue of the device laid out, and buffers to offer."""

    def __init__(self, vm, device):
        super().__init__(vm, device)
        self.rings: dict[int, Ring] = {}
        self.buffer_at: dict[tuple[int, int], int] = {}    # (queue, head) -> gpa
        self.next_buffer = 0

    def start(self, features: int) -> None:
        assert self.negotiate(features) & D.STATUS_FEATURES_OK
        for index in range(self.common(V.COMMON_NUMQ, 2)):
            self.rings[index] = self._open_queue(index)
        self.set_common(V.COMMON_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                        D.STATUS_FEATURES_OK | D.STATUS_DRIVER_OK)

    def _open_queue(self, index: int) -> Ring:
        base = QUEUES + 0x1000 * index
        desc, avail, used = base, base + 0x400, base + 0x800
        self.set_common(V.COMMON_Q_SELECT, 2, index)
        size = self.common(V.COMMON_Q_SIZE, 2)
        for offset, address in ((V.COMMON_Q_DESCLO, desc), (V.COMMON_Q_AVAILLO, avail),
                                (V.COMMON_Q_USEDLO, used)):
            self.set_common(offset, 4, address)
            self.set_common(offset + 4, 4, 0)
        ring = Ring(self.vm, desc, avail, used, size)
        self.set_common(V.COMMON_Q_ENABLE, 2, 1)
        return ring

    def offer(self, index: int, data: bytes = b"", receive: int = 0) -> None:
        """Offer one buffer on queue `index`: `data` to send, or `receive` bytes to fill."""
        gpa = BUFFERS + BUFFER_SIZE * (self.next_buffer % 1024)
        self.next_buffer += 1
        self.vm.memory.write(gpa, data or bytes(receive))
        head = self.rings[index].offer([(gpa, len(data) or receive, not data)])
        self.buffer_at[index, head] = gpa
        self.notify(index)

    def received(self, index: int) -> list[bytes]:
        """What the device put in the buffers it returned on queue `index` since the
        last call."""
        return [self.vm.memory.read(self.buffer_at[index, head], length)
                for head, length in self.rings[index].completed()]

    def send(self, port: int, data: bytes) -> list[tuple[int, int]]:
        index = port_queues(port)[1]
        self.offer(index, data)
        return self.rings[index].completed()

    def control(self, port: int, event: int, value: int = 1) -> None:
        self.offer(C.CONTROL_TX, struct.pack("<IHH", port, event, value))
        assert self.rings[C.CONTROL_TX].completed()

    def post_control_buffers(self, count: int = 16) -> None:
        for _ in range(count):
            self.offer(C.CONTROL_RX, receive=64)

    def messages(self) -> list[tuple]:
        """The control messages received so far: (port, event, value[, name])."""
        found = []
        for data in self.received(C.CONTROL_RX):
            message = struct.unpack_from("<IHH", data)
            found.append(message + (data[8:].decode(),) if len(data) > 8 else message)
        return found


def port_queues(port: int) -> tuple[int, int]:
    """(receiveq, transmitq) of a port."""
    return (0, 1) if port == 0 else (2 + 2 * port, 3 + 2 * port)


def connect(port, path) -> socket.socket:
    """A client at the host end of `port`, once the port's backend took it."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(path))
    assert wait_for(lambda: port.backend.connected)
    return client


def recv_exactly(client: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = client.recv(count - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def make_console(vm, text: str) -> VirtioConsolePci:
    return vm.pci.add(SLOT, 0, VirtioConsolePci, VirtioConsolePci.legacy_options(text))


@pytest.fixture
def single(tmp_path):
    """One port, bhyve's syntax: a bare socket path."""
    path = tmp_path / "console.sock"
    vm = VirtioVm()
    device = make_console(vm, f"port1={path}")
    driver = ConsoleDriver(vm, device)
    yield vm, device, driver, path
    vm.close()


@pytest.fixture
def multi(tmp_path):
    """Two ports: bhyve's socket path and pyhyve's unix= spec."""
    paths = tmp_path / "p1.sock", tmp_path / "p2.sock"
    vm = VirtioVm()
    device = make_console(vm, f"port1={paths[0]},port2=unix={paths[1]}")
    driver = ConsoleDriver(vm, device)
    yield vm, device, driver, paths
    vm.close()


# --- one port -------------------------------------------------------------------------------
def test_identity_and_features(single):
    vm, device, driver, path = single
    assert driver.cfg(R.DEVICE_ID, 2) == 0x1003 and driver.cfg(R.SUBSYSTEM_ID, 2) == 3
    assert driver.cfg(R.REVISION_ID, 4) >> 8 == 0x078000
    features = driver.device_features()
    assert features & C.F_EMERG_WRITE and not features & C.F_MULTIPORT
    assert driver.common(V.COMMON_NUMQ, 2) == 2
    assert driver.read(V.CAP_DEVICE_CFG, 4, 4) == 1                # max_nr_ports
    assert "virtio-console" in emulations()
    assert device.model.ports[0].name == "port1"


def test_bytes_both_ways(single):
    vm, device, driver, path = single
    driver.enable_msix(3)
    driver.start(D.F_VERSION_1)
    driver.set_common(V.COMMON_Q_SELECT, 2, 0)
    driver.set_common(V.COMMON_Q_MSIX, 2, 1)
    with connect(device.model.ports[0], path) as client:
        # guest output goes to the socket; the buffer comes back with nothing written
        assert driver.send(0, b"hello host\n") == [(0, 0)]
        assert recv_exactly(client, 11) == b"hello host\n"
        # input with no buffer posted waits...
        client.sendall(b"early")
        assert wait_for(lambda: device.model.ports[0].pending == b"early")
        # ...until the driver posts one
        driver.offer(0, receive=16)
        assert driver.received(0) == [b"early"]
        assert vm.msis[-1] == (0xFEE00000, 0x41)
        # with buffers posted, input goes straight in, split across them
        driver.offer(0, receive=4)
        driver.offer(0, receive=4)
        client.sendall(b"abcdef")
        assert wait_for(lambda: vm.memory.read_u16(driver.rings[0].used + 2) == 3)
        assert driver.received(0) == [b"abcd", b"ef"]
    assert device.model.ports[0].dropped == 0


def test_input_beyond_the_limit_is_dropped(single):
    vm, device, driver, path = single
    driver.start(D.F_VERSION_1)
    port = device.model.ports[0]
    total = C.PENDING_LIMIT + 5000
    with connect(device.model.ports[0], path) as client:
        client.sendall(b"x" * total)
        assert wait_for(lambda: len(port.pending) + port.dropped == total)
    assert len(port.pending) == C.PENDING_LIMIT and port.dropped == 5000
    driver.offer(0, receive=BUFFER_SIZE)
    assert driver.received(0) == [b"x" * BUFFER_SIZE]
    assert len(port.pending) == C.PENDING_LIMIT - BUFFER_SIZE


def test_emergency_write(single):
    """emerg_wr takes a byte even before the driver set anything up."""
    vm, device, driver, path = single
    with connect(device.model.ports[0], path) as client:
        driver.write(V.CAP_DEVICE_CFG, 8, 4, 0xAB00 | ord("!"))      # the low byte counts
        assert recv_exactly(client, 1) == b"!"


def test_legacy_driver(single):
    """A virtio 0.9.5 driver: queues by page frame number, notify by port."""
    vm, device, driver, path = single
    driver.legacy_write(V.LEGACY_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER)
    rings = {}
    for index in (0, 1):
        pfn = (QUEUES >> 12) + 4 * index
        driver.legacy_write(V.LEGACY_QUEUE_SELECT, 2, index)
        size = driver.legacy_read(V.LEGACY_QUEUE_SIZE, 2)
        desc = pfn << 12
        rings[index] = Ring(vm, desc, desc + 16 * size, desc + 4096, size)
        driver.legacy_write(V.LEGACY_QUEUE_PFN, 4, pfn)
    driver.legacy_write(V.LEGACY_STATUS, 1, D.STATUS_ACKNOWLEDGE | D.STATUS_DRIVER |
                        D.STATUS_DRIVER_OK)
    with connect(device.model.ports[0], path) as client:
        vm.memory.write(BUFFERS, b"legacy out")
        rings[1].offer([(BUFFERS, 10, False)])
        driver.legacy_write(V.LEGACY_QUEUE_NOTIFY, 2, 1)
        assert recv_exactly(client, 10) == b"legacy out"
        rings[0].offer([(BUFFERS + 0x100, 8, True)])
        driver.legacy_write(V.LEGACY_QUEUE_NOTIFY, 2, 0)
        client.sendall(b"in")
        assert wait_for(lambda: vm.memory.read_u16(rings[0].used + 2) == 1)
        assert vm.memory.read(BUFFERS + 0x100, 2) == b"in"


# --- several ports: the control handshake ------------------------------------------------------
def handshake(driver) -> list[tuple]:
    driver.start(D.F_VERSION_1 | C.F_MULTIPORT)
    driver.post_control_buffers()
    driver.control(0, C.DEVICE_READY)
    assert driver.messages() == [(0, C.DEVICE_ADD, 0), (1, C.DEVICE_ADD, 0)]
    driver.control(0, C.PORT_READY)
    driver.control(1, C.PORT_READY)
    return driver.messages()


def test_multiport_handshake(multi):
    vm, device, driver, paths = multi
    features = driver.device_features()
    assert features & C.F_MULTIPORT
    assert driver.common(V.COMMON_NUMQ, 2) == 6
    assert driver.read(V.CAP_DEVICE_CFG, 4, 4) == 2                # max_nr_ports
    with connect(device.model.ports[0], paths[0]) as first:
        # port 0 is the console; its host end is open, port 1's not yet
        assert handshake(driver) == [(0, C.CONSOLE_PORT, 1), (0, C.PORT_NAME, 0, "port1"),
                                     (0, C.PORT_OPEN, 1), (1, C.PORT_NAME, 0, "port2")]
        with connect(device.model.ports[1], paths[1]) as second:
            assert wait_for(lambda: vm.memory.read_u16(driver.rings[2].used + 2) == 7)
            assert driver.messages() == [(1, C.PORT_OPEN, 1)]
            # input waits while the guest end is closed, even with buffers posted
            rx, tx = port_queues(1)
            driver.offer(rx, receive=32)
            second.sendall(b"for port 2")
            assert wait_for(lambda: device.model.ports[1].pending == b"for port 2")
            assert driver.received(rx) == []
            driver.control(1, C.PORT_OPEN, 1)
            assert driver.received(rx) == [b"for port 2"]
            # output on each port goes to its own socket
            driver.send(1, b"two")
            driver.send(0, b"one")
            assert recv_exactly(second, 3) == b"two" and recv_exactly(first, 3) == b"one"
            # the guest closes port 2: input waits again
            driver.control(1, C.PORT_OPEN, 0)
            second.sendall(b"later")
            assert wait_for(lambda: device.model.ports[1].pending == b"later")
            assert driver.received(rx) == []
        # the client leaves: the host end closes
        assert wait_for(lambda: vm.memory.read_u16(driver.rings[2].used + 2) == 8)
        assert driver.messages() == [(1, C.PORT_OPEN, 0)]


def test_control_messages_wait_for_buffers(multi):
    vm, device, driver, paths = multi
    driver.start(D.F_VERSION_1 | C.F_MULTIPORT)
    driver.control(0, C.DEVICE_READY)
    assert driver.messages() == []
    driver.post_control_buffers(1)
    assert driver.messages() == [(0, C.DEVICE_ADD, 0)]
    driver.post_control_buffers(1)
    assert driver.messages() == [(1, C.DEVICE_ADD, 0)]


def test_bad_control_messages_are_ignored(multi):
    vm, device, driver, paths = multi
    driver.start(D.F_VERSION_1 | C.F_MULTIPORT)
    driver.post_control_buffers()
    driver.control(0, C.PORT_READY)                     # before DEVICE_READY
    driver.control(0, C.PORT_OPEN)
    driver.control(0, C.DEVICE_READY, 0)                # the driver failed
    driver.offer(C.CONTROL_TX, b"\0\0\0\0")             # too short
    assert driver.rings[C.CONTROL_TX].completed()
    assert driver.messages() == []
    driver.control(0, C.DEVICE_READY)
    assert len(driver.messages()) == 2
    driver.control(0, C.DEVICE_READY)                   # once is enough
    driver.control(2, C.PORT_READY)                     # no such port
    driver.control(2**32 - 1, C.PORT_OPEN)
    driver.control(0, C.DEVICE_ADD)                     # the device's event, not the driver's
    driver.control(0, 99)                               # no such event
    driver.control(1, C.PORT_OPEN)                      # the port is not ready
    assert driver.messages() == []
    assert not device.model.ports[1].guest_open
    assert not driver.status() & D.STATUS_NEEDS_RESET
    # the handshake still works
    driver.control(1, C.PORT_READY)
    assert driver.messages() == [(1, C.PORT_NAME, 0, "port2")]
    driver.control(1, C.PORT_READY)                     # twice: answered once
    assert driver.messages() == []


def test_control_ignored_without_multiport(multi):
    """A driver that did not take MULTIPORT has port 0 only and no control."""
    vm, device, driver, paths = multi
    driver.start(D.F_VERSION_1)
    driver.post_control_buffers()
    driver.control(0, C.DEVICE_READY)
    assert driver.messages() == []
    with connect(device.model.ports[0], paths[0]) as first:
        driver.offer(0, receive=8)
        first.sendall(b"console")
        assert wait_for(lambda: vm.memory.read_u16(driver.rings[0].used + 2) == 1)
        assert driver.received(0) == [b"console"]


def test_reset_forgets_the_handshake(multi):
    vm, device, driver, paths = multi
    handshake(driver)
    driver.set_common(V.COMMON_STATUS, 1, 0)
    assert not any(port.ready for port in device.model.ports)
    driver.rings.clear()
    driver.start(D.F_VERSION_1 | C.F_MULTIPORT)
    driver.post_control_buffers()
    driver.control(0, C.DEVICE_READY)
    assert driver.messages() == [(0, C.DEVICE_ADD, 0), (1, C.DEVICE_ADD, 0)]


# --- options and teardown ----------------------------------------------------------------------
def test_options(tmp_path):
    assert VirtioConsolePci.legacy_options("a=/x,b=tcp=127.0.0.1:0") == {
        "port.0.name": "a", "port.0.path": "/x", "port.1.name": "b",
        "port.1.path": "tcp=127.0.0.1:0"}
    with pytest.raises(ConfigError, match="port 'a' needs a path"):
        VirtioConsolePci.legacy_options("a")
    vm = VirtioVm()
    sock = str(tmp_path / "s")
    cases = [({}, "no ports"), ({"bogus": "1"}, "unknown option 'bogus'"),
             ({"port.0.name": "a"}, "port 'a' has no path"),
             ({"port.0.path": sock}, "port 0 has no name"),
             ({"port.1.name": "a", "port.1.path": sock}, "numbered from 0"),
             ({"port.0.name": "a", "port.0.path": sock, "port.1.name": "a",
               "port.1.path": sock + "2"}, "used twice"),
             ({"port.0.name": "a", "port.0.path": "tcp=nowhere"}, "expected tcp=HOST:PORT")]
    many = {}
    for number in range(C.MAX_PORTS + 1):
        many[f"port.{number}.name"] = f"p{number}"
        many[f"port.{number}.path"] = f"{sock}{number}"
    cases.append((many, "at most 16"))
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            vm.pci.add(SLOT, 0, VirtioConsolePci, options)
    vm.close()


def test_a_failed_port_closes_the_others(tmp_path):
    vm = VirtioVm()
    first = tmp_path / "first.sock"
    with pytest.raises(ConfigError, match="cannot listen"):
        make_console(vm, f"a={first},b={tmp_path / 'missing' / 'b.sock'}")
    assert not first.exists()
    vm.close()


def test_pty_port(tmp_path):
    """A port on a pty, as `-l com1,pty` (pty,link=PATH needs the config key:
    a comma in -s separates ports)."""
    import os
    import select
    from pyhyve.devices.chardev import PtyBackend
    link = tmp_path / "hvc"
    vm = VirtioVm()
    device = vm.pci.add(SLOT, 0, VirtioConsolePci, {"port.0.name": "hvc",
                                                     "port.0.path": f"pty,link={link}"})
    port = device.model.ports[0]
    assert isinstance(port.backend, PtyBackend) and os.readlink(link) == port.backend.path
    assert device.model.host_consoles() == [("hvc", port.backend)]
    driver = ConsoleDriver(vm, device)
    driver.start(D.F_VERSION_1)
    client = os.open(link, os.O_RDWR | os.O_NOCTTY)
    try:
        driver.send(0, b"to the pty")
        assert select.select([client], [], [], 5)[0]
        assert os.read(client, 100) == b"to the pty"
        driver.offer(0, receive=16)
        os.write(client, b"from the pty")
        assert wait_for(lambda: driver.rings[0].used and
                        vm.memory.read_u16(driver.rings[0].used + 2) == 1)
        assert driver.received(0) == [b"from the pty"]
    finally:
        os.close(client)
    vm.close()
    assert not os.path.lexists(link)
    vm = VirtioVm()
    device = make_console(vm, "a=pty,b=stdio")              # the legacy syntax: bare pty
    assert [p.backend.kind for p in device.model.ports] == ["pty", "stdio"]
    vm.close()


def test_file_backend_and_teardown(tmp_path):
    log = tmp_path / "out.txt"
    vm = VirtioVm()
    device = make_console(vm, f"log=file={log}")
    driver = ConsoleDriver(vm, device)
    driver.start(D.F_VERSION_1)
    driver.send(0, b"to the file")
    assert log.read_bytes() == b"to the file"
    vm.close()
    sock = tmp_path / "gone.sock"
    vm = VirtioVm()
    make_console(vm, f"p={sock}")
    assert sock.exists()
    vm.close()
    assert not sock.exists()


def test_model_state_round_trips_and_refuses_what_does_not_fit(multi):
    """The console model's own snapshot fields, checked before anything changes."""
    vm, device, driver, paths = multi
    handshake(driver)
    model = device.model
    with device.lock:
        model.ports[1].pending += b"waiting"
        model.ports[1].dropped = 3
        state = json.loads(json.dumps(model.save_state()))
        model.reset()
        model.restore_state(state)
        assert model.save_state() == state
        assert model.ports[1].pending == b"waiting" and model.ports[0].ready
    too_long = base64.b64encode(bytes(C.PENDING_LIMIT + 1)).decode()
    for change, message in (
            (lambda s: s["ports"].pop(), "has 2 ports"),
            (lambda s: s["ports"][0].update(pending="not base64!"), "not valid base64"),
            (lambda s: s["ports"][0].update(pending=too_long), "more than"),
            (lambda s: s["ports"][1].update(dropped=-1), "dropped"),
            (lambda s: s["ports"][1].update(ready="yes"), "ready"),
            (lambda s: s.update(control_out=["AA=="] * (C.CONTROL_BACKLOG + 1)), "at most"),
            (lambda s: s.pop("control_ready"), "fields")):
        bad = json.loads(json.dumps(state))
        change(bad)
        with device.lock:
            with pytest.raises(StateError, match=message):
                model.restore_state(bad)
            assert model.save_state() == state
