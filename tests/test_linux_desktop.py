"""Linux's own display and input drivers judge pyhyve's graphical console: one
boot under pyhyve and one under QEMU (the reference) with the same devices at
the same addresses, a standard VGA shown over VNC, an xHCI controller with a
USB tablet, a virtio keyboard and tablet, beside the i8042's keyboard.

Display: the guest's bochs DRM driver sets the mode its EDID prefers (both
sides offer 1024x768).  The script clears tty0 (QEMU's SeaBIOS leaves its
banner on the text console fbcon takes over; pyhyve's direct kernel boot runs
no firmware), writes a line there, hides fbcon's cursor and fills the top 64
lines of /dev/fb0 white in one write; a VNC client (vncdotool, from PyPI)
reads the screen until the fill shows (the fbdev emulation copies its shadow
buffer from a deferred worker, slow in an emulated guest).  One write,
because Linux 6.1's fbdev damage tracking (drm_fb_helper_memory_range_to_clip)
makes an empty rectangle of a write that covers exactly one whole line: a
fill written a line at a time left random lines black under both VMMs.

Input: readers (dd, one 24-byte struct input_event a block) on every event
node; QMP's input-send-event sends keys and a click, the guest binds the
virtio tablet's driver again and QMP clicks once more, then the guest unbinds
the virtio drivers and a VNC client moves, clicks and types.  Where each
event lands follows QEMU's rule, the device activated last among those whose
driver is there (pyhyve.inputroute), and every reader's events are compared
with QEMU's.
"""

import asyncio
import re
import struct
import time

import pytest

from firmware import require_program
from guestrun import free_port
from linuxguest import (QEMU_SKIP_PRT, GuestRun, pyhyve_command, pyhyve_env, qemu_command,
                        sections, with_script)
from pyhyve.inputroute import POINTER_MAX

pytestmark = [pytest.mark.linux, pytest.mark.usefixtures("needs_kvm")]

EV_SYN, EV_KEY, EV_ABS, EV_MSC = 0, 1, 3, 4
KEY_A, KEY_B, KEY_Z, BTN_LEFT = 30, 48, 44, 0x110
ABS_X, ABS_Y, MSC_SCAN = 0, 1, 4
X, Y = 0x1234, 0x6543                   # QMP's absolute axes, 0 to 0x7FFF
X2, Y2 = 0x2345, 0x3456                 # the second QMP click's
VNC_X, VNC_Y = 700, 500                 # a VNC client's pixel
WIDTH, HEIGHT = 1024, 768               # bochs-drm's default mode on both
WHITE = (0, 0, WIDTH, 64)               # what the script fills
TEXT = (0, 96, WIDTH, 112)              # fbcon's seventh row (8x16 font): the script's line

