"""The PCI framework as a guest drives it: config mechanism #1 (0xCF8/0xCFC) and
ECAM, BAR sizing and placement, the ROM BAR, INTx routing through the LPC
bridge's PIRQ registers, MSI and MSI-X, the host bridge's PAM registers, device
add/remove, and the `-s` parser."""

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakevm import FakeVm
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from pyhyve.cli import parse_pci
from pyhyve.config import Config, ConfigError
from pyhyve.devices.syscontrol import ResetControl
from pyhyve.memory import GuestMemoryError
from pyhyve.pci import BAR_IO, BAR_MEM32, BAR_MEM64, PciDevice, emulations
from pyhyve.pci import regs as R
from pyhyve.layout import ECAM_BASE, ECAM_SIZE
from pyhyve.pci.bus import PciBus
from pyhyve.pci.hostbridge import AmdHostBridge, HostBridge
from pyhyve.pci.lpc import LpcBridge
from pyhyve.pci.testdev import MAGIC, PciTestDevice

REPO = Path(__file__).resolve().parent.parent

TESTDEV_SLOT = 3
TESTDEV_LINK = (TESTDEV_SLOT + 1 - 1) % 4          # INTA of slot 3
TESTDEV_GSI = 16 + TESTDEV_LINK
LPC_SLOT = 31
PIRQ_ROUTE = 0x60
REG_MAGIC, REG_SCRATCH, REG_RAISE, REG_INTX, REG_COUNT = 0x00, 0x04, 0x08, 0x0C, 0x10
MSI_ADDRESS = 0xFEE00000
MSIX_CONTROL_ENABLE, MSIX_FUNCTION_MASK = 1 << 15, 1 << 14

ROM_IMAGE = b"\x55\xaa\x06" + bytes(range(256)) * 11 + b"rom-tail"   # 2827 bytes


