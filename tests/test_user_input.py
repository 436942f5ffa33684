"""Every command-line option and config key, given a wrong type, an
out-of-range value or a missing file: pyhyve must say so in one line on
stderr, with no traceback, exit with status 4, and do it before any vCPU runs
(the guest, hello16, would print on the debug port if it ran)."""

import re
import time

import pytest

from build import build_rom
from guestrun import run_pyhyve
from pyhyve.vcpu import ExitStatus

pytestmark = pytest.mark.usefixtures("needs_kvm")

ROM = "{rom}"       # replaced by a bootable guest, so only the bad input can stop the VM
CONF = "{conf}"     # replaced by a config file whose second line is not key=value
VALID = ["-l", f"bootrom,{ROM}", "vm"]

# (arguments, a fragment of the one line pyhyve must print)
CASES = {
    "cpus-zero": (["-c", "0", *VALID], "cpus: 0 is outside"),
    "cpus-too-many": (["-c", "999", *VALID], "cpus: 999 is outside"),
    "cpus-topology-mismatch": (["-c", "cpus=4,sockets=3", *VALID], "does not match"),
    "cpus-not-a-number": (["-c", "2,threads=x", *VALID], "invalid -c"),
    "cpus-unknown-key": (["-c", "dies=2", *VALID], "invalid -c"),
    "cores-key-not-int": (["-o", "cores=x", *VALID], "cores: 'x' is not a number"),
    "threads-key-range": (["-o", "threads=999", *VALID], "threads: 999 is outside"),
    "memory-zero": (["-m", "0", *VALID], "below the 1 MiB minimum"),
    "memory-negative": (["-m", "-5", *VALID], "invalid memory size '-5'"),
    "memory-bad-suffix": (["-m", "1X", *VALID], "invalid memory size '1X'"),
    # more than a process's address space, so no overcommit setting lets it through
    "memory-too-large": (["-m", "200T", *VALID], "cannot allocate"),
    "bootrom-no-file": (["-l", "bootrom", "vm"], "-l bootrom needs a setting"),
    "bootrom-missing": (["-l", "bootrom,/missing/rom", "vm"], "cannot read bootrom"),
    "com-tcp-no-port": (["-l", "com1,tcp=nohost", *VALID], "expected tcp=HOST:PORT"),
    "com-tcp-port-range": (["-l", "com1,tcp=nohost:99999", *VALID],
                           "port 99999 is out of range (0-65535)"),
    "com-unknown-backend": (["-l", "com1,bogus", *VALID], "unknown backend"),
    "com-file-missing-dir": (["-l", "com1,file=/missing/dir/f", *VALID], "cannot open"),
    "com-unix-missing-dir": (["-l", "com1,unix=/missing/dir/s", *VALID], "cannot listen"),
    "com5": (["-l", "com5,stdio", *VALID], "unknown LPC device 'com5'"),
    "debugcon-no-file": (["-l", "debugcon,stdio", *VALID], "-l debugcon needs a file"),
    "debugcon-missing-dir": (["-l", "debugcon,file=/missing/d/f", *VALID],
                             "debugcon: cannot open file=/missing/d/f"),
    "fwcfg-flavour": (["-l", "fwcfg,other", *VALID], "fw_cfg flavour 'other'"),
    "pci-slot-range": (["-s", "40,pci-testdev", *VALID], "slots are 0-31"),
    "pci-function-range": (["-s", "3:8,pci-testdev", *VALID], "functions 0-7"),
    "pci-bus-1": (["-s", "1:3:0,pci-testdev", *VALID], "only PCI bus 0"),
    "pci-bad-slot": (["-s", "x,virtio-rnd", *VALID], "invalid -s"),
    "pci-slot-twice": (["-s", "3,virtio-rnd", "-s", "3,virtio-rnd", *VALID], "already in use"),
    "pci-unknown": (["-s", "3,nosuchdev", *VALID], "unknown PCI emulation 'nosuchdev'"),
    "pci-unknown-by-key": (["-o", "pci.0.3.0.device=nosuch", *VALID],
                           "unknown PCI emulation 'nosuch'"),
    "blk-missing-disk": (["-s", "3,virtio-blk,/missing/disk", *VALID], "/missing/disk"),
    "blk-no-path": (["-s", "3,virtio-blk", *VALID], "no disk path"),
    "testdev-vectors-range": (["-s", "3,pci-testdev,vectors=3", *VALID], "power of two"),
    "testdev-vectors-type": (["-s", "3,pci-testdev,vectors=abc", *VALID],
                             "vectors: 'abc' is not a number"),
    "net-no-backend": (["-s", "3,virtio-net", *VALID], "virtio-net: no backend given"),
    "net-tap-bad-name": (["-s", "3,virtio-net,tap=a-name-far-too-long", *VALID],
                         "'a-name-far-too-long' is not a valid interface name"),
    "net-tap-not-a-tap": (["-s", "3,virtio-net,lo", *VALID], "cannot attach to tap lo"),
    "net-hostfwd-syntax": (["-s", "3,virtio-net,slirp,hostfwd=tcp:22", *VALID],
                           "hostfwd 'tcp:22' is not tcp|udp:"),
    "net-hostfwd-port-range": (["-s", "3,virtio-net,slirp,hostfwd=tcp::70000-:22", *VALID],
                               "port '70000' is not a number from 1 to 65535"),
    "rnd-unknown-option": (["-s", "3,virtio-rnd,foo=1", *VALID], "unknown option 'foo'"),
    "kexec-missing": (["-f", "kexec,/missing", "vm"], "cannot read kernel /missing"),
    "kexec-empty": (["-f", "kexec,", "vm"], "-f kexec needs a kernel"),
    "kexec-not-a-kernel": (["-f", f"kexec,{ROM}", "vm"], "not a kernel pyhyve boots"),
    "kexec-and-bootrom-missing": (["-f", "kexec,/missing", *VALID], "cannot read kernel /missing"),
    "no-bootrom-or-kernel": (["vm"], "give a bootrom"),
    "fwcfg-file-missing": (["-f", "opt/x,file=/missing", *VALID], "cannot read -f opt/x file /missing"),
    "fwcfg-no-content": (["-f", "opt/x", *VALID], "invalid -f 'opt/x'"),
    "gdb-port-range": (["-G", "99999", *VALID], "invalid -G '99999'"),
    "gdb-not-a-port": (["-G", "wxyz", *VALID], "invalid -G 'wxyz'"),
    "gdb-port-key": (["-o", "gdb.port=x", *VALID], "gdb.port: 'x' is not a number"),
    "gdb-wait-key": (["-o", "gdb.port=0", "-o", "gdb.wait=maybe", *VALID], "not a boolean"),
    "gdb-address-key": (["-o", "gdb.port=0", "-o", "gdb.address=999.1.1.1", *VALID],
                        "gdb: cannot listen on 999.1.1.1"),
    "uuid": (["-U", "notauuid", *VALID], "invalid UUID 'notauuid'"),
    "config-file-missing": (["-k", "/missing.conf", "vm"], "cannot read config file"),
    "config-file-directory": (["-k", "/", "vm"], "cannot read config file"),
    "config-file-bad-line": (["-k", CONF, "vm"], ":2: expected key=value"),
    "config-dump-not-bool": (["-o", "config.dump=maybe", "vm"], "not a boolean"),
    "bootrom-key-missing": (["-o", "lpc.bootrom=/missing", "vm"], "cannot read bootrom"),
    "kernel-key-missing": (["-o", "kexec.kernel=/missing", "vm"], "cannot read kernel"),
    "com-key-backend": (["-o", "lpc.com2.path=bogus", *VALID], "unknown backend"),
    "debugcon-key-missing-dir": (["-o", "lpc.debugcon.path=/missing/d", *VALID],
                                 "debugcon: cannot open file=/missing/d:"),
    "fwcfg-file-key-missing": (["-o", "fwcfg.file.0=opt/x,file=/missing", *VALID],
                               "cannot read -f opt/x file /missing"),
    "uuid-key": (["-o", "uuid=zz", *VALID], "invalid UUID 'zz'"),
    "restore-missing": (["-r", "/missing.snap", "vm"], "cannot read snapshot"),
    "restore-not-a-snapshot": (["-r", CONF, "vm"], "is not a pyhyve snapshot"),
    "strictio-not-bool": (["-o", "x86.strictio=maybe", *VALID], "not a boolean"),
    "strictmsr-not-bool": (["-o", "x86.strictmsr=x", *VALID], "not a boolean"),
    "x2apic-not-bool": (["-o", "x86.x2apic=2", *VALID], "not a boolean"),
    "acpi-not-bool": (["-o", "acpi_tables=maybe", *VALID], "not a boolean"),
    "localtime-not-bool": (["-o", "rtc.use_localtime=x", *VALID], "not a boolean"),
    "wired-not-bool": (["-o", "memory.wired=x", *VALID], "not a boolean"),
    "cpus-key-not-int": (["-o", "cpus=abc", *VALID], "cpus: 'abc' is not a number"),
    "sockets-key-not-int": (["-o", "sockets=abc", *VALID], "sockets: 'abc' is not a number"),
    "memory-key": (["-o", "memory.size=huge", *VALID], "invalid memory size 'huge'"),
    "memory-key-hex": (["-o", "memory.size=0x10", *VALID], "invalid memory size '0x10'"),
    "process-user-unknown": (["-o", "process.user=no-such-user", *VALID],
                             "process.user: no such user 'no-such-user'"),
    "process-user-empty": (["-o", "process.user=", *VALID], "process.user: empty user name"),
    "process-seccomp-not-bool": (["-o", "process.seccomp=maybe", *VALID], "not a boolean"),
    "o-without-value": (["-o", "noequals", *VALID], "expected var=value"),
    "o-bad-key": (["-o", "bad..key=1", *VALID], "invalid config key"),
    "unknown-option": (["-Q", *VALID], "option -Q not recognized"),
    "option-missing-argument": (["-l", f"bootrom,{ROM}", "-m"], "option -m requires argument"),
    "no-vm-name": (["-l", f"bootrom,{ROM}"], "no VM name given"),
    "empty-vm-name": (["-l", f"bootrom,{ROM}", ""], "no VM name given"),
    "empty-vm-name-key": (["-o", "name=", "-l", f"bootrom,{ROM}"], "no VM name given"),
    "vm-name-with-slash": (["-l", f"bootrom,{ROM}", "../evil"], "cannot name a control socket"),
    "extra-arguments": ([*VALID, "extra"], "unexpected arguments after the VM name"),
    # what an attacker tried (security round 2): each was a traceback, or an endless read
    "memory-beyond-any-host": (["-m", "99999999999999999999T", *VALID],
                               "cannot allocate"),
    "vm-name-300-characters": (["-l", f"bootrom,{ROM}", "n" * 300],
                               "is too long for a control socket path"),
    "socket-name-too-long": (["-o", f"control.socket=/tmp/{'s' * 300}", "-l", f"bootrom,{ROM}",
                              "vm"], "cannot create control socket"),
    "config-file-binary": (["-k", "/bin/ls", "vm"], "config file /bin/ls is not UTF-8 text"),
    "config-file-endless": (["-k", "/dev/zero", "vm"],
                            "config file /dev/zero is not a regular file"),
    "kernel-endless": (["-f", "kexec,/dev/zero", "vm"], "kernel /dev/zero is not a regular file"),
    "fwcfg-endless": (["-f", "opt/z,file=/dev/zero", *VALID],
                      "-f opt/z file /dev/zero is not a regular file"),
    "pci-slot-not-a-number": (["-o", "pci.0.x.0.device=virtio-rnd", *VALID],
                              "pci.0.x.0.device: 'x.0' is not a SLOT.FUNCTION pair"),
    # bhyve's -p, -C, -K and pyhyve's logging
    "pin-no-colon": (["-p", "01", *VALID], "invalid -p '01': expected vcpu:hostcpu"),
    "pin-not-numbers": (["-p", "a:b", *VALID], "invalid -p 'a:b'"),
    "pin-negative": (["-p", "-1:0", *VALID], "invalid -p '-1:0'"),
    "pin-no-such-vcpu": (["-p", "1:0", *VALID], "vcpu.1.cpuset: no vCPU 1: the VM has "
                                                "vCPUs 0 to 0"),
    "pin-cpu-beyond-cpuset": (["-p", "0:4096", *VALID], "host CPU 4096 is outside 0..1023"),
    "pin-cpu-not-ours": (["-p", "0:1023", *VALID], "host CPU 1023 is not one pyhyve may run on"),
    "cpuset-key-syntax": (["-o", "vcpu.0.cpuset=0;1", *VALID], "invalid cpuset '0;1'"),
    "cpuset-key-range": (["-o", "vcpu.0.cpuset=1-0", *VALID], "invalid host CPU range 1-0"),
    "guest-in-core-not-bool": (["-o", "memory.guest_in_core=x", *VALID], "not a boolean"),
    "keyboard-layout": (["-K", "us_unix", *VALID], "keyboard.layout (-K): pyhyve has no "
                                                   "display yet"),
    "keyboard-layout-key": (["-o", "keyboard.layout=fr", *VALID], "has no display yet"),
    "keyboard-layout-no-value": (["-l", f"bootrom,{ROM}", "-K"], "option -K requires argument"),
    "logging-level": (["-o", "logging.level=loud", *VALID],
                      "logging.level: 'loud' is not one of debug, info, warning, error"),
    "logging-file-missing-dir": (["-o", "logging.file=/missing/dir/log", *VALID],
                                 "cannot open log file /missing/dir/log: No such file"),
    "logging-file-empty": (["-o", "logging.file=", *VALID], "logging.file: empty path"),
    "logging-file-directory": (["-o", "logging.file=/", *VALID], "cannot open log file /:"),
}


