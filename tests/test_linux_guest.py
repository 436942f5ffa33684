"""Linux 6.1 drives pyhyve's devices with its own drivers and busybox's tools.

One boot with every device bhyve users give (two virtio disks, one read-only;
virtio-rnd; virtio-console with a named port; virtio-net over slirp with a
host forward; four UARTs) runs one script whose sections the tests below read;
the host talks to the script where a test needs both ends (the console port,
the forwarded TCP port, the power button).  The same script runs under QEMU
(-machine pc, the same kernel and initramfs) in test_linux_qemu.py, which
compares what the guest saw.

Each boot takes one to three minutes under this host's emulated KVM, so the
tests share their boot (module-scoped fixtures) and are marked `linux`
(`pytest -m "not linux"` skips them for a quick run; CI runs them all).
"""

import hashlib
import http.server
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from build import build_rom
from firmware import require_program
from guestrun import free_port, run_pyhyve
from linuxguest import (GuestRun, pyhyve_command, pyhyve_env, qemu_command, sections,
                        with_script)

pytestmark = [pytest.mark.linux, pytest.mark.usefixtures("needs_kvm")]

PORT_NAME = "org.pyhyve.test"
TZ_AHEAD = "<+0530>-5:30"       # a POSIX TZ 5:30 ahead of UTC, so local time differs
TZ_OFFSET = 5 * 3600 + 30 * 60
DISK_SIZE = 16 << 20
RO_PATTERN = b"read-only pattern\n" * 1000

# The guest's side of every device test, in the order the host side expects.
DEVICES_SCRIPT = r"""
section dmesg
dmesg
section cmdline
cat /proc/cmdline
section clocksource
cat /sys/devices/system/clocksource/clocksource0/available_clocksource
cat /sys/devices/system/clocksource/clocksource0/current_clocksource
section pci
for d in /sys/bus/pci/devices/*; do
  read v < $d/vendor; read p < $d/device; read c < $d/class
  echo "${d##*/} $v $p $c"
done
section msi
for d in /sys/bus/pci/devices/*; do
  [ -d $d/msi_irqs ] && echo "${d##*/} $(ls $d/msi_irqs | wc -l) $(cat $d/msi_irqs/* | sort -u | tr '\n' ' ')"
done
section blk
mke2fs -q /dev/vda && mkdir -p /mnt/a && mount -t ext2 /dev/vda /mnt/a && echo mounted
seq 0 299 | sed 's/.*/line & written by linux/' > /mnt/a/lines.txt
dd if=/dev/hwrng of=/mnt/a/random.bin bs=4096 count=16 2>/dev/null
cd /mnt/a && sha256sum random.bin lines.txt; cd /
sync; umount /mnt/a && echo unmounted
section blk_ro
cat /sys/block/vdb/ro
cat /sys/block/vdb/size
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>&1; echo "dd-status $?"
head -c 18 /dev/vdb
section rng
cat /sys/class/misc/hw_random/rng_available
cat /sys/class/misc/hw_random/rng_current
dd if=/dev/hwrng bs=32 count=4 2>/dev/null | hexdump -v -e '32/1 "%02x" "\n"'
section serial
cat /proc/tty/driver/serial
for n in 1 2 3; do echo "hello-ttyS$n" > /dev/ttyS$n; done
section rtc
echo "RTC-NOW $(cat /sys/class/rtc/rtc0/since_epoch) $(date +%s)"
section vport
for p in /sys/class/virtio-ports/*; do echo "${p##*/} $(cat $p/name 2>/dev/null)"; done
port=$(grep -l "^PORT_NAME$" /sys/class/virtio-ports/*/name | cut -d/ -f5)
echo "PORT-READY $port"
read line < /dev/$port
echo "got: $line"
echo "pong:$line" > /dev/$port
section dhcp
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -s /udhcpc.sh 2>&1 | grep -i lease
ip -4 addr show eth0 | grep inet
ip route
section http
wget -q -O /tmp/blob http://10.0.2.2:HTTP_PORT/blob && sha256sum /tmp/blob
section hostfwd
echo banner-from-guest > /tmp/banner
nc -l -p 8080 < /tmp/banner > /tmp/from-host &
sleep 1
echo "LISTENING"
wait
cat /tmp/from-host
section interrupts
cat /proc/interrupts
section power
for e in /sys/class/input/input*; do
  [ "$(cat $e/name)" = "Power Button" ] && ev=$(ls $e | grep event)
done
echo "WAITING-FOR-BUTTON $ev"
dd if=/dev/input/$ev bs=24 count=1 of=/dev/null 2>/dev/null
echo POWER-BUTTON-PRESSED
poweroff -f
"""

