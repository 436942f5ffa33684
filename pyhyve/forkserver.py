"""`pyhyve --serve=SOCKET`: a warm start for many VMs, each still its own process.

Starting pyhyve costs an interpreter and tens of milliseconds of imports
before KVM is touched.  A fork server pays that once: it imports pyhyve and
every built-in device, then waits on a unix socket.  Each request names a
VM as pyhyve's command line would (its arguments, working directory and
environment) and passes the requester's stdin, stdout and stderr; the
server forks, and the child runs exactly what `pyhyve ARGS` runs, with
those descriptors, so the VM is an ordinary pyhyve process: its own KVM VM,
sandbox, control socket and exit status.  The server answers with the
child's PID, then with its exit status when it ends.  A requester that
hangs up first has its VM sent SIGTERM (the power button), as a closed
terminal would.

Authority: the socket is created 0600 in a directory the operator chose;
whoever can connect can start VMs as the server's user, exactly as if they
ran pyhyve.  Nothing in a request is trusted beyond that: it is a command
line.

Threading: the server is one thread (fork in a multi-threaded process would
copy locks held by other threads); it opens no KVM or other descriptor a
child could inherit by mistake.  Requests and child exits are multiplexed
with a selector over the sockets and each child's pidfd.
"""

import array
import json
import os
import selectors
import signal
import socket
import struct
import sys
import traceback

MAX_REQUEST = 1 << 20
_LENGTH = struct.Struct("<I")


class ServeError(Exception):
    """The server cannot start, or a request cannot be made; one line."""


