"""Host ends of a serial port, from bhyve's `-l com1,SPEC`.

SPEC is one of
    stdio           the terminal pyhyve runs in, in raw mode until the backend
                    closes or the process exits (as in bhyve, Ctrl-C goes to
                    the guest; the escape of pyhyve.escape, `~.` at the start
                    of a line, powers the VM off once set_escape() armed it)
    pty[,link=PATH] a pseudo-terminal pair in raw mode, for `cu -l`, screen or
                    pyhyvectl --console to attach to (bhyve's nmdm devices);
                    `path` names its slave, and link=PATH makes a symbolic link
                    to it there (refused if PATH exists; removed on close)
    file=PATH       guest output appended to PATH; no input
    unix=PATH       a listening AF_UNIX stream socket
    tcp=HOST:PORT   a listening TCP socket (port 0 picks a free one)

A socket backend serves one client at a time, and a new connection replaces
the current one, which is closed: a client that hung or vanished without
closing can never lock the user out of the console.  The socket carries raw
bytes (use `nc` or `socat`, not telnet).

Guest output must never stall a vCPU for long, and is never queued in pyhyve:
what the host end does not take is dropped and counted in `dropped`, as a
real UART's bits are lost on a line nobody reads, and the first loss is logged.
A socket backend sends without blocking, so output with no client connected,
or beyond what the kernel's socket buffer holds, is dropped at once.  A pty
does not wait either: its kernel buffer (some 64 KiB) holds output for the
next reader, and what does not fit is dropped at once.  stdio and
file writes wait up to STALL_LIMIT for a reader that is merely slow (a pipe to
`tee`), then drop output at once until the reader takes some again (bhyve's
stdout is non-blocking and drops what does not fit); a regular file is always
writable, so a log keeps every byte.

Input is read by one daemon thread per backend, started by attach(), which
waits on the backend's descriptors with a selector and is woken through an
eventfd when close() asks it to exit.  The same thread tells an attached
`on_connection(connected)` when a socket backend's client comes or goes, for
devices whose protocol carries the host end's state (virtio-console ports);
stdio, pty and file backends are always connected.

A pty keeps its own slave descriptor open, so that the master never sees the
hang-up of the last close: a client detaching (cu's `~.`) and another
attaching later reach the same console.
"""

import atexit
import errno
import os
import select
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable

from .. import escape as escapes
from ..config import ConfigError
from ..log import getLogger
from ..sandbox import catch_up, remove_at_exit

log = getLogger(__name__)

READ_SIZE = 4096
STALL_LIMIT = 0.2      # seconds one write may wait for a slow reader
JOIN_TIMEOUT = 5.0
SPECS = "stdio, pty[,link=PATH], file=PATH, unix=PATH or tcp=HOST:PORT"
FILE_LIMIT = 128 << 20 # bytes a console file may grow to (-o console.file_limit)


def open_backend(spec: str, name: str = "console", file_limit: int = FILE_LIMIT) -> "Backend":
    """The backend `spec` describes; `name` (e.g. "com1") prefixes error messages
    and names the I/O thread."""
    if spec == "stdio":
        return StdioBackend(name)
    if spec == "pty" or spec.startswith("pty,"):
        return PtyBackend(name, **_pty_options(spec, name))
    kind, sep, arg = spec.partition("=")
    if sep and arg:
        if kind == "file":
            return FileBackend(name, arg, file_limit)
        if kind == "unix":
            return UnixBackend(name, arg)
        if kind == "tcp":
            return TcpBackend(name, arg)
    raise ConfigError(f"{name}: unknown backend '{spec}': expected {SPECS}")


def _pty_options(spec: str, name: str) -> dict[str, str]:
    options = {}
    for item in spec.split(",")[1:]:
        key, sep, value = item.partition("=")
        if key != "link" or not sep or not value or key in options:
            raise ConfigError(f"{name}: {spec}: expected pty or pty,link=PATH")
        options[key] = value
    return options


