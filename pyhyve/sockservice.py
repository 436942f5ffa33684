"""A VM's socket services: one private AF_UNIX stream listener, many clients,
one thread.

The control socket (ctl.py) and QMP (qmp.py) differ only in what travels
over a connection; this is what they share:

- the socket: a fresh 0600 socket in a 0700 directory, a stale one (left by
  a pyhyve that died) replaced, one that a live process answers on refused,
  the file removed at close if it is still ours;
- who may connect: the peer's uid (SO_PEERCRED) must be root's or our own;
- how many: MAX_CLIENTS at once; when all are taken, the connection idle
  longest makes room, so the operator always gets in;
- idle connections: closed after IDLE_TIMEOUT without a request, unless the
  protocol says a client may wait (a QMP client listening for events);
- output: buffered per client and sent as the socket takes it; a client that
  leaves more than MAX_PENDING_OUTPUT unread is dropped;
- other threads hand work to the service's thread with post() (QMP's
  events come from vCPU threads).

A service subclass supplies the protocol: connected() (a greeting),
received() (the bytes a client sent), refusal() (the message that tells a
client why it is being closed).
"""

import errno
import functools
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from .config import ConfigError
from .log import getLogger
from .sandbox import catch_up, remove_at_exit

MAX_LINE = 64 * 1024            # longer requests close the connection
MAX_CLIENTS = 32                # when all are taken, the longest idle makes room
IDLE_TIMEOUT = 60.0             # seconds a connection may sit without a whole request
MAX_PENDING_OUTPUT = 1 << 20    # answers (and events) a client does not read
CLOSE_TIMEOUT = 5.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def is_listening(path: str) -> bool:
    """Whether a server answers on PATH; False for a missing or stale socket."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:            # a full backlog: alive but busy
        return True
    finally:
        probe.close()


def encode(message) -> bytes:
    """One JSON message and its newline."""
    import json     # here, not at start-up: pyhyve.deferred
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes):
    """encode undone: the JSON value of one line; ValueError (or
    RecursionError) where it is not JSON."""
    import json
    return json.loads(line)


class Client:
    """One connection: its unsent output and, for the protocol, `input` (bytes
    not yet understood) and `session` (whatever the protocol keeps)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.input = bytearray()
        self.output = bytearray()
        self.events = selectors.EVENT_READ
        self.last_request = time.monotonic()
        self.may_idle = False       # exempt from IDLE_TIMEOUT (still evicted for room)
        self.session = None


