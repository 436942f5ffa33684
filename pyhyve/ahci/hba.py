"""`ahci`, `ahci-hd` and `ahci-cd`: an AHCI 1.3 SATA controller with a disk
or a CD-ROM on each port, as bhyve's pci_ahci offers it.

    -s SLOT,ahci,hd:PATH[,OPTION...][,cd:PATH[,OPTION...]]...   a port for each
    -s SLOT,ahci-hd,PATH[,OPTION...]                            one disk, port 0
    -s SLOT,ahci-cd,PATH[,OPTION...]                            one CD-ROM, port 0

Per port (config keys port.N.*): `type` hd or cd, `path`, and bhyve's
`nmrr` (nominal media rotation rate, 1: solid state), `ser`, `rev` and
`model` (the IDENTIFY strings), besides the block backend's `ro`, `nocache`,
`direct`, `lock` and `nodelete` (no TRIM) as for virtio-blk.  A CD-ROM's
image is always opened read-only.

The PCI function is an Intel ICH8 AHCI controller (8086:2821, class
01/06/01): the HBA's registers in memory BAR 5 (ABAR), 6 ports or as many
as the highest configured one needs (up to 32), those with a drive in PI;
one MSI message, or INTx.  A port's interrupt status (PxIS & PxIE) sets its
bit in the HBA's IS; while GHC.IE is set, INTx is asserted as long as IS
has a bit, and an MSI is sent when a port's bit newly appears (or is
written clear while its port still has status: nothing is lost between a
driver reading IS and clearing it).

Registers take dword accesses (and qwords, as two dwords); narrower writes
are logged once and ignored, as is anything beyond the last port.  Commands
run on the vCPU thread writing PxCI (pyhyve.ahci.engine), so a snapshot
only syncs the images and saves registers.
"""

import contextlib
import hashlib
import os
import re
import threading

from ..block import BlockImage
from ..config import Config, ConfigError
from ..lifecycle import StateError, bits, decode, encode, expect_keys, flag, uint
from ..pci import BAR_MEM32, PciDevice, emulation
from ..pci.device import DwordRegisters, disk_legacy_options
from ..pci.options import Option
from . import engine
from .port import CMD_SAVED, IE_MASK, Port

VENDOR_ID, DEVICE_ID = 0x8086, 0x2821          # Intel ICH8 (82801HB) SATA AHCI
CLASS_AHCI = 0x010601                          # mass storage, SATA, AHCI 1.0
ABAR = 5
DEFAULT_PORTS, MAX_PORTS = 6, 32
PORTS_BASE, PORT_SIZE = 0x100, 0x80
VERSION = 0x00010300

REG_CAP, REG_GHC, REG_IS, REG_PI, REG_VS = 0x00, 0x04, 0x08, 0x0C, 0x10
GHC_HR, GHC_IE, GHC_AE = 1 << 0, 1 << 1, 1 << 31
CAP_S64A, CAP_SNCQ, CAP_SSS, CAP_SCLO = 1 << 31, 1 << 30, 1 << 27, 1 << 24
CAP_ISS_GEN3, CAP_SAM, CAP_PMD, CAP_SSC, CAP_PSC = 3 << 20, 1 << 18, 1 << 15, 1 << 14, 1 << 13
CAP_NCS = 31 << 8                              # 32 command slots

MODELS = {"hd": "PYHYVE SATA DISK", "cd": "PYHYVE SATA DVD ROM"}
PORT_KEYS = ("type", "path", "ro", "nocache", "direct", "lock", "nodelete", "nmrr", "ser",
             "rev", "model")
PORT_STATE = ("clb", "fb", "is", "ie", "cmd", "tfd", "sig", "ssts", "sctl", "serr", "sact",
              "ci", "waiting", "srst", "xfermode", "mult_sectors", "write_cache", "sense",
              "ncq_error")


def _port_options(index: int, kind: str, text: str) -> dict[str, str]:
    return {f"port.{index}.type": kind,
            **{f"port.{index}.{key}": value for key, value in disk_legacy_options(text).items()}}


