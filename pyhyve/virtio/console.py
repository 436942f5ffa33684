"""`virtio-console`: serial ports between the guest and host sockets (virtio 1.2,
5.3), as bhyve's pci_virtio_console.

    -s SLOT,virtio-console,NAME=PATH[,NAME=PATH...]

Each NAME=PATH is a port, numbered from 0 in the order given (at most
MAX_PORTS).  As in bhyve, PATH is an AF_UNIX socket to listen on; pyhyve also
takes its chardev specs there: stdio, pty, unix=PATH, tcp=HOST:PORT or
file=PATH (and pty,link=PATH where the comma survives: as a config key,
`-o pci.0.SLOT.0.port.N.path=pty,link=PATH`).
The config tree holds the ports as bhyve_config(5) does: port.N.name and
port.N.path.

One port is a plain console on receiveq0 and transmitq0.  With more, the
device offers VIRTIO_CONSOLE_F_MULTIPORT and the control queues carry the
handshake: the driver sends DEVICE_READY, the device announces each port with
DEVICE_ADD, the driver answers PORT_READY, and the device then nominates port
0 as a console (CONSOLE_PORT: hvc0 in a Linux guest, as without MULTIPORT),
names the port (PORT_NAME: the NAME given) and says whether its host end is
open (PORT_OPEN: whether a socket client is connected; it says so again each
time a client comes or goes).  The driver's PORT_OPEN opens and closes the
guest end; input for a port waits until the guest end is open, as in QEMU's
virtio-serial.  Control messages the device cannot make sense of are ignored.

Guest output goes to the port's backend (a socket with no client drops it and
counts it in backend.dropped).  Host input fills the buffers the driver posts
in the port's receiveq; while it has none, up to PENDING_LIMIT bytes wait and
the rest are dropped and counted in port.dropped.  A byte written to emerg_wr
(VIRTIO_CONSOLE_F_EMERG_WRITE) goes to port 0, even before the driver is set
up.
"""

import struct
from collections import deque
from functools import partial

from ..config import ConfigError
from ..devices.chardev import Backend, open_backend
from ..lifecycle import StateError, decode, encode, expect_keys, flag, uint
from .device import Transport, VirtioDevice
from .queue import Chain, SplitQueue

VIRTIO_ID_CONSOLE = 3

F_MULTIPORT = 1 << 1
F_EMERG_WRITE = 1 << 2

# Control events (5.3.6.2)
DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY = 0, 1, 2, 3
CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME = 4, 5, 6, 7

CONTROL_RX, CONTROL_TX = 2, 3
MAX_PORTS = 16                  # as bhyve
QUEUE_SIZE = 64                 # as bhyve
PENDING_LIMIT = 64 * 1024       # host input held per port while the guest takes none
CONTROL_BACKLOG = 256           # device-to-driver messages held while the driver posts no buffers
BACKEND_KINDS = ("unix", "tcp", "file")

# struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
_CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8
# struct virtio_console_control: id, event, value
_CONTROL = struct.Struct("<IHH")


def _backend_spec(path: str) -> str:
    """bhyve's socket path, or one of pyhyve's chardev specs as it is."""
    if path in ("stdio", "pty") or path.startswith("pty,") or \
            path.partition("=")[0] in BACKEND_KINDS:
        return path
    return f"unix={path}"


class Port:
    """One console port: its queues, host backend, and input waiting for the guest."""

    def __init__(self, index: int, name: str, backend: Backend):
        self.index = index
        self.name = name
        self.backend = backend
        self.rx = 0 if index == 0 else 2 + 2 * index     # receiveq; transmitq follows
        self.tx = self.rx + 1
        self.pending = bytearray()
        self.dropped = 0             # host input bytes lost to a full pending buffer
        self.ready = False           # the driver answered DEVICE_ADD with PORT_READY
        self.guest_open = False      # the driver's PORT_OPEN