def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    payload = json.dumps(message).encode()
    data = _LENGTH.pack(len(payload)) + payload
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def _receive(sock: socket.socket, want_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (None when the peer has gone) and the descriptors sent with it."""
    data, fds = b"", []
    need = _LENGTH.size
    while len(data) < need:
        chunk, ancillary, _, _ = sock.recvmsg(need - len(data),
                                              socket.CMSG_SPACE(want_fds * 4) if want_fds else 0)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[:len(payload) - len(payload) % 4])
                fds += list(received)
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None, []
        data += chunk
        if len(data) == _LENGTH.size and need == _LENGTH.size:
            (length,) = _LENGTH.unpack(data)
            if length > MAX_REQUEST:
                raise ValueError(f"message of {length} bytes")
            need += length
    try:
        message = json.loads(data[_LENGTH.size:])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("not a JSON message") from None
    return message, fds


# --- the server ----------------------------------------------------------------------
def _preload() -> None:
    """Import what any VM may use, so that no child pays for it."""
    from . import cli, deferred, vm      # noqa: F401  (imported for the children)
    from .pci import emulations
    emulations()
    deferred.import_all()


def serve(path: str) -> int:
    """Run the fork server on PATH until SIGTERM or SIGINT; exit status."""
    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(path):
            raise ServeError(f"{path} already exists; remove it or choose another path")
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(64)
    except OSError as exc:
        listener.close()
        raise ServeError(f"cannot serve on {path}: {exc.strerror or exc}") from None
    print(f"pyhyve: serving on {path}", file=sys.stderr, flush=True)
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    signal.set_wakeup_fd(stop_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
    server = _Server(listener, stop_r)
    try:
        server.loop()
    finally:
        signal.set_wakeup_fd(-1)
        server.close()
        os.unlink(path)
        os.close(stop_w)
    return 0


class _Server:
    def __init__(self, listener: socket.socket, stop_fd: int):
        self.listener = listener
        self.stop_fd = stop_fd
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        self.selector.register(stop_fd, selectors.EVENT_READ, None)
        # pid -> its pidfd and its requester's connection (None once it hung up)
        self.children: dict[int, tuple[int, socket.socket | None]] = {}

    def loop(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.data is None:
                    return                       # a stop signal
                key.data(key.fileobj)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        self.selector.register(conn, selectors.EVENT_READ, self._request)

    def _request(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        try:
            request, fds = _receive(conn, want_fds=3)
            if request is None:
                conn.close()
                return
            argv, cwd, env = request["argv"], request["cwd"], request["env"]
            if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)
                    and isinstance(cwd, str) and isinstance(env, dict)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
                    and len(fds) == 3):
                raise ValueError("expected argv, cwd, env and three descriptors")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._refuse(conn, str(exc))
            return
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self._refuse(conn, f"cannot fork: {exc.strerror}")
            return
        if pid == 0:
            self._become_vm(conn, argv, cwd, env, fds)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = (pidfd, conn)
        self.selector.register(pidfd, selectors.EVENT_READ, lambda _, pid=pid: self._reap(pid))
        self.selector.register(conn, selectors.EVENT_READ,
                               lambda _, pid=pid: self._requester_gone(pid))
        try:
            _send(conn, {"pid": pid})
        except OSError:
            pass

    def _refuse(self, conn: socket.socket, why: str) -> None:
        try:
            _send(conn, {"error": f"bad request: {why}"})
        except OSError:
            pass
        conn.close()

    def _become_vm(self, conn, argv, cwd, env, fds) -> None:
        """In the child: drop the server's descriptors and signal handling, take
        the requester's stdio, directory and environment, and run pyhyve."""
        status = 4
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            self.selector.close()
            self.listener.close()
            os.close(self.stop_fd)
            for pidfd, other in self.children.values():
                os.close(pidfd)
                if other is not None:
                    other.close()
            conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            from .cli import main
            status = main(argv)
        except SystemExit as exc:                   # as the interpreter ends on one
            status = exc.code if isinstance(exc.code, int) else 1
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:                       # nothing may return into the server:
            traceback.print_exc()                   # a bug shows as under `pyhyve ARGS`
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status if isinstance(status, int) else 4)

    def _reap(self, pid: int) -> None:
        pidfd, conn = self.children.pop(pid)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, wait_status = os.waitpid(pid, 0)
        if conn is not None:
            self.selector.unregister(conn)
            try:
                _send(conn, {"status": os.waitstatus_to_exitcode(wait_status)})
            except OSError:
                pass
            conn.close()

    def _requester_gone(self, pid: int) -> None:
        pidfd, conn = self.children[pid]
        try:
            if conn.recv(1):
                return                  # a requester says nothing more; ignore it
        except OSError:
            pass
        self.selector.unregister(conn)
        conn.close()
        self.children[pid] = (pidfd, None)
        os.kill(pid, signal.SIGTERM)

    def close(self) -> None:
        """The server ends: its VMs get the power button, as on SIGTERM each."""
        for pid, (pidfd, conn) in self.children.items():
            os.kill(pid, signal.SIGTERM)
            os.close(pidfd)
            if conn is not None:
                conn.close()
        self.selector.close()
        self.listener.close()
        os.close(self.stop_fd)


# --- the requester -------------------------------------------------------------------
class ServedVm:
    """A VM a fork server started: its PID now, its exit status at wait()."""

    def __init__(self, sock: socket.socket, pid: int):
        self._sock, self.pid = sock, pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            message, _ = _receive(self._sock)
            self._sock.close()
            self.returncode = message["status"] if message else 4
        return self.returncode

    def fileno(self) -> int:
        """Readable once the VM has ended (for selectors)."""
        return self._sock.fileno()


def start(path: str, argv: list[str], stdin: int = 0, stdout: int = 1, stderr: int = 2,
          cwd: str | None = None, env: dict | None = None) -> ServedVm:
    """Ask the fork server at PATH to run `pyhyve ARGV` with these descriptors."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        _send(sock, {"argv": list(argv), "cwd": cwd or os.getcwd(),
                     "env": dict(os.environ if env is None else env)}, [stdin, stdout, stderr])
        reply, _ = _receive(sock)
    except (OSError, ValueError) as exc:
        sock.close()
        raise ServeError(f"fork server {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if not reply or "pid" not in reply:
        sock.close()
        raise ServeError(f"fork server {path}: {reply.get('error') if reply else 'hung up'}")
    return ServedVm(sock, reply["pid"])
