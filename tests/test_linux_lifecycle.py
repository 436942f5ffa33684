"""Linux under pyhyve: SMP and a tap network, reset, a checkpoint restored in a new
process, gdb on the kernel, and the RTC in UTC.  Each fixture is one boot (one to
three minutes here), shared by the tests that read it."""

import re
import subprocess
import time
import uuid

import pytest

from firmware import require_program
from guestrun import free_port
from linuxguest import GuestRun, pyhyve_command, pyhyve_env, sections, with_script
from pyhyve import ctlclient

pytestmark = [pytest.mark.linux, pytest.mark.usefixtures("needs_kvm")]

TAP_HOST, TAP_GUEST = "192.168.77.1", "192.168.77.2"


# --- SMP, tap, reboot ---------------------------------------------------------------------
SMP_SCRIPT = r"""
section smp
dmesg | grep "smp: Brought up"
cat /sys/devices/system/cpu/online
taskset -c 1 cat /proc/self/stat | cut -d' ' -f39
section tap
ip link set lo up
ip link set eth0 up
ip addr add GUEST/24 dev eth0
ping -c 3 -W 5 HOST 2>&1 | grep -E "transmitted|bytes from"
echo TAP-UP
read answer
echo "host says: $answer"
section interrupts
cat /proc/interrupts
reboot -f
"""


class Netns:
    """A private network namespace with a tap whose host end is TAP_HOST."""

    def __init__(self):
        self.name = f"pyhyve-lt-{uuid.uuid4().hex[:8]}"
        self.tap = "pyhtap0"
        ip = require_program("ip", "iproute2")
        for command in (["netns", "add", self.name],
                        ["-n", self.name, "link", "set", "lo", "up"],
                        ["-n", self.name, "tuntap", "add", "dev", self.tap, "mode", "tap"],
                        ["-n", self.name, "addr", "add", f"{TAP_HOST}/24", "dev", self.tap],
                        ["-n", self.name, "link", "set", self.tap, "up"]):
            subprocess.run([ip, *command], check=True, capture_output=True)
        self.ip = ip

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.ip, "netns", "exec", self.name, *command],
                              capture_output=True, text=True, timeout=120)

    def close(self) -> None:
        subprocess.run([self.ip, "netns", "delete", self.name], capture_output=True)


