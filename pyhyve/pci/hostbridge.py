"""Host bridges: the device at 00:00.0 that tells firmware what chipset this is.

`hostbridge` presents an i440FX (8086:1237) with QEMU's subsystem IDs
1af4:1100, which is how SeaBIOS recognises a QEMU-compatible platform; its
PAM registers (0x59-0x5F) switch the BIOS area between the bootrom and RAM,
which SeaBIOS relies on to shadow itself.  `amd_hostbridge` is bhyve's AMD
variant (1022:7432), for guests that want an AMD host bridge.
"""

from ..layout import BIOS_AREA_CHUNKS
from . import PciDevice, emulation

PAM0 = 0x59
PAM_REGISTERS = 7
PAM_READ_ENABLE = 0x1
PAM_WRITE_ENABLE = 0x2
SMRAM = 0x72
CLASS_HOST_BRIDGE = 0x060000


@emulation("hostbridge")
class HostBridge(PciDevice):
    """i440FX-compatible host bridge with PAM shadowing (SeaBIOS, QEMU pc)"""

    vendor, device = 0x8086, 0x1237
    savable = True          # its registers are all its state

    def restore_state(self, state: dict) -> None:
        """The saved PAM registers shadow the BIOS area again."""
        super().restore_state(state)
        self.config_changed(PAM0, PAM_REGISTERS)

    def wake(self, power_on: dict) -> None:
        """A reset that keeps the PAM registers, as QEMU's i440FX keeps them on
        every reset: SeaBIOS's resume path starts from its copy in shadow RAM."""
        pam = bytes(self.config[PAM0:PAM0 + PAM_REGISTERS])
        self.reset(power_on)
        self.config[PAM0:PAM0 + PAM_REGISTERS] = pam
        self.config_changed(PAM0, PAM_REGISTERS)

    def init(self, options: dict[str, str]) -> None:
        self.set_ids(self.vendor, self.device, CLASS_HOST_BRIDGE, revision=2,
                     subsystem_vendor=0x1AF4, subsystem=0x1100)
        self.wmask[PAM0:PAM0 + PAM_REGISTERS] = b"\x33" * PAM_REGISTERS
        self.wmask[SMRAM] = 0x78

    def config_changed(self, offset: int, size: int) -> None:
        if offset < PAM0 + PAM_REGISTERS and offset + size > PAM0:
            for gpa, _ in BIOS_AREA_CHUNKS:
                self.context.memory.set_bios_area(gpa, self._pam_mode(gpa))

    def _pam_mode(self, gpa: int) -> str:
        """The PAM attribute for a BIOS-area chunk: PAM0's high nibble covers
        0xF0000-0xFFFFF; PAM5 and PAM6 cover 0xE0000-0xEFFFF in 16 KiB nibbles."""
        if gpa >= 0xF0000:
            attribute = self.config[PAM0] >> 4
        else:
            chunk = (gpa - 0xE0000) // 0x4000
            attribute = self.config[PAM0 + 5 + chunk // 2] >> (4 * (chunk % 2))
        if attribute & PAM_READ_ENABLE:
            return "ram" if attribute & PAM_WRITE_ENABLE else "ram-ro"
        return "rom"


@emulation("amd_hostbridge")
class AmdHostBridge(HostBridge):
    """AMD host bridge IDs (bhyve's amd_hostbridge)"""

    vendor, device = 0x1022, 0x7432
