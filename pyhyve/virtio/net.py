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
bytes of the MD5 of "SLOT-FUNC-VMNAME" (the transport's instance and the VM's
name).

Features: MAC, STATUS (the link is always up), MRG_RXBUF, and MTU when
`mtu=` is given; drivers that take neither VERSION_1 nor MRG_RXBUF get the
10-byte legacy header.  On a tap, also the offloads the tap accepts (probed
with TUNSETOFFLOAD at open, as QEMU and bhyve do): CSUM and GUEST_CSUM, then
HOST_/GUEST_TSO4, TSO6 and ECN.  libslirp wants complete frames, so user
networking offers none.  A modern driver taking an offload without the one it
depends on (virtio 1.2, 5.1.3.1) is refused FEATURES_OK; for a legacy driver,
which has no such step, the orphaned offload is ignored.

Offloads negotiated, the headers pass through: a transmitted frame keeps the
driver's header (NEEDS_CSUM with csum_start/offset, gso_type/size) for the
tap's kernel to finish, and at DRIVER_OK the tap is told the guest's receive
offloads, so received frames keep the kernel's header (partial checksums,
TCP segments of up to 64 KiB).  Otherwise both ways carry zeros apart from
num_buffers: the tap, set to no offloads at open and on reset, completes
every frame before pyhyve reads it.

The device config is read-only, except that a legacy driver may set the MAC
by writing it (virtio 1.2, 5.1.4.3: no CTRL_MAC_ADDR is offered); other
config writes are dropped and counted in config_writes_dropped.

TX (queue 1): each chain's data after the driver's header goes out with one
writev; chains too short for the header, frames longer than the MTU allows
(64 KiB for a segmentation request) and headers the kernel would refuse (an
offload not negotiated, a checksum outside the frame) are dropped and
counted in tx_dropped.  RX (queue 0): the backend fd is watched by the VM's
virtio I/O thread; frames go into the posted buffers (several of them with
MRG_RXBUF).  When the driver has posted none, the fd is taken off the I/O
thread until the driver kicks the receive queue, so pending frames wait in
the kernel (which drops them when its queue fills) instead of the thread
spinning.  Frames that do not fit the buffers, and
frames the tap prepared for offloads the driver no longer takes (queued
before a reset), are dropped and counted in rx_dropped.
"""

import errno
import hashlib
import os
import re
import struct
from collections.abc import Callable

from ..config import ConfigError
from . import slirp
from ..log import getLogger
from .device import F_VERSION_1, Transport, VirtioDevice
from .queue import Chain, SplitQueue
from .tap import (HDR_LEN, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, open_tap,
                  probe_offloads, set_offloads)

log = getLogger(__name__)

VIRTIO_ID_NET = 1

F_CSUM = 1 << 0                   # the driver may send partial checksums
F_GUEST_CSUM = 1 << 1             # ... and take them
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7             # the driver takes TCP segments of up to 64 KiB
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_HOST_TSO4 = 1 << 11             # ... and sends them
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
S_LINK_UP = 1

# The tap's offloads and the feature bits each allows, both ways.
OFFLOAD_FEATURES = ((TUN_F_CSUM, F_CSUM | F_GUEST_CSUM),
                    (TUN_F_TSO4, F_HOST_TSO4 | F_GUEST_TSO4),
                    (TUN_F_TSO6, F_HOST_TSO6 | F_GUEST_TSO6),
                    (TUN_F_TSO_ECN, F_HOST_ECN | F_GUEST_ECN))
GUEST_OFFLOADS = ((F_GUEST_CSUM, TUN_F_CSUM), (F_GUEST_TSO4, TUN_F_TSO4),
                  (F_GUEST_TSO6, TUN_F_TSO6), (F_GUEST_ECN, TUN_F_TSO_ECN))
# (dependent features, features of which one must be there too): virtio 1.2, 5.1.3.1
FEATURE_DEPENDENCIES = ((F_GUEST_TSO4 | F_GUEST_TSO6, F_GUEST_CSUM),
                        (F_GUEST_ECN, F_GUEST_TSO4 | F_GUEST_TSO6),
                        (F_HOST_TSO4 | F_HOST_TSO6, F_CSUM),
                        (F_HOST_ECN, F_HOST_TSO4 | F_HOST_TSO6))

# struct virtio_net_hdr (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_NET_HDR = struct.Struct("<BBHHHH")
HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80

RX, TX = 0, 1
QUEUE_SIZE = 256
LEGACY_HDR_LEN = 10               # struct virtio_net_hdr (HDR_LEN: with num_buffers)
ETHER_OVERHEAD = 14 + 4           # Ethernet header and one VLAN tag
DEFAULT_MTU = 1500
MIN_MTU, MAX_MTU = 68, 65535 - ETHER_OVERHEAD
MAX_GSO_FRAME = 65550             # an IP packet of up to 64 KiB and its Ethernet header
READ_SIZE = HDR_LEN + MAX_GSO_FRAME
ZERO_HEADER = bytes(HDR_LEN)      # what frames to the backend carry without offloads
HEADER_PAD = bytes(HDR_LEN - LEGACY_HDR_LEN)   # num_buffers, which the tap ignores
OUI = b"\x00\xa0\x98"
MAC_LEN = 6
_CONFIG = struct.Struct("<6sHHH")   # mac, status, max_virtqueue_pairs, mtu

SLIRP_ONLY_OPTIONS = {"hostfwd", "tftp", "bootfile"}


def parse_mac(text: str) -> bytes:
    """bhyve's net_parsemac: six hex bytes, not multicast, not all zeros."""
    if not re.fullmatch(r"[0-9A-Fa-f]{1,2}(:[0-9A-Fa-f]{1,2}){5}", text):
        raise ConfigError(f"virtio-net: mac '{text}' is not xx:xx:xx:xx:xx:xx")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1 or mac == bytes(6):
        raise ConfigError(f"virtio-net: mac '{text}' is multicast or zero")
    return mac


