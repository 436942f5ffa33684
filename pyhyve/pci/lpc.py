"""The LPC/ISA bridge (bhyve's pci_lpc): a PIIX3 (8086:7000) face for the
legacy devices, whose PIRQ route registers (0x60-0x63) firmware programs to
steer PCI INTx links to 8259 IRQs."""

from . import PciDevice, emulation
from .intx import PIRQ_DISABLED, PIRQ_LINKS

PIRQ_ROUTE = 0x60
CLASS_ISA_BRIDGE = 0x060100


@emulation("lpc")
class LpcBridge(PciDevice):
    """PIIX3-compatible LPC/ISA bridge with PIRQ routing"""

    savable = True          # its registers are all its state

    def restore_state(self, state: dict) -> None:
        """The saved PIRQ routes steer the INTx links again."""
        super().restore_state(state)
        self.config_changed(PIRQ_ROUTE, PIRQ_LINKS)

    def init(self, options: dict[str, str]) -> None:
        self.set_ids(0x8086, 0x7000, CLASS_ISA_BRIDGE, subsystem_vendor=0x1AF4,
                     subsystem=0x1100)
        self.config[PIRQ_ROUTE:PIRQ_ROUTE + PIRQ_LINKS] = bytes([PIRQ_DISABLED] * PIRQ_LINKS)
        self.wmask[PIRQ_ROUTE:PIRQ_ROUTE + PIRQ_LINKS] = b"\x8f" * PIRQ_LINKS

    def config_changed(self, offset: int, size: int) -> None:
        for link in range(PIRQ_LINKS):
            if offset <= PIRQ_ROUTE + link < offset + size:
                self.bus.intx.set_route(link, self.config[PIRQ_ROUTE + link])