class PciVm(FakeVm):
    """FakeVm that also records the MSIs devices send."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.msis: list[tuple[int, int]] = []

    def signal_msi(self, address: int, data: int) -> None:
        self.msis.append((address, data))


class RomDevice(PciDevice):
    """A device with a memory BAR and an expansion ROM (not registered by name)."""

    emulation_name = "rom-test"

    def init(self, options):
        self.set_ids(0x1234, 0x5678, 0xFF0000)
        self.add_bar(0, BAR_MEM32, 4096)
        self.add_rom(ROM_IMAGE)


# --- guest-side accessors ----------------------------------------------------------
def cf8(slot: int, func: int, offset: int, bus: int = 0, enable: bool = True) -> int:
    return (0x80000000 if enable else 0) | bus << 16 | slot << 11 | func << 8 | (offset & 0xFC)


def cfg_read(vm, slot, func, offset, size, bus=0):
    vm.port_write(0xCF8, 4, cf8(slot, func, offset, bus))
    return vm.port_read(0xCFC + (offset & 3), size)


def cfg_write(vm, slot, func, offset, size, value, bus=0):
    vm.port_write(0xCF8, 4, cf8(slot, func, offset, bus))
    vm.port_write(0xCFC + (offset & 3), size, value)


def ecam(slot, func, offset):
    return ECAM_BASE | slot << 15 | func << 12 | offset


def ecam_read(vm, slot, func, offset, size):
    return vm.mmio_read(ecam(slot, func, offset), size)


def ecam_write(vm, slot, func, offset, size, value):
    vm.mmio_write(ecam(slot, func, offset), size, value)


def ones(size: int) -> int:
    return (1 << (8 * size)) - 1


def set_command(vm, slot, value, func=0):
    cfg_write(vm, slot, func, R.COMMAND, 2, value)


def bar_register(vm, slot, index, func=0):
    return cfg_read(vm, slot, func, R.BAR0 + 4 * index, 4)


def walk_capabilities(read, limit=48):
    """[(offset, id)] along the capability list; fails on a loop or a bad pointer."""
    found, seen = [], set()
    pointer = read(R.CAPABILITIES_POINTER, 1) & 0xFC
    while pointer:
        assert 0x40 <= pointer <= 0xFC, f"capability pointer {pointer:#x} out of range"
        assert pointer not in seen, "capability list loops"
        seen.add(pointer)
        found.append((pointer, read(pointer, 1)))
        assert len(found) <= limit
        pointer = read(pointer + 1, 1) & 0xFC
    return found


# --- fixtures ---------------------------------------------------------------------------
@pytest.fixture
def vm():
    return PciVm()


@pytest.fixture
def bus(vm):
    bus = PciBus(vm.context)
    bus.add(0, 0, HostBridge, {})
    bus.add(LPC_SLOT, 0, LpcBridge, {})
    return bus


@pytest.fixture
def testdev(vm, bus):
    return bus.add(TESTDEV_SLOT, 0, PciTestDevice, {})


@pytest.fixture
def decoded(vm, testdev):
    """pci-testdev with I/O and memory decode on; returns its BAR0 and BAR1 bases."""
    set_command(vm, TESTDEV_SLOT, R.COMMAND_IO | R.COMMAND_MEMORY | R.COMMAND_MASTER)
    return testdev.bars[0].address, testdev.bars[1].address


def raise_vector(vm, mem_base, vector=0):
    vm.mmio_write(mem_base + REG_RAISE, 4, vector)


# --- configuration mechanism #1 and ECAM ------------------------------------------------
def test_config_data_port_all_sizes_match_ecam(vm, testdev):
    assert cfg_read(vm, TESTDEV_SLOT, 0, 0, 4) == 0x00051B36
    assert cfg_read(vm, TESTDEV_SLOT, 0, 0, 2) == 0x1B36
    assert cfg_read(vm, TESTDEV_SLOT, 0, 2, 2) == 0x0005
    assert [cfg_read(vm, TESTDEV_SLOT, 0, i, 1) for i in range(4)] == [0x36, 0x1B, 0x05, 0x00]
    for offset in range(0, 0x100, 4):
        dword = cfg_read(vm, TESTDEV_SLOT, 0, offset, 4)
        assert ecam_read(vm, TESTDEV_SLOT, 0, offset, 4) == dword
        for i in range(4):
            assert cfg_read(vm, TESTDEV_SLOT, 0, offset + i, 1) == (dword >> 8 * i) & 0xFF
            assert ecam_read(vm, TESTDEV_SLOT, 0, offset + i, 1) == (dword >> 8 * i) & 0xFF
        for i in (0, 2):
            assert cfg_read(vm, TESTDEV_SLOT, 0, offset + i, 2) == (dword >> 8 * i) & 0xFFFF
            assert ecam_read(vm, TESTDEV_SLOT, 0, offset + i, 2) == (dword >> 8 * i) & 0xFFFF


def test_writes_through_each_byte_lane_reach_the_same_config_space(vm, testdev):
    cfg_write(vm, TESTDEV_SLOT, 0, R.LATENCY_TIMER, 1, 0x40)           # 0xCFD
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.LATENCY_TIMER, 1) == 0x40
    ecam_write(vm, TESTDEV_SLOT, 0, R.CACHE_LINE_SIZE, 1, 0x10)
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.CACHE_LINE_SIZE, 2) == 0x4010
    cfg_write(vm, TESTDEV_SLOT, 0, R.INTERRUPT_LINE, 1, 11)            # 0xCFC
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.INTERRUPT_LINE, 4) & 0xFFFF == 0x010B
    cfg_write(vm, TESTDEV_SLOT, 0, R.COMMAND, 2, R.COMMAND_MASTER)      # word at 0xCFC
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.COMMAND, 2) == R.COMMAND_MASTER
    # a dword write at 0x0C: only cache line and latency timer are writable
    cfg_write(vm, TESTDEV_SLOT, 0, R.CACHE_LINE_SIZE, 4, 0xFFFFFFFF)
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.CACHE_LINE_SIZE, 4) == 0x0000FFFF


def test_misaligned_config_accesses_are_ignored(vm, testdev):
    vm.port_write(0xCF8, 4, cf8(TESTDEV_SLOT, 0, 0))
    assert vm.port_read(0xCFD, 2) == 0xFFFF          # word straddling a word boundary
    assert vm.port_read(0xCFE, 4) == 0xFFFFFFFF
    assert ecam_read(vm, TESTDEV_SLOT, 0, 1, 2) == 0xFFFF
    assert ecam_read(vm, TESTDEV_SLOT, 0, 2, 4) == 0xFFFFFFFF
    ecam_write(vm, TESTDEV_SLOT, 0, R.CACHE_LINE_SIZE + 1, 2, 0x1234)
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.CACHE_LINE_SIZE, 2) == 0


def test_enable_bit_gates_mechanism_1(vm, testdev):
    vm.port_write(0xCF8, 4, cf8(TESTDEV_SLOT, 0, 0, enable=False))
    assert vm.port_read(0xCFC, 4) == 0xFFFFFFFF
    vm.port_write(0xCF8, 4, cf8(TESTDEV_SLOT, 0, R.LATENCY_TIMER & ~3, enable=False))
    vm.port_write(0xCFD, 1, 0x55)
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.LATENCY_TIMER, 1) == 0
    vm.port_write(0xCF8, 4, cf8(TESTDEV_SLOT, 0, 0))
    assert vm.port_read(0xCFC, 4) == 0x00051B36


def test_nonexistent_functions_read_all_ones(vm, bus, testdev):
    for slot, func, bus_number in ((5, 0, 0), (TESTDEV_SLOT, 1, 0), (TESTDEV_SLOT, 0, 1),
                                   (31, 7, 0), (0, 0, 255)):
        for size in (1, 2, 4):
            assert cfg_read(vm, slot, func, 0, size, bus=bus_number) == ones(size)
        cfg_write(vm, slot, func, R.COMMAND, 2, 0xFFFF, bus=bus_number)   # ignored
    for slot, func in ((5, 0), (TESTDEV_SLOT, 7)):
        for size in (1, 2, 4):
            assert ecam_read(vm, slot, func, 0, size) == ones(size)
        ecam_write(vm, slot, func, R.COMMAND, 2, 0xFFFF)
    # bus 1 is outside the 1 MiB ECAM window
    assert vm.mmio_read(ECAM_BASE + ECAM_SIZE, 4) == 0xFFFFFFFF
    assert bus.config_read(1, TESTDEV_SLOT, 0, 0, 4) == 0xFFFFFFFF
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.COMMAND, 2) == 0


def test_config_address_latches_only_on_dword_writes(vm, testdev):
    address = cf8(TESTDEV_SLOT, 0, 0x08)
    vm.port_write(0xCF8, 4, address | 3)             # the low two bits are not kept
    assert vm.port_read(0xCF8, 4) == address
    vm.port_write(0xCF8, 1, 0)
    vm.port_write(0xCF8, 2, 0)
    vm.port_write(0xCF9, 1, 0x12)                    # nothing registered at 0xCF9 here
    vm.port_write(0xCFA, 2, 0)
    vm.port_write(0xCFB, 1, 0)
    assert vm.port_read(0xCF8, 4) == address
    assert vm.port_read(0xCFC, 4) == 0xFF000000     # class ff0000, revision 0
    assert vm.port_read(0xCF8, 1) == 0xFF            # only dword reads see the register
    assert vm.port_read(0xCF8, 2) == 0xFFFF


def test_reset_control_register_at_0xcf9_does_not_disturb_the_address(vm, testdev):
    ResetControl(vm.context)
    address = cf8(TESTDEV_SLOT, 0, 0)
    vm.port_write(0xCF8, 4, address)
    vm.port_write(0xCF9, 1, 0x02)                    # SYS_RST without RST_CPU: no reset
    assert vm.stops == []
    assert vm.port_read(0xCF9, 1) & 0x02
    assert vm.port_read(0xCF8, 4) == address
    assert vm.port_read(0xCFC, 4) == 0x00051B36


def test_ecam_qword_accesses_are_two_dwords(vm, testdev):
    low = ecam_read(vm, TESTDEV_SLOT, 0, 0, 4)
    high = ecam_read(vm, TESTDEV_SLOT, 0, 4, 4)
    assert ecam_read(vm, TESTDEV_SLOT, 0, 0, 8) == low | high << 32
    # a qword BAR write (BAR0 and BAR1) updates both registers
    ecam_write(vm, TESTDEV_SLOT, 0, R.BAR0, 8, 0xFFFFFFFF_FFFFFFFF)
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.BAR0, 4) == 0xFFFFF000
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.BAR0 + 4, 4) == 0xFFFFFF01
    # the last dword of function 0, then the first of (absent) function 1
    assert ecam_read(vm, TESTDEV_SLOT, 0, 0xFFC, 8) & 0xFFFFFFFF == 0
    assert ecam_read(vm, TESTDEV_SLOT, 0, 0xFFC, 8) >> 32 == 0xFFFFFFFF


def test_extended_config_space_is_empty_but_present(vm, testdev):
    assert ecam_read(vm, TESTDEV_SLOT, 0, 0x100, 4) == 0    # no extended capabilities
    assert ecam_read(vm, TESTDEV_SLOT, 0, 0xFFC, 4) == 0
    ecam_write(vm, TESTDEV_SLOT, 0, 0x100, 4, 0xFFFFFFFF)
    assert ecam_read(vm, TESTDEV_SLOT, 0, 0x100, 4) == 0


# --- header -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, ids, class_code, subsystem", [
    (HostBridge, 0x12378086, 0x060000, 0x11001AF4),
    (AmdHostBridge, 0x74321022, 0x060000, None),
    (LpcBridge, 0x70008086, 0x060100, 0x11001AF4),
    (PciTestDevice, 0x00051B36, 0xFF0000, 0x11001AF4),
])
def test_header_defaults(vm, cls, ids, class_code, subsystem):
    bus = PciBus(vm.context)
    bus.add(2, 0, cls, {})
    for read in (lambda o, s: cfg_read(vm, 2, 0, o, s), lambda o, s: ecam_read(vm, 2, 0, o, s)):
        assert read(R.VENDOR_ID, 4) == ids
        assert read(R.REVISION_ID, 4) >> 8 == class_code
        if subsystem is not None:
            assert read(R.SUBSYSTEM_VENDOR_ID, 4) == subsystem
        assert read(R.HEADER_TYPE, 1) == R.HEADER_TYPE_NORMAL
        assert read(R.COMMAND, 2) == 0
        assert read(R.INTERRUPT_LINE, 1) == 0xFF
        assert read(R.INTERRUPT_PIN, 1) == (1 if cls is PciTestDevice else 0)


def test_emulations_registry_lists_the_builtins():
    registry = emulations()
    assert registry["hostbridge"] is HostBridge
    assert registry["amd_hostbridge"] is AmdHostBridge
    assert registry["lpc"] is LpcBridge
    assert registry["pci-testdev"] is PciTestDevice


def _declared_emulations() -> dict[str, str]:
    """Every @emulation("name") in pyhyve's sources, read from the files (an
    import would only find those some registry line already imports)."""
    import ast
    declared = {}
    for path in sorted((REPO / "pyhyve").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            for decorator in getattr(node, "decorator_list", ()):
                if isinstance(decorator, ast.Call) and decorator.args and \
                        getattr(decorator.func, "id", "") == "emulation":
                    declared[decorator.args[0].value] = module
    return declared


def test_each_emulation_in_the_sources_is_registered_by_its_module():
    from pyhyve.pci import BUILTIN_MODULES, find_emulation
    declared = _declared_emulations()
    assert {"virtio-blk", "hostbridge", "lpc"} <= set(declared)    # the scan sees them
    assert BUILTIN_MODULES == declared        # a forgotten registry line fails here
    for name, module in BUILTIN_MODULES.items():
        assert find_emulation(name).__module__ == module
    assert find_emulation("no-such-device") is None


PLUGIN = '''
from pyhyve.pci import PciDevice


class HelloDevice(PciDevice):
    """A device from another package"""

    savable = True

    def init(self, options):
        self.set_ids(0x1234, 0xBEEF, 0xFF0000)
'''


def _install_plugin(root: Path, module: str, target: str) -> None:
    """A package as pip leaves it: the module and a dist-info with its entry point."""
    (root / f"{module}.py").write_text(PLUGIN)
    info = root / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[pyhyve.pci_emulations]\n{target}\n")


def test_an_installed_package_adds_an_emulation(tmp_path, monkeypatch):
    from pyhyve import pci
    from pyhyve.pci import find_emulation
    _install_plugin(tmp_path, "hello_pyhyve", "hello-dev = hello_pyhyve:HelloDevice")
    monkeypatch.syspath_prepend(str(tmp_path))
    # the plugin leaves the registry with the test (later tests list every emulation)
    monkeypatch.setattr(pci, "_EMULATIONS", dict(pci._EMULATIONS))
    cls = find_emulation("hello-dev")
    assert cls is not None and cls.__name__ == "HelloDevice" and cls.emulation_name == "hello-dev"
    bus = PciBus(FakeVm().context)
    bus.add(6, 0, cls, {})
    assert bus.config_read(0, 6, 0, R.VENDOR_ID, 4) == 0xBEEF << 16 | 0x1234
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}")
    listed = subprocess.run([sys.executable, "-m", "pyhyve", "-s", "help"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "hello-dev        A device from another package" in listed.stdout


def test_a_broken_plugin_is_one_error_line(tmp_path):
    _install_plugin(tmp_path, "broken_pyhyve", "broken-dev = broken_pyhyve:NoSuchClass")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}")
    result = subprocess.run([sys.executable, "-m", "pyhyve", "-s", "3,broken-dev",
                             "-l", "bootrom,/dev/null", "vm"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 4 and result.stderr.count("\n") == 1, result.stderr
    assert "PCI emulation 'broken-dev' (broken_pyhyve:NoSuchClass) cannot be loaded" in \
        result.stderr


def test_read_only_header_fields_ignore_writes(vm, testdev):
    before = [cfg_read(vm, TESTDEV_SLOT, 0, o, 4) for o in range(0, 0x40, 4)]
    for offset in (0x00, 0x08, 0x28, 0x2C, 0x34, 0x38):
        cfg_write(vm, TESTDEV_SLOT, 0, offset, 4, 0xFFFFFFFF)
        ecam_write(vm, TESTDEV_SLOT, 0, offset, 4, 0)
    cfg_write(vm, TESTDEV_SLOT, 0, R.HEADER_TYPE, 1, 0xFF)
    cfg_write(vm, TESTDEV_SLOT, 0, R.INTERRUPT_PIN, 1, 3)
    after = [cfg_read(vm, TESTDEV_SLOT, 0, o, 4) for o in range(0, 0x40, 4)]
    assert after == before


def test_command_and_status_writable_bits(vm, testdev):
    cfg_write(vm, TESTDEV_SLOT, 0, R.COMMAND, 2, 0xFFFF)
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.COMMAND, 2) == R.COMMAND_WRITABLE
    cfg_write(vm, TESTDEV_SLOT, 0, R.COMMAND, 2, 0)
    # status: the capability bit is read-only; writing ones does not clear it
    cfg_write(vm, TESTDEV_SLOT, 0, R.STATUS, 2, 0xFFFF)
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.STATUS, 2) == R.STATUS_CAP_LIST
    # write-1-to-clear error bits
    testdev.config[R.STATUS + 1] |= 0x80                # detected parity error
    cfg_write(vm, TESTDEV_SLOT, 0, R.STATUS, 2, 0x0000)
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.STATUS, 2) & 0x8000
    cfg_write(vm, TESTDEV_SLOT, 0, R.COMMAND, 4, 0x8000 << 16)   # dword write covering status
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.STATUS, 2) == R.STATUS_CAP_LIST


def test_multifunction_bit_follows_the_functions_in_the_slot(vm, bus, testdev):
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.HEADER_TYPE, 1) == 0
    second = bus.add(TESTDEV_SLOT, 2, PciTestDevice, {})
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.HEADER_TYPE, 1) == 0x80
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.HEADER_TYPE, 2) & 0xFF == 0x80      # with BIST
    assert (cfg_read(vm, TESTDEV_SLOT, 0, R.CACHE_LINE_SIZE, 4) >> 16) & 0xFF == 0x80
    assert ecam_read(vm, TESTDEV_SLOT, 0, R.HEADER_TYPE, 1) == 0x80
    assert ecam_read(vm, TESTDEV_SLOT, 0, 8, 8) >> 48 & 0xFF == 0x80
    assert cfg_read(vm, TESTDEV_SLOT, 2, R.HEADER_TYPE, 1) == 0      # only function 0
    assert cfg_read(vm, TESTDEV_SLOT, 2, R.VENDOR_ID, 4) == 0x00051B36
    assert cfg_read(vm, 0, 0, R.HEADER_TYPE, 1) == 0                 # other slots unaffected
    bus.remove(second)
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.HEADER_TYPE, 1) == 0


def test_capability_list_links_msi_then_msix(vm, bus, testdev):
    def read(offset, size):
        return cfg_read(vm, TESTDEV_SLOT, 0, offset, size)

    assert read(R.STATUS, 2) & R.STATUS_CAP_LIST
    assert read(R.CAPABILITIES_POINTER, 1) == 0x40
    caps = walk_capabilities(read)
    assert [cap_id for _, cap_id in caps] == [R.CAP_ID_MSI, R.CAP_ID_MSIX]
    assert caps == walk_capabilities(lambda o, s: ecam_read(vm, TESTDEV_SLOT, 0, o, s))
    msi, msix = caps[0][0], caps[1][0]
    assert msi == testdev.msi.offset and msix == testdev.msix.offset
    assert read(msix + 1, 1) == 0
    # MSI: 4 vectors capable, 64-bit, per-vector masking, disabled
    assert read(msi + 2, 2) == (2 << 1) | (1 << 7) | (1 << 8)
    # MSI-X: table size 4 (encoded N-1), table at BAR4 offset 0, PBA at BAR4 + 4 KiB
    assert read(msix + 2, 2) == 3
    assert read(msix + 4, 4) == 4
    assert read(msix + 8, 4) == 0x1000 | 4
    # bridges have no capabilities
    assert not cfg_read(vm, 0, 0, R.STATUS, 2) & R.STATUS_CAP_LIST
    assert cfg_read(vm, 0, 0, R.CAPABILITIES_POINTER, 1) == 0
    # the list pointers are read-only
    cfg_write(vm, TESTDEV_SLOT, 0, msi, 4, 0xFFFFFFFF)
    cfg_write(vm, TESTDEV_SLOT, 0, R.CAPABILITIES_POINTER, 1, 0x80)
    assert walk_capabilities(read) == caps


def test_testdev_vectors_option(vm, bus):
    device = bus.add(4, 0, PciTestDevice, {"vectors": "16"})
    assert cfg_read(vm, 4, 0, device.msi.offset + 2, 2) >> 1 & 7 == 4
    assert cfg_read(vm, 4, 0, device.msix.offset + 2, 2) & 0x7FF == 15
    for bad in ({"vectors": "3"}, {"vectors": "64"}, {"vectors": "x"}, {"colour": "red"}):
        with pytest.raises(ConfigError, match="pci-testdev"):
            bus.add(5, 0, PciTestDevice, bad)
    assert (5, 0) not in bus.functions


# --- BARs -----------------------------------------------------------------------------------
def size_bar(vm, slot, index, func=0):
    """The guest's sizing dance: save, write all ones, read, restore."""
    offset = R.BAR0 + 4 * index
    saved = cfg_read(vm, slot, func, offset, 4)
    cfg_write(vm, slot, func, offset, 4, 0xFFFFFFFF)
    mask = cfg_read(vm, slot, func, offset, 4)
    cfg_write(vm, slot, func, offset, 4, saved)
    assert cfg_read(vm, slot, func, offset, 4) == saved
    return mask