class Backend:
    """Where a serial port's output goes and its input comes from."""

    kind = "custom"             # what describe() reports: stdio, pty, file, unix, tcp...
    stall_limit = STALL_LIMIT   # seconds _write_or_drop waits for room

    def __init__(self, name: str):
        self.name = name
        self.dropped = 0                # guest output bytes that could not be delivered
        self._callback: Callable[[bytes], None] | None = None
        self._on_connection: Callable[[bool], None] | None = None
        self._failed = False            # a write error was reported once already
        self._lagging = False           # the reader did not take the last output
        self._lag_reported = False
        self._output_ready: select.poll | None = None   # POLLOUT on the output fd

    @property
    def connected(self) -> bool:
        """Whether someone is at the host end to take output."""
        return True

    def attach(self, callback: Callable[[bytes], None] | None,
               on_connection: Callable[[bool], None] | None = None) -> None:
        """Hand host input to `callback(data)` and changes of `connected` to
        `on_connection(connected)` from now on; None stops them."""
        self._callback = callback
        self._on_connection = on_connection

    def describe(self) -> dict:
        """What a client needs to find this console: {"kind": ...} and, for
        those one can attach to, "path" (pty, unix), "link" or "address"."""
        return {"kind": self.kind}

    def _watch_output(self, fd: int) -> None:
        """Poll `fd` for room before each write (see _write_or_drop)."""
        self._output_ready = select.poll()
        self._output_ready.register(fd, select.POLLOUT)

    def _write_or_drop(self, fd: int, data: bytes, where: str) -> None:
        """Write what `fd` takes, in chunks of PIPE_BUF (which a pipe that polls
        writable takes at once); wait at most STALL_LIMIT for room, and not at
        all while the reader is lagging.  The rest is dropped and counted;
        problems are said once.  Callers serialise: a poll object has one user
        at a time."""
        view = memoryview(data)
        wait_until = time.monotonic() + (0.0 if self._lagging else self.stall_limit)
        try:
            while view:
                timeout_ms = max(0.0, wait_until - time.monotonic()) * 1000
                if not self._output_ready.poll(timeout_ms):
                    break
                try:
                    view = view[os.write(fd, view[:select.PIPE_BUF]):]
                except BlockingIOError:     # a pty may poll writable and still be full
                    break
        except OSError as exc:
            self.dropped += len(view)
            if not self._failed:
                self._failed = True
                log.warning("%s: writing to %s failed (%s); output is dropped",
                            self.name, where, _reason(exc))
            return
        self._lagging = bool(view)
        if view:
            self.dropped += len(view)
            self._report_lag(where)

    def _report_lag(self, where: str) -> None:
        if not self._lag_reported:
            self._lag_reported = True
            log.warning("%s: %s is not taking output; dropping what does not fit",
                        self.name, where)

    def write(self, data: bytes) -> None:
        """Guest output; must not block the calling vCPU for long."""
        raise NotImplementedError

    def close(self) -> None:
        """Release host resources; later output is dropped."""


class MemoryConsole(Backend):
    """A console held in memory, for programs that embed pyhyve (tests): guest
    output collects in `output` (up to `limit` bytes, the oldest dropped), and
    send() types input, as if a user were at the other end."""

    kind = "memory"

    def __init__(self, name: str = "console", limit: int = 1 << 20):
        super().__init__(name)
        self.limit = limit
        self._output = bytearray()
        self._changed = threading.Condition()

    @property
    def output(self) -> bytes:
        with self._changed:
            return bytes(self._output)

    def write(self, data: bytes) -> None:
        with self._changed:
            self._output += data
            excess = len(self._output) - self.limit
            if excess > 0:
                del self._output[:excess]
                self.dropped += excess
            self._changed.notify_all()

    def wait_for(self, text: bytes | str, timeout: float | None = None) -> bool:
        """Whether `text` appeared in the output within `timeout` seconds."""
        needle = text.encode() if isinstance(text, str) else text
        with self._changed:
            return self._changed.wait_for(lambda: needle in self._output, timeout)

    def send(self, data: bytes | str) -> None:
        """Input for the guest (dropped while no device is attached)."""
        callback = self._callback
        if callback is not None:
            callback(data.encode() if isinstance(data, str) else data)


