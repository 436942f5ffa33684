"""The byte stream an RFB session runs on: a plain socket, or WebSocket
(RFC 6455) binary frames on the same port, so that noVNC in a browser
connects directly.

An RFB client waits for the server to speak first, a WebSocket client
sends its HTTP upgrade request first; so a connection that starts with
"GET " within a moment is WebSocket, and any other is RFB.

Threading: a stream belongs to its client's thread.  Failure modes: a peer
that closes, or sends what the protocol does not allow, raises
ConnectionError; the caller ends the session.
"""

import base64
import hashlib
import select
import socket
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SNIFF_SECONDS = 0.3
MAX_HEADER = 8192
MAX_FRAME = 1 << 20         # clients send small messages; more is not RFB


class SocketStream:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> bool:
        """Bytes already received and not yet read (select() would not say)."""
        return bool(self._buffer)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the client closed the connection")
        self._buffer += data

    def recv_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._fill()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class WebSocketStream(SocketStream):
    """RFB inside WebSocket binary frames; the handshake is done by open()."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock)
        self._raw = bytearray()          # undecoded frame bytes

    def open(self) -> None:
        request = bytearray()
        while b"\r\n\r\n" not in request:
            data = self.sock.recv(4096)
            if not data or len(request) > MAX_HEADER:
                raise ConnectionError("bad WebSocket handshake")
            request += data
        head, _, rest = bytes(request).partition(b"\r\n\r\n")
        self._raw += rest
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get(b"sec-websocket-key")
        if key is None or b"websocket" not in headers.get(b"upgrade", b"").lower():
            self.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            raise ConnectionError("not a WebSocket upgrade request")
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        reply = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
                 b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + accept]
        protocols = [p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b",")]
        if b"binary" in protocols:
            reply.append(b"Sec-WebSocket-Protocol: binary")
        self.sock.sendall(b"\r\n".join(reply) + b"\r\n\r\n")

    def _raw_exact(self, count: int) -> bytes:
        while len(self._raw) < count:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the client closed the connection")
            self._raw += data
        data = bytes(self._raw[:count])
        del self._raw[:count]
        return data

    def _fill(self) -> None:
        """Read one frame; data frames add to the buffer, pings are answered."""
        first, second = self._raw_exact(2)
        opcode, length = first & 0x0F, second & 0x7F
        if length == 126:
            length = struct.unpack(">H", self._raw_exact(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self._raw_exact(8))[0]
        if length > MAX_FRAME or not second & 0x80:
            raise ConnectionError("WebSocket frame too large or not masked")
        mask = self._raw_exact(4)
        payload = bytes(b ^ mask[i & 3] for i, b in enumerate(self._raw_exact(length)))
        if opcode == 8:
            raise ConnectionError("the client closed the WebSocket")
        if opcode == 9:
            self._frame(0xA, payload)
        elif opcode in (0, 1, 2):
            self._buffer += payload

    def _frame(self, opcode: int, payload: bytes) -> None:
        length = len(payload)
        if length < 126:
            head = struct.pack(">BB", 0x80 | opcode, length)
        elif length < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 126, length)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, length)
        self.sock.sendall(head + payload)

    def pending(self) -> bool:
        return bool(self._buffer) or bool(self._raw)

    def send(self, data: bytes) -> None:
        self._frame(0x2, data)


def accept_stream(sock: socket.socket) -> SocketStream:
    """The stream for a fresh connection: WebSocket if it opens with "GET "."""
    readable, _, _ = select.select([sock], [], [], SNIFF_SECONDS)
    if readable:
        try:
            start = sock.recv(4, socket.MSG_PEEK)
        except OSError:
            start = b""
        if start == b"GET ":
            stream = WebSocketStream(sock)
            stream.open()
            return stream
    return SocketStream(sock)
