"""A VNC server (RFB 3.8, RFC 6143; 3.3 and 3.7 clients too) for one display.

Each client gets a thread of its own ("vnc-client"), which reads the
client's messages and, while the client has asked for an update, looks at
the display about 30 times a second and sends what changed: CopyRect for
moved bands, then ZRLE, zlib or Raw rectangles, whichever the client lists
first.  A client that lists DesktopSize learns of mode changes.  Keys and
pointer moves go to the VM's input router.  An accept thread takes
connections, plain or WebSocket (stream.py).  No vCPU thread ever waits on
a client: a slow client only delays itself.

Threads started before the process is confined (the accept thread, a
session that `wait` let in) confine themselves when they next wake
(sandbox.catch_up).

Security: None, or VNC Authentication when a password is configured (DES
challenge, des.py).  A wrong password closes the connection after the
failure message.  Nothing a client sends reaches beyond its own session,
the screen it may look at and the keys and pointer it may use.
"""

import errno
import hmac
import os
import select
import socket
import struct
import threading
import time

from ..config import ConfigError
from ..devices.chardev import check_stale_socket
from ..inputroute import POINTER_MAX
from ..sandbox import catch_up, remove_at_exit
from . import encodings as E
from ..log import getLogger
from .des import vnc_response
from .keysyms import key_code
from .stream import accept_stream

log = getLogger(__name__)

VERSION = b"RFB 003.008\n"
SECURITY_NONE, SECURITY_VNC = 1, 2
FRAME_INTERVAL = 1 / 30
MAX_CUT_TEXT = 1 << 20
SET_PIXEL_FORMAT, SET_ENCODINGS, UPDATE_REQUEST, KEY_EVENT, POINTER_EVENT, CUT_TEXT = \
    0, 2, 3, 4, 5, 6


class ProtocolError(ConnectionError):
    """A client broke the protocol; its session ends."""


def parse_tcp(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 hosts in brackets) -> (host, port), as bhyve's tcp= takes it."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"fbuf: tcp={text}: expected IP:PORT")
    return host, int(port)