class FileBackend(Backend):
    """Guest output appended to a file, for logs; there is no input.  The file
    grows to `limit` bytes at most: a guest printing without end must not fill
    the host's disk.  What is beyond is dropped, counted, and said once."""

    kind = "file"

    def __init__(self, name: str, path: str, limit: int = FILE_LIMIT, truncate: bool = False):
        super().__init__(name)
        self.path = path
        self.limit = limit
        self._lock = threading.Lock()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags | (os.O_TRUNC if truncate else 0), 0o644)
        except OSError as exc:
            raise ConfigError(f"{name}: cannot open file={path}: {_reason(exc)}") from None
        self._size = os.fstat(self._fd).st_size
        self._watch_output(self._fd)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path}

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                self.dropped += len(data)
                return
            room = max(self.limit - self._size, 0)
            if len(data) > room:
                if self.dropped == 0:
                    log.warning("%s: %s reached its limit of %d bytes; further output is "
                                "dropped (-o console.file_limit)", self.name, self.path,
                                self.limit)
                self.dropped += len(data) - room
                data = data[:room]
            if data:
                self._size += len(data)
                self._write_or_drop(self._fd, data, self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class _PolledBackend(Backend):
    """A backend with input: one daemon thread waits on its descriptors.

    Subclasses register (fileobj, EVENT_READ, handler) with `_selector`, where
    handler(fileobj) runs on the I/O thread, and release what they hold in
    `_release()`.  Poll rather than epoll, so that any stdin works, even a file."""

    def __init__(self, name: str):
        super().__init__(name)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._selector = selectors.PollSelector()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)

    def attach(self, callback: Callable[[bytes], None] | None,
               on_connection: Callable[[bool], None] | None = None) -> None:
        super().attach(callback, on_connection)
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-io",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._closing:
            for key, _ in self._selector.select():
                catch_up()
                if key.data is not None and not self._closing:
                    key.data(key.fileobj)

    def _deliver(self, data: bytes) -> None:
        callback = self._callback
        if callback is not None:
            try:
                callback(data)
            except Exception:
                log.exception("%s: input handler failed; input dropped", self.name)

    def _connection_changed(self, connected: bool) -> None:
        handler = self._on_connection
        if handler is not None:
            try:
                handler(connected)
            except Exception:
                log.exception("%s: connection handler failed", self.name)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        os.eventfd_write(self._wakeup, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)
        self._release()
        self._selector.close()
        os.close(self._wakeup)

    def _release(self) -> None:
        raise NotImplementedError


