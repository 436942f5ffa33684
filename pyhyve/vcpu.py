"""vCPU threads and bhyve's vm_loop.

Each vCPU runs in its own named thread: KVM_RUN, look the exit reason up in
a handler table, and act on the handler's verdict: None continues the loop,
an ExitStatus stops the whole VM with that status.  Other threads reach a
vCPU only by kicking it out of KVM_RUN (KVM_CAP_IMMEDIATE_EXIT plus a
signal) and handing it a request to run between two KVM_RUNs, which is how
pause, register access and the halt probe see a consistent vCPU.
"""

import ctypes
import enum
import fcntl
import functools
import os
import signal
import struct
import threading
from collections import deque
from collections.abc import Callable

from .config import format_cpus
from .kvm import KvmError, abi
from .log import getLogger
from .sandbox import narrow_vcpu_thread

KICK_SIGNAL = signal.SIGUSR1
_IO_EXIT = struct.Struct("<BBHIQ")
_U32 = struct.Struct("<I")
_EXIT_UNION = abi.RUN_OFFSET_EXIT_UNION
# kvm_run read as 32-bit words and as 64-bit ones (VcpuThread._words, _qwords)
_EXIT_REASON_WORD = abi.RUN_OFFSET_EXIT_REASON // 4
_IO_WORD = _EXIT_UNION // 4                     # kvm_run.io: direction, size, port
_IO_COUNT_WORD = _IO_WORD + 1
_IO_DATA_OFFSET_QWORD = (_EXIT_UNION + 8) // 8
_MMIO_ADDR_QWORD = _EXIT_UNION // 8             # kvm_run.mmio: phys_addr, data[8],
_MMIO_DATA_BYTE = _EXIT_UNION + 8               # len, is_write
_MMIO_DATA_QWORD = _MMIO_DATA_BYTE // 8
_MMIO_LEN_WORD = (_EXIT_UNION + 16) // 4
_MMIO_IS_WRITE_BYTE = _EXIT_UNION + 20
_IO_OUT = abi.KVM_EXIT_IO_OUT
_OUT_BYTE = _IO_OUT | 1 << 8                    # the low half of the io word
_IN_BYTE = abi.KVM_EXIT_IO_IN | 1 << 8
_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
_PORT_UINT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I")}
RFLAGS_IF = 1 << 9


class ExitStatus(enum.IntEnum):
    """bhyve's exit statuses."""
    RESET = 0
    POWEROFF = 1
    HALT = 2
    TRIPLEFAULT = 3
    ERROR = 4


class _SigAction(ctypes.Structure):
    """glibc's struct sigaction on x86-64."""
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


_c_handler_installed = False


def install_kick_handler() -> None:
    """Give KICK_SIGNAL a handler that does nothing, so that the signal only
    interrupts KVM_RUN.  Python lets only the main thread set handlers, so
    from any other thread (a program embedding pyhyve runs VMs on its own
    threads) the handler is set in C, with sigaction: libc's getpid, which is
    async-signal-safe and touches no Python state.  A handler the program set
    itself is left alone."""
    global _c_handler_installed
    if kick_handler_installed():
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    action = _SigAction(handler=ctypes.cast(libc.getpid, ctypes.c_void_p).value)
    if libc.sigaction(int(KICK_SIGNAL), ctypes.byref(action), None) != 0:
        raise KvmError(f"sigaction({KICK_SIGNAL.name}) failed: errno {ctypes.get_errno()}")
    _c_handler_installed = True


def kick_handler_installed() -> bool:
    return _c_handler_installed or \
        signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)