def test_bar_defaults_are_aligned_and_typed(vm, testdev):
    bar0, bar1, bar2, bar3, bar4, bar5 = (bar_register(vm, TESTDEV_SLOT, i) for i in range(6))
    assert bar0 & 0xFFF == 0 and bar0 >= 0xC0000000
    assert bar1 & 0xFF == 0x01 and 0xC000 <= bar1 < 0x10000
    assert bar2 & 0xFFFFF == 0x0C                      # 64-bit, prefetchable
    assert (bar3 << 32 | bar2 & ~0xF) == testdev.bars[2].address
    assert bar3 >= 1                                   # placed above 4 GiB
    assert bar4 & 0x1FFF == 0
    assert bar5 == 0


def test_bar_sizing_io_mem32_mem64(vm, testdev):
    assert size_bar(vm, TESTDEV_SLOT, 0) == 0xFFFFF000             # 4 KiB, 32-bit memory
    assert size_bar(vm, TESTDEV_SLOT, 1) == 0xFFFFFF01             # 256 ports
    assert size_bar(vm, TESTDEV_SLOT, 2) == 0xFFF0000C             # 1 MiB, 64-bit, prefetch
    assert size_bar(vm, TESTDEV_SLOT, 3) == 0xFFFFFFFF             # upper half
    assert size_bar(vm, TESTDEV_SLOT, 4) == 0xFFFFE000             # MSI-X BAR, 8 KiB
    assert size_bar(vm, TESTDEV_SLOT, 5) == 0                      # unimplemented
    # sizing both halves of the 64-bit BAR before restoring either
    low, high = bar_register(vm, TESTDEV_SLOT, 2), bar_register(vm, TESTDEV_SLOT, 3)
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 8, 4, 0xFFFFFFFF)
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 12, 4, 0xFFFFFFFF)
    assert bar_register(vm, TESTDEV_SLOT, 2) == 0xFFF0000C
    assert bar_register(vm, TESTDEV_SLOT, 3) == 0xFFFFFFFF
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 8, 4, low)
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 12, 4, high)
    assert testdev.bars[2].address == (high << 32) | (low & ~0xF)


def test_bar_sizing_with_byte_and_word_writes(vm, testdev):
    saved = bar_register(vm, TESTDEV_SLOT, 0)
    for i in range(4):
        cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + i, 1, 0xFF)
    assert bar_register(vm, TESTDEV_SLOT, 0) == 0xFFFFF000
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0, 2, saved & 0xFFFF)
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 2, 2, saved >> 16)
    assert bar_register(vm, TESTDEV_SLOT, 0) == saved
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.BAR0 + 4, 1) == 0x01     # I/O flag in byte reads


def rom_memslots(vm) -> list[tuple]:
    """(gpa, size) of the read-only memslots KVM was given beyond the bootrom's."""
    from pyhyve.kvm import abi
    return sorted((gpa, size) for gpa, size, flags in vm.kvm_vm.memslots.values()
                  if flags & abi.KVM_MEM_READONLY and gpa < 0xF0000000)


def test_rom_bar_sizing_and_decoding(vm, bus):
    """Decoded with the enable bit and memory space on; there the guest reads
    it as read-only memory (a memslot, as QEMU maps ROMs: no exit a read),
    and writes exit to be ignored."""
    device = bus.add(5, 0, RomDevice, {})
    assert device.rom_size == 4096
    saved = cfg_read(vm, 5, 0, R.ROM_ADDRESS, 4)
    assert saved == device.rom_address and saved & 0xFFF == 0 and saved
    cfg_write(vm, 5, 0, R.ROM_ADDRESS, 4, 0xFFFFF7FE)                # enable bit clear
    assert cfg_read(vm, 5, 0, R.ROM_ADDRESS, 4) == 0xFFFFF000
    cfg_write(vm, 5, 0, R.ROM_ADDRESS, 4, 0xFFFFFFFF)
    assert cfg_read(vm, 5, 0, R.ROM_ADDRESS, 4) == 0xFFFFF001
    cfg_write(vm, 5, 0, R.ROM_ADDRESS, 4, saved)
    assert cfg_read(vm, 5, 0, R.ROM_ADDRESS, 4) == saved
    # decoded only with both the ROM enable bit and memory space enable
    assert vm.mmio_read(saved, 2) == 0xFFFF
    cfg_write(vm, 5, 0, R.ROM_ADDRESS, 4, saved | R.ROM_ENABLE)
    assert vm.mmio_read(saved, 2) == 0xFFFF
    assert rom_memslots(vm) == []
    set_command(vm, 5, R.COMMAND_MEMORY)
    assert rom_memslots(vm) == [(saved, 4096)]
    assert vm.memory.read(saved, 4096) == ROM_IMAGE.ljust(4096, b"\xff")
    assert vm.mmio_read(saved, 2) == 0xAA55
    assert vm.mmio_read(saved, 4) == int.from_bytes(ROM_IMAGE[:4], "little")
    assert vm.mmio_read(saved + len(ROM_IMAGE) - 8, 8) == int.from_bytes(b"rom-tail", "little")
    assert vm.mmio_read(saved + len(ROM_IMAGE), 4) == 0xFFFFFFFF     # padding
    assert vm.mmio_read(saved + 4095, 1) == 0xFF
    vm.mmio_write(saved, 4, 0)                                       # ROM writes are ignored
    assert vm.mmio_read(saved, 2) == 0xAA55
    # moving the ROM
    new = 0xD0000000
    cfg_write(vm, 5, 0, R.ROM_ADDRESS, 4, new | R.ROM_ENABLE)
    assert vm.mmio_read(new, 2) == 0xAA55
    assert vm.mmio_read(saved, 2) == 0xFFFF
    assert rom_memslots(vm) == [(new, 4096)]
    set_command(vm, 5, 0)
    assert vm.mmio_read(new, 2) == 0xFFFF
    assert rom_memslots(vm) == []
    set_command(vm, 5, R.COMMAND_MEMORY)
    assert vm.mmio_read(new, 2) == 0xAA55
    cfg_write(vm, 5, 0, R.ROM_ADDRESS, 4, new)
    assert vm.mmio_read(new, 2) == 0xFFFF
    assert rom_memslots(vm) == []
    cfg_write(vm, 5, 0, R.ROM_ADDRESS, 4, new | R.ROM_ENABLE)
    bus.remove(device)                                               # unplugged: unmapped
    assert rom_memslots(vm) == [] and vm.mmio_read(new, 2) == 0xFFFF