# VGA at 2, xHCI at 3, virtio keyboard at 4, virtio tablet at 5, on both sides.
SCRIPT = r"""
section input_devices
cat /proc/bus/input/devices
node() {
  awk -v name="$1" '/^N: Name=/ { hit = index($0, name) > 0 }
    /^H: Handlers=/ && hit { if (match($0, /event[0-9]+/)) print substr($0, RSTART, RLENGTH)
                             hit = 0 }' \
    /proc/bus/input/devices
}
K=$(node "Virtio Keyboard"); T=$(node "Virtio Tablet"); A=$(node "Set 2 keyboard")
U=$(node "USB Tablet")
section nodes
echo "$K $T $A $U"
M=$(node "PS/2 Generic")
section modes
cat /sys/class/drm/card0-*/modes
section drm
cat /proc/fb
d=/sys/class/drm/card0/device; cat $d/vendor $d/device $d/class
cat /sys/class/graphics/fb0/virtual_size /sys/class/graphics/fb0/bits_per_pixel
section draw
printf '\033[?25l\033[H\033[2J\n\n\n\n\n\nfbcon on bochs-drm\n' > /dev/tty0
echo 0 > /sys/class/graphics/fbcon/cursor_blink
dd if=/dev/zero bs=4096 count=64 2>/dev/null | tr '\000' '\377' > /tmp/white
dd if=/tmp/white of=/dev/fb0 bs=262144 2>/dev/null && echo drawn
echo DRAWN
dd if=/dev/input/$K of=/tmp/keyboard bs=24 2>/dev/null &
dd if=/dev/input/$T of=/tmp/tablet bs=24 2>/dev/null &
dd if=/dev/input/$A of=/tmp/atkbd bs=24 2>/dev/null &
dd if=/dev/input/$U of=/tmp/usbfirst bs=24 2>/dev/null &
touch /tmp/ps2mouse
[ -n "$M" ] && dd if=/dev/input/$M of=/tmp/ps2mouse bs=24 2>/dev/null &
sleep 2
echo INPUT-READY
read answer
sleep 5
virtio() { basename $(readlink -f /sys/class/input/$1/device/device); }
V=$(virtio $T)
echo $V > /sys/bus/virtio/drivers/virtio_input/unbind
echo $V > /sys/bus/virtio/drivers/virtio_input/bind
sleep 2
T2=$(node "Virtio Tablet")
dd if=/dev/input/$T2 of=/tmp/tablet2 bs=24 2>/dev/null &
sleep 2
echo REBOUND
read answer
sleep 5
for n in $K $T2; do
  virtio $n > /sys/bus/virtio/drivers/virtio_input/unbind
done
dd if=/dev/input/$U of=/tmp/usbtablet bs=24 2>/dev/null &
sleep 2
echo VNC-READY
read answer
sleep 5
for file in keyboard tablet tablet2 atkbd usbfirst usbtablet ps2mouse; do
  section events_$file
  hexdump -v -e '24/1 "%02x" "\n"' /tmp/$file
done
section end
"""


def key(down: bool, kind: str, value) -> dict:
    return {"type": "key", "data": {"down": down, "key": {"type": kind, "data": value}}}


def click(x: int, y: int) -> list[list[dict]]:
    return [[{"type": "abs", "data": {"axis": "x", "value": x}},
             {"type": "abs", "data": {"axis": "y", "value": y}},
             {"type": "btn", "data": {"down": True, "button": "left"}}],
            [{"type": "btn", "data": {"down": False, "button": "left"}}]]


QMP_EVENTS = [[key(True, "qcode", "a"), key(False, "qcode", "a")],
              [key(True, "number", KEY_B), key(False, "number", KEY_B)], *click(X, Y)]


def send_qmp(path: str, event_lists: list) -> None:
    from qemu.qmp import QMPClient

    async def main():
        client = QMPClient("pyhyve-desktop-test")
        await asyncio.wait_for(client.connect(path), 60)
        try:
            for events in event_lists:
                await client.execute("input-send-event", {"events": events})
        finally:
            await client.disconnect()
    asyncio.run(main())


def is_white(screen) -> bool:
    return screen.crop(WHITE).getextrema() == ((255, 255),) * 3


def look_until_drawn(api, port: int, timeout: float = 120):
    """The screen once the fill shows, or the last look (a fresh connection
    each look, as test_vnc.py's grab())."""
    deadline = time.monotonic() + timeout
    while True:
        client = api.connect(f"127.0.0.1::{port}", timeout=60)
        try:
            client.refreshScreen()
            screen = client.screen.convert("RGB")
        finally:
            client.disconnect()
        if is_white(screen) or time.monotonic() > deadline:
            return screen
        time.sleep(2)


def click_and_type(api, port: int) -> None:
    """A move, a left click and a key, from one VNC client."""
    client = api.connect(f"127.0.0.1::{port}", timeout=60)
    try:
        client.mouseMove(VNC_X, VNC_Y)
        client.mouseDown(1)
        client.mouseUp(1)
        client.keyPress("z")
    finally:
        client.disconnect()


