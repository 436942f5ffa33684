"""`virtio-rnd`: an entropy source (virtio 1.2, 5.4), as bhyve's pci_virtio_rnd.

Each buffer the driver offers comes back filled from the host's os.urandom.
"""

import os

from ..pci import emulation
from .pci import VirtioPciDevice
from .queue import Chain

VIRTIO_ID_ENTROPY = 4
LEGACY_DEVICE_ID = 0x1005
CLASS_OTHER = 0x00FF00
QUEUE_SIZE = 64
MAX_REQUEST = 64 * 1024        # a bound on one request; drivers ask for far less


@emulation("virtio-rnd")
class VirtioRandom(VirtioPciDevice):
    """virtio entropy device (no options)"""

    device_type = VIRTIO_ID_ENTROPY
    legacy_device_id = LEGACY_DEVICE_ID
    class_code = CLASS_OTHER

    def init(self, options: dict[str, str]) -> None:
        self.virtio_init([QUEUE_SIZE], 0, 0)

    def handle_request(self, index: int, chain: Chain) -> int:
        wanted = min(sum(length for _, length in chain.writable), MAX_REQUEST)
        return chain.write(self.context.memory, os.urandom(wanted))
