"""The `-s` names of the virtio devices: each binds a device model to the
virtio-pci transport and declares the options `-s` and the config take.

    -s SLOT,virtio-blk,PATH[,ro][,nocache][,direct][,nodelete][,lock=off]
                          [,sectorsize=L[/P]][,ser=ID]
    -s SLOT,virtio-net,tapN|tap=NAME|slirp[,...]
    -s SLOT,virtio-console,NAME=PATH[,NAME=PATH...]
    -s SLOT,virtio-rnd
    -s SLOT,virtio-9p,SHARENAME=PATH[,ro]
    -s SLOT,virtio-scsi,lun0=PATH[,ro][,ser=ID][,lock=off][,lun1=PATH...][,num_queues=N]
    -s SLOT,virtio-keyboard
    -s SLOT,virtio-tablet

The models' modules say what each option means.  A model is imported when
its emulation is instantiated (make_model()), so a VM loads only the models
it uses; the option declarations, which `-s help` and the checks before
init() read from the class, stay here.
"""

import re

from ..config import ConfigError
from ..pci import PciDevice, emulation
from ..pci.device import disk_legacy_options
from ..pci.options import Option
from .pci import VirtioPciDevice


@emulation("virtio-blk")
class VirtioBlockPci(VirtioPciDevice):
    """virtio block device on a disk image: PATH[,OPTION...]"""

    options = (
        Option("path", "path", None, "the disk image (the first word after the name)"),
        Option("ro", "flag", "false", "read-only: the guest sees VIRTIO_BLK_F_RO"),
        Option("nocache", "flag", "false", "O_DIRECT: bypass the host's page cache"),
        Option("direct", "flag", "false", "O_SYNC: each write is on the disk when done"),
        Option("nodelete", "flag", "false", "no DISCARD (no holes punched in the image)"),
        Option("lock", "flag", "true", "lock the image (shared if ro) against other VMs"),
        Option("sectorsize", "text", "512", "logical[/physical] sector size in bytes"),
        Option("ser", "text", None, "serial number (default: BHYVE- and a hash of the path)"),
    )

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """bhyve's blockif_legacy_config: the first word is the path."""
        return disk_legacy_options(text)

    def make_model(self, options):
        from .blk import VirtioBlock
        return VirtioBlock(self, options)


@emulation("virtio-net")
class VirtioNetPci(VirtioPciDevice):
    """virtio network card: tapN, tap=NAME or slirp[,hostfwd=R][,tftp=D][,bootfile=F];
    each with [,mac=xx:xx:xx:xx:xx:xx][,mtu=N]"""

    options = (
        Option("backend", "text", None, "tapN or slirp (the first word after the name)"),
        Option("tap", "text", None, "a tap interface by name (created if missing)"),
        Option("mac", "text", None, "MAC address (default: from the slot and VM name)"),
        # net.py's DEFAULT_MTU, MIN_MTU and MAX_MTU, written out: reading the
        # options must not import the model (a test holds them equal)
        Option("mtu", "number", "1500", "MTU the guest is offered, 68 to 65517 "
               "(VIRTIO_NET_F_MTU)"),
        Option("hostfwd", "text", None, "slirp: tcp:HOSTPORT-:GUESTPORT[;...] forwards"),
        Option("tftp", "path", None, "slirp: a directory served by TFTP"),
        Option("bootfile", "text", None, "slirp: the boot file DHCP names"),
    )

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """bhyve's netbe_legacy_config: a bare first word is the backend."""
        first, _, rest = text.partition(",")
        if "=" in first:
            return PciDevice.legacy_options(text)
        options = PciDevice.legacy_options(rest)
        if first:
            options["backend"] = first
        return options

    def make_model(self, options):
        from .net import VirtioNet
        return VirtioNet(self, options)