class DesktopBoot:
    """What one boot showed: the console's sections, the screen as VNC saw it."""

    def __init__(self, side: str, guest, tmp, api):
        self.side = side
        initrd = with_script(guest, tmp, SCRIPT)
        qmp, vnc_port = str(tmp / "qmp.sock"), free_port()
        if side == "pyhyve":
            argv = pyhyve_command(guest, initrd, "-s", f"2,fbuf,tcp=127.0.0.1:{vnc_port}",
                                  "-s", "3,xhci,tablet", "-s", "4,virtio-keyboard",
                                  "-s", "5,virtio-tablet", "-o", f"qmp.socket={qmp}",
                                  "-o", f"control.socket={tmp / 'ctl.sock'}",
                                  name="linuxdesktop")
            env = pyhyve_env()
        else:
            argv = qemu_command(guest, initrd, "-device",
                                f"VGA,addr=2,xres={WIDTH},yres={HEIGHT}",
                                "-vnc", f"127.0.0.1:{vnc_port - 5900}",
                                "-device", "qemu-xhci,addr=3", "-device", "usb-tablet",
                                "-device", "virtio-keyboard-pci,addr=4",
                                "-device", "virtio-tablet-pci,addr=5",
                                "-qmp", f"unix:{qmp},server=on,wait=off",
                                extra_cmdline=QEMU_SKIP_PRT)
            env = None
        with GuestRun(argv, env, tmp / "console.log") as run:
            run.expect("DRAWN")
            self.screen = look_until_drawn(api, vnc_port)
            self.screen.save(tmp / "screen.png")
            run.expect("INPUT-READY")
            send_qmp(qmp, QMP_EVENTS)
            run.send("sent\n")
            run.expect("REBOUND")
            send_qmp(qmp, click(X2, Y2))
            run.send("sent\n")
            run.expect("VNC-READY")
            click_and_type(api, vnc_port)
            run.send("sent\n")
            run.expect("@@@ end")
            self.output = run.output
        self.sections = sections(self.output)

    def devices(self) -> dict[str, dict[str, str]]:
        """/proc/bus/input/devices: each device's lines by their letter (B: by
        the bitmap's name), keyed by its name."""
        found = {}
        for block in re.split(r"\n(?=I: )", self.sections["input_devices"]):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            entry = {letter: text for letter, text in lines.items() if letter != "B"}
            for line in block.splitlines():
                if line.startswith("B: "):
                    name, _, value = line[3:].partition("=")
                    entry[f"B:{name}"] = value
            found[lines["N"].removeprefix("Name=").strip('"')] = entry
        return found

    def events(self, reader: str) -> list[tuple[int, int, int]]:
        """(type, code, value) of each struct input_event the reader got."""
        out = []
        for line in self.sections[f"events_{reader}"].split():
            raw = bytes.fromhex(line)
            out.append(struct.unpack("<HHi", raw[16:24]))
        return out


BOOTS: dict[str, DesktopBoot] = {}     # by side, for the comparisons once both ran


@pytest.fixture(scope="module", params=["pyhyve", "qemu"])
def boot(request, linux_guest, tmp_path_factory, vnc_api):
    if request.param == "qemu":
        require_program("qemu-system-x86_64", "qemu-system-x86")
    BOOTS[request.param] = DesktopBoot(request.param, linux_guest,
                                       tmp_path_factory.mktemp(f"desktop-{request.param}"),
                                       vnc_api)
    return BOOTS[request.param]


def both() -> tuple[DesktopBoot, DesktopBoot]:
    if set(BOOTS) != {"pyhyve", "qemu"}:
        pytest.skip("compares the pyhyve boot with the QEMU one")
    return BOOTS["pyhyve"], BOOTS["qemu"]


# --- display -------------------------------------------------------------------------------
def test_bochs_drm_drives_the_standard_vga(boot):
    found = boot.sections
    assert "bochs-drm" in found["drm"] or "bochsdrmfb" in found["drm"], found["drm"]
    drm = found["drm"].split()
    assert drm[-5:] == ["0x1234", "0x1111", "0x030000", f"{WIDTH},{HEIGHT}", "32"], drm
    assert "drawn" in found["draw"]


def test_the_edid_makes_w_by_h_the_preferred_mode(boot):
    """Both offer an EDID preferring 1024x768 (pyhyve's w x h, QEMU's xres and
    yres).  QEMU's lists larger standard modes too; pyhyve's lists only its
    own size and the established modes that fit, all among QEMU's."""
    modes = boot.sections["modes"].split()
    assert modes[0] == f"{WIDTH}x{HEIGHT}"
    ours, theirs = both()
    assert set(ours.sections["modes"].split()) <= set(theirs.sections["modes"].split())


