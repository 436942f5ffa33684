"""pyhyvectl --console: the user's terminal on a running VM's console.

The control socket's `consoles` request says where each console's host end
is; a pty (its slave), a unix socket or a TCP port can be attached to, a
stdio or file console cannot.  The terminal goes into raw mode, so that every
key (Ctrl-C too) reaches the guest, and comes back as it was on the way out.
The escape of pyhyve.escape is pyhyvectl's own: `~.` at the start of a line
detaches and leaves the VM running, `~?` lists the escapes, `~~` sends a `~`.
A socket console serves one client, so attaching to one takes it over from
any other client; a pty may have several readers at once (they share what
the guest prints).
"""

import errno
import os
import selectors
import signal
import socket
import sys
import termios
import tty

from . import escape as escapes

ATTACHABLE = ("pty", "unix", "tcp")
READ_SIZE = 4096
DETACHED, CLOSED = 0, 1             # exit statuses


class AttachError(Exception):
    """The console cannot be attached to; the message says why, in one line."""


class _Interrupted(Exception):
    pass


def choose(consoles: list[dict], wanted: str, vm: str) -> dict:
    """The console named WANTED (empty: com1, or else the first the VM has)."""
    if not wanted:
        names = [console["name"] for console in consoles]
        wanted = "com1" if "com1" in names or not names else names[0]
    for console in consoles:
        if console["name"] == wanted:
            break
    else:
        have = ", ".join(f"{c['name']} ({c['kind']})" for c in consoles) or "none"
        raise AttachError(f"VM '{vm}' has no console {wanted} (its consoles: {have})")
    if console["kind"] not in ATTACHABLE:
        where = {"stdio": "on the terminal pyhyve runs in",
                 "file": f"written to {console.get('path', 'a file')}"}.get(
                     console["kind"], f"a {console['kind']} console")
        raise AttachError(f"console {wanted} of VM '{vm}' is {where}: pyhyvectl attaches "
                          f"only to {', '.join(ATTACHABLE)} consoles (-l {wanted},pty)")
    return console


def where(console: dict) -> str:
    if console["kind"] == "tcp":
        host, port = console["address"]
        return f"tcp {host}:{port}"
    return console.get("link") or console["path"]


def open_console(console: dict) -> tuple[int, object]:
    """A descriptor on the console's host end, and what keeps it open."""
    kind = console["kind"]
    try:
        if kind == "pty":
            fd = os.open(console["path"], os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                tty.setraw(fd)      # as pyhyve left it, whatever a client did since
            except termios.error:
                pass
            return fd, fd
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(console["path"])
            except OSError:
                sock.close()
                raise
        else:
            host, port = console["address"]
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            sock = socket.create_connection((host, port), timeout=10)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock.fileno(), sock
    except OSError as exc:
        raise AttachError(f"cannot open console {console['name']} ({where(console)}): "
                          f"{exc.strerror or exc}") from None


def _close(holder) -> None:
    if isinstance(holder, int):
        os.close(holder)
    else:
        holder.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def attach(console: dict, escape: bytes | None, in_fd: int = 0, out_fd: int = 1,
           err=None) -> int:
    """Copy IN_FD to the console and the console to OUT_FD until `~.` (0) or
    until the console closes (1); messages go to ERR (stderr)."""
    err = err or sys.stderr
    name = console["name"]
    fd, holder = open_console(console)
    hint = (f"; {escapes.describe(escape)}. detaches, {escapes.describe(escape)}? "
            "lists the escapes") if escape else ""
    saved = termios.tcgetattr(in_fd) if os.isatty(in_fd) else None
    previous = {signum: signal.signal(signum, _interrupt)
                for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        if saved is not None:
            tty.setraw(in_fd, termios.TCSANOW)  # before the line: keys after it are the guest's
        end = "\r\n" if saved is not None else "\n"      # raw mode adds no CR
        err.write(f"pyhyvectl: attached to {name} ({where(console)}){hint}{end}")
        err.flush()
        status = _copy(fd, escape, in_fd, out_fd)
    except _Interrupted as exc:
        status, message = CLOSED, f"{exc}: detached from {name}"
    except OSError as exc:
        status, message = CLOSED, f"console {name}: {exc.strerror or exc}"
    else:
        message = (f"detached from {name} (the VM runs on)" if status == DETACHED else
                   f"console {name} closed (the VM stopped, or another client took it)")
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _close(holder)
    err.write(f"\npyhyvectl: {message}\n")
    err.flush()
    return status


def _interrupt(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def _copy(fd: int, escape: bytes | None, in_fd: int, out_fd: int) -> int:
    keys = escapes.EscapeFilter(escape)
    with selectors.PollSelector() as selector:     # poll: any stdin, even /dev/null
        selector.register(in_fd, selectors.EVENT_READ, "keys")
        selector.register(fd, selectors.EVENT_READ, "console")
        while True:
            for key, _ in selector.select():
                if key.data == "console":
                    try:
                        data = os.read(fd, READ_SIZE)
                    except OSError as exc:
                        if exc.errno != errno.EIO:      # EIO: the pty's master is gone
                            raise
                        data = b""
                    if not data:
                        return CLOSED
                    _write_all(out_fd, data)
                    continue
                data = os.read(in_fd, READ_SIZE)
                if not data:
                    return DETACHED                     # end of input: nothing more to send
                for item in keys.feed(data):
                    if isinstance(item, bytes):
                        try:
                            _write_all(fd, item)
                        except (BrokenPipeError, ConnectionResetError):
                            return CLOSED
                    elif item == escapes.HELP:
                        _write_all(out_fd, escapes.help_text(escape, "detach (the VM runs on)"))
                    else:
                        return DETACHED
