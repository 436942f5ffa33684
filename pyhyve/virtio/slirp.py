"""User-mode networking for virtio-net: libslirp (Debian's libslirp0) through ctypes.

    -s SLOT,virtio-net,slirp[,hostfwd=RULE[;RULE...]][,tftp=DIR][,bootfile=NAME]

with QEMU's `-netdev user` network: 10.0.2.0/24, the host (gateway) at
10.0.2.2, DNS forwarded from 10.0.2.3 to the host's resolver, DHCP handing
out 10.0.2.15 onwards, IPv6 on fec0::/64 (host fec0::2, DNS fec0::3).  As in
QEMU, the guest may open connections to the outside and to the host's
loopback through 10.0.2.2.  A hostfwd RULE is QEMU's and bhyve's
`tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT` (the colon before
HOSTPORT may be left out); HOSTADDR defaults to 0.0.0.0 and GUESTADDR to
10.0.2.15, as in QEMU.  tftp= and bootfile= serve a directory over TFTP and
name the boot file in DHCP replies, for network boot.

libslirp is not thread-safe, so one thread owns it: the backend's poll loop,
which also drives libslirp's timers from a heap.  The device talks to that
thread through a SOCK_SEQPACKET socketpair carrying one frame per message,
each behind a zeroed 12-byte virtio_net_hdr_mrg_rxbuf exactly as on a tap:
the socket is the queue and the wakeup for transmitted frames, and the device
receives from it with the same code (and the same wait-for-buffers logic) as
from a tap.  Frames the device is not taking fill the socket and are then
dropped and counted, which libslirp allows (TCP retransmits).
"""

import ctypes
import heapq
import ipaddress
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable

from ..config import ConfigError
from ..log import getLogger
from ..record import record
from ..sandbox import catch_up
from .tap import HDR_LEN              # frames carry a tap's virtio-net header

log = getLogger(__name__)

LIBRARY = "libslirp.so.0"
MISSING = "virtio-net: slirp needs libslirp (apt-get install libslirp0)"
THREAD_NAME = "slirp"

NETWORK, NETMASK, HOST = "10.0.2.0", "255.255.255.0", "10.0.2.2"
NAMESERVER, DHCP_START = "10.0.2.3", "10.0.2.15"
PREFIX6, PREFIX6_LENGTH, HOST6, NAMESERVER6 = "fec0::", 64, "fec0::2", "fec0::3"

FRAME_BUFFER = HDR_LEN + 65536
FRAMES_PER_WAKEUP = 64              # guest frames passed to libslirp before it polls again
CONFIG_VERSION = 1
NO_TIMEOUT = 0xFFFFFFFF

SLIRP_POLL_IN, SLIRP_POLL_OUT, SLIRP_POLL_PRI = 1, 2, 4
SLIRP_POLL_ERR, SLIRP_POLL_HUP = 8, 16
_TO_POLL = ((SLIRP_POLL_IN, select.POLLIN), (SLIRP_POLL_OUT, select.POLLOUT),
            (SLIRP_POLL_PRI, select.POLLPRI))
_FROM_POLL = _TO_POLL + ((SLIRP_POLL_ERR, select.POLLERR), (SLIRP_POLL_HUP, select.POLLHUP))


# --- the C interface (libslirp.h) --------------------------------------------------------
class InAddr(ctypes.Structure):
    """struct in_addr: the address in network byte order."""
    _fields_ = [("s_addr", ctypes.c_uint32)]

    @classmethod
    def of(cls, text: str) -> "InAddr":
        return cls.from_buffer_copy(socket.inet_aton(text))


class In6Addr(ctypes.Union):
    """struct in6_addr: 16 bytes, aligned as its 32-bit view."""
    _fields_ = [("s6_addr", ctypes.c_uint8 * 16), ("s6_addr32", ctypes.c_uint32 * 4)]

    @classmethod
    def of(cls, text: str) -> "In6Addr":
        return cls.from_buffer_copy(socket.inet_pton(socket.AF_INET6, text))