def test_what_linux_drew_reaches_the_vnc_client(boot):
    """The fill, and fbcon's text: a line of its 8x16 font on its seventh row,
    the rows above it (but the fill) and below it black."""
    assert boot.screen.size == (WIDTH, HEIGHT)           # learned through DesktopSize
    assert is_white(boot.screen), "the fill did not reach the client (screen.png)"
    black = ((0, 0),) * 3
    assert boot.screen.crop((0, 64, WIDTH, TEXT[1])).getextrema() == black
    assert boot.screen.crop(TEXT).getextrema() != black, "no text on fbcon's row"
    assert boot.screen.crop((18 * 8, TEXT[1], WIDTH, HEIGHT)).getextrema() == black


def test_the_screen_is_qemus_pixel_for_pixel(boot):
    """The same driver, mode and fill, the cursor hidden: every pixel equal."""
    ours, theirs = both()
    assert ours.screen.size == theirs.screen.size
    same = ours.screen.tobytes() == theirs.screen.tobytes()   # no diff of 3 MiB in the report
    assert same, "the screens differ (screen.png on each side)"


# --- input ---------------------------------------------------------------------------------
def names(side: str) -> dict[str, str]:
    """The devices by role.  pyhyve's say pyhyve where QEMU's say QEMU (the
    USB tablet's name is its manufacturer's and product's strings); their
    IDs are the same, which is what guests match quirks on."""
    maker = "pyhyve" if side == "pyhyve" else "QEMU"
    return {"keyboard": f"{maker} Virtio Keyboard", "tablet": f"{maker} Virtio Tablet",
            "atkbd": "AT Translated Set 2 keyboard",
            "usbtablet": "pyhyve USB Tablet" if side == "pyhyve" else "QEMU QEMU USB Tablet"}


def test_proc_bus_input_devices_lists_them(boot):
    devices = boot.devices()
    roles = names(boot.side)
    for name in roles.values():
        assert name in devices, sorted(devices)
    assert devices[roles["keyboard"]]["I"] == "Bus=0006 Vendor=0627 Product=0001 Version=0001"
    assert devices[roles["tablet"]]["I"] == "Bus=0006 Vendor=0627 Product=0003 Version=0002"
    assert devices[roles["usbtablet"]]["I"].startswith("Bus=0003 Vendor=0627 Product=0001")
    for role in ("tablet", "usbtablet"):
        assert devices[roles[role]]["B:ABS"] == "3"                   # ABS_X, ABS_Y
    assert len(boot.sections["nodes"].split()) == 4


def test_linux_prints_the_hid_version_each_usb_tablet_gives(boot):
    """hid-generic prints the tablet's bcdHID: 1.11 (the HID specification
    pyhyve's descriptors follow) on pyhyve, 0.01 on QEMU 7.2, whose HID class
    descriptor says 0x0001; nothing reads it beyond that line."""
    found = re.search(r"input: USB HID v(\d+\.\d+) Mouse", boot.output)
    assert found and found.group(1) == ("1.11" if boot.side == "pyhyve" else "0.01")


def _bits(bitmap: str) -> set[int]:
    """The bits set in a /proc/bus/input/devices bitmap (hex words, most significant first)."""
    bits = set()
    for position, word in enumerate(reversed(bitmap.split())):
        value = int(word, 16)
        bits.update(64 * position + bit for bit in range(64) if value >> bit & 1)
    return bits


def test_capabilities_match_qemus(boot):
    """Each device's evdev bitmaps beside QEMU 7.2's:
    - the PS/2 keyboard's are the same;
    - the pointers' axes (ABS) are the same, and their buttons (KEY) are among
      QEMU's, which also offers side and extra buttons pyhyve's router has not;
    - the virtio tablet's wheel is REL_WHEEL (QEMU 8.1's wheel-axis default;
      7.2 sends wheel steps as BTN_GEAR_UP/DOWN key events instead), so its
      EV and REL bitmaps are not compared;
    - the virtio keyboard has every key code below the buttons, QEMU's the
      keys its key table maps (among them), and the same EV and LED bits."""
    ours, theirs = (side.devices() for side in both())

    def bitmaps(role: str):
        return ours[names("pyhyve")[role]], theirs[names("qemu")[role]]

    mine, reference = bitmaps("atkbd")
    assert {k: v for k, v in mine.items() if k.startswith("B:")} == \
        {k: v for k, v in reference.items() if k.startswith("B:")}
    for role in ("tablet", "usbtablet"):
        mine, reference = bitmaps(role)
        assert mine["B:ABS"] == reference["B:ABS"]
        assert _bits(mine["B:KEY"]) <= _bits(reference["B:KEY"]), role
    mine, reference = bitmaps("usbtablet")
    assert mine.get("B:REL") == reference.get("B:REL")
    mine, reference = bitmaps("keyboard")
    assert _bits(reference["B:KEY"]) <= _bits(mine["B:KEY"])
    assert (mine["B:EV"], mine.get("B:LED")) == (reference["B:EV"], reference.get("B:LED"))


