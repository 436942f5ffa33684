"""`virtio-net`: a network card on a Linux tap or on user-mode networking (virtio 1.2, 5.1).

    -s SLOT,virtio-net,tapN[,mac=xx:xx:xx:xx:xx:xx][,mtu=N]
    -s SLOT,virtio-net,tap=NAME[,mac=...][,mtu=N]
    -s SLOT,virtio-net,slirp[,hostfwd=RULE[;RULE...]][,tftp=DIR][,bootfile=NAME][,mac=...][,mtu=N]

as bhyve's pci_virtio_net takes them (the bare first word is the backend, a
tap's name or `slirp`; `backend=` says the same as a config key).  The
backend is a non-blocking fd carrying one frame per read or write behind a
12-byte virtio_net_hdr_mrg_rxbuf: a tap opened with IFF_VNET_HDR (tap.py),
or the socket to a libslirp thread (slirp.py), so the data path below is the
same for both.  The default MAC is bhyve's: OUI 00:a0:98 and the first three
bytes of the MD5 of "SLOT-FUNC-VMNAME".

Features: MAC, STATUS (the link is always up), MRG_RXBUF, and MTU when
`mtu=` is given.  Checksum and segmentation offloads are not offered, so
every header pyhyve sends either way is all zeros apart from num_buffers;
drivers that take neither VERSION_1 nor MRG_RXBUF get the 10-byte legacy
header.  The device config is read-only, except that a legacy driver may set
the MAC by writing it (virtio 1.2, 5.1.4.3: no CTRL_MAC_ADDR is offered); other
config writes are dropped and counted in config_writes_dropped.

TX (queue 1): each chain's data after the driver's header goes out with one
writev; chains too short for the header and frames longer than the MTU
allows are dropped and counted in tx_dropped.  RX (queue 0): the backend fd
is watched by the VM's virtio I/O thread; frames go into the posted buffers
(several of them with MRG_RXBUF).  When the driver has posted none, the fd
is taken off the I/O thread until the driver kicks the receive queue, so
pending frames wait in the kernel (which drops them when its queue fills)
instead of the thread spinning.  Frames that do not fit the buffers are
dropped and counted in rx_dropped.
"""

import errno
import hashlib
import logging
import os
import re
import struct
from typing import Callable

from ..config import ConfigError
from ..pci import emulation
from . import slirp
from .iothread import io_thread
from .pci import F_VERSION_1, STATUS_DRIVER_OK, STATUS_NEEDS_RESET, VirtioPciDevice
from .queue import Chain, SplitQueue
from .tap import open_tap

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
LEGACY_DEVICE_ID = 0x1000
CLASS_NETWORK_ETHERNET = 0x020000

F_MTU = 1 << 3
F_MAC = 1 << 5
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
S_LINK_UP = 1

RX, TX = 0, 1
QUEUE_SIZE = 256
HDR_LEN = 12                      # struct virtio_net_hdr_mrg_rxbuf
LEGACY_HDR_LEN = 10               # struct virtio_net_hdr
ETHER_OVERHEAD = 14 + 4           # Ethernet header and one VLAN tag
DEFAULT_MTU = 1500
MIN_MTU, MAX_MTU = 68, 65535 - ETHER_OVERHEAD
READ_SIZE = HDR_LEN + 65536
ZERO_HEADER = bytes(HDR_LEN)       # what every frame to the backend carries: no offloads
OUI = b"\x00\xa0\x98"
MAC_LEN = 6
_CONFIG = struct.Struct("<6sHHH")   # mac, status, max_virtqueue_pairs, mtu

TAP_OPTIONS = {"tap", "backend", "mac", "mtu"}
SLIRP_OPTIONS = TAP_OPTIONS | {"hostfwd", "tftp", "bootfile"}


def parse_mac(text: str) -> bytes:
    """bhyve's net_parsemac: six hex bytes, not multicast, not all zeros."""
    if not re.fullmatch(r"[0-9A-Fa-f]{1,2}(:[0-9A-Fa-f]{1,2}){5}", text):
        raise ConfigError(f"virtio-net: mac '{text}' is not xx:xx:xx:xx:xx:xx")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1 or mac == bytes(6):
        raise ConfigError(f"virtio-net: mac '{text}' is multicast or zero")
    return mac


def generate_mac(slot: int, func: int, vm_name: str) -> bytes:
    """bhyve's net_genmac: stable per VM name and slot."""
    return OUI + hashlib.md5(f"{slot}-{func}-{vm_name}".encode()).digest()[:3]