def test_rom_bar_absent_reads_zero(vm, testdev):
    cfg_write(vm, TESTDEV_SLOT, 0, R.ROM_ADDRESS, 4, 0xFFFFFFFF)
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.ROM_ADDRESS, 4) == 0


def test_bar_registers_answer_once_decoding_is_on(vm, testdev):
    mem, io = testdev.bars[0].address, testdev.bars[1].address
    assert vm.mmio_read(mem, 4) == 0xFFFFFFFF and vm.port_read(io, 4) == 0xFFFFFFFF
    set_command(vm, TESTDEV_SLOT, R.COMMAND_IO | R.COMMAND_MEMORY)
    assert vm.mmio_read(mem + REG_MAGIC, 4) == MAGIC
    assert vm.port_read(io + REG_MAGIC, 4) == MAGIC
    assert vm.port_read(io + REG_MAGIC + 2, 2) == MAGIC >> 16
    assert vm.mmio_read(mem + REG_MAGIC + 1, 1) == (MAGIC >> 8) & 0xFF
    vm.mmio_write(mem + REG_SCRATCH, 4, 0x12345678)
    vm.port_write(io + REG_SCRATCH + 1, 1, 0xAB)
    assert vm.mmio_read(mem + REG_SCRATCH, 4) == 0x1234AB78
    assert vm.port_read(io + REG_SCRATCH + 2, 2) == 0x1234
    vm.mmio_write(mem + REG_MAGIC, 4, 0)                             # read-only
    assert vm.mmio_read(mem + REG_MAGIC, 4) == MAGIC


def test_command_decode_bits(vm, decoded, testdev):
    mem, io = decoded
    assert vm.mmio_read(mem, 4) == MAGIC and vm.port_read(io, 4) == MAGIC
    set_command(vm, TESTDEV_SLOT, R.COMMAND_MEMORY)                  # I/O off
    assert vm.port_read(io, 4) == 0xFFFFFFFF and vm.mmio_read(mem, 4) == MAGIC
    set_command(vm, TESTDEV_SLOT, R.COMMAND_IO)                      # memory off
    assert vm.port_read(io, 4) == MAGIC and vm.mmio_read(mem, 4) == 0xFFFFFFFF
    assert vm.mmio_read(testdev.bars[4].address, 4) == 0xFFFFFFFF
    set_command(vm, TESTDEV_SLOT, 0)
    assert vm.port_read(io, 4) == 0xFFFFFFFF and vm.mmio_read(mem, 4) == 0xFFFFFFFF
    assert not [r for r in vm.mmio.ranges() + vm.ports.ranges() if "pci-testdev" in r.name]
    set_command(vm, TESTDEV_SLOT, R.COMMAND_IO | R.COMMAND_MEMORY)
    assert vm.port_read(io, 4) == MAGIC and vm.mmio_read(mem, 4) == MAGIC
    # the command register through a byte write at 0xCFC
    cfg_write(vm, TESTDEV_SLOT, 0, R.COMMAND, 1, R.COMMAND_IO)
    assert vm.port_read(io, 4) == MAGIC and vm.mmio_read(mem, 4) == 0xFFFFFFFF


def device_ranges(vm, device):
    prefix = f"{device.emulation_name}@{device.bdf}."
    return sorted((r.name, r.base, r.end) for r in vm.mmio.ranges() + vm.ports.ranges()
                  if r.name.startswith(prefix))


def test_moving_bars(vm, decoded, testdev):
    mem, io = decoded
    new_mem, new_io = 0xD0000000, 0xE000
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0, 4, new_mem)
    assert bar_register(vm, TESTDEV_SLOT, 0) == new_mem
    assert vm.mmio_read(new_mem + REG_MAGIC, 4) == MAGIC
    assert vm.mmio_read(mem + REG_MAGIC, 4) == 0xFFFFFFFF
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 4, 4, new_io)
    assert bar_register(vm, TESTDEV_SLOT, 1) == new_io | 1
    assert vm.port_read(new_io + REG_MAGIC, 4) == MAGIC
    assert vm.port_read(io + REG_MAGIC, 4) == 0xFFFFFFFF
    # the 64-bit BAR moves as each half is written
    new_high = 0x20_0000_0000
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 8, 4, 0x40000000)
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 12, 4, new_high >> 32)
    assert testdev.bars[2].address == new_high | 0x40000000
    entry = vm.mmio.lookup(new_high | 0x40000000)
    assert entry is not None and entry.name.endswith(".bar2") and entry.end - entry.base == 1 << 20
    # the MSI-X BAR moves with its table
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 16, 4, 0xD0010000)
    assert vm.mmio_read(0xD0010000 + 12, 4) == 1                     # vector 0 masked
    # no stale ranges: exactly one range per decoded BAR
    assert [(name.rsplit(".", 1)[1], base) for name, base, _ in device_ranges(vm, testdev)] == \
        [("bar0", new_mem), ("bar1", new_io), ("bar2", new_high | 0x40000000),
         ("bar4", 0xD0010000)]


def test_bar_sizing_while_decoding_leaves_no_stale_ranges(vm, decoded, testdev):
    before = device_ranges(vm, testdev)
    for index in range(6):
        size_bar(vm, TESTDEV_SLOT, index)
    assert device_ranges(vm, testdev) == before
    assert vm.mmio_read(decoded[0], 4) == MAGIC and vm.port_read(decoded[1], 4) == MAGIC


def test_bar_conflicts_are_not_decoded_and_do_not_raise(vm, decoded, testdev):
    mem, io = decoded
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 4, 4, 0x0C00)           # would cover 0xCF8-0xCFF
    assert bar_register(vm, TESTDEV_SLOT, 1) == 0x0C01
    assert testdev.bars[1].mapping is None
    assert vm.port_read(0xCF8, 4) == cf8(TESTDEV_SLOT, 0, R.BAR0 + 4)  # config ports intact
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0, 4, ECAM_BASE)            # on top of ECAM
    assert testdev.bars[0].mapping is None
    assert ecam_read(vm, TESTDEV_SLOT, 0, 0, 4) == 0x00051B36
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 4, 4, io)
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0, 4, mem)
    assert vm.mmio_read(mem, 4) == MAGIC and vm.port_read(io, 4) == MAGIC
    # two BARs of one device on top of each other: the second one is not decoded
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 16, 4, mem)
    assert vm.mmio_read(mem, 4) == MAGIC
    # an I/O BAR that would run past 0xFFFF is not decoded
    cfg_write(vm, TESTDEV_SLOT, 0, R.BAR0 + 4, 4, 0x10000)
    assert testdev.bars[1].mapping is None


# --- INTx --------------------------------------------------------------------------------------
def test_intx_reaches_the_ioapic_pin_and_the_routed_isa_irq(vm, decoded, testdev):
    mem, _ = decoded
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.INTERRUPT_PIN, 1) == 1
    raise_vector(vm, mem)
    assert vm.irq_levels == {TESTDEV_GSI: True}
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.STATUS, 2) & R.STATUS_INTERRUPT
    assert vm.mmio_read(mem + REG_INTX, 4) == 1
    assert vm.mmio_read(mem + REG_COUNT, 4) == 1
    raise_vector(vm, mem)                                             # already asserted
    assert vm.mmio_read(mem + REG_COUNT, 4) == 2
    # route the link to IRQ 10 while asserted: IRQ 10 rises too
    cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE + TESTDEV_LINK, 1, 10)
    assert cfg_read(vm, LPC_SLOT, 0, PIRQ_ROUTE + TESTDEV_LINK, 1) == 10
    assert vm.irq_levels == {TESTDEV_GSI: True, 10: True}
    vm.mmio_write(mem + REG_INTX, 4, 0)                               # the guest's ack
    assert vm.irq_levels == {TESTDEV_GSI: False, 10: False}
    assert not cfg_read(vm, TESTDEV_SLOT, 0, R.STATUS, 2) & R.STATUS_INTERRUPT
    assert vm.mmio_read(mem + REG_INTX, 4) == 0
    raise_vector(vm, mem)
    assert vm.irq_levels == {TESTDEV_GSI: True, 10: True}


@pytest.mark.parametrize("slot", [1, 2, 3, 4, 7, 30])
def test_intx_swizzle(vm, bus, slot):
    device = bus.add(slot, 0, PciTestDevice, {})
    link = (slot + 1 - 1) % 4
    for other in range(4):
        cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE + other, 1, 3 + other)   # IRQs 3, 4, 5, 6
    device.raise_interrupt()
    assert {irq for irq, level in vm.irq_levels.items() if level} == {16 + link, 3 + link}