@emulation("virtio-console")
class VirtioConsolePci(VirtioPciDevice):
    """virtio console: NAME=PATH[,...] (PATH: a unix socket, stdio, pty, unix=, tcp=, file=)"""

    options = (
        Option("port.N.name", "text", None, "port N's name (port 0 is the console)"),
        Option("port.N.path", "text", None, "port N's host side: a unix socket path, stdio, "
               "pty[,link=PATH], unix=PATH, tcp=HOST:PORT or file=PATH"),
    )

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """bhyve's pci_vtcon_legacy_config: NAME=PATH pairs become port.N.name/path."""
        options = {}
        for number, item in enumerate(filter(None, text.split(","))):
            name, sep, path = item.partition("=")
            if not sep:
                raise ConfigError(f"virtio-console: port '{name}' needs a path (NAME=PATH)")
            options[f"port.{number}.name"] = name
            options[f"port.{number}.path"] = path
        return options

    def make_model(self, options):
        from .console import VirtioConsole
        return VirtioConsole(self, options)


@emulation("virtio-rnd")
class VirtioRandomPci(VirtioPciDevice):
    """virtio entropy device (no options)"""

    def make_model(self, options):
        from .rnd import VirtioRandom
        return VirtioRandom(self, options)


@emulation("virtio-9p")
class Virtio9pPci(VirtioPciDevice):
    """virtio 9P share of a host directory: SHARENAME=PATH[,ro]"""

    options = (
        Option("sharename", "text", None, "the mount tag the guest sees (before the '=')"),
        Option("path", "path", None, "the host directory shared (after the '=')"),
        Option("ro", "flag", "false", "read-only: every change is refused with EROFS"),
    )

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """bhyve's pci_vt9p_legacy_config: `ro`, and one SHARENAME=PATH pair."""
        options = {}
        for item in filter(None, text.split(",")):
            name, sep, value = item.partition("=")
            if name == "ro":
                options["ro"] = value if sep else "true"
            elif not sep:
                raise ConfigError(f"virtio-9p: '{item}' is neither SHARENAME=PATH nor ro")
            elif "sharename" in options:
                raise ConfigError("virtio-9p: one SHARENAME=PATH per device")
            else:
                options["sharename"], options["path"] = name, value
        return options

    def make_model(self, options):
        from .ninep import Virtio9p
        return Virtio9p(self, options)


@emulation("virtio-scsi")
class VirtioScsiPci(VirtioPciDevice):
    """virtio SCSI host with disk LUNs on target 0: lun0=PATH[,ro][,ser=ID][,lun1=PATH...]"""

    options = (
        Option("lun.N.path", "path", None, "the disk image of LUN N (lunN=PATH)"),
        Option("lun.N.ro", "flag", "false", "LUN N read-only: writes fail with DATA PROTECT"),
        Option("lun.N.ser", "text", None, "LUN N's serial (VPD 0x80), default "
               "SCSI-SLOT-FUNC-N"),
        Option("lun.N.lock", "flag", "true", "lock LUN N's image (shared if ro) against "
               "other VMs"),
        # scsi.py's MAX_REQUEST_QUEUES, written out: reading the options must not import
        # the model
        Option("num_queues", "number", "1", "request queues, 1 to 16"),
    )

    @classmethod
    def legacy_options(cls, text: str) -> dict[str, str]:
        """`lunN=PATH` starts a LUN; `ro`, `ser=ID` and `lock=off` after it are that LUN's."""
        options, lun = {}, None
        for item in filter(None, text.split(",")):
            name, sep, value = item.partition("=")
            if (numbered := re.fullmatch(r"lun(\d+)", name)) and sep:
                lun = int(numbered.group(1))
                options[f"lun.{lun}.path"] = value
            elif name in ("ro", "ser", "lock"):
                if lun is None:
                    raise ConfigError(f"virtio-scsi: '{item}' before any lunN=PATH")
                options[f"lun.{lun}.{name}"] = value if sep else "true"
            else:
                options[name] = value if sep else "true"
        return options

    def make_model(self, options):
        from .scsi import VirtioScsi
        return VirtioScsi(self, options)


@emulation("virtio-keyboard")
class VirtioKeyboardPci(VirtioPciDevice):
    """virtio keyboard, fed by the VM's consoles (no options)"""

    def make_model(self, options):
        from .input import VirtioKeyboard
        return VirtioKeyboard(self, options, self.context.input)


@emulation("virtio-tablet")
class VirtioTabletPci(VirtioPciDevice):
    """virtio tablet (absolute pointer), fed by the VM's consoles (no options)"""

    def make_model(self, options):
        from .input import VirtioTablet
        return VirtioTablet(self, options, self.context.input)
