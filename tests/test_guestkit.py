"""The guest kit (`pyhyve-guest`): its initramfs, its choice of kernel, both
kernels, and the README's quick start booted through a terminal.

The source kernel is the one the `linux` tests boot; Debian's cloud kernel
boots only where KVM runs guest code natively, and on a host that emulates
guest code (kvm_pvm, these machines) the kit's trial boot must see it fail.
"""

import os
import pty
import re
import selectors
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guestrun import REPO
from pyhyve.guestkit import Guest, KitError, cloud, host, initramfs, pyhyve_command, source

BUSYBOX = Path("/bin/busybox")
PROMPT = "root@pyhyve:/# "


def _cpio_entries(blob: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive, read the way Linux's unpacker does."""
    entries, at = {}, 0
    while True:
        assert blob[at:at + 6] == b"070701"
        mode = int(blob[at + 14:at + 22], 16)
        size, namesize = int(blob[at + 54:at + 62], 16), int(blob[at + 94:at + 102], 16)
        name = blob[at + 110:at + 110 + namesize - 1].decode()
        at += 110 + namesize
        at += -at % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, blob[at:at + size])
        at += size + (-size % 4)


def test_newc_archive_layout():
    blob = initramfs.newc_archive([("init", 0o100755, b"#!/bin/sh\n"), ("bin", 0o40755, b""),
                                   ("bin/sh", 0o120777, b"busybox")])
    assert blob.startswith(b"070701") and len(blob) % 4 == 0
    assert _cpio_entries(blob) == {"init": (0o100755, b"#!/bin/sh\n"), "bin": (0o40755, b""),
                                   "bin/sh": (0o120777, b"busybox")}