def test_intx_disable_bit(vm, decoded, testdev):
    mem, _ = decoded
    cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE + TESTDEV_LINK, 1, 11)
    command = R.COMMAND_IO | R.COMMAND_MEMORY
    raise_vector(vm, mem)
    assert vm.irq_levels == {TESTDEV_GSI: True, 11: True}
    set_command(vm, TESTDEV_SLOT, command | R.COMMAND_INTX_DISABLE)
    assert vm.irq_levels == {TESTDEV_GSI: False, 11: False}
    # Interrupt Status still reports the device's interrupt (PCI 3.0 6.2.3)
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.STATUS, 2) & R.STATUS_INTERRUPT
    set_command(vm, TESTDEV_SLOT, command)                            # re-enabled: pin asserted
    assert vm.irq_levels == {TESTDEV_GSI: True, 11: True}
    set_command(vm, TESTDEV_SLOT, command | R.COMMAND_INTX_DISABLE)
    vm.mmio_write(mem + REG_INTX, 4, 0)                               # ack while disabled
    assert not cfg_read(vm, TESTDEV_SLOT, 0, R.STATUS, 2) & R.STATUS_INTERRUPT
    set_command(vm, TESTDEV_SLOT, command)
    assert vm.irq_levels == {TESTDEV_GSI: False, 11: False}
    # raised while disabled: status set, pin quiet until Interrupt Disable is cleared
    set_command(vm, TESTDEV_SLOT, command | R.COMMAND_INTX_DISABLE)
    raise_vector(vm, mem)
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.STATUS, 2) & R.STATUS_INTERRUPT
    assert vm.irq_levels == {TESTDEV_GSI: False, 11: False}
    set_command(vm, TESTDEV_SLOT, command)
    assert vm.irq_levels == {TESTDEV_GSI: True, 11: True}


def test_pirq_reprogramming_moves_an_asserted_line(vm, decoded, testdev):
    mem, _ = decoded
    pirq = PIRQ_ROUTE + TESTDEV_LINK
    cfg_write(vm, LPC_SLOT, 0, pirq, 1, 10)
    raise_vector(vm, mem)
    assert vm.irq_levels == {TESTDEV_GSI: True, 10: True}
    vm.irq_levels.clear()
    cfg_write(vm, LPC_SLOT, 0, pirq, 1, 11)
    assert vm.irq_levels == {10: False, 11: True}                    # the GSI is not pulsed
    cfg_write(vm, LPC_SLOT, 0, pirq, 1, 0x80 | 11)                   # routing disabled
    assert vm.irq_levels == {10: False, 11: False}
    cfg_write(vm, LPC_SLOT, 0, pirq, 1, 2)                           # not routable
    assert vm.irq_levels == {10: False, 11: False}
    cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE, 4, 0x0B0A0B0A)            # all four at once
    assert vm.irq_levels == {10: False, 11: True}
    vm.mmio_write(mem + REG_INTX, 4, 0)
    assert vm.irq_levels == {10: False, 11: False, TESTDEV_GSI: False}
    # reserved bits read as zero
    cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE, 4, 0xFFFFFFFF)
    assert cfg_read(vm, LPC_SLOT, 0, PIRQ_ROUTE, 4) == 0x8F8F8F8F
    assert cfg_read(vm, LPC_SLOT, 0, PIRQ_ROUTE, 4) == ecam_read(vm, LPC_SLOT, 0, PIRQ_ROUTE, 4)


def test_pirq_defaults_to_disabled(vm, bus):
    assert cfg_read(vm, LPC_SLOT, 0, PIRQ_ROUTE, 4) == 0x80808080
    device = bus.add(4, 0, PciTestDevice, {})
    device.raise_interrupt()
    assert vm.irq_levels == {16: True}


def test_links_sharing_an_isa_irq(vm, bus):
    """SeaBIOS routes PIRQA-D to 10, 10, 11, 11: links share ISA IRQs."""
    first = bus.add(4, 0, PciTestDevice, {})      # link 0
    second = bus.add(5, 0, PciTestDevice, {})     # link 1
    cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE, 4, 0x0B0B0A0A)
    first.raise_interrupt()
    second.raise_interrupt()
    assert vm.irq_levels == {16: True, 17: True, 10: True}
    first.deassert_intx()
    assert vm.irq_levels == {16: False, 17: True, 10: True}
    # moving link 1 away from IRQ 10 and back keeps the count straight
    cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE + 1, 1, 11)
    assert vm.irq_levels[10] is False and vm.irq_levels[11] is True
    first.raise_interrupt()
    assert vm.irq_levels[10] is True
    cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE + 1, 1, 10)
    assert vm.irq_levels[10] is True and vm.irq_levels[11] is False
    second.deassert_intx()
    assert vm.irq_levels[10] is True
    first.deassert_intx()
    assert vm.irq_levels == {16: False, 17: False, 10: False, 11: False}


def test_devices_sharing_a_link(vm, bus):
    first = bus.add(3, 0, PciTestDevice, {})
    second = bus.add(7, 0, PciTestDevice, {})     # (7 + 0) % 4 == 3 as well
    first.raise_interrupt()
    second.raise_interrupt()
    first.deassert_intx()
    assert vm.irq_levels[19] is True
    second.deassert_intx()
    assert vm.irq_levels[19] is False


def test_devices_without_a_pin_never_assert(vm, bus):
    bridge = bus.functions[0, 0]
    bridge.raise_interrupt()
    assert vm.irq_levels == {}
    assert not bridge.config[R.STATUS] & R.STATUS_INTERRUPT


# --- MSI --------------------------------------------------------------------------------------
def program_msi(vm, device, address=MSI_ADDRESS, data=0x4040, control=1, mask=0):
    slot, func, cap = device.slot, device.func, device.msi.offset
    cfg_write(vm, slot, func, cap + 4, 4, address & 0xFFFFFFFF)
    cfg_write(vm, slot, func, cap + 8, 4, address >> 32)
    cfg_write(vm, slot, func, cap + 12, 2, data)
    cfg_write(vm, slot, func, cap + 16, 4, mask)
    cfg_write(vm, slot, func, cap + 2, 2, control)


def test_msi_delivery(vm, decoded, testdev):
    mem, _ = decoded
    program_msi(vm, testdev, data=0x4041)
    raise_vector(vm, mem)
    assert vm.msis == [(MSI_ADDRESS, 0x4041)]
    assert vm.irq_levels == {}                                        # no INTx with MSI
    raise_vector(vm, mem, 1)                                          # only 1 vector enabled
    assert vm.msis == [(MSI_ADDRESS, 0x4041)]
    # four vectors (MME = 2): the vector goes into the low data bits
    vm.msis.clear()
    program_msi(vm, testdev, address=MSI_ADDRESS | 0x1000, data=0x4050, control=(2 << 4) | 1)
    for vector in range(5):
        raise_vector(vm, mem, vector)
    assert vm.msis == [(MSI_ADDRESS | 0x1000, 0x4050 | v) for v in range(4)]
    assert vm.mmio_read(mem + REG_COUNT, 4) == 7
    # the address register ignores its low two bits
    assert cfg_read(vm, TESTDEV_SLOT, 0, testdev.msi.offset + 4, 4) == MSI_ADDRESS | 0x1000
    # disabled: back to INTx
    cfg_write(vm, TESTDEV_SLOT, 0, testdev.msi.offset + 2, 2, 0)
    raise_vector(vm, mem)
    assert vm.irq_levels == {TESTDEV_GSI: True}


def test_msi_multiple_message_enable_is_clamped_to_capable(vm, decoded, testdev):
    mem, _ = decoded
    cap = testdev.msi.offset
    program_msi(vm, testdev, data=0x4321, control=(7 << 4) | 1)      # asks for 128 of 4
    assert cfg_read(vm, TESTDEV_SLOT, 0, cap + 2, 2) >> 4 & 7 == 2
    raise_vector(vm, mem, 3)
    raise_vector(vm, mem, 5)
    assert vm.msis == [(MSI_ADDRESS, 0x4320 | 3)]


def test_msi_masking_sets_pending_and_unmask_delivers(vm, decoded, testdev):
    mem, _ = decoded
    cap = testdev.msi.offset
    program_msi(vm, testdev, data=0x4060, control=(2 << 4) | 1, mask=0b0010)
    raise_vector(vm, mem, 1)
    raise_vector(vm, mem, 0)
    assert vm.msis == [(MSI_ADDRESS, 0x4060)]
    assert cfg_read(vm, TESTDEV_SLOT, 0, cap + 20, 4) == 0b0010
    cfg_write(vm, TESTDEV_SLOT, 0, cap + 20, 4, 0)                   # pending is read-only
    assert cfg_read(vm, TESTDEV_SLOT, 0, cap + 20, 4) == 0b0010
    cfg_write(vm, TESTDEV_SLOT, 0, cap + 16, 4, 0)
    assert vm.msis == [(MSI_ADDRESS, 0x4060), (MSI_ADDRESS, 0x4061)]
    assert cfg_read(vm, TESTDEV_SLOT, 0, cap + 20, 4) == 0
    # mask bits beyond the vectors the device has are not writable
    cfg_write(vm, TESTDEV_SLOT, 0, cap + 16, 4, 0xFFFFFFFF)
    assert cfg_read(vm, TESTDEV_SLOT, 0, cap + 16, 4) == 0xF


def test_msi_pending_waits_while_disabled(vm, decoded, testdev):
    mem, _ = decoded
    cap = testdev.msi.offset
    program_msi(vm, testdev, data=0x70, mask=1)
    raise_vector(vm, mem)
    cfg_write(vm, TESTDEV_SLOT, 0, cap + 2, 2, 0)                    # disable
    cfg_write(vm, TESTDEV_SLOT, 0, cap + 16, 4, 0)                   # unmask while disabled
    assert vm.msis == []
    cfg_write(vm, TESTDEV_SLOT, 0, cap + 2, 2, 1)
    assert vm.msis == [(MSI_ADDRESS, 0x70)]


@pytest.mark.parametrize("address", [0xFED00000, 0xFEF00000, 0x1_FEE0_0000, 0])
def test_msi_outside_the_apic_window_is_dropped(vm, decoded, testdev, address):
    mem, _ = decoded
    program_msi(vm, testdev, address=address, data=0x41)
    raise_vector(vm, mem)
    raise_vector(vm, mem)
    assert vm.msis == []
    assert vm.irq_levels == {}
    assert vm.mmio_read(mem + REG_COUNT, 4) == 2


