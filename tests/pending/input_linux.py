"""Linux's own input drivers judge pyhyve's keyboards and tablets: one boot under
pyhyve and one under QEMU (the reference) with the same devices (an xHCI
controller with a USB tablet, a virtio keyboard and tablet, beside the
i8042's keyboard), keys and pointer moves sent through QMP's
input-send-event while the guest reads /dev/input/event*.

The guest lists /proc/bus/input/devices, starts a reader (dd, one 24-byte
struct input_event a block) on the virtio devices' and the PS/2 keyboard's
event nodes, and says INPUT-READY; the host sends keys (a qcode, then QEMU's
key number) and a click, which go to the virtio keyboard and tablet.  The
guest then unbinds the virtio drivers, so that events go to the i8042's
keyboard and the USB tablet (a device whose driver is gone is not ready:
pyhyve.inputroute; QEMU deactivates it), reads the USB tablet too and says
I8042-READY; the host sends a key and a click again, through the control
socket's send-input under pyhyve (QMP under QEMU).  The guest dumps what each
reader got.  One boot each: marked `linux`, run under
`flock /tmp/pyhyve-linux.lock`.
"""

import asyncio
import json
import re
import socket
import struct

import pytest
from qemu.qmp import QMPClient

from firmware import require_program
from linuxguest import GuestRun, pyhyve_command, pyhyve_env, qemu_command, sections, \
    with_script

pytestmark = [pytest.mark.linux, pytest.mark.usefixtures("needs_kvm")]

EV_SYN, EV_KEY, EV_ABS, EV_MSC = 0, 1, 3, 4
KEY_A, KEY_B, KEY_Z, BTN_LEFT = 30, 48, 44, 0x110
ABS_X, ABS_Y, MSC_SCAN = 0, 1, 4
X, Y = 0x1234, 0x6543
X2, Y2 = 0x7FFF, 0x10

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
dd if=/dev/input/$K of=/tmp/keyboard bs=24 2>/dev/null &
dd if=/dev/input/$T of=/tmp/tablet bs=24 2>/dev/null &
dd if=/dev/input/$A of=/tmp/atkbd bs=24 2>/dev/null &
sleep 2
echo INPUT-READY
read answer
sleep 5
for n in $K $T; do
  basename $(readlink -f /sys/class/input/$n/device/device) > /sys/bus/virtio/drivers/virtio_input/unbind
done
dd if=/dev/input/$U of=/tmp/usbtablet bs=24 2>/dev/null &
sleep 2
echo I8042-READY
read answer
sleep 5
for file in keyboard tablet atkbd usbtablet; do
  section events_$file
  hexdump -v -e '24/1 "%02x" "\n"' /tmp/$file
done
section dmesg
dmesg | grep -i -E "xhci|usb|hid|input|atkbd|i8042|virtio"
section end
"""


def key(down: bool, kind: str, value) -> dict:
    return {"type": "key", "data": {"down": down, "key": {"type": kind, "data": value}}}


def click(x: int, y: int) -> list[list[dict]]:
    return [[{"type": "abs", "data": {"axis": "x", "value": x}},
             {"type": "abs", "data": {"axis": "y", "value": y}},
             {"type": "btn", "data": {"down": True, "button": "left"}}],
            [{"type": "btn", "data": {"down": False, "button": "left"}}]]


VIRTIO_EVENTS = [[key(True, "qcode", "a"), key(False, "qcode", "a")],
                 [key(True, "number", KEY_B), key(False, "number", KEY_B)], *click(X, Y)]
# once the virtio drivers are gone: the i8042's keyboard and the USB tablet
LEGACY_EVENTS = [[key(True, "qcode", "z"), key(False, "qcode", "z")], *click(X2, Y2)]


def send_qmp(path: str, event_lists: list) -> None:
    async def main():
        client = QMPClient("pyhyve-input-test")
        await asyncio.wait_for(client.connect(path), 60)
        try:
            for events in event_lists:
                await client.execute("input-send-event", {"events": events})
        finally:
            await client.disconnect()
    asyncio.run(main())


def send_control(path: str, events: list) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(path)
        sock.sendall(json.dumps({"command": "send-input", "events": events}).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, "the control socket closed"
            answer += chunk
    assert json.loads(answer)["ok"], answer


class InputBoot:
    """What one boot showed: the console's sections, parsed."""

    def __init__(self, side: str, guest, tmp):
        self.side = side
        initrd = with_script(guest, tmp, SCRIPT)
        qmp, control = str(tmp / "qmp.sock"), str(tmp / "ctl.sock")
        if side == "pyhyve":
            argv = pyhyve_command(guest, initrd, "-s", "3,xhci,tablet", "-s", "4,virtio-keyboard",
                                  "-s", "5,virtio-tablet", "-o", f"qmp.socket={qmp}",
                                  "-o", f"control.socket={control}", name="linuxinput")
            env = pyhyve_env()
        else:
            argv = qemu_command(guest, initrd, "-device", "qemu-xhci,addr=3",
                                "-device", "usb-tablet", "-device", "virtio-keyboard-pci,addr=4",
                                "-device", "virtio-tablet-pci,addr=5",
                                "-qmp", f"unix:{qmp},server=on,wait=off")
            env = None
        with GuestRun(argv, env, tmp / "console.log") as run:
            run.expect("INPUT-READY")
            send_qmp(qmp, VIRTIO_EVENTS)
            run.send("sent\n")
            run.expect("I8042-READY")
            if side == "pyhyve":
                for events in LEGACY_EVENTS:
                    send_control(control, events)
            else:
                send_qmp(qmp, LEGACY_EVENTS)
            run.send("sent\n")
            run.expect("@@@ end")
            self.sections = sections(run.output)

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


