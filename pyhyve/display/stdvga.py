"""QEMU's standard VGA as a PCI function (1234:1111, class 0300), with the VNC
server that shows it: `-s 29,fbuf,tcp=127.0.0.1:5900,wait` as bhyve's fbuf.

The guest drives it with its own drivers: the VGA BIOS (Debian's
vgabios-stdvga.bin, served as the expansion ROM) through the legacy VGA
ports and the window at 0xA0000, Linux's bochs DRM driver through the
DISPI registers and the linear framebuffer.
  BAR0  the framebuffer (video memory): RAM mapped into the guest as a KVM
        memslot that moves with the BAR; KVM logs the guest's writes to it,
        so the display redraws only written lines
  BAR2  registers: 0x000-0x0ff the EDID (a monitor preferring w x h, read
        by bochs-drm as QEMU's), 0x400-0x41f the VGA ports 0x3c0-0x3df,
        0x500-0x515 the DISPI registers, 16 bits each
  ports 0x3c0-0x3df (and the CRTC at 0x3b4/0x3b5/0x3ba), DISPI at 0x1ce/0x1cf

KVM queues the guest's writes to the legacy window (iobus.queue_writes), as
QEMU coalesces its "vga-lowmem": a text console's characters cost no exit
each.  They reach the window before any access to the VGA's registers (the
ports, BAR2), any read of the window, and before the display is drawn.

Where bhyve's fbuf is a plain framebuffer for UEFI, this is the VGA that
SeaBIOS and QEMU guests expect; bhyve's options are accepted as they are
(vga=on|io|off decides whether the legacy window and ports are decoded).
"""

import mmap
import os
import threading
import zlib

from ..config import Config, ConfigError
from ..lifecycle import StateError, decode, encode
from ..memory import GuestMemoryError
from ..pci import BAR_MEM32, PciDevice, emulation
from ..pci.options import Option
from .edid import edid
from .render import Renderer
from .screen import Screen
from .vga import DISPI_PORTS, DISPI_XRES, DISPI_YRES, MONO_PORTS, VGA_PORTS, VGA_WINDOW, \
    VgaState

VENDOR_BOCHS, DEVICE_STDVGA = 0x1234, 0x1111
CLASS_VGA = 0x030000
DEFAULT_ROM = "/usr/share/seabios/vgabios-stdvga.bin"
MMIO_SIZE = 4096
MMIO_EDID, MMIO_VGA_PORTS, MMIO_DISPI = 0x000, 0x400, 0x500
EDID_AREA = 0x100
MIB = 1 << 20
MAX_WIDTH, MAX_HEIGHT = 1920, 1200              # bhyve's fbuf limits


def _listen_option(options: dict[str, str]) -> tuple[str, str] | None:
    """("tcp", "HOST:PORT") or ("unix", PATH) from tcp=/rfb=/unix=, or None."""
    given = [(kind, options[kind]) for kind in ("tcp", "rfb", "unix") if kind in options]
    if len(given) > 1:
        raise ConfigError("fbuf: give one of tcp=, rfb= and unix=")
    if not given:
        return None
    kind, value = given[0]
    return ("unix", value) if kind == "unix" else ("tcp", value)