@pytest.fixture(scope="module")
def smp_boot(linux_guest, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("linuxsmp")
    netns = Netns()
    try:
        script = SMP_SCRIPT.replace("GUEST", TAP_GUEST).replace("HOST", TAP_HOST)
        initrd = with_script(linux_guest, tmp, script)
        argv = pyhyve_command(linux_guest, initrd, "-s", f"2,virtio-net,tap={netns.tap}",
                              cpus=2, name="linuxsmp")
        with GuestRun([netns.ip, "netns", "exec", netns.name, *argv], pyhyve_env(),
                      tmp / "console.log") as run:
            run.expect("TAP-UP")
            ping = netns.run("ping", "-c", "3", "-W", "5", TAP_GUEST)
            run.send("ping done\n")
            status = run.wait()
    finally:
        netns.close()
    return sections(run.output), ping, status


def test_two_vcpus_come_up_and_run_tasks(smp_boot):
    smp = smp_boot[0]["smp"].splitlines()
    assert "smp: Brought up 1 node, 2 CPUs" in smp[0]
    assert smp[1] == "0-1"
    assert smp[2] == "1"                    # taskset -c 1 ran the task on CPU 1
    header, *rows = smp_boot[0]["interrupts"].splitlines()
    assert header.split() == ["CPU0", "CPU1"]
    local_timer = next(row.split() for row in rows if row.split()[0] == "LOC:")
    assert int(local_timer[1]) > 0 and int(local_timer[2]) > 0


def test_ping_both_ways_over_a_tap_in_a_private_namespace(smp_boot):
    section, ping, _ = smp_boot
    assert "3 packets transmitted, 3 packets received" in section["tap"], section["tap"]
    assert "3 packets transmitted, 3 received" in ping.stdout, ping.stdout + ping.stderr
    assert "host says: ping done" in section["tap"]


def test_reboot_is_exit_status_0(smp_boot):
    assert smp_boot[2] == 0


# --- checkpoint, restore in a new process -------------------------------------------------
SNAPSHOT_SCRIPT = r"""
section before
mke2fs -q /dev/vda && mkdir -p /mnt/a && mount -t ext2 /dev/vda /mnt/a && echo mounted
echo "written before the checkpoint" > /mnt/a/before.txt
echo CHECKPOINT-NOW
read answer
section after
echo "resumed-with: $answer"
echo "written after the restore" > /mnt/a/after.txt
cat /mnt/a/before.txt /mnt/a/after.txt
dd if=/dev/hwrng bs=16 count=1 2>/dev/null | hexdump -v -e '16/1 "%02x" "\n"'
sync; umount /mnt/a && echo unmounted
reboot -f
"""


@pytest.fixture(scope="module")
def snapshot_boot(linux_guest, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("linuxsnap")
    disk, sock, snap = tmp / "disk.img", tmp / "ctl.sock", tmp / "linux.snap"
    with open(disk, "wb") as image:
        image.truncate(16 << 20)
    initrd = with_script(linux_guest, tmp, SNAPSHOT_SCRIPT)
    argv = pyhyve_command(linux_guest, initrd, "-s", f"2,virtio-blk,{disk}", "-s", "3,virtio-rnd",
                          "-o", f"control.socket={sock}", "-o", f"snapshot.dir={tmp}",
                          name="linuxsnap")
    with GuestRun(argv, pyhyve_env(), tmp / "first.log") as first:
        first.expect("CHECKPOINT-NOW")
        assert ctlclient.main([f"--socket={sock}", f"--checkpoint={snap}"]) == 0
    # The first VM is gone (killed): the restored copy alone goes on with the disk.
    # It is given the same options: a snapshot carries state, not configuration.
    with GuestRun([*argv[:3], "-r", str(snap), *argv[3:]], pyhyve_env(),
                  tmp / "restored.log") as restored:
        restored.send("from the restored process\n")
        status = restored.wait()
    return first, restored, status


def test_restored_linux_carries_on_and_finishes_its_script(snapshot_boot):
    first, restored, status = snapshot_boot
    assert "CHECKPOINT-NOW" not in restored.output
    after = sections(restored.output)["after"].splitlines()
    assert after[0] == "resumed-with: from the restored process"
    assert after[1:3] == ["written before the checkpoint", "written after the restore"]
    assert re.fullmatch(r"[0-9a-f]{32}", after[3])            # virtio-rng after restore
    assert after[4] == "unmounted"
    assert status == 0


# --- gdb, RTC in UTC, power-off ------------------------------------------------------------
GDB_SCRIPT = r"""
section rtc
echo "RTC-NOW $(cat /sys/class/rtc/rtc0/since_epoch) $(date +%s)"
echo GDB-READY
read answer
sync
echo SYNCED
poweroff -f
"""
BREAK_AT = "ksys_sync"          # what the script's sync calls


def symbol_address(guest, name: str) -> int:
    for line in (guest.vmlinux.parent / "System.map").read_text().splitlines():
        address, _, symbol = line.split()[:3]
        if symbol == name:
            return int(address, 16)
    raise KeyError(name)


@pytest.fixture(scope="module")
def gdb_boot(linux_guest, tmp_path_factory):
    gdb = require_program("gdb", "gdb")
    tmp = tmp_path_factory.mktemp("linuxgdb")
    port = free_port()
    initrd = with_script(linux_guest, tmp, GDB_SCRIPT)
    argv = pyhyve_command(linux_guest, initrd, "-u", "-G", str(port), name="linuxgdb")
    commands = [f"file {linux_guest.vmlinux}", f"target remote 127.0.0.1:{port}",
                f"hbreak {BREAK_AT}", "continue", "bt", "info registers rip", "delete",
                "detach"]
    with GuestRun(argv, pyhyve_env(TZ="<+0530>-5:30"), tmp / "console.log") as run:
        run.expect("RTC-NOW")
        rtc_host_time = time.time()
        run.expect("GDB-READY")
        debugger = subprocess.Popen([gdb, "-batch", "-nx",
                                     *[arg for c in commands for arg in ("-ex", c)]],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = ""
        for line in debugger.stdout:            # the breakpoint is set once gdb says so
            output += line
            if "Hardware assisted breakpoint 1" in line:
                run.send("go\n")
                break
        output += debugger.communicate(timeout=600)[0]
        status = run.wait()
    return run, output, rtc_host_time, status


def test_gdb_hits_a_hardware_breakpoint_in_the_kernel_with_symbols(gdb_boot, linux_guest):
    run, output, _, status = gdb_boot
    address = symbol_address(linux_guest, BREAK_AT)
    assert f"Hardware assisted breakpoint 1 at {address:#x}" in output, output
    assert re.search(rf"^Breakpoint 1, 0x[0-9a-f]+ in {BREAK_AT} \(\)", output, re.M), output
    backtrace = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+)", output, re.M)
    assert backtrace[0] == BREAK_AT and len(backtrace) >= 2, output
    assert "__x64_sys_sync" in backtrace or "do_syscall_64" in backtrace, backtrace
    assert "SYNCED" in run.output
    assert status == 1                      # poweroff -f


def test_rtc_in_utc_with_dash_u(gdb_boot):
    run, _, seen, _ = gdb_boot
    rtc, date = map(int, sections(run.output)["rtc"].split()[1:3])
    earliest, latest = run.started_wall - 2, seen + 2    # read in between (see test_linux_guest)
    assert earliest <= rtc <= latest and earliest <= date <= latest, (rtc, date, earliest, latest)