def test_initramfs_has_busybox_links_init_and_modules():
    if not BUSYBOX.exists():
        pytest.fail("busybox is missing: apt-get install busybox-static")
    entries = _cpio_entries(initramfs.build(BUSYBOX, {"virtio": b"\x7fELF1", "virtio_pci": b"2"}))
    assert entries["bin/busybox"] == (stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert entries["bin/udhcpc"][1] == b"busybox" and entries["bin/poweroff"][1] == b"busybox"
    assert entries["init"][0] == stat.S_IFREG | 0o755
    assert entries["modules.order"][1] == b"virtio\nvirtio_pci\n"      # dependencies first
    assert entries["modules/virtio_pci.ko"][1] == b"2"
    assert b"ttyS0::respawn:-/bin/sh" in entries["etc/inittab"][1]


def test_the_host_module_decides_first(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "PVM_MODULE", tmp_path / "kvm_pvm")
    assert host.emulated_by_module() is None
    (tmp_path / "kvm_pvm").mkdir()
    assert "kvm_pvm" in host.emulated_by_module()


def _fake_pyhyve(tmp_path: Path, body: str) -> list[str]:
    """A stand-in for pyhyve in the trial boot: a script that ignores its arguments."""
    script = tmp_path / "fake-pyhyve"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return [str(script)]


def test_trial_boot_reads_the_outcome(tmp_path, monkeypatch):
    guest = Guest(tmp_path / "k", None, tmp_path / "i", "console=ttyS0", "cloud")
    native, what = host.trial_boot(guest, _fake_pyhyve(tmp_path, f"echo '{initramfs.READY}'"))
    assert native and "reached its shell" in what
    native, what = host.trial_boot(guest, _fake_pyhyve(
        tmp_path, "echo 'pyhyve: vcpu0: KVM_EXIT_INTERNAL_ERROR (suberror 1)' >&2; exit 4"))
    assert not native and "KVM_EXIT_INTERNAL_ERROR" in what
    monkeypatch.setattr(host, "TRIAL_SECONDS", 1.0)
    native, what = host.trial_boot(guest, _fake_pyhyve(tmp_path, "sleep 30"))
    assert not native and "did not reach its shell in 1 s" in what


def test_clearcpuid_bits_are_linux_feature_numbers(linux_guest):
    """CMDLINE's bit numbers, checked against the cpufeatures.h of the tree the
    guest was built from (a wrong number would leave a feature on)."""
    header = (linux_guest.kernel.parent / "src" / "arch" / "x86" / "include" / "asm"
              / "cpufeatures.h").read_text()
    numbers = dict((name.lower(), int(word) * 32 + int(bit)) for name, word, bit in re.findall(
        r"#define X86_FEATURE_(\w+)\s+\(\s*(\d+)\s*\*\s*32\s*\+\s*(\d+)\s*\)", header))
    cleared = re.search(r"clearcpuid=([\d,]+)", source.CMDLINE).group(1).split(",")
    assert [int(n) for n in cleared] == [numbers[name] for name in source.UNEMULATED_FEATURES]


def test_config_check_names_what_kconfig_dropped(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "config-fragment").write_text("# comment\nCONFIG_SHMEM=y\nCONFIG_TMPFS=y\n")
    monkeypatch.setattr(source, "RECIPE", recipe)
    (tmp_path / ".config").write_text("CONFIG_TMPFS=y\nCONFIG_SHMEM=y\n")
    source._check_config(tmp_path / ".config")
    (tmp_path / ".config").write_text("# CONFIG_SHMEM is not set\n")
    with pytest.raises(KitError, match="dropped CONFIG_SHMEM=y, CONFIG_TMPFS=y"):
        source._check_config(tmp_path / ".config")


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setattr(source, "TARBALL", Path("/nonexistent/linux-source-6.1.tar.xz"))
    with pytest.raises(KitError, match="apt-get install .*linux-source-6.1"):
        source.build(Path("/nonexistent"))


# --- Debian's cloud kernel ------------------------------------------------------------
@pytest.fixture(scope="module")
def cloud_guest(tmp_path_factory):
    try:
        return cloud.build(tmp_path_factory.mktemp("cloud"))
    except KitError as exc:
        pytest.skip(f"cannot download Debian's cloud kernel here: {exc}")


def test_cloud_kit_has_kernel_busybox_and_virtio_modules(cloud_guest):
    assert cloud_guest.kernel.read_bytes()[0x202:0x206] == b"HdrS"
    entries = _cpio_entries(cloud_guest.initrd.read_bytes())
    assert "bin/busybox" in entries and "init" in entries
    ordered = entries["modules.order"][1].decode().split()
    for module in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng"):
        assert f"modules/{module}.ko" in entries and module in ordered
    assert ordered.index("virtio") < ordered.index("virtio_pci")      # dependencies first


@pytest.mark.e2e
def test_trial_boot_of_the_cloud_kernel_matches_the_host(cloud_guest, needs_kvm):
    """On an emulating host the stock kernel never reaches its shell: it stops
    pyhyve (exit status 4 on an instruction the emulator lacks) or makes no
    progress (kvm_pvm here); on a native host it reaches it."""
    native, what = host.trial_boot(cloud_guest, [sys.executable, "-m", "pyhyve"])
    if host.emulated_by_module():
        assert not native and ("stopped" in what or "did not reach its shell" in what), what
    else:
        assert native, what


# --- the README's quick start -----------------------------------------------------------
class Terminal:
    """A command on a pty, as a user's terminal runs it."""

    def __init__(self, command: list[str], env: dict):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.output = b""

    def expect(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.master, selectors.EVENT_READ)
            while text.encode() not in self.output:
                left = deadline - time.monotonic()
                assert left > 0 and selector.select(left), \
                    f"{text!r} not seen:\n{self.output[-3000:].decode(errors='replace')}"
                try:
                    data = os.read(self.master, 65536)
                except OSError:         # EIO: the command ended, its pty closed
                    data = b""
                assert data, f"{text!r} not seen:\n{self.output[-3000:].decode(errors='replace')}"
                self.output += data
        return self.output.decode(errors="replace")

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self.master)