def _ident(value: str, length: int, what: str) -> str:
    if len(value) > length or not value.isascii() or not value.isprintable():
        raise ConfigError(f"ahci: {what} must be at most {length} printable ASCII characters")
    return value


@emulation("ahci")
class AhciController(DwordRegisters, PciDevice):
    """AHCI SATA controller: hd:PATH[,OPTION...] or cd:PATH[,OPTION...] per port"""

    savable = True
    register_bar = ABAR
    options = (
        Option("port.N.type", "text", None, "hd (an ATA disk) or cd (a read-only ATAPI "
               "CD-ROM)"),
        Option("port.N.path", "path", None, "the port's image"),
        Option("port.N.ro", "flag", "false", "read-only: writes fail"),
        Option("port.N.nocache", "flag", "false", "O_DIRECT: bypass the host's page cache"),
        Option("port.N.direct", "flag", "false", "O_SYNC: each write is on the disk when done"),
        Option("port.N.lock", "flag", "true", "lock the image (shared if ro) against other VMs"),
        Option("port.N.nodelete", "flag", "false", "offer no TRIM"),
        Option("port.N.nmrr", "number", None, "nominal media rotation rate (1: solid state)"),
        Option("port.N.ser", "text", None, "serial number, up to 20 characters "
               "(default from the path)"),
        Option("port.N.rev", "text", "001", "firmware revision, up to 8 characters"),
        Option("port.N.model", "text", None, "model, up to 40 characters"),
    )

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """bhyve's pci_ahci_legacy_config: ports separated where `,hd:` or `,cd:` starts."""
        options = {}
        for index, part in enumerate(re.split(r",(?=(?:hd|cd):)", text) if text else ()):
            kind, colon, rest = part.partition(":")
            if kind not in ("hd", "cd") or not colon:
                raise ConfigError(f"ahci: port {index} '{part}' does not start with hd: or cd:")
            options.update(_port_options(index, kind, rest))
        return options

    # --- building ---------------------------------------------------------------------
    def init(self, options: dict[str, str]) -> None:
        drives = self._read_drives(options)
        self.lock = threading.RLock()
        try:
            count = max([DEFAULT_PORTS] + [index + 1 for index in drives])
            self.ports = [Port(self, index, drives.get(index)) for index in range(count)]
        except BaseException:
            for drive in drives.values():
                drive["image"].close()
            raise
        self.implemented = sum(1 << index for index in drives)
        self.cap = CAP_S64A | CAP_SNCQ | CAP_SSS | CAP_SCLO | CAP_ISS_GEN3 | CAP_SAM | \
            CAP_PMD | CAP_SSC | CAP_PSC | CAP_NCS | (count - 1)
        self.set_ids(VENDOR_ID, DEVICE_ID, CLASS_AHCI)
        self.set_interrupt_pin(1)
        self.add_msi(1)
        size = PORTS_BASE + PORT_SIZE * count
        self.add_bar(ABAR, BAR_MEM32, 1 << (size - 1).bit_length())
        self.ghc, self.is_ = GHC_AE, 0

    def _read_drives(self, options: dict[str, str]) -> dict[int, dict]:
        """Each configured port's drive: its open image and identity."""
        config = Config(options)
        indexes = sorted({int(key.split(".")[1]) for key in options if key.startswith("port.")})
        if not indexes:
            raise ConfigError("ahci: no ports given (-s SLOT,ahci,hd:PATH or cd:PATH)")
        drives: dict[int, dict] = {}
        try:
            for index in indexes:
                if index >= MAX_PORTS:
                    raise ConfigError(f"ahci: port {index}: ports are 0 to {MAX_PORTS - 1}")
                drives[index] = self._read_drive(config, index)
        except BaseException:
            for drive in drives.values():
                drive["image"].close()
            raise
        return drives

    def _read_drive(self, config: Config, index: int) -> dict:
        prefix = f"port.{index}."
        kind, path = config.get(prefix + "type"), config.get(prefix + "path")
        if kind not in ("hd", "cd"):
            raise ConfigError(f"ahci: port {index} needs type hd or cd, not {kind!r}")
        if not path:
            raise ConfigError(f"ahci: port {index} has no path")
        try:
            read_only = kind == "cd" or config.get_bool(prefix + "ro")
            nocache, sync = config.get_bool(prefix + "nocache"), config.get_bool(prefix + "direct")
            lock, nodelete = config.get_bool(prefix + "lock", True), \
                config.get_bool(prefix + "nodelete")
            rotation = config.get_int(prefix + "nmrr", 0, 0, 0xFFFE) or None
        except ConfigError as exc:
            raise ConfigError(f"ahci: {exc}") from None
        digest = hashlib.md5(os.fsencode(path), usedforsecurity=False).hexdigest().upper()
        serial = config.get(prefix + "ser", f"PYHYVE-{digest[:13]}")
        strings = (_ident(serial, 20, "ser"), _ident(config.get(prefix + "rev", "001"), 8, "rev"),
                   _ident(config.get(prefix + "model", MODELS[kind]), 40, "model"))
        image = BlockImage(f"ahci port {index}", path, read_only, nocache, sync, nodelete, lock)
        if image.size < (2048 if kind == "cd" else 512):
            image.close()
            raise ConfigError(f"ahci: port {index}: {path} is smaller than one sector")
        return {"image": image, "atapi": kind == "cd", "path": path, "strings": strings,
                "rotation": rotation, "nodelete": nodelete}

    def teardown(self) -> None:
        for port in self.ports:
            if port.image is not None:
                port.image.close()

    # --- registers ------------------------------------------------------------------------
    def _dword(self, offset: int) -> int:
        if offset >= PORTS_BASE:
            index, register = divmod(offset - PORTS_BASE, PORT_SIZE)
            return self.ports[index].read(register) if index < len(self.ports) else 0
        return {REG_CAP: self.cap, REG_GHC: self.ghc, REG_IS: self.is_,
                REG_PI: self.implemented, REG_VS: VERSION}.get(offset, 0)

    def _write_dword(self, offset: int, value: int) -> None:
        if offset >= PORTS_BASE:
            index, register = divmod(offset - PORTS_BASE, PORT_SIZE)
            if index < len(self.ports):
                port = self.ports[index]
                if port.write(register, value) and port.present:
                    engine.run(port)
        elif offset == REG_GHC:
            if value & GHC_HR:
                self._hba_reset()
            else:
                self.ghc = GHC_AE | (value & GHC_IE)
                self._signal(self.is_)
        elif offset == REG_IS:
            self.is_ &= ~value
            self._collect()
            self._signal(self.is_ & value)

    def _hba_reset(self) -> None:
        """GHC.HR: every port stops and resets; GHC and IS clear (HR reads 0 at once)."""
        self.ghc, self.is_ = GHC_AE, 0
        for port in self.ports:
            port.reset()
        self._signal(0)

    # --- interrupts ----------------------------------------------------------------------
    def _collect(self) -> None:
        for port in self.ports:
            if port.is_ & port.ie:
                self.is_ |= 1 << port.index

    def port_event(self, port: Port) -> None:
        """A port's status changed: its IS bit, then the interrupt."""
        bit = 1 << port.index
        newly = 0
        if port.is_ & port.ie and not self.is_ & bit:
            self.is_ |= bit
            newly = bit
        self._signal(newly)

    def _signal(self, newly: int) -> None:
        """INTx follows IS while GHC.IE is set; an MSI goes out for `newly` set bits."""
        enabled = bool(self.ghc & GHC_IE)
        if self.msi.enabled:
            self.deassert_intx()
            if enabled and newly:
                self.msi.fire(0)
        elif enabled and self.is_:
            self.assert_intx()
        else:
            self.deassert_intx()

    def config_changed(self, offset: int, size: int) -> None:
        """MSI turned on or off: INTx follows."""
        with self.lock:
            self._signal(0)

    def resync_irq(self) -> None:
        with self.lock:
            self._signal(0)

    # --- lifecycle ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def quiesce(self):
        """Nothing is in flight between register accesses; the images are synced
        so that every write the guest saw complete is in them."""
        with self.lock:
            for port in self.ports:
                if port.image is not None:
                    port.image.flush()
            yield

    def save_state(self) -> dict:
        with self.lock:
            state = super().save_state()
            state["ahci"] = {"ghc": self.ghc, "is": self.is_,
                             "ports": [self._save_port(port) for port in self.ports]}
        return state

    @staticmethod
    def _save_port(port: Port) -> dict:
        return {"clb": port.clb, "fb": port.fb, "is": port.is_, "ie": port.ie,
                "cmd": port.cmd, "tfd": port.tfd, "sig": port.sig, "ssts": port.ssts,
                "sctl": port.sctl, "serr": port.serr, "sact": port.sact, "ci": port.ci,
                "waiting": port.waiting, "srst": port.srst, "xfermode": port.xfermode,
                "mult_sectors": port.mult_sectors, "write_cache": port.write_cache,
                "sense": list(port.sense), "ncq_error": encode(port.ncq_error)}

    def restore_state(self, state: dict) -> None:
        """Every saved field is checked before anything changes (StateError)."""
        owner = f"ahci {self.bdf}"
        saved = state.get("ahci") if isinstance(state, dict) else None
        expect_keys(saved, ("ghc", "is", "ports"), owner)
        ghc = bits(saved["ghc"], GHC_AE | GHC_IE, f"{owner} GHC") | GHC_AE
        is_ = bits(saved["is"], (1 << len(self.ports)) - 1, f"{owner} IS")
        ports = saved["ports"]
        if not isinstance(ports, list) or len(ports) != len(self.ports):
            raise StateError(f"{owner}: saved ports are not {len(self.ports)}")
        checked = [self._check_port(item, f"{owner} port {index}")
                   for index, item in enumerate(ports)]
        with self.lock:
            super().restore_state(state)
            self.ghc, self.is_ = ghc, is_
            for port, values in zip(self.ports, checked):
                for name, value in values.items():
                    setattr(port, name, value)
            self._signal(0)

    @staticmethod
    def _check_port(item, what: str) -> dict:
        expect_keys(item, PORT_STATE, what)
        word = 0xFFFFFFFF
        sense = item["sense"]
        if not isinstance(sense, list) or len(sense) != 3:
            raise StateError(f"{what} sense {sense!r} is not three numbers")
        return {
            "clb": bits(item["clb"], ~0x3FF & (1 << 64) - 1, f"{what} CLB"),
            "fb": bits(item["fb"], ~0xFF & (1 << 64) - 1, f"{what} FB"),
            "is_": uint(item["is"], word, f"{what} IS"),
            "ie": bits(item["ie"], IE_MASK, f"{what} IE"),
            "cmd": bits(item["cmd"], CMD_SAVED, f"{what} CMD"),
            "tfd": uint(item["tfd"], 0xFFFF, f"{what} TFD"),
            "sig": uint(item["sig"], word, f"{what} SIG"),
            "ssts": uint(item["ssts"], 0xFFF, f"{what} SSTS"),
            "sctl": uint(item["sctl"], 0xFFF, f"{what} SCTL"),
            "serr": uint(item["serr"], word, f"{what} SERR"),
            "sact": uint(item["sact"], word, f"{what} SACT"),
            "ci": uint(item["ci"], word, f"{what} CI"),
            "waiting": flag(item["waiting"], f"{what} waiting"),
            "srst": flag(item["srst"], f"{what} SRST"),
            "xfermode": uint(item["xfermode"], 0xFF, f"{what} transfer mode"),
            "mult_sectors": uint(item["mult_sectors"], 128, f"{what} multiple"),
            "write_cache": flag(item["write_cache"], f"{what} write cache"),
            "sense": tuple(uint(value, 0xFF, f"{what} sense") for value in sense),
            "ncq_error": decode(item["ncq_error"], f"{what} NCQ error log", limit=20),
        }


@emulation("ahci-hd")
class AhciDisk(AhciController):
    """AHCI controller with one SATA disk: PATH[,OPTION...]"""

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        return _port_options(0, "hd", text)


@emulation("ahci-cd")
class AhciCdrom(AhciController):
    """AHCI controller with one read-only ATAPI CD-ROM: PATH[,OPTION...]"""

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        return _port_options(0, "cd", text)
