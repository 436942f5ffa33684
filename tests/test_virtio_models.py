"""virtio device models without their transport: a bare transport written here,
with no PCI at all, drives the real VirtioRandom and VirtioBlock over real
guest memory, as a virtio-mmio transport would; and the model modules are
shown to import nothing from pyhyve.pci and never to reach for the VM."""

import ast
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fakevm import FakeVm
from test_virtqueue import DATA, Driver

from pyhyve.virtio import blk as B
from pyhyve.virtio.blk import VirtioBlock
from pyhyve.virtio.device import F_VERSION_1, VirtioDevice
from pyhyve.virtio.queue import VirtqueueError
from pyhyve.virtio.rnd import VirtioRandom

REPO = Path(__file__).resolve().parent.parent
MODEL_MODULES = ("device", "blk", "net", "console", "rnd", "ninep", "scsi")
SECTOR = 512


class BareTransport:
    """The Transport of pyhyve.virtio.device and nothing else: one driver-side
    ring per queue, laid out by test_virtqueue's Driver, features as given,
    and a record of what the model asked for."""

    def __init__(self, model_class: type[VirtioDevice], options: dict[str, str],
                 features: int = F_VERSION_1):
        vm = FakeVm()
        self.memory = vm.memory
        self.lock = threading.RLock()
        self.vm_name, self.instance = "bare", "0"
        self.driver_features = features
        self.interrupts: list[int] = []
        self.resets: list[str] = []
        self.warnings: list[str] = []
        self.model = model_class(self, options)
        assert len(self.model.queue_sizes) == 1          # one ring is all these tests lay out
        self.driver = Driver(self.memory, size=8)

    @property
    def io_thread(self):
        raise AssertionError("these models have no backend fds")

    def negotiated(self, feature: int) -> bool:
        return bool(self.driver_features & feature)

    def kick(self, index: int) -> bool:
        with self.lock:
            self.model.queue_notified(index, self.driver.queue)
        return True

    def interrupt_queue(self, index: int) -> None:
        if self.driver.queue.needs_interrupt():
            self.interrupts.append(index)

    def notify_config_change(self) -> None:
        raise AssertionError("no model here changes its config")

    def needs_reset(self, reason: str) -> None:
        self.resets.append(reason)

    def warn_once(self, key: str, message: str, *args) -> None:
        self.warnings.append(message % args)


def test_virtio_rnd_model_fills_buffers_without_pci():
    transport = BareTransport(VirtioRandom, {})
    assert transport.model.device_type == 4 and transport.model.features == 0
    transport.memory.write(DATA, b"\xaa" * 96)
    head = transport.driver.add(writable=[(DATA, 64), (DATA + 64, 16)])
    assert transport.kick(0)
    assert transport.driver.used() == [(head, 80)]
    assert transport.interrupts == [0]
    assert transport.memory.read(DATA, 80) != b"\xaa" * 80
    assert transport.memory.read(DATA + 80, 16) == b"\xaa" * 16    # beyond the chain


@pytest.fixture
def disk(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 16)            # 8 sectors
    return path


def blk_request(transport, kind: int, sector: int, out: bytes = b"", in_length: int = 0):
    """Offer header, data out, data in and status; (head, status gpa, data-in gpa)."""
    header, data_out, data_in, status = DATA, DATA + 0x1000, DATA + 0x2000, DATA + 0x3000
    transport.memory.write(header, struct.pack("<IIQ", kind, 0, sector))
    transport.memory.write(data_out, out)
    transport.memory.write(status, b"\xee")
    readable = [(header, 16)] + ([(data_out, len(out))] if out else [])
    writable = ([(data_in, in_length)] if in_length else []) + [(status, 1)]
    return transport.driver.add(readable, writable), status, data_in


def test_virtio_blk_model_serves_requests_without_pci(disk):
    transport = BareTransport(VirtioBlock, {"path": str(disk), "ser": "bare-disk"})
    model, memory = transport.model, transport.memory
    assert model.device_type == 2 and model.features & B.F_FLUSH
    assert struct.unpack_from("<Q", model.config)[0] == 8          # capacity in sectors

    head, status, data_in = blk_request(transport, B.T_IN, 1, in_length=SECTOR)
    transport.kick(0)
    assert transport.driver.used() == [(head, SECTOR + 1)]
    assert memory.read_u8(status) == B.S_OK
    assert memory.read(data_in, SECTOR) == disk.read_bytes()[SECTOR:2 * SECTOR]

    head, status, _ = blk_request(transport, B.T_OUT, 3, out=b"\x5a" * SECTOR)
    transport.kick(0)
    assert transport.driver.used() == [(head, 1)] and memory.read_u8(status) == B.S_OK
    head, status, data_in = blk_request(transport, B.T_GET_ID, 0, in_length=20)
    transport.kick(0)
    assert transport.driver.used() == [(head, 21)]
    assert memory.read(data_in, 20) == b"bare-disk".ljust(20, b"\0")
    head, status, _ = blk_request(transport, B.T_IN, 8, in_length=SECTOR)   # past the end
    transport.kick(0)
    assert transport.driver.used() == [(head, 1)] and memory.read_u8(status) == B.S_IOERR
    assert transport.interrupts == [0] * 4 and not transport.resets

    with model.quiesce():                               # the disk is synced for a snapshot
        pass
    model.close()
    assert disk.read_bytes()[3 * SECTOR:4 * SECTOR] == b"\x5a" * SECTOR


def test_a_broken_request_is_the_transports_to_handle(disk):
    """A chain without a status byte: the model raises, the transport decides
    (virtio-pci sets NEEDS_RESET)."""
    transport = BareTransport(VirtioBlock, {"path": str(disk)})
    transport.memory.write(DATA, struct.pack("<IIQ", B.T_IN, 0, 0))
    transport.driver.add(readable=[(DATA, 16)])
    with pytest.raises(VirtqueueError, match="status byte"):
        transport.kick(0)
    transport.model.close()


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of what a module under pyhyve/virtio imports."""
    package = ["pyhyve", "virtio"]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("name", MODEL_MODULES)
def test_a_model_module_imports_nothing_from_pci_and_never_sees_the_vm(name):
    path = REPO / "pyhyve" / "virtio" / f"{name}.py"
    forbidden = [module for module in _imported_modules(path)
                 if module.startswith(("pyhyve.pci", "pyhyve.virtio.pci"))]
    assert forbidden == []
    tree = ast.parse(path.read_text())
    mentions = [node.lineno for node in ast.walk(tree)
                if isinstance(node, ast.Name) and node.id == "vm"
                or isinstance(node, ast.Attribute) and node.attr == "vm"
                or isinstance(node, ast.arg) and node.arg == "vm"]
    assert mentions == []


def test_the_models_load_without_pci():
    """Nothing a model imports, however indirectly, loads the PCI code."""
    modules = ", ".join(f"pyhyve.virtio.{name}" for name in MODEL_MODULES)
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {modules}; print(sorted(sys.modules))"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout
    assert "'pyhyve.virtio.blk'" in loaded
    assert "'pyhyve.pci" not in loaded and "'pyhyve.virtio.pci'" not in loaded