# --- MSI-X ------------------------------------------------------------------------------------
def msix_entry(vm, table, vector, address, data, masked):
    entry = table + 16 * vector
    vm.mmio_write(entry, 4, address & 0xFFFFFFFF)
    vm.mmio_write(entry + 4, 4, address >> 32)
    vm.mmio_write(entry + 8, 4, data)
    vm.mmio_write(entry + 12, 4, int(masked))


def set_msix_control(vm, device, value):
    cfg_write(vm, device.slot, device.func, device.msix.offset + 2, 2, value)


def test_msix_delivery_masking_and_pba(vm, decoded, testdev):
    mem, _ = decoded
    table = testdev.bars[4].address
    pba = table + 0x1000
    for vector in range(4):
        assert vm.mmio_read(table + 16 * vector + 12, 4) == 1         # masked at reset
    msix_entry(vm, table, 0, MSI_ADDRESS, 0x4080, masked=False)
    msix_entry(vm, table, 1, MSI_ADDRESS | 0x2000, 0x4081, masked=True)
    # not yet enabled: INTx
    raise_vector(vm, mem)
    assert vm.msis == [] and vm.irq_levels == {TESTDEV_GSI: True}
    vm.mmio_write(mem + REG_INTX, 4, 0)
    set_msix_control(vm, testdev, MSIX_CONTROL_ENABLE)
    assert cfg_read(vm, TESTDEV_SLOT, 0, testdev.msix.offset + 2, 2) == MSIX_CONTROL_ENABLE | 3
    raise_vector(vm, mem, 0)
    assert vm.msis == [(MSI_ADDRESS, 0x4080)]
    # per-vector mask: pending in the PBA, delivered on unmask
    raise_vector(vm, mem, 1)
    assert vm.msis == [(MSI_ADDRESS, 0x4080)]
    assert vm.mmio_read(pba, 8) == 0b10
    assert vm.mmio_read(pba, 1) == 0b10
    vm.mmio_write(table + 16 + 12, 4, 0)
    assert vm.msis[-1] == (MSI_ADDRESS | 0x2000, 0x4081)
    assert vm.mmio_read(pba, 8) == 0
    # function mask holds every vector
    set_msix_control(vm, testdev, MSIX_CONTROL_ENABLE | MSIX_FUNCTION_MASK)
    vm.msis.clear()
    raise_vector(vm, mem, 0)
    raise_vector(vm, mem, 1)
    assert vm.msis == [] and vm.mmio_read(pba, 4) == 0b11
    set_msix_control(vm, testdev, MSIX_CONTROL_ENABLE)
    assert sorted(vm.msis) == [(MSI_ADDRESS, 0x4080), (MSI_ADDRESS | 0x2000, 0x4081)]
    assert vm.mmio_read(pba, 4) == 0
    # vectors out of range are ignored; MSI-X wins over MSI; the PBA is read-only
    vm.msis.clear()
    raise_vector(vm, mem, 4)
    program_msi(vm, testdev, data=0x99)
    raise_vector(vm, mem, 0)
    assert vm.msis == [(MSI_ADDRESS, 0x4080)]
    vm.mmio_write(pba, 8, 0xFF)
    assert vm.mmio_read(pba, 8) == 0
    assert vm.irq_levels == {TESTDEV_GSI: False}


def test_msix_pending_survives_disable(vm, decoded, testdev):
    mem, _ = decoded
    table = testdev.bars[4].address
    set_msix_control(vm, testdev, MSIX_CONTROL_ENABLE)
    msix_entry(vm, table, 2, MSI_ADDRESS, 0x42, masked=True)
    raise_vector(vm, mem, 2)
    set_msix_control(vm, testdev, 0)
    vm.mmio_write(table + 32 + 12, 4, 0)                              # unmask while disabled
    assert vm.msis == []
    set_msix_control(vm, testdev, MSIX_CONTROL_ENABLE)
    assert vm.msis == [(MSI_ADDRESS, 0x42)]


def test_msix_bad_address_is_dropped(vm, decoded, testdev):
    mem, _ = decoded
    table = testdev.bars[4].address
    set_msix_control(vm, testdev, MSIX_CONTROL_ENABLE)
    msix_entry(vm, table, 0, 0xFEC00000, 0x30, masked=False)
    msix_entry(vm, table, 1, 0x1_FEE0_0000, 0x31, masked=False)
    raise_vector(vm, mem, 0)
    raise_vector(vm, mem, 1)
    assert vm.msis == [] and vm.irq_levels == {}


def test_msix_table_access_sizes(vm, decoded, testdev):
    table = testdev.bars[4].address
    vm.mmio_write(table, 8, 0x0000_0001_FEE0_1000)                   # qword address write
    vm.mmio_write(table + 8, 8, 0x0000_0001_0000_4321)                # qword data + control
    assert vm.mmio_read(table, 4) == 0xFEE01000
    assert vm.mmio_read(table + 4, 4) == 1
    assert vm.mmio_read(table, 8) == 0x0000_0001_FEE0_1000
    assert vm.mmio_read(table + 8, 2) == 0x4321
    assert vm.mmio_read(table + 9, 1) == 0x43
    assert vm.mmio_read(table + 12, 4) == 1
    # byte, word and misaligned writes are ignored without raising
    vm.mmio_write(table + 8, 1, 0xFF)
    vm.mmio_write(table + 8, 2, 0xFFFF)
    vm.mmio_write(table + 10, 4, 0xFFFFFFFF)
    vm.mmio_write(table + 9, 8, 0xFFFFFFFF_FFFFFFFF)
    assert vm.mmio_read(table + 8, 4) == 0x4321
    # reads and writes running off the end of the table
    last = table + 16 * 3 + 12
    assert vm.mmio_read(last, 8) == 0xFFFFFFFF_00000001
    vm.mmio_write(last, 8, 0)
    assert vm.mmio_read(last, 4) == 0
    assert vm.mmio_read(last + 4, 4) == 0                             # past the table: the device
    # odd-sized PBA reads
    pba = table + 0x1000
    for size in (1, 2, 4, 8):
        for offset in range(8):
            assert vm.mmio_read(pba + offset, size) == 0
    assert vm.mmio_read(table + 0x1FFF, 1) == 0


# --- host bridge PAM ----------------------------------------------------------------------------
BOOTROM_SIZE = 128 * 1024


@pytest.fixture
def bootrom_vm():
    vm = PciVm()
    rom = mmap.mmap(-1, BOOTROM_SIZE)
    rom.write(bytes((i * 7 + (i >> 8)) & 0xFF for i in range(BOOTROM_SIZE)))
    vm.memory.map_bootrom(rom)
    bus = PciBus(vm.context)
    bus.add(0, 0, HostBridge, {})
    vm.rom = rom
    return vm


def bios_region(vm, gpa):
    for region in vm.memory.regions:
        if region.gpa == gpa:
            return region.name
    raise AssertionError(f"no region starts at {gpa:#x}")


def rom_bytes(vm, gpa, length):
    offset = gpa - 0xE0000            # the ROM's last 128 KiB alias 0xE0000-0xFFFFF
    return vm.rom[offset:offset + length]


CHUNKS = (0xE0000, 0xE4000, 0xE8000, 0xEC000, 0xF0000)


def test_pam_switches_the_bios_area(bootrom_vm):
    vm = bootrom_vm
    assert [bios_region(vm, gpa) for gpa in CHUNKS] == ["bios-rom"] * 5
    assert vm.memory.read(0xF0000, 16) == rom_bytes(vm, 0xF0000, 16)
    assert vm.memory.read(0xFFFF0, 16) == rom_bytes(vm, 0xFFFF0, 16)
    with pytest.raises(GuestMemoryError):
        vm.memory.write(0xF0000, b"x")
    # PAM0 high nibble = 3: 0xF0000-0xFFFFF is read/write RAM
    cfg_write(vm, 0, 0, 0x59, 1, 0x30)
    assert cfg_read(vm, 0, 0, 0x59, 1) == 0x30
    assert bios_region(vm, 0xF0000) == "bios-ram"
    assert [bios_region(vm, gpa) for gpa in CHUNKS[:4]] == ["bios-rom"] * 4
    vm.memory.write(0xF0000, rom_bytes(vm, 0xF0000, 16)[::-1])         # shadowing
    assert vm.memory.read(0xF0000, 16) == rom_bytes(vm, 0xF0000, 16)[::-1]
    # read-only RAM: writes refused, RAM still visible
    cfg_write(vm, 0, 0, 0x59, 1, 0x10)
    assert bios_region(vm, 0xF0000) == "bios-ram-ro"
    assert vm.memory.read(0xF0000, 16) == rom_bytes(vm, 0xF0000, 16)[::-1]
    with pytest.raises(GuestMemoryError):
        vm.memory.write(0xF0000, b"x")
    # back to ROM: the bootrom again; RAM underneath keeps the shadow
    cfg_write(vm, 0, 0, 0x59, 1, 0x00)
    assert bios_region(vm, 0xF0000) == "bios-rom"
    assert vm.memory.read(0xF0000, 16) == rom_bytes(vm, 0xF0000, 16)
    cfg_write(vm, 0, 0, 0x59, 1, 0x20)                                 # write-only: ROM reads
    assert bios_region(vm, 0xF0000) == "bios-rom"
    cfg_write(vm, 0, 0, 0x59, 1, 0x30)
    assert vm.memory.read(0xF0000, 16) == rom_bytes(vm, 0xF0000, 16)[::-1]


