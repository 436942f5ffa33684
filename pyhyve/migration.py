"""Live migration between two pyhyve processes: pre-copy over TCP.

The destination is started as the VM was, with its own devices, disks,
consoles and taps (`pyhyve -R HOST:PORT -o migration.key=PATH ...`): as for
a snapshot (snapshot.py), the stream carries state, never authority.  The
source is told where to go (`pyhyvectl --vm=NAME --migrate=HOST[,PORT]`,
QMP's `migrate`), and both name the same key file (migstream.py: who may
send or take a VM).

Source (Outgoing, on a thread named "migrate"):
 1. connect, authenticate, HELLO: the config, memory size, vCPUs and
    device names; the destination compares them with its own machine and
    answers ACCEPT (or FAILED, and the guest never stopped).
 2. KVM logs the guest's writes to RAM (GuestMemory.log_dirty) and guest
    memory notes the views pyhyve's own threads write through (device
    DMA, which KVM does not see); every page not all zero goes over while
    the guest runs.
 3. rounds: what the guest wrote since the last round goes again, until
    what is left would take no longer than the downtime limit at the
    bandwidth the last round reached, or after MAX_ROUNDS (a guest that
    writes faster than the link carries never gets there; it is then
    paused anyway, for longer).
 4. the guest is paused and its devices quiesced (no request in flight, the
    disks synced); the last pages written, every page a device may have
    written since the migration began, the BIOS area (whose memory slots the
    chipset may have re-mapped, which loses their log), then the machine's
    state (snapshot.machine_state); the disks' locks are released; STATE.
 5. the destination restores through snapshot.restore_machine (every field
    checked), locks the disks and runs the guest, then says RUNNING; the
    source stops (exit status 1, "migrated to HOST:PORT").
Anything that fails before RUNNING (the destination's FAILED, a lost
connection, migrate_cancel before STATE) leaves the source to lock its disks
again and resume the guest, and to say why.  If it cannot lock them again,
the destination may hold them and run the guest (the connection dropped
after STATE): the source then stays paused and says so, rather than run the
guest twice.

Destination (Listener): the socket is opened while the VM is set up,
before the sandbox; connections are accepted once the process is
confined, and one that fails the handshake is refused and the next awaited.
Page runs are checked against guest RAM, and the state goes through the
checks a snapshot's does; anything wrong ends the destination with one
line, and the source resumes.
"""

import json
import socket
import struct
import sys
import threading
import time

from . import snapshot
from .config import Config, ConfigError, parse_size
from .layout import BIOS_AREA_END
from .log import getLogger
from .migstream import (ACCEPT, FAILED, HELLO, PAGES, RUNNING, STATE, ZEROS, Channel,
                        MigrationError, PeerRefused, read_key)
from .vcpu import ExitStatus

log = getLogger(__name__)

PAGE = 4096
DEFAULT_DOWNTIME_MS = 300
MAX_ROUNDS = 30
BATCH_PAGES = 256                   # pages in one PAGES message (1 MiB of data)
SCAN_BYTES = 64 * 1024              # zero-page scan: whole chunks first
BIOS_AREA_PAGES = range(0xC0000 // PAGE, BIOS_AREA_END // PAGE)
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0                   # a peer silent this long has gone
HANDSHAKE_TIMEOUT = 10.0
_RUN = struct.Struct("<QI")         # gpa, pages
_COUNT = struct.Struct("<I")
_ZERO_SCAN = bytes(SCAN_BYTES)
_ZERO_PAGE = bytes(PAGE)
_ZERO_BATCH = bytes(BATCH_PAGES * PAGE)

# Outgoing.status, QEMU's MigrationStatus names
SETUP, ACTIVE, DEVICE, COMPLETED, FAILED_STATUS, CANCELLED = (
    "setup", "active", "device", "completed", "failed", "cancelled")
FINISHED = (COMPLETED, FAILED_STATUS, CANCELLED)


def parse_address(text: str, what: str, default_port: int | None = None) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT; HOST alone where there is a default port)."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, ""
    host = host.strip("[]")
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: '{text}' is not HOST:PORT")
    return host, int(port)


