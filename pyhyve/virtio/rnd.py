"""`virtio-rnd`: an entropy source (virtio 1.2, 5.4), as bhyve's pci_virtio_rnd.

Each buffer the driver offers comes back filled from the host's os.urandom.
"""

import os

from .device import Transport, VirtioDevice
from .queue import Chain

VIRTIO_ID_ENTROPY = 4
QUEUE_SIZE = 64
MAX_REQUEST = 64 * 1024        # a bound on one request; drivers ask for far less


class VirtioRandom(VirtioDevice):
    """virtio entropy device (no options)"""

    device_type = VIRTIO_ID_ENTROPY
    name = "virtio-rnd"

    def __init__(self, transport: Transport, options: dict[str, str]):
        super().__init__(transport, [QUEUE_SIZE], 0, 0)

    def handle_request(self, index: int, chain: Chain) -> int:
        wanted = min(sum(length for _, length in chain.writable), MAX_REQUEST)
        return chain.write(self.transport.memory, os.urandom(wanted))