UDHCPC_SCRIPT = b"""#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add $ip/$mask dev $interface
ip route add default via $router dev $interface
"""


class BlobServer:
    """An HTTP server on the host's loopback with one random file, /blob."""

    def __init__(self):
        self.blob = os.urandom(256 * 1024)
        blob = self.blob

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/blob" else 404)
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def connect_unix(path: Path, timeout: float = 60) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def recv_until(sock: socket.socket, needle: bytes, timeout: float = 60) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while needle not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


class DevicesBoot:
    """What the host saw of the devices boot: console sections, exchanges and files."""

    def __init__(self, tmp: Path, guest, side: str):
        """side: "pyhyve" or "qemu" (COMMANDS)."""
        self.side = side
        self.paths = {name: tmp / name for name in
                      ("disk.img", "ro.img", "com2.out", "com3.out", "com4.out",
                       "console.sock", "port.sock", "monitor.sock")}
        with open(self.paths["disk.img"], "wb") as disk:
            disk.truncate(DISK_SIZE)
        self.paths["ro.img"].write_bytes(RO_PATTERN.ljust(1 << 20, b"\0"))
        self.ro_digest = hashlib.sha256(self.paths["ro.img"].read_bytes()).hexdigest()
        self.http = BlobServer()
        self.hostfwd_port = free_port()
        script = DEVICES_SCRIPT.replace("HTTP_PORT", str(self.http.port)) \
            .replace("PORT_NAME", PORT_NAME)
        initrd = with_script(guest, tmp, script, {"udhcpc.sh": UDHCPC_SCRIPT})
        argv, env = COMMANDS[side](guest, initrd, self.paths, self.hostfwd_port)
        self.run = GuestRun(argv, env, tmp / "console.log")
        try:
            self._drive()
        finally:
            self.run.kill()
            self.http.close()
        print(f"{side}: {self.run.timing()}")
        self.sections = sections(self.run.output)

    def _drive(self) -> None:
        run = self.run
        run.expect("RTC-NOW")
        self.rtc_host_time = time.time()
        port = connect_unix(self.paths["port.sock"])
        run.expect("PORT-READY")
        port.sendall(b"ping-from-host\n")
        self.port_reply = recv_until(port, b"\n")
        port.close()
        run.expect("LISTENING")
        with socket.create_connection(("127.0.0.1", self.hostfwd_port), timeout=60) as conn:
            self.hostfwd_banner = recv_until(conn, b"\n")
            conn.sendall(b"hello-from-host\n")
        run.expect("WAITING-FOR-BUTTON")
        self.button_pressed_at = time.monotonic()
        self.press_power_button()
        self.status = run.wait()

    def press_power_button(self) -> None:
        """bhyve's way, which pyhyve follows: SIGTERM.  QEMU quits on SIGTERM, so
        its button is the monitor's system_powerdown."""
        if self.side == "pyhyve":
            self.run.signal(signal.SIGTERM)
        else:
            with connect_unix(self.paths["monitor.sock"]) as monitor:
                monitor.sendall(b"system_powerdown\n")
                time.sleep(1)


def pyhyve_devices(guest, initrd, paths, hostfwd_port):
    argv = pyhyve_command(
        guest, initrd,
        "-l", f"com2,file={paths['com2.out']}", "-l", f"com3,file={paths['com3.out']}",
        "-l", f"com4,file={paths['com4.out']}",
        "-s", f"2,virtio-blk,{paths['disk.img']}",
        "-s", f"3,virtio-blk,{paths['ro.img']},ro",
        "-s", "4,virtio-rnd",
        "-s", f"5,virtio-console,console={paths['console.sock']},"
              f"{PORT_NAME}={paths['port.sock']}",
        "-s", f"6,virtio-net,slirp,hostfwd=tcp:{hostfwd_port}-:8080",
        name="linuxdevices")
    return argv, pyhyve_env(TZ=TZ_AHEAD)