class VirtioConsole(VirtioDevice):
    """virtio console: the model, built from its options (port.N.name, port.N.path)"""

    device_type = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(self, transport: Transport, options: dict[str, str]):
        self._closed = False
        self.ports: list[Port] = []
        try:
            for number, name, path in self._parse_ports(options):
                backend = open_backend(_backend_spec(path), f"virtio-console {name}")
                self.ports.append(Port(number, name, backend))
            multiport = len(self.ports) > 1
            features = F_EMERG_WRITE | (F_MULTIPORT if multiport else 0)
            queues = 2 * (len(self.ports) + 1) if multiport else 2
            super().__init__(transport, [QUEUE_SIZE] * queues, features, _CONFIG.size)
        except BaseException:
            self._close_backends()
            raise
        _CONFIG.pack_into(self.config, 0, 0, 0, len(self.ports), 0)
        self._rx_ports = {port.rx: port for port in self.ports}
        self._tx_ports = {port.tx: port for port in self.ports}
        self._control_out: deque[bytes] = deque()
        self._control_ready = False
        for port in self.ports:
            port.backend.attach(partial(self._host_input, port),
                                partial(self._host_connection, port))

    @staticmethod
    def _parse_ports(options: dict[str, str]) -> list[tuple[int, str, str]]:
        """(number, name, path) of each port.N.name/port.N.path, checked."""
        ports: dict[int, dict[str, str]] = {}
        for key, value in options.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "port" or not parts[1].isdigit() or \
                    parts[2] not in ("name", "path"):
                raise ConfigError(f"virtio-console: unknown option '{key}'")
            ports.setdefault(int(parts[1]), {})[parts[2]] = value
        if not ports:
            raise ConfigError("virtio-console: no ports given (-s SLOT,virtio-console,NAME=PATH)")
        if len(ports) > MAX_PORTS:
            raise ConfigError(f"virtio-console: {len(ports)} ports given; at most {MAX_PORTS}")
        if sorted(ports) != list(range(len(ports))):
            raise ConfigError("virtio-console: ports must be numbered from 0 without gaps")
        result, names = [], set()
        for number in range(len(ports)):
            name, path = ports[number].get("name"), ports[number].get("path")
            if not name:
                raise ConfigError(f"virtio-console: port {number} has no name")
            if not path:
                raise ConfigError(f"virtio-console: port '{name}' has no path")
            if name in names:
                raise ConfigError(f"virtio-console: port name '{name}' is used twice")
            names.add(name)
            result.append((number, name, path))
        return result

    def host_consoles(self) -> list[tuple[str, Backend]]:
        """(port name, backend) of each port, for the VM's list of consoles."""
        return [(port.name, port.backend) for port in self.ports]

    def _close_backends(self) -> None:
        for port in self.ports:
            port.backend.close()

    def close(self) -> None:
        """Stop taking host input, then close the backends outside the lock: their
        threads may be waiting for it."""
        with self.transport.lock:
            self._closed = True
        self._close_backends()

    def reset(self) -> None:
        self._control_out.clear()
        self._control_ready = False
        for port in self.ports:
            port.ready = port.guest_open = False

    def save_state(self) -> dict:
        """The handshake's progress, host input the guest has not taken yet and
        control messages it has not received; the backends open anew."""
        return {"control_ready": self._control_ready,
                "control_out": [encode(message) for message in self._control_out],
                "ports": [{"pending": encode(port.pending), "dropped": port.dropped,
                           "ready": port.ready, "guest_open": port.guest_open}
                          for port in self.ports]}

    def restore_state(self, state: dict) -> None:
        expect_keys(state, ("control_ready", "control_out", "ports"), self.name)
        control_ready = flag(state["control_ready"], f"{self.name} control_ready")
        messages, ports = state["control_out"], state["ports"]
        if not isinstance(messages, list) or len(messages) > CONTROL_BACKLOG:
            raise StateError(f"{self.name} control_out is not a list of at most "
                             f"{CONTROL_BACKLOG} messages")
        if not isinstance(ports, list) or len(ports) != len(self.ports):
            raise StateError(f"{self.name} has {len(self.ports)} ports, the snapshot "
                             f"{len(ports) if isinstance(ports, list) else ports!r}")
        control_out = [decode(message, f"{self.name} control message") for message in messages]
        restored = []
        for port, saved in zip(self.ports, ports):
            what = f"{self.name} port {port.name}"
            expect_keys(saved, ("pending", "dropped", "ready", "guest_open"), what)
            restored.append((decode(saved["pending"], f"{what} pending", limit=PENDING_LIMIT),
                             uint(saved["dropped"], (1 << 64) - 1, f"{what} dropped"),
                             flag(saved["ready"], f"{what} ready"),
                             flag(saved["guest_open"], f"{what} guest_open")))
        self._control_ready = control_ready
        self._control_out = deque(control_out)
        for port, (pending, dropped, ready, guest_open) in zip(self.ports, restored):
            port.pending[:] = pending
            port.dropped, port.ready, port.guest_open = dropped, ready, guest_open

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset == EMERG_WR_OFFSET:
            self.ports[0].backend.write(bytes([value & 0xFF]))

    # --- queues -------------------------------------------------------------------------
    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        """Receive queues hold the driver's buffers until there is something to put
        in them; transmit queues are served at once (handle_request)."""
        if index == CONTROL_RX:
            self._send_control(queue)
        elif index in self._rx_ports:
            self._fill(self._rx_ports[index], queue)
        else:
            super().queue_notified(index, queue)

    def handle_request(self, index: int, chain: Chain) -> int:
        data = chain.read_all(self.transport.memory)
        if index == CONTROL_TX:
            self._control_message(data)
        elif data:
            self._tx_ports[index].backend.write(data)
        return 0

    def _fill(self, port: Port, queue: SplitQueue) -> None:
        """Move waiting host input into the port's receive buffers."""
        if self.transport.negotiated(F_MULTIPORT) and not port.guest_open:
            return
        memory = self.transport.memory
        while port.pending and (chain := queue.pop()) is not None:
            written = chain.write(memory, port.pending)
            del port.pending[:written]
            queue.push(chain.head, written)
        self.transport.interrupt_queue(port.rx)

    def _send_control(self, queue: SplitQueue) -> None:
        """One device-to-driver message per buffer the driver posted."""
        memory = self.transport.memory
        while self._control_out and (chain := queue.pop()) is not None:
            queue.push(chain.head, chain.write(memory, self._control_out.popleft()))
        self.transport.interrupt_queue(CONTROL_RX)

    def _control(self, port: int, event: int, value: int, payload: bytes = b"") -> None:
        if len(self._control_out) >= CONTROL_BACKLOG:
            self.transport.warn_once("control-backlog", "the driver takes no control messages; "
                           "dropping them")
            return
        self._control_out.append(_CONTROL.pack(port, event, value) + payload)
        self.transport.kick(CONTROL_RX)

    # --- the control handshake ------------------------------------------------------------
    def _control_message(self, data: bytes) -> None:
        """A driver-to-device message; those that make no sense are ignored."""
        if not self.transport.negotiated(F_MULTIPORT) or len(data) < _CONTROL.size:
            self.transport.warn_once("control-bad", "ignored a %d-byte control message", len(data))
            return
        number, event, value = _CONTROL.unpack_from(data)
        if event == DEVICE_READY:
            if value == 1 and not self._control_ready:
                self._control_ready = True
                for port in self.ports:
                    self._control(port.index, DEVICE_ADD, 0)
            return
        if not self._control_ready or number >= len(self.ports) or \
                event not in (PORT_READY, PORT_OPEN):
            self.transport.warn_once(f"control-{event}", "ignored control event %d for port %d",
                           event, number)
            return
        port = self.ports[number]
        if event == PORT_READY:
            if value == 1 and not port.ready:
                port.ready = True
                if port.index == 0:
                    self._control(0, CONSOLE_PORT, 1)
                self._control(port.index, PORT_NAME, 0, port.name.encode())
                if port.backend.connected:
                    self._control(port.index, PORT_OPEN, 1)
        elif port.ready:
            port.guest_open = bool(value)
            if port.guest_open:
                self.transport.kick(port.rx)

    # --- the host side (backend threads) ----------------------------------------------------
    def _host_input(self, port: Port, data: bytes) -> None:
        with self.transport.lock:
            if self._closed:
                return
            room = PENDING_LIMIT - len(port.pending)
            if len(data) > room:
                port.dropped += len(data) - room
                self.transport.warn_once(f"input-dropped-{port.index}", "port %s: the guest is not "
                               "reading its input; dropping bytes", port.name)
                data = data[:room]
            port.pending += data
            self.transport.kick(port.rx)

    def _host_connection(self, port: Port, connected: bool) -> None:
        with self.transport.lock:
            if not self._closed and port.ready:
                self._control(port.index, PORT_OPEN, int(connected))