def test_pam_e_segment_nibbles(bootrom_vm):
    vm = bootrom_vm
    # one dword write at 0x5C: PAM5 (0x5E) = 0x13, PAM6 (0x5F) = 0x31
    ecam_write(vm, 0, 0, 0x5C, 4, 0x3113_0000)
    assert cfg_read(vm, 0, 0, 0x5C, 4) == 0x3113_0000
    assert [bios_region(vm, gpa) for gpa in CHUNKS] == \
        ["bios-ram", "bios-ram-ro", "bios-ram-ro", "bios-ram", "bios-rom"]
    assert vm.memory.read(0xE0000, 16) == bytes(16)                   # fresh RAM
    assert vm.memory.read(0xEC000, 16) == bytes(16)
    # only the PAM bits are writable
    cfg_write(vm, 0, 0, 0x5E, 2, 0xFFFF)
    assert cfg_read(vm, 0, 0, 0x5E, 2) == 0x3333
    assert [bios_region(vm, gpa) for gpa in CHUNKS[:4]] == ["bios-ram"] * 4
    cfg_write(vm, 0, 0, 0x5E, 2, 0)
    assert [bios_region(vm, gpa) for gpa in CHUNKS] == ["bios-rom"] * 5
    assert vm.memory.read(0xE0000, 16) == rom_bytes(vm, 0xE0000, 16)
    # memslots follow: read-only ROM chunks, writable RAM chunks
    slots = {gpa: flags for gpa, _, flags in vm.kvm_vm.memslots.values()}
    assert all(slots[gpa] for gpa in CHUNKS)
    cfg_write(vm, 0, 0, 0x5F, 1, 0x30)
    slots = {gpa: flags for gpa, _, flags in vm.kvm_vm.memslots.values()}
    assert slots[0xEC000] == 0 and slots[0xE8000]


def test_pam_without_a_bootrom_is_harmless(vm, bus):
    regions = [(r.name, r.gpa) for r in vm.memory.regions]
    cfg_write(vm, 0, 0, 0x58, 4, 0xFFFFFFFF)
    cfg_write(vm, 0, 0, 0x5C, 4, 0xFFFFFFFF)
    assert [(r.name, r.gpa) for r in vm.memory.regions] == regions


# --- lifecycle -------------------------------------------------------------------------------
def test_remove_and_add_again(vm, bus, decoded, testdev):
    mem, io = decoded
    msix_bar = testdev.bars[4].address
    raise_vector(vm, mem)
    assert vm.irq_levels == {TESTDEV_GSI: True}
    bus.remove(testdev)
    assert vm.irq_levels == {TESTDEV_GSI: False}
    assert bus.intx.counts == [0, 0, 0, 0]
    for size in (1, 2, 4):
        assert cfg_read(vm, TESTDEV_SLOT, 0, 0, size) == ones(size)
        assert ecam_read(vm, TESTDEV_SLOT, 0, 0, size) == ones(size)
    assert vm.mmio_read(mem, 4) == 0xFFFFFFFF
    assert vm.port_read(io, 4) == 0xFFFFFFFF
    assert vm.mmio_read(msix_bar, 4) == 0xFFFFFFFF
    assert device_ranges(vm, testdev) == []
    vm.mmio_write(mem + REG_RAISE, 4, 0)                             # nothing there now
    assert vm.irq_levels == {TESTDEV_GSI: False}
    again = bus.add(TESTDEV_SLOT, 0, PciTestDevice, {})
    assert cfg_read(vm, TESTDEV_SLOT, 0, 0, 4) == 0x00051B36
    assert cfg_read(vm, TESTDEV_SLOT, 0, R.COMMAND, 2) == 0
    set_command(vm, TESTDEV_SLOT, R.COMMAND_IO | R.COMMAND_MEMORY)
    new_mem, new_io = again.bars[0].address, again.bars[1].address
    assert vm.mmio_read(new_mem, 4) == MAGIC and vm.port_read(new_io, 4) == MAGIC
    raise_vector(vm, new_mem)
    assert vm.irq_levels == {TESTDEV_GSI: True}


def test_remove_with_rom_and_close(vm, bus):
    device = bus.add(5, 0, RomDevice, {})
    set_command(vm, 5, R.COMMAND_MEMORY)
    cfg_write(vm, 5, 0, R.ROM_ADDRESS, 4, device.rom_address | R.ROM_ENABLE)
    assert vm.mmio_read(device.rom_address, 2) == 0xAA55
    bus.remove(device)
    assert vm.mmio_read(device.rom_address, 2) == 0xFFFF
    assert device_ranges(vm, device) == []
    bus.close()
    assert bus.functions == {}
    assert cfg_read(vm, 0, 0, 0, 4) == 0xFFFFFFFF


def test_one_function_per_slot(vm, bus, testdev):
    with pytest.raises(ConfigError, match="already taken by pci-testdev"):
        bus.add(TESTDEV_SLOT, 0, PciTestDevice, {})
    with pytest.raises(ConfigError, match="already taken by hostbridge"):
        bus.add(0, 0, LpcBridge, {})
    for slot, func in ((32, 0), (0, 8), (-1, 0)):
        with pytest.raises(ConfigError, match="out of range"):
            bus.add(slot, func, PciTestDevice, {})
    assert bus.functions[TESTDEV_SLOT, 0] is testdev


# --- the -s parser -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("3,nosuchdev", "unknown PCI emulation 'nosuchdev'"),
    ("3", "expected \\[bus:\\]slot\\[:func\\],emulation"),
    ("3,", "expected"),
    ("x,pci-testdev", "expected"),
    ("1:2:3:4,pci-testdev", "expected"),
    ("-1,pci-testdev", "expected"),
    (",pci-testdev", "expected"),
    ("1:3:0,pci-testdev", "only PCI bus 0"),
    ("32,pci-testdev", "slots are 0-31"),
    ("0:32:0,pci-testdev", "slots are 0-31"),
    ("3:8,pci-testdev", "functions 0-7"),
])
def test_parse_pci_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_pci(Config(), text)


def test_parse_pci_duplicate_slot():
    config = Config()
    parse_pci(config, "3,pci-testdev")
    with pytest.raises(ConfigError, match="slot 3:0 is already in use"):
        parse_pci(config, "3:0,lpc")
    with pytest.raises(ConfigError, match="already in use"):
        parse_pci(config, "0:3:0,hostbridge")
    parse_pci(config, "3:1,pci-testdev")                              # another function is fine


def test_parse_pci_fills_the_config_tree():
    config = Config()
    parse_pci(config, "0:4:1,pci-testdev,vectors=8,flag")
    parse_pci(config, "31,lpc")
    assert config.get("pci.0.4.1.device") == "pci-testdev"
    assert config.get("pci.0.4.1.vectors") == "8"
    assert config.get("pci.0.4.1.flag") == "true"
    assert config.get("pci.0.31.0.device") == "lpc"


def test_s_help_lists_emulations():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pyhyve", "-s", "help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    for name in ("amd_hostbridge", "hostbridge", "lpc", "pci-testdev"):
        assert name in names
    assert "PAM" in result.stdout                                     # descriptions too


# --- fuzzing: random config and BAR traffic ---------------------------------------------------
FUZZ_DEVICES = ((0, 0, HostBridge), (1, 0, AmdHostBridge), (3, 0, PciTestDevice),
                (3, 1, PciTestDevice), (5, 0, RomDevice), (LPC_SLOT, 0, LpcBridge),
                (4, 0, PciTestDevice))

TESTDEVS, HOSTBRIDGES, ROMDEV, LPC = (2, 3, 6), (0, 1), 4, 5
sizes = st.sampled_from((1, 2, 4))
special = (0, 1, 7, 10, 11, 0x8A, 0x10, 0x20, 0x30, 0x33, 0x71, 0x21, 0x4000, 0x8000, 0xC000,
           0xFFFF, 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFF7FE, 0x80000000, 0xFEE00000, 0xFEE01000,
           0xFED00000, 0xD0000000, 0xD0100001, 0xE0000000, 0xC000, 0x0C00, 0x31130000,
           0x0A0B0A0B)
values = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from(special))
how = st.sampled_from(("cf8", "ecam"))
any_device = st.integers(0, len(FUZZ_DEVICES) - 1)
# anything anywhere in config space
config_op = st.tuples(st.just("config"), any_device, how, st.integers(0, 0xFFF), sizes, values,
                      st.booleans())
# where the registers that change state live: command, status, BARs, ROM, MSI, MSI-X
header_op = st.tuples(st.just("config"), any_device, how,
                      st.sampled_from((0x04, 0x06, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30,
                                       0x40, 0x42, 0x44, 0x48, 0x4C, 0x50, 0x54, 0x58, 0x5A)),
                      sizes, values, st.booleans())
pam_op = st.tuples(st.just("config"), st.sampled_from(HOSTBRIDGES), how,
                   st.sampled_from((0x59, 0x5C, 0x5E, 0x5F)), sizes,
                   st.sampled_from((0, 0x10, 0x20, 0x30, 0x11, 0x33, 0x3113, 0x31130000)),
                   st.just(True))
pirq_op = st.tuples(st.just("config"), st.just(LPC), how, st.integers(0x60, 0x63),
                    st.sampled_from((1, 4)),
                    st.sampled_from((10, 11, 5, 0x80, 0x8A, 2, 0x0A0B0A0B, 0x0B0B0A0A)),
                    st.just(True))
# BAR traffic: any BAR (6 = the ROM) at any offset, and the pci-testdev registers
bar_op = st.tuples(st.just("bar"), any_device, st.integers(0, 6), st.integers(0, 0x2000),
                   st.sampled_from((1, 2, 4, 8)), values, st.booleans())
register_op = st.tuples(st.just("bar"), st.sampled_from(TESTDEVS), st.sampled_from((0, 1)),
                        st.sampled_from((REG_MAGIC, REG_SCRATCH, REG_RAISE, REG_INTX,
                                         REG_COUNT)),
                        st.just(4), st.integers(0, 7), st.booleans())
rom_op = st.tuples(st.just("config"), st.just(ROMDEV), how, st.just(R.ROM_ADDRESS), st.just(4),
                   st.sampled_from((0, 1, 0xD0100001, 0xD0100000, 0xFFFFFFFF, 0xFFFFFFFE,
                                    0xE0000001)),
                   st.just(True))
