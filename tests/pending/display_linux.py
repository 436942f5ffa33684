"""Linux's bochs DRM driver on pyhyve's standard VGA (-s 3,fbuf): the guest
finds the device, sets a mode through the DISPI registers, and what it
writes to /dev/fb0 (the linear framebuffer, guest RAM logged dirty by KVM)
reaches a VNC client, which learns the new size from DesktopSize.

One boot (minutes here); QEMU is not booted for comparison, the bochs
driver's mode and the pixels written being fixed by the script itself."""

import time

import pytest

from guestrun import free_port
from linuxguest import GuestRun, pyhyve_command, pyhyve_env, sections, with_script

pytestmark = [pytest.mark.linux, pytest.mark.e2e, pytest.mark.usefixtures("needs_kvm")]

SCRIPT = r"""
section drm
cat /proc/fb
for d in /sys/class/drm/card0/device; do cat $d/vendor $d/device $d/class; done
cat /sys/class/graphics/fb0/virtual_size /sys/class/graphics/fb0/bits_per_pixel
section draw
dd if=/dev/zero bs=4096 count=64 2>/dev/null | tr '\000' '\377' > /dev/fb0 && echo drawn
section done
sleep 600
"""


WHITE = (512, 16, 1024, 64)             # inside what the script filled, clear of fbcon's cursor


def is_white(screen) -> bool:
    return screen.crop(WHITE).getextrema() == ((255, 255),) * 3


@pytest.fixture(scope="module")
def bochs_boot(linux_guest, tmp_path_factory):
    """Boot once; the VNC client's view of the screen once the script drew.
    The fbdev emulation copies what /dev/fb0 got into video memory from a
    deferred worker, slow in an emulated guest: look until the fill shows
    (or a minute passed), and keep the last look in the test's directory."""
    api = pytest.importorskip("vncdotool.api")
    tmp = tmp_path_factory.mktemp("linux-display")
    initrd = with_script(linux_guest, tmp, SCRIPT)
    port = free_port()
    command = pyhyve_command(linux_guest, initrd, "-s", f"3,fbuf,tcp=127.0.0.1:{port}",
                             name="linux-display")
    with GuestRun(command, pyhyve_env(), tmp / "console.log") as run:
        run.expect("@@@ done")
        client = api.connect(f"127.0.0.1::{port}", timeout=60)
        try:
            deadline = time.monotonic() + 60
            while True:
                client.refreshScreen()
                screen = client.screen.convert("RGB")
                if is_white(screen) or time.monotonic() > deadline:
                    break
                time.sleep(2)
        finally:
            client.disconnect()
            api.shutdown()
        screen.save(tmp / "screen.png")
        output = run.output
    return sections(output), screen


def test_bochs_drm_drives_the_device(bochs_boot):
    found, _ = bochs_boot
    drm = found["drm"].split()
    assert "bochs-drm" in found["drm"] or "bochsdrmfb" in found["drm"], found["drm"]
    assert "0x1234" in drm and "0x1111" in drm and "0x030000" in drm
    assert "1024,768" in found["drm"] and "32" in drm
    assert "drawn" in found["draw"]


def test_what_linux_drew_reaches_the_vnc_client(bochs_boot):
    _, screen = bochs_boot
    assert screen.size == (1024, 768)                    # learned through DesktopSize
    assert is_white(screen), "the filled lines did not reach the client (screen.png)"
    assert screen.crop((0, 64, 1024, 768)).getextrema() != ((255, 255),) * 3