class SlirpConfig(ctypes.Structure):
    """SlirpConfig up to the fields of version 1, the version pyhyve passes."""
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("restricted", ctypes.c_int),
        ("in_enabled", ctypes.c_bool),
        ("vnetwork", InAddr),
        ("vnetmask", InAddr),
        ("vhost", InAddr),
        ("in6_enabled", ctypes.c_bool),
        ("vprefix_addr6", In6Addr),
        ("vprefix_len", ctypes.c_uint8),
        ("vhost6", In6Addr),
        ("vhostname", ctypes.c_char_p),
        ("tftp_server_name", ctypes.c_char_p),
        ("tftp_path", ctypes.c_char_p),
        ("bootfile", ctypes.c_char_p),
        ("vdhcp_start", InAddr),
        ("vnameserver", InAddr),
        ("vnameserver6", In6Addr),
        ("vdnssearch", ctypes.POINTER(ctypes.c_char_p)),
        ("vdomainname", ctypes.c_char_p),
        ("if_mtu", ctypes.c_size_t),
        ("if_mru", ctypes.c_size_t),
        ("disable_host_loopback", ctypes.c_bool),
        ("enable_emu", ctypes.c_bool),
    ]


TimerCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
SendPacket = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
GuestError = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
ClockGetNs = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)
TimerNew = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
TimerFree = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
TimerMod = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
PollFd = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)
Notify = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
AddPoll = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
GetRevents = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class SlirpCb(ctypes.Structure):
    """SlirpCb; the last two members are read only with config version 4."""
    _fields_ = [
        ("send_packet", SendPacket),
        ("guest_error", GuestError),
        ("clock_get_ns", ClockGetNs),
        ("timer_new", TimerNew),
        ("timer_free", TimerFree),
        ("timer_mod", TimerMod),
        ("register_poll_fd", PollFd),
        ("unregister_poll_fd", PollFd),
        ("notify", Notify),
        ("init_completed", ctypes.c_void_p),
        ("timer_new_opaque", ctypes.c_void_p),
    ]


def load_library() -> ctypes.CDLL:
    """libslirp with the prototypes pyhyve calls; ConfigError naming the package if absent."""
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError:
        raise ConfigError(MISSING) from None
    lib.slirp_new.restype = ctypes.c_void_p
    lib.slirp_new.argtypes = [ctypes.POINTER(SlirpConfig), ctypes.POINTER(SlirpCb),
                              ctypes.c_void_p]
    lib.slirp_cleanup.restype = None
    lib.slirp_cleanup.argtypes = [ctypes.c_void_p]
    lib.slirp_input.restype = None
    lib.slirp_input.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.slirp_pollfds_fill.restype = None
    lib.slirp_pollfds_fill.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                       AddPoll, ctypes.c_void_p]
    lib.slirp_pollfds_poll.restype = None
    lib.slirp_pollfds_poll.argtypes = [ctypes.c_void_p, ctypes.c_int, GetRevents,
                                       ctypes.c_void_p]
    lib.slirp_add_hostfwd.restype = ctypes.c_int
    lib.slirp_add_hostfwd.argtypes = [ctypes.c_void_p, ctypes.c_int, InAddr, ctypes.c_int,
                                      InAddr, ctypes.c_int]
    return lib


# --- options -----------------------------------------------------------------------------
@record
class HostForward:
    udp: bool
    host_address: str
    host_port: int
    guest_address: str
    guest_port: int

    def __str__(self) -> str:
        return (f"{'udp' if self.udp else 'tcp'}:{self.host_address}:{self.host_port}-"
                f"{self.guest_address}:{self.guest_port}")


_HOSTFWD = re.compile(r"(tcp|udp):(?:([^:-]*):)?([^:-]*)-([^:-]*):([^:-]*)")
HOSTFWD_SYNTAX = "tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"


def parse_hostfwd(text: str) -> list[HostForward]:
    """QEMU's hostfwd rules, several separated by ';'."""
    forwards = []
    for rule in text.split(";"):
        match = _HOSTFWD.fullmatch(rule)
        if not match:
            raise ConfigError(f"virtio-net: hostfwd '{rule}' is not {HOSTFWD_SYNTAX}")
        protocol, host, host_port, guest, guest_port = match.groups()
        forwards.append(HostForward(protocol == "udp", _address(rule, host or "0.0.0.0"),
                                    _port(rule, host_port), _address(rule, guest or DHCP_START),
                                    _port(rule, guest_port)))
    return forwards


