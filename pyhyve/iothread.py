"""The per-VM I/O thread: one epoll loop that serves eventfds (and other
readable fds, such as a network device's tap).

KVM signals an ioeventfd when the guest writes a virtio queue's notify
register, so the vCPU does not leave KVM_RUN for the notification; this
thread wakes up and runs the device's callback.  Every device of a VM shares
the one thread, created by the first device that asks for it
(devctx.DeviceContext.io_thread) and closed with the VM.

The loop is on the path of every request of a guest that waits for each
one, so it is kept short: epoll itself rather than selectors (whose
bookkeeping took about 2 us a wake-up of bench/blk.py's 64 KiB requests),
and the callbacks looked up without the lock, a dict's get being atomic: a
callback unregistered meanwhile may run once more, as it could between the
lookup and the call before.
"""

import os
import select
import threading
from collections.abc import Callable

from .log import getLogger
from .sandbox import catch_up

log = getLogger(__name__)

THREAD_NAME = "virtio-io"


class IoThread:
    """A thread waiting on eventfds and calling back whoever registered them."""

    def __init__(self, name: str = THREAD_NAME):
        self._epoll = select.epoll()
        self._callbacks: dict[int, tuple[Callable[[], None], bool]] = {}
        self._lock = threading.Lock()
        self._closing = False
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def register(self, fd: int, callback: Callable[[], None], eventfd: bool = True) -> None:
        """Call callback() on this thread each time the (non-blocking) eventfd fires;
        with eventfd=False, each time `fd` is readable, leaving the reading to callback."""
        with self._lock:
            self._callbacks[fd] = (callback, eventfd)
            self._epoll.register(fd, select.EPOLLIN)

    def unregister(self, fd: int) -> None:
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                self._epoll.unregister(fd)

    def _loop(self) -> None:
        while not self._closing:
            for fd, _ in self._epoll.poll():
                catch_up()
                callback, eventfd = self._callbacks.get(fd, (None, False))
                if callback is None:
                    continue
                if eventfd:
                    try:
                        os.eventfd_read(fd)  # consume the count; one callback serves all
                    except (BlockingIOError, OSError):
                        continue
                try:
                    callback()
                except Exception:        # a device bug must not stop every other device
                    log.exception("virtio I/O callback for fd %d failed", fd)

    def close(self) -> None:
        """Idempotent: a second close must not close a descriptor number that
        something else of the process may have been given since."""
        if self._closing:
            return
        self._closing = True
        os.eventfd_write(self._wakeup, 1)
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            self._callbacks.clear()      # devices torn down later unregister nothing
        self._epoll.close()
        os.close(self._wakeup)