class VncServer:
    """Listens where the operator said and serves every client that connects."""

    def __init__(self, screen, input_router, listen: tuple[str, str], password: str | None,
                 name: str, warn_once):
        self.screen = screen
        self.input = input_router
        self.password = password
        self.name = name.encode()
        self.warn_once = warn_once
        self._closing = False
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        self.first_client = threading.Event()
        kind, where = listen
        try:
            if kind == "unix":
                self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    self.listener.bind(where)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    check_stale_socket(exc, where)     # a dead pyhyve's socket is reused
                    os.unlink(where)
                    self.listener.bind(where)
                remove_at_exit(where)
            else:
                host, port = parse_tcp(where)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self.listener = socket.socket(family, socket.SOCK_STREAM)
                self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.listener.bind((host, port))
            self.listener.listen(4)
        except OSError as exc:
            raise ConfigError(f"fbuf: cannot listen on {where}: "
                              f"{exc.strerror or exc}") from None
        self.address = self.listener.getsockname()
        self._thread = threading.Thread(target=self._accept_loop, name="vnc-accept",
                                        daemon=True)
        self._thread.start()

    def wait_for_client(self) -> None:
        """bhyve's wait: return once a client completed its handshake."""
        log.warning("waiting for a VNC client on %s", self.address)
        while not self.first_client.wait(0.5):
            if self._closing:
                return

    def close(self) -> None:
        self._closing = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for sock in self._clients:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            catch_up()                  # confined before it serves, and its clients with it
            with self._lock:
                self._clients.append(sock)
            threading.Thread(target=self._serve, args=(sock,), name="vnc-client",
                             daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = Session(self, accept_stream(sock))
            session.run()
        except (OSError, ConnectionError) as exc:
            log.info("VNC client gone: %s", exc)
        except Exception:           # a server bug ends this session, never the VM
            log.exception("VNC session failed")
        finally:
            with self._lock:
                if sock in self._clients:
                    self._clients.remove(sock)
            sock.close()


class Session:
    """One client: handshake, then messages and updates (see the module docstring)."""

    def __init__(self, server: VncServer, stream):
        self.server = server
        self.stream = stream
        self.encoder = E.Encoder()
        self.encodings: list[int] = [E.RAW]
        self.request: tuple | None = None       # (incremental, x, y, w, h) outstanding
        self.serial = -1                        # the frame the client has
        self.size = (0, 0)                      # the size the client knows
        self.buttons = 0

    # --- handshake ---------------------------------------------------------------------------
    def run(self) -> None:
        version = self._handshake()
        if not self._authenticate(version):
            return
        self.stream.recv_exact(1)               # ClientInit's shared flag: all share
        update = self.server.screen.refresh()
        self.size = (update.width, update.height)
        self.stream.send(struct.pack(">HH", *self.size) + self.encoder.format.pack() +
                         struct.pack(">I", len(self.server.name)) + self.server.name)
        self.server.first_client.set()
        self._loop()

    def _handshake(self) -> tuple[int, int]:
        self.stream.send(VERSION)
        text = self.stream.recv_exact(12)
        if text[:4] != b"RFB " or text[7:8] != b"." or text[11:12] != b"\n" or \
                not text[4:7].isdigit() or not text[8:11].isdigit():
            raise ProtocolError(f"not an RFB client ({text!r})")
        major, minor = int(text[4:7]), int(text[8:11])
        if major != 3 or minor < 3:
            raise ProtocolError(f"RFB {major}.{minor} is not supported")
        return major, 8 if minor >= 8 else (7 if minor == 7 else 3)

    def _authenticate(self, version: tuple[int, int]) -> bool:
        wanted = SECURITY_VNC if self.server.password is not None else SECURITY_NONE
        if version[1] == 3:
            self.stream.send(struct.pack(">I", wanted))
        else:
            self.stream.send(bytes((1, wanted)))
            chosen = self.stream.recv_exact(1)[0]
            if chosen != wanted:
                self._fail(version, "security type not offered")
                return False
        if wanted == SECURITY_NONE:
            if version[1] == 8:
                self.stream.send(struct.pack(">I", 0))
            return True
        challenge = os.urandom(16)
        self.stream.send(challenge)
        answer = self.stream.recv_exact(16)
        if not hmac.compare_digest(answer, vnc_response(self.server.password, challenge)):
            log.warning("VNC client gave a wrong password")
            self._fail(version, "authentication failed")
            return False
        self.stream.send(struct.pack(">I", 0))
        return True

    def _fail(self, version: tuple[int, int], reason: str) -> None:
        message = struct.pack(">I", 1)
        if version[1] == 8:
            message += struct.pack(">I", len(reason)) + reason.encode()
        self.stream.send(message)

    # --- the session -----------------------------------------------------------------------
    def _loop(self) -> None:
        stream = self.stream
        next_frame = time.monotonic()
        while not self.server._closing:
            catch_up()                  # a session begun before confinement (wait) confines now
            timeout = max(0.0, next_frame - time.monotonic()) if self.request else 1.0
            if stream.pending() or select.select([stream], [], [], timeout)[0]:
                self._message()
                continue
            if self.request is not None:
                next_frame = time.monotonic() + FRAME_INTERVAL
                self._send_update()

    def _message(self) -> None:
        kind = self.stream.recv_exact(1)[0]
        if kind == SET_PIXEL_FORMAT:
            pixel_format = E.PixelFormat.unpack(self.stream.recv_exact(19)[3:])
            problem = pixel_format.problem()
            if problem:
                raise ProtocolError(f"client pixel format: {problem}")
            self.encoder.format = pixel_format
        elif kind == SET_ENCODINGS:
            count = struct.unpack(">xH", self.stream.recv_exact(3))[0]
            self.encodings = list(struct.unpack(f">{count}i", self.stream.recv_exact(4 * count)))
        elif kind == UPDATE_REQUEST:
            incremental, x, y, w, h = struct.unpack(">BHHHH", self.stream.recv_exact(9))
            if not incremental:
                self.serial = -1                # send everything
            if self.request is None or not incremental:
                self.request = (bool(incremental), x, y, w, h)
        elif kind == KEY_EVENT:
            down, keysym = struct.unpack(">Bxxi", self.stream.recv_exact(7))
            code = key_code(keysym & 0xFFFFFFFF)
            if code is None:
                self.server.warn_once(f"vnc-keysym-{keysym:#x}", "VNC: no key for keysym %#x",
                                      keysym & 0xFFFFFFFF)
            elif not self.server.input.key(code, bool(down)):
                self.server.warn_once("vnc-no-keyboard", "VNC: the VM has no keyboard")
        elif kind == POINTER_EVENT:
            buttons, x, y = struct.unpack(">BHH", self.stream.recv_exact(5))
            width, height = self.size
            # scaled by the size, not the size - 1, as QEMU 7.2's server does
            # (seen by Linux's usbhid beside it: 700 of 1280 is 17919)
            self.server.input.pointer(x * POINTER_MAX // max(width, 1),
                                      y * POINTER_MAX // max(height, 1), buttons)
        elif kind == CUT_TEXT:
            length = abs(struct.unpack(">xxxi", self.stream.recv_exact(7))[0])
            if length > MAX_CUT_TEXT:
                raise ProtocolError(f"cut text of {length} bytes")
            self.stream.recv_exact(length)      # the guest has no clipboard to take it
        else:
            raise ProtocolError(f"unknown client message {kind}")

    # --- updates --------------------------------------------------------------------------------
    def _send_update(self) -> None:
        screen = self.server.screen
        update = screen.refresh()
        if update.serial == self.serial:
            return
        rects: list[bytes] = []
        resized = (update.width, update.height) != self.size
        if resized and E.DESKTOP_SIZE in self.encodings:
            rects.append(E.rect_header(0, 0, update.width, update.height, E.DESKTOP_SIZE))
            self.size = (update.width, update.height)
        changes = None if self.serial < 0 or resized else screen.changes_since(self.serial)
        width, height = min(update.width, self.size[0]), min(update.height, self.size[1])
        if changes is None:
            changes = ([], [(0, 0, width, height)])
        copies, areas = changes
        if E.COPYRECT in self.encodings:
            rects += [self.encoder.copy(0, src, 0, dst, width, h) for src, dst, h in copies]
        else:
            areas = [(0, dst, width, h) for _, dst, h in copies] + areas
        encode = self._encoding()
        for x, y, w, h in areas:
            w, h = min(w, width - x), min(h, height - y)
            if w > 0 and h > 0:
                rects.append(encode(update.pixels, update.width, x, y, w, h))
        self.serial = update.serial
        if not rects:
            return
        self.request = None
        self.stream.send(struct.pack(">BxH", 0, len(rects)) + b"".join(rects))

    def _encoding(self):
        for encoding in self.encodings:
            if encoding == E.ZRLE:
                return self.encoder.zrle
            if encoding == E.ZLIB:
                return self.encoder.zlib
            if encoding == E.RAW:
                break
        return self.encoder.raw
