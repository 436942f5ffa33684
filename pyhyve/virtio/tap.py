"""Linux tap devices for virtio-net: a tap opened through /dev/net/tun (created
if it does not exist, as a non-persistent tap that goes away with pyhyve) with
IFF_VNET_HDR and a 12-byte virtio_net_hdr_mrg_rxbuf on every frame.

TUNSETOFFLOAD tells the tun driver which offloads the reader of the tap (the
guest, through virtio-net) takes: with TUN_F_CSUM the kernel may hand over
frames with a partial checksum, with TUN_F_TSO4/TSO6 whole TCP segments of up
to 64 KiB (the virtio header says which); with none, every frame read is
complete.  Frames written to the tap may carry those headers whatever is set."""

import errno
import fcntl
import os
import struct

from ..config import ConfigError

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
HDR_LEN = 12        # struct virtio_net_hdr_mrg_rxbuf, ahead of every frame (slirp.py too)


def open_tap(name: str) -> int:
    """A non-blocking fd for tap `name` carrying 12-byte virtio-net headers."""
    raw = os.fsencode(name)
    if not raw or len(raw) >= IFNAMSIZ or raw in (b".", b"..") or \
            any(c.isspace() or c in "/:" for c in name):     # as Linux's dev_valid_name
        raise ConfigError(f"virtio-net: '{name}' is not a valid interface name")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"virtio-net: {TUN_PATH} is missing (load the tun module)") from None
    except OSError as exc:
        raise ConfigError(f"virtio-net: cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", raw,
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_LEN))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            reason = "permission denied (needs root or CAP_NET_ADMIN)"
        elif exc.errno == errno.EBUSY:
            reason = "it is in use, or is not a tap"
        elif exc.errno == errno.EINVAL:       # the name is taken by another kind of link
            reason = "an interface of that name exists and is not a tap"
        else:
            reason = exc.strerror
        raise ConfigError(f"virtio-net: cannot attach to tap {name}: {reason}") from None
    return fd


def set_offloads(fd: int, flags: int) -> None:
    """Tell the tap which TUN_F_* offloads its reader takes (OSError if refused)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def probe_offloads(fd: int) -> int:
    """The TUN_F_* offloads the tap on `fd` accepts, leaving it with none set.  Each
    segmentation offload needs TUN_F_CSUM, and ECN a segmentation offload, so each
    is tried on top of what it needs; a tap (or an fd that is none) refusing
    TUN_F_CSUM gets no offloads."""
    accepted = 0
    for flags, needs in ((TUN_F_CSUM, 0), (TUN_F_TSO4, TUN_F_CSUM), (TUN_F_TSO6, TUN_F_CSUM),
                         (TUN_F_TSO_ECN, TUN_F_TSO4 | TUN_F_TSO6)):
        if needs and not accepted & needs:
            continue
        try:
            set_offloads(fd, accepted | flags)
        except OSError:
            continue
        accepted |= flags
    if accepted:
        set_offloads(fd, 0)
    return accepted
