"""The command engine of an AHCI port (AHCI 1.3.1 section 5): the slots the
guest issued in PxCI, each read from the command list (its header) and its
command table (the command FIS, the ATAPI packet, the PRDT), run, and
completed with the FISes the protocol asks for:

- a non-queued command: a PIO Setup FIS first for PIO data-in, then a
  Register D2H FIS with the I bit (PxIS.DHRS); its CI bit clears;
- a queued one (READ/WRITE FPDMA QUEUED): a Register D2H FIS without the I
  bit accepts it (its CI bit clears, its SACT bit stays), then a Set Device
  Bits FIS with the I bit finishes it (PxIS.SDBS; its SACT bit clears);
- an error: ERR in PxTFD and the FIS, PxIS.TFES, the CI (or SACT) bit left
  set, and the port runs nothing more until software clears ST (as a driver's
  error handling does); a queued command's error is kept for READ LOG EXT;
- a Device Control FIS (C bit clear): SRST set then cleared is a software
  reset, after which the drive sends its signature.

Commands run synchronously, under the controller's lock, on the vCPU thread
whose register write issued them: when the write returns each issued slot
has completed, so nothing is ever in flight between two register accesses
and a snapshot holds no half-done command.  A command list or table outside
guest memory is a host bus fatal error (PxIS.HBFS), logged once.
"""

from ..memory import GuestMemoryError
from . import ata
from ..log import getLogger
from .port import CMD_CCS_SHIFT, CMD_ST, IS_DHRS, IS_HBFS, IS_SDBS, IS_TFES
from .protocol import (CONTROL_SRST, FIS_REGISTER_H2D, HEADER_SIZE, READY, RX_PIO_SETUP,
                       RX_REGISTER_D2H, RX_SET_DEVICE_BITS, SLOTS, STATUS_ERR, AtaError,
                       Command, DmaError, pio_setup, register_d2h, set_device_bits,
                       table_address)

log = getLogger(__name__)

COMMAND_TABLE_HEAD = 0x80                     # command FIS, ATAPI packet, reserved
ERROR_STATUS = READY | STATUS_ERR


def run(port) -> None:
    """Run every issued slot, from the current one on, until none is left or
    one fails."""
    start = (port.cmd >> CMD_CCS_SHIFT) & 0x1F
    for step in range(SLOTS):
        slot = (start + step) % SLOTS
        if not port.cmd & CMD_ST or port.waiting:
            return
        if port.ci & 1 << slot:
            port.cmd = (port.cmd & ~(0x1F << CMD_CCS_SHIFT)) | slot << CMD_CCS_SHIFT
            try:
                _run_slot(port, slot)
            except Exception:          # a bug, not the guest: stop this port, not the VM
                log.exception("ahci port %d: running slot %d failed", port.index, slot)
                _fatal(port, "internal error")


def _fetch(port, slot: int) -> Command:
    try:
        header = port.memory.read(port.clb + HEADER_SIZE * slot, HEADER_SIZE)
        table = port.memory.read(table_address(header), COMMAND_TABLE_HEAD)
    except GuestMemoryError:
        raise DmaError(f"command list {port.clb:#x} or table of slot {slot} is not in "
                       "guest memory") from None
    return Command(slot, header, table)


def _fatal(port, reason: str) -> None:
    port.warn_once("fatal", "%s: the port stops until reset", reason)
    port.tfd = (port.tfd & ~0xFF) | ERROR_STATUS
    port.waiting = True
    port.is_ |= IS_HBFS
    port.controller.port_event(port)


def _run_slot(port, slot: int) -> None:
    try:
        command = _fetch(port, slot)
    except DmaError as exc:
        _fatal(port, str(exc))
        return
    if command.cfis[0] != FIS_REGISTER_H2D:
        port.warn_once("fis", "slot %d holds FIS type %#x, not a Register H2D FIS", slot,
                       command.cfis[0])
        _finish_error(port, command, AtaError())
        return
    if not command.is_command:
        _device_control(port, command)
        return
    if command.opcode in ata.QUEUED:
        _run_queued(port, command)
        return
    try:
        ata.execute(port, command)
    except AtaError as error:
        _finish_error(port, command, error)
        return
    if command.opcode in ata.PIO_DATA:
        port.post(RX_PIO_SETUP, pio_setup(READY, command.transferred), 0)
    _write_byte_count(port, command)
    port.tfd = READY
    port.ci &= ~(1 << slot)
    port.post(RX_REGISTER_D2H, register_d2h(READY, 0, command.cfis, command.result_count,
                                            True), IS_DHRS)


def _write_byte_count(port, command: Command) -> None:
    """PRDBC in the command header: the bytes the command moved."""
    try:
        port.memory.write(port.clb + HEADER_SIZE * command.slot + 4,
                          command.transferred.to_bytes(4, "little"))
    except GuestMemoryError:
        port.warn_once("clb", "command list %#x is not in guest memory", port.clb)


def _finish_error(port, command: Command, error: AtaError) -> None:
    port.tfd = error.error << 8 | ERROR_STATUS
    port.waiting = True
    port.post(RX_REGISTER_D2H, register_d2h(ERROR_STATUS, error.error, command.cfis, None,
                                            True), IS_DHRS)
    port.is_ |= IS_TFES
    port.controller.port_event(port)


def _device_control(port, command: Command) -> None:
    """SRST set holds the drive in reset; cleared again, the drive resets."""
    port.ci &= ~(1 << command.slot)
    if command.cfis[15] & CONTROL_SRST:
        port.srst = True
    elif port.srst:
        port.comreset()


def _run_queued(port, command: Command) -> None:
    bit = 1 << command.slot
    port.tfd = READY
    port.ci &= ~bit
    port.post(RX_REGISTER_D2H, register_d2h(READY, 0, command.cfis, None, False), 0)
    try:
        ata.execute(port, command)
    except AtaError as error:
        # the NCQ command error log (page 10h): the tag, status, error and registers
        port.ncq_error = bytes((command.slot, 0, ERROR_STATUS, error.error)) + \
            bytes(command.cfis[4:20])
        port.tfd = error.error << 8 | ERROR_STATUS
        port.waiting = True
        port.post(RX_SET_DEVICE_BITS, set_device_bits(ERROR_STATUS, error.error, 0), IS_SDBS)
        port.is_ |= IS_TFES
        port.controller.port_event(port)
        return
    _write_byte_count(port, command)
    port.sact &= ~bit
    port.post(RX_SET_DEVICE_BITS, set_device_bits(READY, 0, bit), IS_SDBS)
