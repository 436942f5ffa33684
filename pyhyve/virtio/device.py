"""A virtio device model apart from its transport, as Firecracker's VirtioDevice
trait and propolis's hw/virtio keep them.

A model (VirtioBlock, VirtioNet, VirtioConsole, VirtioRandom) says what the
device is: its virtio device type, queue sizes, the feature bits it offers,
its device-specific config space, and what it does with the chains the
driver offers.  A transport (virtio-pci today, pyhyve/virtio/pci.py; a
virtio-mmio one would do the same) owns everything the driver programs:
status and feature negotiation, queue layout and activation, notifications
and interrupts, and the transport's half of a snapshot.  A model reaches the
world only through the Transport below, which it is given when it is built;
it never sees the bus it sits on.

Threading: the transport calls every hook below with its lock held (vCPU
threads writing registers, the I/O thread serving notifications), except
close().  A model's own threads (a backend's input) take `transport.lock`
before touching the model, so nobody sees a half-made change.

Failure: a request that breaks the rules (VirtqueueError, GuestMemoryError)
raised from handle_request() or queue_notified() makes the transport set
NEEDS_RESET, as does any other exception (a model bug stops the device, not
the VM).  Bad guest input must never get further than that.
"""

import contextlib
import threading

from ..lifecycle import expect_keys
from ..memory import GuestMemory
from ..iothread import IoThread
from .queue import Chain, SplitQueue

# Device status (virtio 1.2, 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Reserved feature bits (virtio 1.2, 6): the transport offers them with the model's.
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1


class Transport:
    """What a transport gives the model it carries; all of it a model may use
    (an interface: virtio.pci.VirtioPciDevice has it)."""

    memory: GuestMemory           # guest RAM, where chains point
    lock: threading.RLock         # the device lock (see the module docstring)
    vm_name: str
    instance: str                 # tells this device from others in the VM ("SLOT-FUNC")

    @property
    def io_thread(self) -> IoThread:
        """The VM's virtio I/O thread, for a backend's fds (a tap, slirp's socket)."""

    def negotiated(self, feature: int) -> bool:
        """Whether the driver took `feature` (any of the bits given)."""

    def kick(self, index: int) -> bool:
        """Run queue `index` now, as a notification would; False where it did not
        run (the VM paused, the device not started or needing reset, the queue
        not live): then the transport looks at it again when that changes."""

    def interrupt_queue(self, index: int) -> None:
        """Interrupt for queue `index` if it pushed buffers the driver wants to hear of."""

    def notify_config_change(self) -> None:
        """The model changed its config space: tell the driver."""

    def needs_reset(self, reason: str) -> None:
        """The driver broke the rules: stop the device until it resets it."""

    def warn_once(self, key: str, message: str, *args) -> None:
        """Log a warning naming the device, once per key."""


class VirtioDevice:
    """A device model; subclasses set `device_type` and `name`, call
    __init__ with what they offer, and answer chains in handle_request()."""

    device_type = 0               # the virtio device ID (1 net, 2 block, 3 console, 4 entropy)
    name = "virtio"               # for messages

    def __init__(self, transport: Transport, queue_sizes: list[int], features: int,
                 config_size: int):
        self.transport = transport
        self.queue_sizes = list(queue_sizes)
        self.features = features              # offered, without the transport's bits
        self.config = bytearray(config_size)  # struct virtio_*_config, as the driver reads it

    # --- requests (under the transport's lock) -------------------------------------------
    def handle_request(self, index: int, chain: Chain) -> int:
        """Serve one chain from queue `index`; returns the bytes written to it."""
        raise NotImplementedError

    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        """The driver offered buffers: serve every chain, with notifications off
        while busy, then interrupt the driver if it wants one.  Queues that hold
        buffers until there is something to put in them (a network receive
        queue) override this."""
        while True:
            queue.set_notification(False)
            while (chain := queue.pop()) is not None:
                queue.push(chain.head, self.handle_request(index, chain))
            queue.set_notification(True)
            if not queue.pending():
                break
        self.transport.interrupt_queue(index)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """The driver wrote device config; read-only unless a model says otherwise."""

    # --- negotiation and reset -------------------------------------------------------------
    def features_acceptable(self, features: int) -> bool:
        """Whether a modern driver may have FEATURES_OK with these features (the
        transport has checked they are offered); a model adds its dependencies."""
        return True

    def activate(self, features: int) -> None:
        """The driver set DRIVER_OK, or a restore brought back a running device:
        `features` are final until reset()."""

    def reset(self) -> None:
        """The driver reset the device: forget what it set up."""

    # --- lifecycle (pyhyve.lifecycle's contract, for the model's own fields) -------------
    def save_state(self) -> dict:
        """What a snapshot must keep beyond the transport's, as JSON (the device
        quiesced).  Left out is as after reset(); a model whose buffered input
        may be lost, as a network card's received frame, needs nothing here."""
        return {}

    def restore_state(self, state: dict) -> None:
        """Take back save_state()'s output, checked with pyhyve.lifecycle's
        readers: StateError, before anything changes, where it does not fit."""
        expect_keys(state, (), self.name)

    def pause(self) -> None:
        """The VM is paused; the transport runs no queue until resume()."""

    def resume(self) -> None:
        """The VM runs again; the transport then looks at every queue once."""

    @contextlib.contextmanager
    def quiesce(self):
        """The transport has served every offered request: finish what a snapshot
        must find done (a disk's writes on stable storage)."""
        yield

    def close(self) -> None:
        """Release backends and files (without the lock: backend threads may be
        waiting for it); called once, when the transport goes."""
