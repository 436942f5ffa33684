"""A live migration's connection: both ends prove they hold the shared key,
then every message carries a MAC.

A migration stream carries guest memory one way and decides what the
destination runs, so neither end acts on anything from a peer that has not
shown it holds the key both operators named (`-o migration.key=PATH`).
The handshake is an HMAC-SHA256 challenge-response each way:

    destination -> source   MAGIC, nonce_d (32 random bytes)
    source -> destination   MAGIC, nonce_s, HMAC(key, "source" nonce_d nonce_s)
    destination -> source   HMAC(key, "destination" nonce_s nonce_d)

Each side checks the other's proof (hmac.compare_digest) before it reads
anything more; fresh nonces on both sides keep a recorded exchange from
being replayed.  Then each direction has a key of its own, HMAC(key, label
nonce_d nonce_s), and a message is

    kind (1 byte), length (4 bytes, little endian), payload,
    HMAC(direction key, sequence number (8 bytes), kind, length, payload)

so a message altered, dropped, replayed or sent back the other way fails
its MAC, and the receiver drops the connection (MigrationError) before it
uses the payload.  What this does not give is secrecy: guest memory travels
in the clear, as QEMU's plain tcp: migration sends it; across a network
that others can read, carry the connection through an encrypted tunnel.

Threading: one Channel is used by one thread at a time.
"""

import hashlib
import hmac
import os
import socket
import stat
import struct

from .config import ConfigError

MAGIC = b"PYHYVE-MIGRATION 1\n"
DEFAULT_PORT = 24983            # where pyhyvectl --migrate=HOST goes without a PORT
NONCE = 32
DIGEST = hashlib.sha256().digest_size
MIN_KEY = 16
MAX_KEY = 4096
MAX_MESSAGE = 64 << 20          # a batch of pages or the machine's state
_HEADER = struct.Struct("<BI")  # kind, payload length
_SEQUENCE = struct.Struct("<Q")

# Message kinds
HELLO = 1          # source: the machine it migrates (JSON)
ACCEPT = 2         # destination: the machine fits, send memory
PAGES = 3          # source: runs of pages and their data
ZEROS = 4          # source: runs of pages that now read as zero
STATE = 5          # source, paused: vCPUs, chips and devices (snapshot.machine_state)
RUNNING = 6        # destination: the guest runs here; the source may go
FAILED = 7         # either: why it gave up (UTF-8 text)
KIND_NAMES = {HELLO: "hello", ACCEPT: "accept", PAGES: "pages", ZEROS: "zeros",
              STATE: "state", RUNNING: "running", FAILED: "failed"}


class MigrationError(Exception):
    """The migration cannot go on; the message says why, fit for a user."""


class PeerRefused(MigrationError):
    """The peer did not prove it holds the key (or spoke another protocol)."""