def qemu_devices(guest, initrd, paths, hostfwd_port):
    """The same devices at the same slots under QEMU -machine pc, its RTC in local
    time as bhyve's (QEMU's default is UTC)."""
    argv = qemu_command(
        guest, initrd,
        "-serial", f"file:{paths['com2.out']}", "-serial", f"file:{paths['com3.out']}",
        "-serial", f"file:{paths['com4.out']}", "-rtc", "base=localtime",
        "-monitor", f"unix:{paths['monitor.sock']},server=on,wait=off",
        "-drive", f"file={paths['disk.img']},format=raw,if=none,id=d0",
        "-device", "virtio-blk-pci,drive=d0,addr=2",
        "-drive", f"file={paths['ro.img']},format=raw,if=none,id=d1,readonly=on",
        "-device", "virtio-blk-pci,drive=d1,addr=3",
        "-device", "virtio-rng-pci,addr=4",
        "-device", "virtio-serial-pci,addr=5",
        "-chardev", f"socket,id=c0,path={paths['console.sock']},server=on,wait=off",
        "-device", "virtconsole,chardev=c0,nr=0",
        "-chardev", f"socket,id=c1,path={paths['port.sock']},server=on,wait=off",
        "-device", f"virtserialport,chardev=c1,name={PORT_NAME},nr=1",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{hostfwd_port}-:8080",
        "-device", "virtio-net-pci,netdev=n0,addr=6")
    return argv, dict(os.environ, TZ=TZ_AHEAD)


COMMANDS = {"pyhyve": pyhyve_devices, "qemu": qemu_devices}


@pytest.fixture(scope="module", params=list(COMMANDS))
def devices(request, linux_guest, tmp_path_factory):
    """The devices boot under pyhyve, then under QEMU (the reference)."""
    return DevicesBoot(tmp_path_factory.mktemp(f"linux-{request.param}"), linux_guest,
                       request.param)


# --- boot ------------------------------------------------------------------------------
CAL_PIT_LOOPS = 1000            # Linux (arch/x86/kernel/tsc.c) gives up on fewer PIT polls


@pytest.fixture(scope="session")
def pit_polls(tmp_path_factory) -> int:
    """How often this host lets a guest poll PIT channel 2 in 10 ms, as Linux's
    pit_calibrate_tsc() does (tests/guests/pitloop.S; KVM's in-kernel PIT, the
    same under QEMU)."""
    debug = tmp_path_factory.mktemp("pitloop") / "polls.txt"
    proc = run_pyhyve(["-l", f"bootrom,{build_rom('pitloop')}", "-l",
                       f"debugcon,file={debug}", "pitloop"], timeout=120)
    assert proc.returncode == 1, proc.stderr
    return int(debug.read_text().split()[1], 16)


def test_userspace_reached_without_platform_complaints(devices, pit_polls):
    """QEMU's pc DSDT computes _PRT in a loop that ACPICA's 30 s loop timeout cuts
    short on this emulated host (once per PCI device): those errors are QEMU's.
    Linux calibrates the TSC against the PIT only if it can poll the PIT 1000
    times in 10 ms; where this host cannot (pit_polls), Linux says so under QEMU
    as well and calibrates against the HPET instead."""
    log = devices.sections["dmesg"]
    assert "LINUX-USERSPACE-OK" in devices.run.output
    if devices.side == "qemu":
        log = "\n".join(line for line in log.splitlines()
                        if not ("ACPI Error" in line and "_PRT" in line))
    if pit_polls < CAL_PIT_LOOPS:
        log = log.replace("tsc: Unable to calibrate against PIT", "")
    for complaint in ("MP-BIOS bug", "ACPI Error", "ACPI BIOS Error", "Firmware Bug]: ACPI",
                      "Unable to calibrate against PIT"):
        assert complaint not in log, complaint


