"""The VNC server, judged by a real client (vncdotool) against pyhyve and
against QEMU (-vga std -vnc) running the same guests: SeaBIOS's screen and
GRUB's menu compared pixel for pixel, keys typed into GRUB's command line,
VNC Authentication, `wait`, and the encodings a client may ask for."""

import asyncio
import os
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from firmware import require_file, require_program
from grubdisk import BOOT_IMG, build_grub_disk
from guestrun import REPO, free_port
from pyhyve.vnc import encodings as E
from pyhyve.vnc.des import encrypt_block, vnc_response

SEABIOS = "/usr/share/seabios/bios.bin"
NO_BOOT = "No bootable device."
CELL_W, CELL_H = 9, 16                  # mode 3's character cell
MENU_ENTRY = "pyhyve display test"
TYPED = "echo vncok"              # short: GRUB takes seconds a key here
GRUB_MENU_CFG = f"""serial --unit=0 --speed=115200
terminal_input console
terminal_output console serial
set timeout=-1
menuentry '{MENU_ENTRY}' {{
  echo chosen
}}
"""


def test_des_known_answer_and_vnc_key():
    """FIPS 46's worked example, and VNC's bit-reversed key as another
    implementation (vncdotool's, on the cryptography package) computes it."""
    assert encrypt_block(bytes.fromhex("133457799BBCDFF1"),
                         bytes.fromhex("0123456789ABCDEF")).hex() == "85e813540f0ab405"
    rfb = pytest.importorskip("vncdotool.rfb")
    challenge = bytes(range(16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # cryptography's TripleDES is deprecated
        expected = rfb.des_encrypt(rfb._vnc_des("secret12"), challenge)
    assert vnc_response("secret12", challenge) == expected
    assert vnc_response("secret123", challenge) == expected          # 8 characters count


def test_pixel_format_conversion():
    pixel = bytes((0x10, 0x80, 0xF8, 0))                   # B, G, R
    rgb565 = E.PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
    value = ((0xF8 * 31 + 127) // 255) << 11 | ((0x80 * 63 + 127) // 255) << 5 | \
        ((0x10 * 31 + 127) // 255)
    assert rgb565.convert(pixel * 2) == value.to_bytes(2, "little") * 2
    big = E.PixelFormat(32, 24, True, True, 255, 255, 255, 0, 8, 16)   # R in the low byte
    assert big.convert(pixel) == bytes((0, 0x10, 0x80, 0xF8))
    assert E.PixelFormat().convert(pixel) == pixel
    bgr233 = E.PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)
    assert bgr233.convert(bytes((0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0))) == bytes((0xFF, 0x07))
    assert E.PixelFormat(bpp=24).problem() and E.PixelFormat(true_colour=False).problem()


# --- against real guests ----------------------------------------------------------------------

def grab(api, port: int, password: str | None = None, encoding: int | None = None):
    """The screen as a VNC client sees it, RGB."""
    factory_class = None
    if encoding is not None:
        from vncdotool import client as vclient

        class Client(vclient.VNCDoToolClient):
            pass
        Client.encoding = encoding

        class Factory(vclient.VNCDoToolFactory):
            protocol = Client
        factory_class = Factory
    kwargs = {"factory_class": factory_class} if factory_class else {}
    client = api.connect(f"127.0.0.1::{port}", password=password, timeout=60, **kwargs)
    try:
        client.refreshScreen()
        return client.screen.convert("RGB")
    finally:
        client.disconnect()


def wait_for(path: Path, text: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not seen in {path} within {timeout} s")


def pyhyve(args: list[str], name: str, tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pyhyve", "-m", "128M", "-l", f"bootrom,{SEABIOS}",
         "-l", "fwcfg,qemu", *args, name],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{name}.err", "wb"), env=dict(os.environ, PYTHONPATH=str(REPO)))


def qemu(args: list[str], port: int) -> subprocess.Popen:
    binary = require_program("qemu-system-x86_64", "qemu-system-x86")
    return subprocess.Popen(
        [binary, "-machine", "pc", "-enable-kvm", "-m", "128", "-nodefaults", "-vga", "std",
         "-vnc", f"127.0.0.1:{port - 5900}", "-bios", SEABIOS, *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def vnc_port() -> int:
    while True:
        port = free_port()
        if port > 5900:
            return port


def rows(image) -> list[bytes]:
    """The screen's text rows, as pixel bands."""
    return [image.crop((0, y, image.width, y + CELL_H)).tobytes()
            for y in range(0, image.height, CELL_H)]


def without_cell(image, column: int, row: int):
    """IMAGE with one character cell blacked out (where the cursor blinks)."""
    copy = image.copy()
    copy.paste((0, 0, 0), (column * CELL_W, row * CELL_H, (column + 1) * CELL_W,
                           (row + 1) * CELL_H))
    return copy


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_seabios_screen_wait_and_password_match_qemu(vnc_api, tmp_path):
    """pyhyve (confined: seccomp and Landlock) with `wait` and a password: the
    guest does not start before a client got in (a wrong password is not
    one), and then SeaBIOS's screen
    is QEMU's pixel for pixel, but for the cursor's blink phase and the order
    in which SeaBIOS tried its boot devices (pyhyve's CMOS reports a floppy
    drive first, QEMU's fw_cfg boot order puts the hard disk first: the two
    "Booting from" pairs of rows trade places)."""
    port = vnc_port()
    log = tmp_path / "pyhyve-debug.log"
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    qmp_socket = tmp_path / "qmp.sock"
    proc = pyhyve(["-l", f"debugcon,file={log}", "-s",
                   f"3,fbuf,tcp=127.0.0.1:{port},wait,password=secret",
                   "-o", f"qmp.socket={qmp_socket}", "-o", f"snapshot.dir={dumps}"],
                  "vnc-seabios", tmp_path)
    try:
        deadline = time.monotonic() + 60
        while b"waiting for a VNC client" not in (tmp_path / "vnc-seabios.err").read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        with pytest.raises(Exception, match="(?i)auth"):
            grab(vnc_api, port, password="wrong")
        time.sleep(2)               # a guest that had started would have logged by now
        assert not log.exists() or log.stat().st_size == 0
        first = grab(vnc_api, port, password="secret")      # lets the guest start
        assert first.size[0] > 0
        wait_for(log, NO_BOOT)
        time.sleep(1)
        ours = grab(vnc_api, port, password="secret")
        zrle = grab(vnc_api, port, password="secret", encoding=E.ZRLE)
        screenshot = tmp_path / "screenshot.png"
        subprocess.run([sys.executable, "-m", "pyhyve.ctlclient", "--vm=vnc-seabios",
                        f"--screenshot={screenshot}"], check=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
        refused = qmp_screendump(qmp_socket, tmp_path / "outside.ppm")
        assert "snapshot.dir" in refused and not (tmp_path / "outside.ppm").exists()
        assert qmp_screendump(qmp_socket, dumps / "screen.ppm") is None
    finally:
        stop(proc)
    qemu_port = vnc_port()
    qemu_log = tmp_path / "qemu-debug.log"
    proc = qemu(["-chardev", f"file,id=dbg,path={qemu_log}", "-device",
                 "isa-debugcon,iobase=0x402,chardev=dbg"], qemu_port)
    try:
        wait_for(qemu_log, NO_BOOT)
        time.sleep(1)
        theirs = grab(vnc_api, qemu_port)
    finally:
        stop(proc)
    assert ours.size == theirs.size == (720, 400)
    # the cursor blinks below "No bootable device."
    ours, theirs = without_cell(ours, 0, 8), without_cell(theirs, 0, 8)
    assert without_cell(zrle, 0, 8).tobytes() == ours.tobytes()
    from PIL import Image
    for path in (screenshot, dumps / "screen.ppm"):
        with Image.open(path) as image:
            assert without_cell(image.convert("RGB"), 0, 8).tobytes() == ours.tobytes()
    mine, reference = rows(ours), rows(theirs)
    assert mine[0] == reference[0]                                   # the banner
    assert (mine[1], mine[2]) == (reference[4], reference[5])        # floppy attempt
    assert (mine[4], mine[5]) == (reference[1], reference[2])        # hard disk attempt
    assert mine[3] == reference[3] and mine[6:] == reference[6:]     # No bootable device.
    assert any(mine[0]) and any(mine[7])


def qmp_screendump(path: Path, filename: Path) -> str | None:
    """QMP's screendump to FILENAME; the error's text, or None."""
    from qemu.qmp import ExecuteError, QMPClient

    async def script():
        client = QMPClient("pyhyve-vnc-test")
        await client.connect(str(path))
        try:
            await client.execute("screendump", {"filename": str(filename)})
        except ExecuteError as exc:
            return str(exc)
        finally:
            await client.disconnect()
    return asyncio.run(script())


@pytest.fixture(scope="module")
def grub_menu_disk(tmp_path_factory) -> Path:
    boot_img = require_file(BOOT_IMG, "grub-pc-bin")
    mkimage = require_program("grub-mkimage", "grub-common")
    mke2fs = require_program("mke2fs", "e2fsprogs")
    return build_grub_disk(tmp_path_factory.mktemp("grubmenu"), boot_img, mkimage, mke2fs,
                           GRUB_MENU_CFG)


def type_into_grub(api, port: int, serial: Path) -> None:
    """'c' for GRUB's command line, then a command and Enter, through VNC,
    each key once GRUB echoed the one before: QEMU's keyboard holds 16 bytes
    and drops what comes on top (pyhyve's holds 64), and an emulated GRUB on
    a busy host takes seconds a key, minutes to open its command line."""
    client = api.connect(f"127.0.0.1::{port}", timeout=60)
    try:
        for key, echo in [("c", "grub>"), *((char, char) for char in TYPED)]:
            before = serial.read_text(errors="replace").count(echo)
            client.keyPress("space" if key == " " else key)
            deadline = time.monotonic() + 600
            while serial.read_text(errors="replace").count(echo) <= before:
                assert time.monotonic() < deadline, f"GRUB did not echo {key!r}"
                time.sleep(0.5)
        client.keyPress("enter")
    finally:
        client.disconnect()


def differences(ours, theirs) -> list[tuple]:
    """(row, bounding box) of each text row where two screens differ."""
    from PIL import ImageChops
    found = []
    for row in range(min(ours.height, theirs.height) // CELL_H):
        box = (0, row * CELL_H, ours.width, (row + 1) * CELL_H)
        changed = ImageChops.difference(ours.crop(box), theirs.crop(box)).getbbox()
        if changed:
            found.append((row, changed))
    return found


def only_a_cursor(ours, theirs) -> bool:
    """Whether two screens are the same but for one character cell (the
    cursor, whose blink phase the two sides need not share)."""
    found = differences(ours, theirs)
    return ours.size == theirs.size and len(found) <= 1 and \
        all(box[2] - box[0] <= CELL_W for _, box in found)


def settled(api, port: int, timeout: float = 600):
    """The screen once GRUB finished drawing it (its serial console is ahead
    of its VGA console): two looks five seconds apart that agree."""
    deadline = time.monotonic() + timeout
    last = grab(api, port)
    while True:
        time.sleep(5)
        now = grab(api, port)
        if only_a_cursor(last, now):
            return now
        assert time.monotonic() < deadline, "the screen did not settle"
        last = now


def grub_session(api, proc: subprocess.Popen, port: int, serial: Path) -> tuple:
    """GRUB's menu as a VNC client sees it, then its screen after typing a
    command (whose output the serial console shows); the VMM is stopped."""
    try:
        wait_for(serial, MENU_ENTRY, timeout=900)      # minutes on a busy host
        menu = settled(api, port)
        type_into_grub(api, port, serial)
        wait_for(serial, "vncok\n", timeout=900)       # the echo; read_text makes \r\n \n
        return menu, settled(api, port)
    finally:
        stop(proc)


@pytest.mark.e2e
@pytest.mark.usefixtures("needs_kvm")
def test_grub_menu_matches_qemu_and_keys_reach_its_command_line(vnc_api, grub_menu_disk,
                                                                 tmp_path):
    """GRUB's menu (box-drawing characters: the 9th column repeats) is QEMU's
    pixel for pixel but for the cursor cell; keys typed over VNC reach
    GRUB's command line through the i8042 on both, and the screens after
    typing match too."""
    from pyhyve.devices.i8042 import I8042
    if not hasattr(I8042, "key_event"):
        pytest.skip("the i8042 has no keyboard input yet (the input devices' branch)")
    screens = {}
    port = vnc_port()
    serial = tmp_path / "pyhyve-serial.txt"
    proc = pyhyve(["-l", f"com1,file={serial}", "-s", f"3,fbuf,tcp=127.0.0.1:{port}",
                   "-s", f"4,virtio-blk,{grub_menu_disk}"], "vnc-grub", tmp_path)
    screens["pyhyve menu"], screens["pyhyve typed"] = grub_session(vnc_api, proc, port, serial)
    port = vnc_port()
    serial = tmp_path / "qemu-serial.txt"
    proc = qemu(["-serial", f"file:{serial}", "-drive",
                 f"file={grub_menu_disk},format=raw,if=virtio,snapshot=on"], port)
    screens["qemu menu"], screens["qemu typed"] = grub_session(vnc_api, proc, port, serial)
    for name, image in screens.items():
        image.save(tmp_path / f"{name.replace(' ', '-')}.png")
    for stage in ("menu", "typed"):
        ours, theirs = screens[f"pyhyve {stage}"], screens[f"qemu {stage}"]
        assert only_a_cursor(ours, theirs), \
            f"{stage}: {differences(ours, theirs)} differ (see {tmp_path})"


# --- the protocol, over WebSocket, against a display drawn by the test ------------------------
class WebSocketClient:
    """Just enough of a browser's WebSocket (masked binary frames) and an RFB
    client to look at every message the server sends."""

    def __init__(self, port: int):
        import base64
        import socket
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET /websockify HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                          b"\r\nSec-WebSocket-Protocol: binary\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        import hashlib
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        assert head.startswith(b"HTTP/1.1 101") and accept in head
        self.buffer = b""

    def send(self, data: bytes) -> None:
        mask = os.urandom(4)
        header = bytes((0x82, 0x80 | len(data))) if len(data) < 126 else \
            bytes((0x82, 0x80 | 126)) + len(data).to_bytes(2, "big")
        self.sock.sendall(header + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(data)))

    def _raw(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    def recv(self, count: int) -> bytes:
        while len(self.buffer) < count:
            first, second = self._raw(2)
            assert first == 0x82 and not second & 0x80        # binary, unmasked
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(self._raw(2), "big")
            elif length == 127:
                length = int.from_bytes(self._raw(8), "big")
            self.buffer += self._raw(length)
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def update(self) -> list[tuple]:
        """One FramebufferUpdate: (x, y, w, h, encoding, payload) per rectangle."""
        assert self.recv(1) == b"\x00"
        count = int.from_bytes(self.recv(3)[1:], "big")
        rects = []
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", self.recv(12))
            if encoding == E.COPYRECT:
                payload = self.recv(4)
            elif encoding == E.ZLIB:
                payload = self.recv(int.from_bytes(self.recv(4), "big"))
            else:
                payload = b""
            rects.append((x, y, w, h, encoding, payload))
        return rects


class Recorder:
    def __init__(self):
        self.events = []

    def ready(self) -> bool:
        return True

    def key_event(self, code: int, down: bool, sync: bool) -> None:
        self.events.append(("key", code, down))

    def key_sync(self) -> None:
        self.events.append(("sync",))

    def pointer_event(self, x: int, y: int, buttons: int) -> None:
        self.events.append(("pointer", x, y, buttons))


def test_protocol_over_websocket_zlib_copyrect_desktopsize_and_input():
    import zlib
    from pyhyve.display.screen import Screen
    from pyhyve.inputroute import InputRouter
    from pyhyve.vnc.server import VncServer
    width, height = 64, 48
    bands = [bytes((16 * i, 0, 0, 0)) * width * 16 for i in range(3)]
    frame = {"size": (width, height), "pixels": b"".join(bands)}

    def draw():
        w, h = frame["size"]
        return w, h, frame["pixels"], (0, h), 16
    router, sink = InputRouter(), Recorder()
    router.add_keyboard(sink)
    router.add_pointer(sink)
    server = VncServer(Screen(draw), router, ("tcp", "127.0.0.1:0"), None, "test",
                       lambda *args: None)
    try:
        client = WebSocketClient(server.address[1])
        assert client.recv(12) == b"RFB 003.008\n"
        client.send(b"RFB 003.008\n")
        assert client.recv(2) == b"\x01\x01"            # one type: None
        client.send(b"\x01")
        assert client.recv(4) == bytes(4)
        client.send(b"\x01")
        assert struct.unpack(">HH", client.recv(4)) == (width, height)
        client.recv(16)
        client.recv(int.from_bytes(client.recv(4), "big"))
        client.send(struct.pack(">BxHiii", 2, 3, E.COPYRECT, E.ZLIB, E.DESKTOP_SIZE))
        client.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        [(x, y, w, h, encoding, payload)] = client.update()
        inflater = zlib.decompressobj()
        assert (x, y, w, h, encoding) == (0, 0, width, height, E.ZLIB)
        assert inflater.decompress(payload) == frame["pixels"]
        frame["pixels"] = bands[1] + bands[2] + bytes((9, 9, 9, 0)) * width * 16    # scroll
        client.send(struct.pack(">BBHHHH", 3, 1, 0, 0, width, height))
        rects = client.update()
        assert rects[0][:5] == (0, 0, width, 32, E.COPYRECT)
        assert struct.unpack(">HH", rects[0][5]) == (0, 16)
        assert [r[:5] for r in rects[1:]] == [(0, 32, width, 16, E.ZLIB)]
        assert inflater.decompress(rects[1][5]) == bytes((9, 9, 9, 0)) * width * 16
        frame["size"], frame["pixels"] = (32, 16), bytes(32 * 16 * 4)         # a new mode
        client.send(struct.pack(">BBHHHH", 3, 1, 0, 0, width, height))
        rects = client.update()
        assert rects[0][:5] == (0, 0, 32, 16, E.DESKTOP_SIZE)
        assert rects[1][:5] == (0, 0, 32, 16, E.ZLIB)
        client.send(struct.pack(">BBxxI", 4, 1, ord("a")) + struct.pack(">BBxxI", 4, 0, 0xFF0D))
        client.send(struct.pack(">BBHH", 5, 1, 31, 15))
        client.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 32, 16))
        client.update()                     # answered after the input was taken
        assert sink.events == [("key", 30, True), ("key", 28, False),
                               ("pointer", 31 * 0x7FFF // 32, 15 * 0x7FFF // 16, 1)]
    finally:
        server.close()


def test_unix_socket_listener_reuses_only_a_dead_socket(tmp_path):
    import socket
    from pyhyve.config import ConfigError
    from pyhyve.display.screen import Screen
    from pyhyve.inputroute import InputRouter
    from pyhyve.vnc.server import VncServer
    path = str(tmp_path / "vnc.sock")

    def serve():
        return VncServer(Screen(lambda: (8, 8, bytes(256), None, 8)), InputRouter(),
                         ("unix", path), None, "test", lambda *args: None)
    first = serve()
    first.close()                               # its socket file stays, as after a crash
    second = serve()
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            assert client.recv(12) == b"RFB 003.008\n"
    finally:
        second.close()
    os.unlink(path)
    Path(path).write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        serve()
    assert Path(path).read_text() == "not a socket"