def read_key(path: str) -> bytes:
    """The shared secret in PATH (its bytes as they are).  ConfigError for a
    file that is missing, too short or long, or that others may read: a
    key anyone can read authenticates anyone."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read(MAX_KEY + 1)
    except OSError as exc:
        raise ConfigError(f"migration.key: cannot read {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"migration.key: {path} may be read by others (chmod 600 it)")
    if not MIN_KEY <= len(key) <= MAX_KEY:
        raise ConfigError(f"migration.key: {path} must hold {MIN_KEY} to {MAX_KEY} bytes "
                          "(e.g. head -c 32 /dev/urandom)")
    return key


def _mac(key: bytes, *parts) -> bytes:
    digest = hmac.new(key, digestmod="sha256")
    for part in parts:
        digest.update(part)
    return digest.digest()


class Channel:
    """An authenticated connection (source() or destination() make one)."""

    def __init__(self, sock: socket.socket, send_key: bytes, receive_key: bytes):
        self.sock = sock
        self._send_key, self._receive_key = send_key, receive_key
        self._sent = self._received = 0
        self.bytes_sent = 0

    @classmethod
    def source(cls, sock: socket.socket, key: bytes) -> "Channel":
        their_nonce = _receive_hello(sock)
        nonce = os.urandom(NONCE)
        sock.sendall(MAGIC + nonce + _mac(key, b"source", their_nonce, nonce))
        try:
            proof = _receive_exactly(sock, DIGEST)
        except ConnectionError:
            raise PeerRefused("the destination refused the handshake (not the same "
                              "migration key?)") from None
        if not hmac.compare_digest(proof, _mac(key, b"destination", nonce, their_nonce)):
            raise PeerRefused("the destination did not prove it holds the migration key")
        return cls(sock, _mac(key, b"source to destination", their_nonce, nonce),
                   _mac(key, b"destination to source", their_nonce, nonce))

    @classmethod
    def destination(cls, sock: socket.socket, key: bytes) -> "Channel":
        nonce = os.urandom(NONCE)
        sock.sendall(MAGIC + nonce)
        their_nonce = _receive_hello(sock)
        proof = _receive_exactly(sock, DIGEST)
        if not hmac.compare_digest(proof, _mac(key, b"source", nonce, their_nonce)):
            raise PeerRefused("the source did not prove it holds the migration key")
        sock.sendall(_mac(key, b"destination", their_nonce, nonce))
        return cls(sock, _mac(key, b"destination to source", nonce, their_nonce),
                   _mac(key, b"source to destination", nonce, their_nonce))

    def send(self, kind: int, *parts) -> None:
        """One message whose payload is PARTS (bytes-like) joined; they must not
        change until this returns (its MAC covers them)."""
        length = sum(len(part) for part in parts)
        if length > MAX_MESSAGE:
            raise MigrationError(f"a {KIND_NAMES[kind]} message of {length} bytes is too long")
        header = _HEADER.pack(kind, length)
        mac = _mac(self._send_key, _SEQUENCE.pack(self._sent), header, *parts)
        self._sent += 1
        try:
            for piece in (header, *parts, mac):
                self.sock.sendall(piece)
        except OSError as exc:
            raise MigrationError(f"lost the connection: {exc.strerror or exc}") from None
        self.bytes_sent += len(header) + length + len(mac)

    def receive(self) -> tuple[int, bytes]:
        """The next message (kind, payload), its MAC checked."""
        try:
            header = _receive_exactly(self.sock, _HEADER.size)
            kind, length = _HEADER.unpack(header)
            if kind not in KIND_NAMES or length > MAX_MESSAGE:
                raise MigrationError(f"the peer sent a malformed message (kind {kind}, "
                                     f"{length} bytes)")
            payload = _receive_exactly(self.sock, length)
            mac = _receive_exactly(self.sock, DIGEST)
        except OSError as exc:
            raise MigrationError(f"lost the connection: {exc.strerror or exc}") from None
        expected = _mac(self._receive_key, _SEQUENCE.pack(self._received), header, payload)
        if not hmac.compare_digest(mac, expected):
            raise MigrationError("a message failed its authentication check")
        self._received += 1
        return kind, payload

    def close(self) -> None:
        self.sock.close()


def _receive_hello(sock: socket.socket) -> bytes:
    try:
        greeting = _receive_exactly(sock, len(MAGIC) + NONCE)
    except ConnectionError:
        raise PeerRefused("the peer closed the connection during the handshake "
                          "(a wrong migration key?)") from None
    if greeting[:len(MAGIC)] != MAGIC:
        raise PeerRefused("the peer does not speak pyhyve's migration protocol")
    return greeting[len(MAGIC):]


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    """COUNT bytes; ConnectionError if the peer closes first."""
    buffer = bytearray(count)
    view = memoryview(buffer)
    done = 0
    while done < count:
        got = sock.recv_into(view[done:])
        if not got:
            raise ConnectionError("the peer closed the connection")
        done += got
    return bytes(buffer)
