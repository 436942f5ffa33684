"""`virtio-net`: a network card backed by a Linux tap device (virtio 1.2, 5.1).

    -s SLOT,virtio-net,tapN[,mac=xx:xx:xx:xx:xx:xx][,mtu=N]
    -s SLOT,virtio-net,tap=NAME[,mac=...][,mtu=N]

as bhyve's pci_virtio_net takes them.  The tap is opened through
/dev/net/tun (created if it does not exist, as a non-persistent tap that
goes away with pyhyve) with IFF_VNET_HDR and a 12-byte
virtio_net_hdr_mrg_rxbuf on every frame.  The default MAC is bhyve's: OUI
00:a0:98 and the first three bytes of the MD5 of "SLOT-FUNC-VMNAME".

Features: MAC, STATUS (the link is always up), MRG_RXBUF, and MTU when
`mtu=` is given.  Checksum and segmentation offloads are not offered, so
every header pyhyve sends either way is all zeros apart from num_buffers;
drivers that take neither VERSION_1 nor MRG_RXBUF get the 10-byte legacy
header.

TX (queue 1): each chain's data after the driver's header goes out with one
writev; chains too short for the header and frames longer than the MTU
allows are dropped and counted in tx_dropped.  RX (queue 0): the tap is
watched by the VM's virtio I/O thread; frames go into the posted buffers
(several of them with MRG_RXBUF).  When the driver has posted none, the
tap is taken off the I/O thread until the driver kicks the receive queue, so
pending frames wait in the kernel (which drops the oldest when its queue
fills) instead of the thread spinning.  Frames that do not fit the buffers
are dropped and counted in rx_dropped.
"""

import errno
import fcntl
import hashlib
import logging
import os
import re
import struct

from ..config import ConfigError
from ..pci import emulation
from .iothread import io_thread
from .pci import F_VERSION_1, STATUS_DRIVER_OK, STATUS_NEEDS_RESET, VirtioPciDevice
from .queue import Chain, SplitQueue

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
OUI = b"\x00\xa0\x98"
_CONFIG = struct.Struct("<6sHHH")   # mac, status, max_virtqueue_pairs, mtu

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


def open_tap(name: str) -> int:
    """A non-blocking fd for tap `name` carrying 12-byte virtio-net headers."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise ConfigError(f"virtio-net: '{name}' is not a valid interface name")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"virtio-net: {TUN_PATH} is missing (load the tun module)") from None
    except OSError as exc:
        raise ConfigError(f"virtio-net: cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_LEN))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            reason = "permission denied (needs root or CAP_NET_ADMIN)"
        elif exc.errno == errno.EBUSY:
            reason = "it is in use, or is not a tap"
        else:
            reason = exc.strerror
        raise ConfigError(f"virtio-net: cannot attach to tap {name}: {reason}") from None
    return fd


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
    """virtio network card on a tap: tapN or tap=NAME[,mac=xx:xx:xx:xx:xx:xx][,mtu=N]"""

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
            options["tap"] = first
        return options

    def init(self, options: dict[str, str]) -> None:
        unknown = sorted(set(options) - {"tap", "mac", "mtu"})
        if unknown:
            raise ConfigError(f"virtio-net: unknown option '{unknown[0]}'")
        name = options.get("tap")
        if not name:
            raise ConfigError("virtio-net: no tap given (-s SLOT,virtio-net,tapN)")
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
        self.mac, self.mtu, self.tap_name = mac, mtu, name
        self.tx_dropped = self.rx_dropped = 0
        self.tap_fd = open_tap(name)
        try:
            self.virtio_init([QUEUE_SIZE, QUEUE_SIZE], features, _CONFIG.size)
        except BaseException:
            os.close(self.tap_fd)
            raise
        _CONFIG.pack_into(self.device_config, 0, mac, S_LINK_UP, 1, mtu)
        self._tap_thread = io_thread(self.vm)
        self._rx_armed = False
        self._rx_frame: bytes | None = None    # read from the tap, waiting for buffers

    def _header_length(self) -> int:
        if self.negotiated(F_VERSION_1 | F_MRG_RXBUF):
            return HDR_LEN
        return LEGACY_HDR_LEN

    # --- the tap on the I/O thread ------------------------------------------------------
    def _arm(self, armed: bool) -> None:
        if armed != self._rx_armed:
            if armed:
                self._tap_thread.register(self.tap_fd, self._tap_readable, eventfd=False)
            else:
                self._tap_thread.unregister(self.tap_fd)
            self._rx_armed = armed

    def _tap_readable(self) -> None:
        with self._lock:
            if self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET) == STATUS_DRIVER_OK \
                    and self.queues[RX].ready:
                self.kick(RX)
            else:
                self._arm(False)       # until the driver (re)starts the device

    def device_reset(self) -> None:
        self._arm(False)
        self._rx_frame = None

    def teardown(self) -> None:
        with self._lock:
            self._arm(False)
            os.close(self.tap_fd)
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
        """Move frames from the tap into posted buffers until either runs out."""
        while True:
            frame = self._rx_frame
            if frame is None:
                try:
                    frame = os.read(self.tap_fd, READ_SIZE)
                except BlockingIOError:
                    queue.set_notification(True)
                    return
                except OSError as exc:
                    self.warn_once("tap-read", "virtio-net: reading tap %s failed: %s",
                                   self.tap_name, exc.strerror)
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
                    self._arm(False)    # leave the rest in the tap until the kick
                    return
            self._rx_frame = None

    def _deliver(self, queue: SplitQueue, frame: bytes) -> bool:
        """Put one frame (tap header first) in the buffers; False, using none of them,
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
            os.writev(self.tap_fd, [bytes(HDR_LEN)] + frame)
        except OSError as exc:        # the tap is down or its queue is full: a lost frame
            self.tx_dropped += 1
            if exc.errno not in (errno.EAGAIN, errno.EIO):
                self.warn_once("tap-write", "virtio-net: writing tap %s failed: %s",
                               self.tap_name, exc.strerror)
        return 0