@emulation("virtio-net")
class VirtioNet(VirtioPciDevice):
    """virtio network card: tapN, tap=NAME or slirp[,hostfwd=R][,tftp=D][,bootfile=F];
    each with [,mac=xx:xx:xx:xx:xx:xx][,mtu=N]"""

    device_type = VIRTIO_ID_NET
    legacy_device_id = LEGACY_DEVICE_ID
    class_code = CLASS_NETWORK_ETHERNET

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """bhyve's netbe_legacy_config: a bare first word is the backend."""
        first, _, rest = text.partition(",")
        if "=" in first:
            return super().legacy_options(text)
        options = super().legacy_options(rest)
        if first:
            options["backend"] = first
        return options

    def init(self, options: dict[str, str]) -> None:
        if "mac" in options:
            mac = parse_mac(options["mac"])
        else:
            mac = generate_mac(self.slot, self.func, self.vm.name)
        features = F_MAC | F_STATUS | F_MRG_RXBUF
        mtu = DEFAULT_MTU
        if "mtu" in options:
            try:
                mtu = int(options["mtu"])
            except ValueError:
                mtu = -1
            if not MIN_MTU <= mtu <= MAX_MTU:
                raise ConfigError(f"virtio-net: mtu '{options['mtu']}' is not a number "
                                  f"from {MIN_MTU} to {MAX_MTU}")
            features |= F_MTU
        self.mac, self.mtu = mac, mtu
        self.tx_dropped = self.rx_dropped = self.config_writes_dropped = 0
        self.backend_fd, self.backend_name, self._close_backend = self._open_backend(options)
        try:
            self.virtio_init([QUEUE_SIZE, QUEUE_SIZE], features, _CONFIG.size)
        except BaseException:
            self._close_backend()
            raise
        _CONFIG.pack_into(self.device_config, 0, mac, S_LINK_UP, 1, mtu)
        self._backend_thread = io_thread(self.vm)
        self._rx_armed = False
        self._rx_frame: bytes | None = None    # read from the backend, waiting for buffers

    def _open_backend(self, options: dict[str, str]) -> tuple[int, str, Callable[[], None]]:
        """(fd, name for messages, close) of the tap or slirp network the options name."""
        backend, tap = options.get("backend"), options.get("tap")
        if backend and tap:
            raise ConfigError("virtio-net: give either a backend or tap=, not both")
        name = backend or tap
        if not name:
            raise ConfigError("virtio-net: no backend given (-s SLOT,virtio-net,tapN "
                              "or -s SLOT,virtio-net,slirp)")
        user_networking = backend == "slirp"
        allowed = SLIRP_OPTIONS if user_networking else TAP_OPTIONS
        unknown = sorted(set(options) - allowed)
        if unknown:
            if unknown[0] in SLIRP_OPTIONS:
                raise ConfigError(f"virtio-net: {unknown[0]}= needs the slirp backend")
            raise ConfigError(f"virtio-net: unknown option '{unknown[0]}'")
        if not user_networking:
            fd = open_tap(name)
            return fd, f"tap {name}", lambda: os.close(fd)
        forwards = slirp.parse_hostfwd(options["hostfwd"]) if "hostfwd" in options else []
        tftp = options.get("tftp")
        if tftp is not None and not os.path.isdir(tftp):
            raise ConfigError(f"virtio-net: tftp directory '{tftp}' does not exist")
        network = slirp.SlirpBackend(
            forwards, self.mtu, tftp=tftp, bootfile=options.get("bootfile"),
            warn=lambda message: self.warn_once(f"slirp:{message}", "slirp: %s", message))
        return network.fd, "slirp", network.close

    def _header_length(self) -> int:
        if self.negotiated(F_VERSION_1 | F_MRG_RXBUF):
            return HDR_LEN
        return LEGACY_HDR_LEN

    # --- the backend on the I/O thread --------------------------------------------------
    def _arm(self, armed: bool) -> None:
        if armed != self._rx_armed:
            if armed:
                self._backend_thread.register(self.backend_fd, self._backend_readable,
                                              eventfd=False)
            else:
                self._backend_thread.unregister(self.backend_fd)
            self._rx_armed = armed

    def _backend_readable(self) -> None:
        with self._lock:
            if self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET) == STATUS_DRIVER_OK \
                    and self.queues[RX].ready:
                self.kick(RX)
            else:
                self._arm(False)       # until the driver (re)starts the device

    def device_reset(self) -> None:
        self._arm(False)
        self._rx_frame = None
        self.device_config[:MAC_LEN] = self.mac      # as configured, whatever a driver wrote

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        """Legacy drivers set the MAC this way (no CTRL_MAC_ADDR is offered); the rest
        of the config, and all of it for modern drivers, is read-only."""
        if offset + size <= MAC_LEN and not self.negotiated(F_VERSION_1):
            value &= (1 << (8 * size)) - 1
            self.device_config[offset:offset + size] = value.to_bytes(size, "little")
            return
        self.config_writes_dropped += 1
        self.warn_once("config-write", "driver wrote %d bytes at read-only "
                       "device config offset %#x; dropped", size, offset)

    def teardown(self) -> None:
        with self._lock:
            self._arm(False)
            self._close_backend()
        super().teardown()

    # --- receive -------------------------------------------------------------------------
    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        if index == TX:
            super().queue_notified(index, queue)
            return
        self._arm(True)
        self._receive(queue)
        self.interrupt_queue(RX)

    def _receive(self, queue: SplitQueue) -> None:
        """Move frames from the backend into posted buffers until either runs out."""
        while True:
            frame = self._rx_frame
            if frame is None:
                try:
                    frame = os.read(self.backend_fd, READ_SIZE)
                except BlockingIOError:
                    queue.set_notification(True)
                    return
                except OSError as exc:
                    self.warn_once("backend-read", "reading %s failed: %s",
                                   self.backend_name, exc.strerror)
                    self._arm(False)
                    return
                if not frame:           # the other end is gone: nothing more will come
                    self.warn_once("backend-closed", "%s closed",
                                   self.backend_name)
                    self._arm(False)
                    return
                if len(frame) <= HDR_LEN:
                    continue
                self._rx_frame = frame
            queue.set_notification(False)
            if not self._deliver(queue, frame):
                # Buffers the driver posts from here on come with a kick.
                queue.set_notification(True)
                if not self._deliver(queue, frame):
                    self._arm(False)    # leave the rest in the backend until the kick
                    return
            self._rx_frame = None

    def _deliver(self, queue: SplitQueue, frame: bytes) -> bool:
        """Put one frame (backend header first) in the buffers; False, using none of them,
        if the driver has not posted enough."""
        header_length = self._header_length()
        mergeable = self.negotiated(F_MRG_RXBUF)
        payload = bytearray(frame[HDR_LEN - header_length:])
        payload[:header_length] = bytes(header_length)     # no offloads negotiated
        chains: list[tuple[Chain, int]] = []
        room = 0
        while room < len(payload):
            chain = queue.pop()
            if chain is None:
                queue.last_avail = (queue.last_avail - len(chains)) & 0xFFFF
                return False
            capacity = sum(length for _, length in chain.writable)
            chains.append((chain, capacity))
            room += capacity
            if not mergeable or capacity < header_length:
                break
        if room < len(payload):        # one buffer too small, or no room for the header
            self.rx_dropped += 1
            for chain, _ in chains:
                queue.push(chain.head, 0)
            return True
        if header_length == HDR_LEN:
            struct.pack_into("<H", payload, LEGACY_HDR_LEN, len(chains))
        memory, data, offset = self.vm.memory, memoryview(payload), 0
        for chain, capacity in chains:
            written = chain.write(memory, data[offset:offset + capacity])
            offset += written
            queue.push(chain.head, written)
        return True

    # --- transmit ------------------------------------------------------------------------
    def handle_request(self, index: int, chain: Chain) -> int:
        header_length = self._header_length()
        views = chain.readable_views(self.vm.memory)
        skip = header_length
        frame = []
        for view in views:
            if skip >= len(view):
                skip -= len(view)
                continue
            frame.append(view[skip:])
            skip = 0
        length = sum(len(view) for view in frame)
        if skip or not length or length > self.mtu + ETHER_OVERHEAD:
            self.tx_dropped += 1
            return 0
        try:
            os.writev(self.backend_fd, [ZERO_HEADER] + frame)
        except OSError as exc:        # the tap is down or a queue is full: a lost frame
            self.tx_dropped += 1
            if exc.errno not in (errno.EAGAIN, errno.EIO):
                self.warn_once("backend-write", "writing %s failed: %s",
                               self.backend_name, exc.strerror)
        return 0