class StdioBackend(_PolledBackend):
    """pyhyve's own terminal: keys go to the guest, guest output to stdout.

    When input is a terminal it is put in raw mode (as bhyve does with
    cfmakeraw), and its settings come back on close() or at process exit.
    Input passes untouched until set_escape() arms an escape character: then
    `~.` at the start of a line calls `on_quit()` (the machine powers off),
    `~?` lists the escapes on the terminal and `~~` sends one `~`."""

    kind = "stdio"

    def __init__(self, name: str, in_fd: int = 0, out_fd: int = 1):
        super().__init__(name)
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._saved_mode = None
        self._write_lock = threading.Lock()     # vCPUs may write at once
        self._escape: escapes.EscapeFilter | None = None
        self._on_quit: Callable[[], None] | None = None
        self._quitting = False
        self._watch_output(out_fd)
        self._selector.register(in_fd, selectors.EVENT_READ, self._on_input)
        if os.isatty(in_fd):
            import termios      # with tty, 0.3 ms that only a terminal's backends need
            import tty
            self._saved_mode = termios.tcgetattr(in_fd)
            tty.setraw(in_fd)
            atexit.register(self._restore)

    def set_escape(self, escape: bytes | None, on_quit: Callable[[], None]) -> None:
        """Arm the escape character `escape` (None: input passes untouched);
        `~.` calls `on_quit` on the I/O thread."""
        self._on_quit = on_quit
        self._escape = None if escape is None else escapes.EscapeFilter(escape)

    def write(self, data: bytes) -> None:
        with self._write_lock:
            if self._closing:
                self.dropped += len(data)
                return
            self._write_or_drop(self._out_fd, data, "stdout")

    def _on_input(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._selector.unregister(fd)   # end of input: keep serving output
            return
        if self._quitting:
            return                          # the machine is powering off
        escape = self._escape
        for item in escape.feed(data) if escape is not None else (data,):
            if isinstance(item, bytes):
                self._deliver(item)
            elif item == escapes.HELP:
                self.write(escapes.help_text(escape.escape, "power off the VM "
                                             "(as pyhyvectl --force-poweroff)"))
            else:
                self._quitting = True
                try:
                    self._on_quit()
                except Exception:
                    log.exception("%s: powering off failed", self.name)

    def _restore(self) -> None:
        if self._saved_mode is not None:
            import termios      # loaded already: __init__ saved the mode with it
            try:
                termios.tcsetattr(self._in_fd, termios.TCSANOW, self._saved_mode)
            except termios.error:
                pass                        # the terminal is gone: nothing to restore
            self._saved_mode = None

    def _release(self) -> None:
        self._restore()
        atexit.unregister(self._restore)


class PtyBackend(_PolledBackend):
    """A pseudo-terminal for a user's terminal program to attach to, as bhyve's
    nmdm: the guest has the master, `path` is the slave (with `link`, a
    symbolic link to it).  Both ends are raw: bytes pass as they are.

    pyhyve holds the slave open too, so that the master never sees the hang-up
    of the last close and a client may come and go.  Guest output never waits:
    with nobody reading, the pty's buffer fills and the rest is dropped,
    counted and said once."""

    kind = "pty"
    stall_limit = 0.0

    def __init__(self, name: str, link: str | None = None):
        import tty              # as StdioBackend does: only a terminal needs it
        master, slave = os.openpty()             # not inherited by children
        try:
            tty.setraw(slave)
            path = os.ttyname(slave)
            os.set_blocking(master, False)
            link_id = _make_link(name, path, link) if link else None
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        super().__init__(name)
        self.path, self.link = path, link
        self._master, self._slave, self._link_id = master, slave, link_id
        self._write_lock = threading.Lock()
        self._watch_output(master)
        self._selector.register(master, selectors.EVENT_READ, self._on_input)

    def describe(self) -> dict:
        info = {"kind": self.kind, "path": self.path}
        if self.link:
            info["link"] = self.link
        return info

    def write(self, data: bytes) -> None:
        with self._write_lock:
            if self._closing:
                self.dropped += len(data)
                return
            self._write_or_drop(self._master, data, f"the pty {self.path}")

    def _on_input(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:              # not while we hold the slave; never spin
            log.warning("%s: reading the pty %s failed (%s); input stops", self.name,
                        self.path, _reason(exc))
            data = b""
        if data:
            self._deliver(data)
        else:
            self._selector.unregister(fd)

    def _release(self) -> None:
        with self._write_lock:
            os.close(self._master)
            os.close(self._slave)
        if self._link_id is not None:
            try:
                found = os.lstat(self.link)     # still ours? (an inode may be reused)
                if (found.st_dev, found.st_ino) == self._link_id and \
                        os.readlink(self.link) == self.path:
                    os.unlink(self.link)
            except OSError:
                pass                        # removed by someone else, or not ours to remove


def _make_link(name: str, target: str, link: str) -> tuple[int, int]:
    """A symbolic link at LINK to TARGET, where nothing is yet; its (dev, inode)."""
    try:
        os.symlink(target, link)
        found = os.lstat(link)
    except FileExistsError:
        raise ConfigError(f"{name}: pty link {link} already exists; remove it or "
                          "choose another path") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot make pty link {link}: {_reason(exc)}") from None
    remove_at_exit(link)
    return found.st_dev, found.st_ino


class _ServerBackend(_PolledBackend):
    """A listening socket whose latest client is the console."""

    def __init__(self, name: str, listener: socket.socket):
        super().__init__(name)
        self._lock = threading.Lock()       # guards _client against close during send
        self._client: socket.socket | None = None
        self._listener = listener
        listener.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, self._on_accept)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def write(self, data: bytes) -> None:
        with self._lock:
            sent = 0
            if self._client is not None:
                try:
                    sent = self._client.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    full = sent < len(data)
                except BlockingIOError:
                    full = True
                except OSError:
                    full = False    # the client is leaving: the I/O thread sees it
                if full:
                    self._report_lag("the client")
            self.dropped += len(data) - sent

    def _on_accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return              # the client gave up before we got to it
        client.setblocking(False)
        self._configure(client)
        self._drop_client()
        with self._lock:
            self._client = client
        self._selector.register(client, selectors.EVENT_READ, self._on_input)
        self._connection_changed(True)

    def _configure(self, client: socket.socket) -> None:
        """Per-connection socket options."""

    def _on_input(self, client: socket.socket) -> None:
        try:
            data = client.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._deliver(data)
        else:
            self._drop_client()

    def _drop_client(self) -> None:
        """Close the client, if any.  The handler hears of it outside our lock: a
        device may hold its own lock while it waits for ours in write()."""
        with self._lock:
            client, self._client = self._client, None
            if client is not None:
                self._selector.unregister(client)
                client.close()
        if client is not None:
            self._connection_changed(False)

    def _release(self) -> None:
        self._drop_client()
        self._listener.close()


class UnixBackend(_ServerBackend):
    """A console on an AF_UNIX socket; a socket file left by a dead pyhyve is reused."""

    kind = "unix"

    def __init__(self, name: str, path: str):
        self.path = path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(path)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                check_stale_socket(exc, path)
                os.unlink(path)
                listener.bind(path)
            listener.listen(1)
            created = os.stat(path)
        except OSError as exc:
            listener.close()
            raise ConfigError(f"{name}: cannot listen on unix {path}: {_reason(exc)}") from None
        self._inode = (created.st_dev, created.st_ino)
        remove_at_exit(path)
        super().__init__(name, listener)

    @property
    def address(self) -> str:
        return self.path

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path}

    def _release(self) -> None:
        super()._release()
        try:
            found = os.stat(self.path)
            if (found.st_dev, found.st_ino) == self._inode:     # still ours
                os.unlink(self.path)
        except OSError:
            pass                            # already removed by someone else


class TcpBackend(_ServerBackend):
    """A console on a TCP port; HOST may be a name, an IPv4 or a [bracketed] IPv6 address."""

    kind = "tcp"

    def __init__(self, name: str, address: str):
        host, sep, port = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"{name}: tcp={address}: expected tcp=HOST:PORT")
        if int(port) > 0xFFFF:
            raise ConfigError(f"{name}: tcp={address}: port {port} is out of range (0-65535)")
        listener = None
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            listener = socket.socket(family, kind, proto)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(1)
        except OSError as exc:
            if listener is not None:
                listener.close()
            raise ConfigError(f"{name}: cannot listen on tcp {address}: "
                              f"{_reason(exc)}") from None
        super().__init__(name, listener)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), with the real port when 0 was asked for."""
        return self._listener.getsockname()[:2]

    def describe(self) -> dict:
        host, port = self.address
        return {"kind": self.kind, "address": [host, port]}

    def _configure(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # keystrokes, not bulk


def check_stale_socket(error: OSError, path: str) -> None:
    """Re-raise `error` unless `path` is a socket nobody listens on any more."""
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise OSError(errno.EEXIST, "the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return
        except OSError:
            pass
    raise error


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