def pointer(events) -> list[tuple[int, int, int]]:
    """A pointer's events less MSC_SCAN (the USB tablet's HID usages)."""
    return [event for event in events if event[0] != EV_MSC]


def test_qmp_events_go_where_qemus_go(boot):
    """As QEMU gives input to the device activated last (a virtio driver's
    DRIVER_OK, a USB tablet's first poll):
    - the keys reach the virtio keyboard, the qcode keys of one command in one
      input frame, each key number in a frame of its own;
    - the first click reaches the USB tablet, polled since its reader opened,
      after the virtio tablet's driver came up at boot: one report with the
      position and the press, then the release;
    - the second click, after the virtio tablet's driver was bound again,
      reaches the virtio tablet (its new event node)."""
    assert boot.events("keyboard") == [
        (EV_KEY, KEY_A, 1), (EV_KEY, KEY_A, 0), (EV_SYN, 0, 0),
        (EV_KEY, KEY_B, 1), (EV_SYN, 0, 0), (EV_KEY, KEY_B, 0), (EV_SYN, 0, 0)]
    assert boot.events("tablet") == []
    assert pointer(boot.events("usbfirst"))[:7] == [
        (EV_KEY, BTN_LEFT, 1), (EV_ABS, ABS_X, X), (EV_ABS, ABS_Y, Y), (EV_SYN, 0, 0),
        (EV_KEY, BTN_LEFT, 0), (EV_SYN, 0, 0), (EV_ABS, ABS_X, VNC_X * POINTER_MAX // WIDTH)]
    assert pointer(boot.events("tablet2")) == [
        (EV_ABS, ABS_X, X2), (EV_ABS, ABS_Y, Y2), (EV_KEY, BTN_LEFT, 1), (EV_SYN, 0, 0),
        (EV_KEY, BTN_LEFT, 0), (EV_SYN, 0, 0)]
    assert boot.events("ps2mouse") == []                  # QEMU's PS/2 mouse: nothing either


def test_every_reader_got_what_qemus_got(boot):
    """Event for event (timestamps aside), every reader of the pyhyve boot got
    what the same reader got under QEMU."""
    ours, theirs = both()
    for reader in ("keyboard", "tablet", "tablet2", "atkbd", "usbfirst", "usbtablet",
                   "ps2mouse"):
        assert ours.events(reader) == theirs.events(reader), reader


def test_vnc_click_reaches_the_usb_tablet_scaled_as_qemu_does(boot):
    """A VNC pixel becomes pixel * 0x7FFF / size on both sides (QEMU 7.2's
    scaling); the move, the press and the release are three pointer events."""
    x, y = VNC_X * POINTER_MAX // WIDTH, VNC_Y * POINTER_MAX // HEIGHT
    assert pointer(boot.events("usbtablet")) == [
        (EV_ABS, ABS_X, x), (EV_ABS, ABS_Y, y), (EV_SYN, 0, 0), (EV_KEY, BTN_LEFT, 1),
        (EV_SYN, 0, 0), (EV_KEY, BTN_LEFT, 0), (EV_SYN, 0, 0)]


def test_vnc_key_reaches_the_i8042_keyboard(boot):
    atkbd = boot.events("atkbd")
    assert [event for event in atkbd if event[0] == EV_KEY] == [(EV_KEY, KEY_Z, 1),
                                                                 (EV_KEY, KEY_Z, 0)]
    assert (EV_MSC, MSC_SCAN, 0x2C) in atkbd             # Z's set-1 code, translated