@pytest.mark.linux
def test_quick_start_boots_linux_to_a_shell(linux_guest, tmp_path, needs_kvm):
    """`pyhyve-guest run` (the README's first command after the install) on a
    terminal: to the busybox prompt, `uname -a`, `poweroff`, exit status 1."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    terminal = Terminal([sys.executable, "-m", "pyhyve.guestkit", "run",
                         "--name", f"quickstart-{os.getpid()}"], env)
    try:
        shown = terminal.expect(initramfs.READY, 1800)
        assert re.search(r"compiling the kernel|kernel built from this recipe already", shown)
        assert re.search(r"kexec,\S+/bzImage,\S+/initrd.cpio,console=ttyS0 ", shown)
        banner = terminal.expect(PROMPT, 300)
        assert re.search(r"network: eth0 10\.0\.2\.15/24, gateway 10\.0\.2\.2", banner), banner
        assert "disk:    /dev/vda on /mnt" in banner and "leave with: poweroff" in banner
        terminal.type("uname -a")
        assert re.search(r"Linux pyhyve 6\.1\.\d+ .* x86_64", terminal.expect("x86_64", 120))
        terminal.expect(PROMPT, 60)
        terminal.type("poweroff")
        assert terminal.proc.wait(300) == 1          # bhyve's "powered off"
    finally:
        terminal.close()


def test_printed_command_is_the_one_that_boots(tmp_path):
    guest = Guest(tmp_path / "bzImage", None, tmp_path / "initrd.cpio", source.CMDLINE, "source")
    command = pyhyve_command(guest, tmp_path / "disk.img", "vm1")
    assert command[-1] == "vm1" and command[command.index("-c") + 1] == "1"
    assert f"2,virtio-blk,{tmp_path / 'disk.img'}" in command and "3,virtio-net,slirp" in command
    assert f"kexec,{guest.kernel},{guest.initrd},{source.CMDLINE}" in command


# --- the command: what it says, its exit statuses ---------------------------------------
def test_build_says_each_step_and_prints_the_command(tmp_path, monkeypatch, capsys):
    """`pyhyve-guest build DIR`: a line for each step (none silent), then the
    pyhyve command on stdout; made again, it says what it reuses."""
    import pyhyve.guestkit as kit
    if not BUSYBOX.exists():
        pytest.fail("busybox is missing: apt-get install busybox-static")

    def compile_kernel(tree, log):
        for name in ("arch/x86/boot/bzImage", "vmlinux", "System.map", ".config"):
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(b"built")
    monkeypatch.setattr(source, "_check_host", lambda: None)
    monkeypatch.setattr(source, "recipe_fingerprint", lambda: "recipe")
    monkeypatch.setattr(source, "_unpack", lambda tree: tree.mkdir(parents=True))
    monkeypatch.setattr(source, "_patch", lambda tree: None)
    monkeypatch.setattr(source, "_configure", lambda tree: None)
    monkeypatch.setattr(source, "_compile", compile_kernel)
    assert kit.main(["build", "--kernel", "source", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    guest = tmp_path / "source"
    copying = f"copying bzImage, vmlinux, System.map and the config into {guest}"
    writing = f"writing the initramfs (busybox and pyhyve's /init): {guest / 'initrd.cpio'}"
    said = [line.removeprefix("pyhyve-guest: ") for line in err.splitlines()]
    assert all(line.startswith("pyhyve-guest: ") for line in err.splitlines())
    assert said[:2] == ["checking the build tools and linux-source", f"{copying} ..."]
    assert re.fullmatch(rf"{re.escape(copying)}: done in \d+\.\d s", said[2])
    assert said[3] == f"{writing} ..."
    assert re.fullmatch(rf"{re.escape(writing)}: done in \d+\.\d s", said[4])
    assert said[5:] == [f"the guest is ready: kernel {guest / 'bzImage'}, "
                        f"initramfs {guest / 'initrd.cpio'}"]
    assert out.startswith(shlex.join(host.pyhyve_program())) and f"kexec,{guest}/bzImage" in out
    assert kit.main(["build", "--kernel", "source", str(tmp_path)]) == 0
    _, again = capsys.readouterr()
    assert f"kernel built from this recipe already: {guest / 'bzImage'}" in again
    assert f"initramfs up to date: {guest / 'initrd.cpio'}" in again


def test_a_guest_that_cannot_be_made_is_one_line_and_exit_4(tmp_path, monkeypatch, capsys):
    """4, pyhyve's "error": 1 would read as a guest that powered off (`run`
    hands its exit status over to pyhyve)."""
    import pyhyve.guestkit as kit

    def fail(cache, kind):
        raise KitError("building the kernel needs: apt-get install flex")
    monkeypatch.setattr(kit, "make", fail)
    for command in ("build", "run"):
        assert kit.main([command]) == 4
        assert capsys.readouterr() == (
            "", "pyhyve-guest: building the kernel needs: apt-get install flex\n")