def test_timer_is_on_ioapic_pin_2_and_the_hpet_is_used(devices):
    """Whether Linux then calibrates the TSC against the HPET depends on how fast
    this host answers an HPET read (Linux gives up at 50000 TSC cycles, about
    20 us here; tests/guests/hpetread.S measures it): not asserted."""
    interrupts = devices.sections["interrupts"]
    assert re.search(r"^\s*0:\s+\d+\s+IO-APIC\s+2-edge\s+timer", interrupts, re.M), interrupts
    log = devices.sections["dmesg"]
    assert "ACPI: HPET id: 0x8086a201 base: 0xfed00000" in log
    assert "hpet" in devices.sections["clocksource"].split("\n")[0].split()


# --- PCI ---------------------------------------------------------------------------------
# (bus:dev.fn, vendor, device, class) by the PCI IDs the virtio spec gives transitional
# devices, and the chipset pyhyve adds: i440FX host bridge at 0:0, PIIX3 ISA bridge at 31:0.
DEVICES_PCI = {
    "0000:00:00.0": ("0x8086", "0x1237", "0x060000"),
    "0000:00:02.0": ("0x1af4", "0x1001", "0x010000"),
    "0000:00:03.0": ("0x1af4", "0x1001", "0x010000"),
    "0000:00:04.0": ("0x1af4", "0x1005", "0x00ff00"),
    "0000:00:05.0": ("0x1af4", "0x1003", "0x078000"),
    "0000:00:06.0": ("0x1af4", "0x1000", "0x020000"),
    "0000:00:1f.0": ("0x8086", "0x7000", "0x060100"),
}


def pci_functions(section: str) -> dict:
    return {bdf: tuple(ids) for bdf, *ids in (line.split() for line in section.splitlines())}


# QEMU's PIIX3 sits at 1.0 with its IDE (1.1) and PIIX4 ACPI (1.3) functions; pyhyve
# has bhyve's lpc at 31:0, no IDE, and its PM registers at fixed ports (as bhyve).
QEMU_CHIPSET = {
    "0000:00:00.0": ("0x8086", "0x1237", "0x060000"),
    "0000:00:01.0": ("0x8086", "0x7000", "0x060100"),
    "0000:00:01.1": ("0x8086", "0x7010", "0x010180"),
    "0000:00:01.3": ("0x8086", "0x7113", "0x068000"),
}


def test_pci_functions_are_those_given_plus_the_chipset(devices):
    expected = dict(DEVICES_PCI)
    if devices.side == "qemu":
        expected = {bdf: ids for bdf, ids in expected.items() if ids[0] == "0x1af4"}
        expected.update(QEMU_CHIPSET)
    assert pci_functions(devices.sections["pci"]) == expected


def test_virtio_devices_use_msix(devices):
    """Each virtio function has MSI-X vectors (config + queues), and /proc/interrupts
    shows them as PCI-MSIX, none on the I/O APIC's PCI pins."""
    msi = {line.split()[0]: line.split()[1:] for line in devices.sections["msi"].splitlines()}
    virtio = [bdf for bdf, ids in DEVICES_PCI.items() if ids[0] == "0x1af4"]
    for bdf in virtio:
        assert bdf in msi and int(msi[bdf][0]) >= 2, (bdf, msi)
        assert set(msi[bdf][1:]) == {"msix"}, msi[bdf]
    interrupts = devices.sections["interrupts"]
    assert "PCI-MSIX" in interrupts or "PCI-MSI" in interrupts
    assert not re.search(r"IO-APIC\s+(1[6-9]|2[0-3])-fasteoi\s+virtio", interrupts), interrupts