class Migrations:
    """A VM's migration settings and its latest outgoing migration.  Made while
    the VM is set up (the key is read before the sandbox forbids it)."""

    def __init__(self, vm):
        self.vm = vm
        config = vm.config
        self.key = read_key(config.get("migration.key"))
        self.downtime_ms = config.get_int("migration.downtime", DEFAULT_DOWNTIME_MS, 1, 600000)
        self.bandwidth = parse_size(config.get("migration.bandwidth", "0"),
                                    "migration.bandwidth")
        self.current: Outgoing | None = None
        self._lock = threading.Lock()

    def start(self, host: str, port: int, ended=None) -> "Outgoing":
        """Begin migrating to HOST:PORT; MigrationError if one is under way or
        the VM has stopped.  ENDED(info), if given, is called on the migration's
        thread when it has ended, before a completed one stops the VM."""
        with self._lock:
            if self.current is not None and self.current.status not in FINISHED:
                raise MigrationError("a migration is already under way")
            if self.vm.exit_status is not None or self.vm.stopping:
                raise MigrationError("the VM is stopping")
            try:
                snapshot.check_savable(self.vm, "migrate")
            except snapshot.SnapshotError as exc:
                raise MigrationError(str(exc)) from None
            self.current = Outgoing(self, host, port, ended)
            self.current.start()
            return self.current

    def info(self) -> dict:
        return self.current.info() if self.current is not None else {}

    def cancel(self) -> None:
        if self.current is not None:
            self.current.cancel()


class Cancelled(MigrationError):
    pass