BOOTS: dict[str, InputBoot] = {}     # by side, for the comparison once both ran


@pytest.fixture(scope="module", params=["pyhyve", "qemu"])
def boot(request, linux_guest, tmp_path_factory):
    if request.param == "qemu":
        require_program("qemu-system-x86_64", "qemu-system-x86")
    BOOTS[request.param] = InputBoot(request.param, linux_guest,
                                     tmp_path_factory.mktemp(request.param))
    return BOOTS[request.param]


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


def test_capabilities_match_qemus(boot):
    """Once both booted, each device's evdev bitmaps beside QEMU's 7.2:
    - the PS/2 keyboard's are the same;
    - the pointers' axes (ABS) are the same, and their buttons (KEY) are among
      QEMU's, which also offers side and extra buttons pyhyve's router has not;
    - the virtio tablet's wheel is REL_WHEEL (QEMU 8.1's wheel-axis default;
      7.2 sends wheel steps as BTN_GEAR_UP/DOWN key events instead), so its
      EV and REL bitmaps are not compared;
    - the virtio keyboard has every key code below the buttons, QEMU's the
      keys its key table maps (among them), and the same EV and LED bits."""
    if set(BOOTS) != {"pyhyve", "qemu"}:
        pytest.skip("compares the pyhyve boot with the QEMU one")
    ours, theirs = BOOTS["pyhyve"].devices(), BOOTS["qemu"].devices()

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


def _bits(bitmap: str) -> set[int]:
    """The bits set in a /proc/bus/input/devices bitmap (hex words, most significant first)."""
    bits = set()
    for position, word in enumerate(reversed(bitmap.split())):
        value = int(word, 16)
        bits.update(64 * position + bit for bit in range(64) if value >> bit & 1)
    return bits


def test_events_reach_dev_input(boot):
    keys = [event for event in boot.events("keyboard") if event[0] == EV_KEY]
    assert keys == [(EV_KEY, KEY_A, 1), (EV_KEY, KEY_A, 0), (EV_KEY, KEY_B, 1),
                    (EV_KEY, KEY_B, 0)]
    for reader, x, y in (("tablet", X, Y), ("usbtablet", X2, Y2)):
        moves = [event for event in boot.events(reader) if event[0] != EV_MSC]
        assert moves == [(EV_ABS, ABS_X, x), (EV_ABS, ABS_Y, y), (EV_KEY, BTN_LEFT, 1),
                         (EV_SYN, 0, 0), (EV_KEY, BTN_LEFT, 0), (EV_SYN, 0, 0)], reader
    atkbd = boot.events("atkbd")
    assert [event for event in atkbd if event[0] == EV_KEY] == [(EV_KEY, KEY_Z, 1),
                                                                 (EV_KEY, KEY_Z, 0)]
    assert (EV_MSC, MSC_SCAN, 0x2C) in atkbd             # Z's set-1 code, translated