raise_op = st.tuples(st.just("bar"), st.sampled_from(TESTDEVS), st.sampled_from((0, 1)),
                     st.sampled_from((REG_RAISE, REG_RAISE, REG_INTX)), st.just(4),
                     st.integers(0, 4), st.just(True))
msix_op = st.tuples(st.just("bar"), st.sampled_from(TESTDEVS), st.just(4),
                    st.one_of(st.integers(0, 15).map(lambda i: 4 * i),
                              st.integers(0x1000, 0x1008)),
                    st.sampled_from((1, 4, 8)),
                    st.one_of(st.sampled_from((0, 1, 0x40, 0xFEE00000, 0xFEE01000, 0xFEC00000)),
                              values),
                    st.just(True))
raw_op = st.tuples(st.just("raw"), st.sampled_from(("port", "mmio")),
                   st.sampled_from((0xCF8, 0xCF9, 0xCFA, 0xCFB, 0xCFC, 0xCFD, 0xCFE, 0xCFF,
                                    ECAM_BASE, ECAM_BASE + 0x18000, ECAM_BASE + 0xFFFFC)),
                   st.integers(0, 3), st.sampled_from((1, 2, 4, 8)), values, st.booleans())
# a starting point that makes interrupts interesting, which the traffic then perturbs
setups = st.fixed_dictionaries({
    "pirq": st.lists(st.sampled_from((0x80, 10, 11, 5, 0x8A)), min_size=4, max_size=4),
    "mode": st.sampled_from(("intx", "msi", "msix")),
    "mask": st.integers(0, 15),
    "function_mask": st.booleans(),
    "intx_disable": st.booleans(),
})
operations = st.lists(st.one_of(config_op, header_op, header_op, pam_op, pirq_op, bar_op,
                                register_op, raise_op, raise_op, raise_op, msix_op, rom_op,
                                raw_op),
                      min_size=10, max_size=60)


def fuzz_config_access(vm, slot, func, how, offset, size, value, write):
    offset &= ~(size - 1)
    if how == "cf8":
        offset &= 0xFF
        vm.port_write(0xCF8, 4, cf8(slot, func, offset))
        port = 0xCFC + (offset & 3)
        if write:
            vm.port_write(port, size, value)
        else:
            assert vm.port_read(port, size) <= ones(size)
    elif write:
        ecam_write(vm, slot, func, offset, size, value)
    else:
        assert ecam_read(vm, slot, func, offset, size) <= ones(size)


def fuzz_bar_access(vm, device, index, offset, size, value, write):
    if index == 6:
        if device.rom is None:
            return
        base, length, on_ports = device.rom_address, device.rom_size, False
    else:
        bar = device.bars[index]
        if bar is None:
            return
        base, length, on_ports = bar.address, bar.size, bar.kind == BAR_IO
    if on_ports:
        size = min(size, 4)
    address = base + offset % length
    if on_ports:
        address &= 0xFFFF
        if write:
            vm.port_write(address, size, value)
        else:
            assert vm.port_read(address, size) <= ones(size)
    elif write:
        vm.mmio_write(address, size, value)
    else:
        assert vm.mmio_read(address, size) <= ones(size)


def check_consistent(vm, bus, originals):
    asserted_links = [0, 0, 0, 0]
    for (slot, func), device in bus.functions.items():
        def read(offset, size):
            return ecam_read(vm, slot, func, offset, size)

        ids, caps = originals[slot, func]
        assert cfg_read(vm, slot, func, R.VENDOR_ID, 4) == ids
        assert read(R.VENDOR_ID, 4) == ids
        assert walk_capabilities(read) == caps
        command = read(R.COMMAND, 2)
        assert command & ~R.COMMAND_WRITABLE == 0
        ranges = []
        for bar in device.bars:
            if bar is None:
                continue
            register = read(R.BAR0 + 4 * bar.index, 4)
            if bar.kind == BAR_IO:
                assert register & 0x3 == 0x1
                assert register & (bar.size - 1) == 0x1
            else:
                assert register & 0xF == bar.flags
                assert register & (bar.size - 1) & ~0xF == 0
            address = register & (~0x3 if bar.kind == BAR_IO else ~0xF)
            if bar.kind == BAR_MEM64:
                address |= read(R.BAR0 + 4 * bar.index + 4, 4) << 32
            assert address == bar.address
            enabled = command & (R.COMMAND_IO if bar.kind == BAR_IO else R.COMMAND_MEMORY)
            if bar.mapping is not None:
                assert enabled and bar.mapping.base == bar.address
                assert bar.mapping.end - bar.mapping.base == bar.size
                bus_ = vm.ports if bar.kind == BAR_IO else vm.mmio
                assert bus_.lookup(bar.address) is bar.mapping
                ranges.append(bar.mapping)
        rom = read(R.ROM_ADDRESS, 4)
        if device.rom is None:
            assert rom == 0
        else:
            assert rom & (device.rom_size - 1) & ~R.ROM_ENABLE == 0
            if device.rom_mapping is not None:
                assert rom & R.ROM_ENABLE and command & R.COMMAND_MEMORY
                assert device.rom_mapping.base == rom & ~R.ROM_ENABLE
                ranges.append(device.rom_mapping)
        # no stale ranges left on the buses
        prefix = f"{device.emulation_name}@{device.bdf}."
        mine = [r for r in vm.mmio.ranges() + vm.ports.ranges() if r.name.startswith(prefix)]
        assert sorted(map(id, mine)) == sorted(map(id, ranges))
        # INTx bookkeeping
        status = read(R.STATUS, 2)
        assert bool(status & R.STATUS_INTERRUPT) == device.intx_asserted
        line = device.intx_asserted and not command & R.COMMAND_INTX_DISABLE
        assert device._intx_line == line
        if line:
            asserted_links[(slot + device.config[R.INTERRUPT_PIN] - 1) % 4] += 1
        if device.msi is not None:
            control = read(device.msi.offset + 2, 2)     # only enable and MME are writable
            assert control & ~0x71 == (device.msi.vectors.bit_length() - 1) << 1 | 0x180
            assert read(device.msi.offset + 20, 4) == device.msi.pending
    assert bus.intx.counts == asserted_links
    for link, count in enumerate(asserted_links):
        assert vm.irq_levels.get(16 + link, False) == bool(count)
    isa = {}
    for link, count in enumerate(asserted_links):
        irq = bus.intx.isa_irq(bus.intx.routes[link])
        if count and irq is not None:
            isa[irq] = isa.get(irq, 0) + 1
    for irq in range(16):
        assert len(vm.irq_sources.get(irq, ())) == isa.get(irq, 0)
        assert vm.irq_levels.get(irq, False) == bool(isa.get(irq, 0))
    lpc = bus.functions[LPC_SLOT, 0]
    assert list(lpc.config[PIRQ_ROUTE:PIRQ_ROUTE + 4]) == bus.intx.routes


def apply_setup(vm, devices, setup):
    cfg_write(vm, LPC_SLOT, 0, PIRQ_ROUTE, 4, int.from_bytes(bytes(setup["pirq"]), "little"))
    for device in (devices[i] for i in TESTDEVS):
        mask = setup["mask"]
        if setup["intx_disable"]:
            set_command(vm, device.slot, R.COMMAND_IO | R.COMMAND_MEMORY | R.COMMAND_INTX_DISABLE,
                        device.func)
        if setup["mode"] == "msi":
            program_msi(vm, device, data=0x40, control=(2 << 4) | 1, mask=mask)
        elif setup["mode"] == "msix":
            for vector in range(4):
                msix_entry(vm, device.bars[4].address, vector, MSI_ADDRESS, 0x50 + vector,
                           masked=bool(mask >> vector & 1))
            set_msix_control(vm, device, MSIX_CONTROL_ENABLE |
                             (MSIX_FUNCTION_MASK if setup["function_mask"] else 0))


@fuzz_settings(200)
@given(setups, operations)
def test_random_config_and_bar_traffic_keeps_devices_consistent(setup, ops):
    vm = PciVm()
    rom = mmap.mmap(-1, BOOTROM_SIZE)
    vm.memory.map_bootrom(rom)
    bus = PciBus(vm.context)
    devices = [bus.add(slot, func, cls, {}) for slot, func, cls in FUZZ_DEVICES]
    originals = {}
    for device in devices:
        def read(offset, size, device=device):
            return ecam_read(vm, device.slot, device.func, offset, size)
        originals[device.slot, device.func] = (read(0, 4), walk_capabilities(read))
        # decoding on, as firmware leaves it; the traffic may turn it off again
        set_command(vm, device.slot, R.COMMAND_IO | R.COMMAND_MEMORY, device.func)
    apply_setup(vm, devices, setup)
    for op in ops:
        if op[0] == "config":
            _, which, how, offset, size, value, write = op
            slot, func, _ = FUZZ_DEVICES[which]
            fuzz_config_access(vm, slot, func, how, offset, size, value, write)
        elif op[0] == "bar":
            _, which, index, offset, size, value, write = op
            fuzz_bar_access(vm, devices[which], index, offset, size, value, write)
        else:
            _, space, base, delta, size, value, write = op
            if space == "port":
                port, size = 0xCF8 + (base - 0xCF8 + delta) % 8, min(size, 4)
                if write:
                    vm.port_write(port, size, value)
                else:
                    vm.port_read(port, size)
            else:
                address = (base + delta * size) if base >= ECAM_BASE else base
                if write:
                    vm.mmio_write(address, size, value)
                else:
                    vm.mmio_read(address, size)
        check_consistent(vm, bus, originals)
    bus.close()
    assert vm.mmio.ranges()[0].name == "pci-ecam" and len(vm.mmio.ranges()) == 1
    assert not any(level for irq, level in vm.irq_levels.items())