class SocketService:
    """Serves one socket of a VM on a daemon thread named `thread_name`."""

    label = "control"           # how messages name the socket
    thread_name = "ctl"

    def __init__(self, vm, path: str):
        self.vm = vm
        self.path = path
        self.log = getLogger(f"pyhyve.{vm.name}.{self.thread_name}")
        self._listener = self._listen()
        self._inode = os.stat(self.path).st_ino
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._posted: deque[Callable[[], None]] = deque()
        self._clients: dict[socket.socket, Client] = {}
        self._closing = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, self._woken)
        self._thread = threading.Thread(target=self._serve, name=self.thread_name, daemon=True)
        self._thread.start()

    # --- what a protocol supplies ------------------------------------------------------
    def connected(self, client: Client) -> None:
        """A client was let in (a protocol greets it here)."""

    def received(self, client: Client, data: bytes) -> None:
        """Bytes from CLIENT; the protocol answers with send()."""
        raise NotImplementedError

    def refusal(self, message: str):
        """The message (a JSON value) that tells a client why it is closed."""
        raise NotImplementedError

    def already_running(self) -> ConfigError:
        return ConfigError(f"{self.label} socket {self.path} is in use by another process")

    # --- what a protocol may call --------------------------------------------------------
    def send(self, client: Client, message) -> None:
        """Queue MESSAGE (a JSON value) for CLIENT; on the service's thread only."""
        if client.sock in self._clients:
            client.output += encode(message)
            self._flush(client)

    def refuse(self, client: Client, message: str) -> None:
        """Tell CLIENT why, then close it (what it sent next cannot be parsed)."""
        self.send(client, self.refusal(message))
        self.drop(client)

    def refuse_long_request(self, client: Client) -> None:
        self.refuse(client, f"request longer than {MAX_LINE} bytes")

    def connected_clients(self) -> list[Client]:
        return list(self._clients.values())

    def is_connected(self, client: Client) -> bool:
        return client.sock in self._clients

    def post(self, function: Callable[[], None]) -> None:
        """Run FUNCTION on the service's thread soon; from any thread, never blocks."""
        self._posted.append(function)
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, InterruptedError):    # a wake-up is pending already
            pass
        except OSError:                                 # closed: close() runs what is left
            pass

    # --- the socket ------------------------------------------------------------------
    def _listen(self) -> socket.socket:
        """Bind a fresh 0600 socket in a 0700 directory, replacing a stale one."""
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.label} socket directory {directory}: "
                              f"{exc.strerror}") from None
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            umask = os.umask(0o177)     # no window in which others may connect
            try:
                sock.bind(self.path)
            finally:
                os.umask(umask)
            bound = True
            os.chmod(self.path, 0o600)
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
            remove_at_exit(self.path)
        except OSError as exc:
            sock.close()
            if bound:
                os.unlink(self.path)
            if exc.errno == errno.EADDRINUSE:     # another pyhyve won the race
                raise self.already_running() from None
            raise ConfigError(f"cannot create {self.label} socket {self.path}: "
                              f"{exc.strerror or exc}") from None
        return sock

    def _remove_stale_socket(self) -> None:
        """A socket file nobody answers on was left by a pyhyve that died."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(f"cannot create {self.label} socket {self.path}: "
                              f"{exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"cannot create {self.label} socket {self.path}: "
                              "a file that is not a socket is in the way")
        try:
            listening = is_listening(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot check {self.label} socket {self.path}: "
                              f"{exc.strerror or exc}") from None
        if listening:
            raise self.already_running()
        os.unlink(self.path)

    def close(self) -> None:
        """Run what was posted, send what is queued, drop every client, remove
        the socket file and join the thread."""
        if self._closing:
            return
        self._closing = True
        try:
            self._wake_writer.send(b"\0")    # the thread may have seen _closing already
        except OSError:
            pass
        self._thread.join(CLOSE_TIMEOUT)
        if self._thread.is_alive():
            self.log.warning("%s thread still busy after %.0f s", self.label, CLOSE_TIMEOUT)
        self._wake_writer.close()
        self._wake_reader.close()       # here, not by the thread: the send above needs it
        try:
            if os.stat(self.path).st_ino == self._inode:   # still ours
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except PermissionError:     # dropped to -o process.user: the next start removes it
            self.log.info("%s socket %s left behind", self.label, self.path)

    # --- the event loop ----------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._closing:
                self._drop_stale()
                for key, events in self._selector.select(IDLE_TIMEOUT / 4):
                    catch_up()
                    try:
                        key.data(events)
                    except Exception:       # a bug here must not end the service
                        self.log.exception("%s socket event failed", self.label)
                        if key.fileobj in self._clients:
                            self.drop(self._clients[key.fileobj])
        finally:
            self._run_posted()          # the last events (a SHUTDOWN) still go out
            for client in list(self._clients.values()):
                if client.output:
                    self._flush(client)
                self.drop(client)
            self._selector.close()
            self._listener.close()

    def _woken(self, events) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self._run_posted()

    def _run_posted(self) -> None:
        while self._posted:
            function = self._posted.popleft()
            try:
                function()
            except Exception:
                self.log.exception("%s socket: posted work failed", self.label)

    def _accept(self, events) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.vm.warn_once((self.thread_name, exc.errno), "%s socket accept failed: %s",
                              self.label, exc)
            return
        sock.setblocking(False)
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in (0, os.geteuid()):
            self.log.warning("refused a %s connection from uid %d (pid %d)", self.label,
                             uid, pid)
            try:
                sock.send(encode(self.refusal("permission denied")))
            except OSError:
                pass
            sock.close()
            return
        if len(self._clients) >= MAX_CLIENTS:       # room for the operator, always
            idlest = min(self._clients.values(), key=lambda client: client.last_request)
            self._drop_idle(idlest, "room needed for a new one")
        client = Client(sock)
        self._clients[sock] = client
        self._selector.register(sock, client.events, functools.partial(self._service, client))
        self.connected(client)

    def _drop_idle(self, client: Client, why: str) -> None:
        self.vm.warn_once((f"{self.thread_name}-idle", why),
                          "closed an idle %s connection: %s", self.label, why)
        self.refuse(client, f"connection closed: {why}")

    def _drop_stale(self) -> None:
        deadline = time.monotonic() - IDLE_TIMEOUT
        for client in [c for c in self._clients.values()
                       if c.last_request < deadline and not c.may_idle]:
            self._drop_idle(client, f"no request for {IDLE_TIMEOUT:g} s")

    def _service(self, client: Client, events) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush(client)
        if events & selectors.EVENT_READ and client.sock in self._clients:
            self._receive(client)

    def _receive(self, client: Client) -> None:
        try:
            data = client.sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        self.received(client, data)

    def _flush(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.output)
            del client.output[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.drop(client)
            return
        if len(client.output) > MAX_PENDING_OUTPUT:
            self.drop(client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.output else 0)
        if events != client.events and not self._closing:
            client.events = events
            self._selector.modify(client.sock, events, functools.partial(self._service, client))

    def drop(self, client: Client) -> None:
        if self._clients.pop(client.sock, None) is not None:
            self._selector.unregister(client.sock)
            client.sock.close()
