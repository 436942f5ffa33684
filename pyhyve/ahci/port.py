"""One AHCI port (AHCI 1.3.1 section 3.3): its registers, the drive behind it
(a disk image as an ATA disk or an ATAPI CD-ROM, or nothing), its FIS
receive area, and the guest-memory side of a command's data, its PRDT.

Register semantics, as Linux's libahci and SeaBIOS rely on them: PxCMD.ST
starts the command list engine (CR follows it) and clearing it stops the
port, which drops whatever CI and SACT held; FRE turns the FIS receive area
on (FR follows); CLO clears BSY and DRQ; writing SCTL.DET = 1 while stopped
is a COMRESET, after which the drive sends its signature.  Commands run on
the vCPU thread that writes PxCI (pyhyve.ahci.engine), under the
controller's lock.
"""

from ..memory import GuestMemoryError
from . import ata
from .protocol import (PRD_BYTES, PRD_SIZE, READY, TABLE_PRDT, Command,
                       DmaError, signature_d2h)

REG_CLB, REG_CLBU, REG_FB, REG_FBU, REG_IS, REG_IE, REG_CMD = \
    0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18
REG_TFD, REG_SIG, REG_SSTS, REG_SCTL, REG_SERR, REG_SACT, REG_CI, REG_SNTF, REG_FBS = \
    0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x3C, 0x40

# PxIS and PxIE
IS_DHRS, IS_PSS, IS_SDBS, IS_HBFS, IS_TFES = 1 << 0, 1 << 1, 1 << 3, 1 << 29, 1 << 30
IE_MASK = 0xFDC000FF
# PxCMD
CMD_ST, CMD_SUD, CMD_POD, CMD_CLO, CMD_FRE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4
CMD_CCS_SHIFT, CMD_FR, CMD_CR, CMD_CPS = 8, 1 << 14, 1 << 15, 1 << 16
CMD_ATAPI, CMD_ICC = 1 << 24, 0xF << 28
CMD_WRITABLE = CMD_ST | CMD_SUD | CMD_POD | CMD_CLO | CMD_FRE | (0xF << 24) | CMD_ICC
CMD_SAVED = CMD_WRITABLE | CMD_FR | CMD_CR | CMD_CPS | (0x1F << CMD_CCS_SHIFT)
SIG_ATA, SIG_ATAPI, SIG_NONE = 0x00000101, 0xEB140101, 0xFFFFFFFF
SSTS_ONLINE = 0x3 | 0x100                     # device present and Phy up; interface active
SPD_MASK, SPD_GEN3 = 0xF0, 0x30
SCTL_DET_MASK, SCTL_DET_RESET = 0xF, 0x1
TFD_NO_DEVICE = 0x7F
TFD_BUSY_BITS = 0x88                          # BSY and DRQ, which CLO clears
CLB_MASK, FB_MASK = ~0x3FF & 0xFFFFFFFF, ~0xFF & 0xFFFFFFFF

UDMA6, MAX_MULTIPLE = 0x46, 128
NO_SENSE = (0, 0, 0)