@pytest.mark.parametrize("args, message", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_exit_4(tmp_path, args, message):
    rom = build_rom("hello16")
    conf = tmp_path / "vm.conf"
    conf.write_text("cpus=2\nnot a key value line\n")
    debug = tmp_path / "debug"
    args = [arg.replace(ROM, str(rom)).replace(CONF, str(conf)) for arg in args]
    started = time.monotonic()
    proc = run_pyhyve(["-l", f"debugcon,file={debug}", *args], timeout=30)
    elapsed = time.monotonic() - started
    lines = proc.stderr.splitlines()
    assert proc.returncode == ExitStatus.ERROR, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("pyhyve: "), proc.stderr
    assert message in lines[0]
    assert not debug.exists() or debug.read_text() == ""      # no vCPU ran
    assert elapsed < 10


def test_version():
    import pyhyve
    proc = run_pyhyve(["--version"], timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"pyhyve {pyhyve.__version__}\n", "")


def test_fw_cfg_name_outside_opt_warns_once(tmp_path):
    """Accepted, as QEMU does, with one warning (it was printed twice)."""
    debug = tmp_path / "debug"
    proc = run_pyhyve(["-f", "x,string=a", "-l", f"bootrom,{build_rom('hello16')}",
                       "-l", f"debugcon,file={debug}",
                       "-o", f"control.socket={tmp_path / 'ctl.sock'}", "vm"], timeout=30)
    assert proc.returncode == ExitStatus.POWEROFF, proc.stderr
    [line] = proc.stderr.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} pyhyve: pyhyve.fwcfg: WARNING: "
                        r"-f x: fw_cfg names given by users should start with 'opt/'", line), line
    assert debug.read_text() == "hello from real mode\n"