class VcpuThread:
    """One vCPU: its KVM handle, its thread and its vm_loop."""

    def __init__(self, vm, kvm_vcpu, index: int):
        self.vm = vm
        self.kvm_vcpu = kvm_vcpu
        self.id = index                  # bhyve's vCPU number; kvm_vcpu.id is the APIC ID
        self.log = getLogger(f"pyhyve.{vm.name}.vcpu{self.id}")
        self.exit_counts = [0] * 64
        self.unknown_exit_counts: dict[int, int] = {}
        self._page = kvm_vcpu.run_page
        self._page_size = len(kvm_vcpu.run_page)
        # Views of the run page held as long as the vCPU, as run_state is: the
        # mapping goes with the last of them.
        self._words = memoryview(self._page).cast("I")
        self._qwords = memoryview(self._page).cast("Q")
        self._port_lookup = vm.ports.lookup
        self._run_state = kvm_vcpu.run_state
        self._requests: deque = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        # The handler table, indexed by exit reason: a list, since indexing one
        # takes about 50 ns less than a dict's get, and this is on every exit.
        # A reason pyhyve has no handler for gets one that stops the VM.
        handlers: dict[int, Callable[[], ExitStatus | None]] = {
            abi.KVM_EXIT_IO: self._exit_io,
            abi.KVM_EXIT_MMIO: self._exit_mmio,
            abi.KVM_EXIT_HLT: self._exit_hlt,
            abi.KVM_EXIT_SHUTDOWN: self._exit_shutdown,
            abi.KVM_EXIT_SYSTEM_EVENT: self._exit_system_event,
            abi.KVM_EXIT_X86_RDMSR: self._exit_rdmsr,
            abi.KVM_EXIT_X86_WRMSR: self._exit_wrmsr,
            abi.KVM_EXIT_IRQ_WINDOW_OPEN: self._exit_continue,
            abi.KVM_EXIT_INTR: self._exit_continue,
            abi.KVM_EXIT_DEBUG: self._exit_debug,
            abi.KVM_EXIT_INTERNAL_ERROR: self._exit_fatal,
            abi.KVM_EXIT_FAIL_ENTRY: self._exit_fatal,
        }
        self._handlers: list[Callable[[], ExitStatus | None]] = [
            handlers.get(reason) or functools.partial(self._exit_unknown, reason)
            for reason in range(len(self.exit_counts))]

    # --- thread control -------------------------------------------------------
    def start(self) -> None:
        """Run the vCPU on a fresh thread (again after the VM was reset in
        place: one paused stays so, as the kick that paused it left
        immediate_exit set)."""
        self._thread = threading.Thread(target=self._thread_main,
                                        name=f"vcpu{self.id}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def native_id(self) -> int | None:
        """The host's id of the vCPU's thread (as /proc/PID/task names it);
        None before it first ran."""
        return self._thread.native_id if self._thread is not None else None

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN (or not enter it) as soon as possible."""
        self._run_state.immediate_exit = 1
        thread = self._thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def call(self, function: Callable):
        """Run function(self) on the vCPU thread between two KVM_RUNs."""
        if not self.running or threading.current_thread() is self._thread:
            return function(self)
        done = threading.Event()
        box: list = []

        def request():
            try:
                box.append((True, function(self)))
            except BaseException as exc:  # handed back to the caller
                box.append((False, exc))
            done.set()

        with self._lock:
            self._requests.append(request)
        self.kick()
        while not done.wait(0.05):
            if not self.running:
                with self._lock:
                    queued = request in self._requests
                    if queued:
                        self._requests.remove(request)
                if queued:
                    return function(self)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def request_pause(self) -> None:
        """Ask the vCPU to park at its next instruction boundary; does not wait."""
        self._resume.clear()
        self.kick()

    def pause(self) -> None:
        """Stop at an instruction boundary; returns once the vCPU is parked."""
        self.request_pause()
        if threading.current_thread() is self._thread:
            return
        while self.running and not self._paused.wait(0.05):
            self.kick()

    @property
    def paused(self) -> bool:
        return self._paused.is_set() or not self.running

    def resume(self) -> None:
        self._resume.set()

    # --- the loop ---------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            narrow_vcpu_thread()
        except OSError as exc:
            self.log.error("cannot narrow this vCPU thread's system calls: %s", exc)
            self.vm.stop(ExitStatus.ERROR, vcpu=self)
            return
        status = None
        try:
            status = self._pin()
            if status is None:
                status = self._vm_loop()
        except BaseException:  # a bug in pyhyve, not in the guest
            status = ExitStatus.ERROR
            self.log.exception("vm_loop crashed")
        finally:                # the VM stops even if that report fails too
            if status is not None:
                self.vm.stop(status, vcpu=self, cause="guest")

    def _pin(self) -> ExitStatus | None:
        """bhyve's -p (vcpu.N.cpuset): this thread onto its host CPUs before it
        first runs the guest, as bhyve's fbsdrun_start_thread pins its own."""
        cpus = getattr(self.vm, "cpusets", {}).get(self.id)
        tid = threading.get_native_id()
        if cpus:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError as exc:
                self.vm.fatal(f"vcpu{self.id}: cannot pin thread {tid} to host CPUs "
                              f"{format_cpus(cpus)}: {exc.strerror or exc}")
                return ExitStatus.ERROR
        self.log.info("running on thread %d, %s", tid,
                      f"pinned to host CPUs {format_cpus(cpus)}" if cpus else "not pinned")
        return None

    def _vm_loop(self) -> ExitStatus | None:
        """bhyve's vm_loop: run, dispatch the exit, act on the verdict."""
        fd = self.kvm_vcpu.fd
        handlers = self._handlers
        counts = self.exit_counts
        ioctl = fcntl.ioctl
        kvm_run = abi.KVM_RUN
        vm = self.vm
        # Indexing a 32-bit view reads the exit reason in one step (a third of
        # a struct unpack's time, on every exit).
        words = self._words
        while True:
            try:
                # No third argument: given one, fcntl.ioctl first tries it
                # as a writable and then a read-only buffer, raising and
                # clearing an exception each time (0.6 us on every exit).
                ioctl(fd, kvm_run)
            except InterruptedError:
                if vm.stopping:
                    return None
                self._serve_requests()
                if vm.stopping:     # a kick while serving may have found immediate_exit 0
                    return None
                continue
            except BlockingIOError:     # an AP left wait-for-SIPI: enter again
                continue
            reason = words[_EXIT_REASON_WORD]
            try:
                handler = handlers[reason]
            except IndexError:          # beyond any reason the table holds
                return self._exit_unknown(reason)
            counts[reason] += 1
            verdict = handler()
            if verdict is not None:
                return verdict

    def _serve_requests(self) -> None:
        self._run_state.immediate_exit = 0
        self._serve_queue()
        if not self._resume.is_set():
            self._paused.set()
            while not self._resume.wait(0.05) and not self.vm.stopping:
                self._serve_queue()
            self._paused.clear()

    def _serve_queue(self) -> None:
        while True:
            with self._lock:
                if not self._requests:
                    return
                request = self._requests.popleft()
            request()

    # --- exit handlers ----------------------------------------------------------
    def _exit_continue(self) -> None:
        return None

    def _exit_io(self) -> ExitStatus | None:
        """A port access.  The exit is read as words of the run page, not with a
        struct: with the guest run between exits (as bench/exits_cold.py runs
        it), unpacking took about 400 ns more an exit than indexing the views."""
        words = self._words
        shape = words[_IO_WORD]         # direction | size << 8 | port << 16
        port = shape >> 16
        entry = self._port_lookup(port)
        if entry is None:
            return self._io_unclaimed()
        if words[_IO_COUNT_WORD] == 1:
            # Most port exits are one byte (the UART's registers, the RTC's data
            # port, the keyboard controller, port A): the byte is indexed
            # straight out of the run page, no struct, no loop.
            offset = self._qwords[_IO_DATA_OFFSET_QWORD]
            if offset < self._page_size:
                shape &= 0xFFFF
                try:
                    if shape == _OUT_BYTE:
                        entry.write(port - entry.base, 1, self._page[offset])
                        return None
                    if shape == _IN_BYTE:
                        self._page[offset] = entry.read(port - entry.base, 1) & 0xFF
                        return None
                except Exception:
                    self.vm.device_failed(entry.name, port)
                    return None
        return self._io_wide(entry)

    def _io_unclaimed(self) -> ExitStatus | None:
        direction, size, port, count, offset = _IO_EXIT.unpack_from(self._page, _EXIT_UNION)
        return self.vm.unclaimed_io("port", port, size, direction == _IO_OUT,
                                    self._page, offset, count)

    def _io_wide(self, entry) -> ExitStatus | None:
        """Accesses of two or four bytes, string I/O (rep ins/outs), and exits
        whose data would lie outside the run page (refused, warned once)."""
        page = self._page
        direction, size, port, count, offset = _IO_EXIT.unpack_from(page, _EXIT_UNION)
        uint = _PORT_UINT.get(size)
        end = offset + size * count
        if uint is None or end > self._page_size:
            self.vm.warn_once("io-exit", "malformed I/O exit on port %#x", port)
            return None
        relative = port - entry.base
        try:
            if direction == _IO_OUT:
                if count == 1:          # the common case, kept short
                    entry.write(relative, size, uint.unpack_from(page, offset)[0])
                    return None
                for at in range(offset, end, size):         # rep outs
                    entry.write(relative, size, uint.unpack_from(page, at)[0])
            else:
                mask = _SIZE_MASK[size]
                for at in range(offset, end, size):
                    uint.pack_into(page, at, entry.read(relative, size) & mask)
        except Exception:
            self.vm.device_failed(entry.name, port)
        return None

    def _exit_mmio(self) -> ExitStatus | None:
        """An MMIO access, read from the run page's views as _exit_io reads its."""
        qwords = self._qwords
        addr = qwords[_MMIO_ADDR_QWORD]
        length = self._words[_MMIO_LEN_WORD]
        is_write = self._page[_MMIO_IS_WRITE_BYTE]
        entry = self.vm.mmio.lookup(addr)
        mask = _SIZE_MASK.get(length)
        if entry is None or mask is None:
            return self.vm.unclaimed_io("mmio", addr, length, bool(is_write), self._page,
                                        _MMIO_DATA_BYTE, 1)
        try:
            if is_write:
                entry.write(addr - entry.base, length, qwords[_MMIO_DATA_QWORD] & mask)
            else:   # KVM hands the guest only LENGTH bytes of the eight
                qwords[_MMIO_DATA_QWORD] = entry.read(addr - entry.base, length) & mask
        except Exception:
            self.vm.device_failed(entry.name, addr)
        return None

    def _exit_hlt(self) -> ExitStatus | None:
        """Only seen without the in-kernel LAPIC: HLT with IF clear never wakes."""
        if self.kvm_vcpu.get_regs().rflags & RFLAGS_IF:
            return None
        return ExitStatus.HALT

    def _exit_shutdown(self) -> ExitStatus:
        self.log.warning("triple fault")
        self.vm.exit_detail = f"vcpu{self.id}: triple fault"
        return ExitStatus.TRIPLEFAULT

    def _exit_system_event(self) -> ExitStatus | None:
        kind = _U32.unpack_from(self._page, _EXIT_UNION)[0]
        if kind == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
            return ExitStatus.POWEROFF
        if kind == abi.KVM_SYSTEM_EVENT_RESET:
            return ExitStatus.RESET
        self.dump_state(f"system event {kind}")
        return ExitStatus.ERROR

    def _exit_rdmsr(self) -> None:
        msr = self._run_state.u.msr
        msr.data = 0
        msr.error = self.vm.unknown_msr(self, msr.index, None)
        return None

    def _exit_wrmsr(self) -> None:
        msr = self._run_state.u.msr
        msr.error = self.vm.unknown_msr(self, msr.index, msr.data)
        return None

    def _exit_debug(self) -> ExitStatus | None:
        return self.vm.debug_exit(self)

    def _exit_fatal(self) -> ExitStatus:
        reason = _U32.unpack_from(self._page, abi.RUN_OFFSET_EXIT_REASON)[0]
        detail = abi.EXIT_REASON_NAMES.get(reason, str(reason))
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            internal = self._run_state.u.internal
            data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
            detail += f" (suberror {internal.suberror}{', data ' + data if data else ''})"
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            detail += (" (hardware reason "
                       f"{self._run_state.u.fail_entry.hardware_entry_failure_reason:#x})")
        self.dump_state(detail)
        return ExitStatus.ERROR

    def _exit_unknown(self, reason: int) -> ExitStatus:
        self.unknown_exit_counts[reason] = self.unknown_exit_counts.get(reason, 0) + 1
        name = abi.EXIT_REASON_NAMES.get(reason, "unknown")
        self.dump_state(f"unhandled exit reason {reason} ({name})")
        return ExitStatus.ERROR

    # --- state ------------------------------------------------------------------
    def dump_state(self, why: str) -> None:
        """Say why the vCPU stops the VM, then its registers, on stderr, as bhyve
        does on a fatal exit (VirtualMachine.fatal: once)."""
        try:
            registers = self.format_registers()
        except KvmError as exc:
            registers = f"pyhyve: vcpu{self.id}: registers unavailable: {exc}"
        self.vm.fatal(f"vcpu{self.id}: {why}", registers)

    def format_registers(self) -> str:
        regs = self.kvm_vcpu.get_regs()
        sregs = self.kvm_vcpu.get_sregs()
        names = [name for name, _ in abi.kvm_regs._fields_]
        lines = []
        for i in range(0, len(names), 4):
            lines.append("  ".join(f"{n:>6}={getattr(regs, n):#018x}" for n in names[i:i + 4]))
        for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            s = getattr(sregs, seg)
            lines.append(f"{seg:>6}: sel={s.selector:#06x} base={s.base:#018x} "
                         f"limit={s.limit:#010x} type={s.type} dpl={s.dpl} l={s.l} db={s.db}")
        lines.append(f"   gdt: base={sregs.gdt.base:#x} limit={sregs.gdt.limit:#x}  "
                     f"idt: base={sregs.idt.base:#x} limit={sregs.idt.limit:#x}")
        lines.append(f"   cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} "
                     f"cr4={sregs.cr4:#x} efer={sregs.efer:#x} apic_base={sregs.apic_base:#x}")
        return "\n".join(lines)

    def halt_state(self) -> str:
        """'inactive' (waiting for SIPI), 'halted' (HLT with IF clear), or 'running'."""
        mp_state = self.kvm_vcpu.get_mp_state()
        if mp_state in (abi.KVM_MP_STATE_UNINITIALIZED, abi.KVM_MP_STATE_INIT_RECEIVED):
            return "inactive"
        if mp_state == abi.KVM_MP_STATE_HALTED and \
                not self.kvm_vcpu.get_regs().rflags & RFLAGS_IF:
            return "halted"
        return "running"