def _address(rule: str, text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigError(f"virtio-net: hostfwd '{rule}': '{text}' is not an IPv4 "
                          "address") from None


def _port(rule: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"virtio-net: hostfwd '{rule}': port '{text}' is not a number "
                          "from 1 to 65535")
    return int(text)


# --- the backend -------------------------------------------------------------------------
class _Timer:
    __slots__ = ("callback", "opaque", "expires")

    def __init__(self, callback: Callable[[int], None], opaque: int):
        self.callback, self.opaque, self.expires = callback, opaque, None


class TimerHeap:
    """libslirp's timers (times in ms of time.monotonic_ns), due ones fired by the poll
    loop, whose poll timeout is the time to the next; moved or freed timers leave stale
    heap entries behind, skipped when they come up."""

    def __init__(self):
        self._timers: dict[int, _Timer] = {}
        self._heap: list[tuple[int, int]] = []
        self._next_handle = 1

    def new(self, callback: Callable[[int], None], opaque: int) -> int:
        """A handle (never 0, which libslirp would take for failure) for a stopped timer."""
        handle = self._next_handle
        self._next_handle += 1
        self._timers[handle] = _Timer(callback, opaque)
        return handle

    def free(self, handle: int) -> None:
        self._timers.pop(handle, None)

    def modify(self, handle: int, expires_ms: int) -> None:
        timer = self._timers.get(handle)
        if timer is not None:
            timer.expires = expires_ms
            heapq.heappush(self._heap, (expires_ms, handle))

    def run_due(self) -> int | None:
        """Fire the timers that are due; milliseconds until the next one, or None."""
        heap = self._heap
        while heap:
            expires, handle = heap[0]
            timer = self._timers.get(handle)
            if timer is None or timer.expires != expires:
                heapq.heappop(heap)
                continue
            wait = expires - time.monotonic_ns() // 1_000_000
            if wait > 0:
                return wait
            heapq.heappop(heap)
            timer.expires = None
            timer.callback(timer.opaque)
        return None


class SlirpBackend:
    """A libslirp network on its own thread; `fd` is the device's end of it."""

    def __init__(self, forwards: list[HostForward], mtu: int, tftp: str | None = None,
                 bootfile: str | None = None, warn: Callable[[str], None] = log.warning):
        lib = load_library()
        self._lib, self._warn = lib, warn
        self.dropped = 0                 # frames for the guest that found the socket full
        device_end, self._net = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        device_end.setblocking(False)
        self._net.setblocking(False)
        self._device_end, self.fd = device_end, device_end.fileno()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closing = False
        self._timers = TimerHeap()
        self._polled: list[tuple[int, int]] = []   # this round's (fd, events), by index
        self._revents: dict[int, int] = {}
        self._frame = bytearray(FRAME_BUFFER)
        self._frame_address = ctypes.addressof(ctypes.c_char.from_buffer(self._frame))
        self._header = bytes(HDR_LEN)
        # ctypes objects libslirp points at: they live as long as the backend
        self._add_poll, self._get_revents = AddPoll(self._add_poll_fd), GetRevents(self._revents_of)
        self._callbacks = SlirpCb(
            send_packet=SendPacket(self._send_packet), guest_error=GuestError(self._guest_error),
            clock_get_ns=ClockGetNs(lambda opaque: time.monotonic_ns()),
            timer_new=TimerNew(self._timer_new), timer_free=TimerFree(self._timer_free),
            timer_mod=TimerMod(self._timer_mod),
            # The poll set is rebuilt from slirp_pollfds_fill each round; nothing to track.
            register_poll_fd=PollFd(lambda fd, opaque: None),
            unregister_poll_fd=PollFd(lambda fd, opaque: None),
            # libslirp asks to be polled again; this thread is the poller.
            notify=Notify(lambda opaque: None))
        self._strings = [value.encode() if value else None for value in (tftp, bootfile)]
        self._config = SlirpConfig(
            version=CONFIG_VERSION, restricted=0, in_enabled=True,
            vnetwork=InAddr.of(NETWORK), vnetmask=InAddr.of(NETMASK), vhost=InAddr.of(HOST),
            in6_enabled=True, vprefix_addr6=In6Addr.of(PREFIX6), vprefix_len=PREFIX6_LENGTH,
            vhost6=In6Addr.of(HOST6), tftp_path=self._strings[0], bootfile=self._strings[1],
            vdhcp_start=InAddr.of(DHCP_START), vnameserver=InAddr.of(NAMESERVER),
            vnameserver6=In6Addr.of(NAMESERVER6), if_mtu=mtu, if_mru=mtu)
        self._slirp = lib.slirp_new(ctypes.byref(self._config), ctypes.byref(self._callbacks),
                                    None)
        if not self._slirp:
            self._close_sockets()
            raise ConfigError("virtio-net: libslirp refused the network configuration")
        try:
            for forward in forwards:
                self._add_forward(forward)
        except ConfigError:
            lib.slirp_cleanup(self._slirp)
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _add_forward(self, forward: HostForward) -> None:
        if self._lib.slirp_add_hostfwd(self._slirp, int(forward.udp),
                                       InAddr.of(forward.host_address), forward.host_port,
                                       InAddr.of(forward.guest_address), forward.guest_port) < 0:
            reason = os.strerror(ctypes.get_errno()) if ctypes.get_errno() else "refused"
            raise ConfigError(f"virtio-net: hostfwd {forward}: cannot listen on "
                              f"{forward.host_address}:{forward.host_port}: {reason}")

    def close(self) -> None:
        self._closing = True
        os.eventfd_write(self._wakeup, 1)
        self._thread.join(5.0)
        if not self._thread.is_alive():       # libslirp is never freed under its owner
            self._lib.slirp_cleanup(self._slirp)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._device_end.close()
        self._net.close()
        os.close(self._wakeup)

    # --- the owner thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._closing:
                self._poll_once()
        except Exception:                    # a bug here must not go unnoticed
            log.exception("slirp network thread failed; the network is down")

    def _poll_once(self) -> None:
        """One round of libslirp's poll protocol, then due timers and guest frames."""
        lib, slirp, net = self._lib, self._slirp, self._net.fileno()
        until_timer = self._timers.run_due()
        timeout = ctypes.c_uint32(NO_TIMEOUT if until_timer is None
                                  else min(until_timer, NO_TIMEOUT - 1))
        self._polled = [(self._wakeup, select.POLLIN), (net, select.POLLIN)]
        lib.slirp_pollfds_fill(slirp, ctypes.byref(timeout), self._add_poll, None)
        poller = select.poll()
        for fd, events in self._polled:
            poller.register(fd, events)
        try:
            self._revents = dict(poller.poll(None if timeout.value == NO_TIMEOUT
                                             else timeout.value))
            error = 0
        except InterruptedError:
            self._revents, error = {}, 1
        catch_up()
        lib.slirp_pollfds_poll(slirp, error, self._get_revents, None)
        if self._revents.get(net):
            self._input_guest_frames()

    def _add_poll_fd(self, fd: int, events: int, opaque) -> int:
        """slirp_pollfds_fill's callback: remember the fd; its index names it later."""
        mask = 0
        for slirp_bit, poll_bit in _TO_POLL:
            if events & slirp_bit:
                mask |= poll_bit
        self._polled.append((fd, mask))
        return len(self._polled) - 1

    def _revents_of(self, index: int, opaque) -> int:
        if not 0 <= index < len(self._polled):
            return 0
        revents = self._revents.get(self._polled[index][0], 0)
        result = 0
        for slirp_bit, poll_bit in _FROM_POLL:
            if revents & poll_bit:
                result |= slirp_bit
        return result

    def _input_guest_frames(self) -> None:
        """Hand what the device sent to libslirp, without its header."""
        for _ in range(FRAMES_PER_WAKEUP):
            try:
                length = self._net.recv_into(self._frame)
            except BlockingIOError:
                return
            if length > HDR_LEN:
                self._lib.slirp_input(self._slirp, self._frame_address + HDR_LEN,
                                      length - HDR_LEN)

    # --- callbacks from libslirp, all on the owner thread --------------------------------
    def _send_packet(self, buffer: int, length: int, opaque) -> int:
        frame = (ctypes.c_char * length).from_address(buffer)
        try:
            self._net.sendmsg([self._header, frame])
        except OSError:                 # the device is not taking frames: a lost frame
            self.dropped += 1
        return length

    def _guest_error(self, message: bytes, opaque) -> None:
        self._warn(message.decode(errors="replace"))

    def _timer_new(self, callback: int, callback_opaque: int, opaque) -> int:
        return self._timers.new(TimerCallback(callback), callback_opaque)

    def _timer_free(self, handle: int, opaque) -> None:
        self._timers.free(handle)

    def _timer_mod(self, handle: int, expires_ms: int, opaque) -> None:
        self._timers.modify(handle, expires_ms)