class Port:
    """A port's registers and drive; the controller owns the lock every
    method here runs under."""

    def __init__(self, controller, index: int, drive: dict | None):
        self.controller, self.index = controller, index
        self.image = drive["image"] if drive else None
        self.atapi = bool(drive and drive["atapi"])
        self.path = drive["path"] if drive else None
        self.strings = drive["strings"] if drive else None   # serial, revision, model
        self.rotation = drive["rotation"] if drive else None
        self.trim = bool(drive and not self.atapi and not self.image.read_only and
                         not drive["nodelete"])
        sector = 2048 if self.atapi else 512
        self.blocks = self.image.size // sector if self.image else 0
        self.clb = self.fb = 0
        self.is_ = self.ie = self.cmd = self.sctl = self.ci = self.sact = 0
        self.reset()

    @property
    def present(self) -> bool:
        return self.image is not None

    @property
    def memory(self):
        return self.controller.context.memory

    def warn_once(self, key: str, message: str, *args) -> None:
        self.controller.warn_once(f"port{self.index}-{key}", f"port {self.index}: {message}",
                                  *args)

    # --- resets ---------------------------------------------------------------------
    def reset(self) -> None:
        """An HBA reset (GHC.HR, power on): the port stops and its drive resets."""
        self.ie = self.is_ = self.sctl = 0
        self.cmd = CMD_SUD | CMD_POD | (CMD_CPS if self.present else 0)
        self._stopped()
        self.comreset()

    def comreset(self) -> None:
        """The drive resets (COMRESET or software reset) and sends its signature."""
        self.serr = self.sact = 0
        self.srst = False
        self.xfermode, self.mult_sectors, self.write_cache = UDMA6, MAX_MULTIPLE, True
        self.sense, self.ncq_error = NO_SENSE, b""
        if not self.present:
            self.ssts, self.sig, self.tfd = 0, SIG_NONE, TFD_NO_DEVICE
            return
        self.ssts = SSTS_ONLINE | (self.sctl & SPD_MASK or SPD_GEN3)
        self.sig = SIG_ATAPI if self.atapi else SIG_ATA
        self.tfd = 1 << 8 | (0 if self.atapi else READY)
        self.post(0x40, signature_d2h(self.atapi), 0)

    def _stopped(self) -> None:
        """ST clear: nothing runs, so nothing is left issued or active."""
        self.cmd &= ~(CMD_CR | 0x1F << CMD_CCS_SHIFT)
        self.ci = self.sact = 0
        self.waiting = False              # for software to clear an error (ST 1 -> 0)

    # --- registers -------------------------------------------------------------------
    def read(self, offset: int) -> int:
        return {REG_CLB: self.clb & 0xFFFFFFFF, REG_CLBU: self.clb >> 32,
                REG_FB: self.fb & 0xFFFFFFFF, REG_FBU: self.fb >> 32, REG_IS: self.is_,
                REG_IE: self.ie, REG_CMD: self.cmd, REG_TFD: self.tfd, REG_SIG: self.sig,
                REG_SSTS: self.ssts, REG_SCTL: self.sctl, REG_SERR: self.serr,
                REG_SACT: self.sact, REG_CI: self.ci}.get(offset, 0)

    def write(self, offset: int, value: int) -> bool:
        """Take a register write; True when commands may now run."""
        if offset == REG_CLB:
            self.clb = (self.clb & ~0xFFFFFFFF) | (value & CLB_MASK)
        elif offset == REG_CLBU:
            self.clb = (self.clb & 0xFFFFFFFF) | value << 32
        elif offset == REG_FB:
            self.fb = (self.fb & ~0xFFFFFFFF) | (value & FB_MASK)
        elif offset == REG_FBU:
            self.fb = (self.fb & 0xFFFFFFFF) | value << 32
        elif offset == REG_IS:
            self.is_ &= ~value
            self.controller.port_event(self)
        elif offset == REG_IE:
            self.ie = value & IE_MASK
            self.controller.port_event(self)
        elif offset == REG_CMD:
            return self._write_cmd(value)
        elif offset == REG_SCTL:
            self._write_sctl(value)
        elif offset == REG_SERR:
            self.serr &= ~value
        elif offset == REG_SACT and self.cmd & CMD_ST:
            self.sact |= value
        elif offset == REG_CI and self.cmd & CMD_ST:
            self.ci |= value
            return True
        return False

    def _write_cmd(self, value: int) -> bool:
        old = self.cmd
        self.cmd = (old & ~CMD_WRITABLE) | (value & CMD_WRITABLE)
        if self.cmd & CMD_CLO:
            self.tfd &= ~TFD_BUSY_BITS
        self.cmd &= ~(CMD_CLO | CMD_ICC)      # both take effect at once
        self.cmd = self.cmd | CMD_FR if self.cmd & CMD_FRE else self.cmd & ~CMD_FR
        if self.cmd & CMD_ST:
            self.cmd |= CMD_CR
            return not old & CMD_ST or bool(self.ci)
        self._stopped()
        return False

    def _write_sctl(self, value: int) -> None:
        if self.cmd & CMD_ST:
            self.warn_once("sctl", "SCTL written while the port runs: ignored")
            return
        self.sctl = value & 0xFFF
        if value & SCTL_DET_MASK == SCTL_DET_RESET:
            self.comreset()

    # --- the FIS receive area ------------------------------------------------------
    def post(self, at: int, fis: bytes, interrupt: int) -> None:
        """Write a FIS into the receive area (while FRE is set) and raise
        `interrupt` (PxIS bits) as the FIS asks."""
        if not self.cmd & CMD_FRE:
            return
        try:
            self.memory.write(self.fb + at, fis)
        except GuestMemoryError:
            self.warn_once("fb", "FIS receive area %#x is not in guest memory", self.fb)
        if interrupt and interrupt & ~self.is_:
            self.is_ |= interrupt
            self.controller.port_event(self)

    # --- a command's data in guest memory ----------------------------------------------
    def _prdt(self, command: Command) -> list[tuple[int, int]]:
        """(address, bytes) of each PRDT entry."""
        entries = []
        try:
            raw = self.memory.read(command.table + TABLE_PRDT, command.prdt_length * PRD_SIZE)
        except GuestMemoryError:
            raise DmaError(f"PRDT of {command.prdt_length} entries at "
                           f"{command.table + TABLE_PRDT:#x} is not in guest memory") from None
        for at in range(0, len(raw), PRD_SIZE):
            address = int.from_bytes(raw[at:at + 8], "little") & ~1
            count = (int.from_bytes(raw[at + 12:at + 16], "little") & PRD_BYTES) + 1
            entries.append((address, count))
        return entries

    def guest_views(self, command: Command, length: int,
                    into_guest: bool) -> tuple[list[memoryview], bool]:
        """Views of guest memory for `length` bytes through the PRDT, and
        whether all are page-aligned (O_DIRECT may carry them); DmaError
        when the PRDT is shorter or leaves guest RAM."""
        views, aligned, left = [], True, length
        for address, count in self._prdt(command):
            if not left:
                break
            count = min(count, left)
            try:
                views.append(self.memory.view(address, count, into_guest))
            except GuestMemoryError:
                raise DmaError(f"PRD {address:#x}+{count:#x} is not in guest memory") from None
            aligned = aligned and address % 4096 == 0 and count % 4096 == 0
            left -= count
        if left:
            raise DmaError(f"the PRDT holds {length - left} bytes, the command moves {length}")
        return views, aligned

    def to_guest(self, command: Command, data: bytes) -> None:
        """Copy a reply into the PRDT; a shorter PRDT takes what fits."""
        at = 0
        for address, count in self._prdt(command):
            piece = data[at:at + count]
            if not piece:
                break
            try:
                self.memory.write(address, piece)
            except GuestMemoryError:
                raise DmaError(f"PRD {address:#x}+{count:#x} is not in guest memory") from None
            at += len(piece)
        command.transferred = at

    def from_guest(self, command: Command, length: int) -> bytes:
        views, _ = self.guest_views(command, length, into_guest=False)
        return b"".join(bytes(view) for view in views)

    def identify_data(self) -> bytes:
        if self.atapi:
            return ata.identify_packet_device(self.strings, self.xfermode)
        return ata.identify_device(self.blocks, self.strings, self.xfermode, self.mult_sectors,
                                   self.write_cache, self.trim, self.rotation)