def generate_mac(instance: str, vm_name: str) -> bytes:
    """bhyve's net_genmac: stable per VM name and slot ("SLOT-FUNC" on PCI)."""
    return OUI + hashlib.md5(f"{instance}-{vm_name}".encode()).digest()[:3]


class VirtioNet(VirtioDevice):
    """virtio network card: the model, built from its options (config keys)"""

    device_type = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(self, transport: Transport, options: dict[str, str]):
        self.transport = transport      # slirp's thread may warn before __init__ ends
        if "mac" in options:
            mac = parse_mac(options["mac"])
        else:
            mac = generate_mac(transport.instance, transport.vm_name)
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
            # TUN_F_* offloads the tap accepts
            self.tap_offloads = probe_offloads(self.backend_fd) if self._on_tap else 0
            for flag, allowed in OFFLOAD_FEATURES:
                if self.tap_offloads & flag:
                    features |= allowed
            super().__init__(transport, [QUEUE_SIZE, QUEUE_SIZE], features, _CONFIG.size)
        except BaseException:
            self._close_backend()
            raise
        _CONFIG.pack_into(self.config, 0, mac, S_LINK_UP, 1, mtu)
        self._rx_armed = False
        self._rx_frame: bytes | None = None    # read from the backend, waiting for buffers
        self._tap_receive_offloads = 0         # what the tap was told (the probe left none)
        self._negotiate_offloads(0)

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
        slirp_only = sorted(set(options) & SLIRP_ONLY_OPTIONS)
        if slirp_only and not user_networking:
            raise ConfigError(f"virtio-net: {slirp_only[0]}= needs the slirp backend")
        self._on_tap = not user_networking
        if not user_networking:
            fd = open_tap(name)
            return fd, f"tap {name}", lambda: os.close(fd)
        forwards = slirp.parse_hostfwd(options["hostfwd"]) if "hostfwd" in options else []
        tftp = options.get("tftp")
        if tftp is not None and not os.path.isdir(tftp):
            raise ConfigError(f"virtio-net: tftp directory '{tftp}' does not exist")
        network = slirp.SlirpBackend(
            forwards, self.mtu, tftp=tftp, bootfile=options.get("bootfile"),
            warn=lambda message: self.transport.warn_once(f"slirp:{message}", "slirp: %s",
                                                          message))
        return network.fd, "slirp", network.close

    def _header_length(self) -> int:
        if self.transport.negotiated(F_VERSION_1 | F_MRG_RXBUF):
            return HDR_LEN
        return LEGACY_HDR_LEN

    # --- offloads ------------------------------------------------------------------------
    def features_acceptable(self, features: int) -> bool:
        return all(features & bases for dependents, bases in FEATURE_DEPENDENCIES
                   if features & dependents)

    def activate(self, features: int) -> None:
        """The features are final: set the offloads before the queues run."""
        self._negotiate_offloads(features)

    def _negotiate_offloads(self, features: int) -> None:
        """Take the offered offloads in `features` whose dependencies are there too
        (a legacy driver may leave one orphaned), and tell the tap the receive ones."""
        features &= self.features
        for dependents, bases in FEATURE_DEPENDENCIES:
            if not features & bases:
                features &= ~dependents
        self._tx_offloads = bool(features & F_CSUM)
        self._rx_offloads = bool(features & F_GUEST_CSUM)
        self._tx_gso_types = _gso_types(features, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN)
        self._rx_gso_types = _gso_types(features, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN)
        wanted = 0
        for feature, flag in GUEST_OFFLOADS:
            if features & feature:
                wanted |= flag
        if wanted == self._tap_receive_offloads:
            return
        try:
            set_offloads(self.backend_fd, wanted)
        except OSError as exc:       # frames not prepared as negotiated are dropped on RX
            self.transport.warn_once("tap-offload", "setting %s offloads to %#x failed: %s",
                           self.backend_name, wanted, exc.strerror)
            return
        self._tap_receive_offloads = wanted

    # --- the backend on the I/O thread --------------------------------------------------
    def _arm(self, armed: bool) -> None:
        if armed != self._rx_armed:
            if armed:
                self.transport.io_thread.register(self.backend_fd, self._backend_readable,
                                                  eventfd=False)
            else:
                self.transport.io_thread.unregister(self.backend_fd)
            self._rx_armed = armed

    def _backend_readable(self) -> None:
        with self.transport.lock:
            if not self.transport.kick(RX):
                self._arm(False)       # until the driver (re)starts the device, or resume()

    def reset(self) -> None:
        self._arm(False)
        self._rx_frame = None
        self._negotiate_offloads(0)
        self.config[:MAC_LEN] = self.mac      # as configured, whatever a driver wrote

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Legacy drivers set the MAC this way (no CTRL_MAC_ADDR is offered); the rest
        of the config, and all of it for modern drivers, is read-only."""
        if offset + size <= MAC_LEN and not self.transport.negotiated(F_VERSION_1):
            value &= (1 << (8 * size)) - 1
            self.config[offset:offset + size] = value.to_bytes(size, "little")
            return
        self.config_writes_dropped += 1
        self.transport.warn_once("config-write", "driver wrote %d bytes at read-only "
                       "device config offset %#x; dropped", size, offset)

    def close(self) -> None:
        with self.transport.lock:
            self._arm(False)
            self._close_backend()

    # --- receive -------------------------------------------------------------------------
    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        if index == TX:
            super().queue_notified(index, queue)
            return
        self._arm(True)
        self._receive(queue)
        self.transport.interrupt_queue(RX)

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
                    self.transport.warn_once("backend-read", "reading %s failed: %s",
                                   self.backend_name, exc.strerror)
                    self._arm(False)
                    return
                if not frame:           # the other end is gone: nothing more will come
                    self.transport.warn_once("backend-closed", "%s closed",
                                   self.backend_name)
                    self._arm(False)
                    return
                if len(frame) <= HDR_LEN:
                    continue
                if frame[1] not in self._rx_gso_types or \
                        frame[0] & HDR_F_NEEDS_CSUM and not self._rx_offloads:
                    self.rx_dropped += 1      # prepared for offloads since given up
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
        mergeable = self.transport.negotiated(F_MRG_RXBUF)
        payload = bytearray(frame)
        if not self._rx_offloads:
            payload[:LEGACY_HDR_LEN] = ZERO_HEADER[:LEGACY_HDR_LEN]
        if header_length == LEGACY_HDR_LEN:     # the header moves up over num_buffers
            payload[HDR_LEN - LEGACY_HDR_LEN:HDR_LEN] = payload[:LEGACY_HDR_LEN]
        data = memoryview(payload)[HDR_LEN - header_length:]
        chains: list[tuple[Chain, int]] = []
        room = 0
        while room < len(data):
            chain = queue.pop()
            if chain is None:
                queue.last_avail = (queue.last_avail - len(chains)) & 0xFFFF
                return False
            capacity = sum(length for _, length in chain.writable)
            chains.append((chain, capacity))
            room += capacity
            if not mergeable or capacity < header_length:
                break
        if room < len(data):           # one buffer too small, or no room for the header
            self.rx_dropped += 1
            for chain, _ in chains:
                queue.push(chain.head, 0)
            return True
        if header_length == HDR_LEN:
            struct.pack_into("<H", payload, LEGACY_HDR_LEN, len(chains))
        memory, offset = self.transport.memory, 0
        for chain, capacity in chains:
            written = chain.write(memory, data[offset:offset + capacity])
            offset += written
            queue.push(chain.head, written)
        return True

    # --- transmit ------------------------------------------------------------------------
    def handle_request(self, index: int, chain: Chain) -> int:
        header_length = self._header_length()
        views = chain.readable_views(self.transport.memory)
        skip = header_length
        frame = []
        for view in views:
            if skip >= len(view):
                skip -= len(view)
                continue
            frame.append(view[skip:])
            skip = 0
        length = sum(len(view) for view in frame)
        if skip or not length:
            self.tx_dropped += 1
            return 0
        if self._tx_offloads:
            header = _driver_header(views)
            if not self._valid_tx_header(header, length):
                self.tx_dropped += 1
                return 0
            iov = [header, HEADER_PAD]
        elif length > self.mtu + ETHER_OVERHEAD:
            self.tx_dropped += 1
            return 0
        else:
            iov = [ZERO_HEADER]
        try:
            os.writev(self.backend_fd, iov + frame)
        except OSError as exc:        # the tap is down or a queue is full: a lost frame
            self.tx_dropped += 1
            if exc.errno not in (errno.EAGAIN, errno.EIO):
                self.transport.warn_once("backend-write", "writing %s failed: %s",
                               self.backend_name, exc.strerror)
        return 0

    def _valid_tx_header(self, header, length: int) -> bool:
        """Whether the tap should see this header: only negotiated segmentation, a
        checksum to fill in inside the frame, a frame within the MTU unless it is to
        be segmented."""
        flags, gso_type, _, gso_size, csum_start, csum_offset = _NET_HDR.unpack(header)
        if flags & HDR_F_NEEDS_CSUM and csum_start + csum_offset + 2 > length:
            return False
        if gso_type == GSO_NONE:
            return length <= self.mtu + ETHER_OVERHEAD
        return gso_type in self._tx_gso_types and gso_size > 0 and length <= MAX_GSO_FRAME


def _gso_types(features: int, tso4: int, tso6: int, ecn: int) -> bytes:
    """The gso_type values the header may carry in one direction, given the features."""
    types = [GSO_NONE]
    for feature, gso_type in ((tso4, GSO_TCPV4), (tso6, GSO_TCPV6)):
        if features & feature:
            types.append(gso_type)
            if features & ecn:
                types.append(gso_type | GSO_ECN)
    return bytes(types)


def _driver_header(views: list[memoryview]):
    """The first LEGACY_HDR_LEN bytes of a chain that holds at least that many: a view
    of the first buffer where it holds them all, as a driver usually puts them."""
    if len(views[0]) >= LEGACY_HDR_LEN:
        return views[0][:LEGACY_HDR_LEN]
    pieces, need = [], LEGACY_HDR_LEN
    for view in views:
        pieces.append(view[:need])
        need -= len(pieces[-1])
        if not need:
            break
    return b"".join(pieces)