@emulation("fbuf")
class StdVga(PciDevice):
    """display: QEMU's standard VGA (VGA BIOS, Bochs VBE, linear framebuffer) shown over VNC (RFB 3.8, WebSocket too)"""

    savable = True
    options = (
        Option("tcp", "text", None, "IP:PORT the VNC server listens on (IPv6 as [IP]:PORT)"),
        Option("rfb", "text", None, "the same as tcp="),
        Option("unix", "path", None, "a UNIX socket the VNC server listens on instead"),
        Option("w", "number", "1024", f"the width DISPI reports before the guest sets a "
               f"mode, up to {MAX_WIDTH}"),
        Option("h", "number", "768", f"the height likewise, up to {MAX_HEIGHT}"),
        Option("vga", "text", "on", "on: legacy VGA ports and memory window (needed by the "
               "VGA BIOS); io: ports only; off: neither, and no VGA BIOS"),
        Option("wait", "flag", "false", "start the guest only once a VNC client connected"),
        Option("password", "text", None, "VNC Authentication password (8 characters count)"),
        Option("vram", "number", "16", "video memory in MiB: 1 to 256, a power of two"),
        Option("edid", "flag", "true", "offer an EDID whose preferred mode is w x h (as "
               "QEMU's edid=on); off: the guest's driver picks its own default"),
    )

    def init(self, options: dict[str, str]) -> None:
        self.listen = _listen_option(options)
        vram_mib = int(options.get("vram", "16"), 0)
        if not 1 <= vram_mib <= 256 or vram_mib & (vram_mib - 1):
            raise ConfigError("fbuf: vram must be a power of two from 1 to 256 (MiB)")
        width, height = int(options.get("w", "1024"), 0), int(options.get("h", "768"), 0)
        if not (8 <= width <= MAX_WIDTH and 8 <= height <= MAX_HEIGHT):
            raise ConfigError(f"fbuf: w and h must be from 8x8 to {MAX_WIDTH}x{MAX_HEIGHT}")
        self.vga_mode = options.get("vga", "on")
        if self.vga_mode not in ("on", "io", "off"):
            raise ConfigError("fbuf: vga must be on, io or off")
        flags = Config(options)
        self.wait = flags.get_bool("wait")
        self.password = options.get("password")
        self.edid = edid(width, height) if flags.get_bool("edid", True) else b""

        self.set_ids(VENDOR_BOCHS, DEVICE_STDVGA, CLASS_VGA, revision=2,
                     subsystem_vendor=0x1AF4, subsystem=0x1100)
        self.vram = mmap.mmap(-1, vram_mib * MIB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.state = VgaState(memoryview(self.vram), self.context.warn_once)
        self.state.dispi[DISPI_XRES], self.state.dispi[DISPI_YRES] = width, height
        self._pages_lock = threading.Lock()     # the window's page set, the LFB's memslot
        self.lfb_gpa: int | None = None         # where the framebuffer is mapped now
        self.renderer = Renderer(self.state)
        self.screen = Screen(self._draw)
        self._ranges = []
        self.add_bar(0, BAR_MEM32, len(self.vram), prefetchable=True)
        self.add_bar(2, BAR_MEM32, MMIO_SIZE)
        if self.vga_mode != "off":
            ports = self.context.ports
            self._ranges.append((ports, ports.register("vga", VGA_PORTS[0], VGA_PORTS[1],
                                                       self._vga_read, self._vga_write)))
            self._ranges.append((ports, ports.register(
                "vga-mono", MONO_PORTS[0], MONO_PORTS[1],
                lambda offset, size: self.state.port_read(MONO_PORTS[0] + offset, size),
                lambda offset, size, value: self.state.port_write(MONO_PORTS[0] + offset,
                                                                  size, value))))
            self._ranges.append((ports, ports.register("vbe-dispi", DISPI_PORTS[0],
                                                       DISPI_PORTS[1], self._dispi_port_read,
                                                       self._dispi_port_write)))
            for _, entry in self._ranges:       # they decide what a window write does
                ports.flush_first(entry)
        if self.vga_mode == "on":
            try:
                self.context.memory.carve_hole(*VGA_WINDOW)
            except GuestMemoryError as exc:
                raise ConfigError(f"fbuf: no room for the VGA window: {exc}") from None
            mmio = self.context.mmio
            window = mmio.register("vga-window", VGA_WINDOW[0], VGA_WINDOW[1] - VGA_WINDOW[0],
                                   self.state.window_read, self._window_write)
            self._ranges.append((mmio, window))
            mmio.queue_writes(window, VGA_WINDOW[0], VGA_WINDOW[1] - VGA_WINDOW[0])
            if os.path.exists(DEFAULT_ROM):
                with open(DEFAULT_ROM, "rb") as file:
                    self.add_rom(file.read())
        self.server = None
        if self.listen is not None:
            from ..vnc.server import VncServer
            self.server = VncServer(self.screen, self.context.input, self.listen,
                                    self.password, f"pyhyve {self.context.vm_name}",
                                    self.context.warn_once)
            if self.wait:
                self.server.wait_for_client()
        elif self.wait:
            raise ConfigError("fbuf: wait needs a VNC server (tcp= or unix=)")

    @property
    def description(self) -> str:
        where = f" (VNC on {self.listen[1]})" if self.listen else ""
        return f"{self.emulation_name} at PCI {self.bdf}{where}"

    # --- guest accesses -----------------------------------------------------------------
    def _vga_read(self, offset: int, size: int) -> int:
        return self.state.port_read(VGA_PORTS[0] + offset, size)

    def _vga_write(self, offset: int, size: int, value: int) -> None:
        self.state.port_write(VGA_PORTS[0] + offset, size, value)

    def _window_write(self, offset: int, size: int, value: int) -> None:
        with self._pages_lock:
            self.state.window_write(offset, size, value)

    def _dispi_port_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self.state.dispi_index & ((1 << (8 * size)) - 1)
        return self.state.dispi_read(self.state.dispi_index) & ((1 << (8 * size)) - 1)

    def _dispi_port_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.state.dispi_index = value & 0xFFFF if size > 1 else value & 0xFF
        else:
            with self._pages_lock:
                self.state.dispi_write(self.state.dispi_index, value)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != 2:
            return (1 << (8 * size)) - 1
        self.context.mmio.flush_queued()        # the window's writes, before its registers
        if MMIO_EDID <= offset < MMIO_EDID + EDID_AREA:
            start = offset - MMIO_EDID
            return int.from_bytes(self.edid[start:start + size].ljust(size, b"\0"), "little")
        if MMIO_VGA_PORTS <= offset < MMIO_VGA_PORTS + VGA_PORTS[1] and size <= 2:
            return self.state.port_read(VGA_PORTS[0] + offset - MMIO_VGA_PORTS, size)
        if MMIO_DISPI <= offset < MMIO_DISPI + 0x16 and size == 2 and not offset & 1:
            return self.state.dispi_read((offset - MMIO_DISPI) >> 1)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != 2:
            return
        self.context.mmio.flush_queued()
        if MMIO_VGA_PORTS <= offset < MMIO_VGA_PORTS + VGA_PORTS[1] and size <= 2:
            self.state.port_write(VGA_PORTS[0] + offset - MMIO_VGA_PORTS, size, value)
        elif MMIO_DISPI <= offset < MMIO_DISPI + 0x16 and size == 2 and not offset & 1:
            with self._pages_lock:
                self.state.dispi_write((offset - MMIO_DISPI) >> 1, value)
        else:
            self.warn_once(f"mmio-{offset:#x}-{size}", "ignored a %d-byte register write at "
                           "%#x", size, offset)

    # --- the framebuffer BAR: guest RAM that follows the BAR ----------------------------------
    def update_mapping(self, bar) -> None:
        if bar.index != 0:
            super().update_mapping(bar)
            return
        memory = self.context.memory
        with self._pages_lock:
            if self.lfb_gpa is not None:
                memory.remove_device_ram(self.lfb_gpa)
                self.lfb_gpa = None
            if not self._get16(0x04) & 0x02 or not bar.address:
                return
            if memory.add_device_ram(f"{self.emulation_name}@{self.bdf}.vram", bar.address,
                                     self.vram):
                self.lfb_gpa = bar.address
                memory.log_dirty(True, bar.address)
                self.renderer.invalidate()
            else:
                self.warn_once(f"lfb-{bar.address:#x}", "framebuffer BAR at %#x overlaps "
                               "other memory: not mapped there", bar.address)

    def unmap_all(self) -> None:
        super().unmap_all()
        with self._pages_lock:
            if self.lfb_gpa is not None:
                self.context.memory.remove_device_ram(self.lfb_gpa)
                self.lfb_gpa = None

    # --- drawing (the display thread) ---------------------------------------------------------
    def _dirty_pages(self) -> set[int]:
        """Video memory pages written since the last call: through the window
        (kept by VgaState) and through the framebuffer (KVM's dirty log)."""
        with self._pages_lock:
            pages, self.state.written_pages = self.state.written_pages, set()
            if self.lfb_gpa is not None:
                region = next((r for r in self.context.memory.logged_regions()
                               if r.gpa == self.lfb_gpa), None)
                if region is not None:
                    bitmap = self.context.memory.collect_dirty(region)
                    for index, byte in enumerate(bitmap):
                        if byte:
                            pages.update(index * 8 + bit for bit in range(8) if byte >> bit & 1)
        return pages

    def _draw(self):
        self.context.mmio.flush_queued()        # what the guest wrote to the window so far
        changed = self.renderer.render(self._dirty_pages())
        band = (self.state.cr[9] & 0x1F) + 1 if self.renderer.text_mode else 16
        return self.renderer.width, self.renderer.height, self.renderer.frame, changed, band

    # --- lifecycle -------------------------------------------------------------------------------
    def save_state(self) -> dict:
        """Registers and video memory (compressed: mostly zeros or a picture)."""
        return {**super().save_state(), "vga": self.state.save_state(),
                "vram": encode(zlib.compress(self.vram, 1))}

    def restore_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "vga" not in state or "vram" not in state:
            raise StateError(f"PCI {self.bdf}: saved state is not an fbuf's")
        packed = decode(state["vram"], f"PCI {self.bdf} video memory", limit=len(self.vram) * 2)
        try:
            inflater = zlib.decompressobj()
            vram = inflater.decompress(packed, len(self.vram) + 1)
        except zlib.error:
            raise StateError(f"PCI {self.bdf} video memory is not zlib data") from None
        if len(vram) != len(self.vram) or inflater.unconsumed_tail:
            raise StateError(f"PCI {self.bdf} video memory is not {len(self.vram)} bytes")
        rest = {key: value for key, value in state.items() if key not in ("vga", "vram")}
        VgaState(self.state.vram, self.context.warn_once).restore_state(state["vga"])  # check
        super().restore_state(rest)
        self.state.restore_state(state["vga"])
        self.vram[:] = vram
        self.renderer.invalidate()

    def teardown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for bus, entry in self._ranges:
            bus.unregister(entry)
        self._ranges = []
        self.state.vram.release()
        try:
            self.vram.close()
        except BufferError:         # a frame being encoded still holds it: the GC frees it
            pass


@emulation("stdvga")
class StdVgaPlain(StdVga):
    __doc__ = StdVga.__doc__        # the same device under QEMU's name; fbuf is bhyve's
