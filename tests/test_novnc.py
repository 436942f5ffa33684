"""The web console: noVNC (Debian's novnc, unmodified) in headless Chromium
connects straight to pyhyve's VNC port over WebSocket, and the page shows
the guest's screen pixel for pixel as pyhyve's own screenshot has it."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from guestrun import REPO
from test_vnc import NO_BOOT, pyhyve, stop, vnc_port, wait_for, without_cell

NOVNC = Path("/usr/share/novnc")
WINDOW = (1280, 800)            # room for 720x400 at 1:1, with noVNC's status bar


@pytest.fixture
def novnc_site():
    """noVNC's files served over HTTP on the loopback, as a web console would serve them."""
    if not (NOVNC / "vnc_lite.html").exists():
        pytest.skip("noVNC is not installed (apt-get install novnc)")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(NOVNC))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def browser_screenshot(url: str, path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    # --no-sandbox: Chromium refuses to run as root with its own sandbox; the
    # virtual time budget lets the page connect and draw before the shot.
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                    "--virtual-time-budget=15000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)


def unseen(image):
    """IMAGE without what the two may differ in: the cell where the cursor
    blinks, and the screen's bottom-right corner, where Chromium draws the
    canvas's resize corner over the guest's last pixels."""
    image = without_cell(image, 0, 8)
    image.paste((0, 0, 0), (image.width - 8, image.height - 8, image.width, image.height))
    return image


def find(screen, page) -> tuple[int, int] | None:
    """Where SCREEN (an RGB image) appears whole in PAGE, or None."""
    width = screen.width * 3
    first = screen.tobytes()[:width]
    page_bytes, stride = page.tobytes(), page.width * 3
    for y in range(page.height - screen.height + 1):
        row = page_bytes[y * stride:(y + 1) * stride]
        x = row.find(first)
        while x >= 0:
            if x % 3 == 0 and page.crop((x // 3, y, x // 3 + screen.width,
                                         y + screen.height)).tobytes() == screen.tobytes():
                return x // 3, y
            x = row.find(first, x + 1)
    return None


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_novnc_in_chromium_shows_the_guest_screen(novnc_site, tmp_path):
    from PIL import Image
    port = vnc_port()
    log = tmp_path / "debug.log"
    proc = pyhyve(["-l", f"debugcon,file={log}", "-s", f"3,fbuf,tcp=127.0.0.1:{port}"],
                  "vnc-web", tmp_path)
    try:
        wait_for(log, NO_BOOT)
        time.sleep(1)
        reference = tmp_path / "pyhyve.png"
        subprocess.run([sys.executable, "-m", "pyhyve.ctlclient", "--vm=vnc-web",
                        f"--screenshot={reference}"], check=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
        with Image.open(reference) as image:
            screen = unseen(image.convert("RGB"))
        # Chromium's virtual time runs ahead of the WebSocket's real one: a shot
        # may come before the first frame was drawn; a few page loads suffice.
        for attempt in range(5):
            page = tmp_path / f"chromium{attempt}.png"
            browser_screenshot(f"{novnc_site}/vnc_lite.html?host=127.0.0.1&port={port}", page)
            with Image.open(page) as image:
                shot = image.convert("RGB")
            assert shot.size == WINDOW
            where = find(screen.crop((0, 0, screen.width, 8 * 16)), shot)
            if where is not None:
                break
    finally:
        stop(proc)
    assert where is not None, "the guest's screen is not on the page"
    x, y = where
    shown = unseen(shot.crop((x, y, x + screen.width, y + screen.height)))
    assert shown.tobytes() == screen.tobytes()
    assert any(screen.tobytes())