class Outgoing:
    """One migration of this VM to a destination (the module docstring)."""

    def __init__(self, migrations: Migrations, host: str, port: int, ended=None):
        self.vm = migrations.vm
        self._ended = ended
        self.memory = self.vm.memory
        self.key = migrations.key
        self.downtime_ms = migrations.downtime_ms
        self.bandwidth = migrations.bandwidth
        self.host, self.port = host, port
        self.status = SETUP
        self.error = ""
        self.rounds = 0
        self.remaining_pages = 0
        self.pages_sent = self.zero_pages = 0
        self.started = time.monotonic()
        self.total_ms: int | None = None
        self.downtime: int | None = None
        self._throughput = 0.0      # bytes a second the last round reached
        self._window = (time.monotonic(), 0)    # bandwidth limit: since when, how much
        self._cancelled = False
        self._keep_paused = False   # the disks may be the destination's now
        self._thread = threading.Thread(target=self._run, name="migrate", daemon=True)
        self.done = threading.Event()

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Give up (QMP's migrate_cancel) unless the state has gone already."""
        self._cancelled = True

    def info(self) -> dict:
        """QEMU's MigrationInfo, as query-migrate gives it."""
        elapsed = self.total_ms if self.total_ms is not None else \
            int((time.monotonic() - self.started) * 1000)
        info = {"status": self.status, "total-time": elapsed,
                "ram": {"transferred": self.channel_bytes(), "remaining":
                        self.remaining_pages * PAGE, "total": self.memory.size,
                        "duplicate": self.zero_pages, "normal": self.pages_sent,
                        "normal-bytes": self.pages_sent * PAGE, "page-size": PAGE,
                        "dirty-sync-count": self.rounds,
                        "mbps": round(self._throughput * 8 / 1e6, 3)}}
        if self.downtime is not None:
            info["downtime"] = self.downtime
        if self.error:
            info["error-desc"] = self.error
        return info

    def channel_bytes(self) -> int:
        channel = getattr(self, "_channel", None)
        return channel.bytes_sent if channel is not None else 0

    # --- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        vm = self.vm
        vm.log.info("migration to %s: starting", self.where)
        try:
            self._migrate()
        except MigrationError as exc:
            self._finish(CANCELLED if isinstance(exc, Cancelled) else FAILED_STATUS, str(exc))
        except Exception as exc:           # a bug: the guest must not stay paused for it
            vm.log.exception("migration to %s failed", self.where)
            self._finish(FAILED_STATUS, f"{type(exc).__name__}: {exc}")
        finally:
            self.memory.log_dirty(False)
            self.memory.track_host_writes(False)
            channel = getattr(self, "_channel", None)
            if channel is not None:
                channel.close()
            self.done.set()

    def _finish(self, status: str, error: str) -> None:
        self.total_ms = int((time.monotonic() - self.started) * 1000)
        self.error = error
        self.status = status
        self.vm.log.warning("migration to %s %s: %s", self.where, status, error)
        self._tell_ended()

    def _tell_ended(self) -> None:
        if self._ended is not None:
            self._ended(self.info())

    def _migrate(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise MigrationError(f"cannot connect to {self.where}: "
                                 f"{exc.strerror or exc}") from None
        sock.settimeout(IO_TIMEOUT)
        try:
            self._channel = Channel.source(sock, self.key)
        except OSError as exc:
            sock.close()
            raise MigrationError(f"handshake with {self.where}: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        vm = self.vm
        self._channel.send(HELLO, json.dumps({
            "config": {key: vm.config.get(key) for key in vm.config.keys()},
            "memory_size": vm.memory.size, "vcpus": len(vm.vcpus),
            "devices": [device.name for device in vm.devices]}).encode())
        self._expect(ACCEPT)
        self.status = ACTIVE
        self.memory.log_dirty(True)
        self.memory.track_host_writes(True)
        pages = self._nonzero_pages()
        self.vm.log.debug("migration: %d pages in use, scanned in %.3f s", len(pages),
                          time.monotonic() - self.started)
        self._send_pages(pages, first=True)
        while True:
            self._check_cancelled()
            dirty = self._collect_dirty()
            self.rounds += 1
            self.remaining_pages = len(dirty)
            fits = len(dirty) * PAGE <= self._throughput * self.downtime_ms / 1000
            if fits or self.rounds >= MAX_ROUNDS:
                break
            self._send_pages(dirty)
        self._stop_and_copy(dirty)

    def _stop_and_copy(self, dirty: set[int]) -> None:
        vm = self.vm
        was_paused = vm.paused
        paused_at = time.monotonic()
        vm.pause()
        self.status = DEVICE
        self.bandwidth = 0          # the cap does not stretch the pause
        handed_over = False
        try:
            with snapshot.quiesced(vm):
                try:
                    dirty |= self._collect_dirty() | self.memory.host_written_pages()
                    if self.memory.lowmem_size >= BIOS_AREA_END:
                        dirty.update(BIOS_AREA_PAGES)
                    self._check_cancelled()
                    self._send_pages(dirty)
                    encoded, data = snapshot.encoded_machine_state(vm)
                    self._check_cancelled()
                    vm.image_locks.release()
                    handed_over = True
                    self._channel.send(STATE, _COUNT.pack(len(encoded)), encoded, data)
                    self._expect(RUNNING)
                except MigrationError:
                    if handed_over:
                        self._take_locks_back()
                    raise
        except BaseException:
            if not was_paused and not self._keep_paused:
                vm.resume()
            raise
        self.downtime = int((time.monotonic() - paused_at) * 1000)
        self.total_ms = int((time.monotonic() - self.started) * 1000)
        self.status = COMPLETED
        vm.log.info("migration to %s: completed in %d ms, %d ms paused", self.where,
                    self.total_ms, self.downtime)
        self._tell_ended()
        vm.exit_detail = f"migrated to {self.where}"
        vm.stop(ExitStatus.POWEROFF, cause="migration")

    def _take_locks_back(self) -> None:
        try:
            self.vm.image_locks.take()
        except ConfigError as exc:
            self._keep_paused = True
            raise MigrationError(f"the destination may be running the guest: {exc}; "
                                 "this VM stays paused") from None

    def _expect(self, wanted: int) -> None:
        kind, payload = self._channel.receive()
        if kind == FAILED:
            raise MigrationError("the destination refused: "
                                 + payload.decode("utf-8", "replace")[:500])
        if kind != wanted:
            raise MigrationError(f"the destination answered with message kind {kind}")

    def _check_cancelled(self) -> None:
        if self._cancelled:
            raise Cancelled("cancelled")

    # --- memory --------------------------------------------------------------------
    def _nonzero_pages(self) -> list[int]:
        """Every RAM page that is not all zero (the destination's start from zero)."""
        pages = []
        for base, backing in self.memory.backings():
            size = len(backing)
            for start in range(0, size, SCAN_BYTES):
                end = min(start + SCAN_BYTES, size)
                # mmap slices are bytes: one copy and a memcmp, where comparing
                # memoryviews goes byte by byte
                if backing[start:end] == _ZERO_SCAN[:end - start]:
                    continue
                pages.extend((base + offset) // PAGE for offset in range(start, end, PAGE)
                             if backing[offset:offset + PAGE] != _ZERO_PAGE)
        return pages

    def _collect_dirty(self) -> set[int]:
        """The pages KVM logged the guest writing since the last call."""
        pages = set()
        for region in self.memory.logged_regions():
            first = region.gpa // PAGE
            words = memoryview(self.memory.collect_dirty(region)).cast("Q")
            for index, word in enumerate(words):
                while word:
                    low = word & -word
                    pages.add(first + index * 64 + low.bit_length() - 1)
                    word ^= low
        return pages

    def _content(self, page: int, count: int) -> bytes | None:
        """A copy of COUNT pages from PAGE on (the guest may change them while
        they are sent), or None where that is not all RAM."""
        gpa, length = page * PAGE, count * PAGE
        for base, backing in self.memory.backings():
            if base <= gpa and gpa + length <= base + len(backing):
                return backing[gpa - base:gpa - base + length]
        return None

    def _send_pages(self, pages, first: bool = False) -> None:
        """PAGES and ZEROS messages for PAGES, in batches of contiguous runs.
        FIRST: the first pass, whose pages are known not to be all zero (and
        the destination starts from zeroed memory)."""
        started, sent_before = time.monotonic(), self.channel_bytes()
        batch: list[list[int]] = []         # [first page, count] runs
        in_batch = 0
        for page in sorted(pages):
            if batch and batch[-1][0] + batch[-1][1] == page and in_batch < BATCH_PAGES:
                batch[-1][1] += 1
            elif in_batch < BATCH_PAGES:
                batch.append([page, 1])
            else:
                self._send_batch(batch, first)
                batch, in_batch = [[page, 1]], 0
            in_batch += 1
        if batch:
            self._send_batch(batch, first)
        elapsed = time.monotonic() - started
        self.vm.log.debug("migration: round %d: %d pages in %.3f s", self.rounds,
                          len(pages), elapsed)
        if elapsed > 0.01:
            self._throughput = (self.channel_bytes() - sent_before) / elapsed
        elif not first:
            self._throughput = max(self._throughput, 1e6)

    def _send_batch(self, runs: list[list[int]], first: bool) -> None:
        self._check_cancelled()
        data, data_runs, zero_runs = [], [], []
        for page, count in runs:
            content = self._content(page, count)
            if content is None:
                continue
            if first:
                data.append(content)
                data_runs.append((page, count))
                continue
            for index in range(count):          # a page written since may be zero now
                piece = content[index * PAGE:(index + 1) * PAGE]
                if piece == _ZERO_PAGE:
                    zero_runs.append((page + index, 1))
                else:
                    data.append(piece)
                    data_runs.append((page + index, 1))
        if data_runs:
            self._channel.send(PAGES, _runs(data_runs), b"".join(data))
            self.pages_sent += sum(count for _, count in data_runs)
        if zero_runs:
            self._channel.send(ZEROS, _runs(zero_runs))
            self.zero_pages += len(zero_runs)
        self._limit_bandwidth()

    def _limit_bandwidth(self) -> None:
        if not self.bandwidth:
            return
        since, sent = self._window
        ahead = (self.channel_bytes() - sent) / self.bandwidth - (time.monotonic() - since)
        if ahead > 0:
            time.sleep(ahead)
        if time.monotonic() - since > 1.0:
            self._window = (time.monotonic(), self.channel_bytes())


def _runs(runs: list[tuple[int, int]]) -> bytes:
    """The run table: a count, then (gpa, pages) for each run of pages, the
    adjacent ones merged."""
    merged: list[list[int]] = []
    for page, count in runs:
        if merged and merged[-1][0] + merged[-1][1] == page:
            merged[-1][1] += count
        else:
            merged.append([page, count])
    return _COUNT.pack(len(merged)) + b"".join(_RUN.pack(page * PAGE, count)
                                               for page, count in merged)


# --- the destination ---------------------------------------------------------------
class Listener:
    """-R HOST:PORT: the socket a destination waits on, opened while the VM is
    set up (before the sandbox), and what it then receives."""

    def __init__(self, config: Config):
        host, port = parse_address(config.get("migration.listen"), "-R")
        if not config.get("migration.key"):
            raise ConfigError("-R: a migration destination needs the key its source has: "
                              "-o migration.key=PATH")
        self.key = read_key(config.get("migration.key"))
        try:
            self.sock = socket.create_server((host, port), backlog=1)
        except (OSError, OverflowError) as exc:
            raise ConfigError(f"-R: cannot listen on {host}:{port}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        self.address = self.sock.getsockname()[:2]
        print(f"pyhyve: migration: waiting on {self.address[0]}:{self.address[1]}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        self.sock.close()

    def receive(self, vm) -> Channel:
        """Wait for an authenticated source and take the VM from it; the
        connection is returned, for confirm().  MigrationError if it fails."""
        channel = self._accept(vm)
        try:
            _receive_machine(vm, channel)
        except MigrationError as exc:
            try:
                channel.send(FAILED, str(exc).encode())
            except MigrationError:
                pass
            channel.close()
            raise
        return channel

    def _accept(self, vm) -> Channel:
        self.sock.settimeout(0.5)
        while True:
            if vm.stopping:
                raise MigrationError("stopped while waiting for a source")
            try:
                sock, peer = self.sock.accept()
            except TimeoutError:
                continue
            sock.settimeout(HANDSHAKE_TIMEOUT)
            try:
                channel = Channel.destination(sock, self.key)
            except (PeerRefused, OSError) as exc:
                vm.log.warning("migration: refused %s: %s", peer[0],
                               getattr(exc, "strerror", None) or exc)
                sock.close()
                continue
            sock.settimeout(IO_TIMEOUT)
            vm.log.info("migration: receiving from %s", peer[0])
            return channel

    @staticmethod
    def confirm(vm, channel: Channel) -> threading.Thread:
        """Once a vCPU thread answers (the guest runs), tell the source, on a
        thread of its own (vm.run() holds the caller)."""
        def tell():
            try:
                while not vm.vcpus[0].running and vm.exit_status is None:
                    time.sleep(0.01)
                vm.vcpus[0].call(lambda vcpu: None)
                if vm.exit_status is not None:
                    channel.send(FAILED, b"the VM stopped as it started here")
                else:
                    channel.send(RUNNING)
            except (MigrationError, Exception) as exc:
                vm.log.warning("migration: could not confirm to the source: %s", exc)
            finally:
                channel.close()
        thread = threading.Thread(target=tell, name="migrate-confirm", daemon=True)
        thread.start()
        return thread


def _receive_machine(vm, channel: Channel) -> None:
    kind, payload = channel.receive()
    if kind != HELLO:
        raise MigrationError(f"the source began with message kind {kind}")
    _check_hello(vm, payload)
    snapshot.clear_memory(vm)
    channel.send(ACCEPT)
    while True:
        kind, payload = channel.receive()
        if kind == PAGES:
            _write_pages(vm, payload, with_data=True)
        elif kind == ZEROS:
            _write_pages(vm, payload, with_data=False)
        elif kind == STATE:
            _restore_state(vm, payload)
            return
        elif kind == FAILED:
            raise MigrationError("the source gave up: " + payload.decode("utf-8", "replace"))
        else:
            raise MigrationError(f"unexpected message kind {kind} from the source")


def _check_hello(vm, payload: bytes) -> None:
    """The source's machine must be this one: memory, topology, PCI functions,
    vCPUs and the device names (their state is checked when it comes)."""
    try:
        hello = json.loads(payload)
        saved = hello["config"]
        if not isinstance(saved, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in saved.items()):
            raise TypeError("config")
        differences = snapshot.machine_differences(vm.config, Config(saved))
        names = hello["devices"]
        if not isinstance(names, list):
            raise TypeError("devices")
        if hello["vcpus"] != len(vm.vcpus) or hello["memory_size"] != vm.memory.size:
            differences.append("vCPUs or memory size")
        if set(map(str, names)) != {device.name for device in vm.devices}:
            differences.append("device list")
    except (ValueError, KeyError, TypeError, RecursionError, ConfigError) as exc:
        raise MigrationError(f"malformed description of the source's machine ({exc})") from None
    if differences:
        raise MigrationError("the source's machine differs from this one: "
                             + "; ".join(differences))


def _write_pages(vm, payload: bytes, with_data: bool) -> None:
    """A run table (and with_data, the pages' data after it) into guest RAM;
    every run must lie in RAM and the data fit exactly."""
    view = memoryview(payload)
    if len(view) < _COUNT.size:
        raise MigrationError("a page message is truncated")
    (count,) = _COUNT.unpack_from(view)
    table_end = _COUNT.size + count * _RUN.size
    if table_end > len(view):
        raise MigrationError("a page message's run table is truncated")
    backings = vm.memory.backings()
    at = table_end
    for index in range(count):
        gpa, pages = _RUN.unpack_from(view, _COUNT.size + index * _RUN.size)
        length = pages * PAGE
        target = next(((base, backing) for base, backing in backings
                       if base <= gpa and gpa + length <= base + len(backing)), None)
        if gpa % PAGE or not 0 < pages <= BATCH_PAGES or target is None:
            raise MigrationError(f"page run {gpa:#x}+{pages} pages is not in guest RAM")
        base, backing = target
        if with_data:
            if at + length > len(view):
                raise MigrationError("a page message's data is truncated")
            backing[gpa - base:gpa - base + length] = view[at:at + length]
            at += length
        else:
            backing[gpa - base:gpa - base + length] = _ZERO_BATCH[:length]
    if at != len(view):
        raise MigrationError("a page message has trailing data")


def _restore_state(vm, payload: bytes) -> None:
    """STATE: the manifest (snapshot.machine_state) and its binary parts, put
    back through the snapshot's checked restore; then the disks' locks."""
    view = memoryview(payload)
    try:
        (length,) = _COUNT.unpack_from(view)
        if _COUNT.size + length > len(view):
            raise ValueError("truncated")
        manifest = json.loads(bytes(view[_COUNT.size:_COUNT.size + length]))
        if not isinstance(manifest, dict) or manifest.get("format") != snapshot.FORMAT \
                or manifest.get("version") != snapshot.VERSION:
            raise ValueError("another format or version")
        data = view[_COUNT.size + length:]
        if manifest.get("data_size") != len(data):
            raise ValueError("data size")
    except (ValueError, struct.error, RecursionError, UnicodeDecodeError) as exc:
        raise MigrationError(f"the machine's state is malformed ({exc})") from None
    try:
        snapshot.restore_machine(vm, snapshot.Snapshot(manifest, data))
    except snapshot.SnapshotError as exc:
        raise MigrationError(str(exc)) from None
    try:
        vm.image_locks.take()
    except ConfigError as exc:
        raise MigrationError(f"cannot take over the disks: {exc}") from None