# --- virtio-blk ----------------------------------------------------------------------------
def debugfs_cat(image: Path, name: str) -> bytes:
    debugfs = require_program("debugfs", "e2fsprogs")
    result = subprocess.run([debugfs, "-R", f"cat /{name}", str(image)], capture_output=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_virtio_blk_ext2_written_by_linux_reads_back_on_the_host(devices):
    section = devices.sections["blk"]
    assert "mounted" in section and "unmounted" in section, section
    sums = dict(reversed(line.split()) for line in section.splitlines()
                if re.match(r"^[0-9a-f]{64}\s", line))
    image = devices.paths["disk.img"]
    lines = debugfs_cat(image, "lines.txt")
    assert lines == b"".join(b"line %d written by linux\n" % i for i in range(300))
    assert hashlib.sha256(lines).hexdigest() == sums["lines.txt"]
    random_bytes = debugfs_cat(image, "random.bin")
    assert len(random_bytes) == 65536
    assert hashlib.sha256(random_bytes).hexdigest() == sums["random.bin"]


def test_read_only_virtio_blk_refuses_writes_and_the_image_is_unchanged(devices):
    """VIRTIO_BLK_F_RO makes Linux mark the disk read-only, so the write fails in
    the guest (EPERM) before a request is sent; QEMU's readonly=on does the same.
    (A write request that does reach the device is refused with VIRTIO_BLK_S_IOERR:
    test_blkdriver.py.)"""
    lines = devices.sections["blk_ro"].splitlines()
    assert lines[0] == "1"                                  # /sys/block/vdb/ro
    assert int(lines[1]) * 512 == 1 << 20
    status = next(line for line in lines if line.startswith("dd-status"))
    assert status != "dd-status 0"
    assert "Operation not permitted" in devices.sections["blk_ro"]
    assert lines[-1] == "read-only pattern"
    assert hashlib.sha256(devices.paths["ro.img"].read_bytes()).hexdigest() == \
        devices.ro_digest


# --- virtio-rnd, virtio-console ------------------------------------------------------------
def test_hwrng_is_virtio_rng_and_gives_bytes(devices):
    lines = devices.sections["rng"].splitlines()
    assert lines[1] == "virtio_rng.0"
    samples = lines[2:]
    assert len(samples) == 4 and all(re.fullmatch(r"[0-9a-f]{64}", s) for s in samples)
    assert len(set(samples)) == 4


def test_virtio_console_port_has_its_name_and_passes_bytes_both_ways(devices):
    section = devices.sections["vport"]
    assert re.search(rf"^vport\dp1 {re.escape(PORT_NAME)}$", section, re.M), section
    assert "got: ping-from-host" in section
    assert devices.port_reply == b"pong:ping-from-host\n"


# --- serial, RTC ------------------------------------------------------------------------------
def test_four_uarts_are_ttyS0_to_ttyS3(devices):
    ports = re.findall(r"^(\d): uart:16550A port:([0-9A-F]+) irq:(\d+)", devices.sections["serial"],
                       re.M)
    assert ports == [("0", "000003F8", "4"), ("1", "000002F8", "3"),
                     ("2", "000003E8", "4"), ("3", "000002E8", "3")]
    for n in (1, 2, 3):
        assert f"hello-ttyS{n}" in devices.paths[f"com{n + 1}.out"].read_text()


def test_rtc_keeps_local_time_by_default(devices):
    """bhyve's RTC holds local time unless -u; Linux reads it as UTC, so under a TZ
    5:30 ahead of UTC both its RTC and its clock read 5:30 ahead.  The guest read
    them between the start and the moment the host saw the line (an emulated
    guest takes seconds between two commands, so a fixed tolerance around the
    second moment fails on a loaded host)."""
    rtc, date = map(int, devices.sections["rtc"].split()[1:3])
    earliest = devices.run.started_wall + TZ_OFFSET - 2
    latest = devices.rtc_host_time + TZ_OFFSET + 2
    assert earliest <= rtc <= latest and earliest <= date <= latest, (rtc, date, earliest, latest)


# --- virtio-net over slirp ---------------------------------------------------------------------
def test_dhcp_lease_is_10_0_2_15(devices):
    section = devices.sections["dhcp"]
    assert "inet 10.0.2.15/24" in section, section
    assert "default via 10.0.2.2" in section


def test_guest_fetches_a_file_from_the_host_loopback(devices):
    digest = devices.sections["http"].split()[0]
    assert digest == hashlib.sha256(devices.http.blob).hexdigest()


def test_hostfwd_reaches_a_listener_in_the_guest(devices):
    assert devices.hostfwd_banner == b"banner-from-guest\n"
    assert devices.sections["hostfwd"].splitlines()[-1] == "hello-from-host"


# --- power -----------------------------------------------------------------------------------
def test_sigterm_presses_the_power_button_and_the_guest_powers_off(devices):
    """bhyve's exit status for a power-off is 1; QEMU's process exits with 0."""
    assert "POWER-BUTTON-PRESSED" in devices.sections["power"]
    assert devices.status == (1 if devices.side == "pyhyve" else 0)
