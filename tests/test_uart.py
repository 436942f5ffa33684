"""The 16550A UART as guests drive it, and its host backends."""

import os
import pty
import re
import select
import socket
import termios
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakevm import FakeVm
from fuzzing import fuzz_settings
from pyhyve.config import ConfigError
from pyhyve.devices.chardev import (Backend, FileBackend, PtyBackend, StdioBackend, TcpBackend,
                                    UnixBackend, open_backend)
from pyhyve.devices.uart import COM_PORTS, FIFO_SIZE, PENDING_LIMIT, Uart16550
from pyhyve.iobus import BusConflict

BASE, IRQ = COM_PORTS["com1"]
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


class MemoryBackend(Backend):
    """Keeps guest output; tests feed input through the attached callback."""

    def __init__(self):
        super().__init__("memory")
        self.output = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.output += data

    def close(self) -> None:
        self.closed = True

    def type(self, data: bytes) -> None:
        self._callback(data)


class Rig:
    """A FakeVm with COM1 on a MemoryBackend, and inb/outb on its registers."""

    def __init__(self):
        self.vm = FakeVm()
        self.irq_calls: list[bool] = []
        record = self.vm.set_irq_level

        def set_irq_level(irq, level, source):
            assert irq == IRQ
            self.irq_calls.append(level)
            record(irq, level, source)

        self.vm.set_irq_level = set_irq_level
        self.backend = MemoryBackend()
        self.uart = Uart16550(self.vm.context, "com1", BASE, IRQ, self.backend)

    def inb(self, reg: int) -> int:
        return self.vm.port_read(BASE + reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.vm.port_write(BASE + reg, 1, value)

    @property
    def irq(self) -> bool:
        return self.vm.irq_levels.get(IRQ, False)


@pytest.fixture
def rig():
    return Rig()


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


# --- registers ----------------------------------------------------------------------

def test_reset_state(rig):
    assert [rig.inb(reg) for reg in range(8)] == [0, 0, 0x01, 0, 0, 0x60, 0xB0, 0]
    assert rig.irq_calls == []
    assert rig.backend._callback == rig.uart.receive
    assert rig.vm.ports.lookup(BASE + 7).name == "com1"


def test_com_ports_are_the_pc_ones():
    assert COM_PORTS == {"com1": (0x3F8, 4), "com2": (0x2F8, 3),
                         "com3": (0x3E8, 4), "com4": (0x2E8, 3)}


def test_divisor_latch_behind_dlab(rig):
    assert rig.inb(LCR) == 0
    rig.outb(LCR, 0x83)
    assert (rig.inb(DLL), rig.inb(DLM)) == (1, 0)          # 115200 baud, as bhyve
    rig.outb(DLL, 0x0C)
    rig.outb(DLM, 0x02)
    assert (rig.inb(DLL), rig.inb(DLM)) == (0x0C, 0x02)
    assert rig.backend.output == b""                       # DLL writes are not data
    rig.outb(LCR, 0x03)
    assert (rig.inb(IER), rig.inb(LCR)) == (0, 0x03)
    rig.outb(THR, ord("x"))
    assert rig.backend.output == b"x"
    rig.outb(LCR, 0x83)
    assert (rig.inb(DLL), rig.inb(DLM)) == (0x0C, 0x02)


def test_scratch_register(rig):
    for value in (0x00, 0x55, 0xAA, 0xFF):
        rig.outb(SCR, value)
        assert rig.inb(SCR) == value


def test_any_access_size_is_a_byte_access(rig):
    rig.vm.port_write(BASE + SCR, 4, 0x12345678)
    assert rig.vm.port_read(BASE + SCR, 4) == 0x78
    rig.vm.port_write(BASE + THR, 2, 0x4241)
    assert rig.backend.output == b"A"
    assert rig.vm.port_read(BASE + LSR, 2) == 0x60


def test_thr_goes_to_backend(rig):
    for byte in b"hello\r\n":
        assert rig.inb(LSR) & 0x20
        rig.outb(THR, byte)
    assert rig.backend.output == b"hello\r\n"
    assert rig.inb(LSR) == 0x60


def test_loopback_turns_output_into_input(rig):
    rig.outb(FCR, 0x07)
    rig.outb(MCR, 0x10)
    for byte in b"ping":
        rig.outb(THR, byte)
    assert rig.backend.output == b""
    assert rig.inb(LSR) == 0x61
    assert bytes(rig.inb(RBR) for _ in range(4)) == b"ping"
    assert rig.inb(LSR) == 0x60


def test_loopback_keeps_the_line_out(rig):
    rig.outb(MCR, 0x10)
    rig.backend.type(b"k")
    assert rig.inb(LSR) & 0x01 == 0                        # the line is disconnected
    rig.outb(MCR, 0x00)
    assert rig.inb(LSR) & 0x01 and rig.inb(RBR) == ord("k")


def test_loopback_msr_reflects_mcr(rig):
    assert rig.inb(MSR) == 0xB0                            # DCD, DSR, CTS: always ready
    rig.outb(MCR, 0x10)
    assert rig.inb(MSR) == 0x0B                            # all three dropped: deltas
    assert rig.inb(MSR) == 0x00                            # read clears deltas
    rig.outb(MCR, 0x10 | 0x01)                             # DTR -> DSR
    assert rig.inb(MSR) == 0x20 | 0x02
    rig.outb(MCR, 0x10 | 0x02)                             # RTS -> CTS, DTR dropped
    assert rig.inb(MSR) == 0x10 | 0x01 | 0x02
    rig.outb(MCR, 0x10 | 0x04)                             # OUT1 -> RI
    assert rig.inb(MSR) & 0xF0 == 0x40
    rig.outb(MCR, 0x10 | 0x08)                             # OUT2 -> DCD; RI falls: TERI
    assert rig.inb(MSR) == 0x80 | 0x08 | 0x04
    rig.outb(MCR, 0x00)
    assert rig.inb(MSR) == 0xB0 | 0x01 | 0x02


def test_modem_status_interrupt(rig):
    rig.outb(IER, 0x08)
    rig.outb(MCR, 0x08)
    assert rig.inb(IIR) == 0x01
    rig.outb(MCR, 0x08 | 0x10)                             # loopback: deltas, but no IRQ
    assert rig.inb(IIR) == 0x00
    assert not rig.irq
    rig.outb(MCR, 0x08)                                    # back: deltas and OUT2
    assert rig.irq
    rig.inb(MSR)
    assert rig.inb(IIR) == 0x01 and not rig.irq


def test_mcr_keeps_five_bits(rig):
    rig.outb(MCR, 0xFF)
    assert rig.inb(MCR) == 0x1F


def test_ier_keeps_four_bits(rig):
    rig.outb(IER, 0xFF)
    assert rig.inb(IER) == 0x0F


# --- receive ------------------------------------------------------------------------

def test_rx_fifo_interrupt_gated_by_out2(rig):
    rig.outb(FCR, 0x07)                                    # FIFOs on, trigger level 1
    rig.outb(IER, 0x01)
    rig.backend.type(b"abc")
    assert rig.inb(LSR) == 0x61
    assert rig.inb(IIR) == 0xC4
    assert not rig.irq                                     # OUT2 clear: the line is gated
    rig.outb(MCR, 0x0B)
    assert rig.irq
    assert bytes(rig.inb(RBR) for _ in range(3)) == b"abc"
    assert rig.inb(LSR) == 0x60 and rig.inb(IIR) == 0xC1
    assert not rig.irq
    assert rig.irq_calls == [True, False]


def test_rx_below_trigger_level_reports_timeout(rig):
    rig.outb(FCR, 0x81)                                    # trigger level 8
    rig.outb(IER, 0x01)
    rig.backend.type(b"123")
    assert rig.inb(IIR) == 0xCC
    rig.backend.type(b"45678")
    assert rig.inb(IIR) == 0xC4


def test_fifos_off_hold_one_byte_at_a_time(rig):
    rig.outb(IER, 0x01)
    rig.backend.type(b"xyz")
    assert rig.inb(IIR) == 0x04                            # no FIFO bits, no timeout code
    assert bytes(rig.inb(RBR) for _ in range(3)) == b"xyz"
    assert rig.inb(LSR) == 0x60 and rig.inb(IIR) == 0x01


def test_input_beyond_fifo_waits_and_overflow_is_dropped(rig):
    rig.outb(FCR, 0x01)
    data = bytes(range(256)) * 20
    rig.backend.type(data)
    kept = FIFO_SIZE + PENDING_LIMIT
    assert rig.uart.rx_dropped == len(data) - kept
    assert rig.inb(LSR) == 0x63                            # data, and overrun: input lost
    received = bytearray()
    while rig.inb(LSR) & 0x01:
        received.append(rig.inb(RBR))
    assert received == data[:kept]
    assert rig.vm.warnings


def test_fifo_reset_and_mode_switch(rig):
    rig.outb(FCR, 0x01)
    rig.backend.type(b"0123456789")
    rig.outb(FCR, 0x03)                                    # RX FIFO reset
    assert rig.inb(LSR) == 0x60
    rig.backend.type(b"ab")
    rig.outb(FCR, 0x00)                                    # leaving FIFO mode empties it
    assert rig.inb(LSR) == 0x60 and rig.inb(IIR) == 0x01
    rig.backend.type(b"c")
    rig.outb(FCR, 0xC1)                                    # entering it does too
    assert rig.inb(LSR) == 0x60


def test_overrun_in_loopback(rig):
    rig.outb(IER, 0x05)
    rig.outb(MCR, 0x10)
    rig.outb(THR, ord("1"))
    rig.outb(THR, ord("2"))                                # one-byte holding register full
    assert rig.inb(IIR) == 0x06                            # line status beats data
    assert rig.inb(LSR) == 0x63
    assert rig.inb(LSR) == 0x61                            # OE clears when read
    assert rig.inb(IIR) == 0x04
    assert rig.inb(RBR) == ord("1")


# --- transmit interrupt ---------------------------------------------------------------

def test_thre_interrupt(rig):
    rig.outb(MCR, 0x08)
    assert rig.inb(IIR) == 0x01
    rig.outb(IER, 0x02)                                    # enabling with THR empty raises it
    assert rig.irq
    assert rig.inb(IIR) == 0x02
    assert rig.inb(IIR) == 0x01                            # reading IIR acknowledged it
    assert not rig.irq
    rig.outb(IER, 0x02)                                    # still enabled: no new edge
    assert rig.inb(IIR) == 0x01
    rig.outb(THR, ord("a"))                                # THR empties again at once
    assert rig.irq and rig.inb(IIR) == 0x02
    rig.outb(THR, ord("b"))
    rig.outb(IER, 0x00)
    assert not rig.irq
    rig.outb(IER, 0x02)
    assert rig.irq
    assert rig.irq_calls == [True, False, True, False, True, False, True]


def linux_8250_probe(rig) -> dict:
    """The register dance of Linux's 8250 autoconfig() and serial8250_do_startup(),
    with what each step concludes."""
    inb, outb = rig.inb, rig.outb
    found = {}
    saved = inb(IER)                                       # is anything there?
    outb(IER, 0)
    scratch2 = inb(IER) & 0x0F
    outb(IER, 0x0F)
    scratch3 = inb(IER) & 0x0F
    outb(IER, saved)
    found["present"] = (scratch2, scratch3) == (0, 0x0F)
    save_mcr, save_lcr = inb(MCR), inb(LCR)
    outb(MCR, 0x10 | 0x0A)                                 # loopback, RTS, OUT2
    found["loopback"] = inb(MSR) & 0xF0 == 0x90            # CTS and DCD come back
    outb(MCR, save_mcr)
    outb(LCR, 0xBF)
    outb(IIR, 0)                                           # EFR on enhanced UARTs
    outb(LCR, 0)
    outb(FCR, 0x01)
    found["16550a"] = inb(IIR) >> 6 == 3
    outb(LCR, 0x80)                                        # autoconfig_16550a
    found["efr"] = inb(IIR) == 0
    outb(LCR, 0xBF)
    found["efr"] |= inb(IIR) == 0
    outb(LCR, 0)
    status1 = inb(MCR)
    outb(LCR, 0xE0)
    status2 = inb(IIR)                                     # EXCR1 on NS SuperIO
    outb(LCR, 0)
    outb(MCR, status1 ^ 0x10)
    outb(LCR, 0xE0)
    toggled = inb(IIR)
    outb(LCR, 0)
    outb(MCR, status1)
    found["ns_superio"] = not (status2 ^ status1) & 0x10 and bool((toggled ^ status1) & 0x10)
    outb(FCR, 0x21)                                        # 64-byte FIFO of a 16750
    fifo64 = inb(IIR) & 0xE0
    outb(FCR, 0x01)
    outb(LCR, 0x80)
    outb(FCR, 0x21)
    fifo64_dlab = inb(IIR) & 0xE0
    outb(FCR, 0x01)
    outb(LCR, 0)
    found["16750"] = (fifo64, fifo64_dlab) == (0xC0, 0xE0)
    ier = inb(IER)                                         # XScale's UUE bit
    outb(IER, ier | 0x40)
    found["xscale"] = bool(inb(IER) & 0x40)
    outb(IER, ier)
    outb(LCR, save_lcr)
    outb(MCR, save_mcr)
    outb(FCR, 0x01)                                        # serial8250_clear_fifos
    outb(FCR, 0x07)
    outb(FCR, 0)
    inb(RBR)
    outb(IER, 0)
    # serial8250_do_startup
    outb(FCR, 0x01)
    outb(FCR, 0x07)
    outb(FCR, 0)
    for reg in (LSR, RBR, IIR, MSR):
        inb(reg)
    found["lsr_sane"] = inb(LSR) != 0xFF
    outb(IER, 0x02)                                        # does THRE re-assert?
    iir1 = inb(IIR)
    outb(IER, 0)
    outb(IER, 0x02)
    iir = inb(IIR)
    outb(IER, 0)
    found["bug_thre"] = not iir1 & 0x01 and bool(iir & 0x01)
    outb(LCR, 0x03)
    outb(MCR, 0x0B)                                        # DTR, RTS, OUT2: IRQ on
    outb(IER, 0x02)                                        # TX interrupt quick test
    lsr = inb(LSR)
    iir = inb(IIR)
    outb(IER, 0)
    found["bug_txen"] = bool(lsr & 0x40 and iir & 0x01)
    return found


def test_linux_8250_probe_finds_a_plain_16550a(rig):
    assert linux_8250_probe(rig) == {
        "present": True, "loopback": True, "16550a": True, "efr": False,
        "ns_superio": False, "16750": False, "xscale": False, "lsr_sane": True,
        "bug_thre": False, "bug_txen": False}
    assert rig.irq_calls == [True, False]                  # only the quick test, with OUT2
    assert rig.backend.output == b""


def test_irq_level_only_set_on_change(rig):
    rig.outb(MCR, 0x08)
    rig.outb(IER, 0x03)
    for _ in range(3):
        rig.backend.type(b"x")
        rig.outb(THR, ord("y"))
        rig.inb(IIR)
        rig.inb(RBR)
        rig.inb(IIR)
    assert rig.irq_calls
    assert all(a != b for a, b in zip(rig.irq_calls, rig.irq_calls[1:]))
    assert rig.irq_calls[0] is True


def test_close_releases_backend_and_ignores_input(rig):
    rig.uart.close()
    assert rig.backend.closed
    rig.uart.receive(b"late")
    assert rig.inb(LSR) == 0x60
    rig.uart.close()


def test_port_clash_closes_the_backend(rig):
    backend = MemoryBackend()
    with pytest.raises(BusConflict):
        Uart16550(rig.vm.context, "com1-again", BASE, IRQ, backend)
    assert backend.closed


def test_uart_without_backend_drops_output():
    vm = FakeVm()
    Uart16550(vm.context, "com2", *COM_PORTS["com2"], None)
    vm.port_write(0x2F8, 1, ord("a"))
    assert vm.port_read(0x2F8 + LSR, 1) == 0x60


IIR_REASONS = {0x01, 0x00, 0x02, 0x04, 0x06, 0x0C}

interesting = st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x08, 0x0B, 0x0F,
                               0x10, 0x18, 0x1B, 0x41, 0x80, 0x81, 0x83, 0xC1, 0xC7, 0xFF])
access = st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]),
                   st.one_of(interesting, st.integers(0, 0xFFFFFFFF)))
operation = st.one_of(
    st.tuples(st.just("write"), access),
    st.tuples(st.just("write"), access),
    st.tuples(st.just("read"), access),
    st.tuples(st.just("receive"), st.one_of(st.binary(max_size=40),
                                            st.just(b"z" * (PENDING_LIMIT + 100)))),
    st.tuples(st.just("check"), st.none()),
)


@fuzz_settings(300)
@given(st.lists(operation, min_size=10, max_size=80))
def test_random_accesses_keep_registers_consistent(operations):
    rig = Rig()
    for kind, arg in operations + [("check", None)]:
        if kind == "write":
            offset, size, value = arg
            rig.vm.port_write(BASE + offset, size, value)
        elif kind == "read":
            offset, size, _ = arg
            assert 0 <= rig.vm.port_read(BASE + offset, size) <= 0xFF
        elif kind == "receive":
            rig.uart.receive(arg)
        else:
            level = rig.irq
            lcr = rig.inb(LCR)
            rig.outb(LCR, lcr & 0x7F)                      # IER, not DLM
            mcr, ier = rig.inb(MCR), rig.inb(IER)
            rig.outb(LCR, lcr)
            iir = rig.inb(IIR)
            lsr = rig.inb(LSR)
            reason = iir & 0x0F
            assert iir & 0x30 == 0 and iir & 0xC0 in (0x00, 0xC0)
            assert reason in IIR_REASONS
            assert level == (reason != 0x01 and mcr & 0x18 == 0x08)
            assert lsr & 0x60 == 0x60 and lsr & 0x9C == 0
            assert mcr <= 0x1F and ier <= 0x0F
            if reason in (0x04, 0x0C):
                assert lsr & 0x01 and ier & 0x01
            if reason == 0x0C:
                assert iir & 0xC0
            if reason == 0x06:
                assert lsr & 0x02 and ier & 0x04
            if reason == 0x02:
                assert ier & 0x02
    assert all(a != b for a, b in zip(rig.irq_calls, rig.irq_calls[1:]))


# --- backends -----------------------------------------------------------------------

class Inbox:
    """An attach() callback that tests can wait on."""

    def __init__(self):
        self.data = bytearray()
        self.threads: set[str] = set()

    def __call__(self, data: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        self.data += data

    def wait_for(self, expected: bytes) -> None:
        wait_for(lambda: bytes(self.data) == expected)


def test_file_backend_appends(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"old\n")
    backend = open_backend(f"file={path}", "com1")
    assert isinstance(backend, FileBackend)
    backend.attach(Inbox())
    backend.write(b"new\n")
    backend.close()
    backend.write(b"after close")
    assert path.read_bytes() == b"old\nnew\n"
    assert backend.dropped == len(b"after close")


def test_file_backend_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^com1: cannot open file=.*/nodir/x\.log: "
                                          r"No such file or directory$"):
        open_backend(f"file={tmp_path}/nodir/x.log", "com1")
    with pytest.raises(ConfigError, match="Is a directory"):
        open_backend(f"file={tmp_path}", "com1")


@pytest.mark.parametrize("spec", ["", "tty", "/dev/nmdm0A", "file=", "serial=/dev/ttyS0",
                                  "ptyx"])
def test_unknown_spec(spec):
    with pytest.raises(ConfigError, match=r"^com1: unknown backend '.*': expected stdio, "
                                          r"pty\[,link=PATH\], file=PATH, unix=PATH or "
                                          "tcp=HOST:PORT$"):
        open_backend(spec, "com1")


@pytest.mark.parametrize("address", ["5555", "127.0.0.1", "127.0.0.1:", ":5555",
                                     "127.0.0.1:port"])
def test_bad_tcp_address(address):
    with pytest.raises(ConfigError, match=f"^com1: tcp={address}: expected tcp=HOST:PORT$"):
        open_backend(f"tcp={address}", "com1")


def test_tcp_port_out_of_range():
    with pytest.raises(ConfigError, match=r"^com1: tcp=127.0.0.1:70000: port 70000 is out of "
                                          r"range \(0-65535\)$"):
        open_backend("tcp=127.0.0.1:70000", "com1")


def test_tcp_port_busy():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"^com1: cannot listen on tcp 127.0.0.1:{port}: "
                                              "Address already in use$"):
            open_backend(f"tcp=127.0.0.1:{port}", "com1")


def test_tcp_unknown_host():
    with pytest.raises(ConfigError, match="^com1: cannot listen on tcp no-such-host.invalid:1"):
        open_backend("tcp=no-such-host.invalid:1", "com1")


def test_tcp_backend_round_trip_and_thread():
    backend = open_backend("tcp=127.0.0.1:0", "com1")
    assert isinstance(backend, TcpBackend)
    inbox = Inbox()
    backend.attach(inbox)
    host, port = backend.address
    assert host == "127.0.0.1" and port
    backend.write(b"nobody listens")
    assert backend.dropped == len(b"nobody listens")
    with socket.create_connection((host, port), timeout=5) as client:
        client.sendall(b"hello guest")
        inbox.wait_for(b"hello guest")
        assert inbox.threads == {"com1-io"}
        backend.write(b"hello host")
        assert recv_exactly(client, 10) == b"hello host"
        assert backend.connected
    wait_for(lambda: not backend.connected)                # EOF drops the client
    thread = backend._thread
    backend.close()
    assert not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1)
    backend.write(b"late")                                 # dropped, never raises


def test_tcp_backend_full_client_never_blocks():
    backend = open_backend("tcp=127.0.0.1:0", "com1")
    inbox = Inbox()
    backend.attach(inbox)
    with socket.create_connection(backend.address, timeout=5) as client:
        client.sendall(b"!")
        inbox.wait_for(b"!")
        chunk = b"x" * 65536
        start = time.monotonic()
        for _ in range(256):                               # 16 MiB, never read
            backend.write(chunk)
        assert time.monotonic() - start < 5
        assert backend.dropped > 0
    backend.close()


def test_new_client_replaces_the_old_one(tmp_path):
    path = str(tmp_path / "com1.sock")
    backend = open_backend(f"unix={path}", "com1")
    assert isinstance(backend, UnixBackend) and backend.address == path
    inbox = Inbox()
    backend.attach(inbox)
    first = socket.socket(socket.AF_UNIX)
    first.connect(path)
    first.sendall(b"1")
    inbox.wait_for(b"1")
    second = socket.socket(socket.AF_UNIX)
    second.connect(path)
    second.sendall(b"2")
    inbox.wait_for(b"12")
    first.settimeout(5)
    assert first.recv(10) == b""                           # the old client was closed
    backend.write(b"to second")
    assert recv_exactly(second, 9) == b"to second"
    first.close()
    second.close()
    backend.close()
    assert not os.path.exists(path)


def test_unix_backend_feeds_the_uart(tmp_path):
    path = str(tmp_path / "console")
    vm = FakeVm()
    uart = Uart16550(vm.context, "com1", BASE, IRQ, open_backend(f"unix={path}", "com1"))
    vm.port_write(BASE + FCR, 1, 0x01)
    vm.port_write(BASE + IER, 1, 0x01)
    vm.port_write(BASE + MCR, 1, 0x08)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        client.sendall(b"root\r")
        wait_for(lambda: vm.irq_levels.get(IRQ))
        received = bytearray()
        while len(received) < 5:
            if vm.port_read(BASE + LSR, 1) & 0x01:
                received.append(vm.port_read(BASE + RBR, 1))
        assert received == b"root\r"
        for byte in b"login: ":
            vm.port_write(BASE + THR, 1, byte)
        assert recv_exactly(client, 7) == b"login: "
    uart.close()
    assert not os.path.exists(path)


def test_unix_path_in_use(tmp_path):
    path = str(tmp_path / "sock")
    backend = open_backend(f"unix={path}", "com1")
    with pytest.raises(ConfigError, match=f"^com1: cannot listen on unix {path}: "
                                          "Address already in use$"):
        open_backend(f"unix={path}", "com1")
    backend.close()
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        open_backend(f"unix={plain}", "com1")
    assert plain.read_text() == "not a socket"


def test_stale_unix_socket_is_reused(tmp_path):
    path = str(tmp_path / "sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)                                        # bound, never listening: stale
    dead.close()
    backend = open_backend(f"unix={path}", "com1")
    backend.attach(Inbox())
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
    backend.close()


def test_unix_close_leaves_a_replaced_path_alone(tmp_path):
    path = tmp_path / "sock"
    backend = open_backend(f"unix={path}", "com1")
    path.unlink()
    path.write_text("someone else's")
    backend.close()
    assert path.read_text() == "someone else's"


def test_unix_path_too_long(tmp_path):
    with pytest.raises(ConfigError, match="^com1: cannot listen on unix "):
        open_backend(f"unix={tmp_path}/{'x' * 200}", "com1")


def test_stdio_backend_on_pipes():
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    backend = StdioBackend("com1", in_read, out_write)
    inbox = Inbox()
    backend.attach(inbox)
    os.write(in_write, b"typed")
    inbox.wait_for(b"typed")
    backend.write(b"printed")
    assert os.read(out_read, 100) == b"printed"
    os.close(in_write)                                     # EOF: output still works
    time.sleep(0.05)
    backend.write(b"more")
    assert os.read(out_read, 100) == b"more"
    thread = backend._thread
    backend.close()
    assert not thread.is_alive()
    for fd in (in_read, out_read, out_write):
        os.close(fd)


def test_stdio_backend_raw_mode_restored():
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    backend = StdioBackend("com1", slave, slave)
    raw = termios.tcgetattr(slave)
    assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
    inbox = Inbox()
    backend.attach(inbox)
    os.write(master, b"\x03")                              # Ctrl-C reaches the guest
    inbox.wait_for(b"\x03")
    backend.close()
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)


def test_stdio_spec():
    backend = open_backend("stdio", "com1")
    assert isinstance(backend, StdioBackend)
    backend.close()


def test_file_backend_stops_at_its_limit_and_says_so_once(tmp_path, caplog):
    path = tmp_path / "console.log"
    path.write_bytes(b"0123")               # what was there counts towards the limit
    backend = open_backend(f"file={path}", "com1", file_limit=10)
    for chunk in (b"abc", b"defgh", b"ijk"):
        backend.write(chunk)
    backend.close()
    assert path.read_bytes() == b"0123abcdef"
    assert backend.dropped == len(b"ghijk")
    assert [record.getMessage() for record in caplog.records] == [
        f"com1: {path} reached its limit of 10 bytes; further output is dropped "
        "(-o console.file_limit)"]


# --- the escape on a stdio terminal ---------------------------------------------------

def read_for(fd: int, seconds: float = 0.3) -> bytes:
    """What arrives on FD within SECONDS."""
    data, deadline = b"", time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            data += os.read(fd, 4096)
    return data


def test_stdio_escape_commands():
    """`~?` is answered on the terminal, `~~` sends one ~, `~.` calls on_quit
    once and nothing typed after it reaches the guest."""
    master, slave = pty.openpty()
    backend = StdioBackend("com1", slave, slave)
    quits = []
    backend.set_escape(b"~", lambda: quits.append(1))
    inbox = Inbox()
    backend.attach(inbox)
    os.write(master, b"ab~c\r~?")
    inbox.wait_for(b"ab~c\r")                             # mid-line ~ is a plain key
    shown = read_for(master)
    assert shown.startswith(b"\r\nSupported escape sequences:\r\n") and b" ~.  power off" in shown
    os.write(master, b"~~d\r~x\r~")                      # the last ~ waits for its key
    inbox.wait_for(b"ab~c\r~d\r~x\r")
    os.write(master, b".late")
    wait_for(lambda: quits == [1])
    os.write(master, b"\r~.more")
    time.sleep(0.1)
    assert quits == [1] and inbox.data == b"ab~c\r~d\r~x\r"
    backend.close()
    os.close(master)
    os.close(slave)


def test_stdio_without_escape_passes_everything():
    """Until set_escape() arms one (and with None), `~.` is two keys for the guest."""
    master, slave = pty.openpty()
    backend = StdioBackend("com1", slave, slave)
    inbox = Inbox()
    backend.attach(inbox)
    os.write(master, b"~.")
    inbox.wait_for(b"~.")
    backend.set_escape(None, lambda: pytest.fail("no escape is armed"))
    os.write(master, b"\r~?~.")
    inbox.wait_for(b"~.\r~?~.")
    assert read_for(master, 0.1) == b""
    backend.close()
    os.close(master)
    os.close(slave)


# --- pty -----------------------------------------------------------------------------

def test_pty_backend_both_ways_and_reattach():
    """A client may come and go: the console outlives each detach."""
    backend = open_backend("pty", "com1")
    assert isinstance(backend, PtyBackend) and backend.describe() == {"kind": "pty",
                                                                      "path": backend.path}
    assert backend.path.startswith("/dev/pts/")
    inbox = Inbox()
    backend.attach(inbox)
    expected = b""
    for attempt in range(3):
        client = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
        mode = termios.tcgetattr(client)
        assert not mode[3] & (termios.ICANON | termios.ECHO | termios.ISIG)   # raw
        assert not mode[1] & termios.OPOST
        os.write(client, b"typed %d\r" % attempt)
        expected += b"typed %d\r" % attempt
        inbox.wait_for(expected)
        backend.write(b"printed\n")
        assert read_for(client) == b"printed\n"           # no CR added: raw
        os.close(client)                                   # detach
    assert inbox.threads == {"com1-io"} and backend.dropped == 0
    thread = backend._thread
    backend.close()
    assert not thread.is_alive()
    assert not os.path.exists(backend.path)
    backend.write(b"late")                                 # dropped, never raises


def test_pty_backend_with_nobody_attached_never_blocks(caplog):
    """The pty's buffer takes what it can; the rest is dropped at once, counted,
    and said once; a reader who comes later gets the buffer, then new output."""
    backend = open_backend("pty", "com1")
    backend.attach(Inbox())
    chunk = b"x" * 65536
    start = time.monotonic()
    for _ in range(256):                                   # 16 MiB, never read
        backend.write(chunk)
    assert time.monotonic() - start < 5
    assert 0 < backend.dropped < 256 * len(chunk)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"com1: the pty {backend.path} is not taking output; "
                        "dropping what does not fit"]
    client = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
    kept = read_for(client, 0.5)
    assert kept == b"x" * len(kept) and len(kept) == 256 * len(chunk) - backend.dropped
    backend.write(b"fresh")
    assert read_for(client) == b"fresh"
    os.close(client)
    backend.close()


def test_pty_link_is_made_refused_and_removed(tmp_path):
    link = tmp_path / "com1"
    backend = open_backend(f"pty,link={link}", "com1")
    assert os.readlink(link) == backend.path
    assert backend.describe() == {"kind": "pty", "path": backend.path, "link": str(link)}
    with pytest.raises(ConfigError, match=f"^com2: pty link {link} already exists; "
                                          "remove it or choose another path$"):
        open_backend(f"pty,link={link}", "com2")
    client = os.open(link, os.O_RDWR | os.O_NOCTTY)       # the link reaches the console
    backend.write(b"via the link")
    assert read_for(client) == b"via the link"
    os.close(client)
    backend.close()
    assert not os.path.lexists(link)
    for thing in ("file", "dangling"):                     # whatever is there stays
        path = tmp_path / thing
        if thing == "file":
            path.write_text("mine")
        else:
            path.symlink_to(tmp_path / "nowhere")
        before = os.lstat(path)
        with pytest.raises(ConfigError, match="already exists"):
            open_backend(f"pty,link={path}", "com1")
        assert os.lstat(path) == before
    with pytest.raises(ConfigError, match=r"^com1: cannot make pty link .*/no/dir: "
                                          "No such file or directory$"):
        open_backend(f"pty,link={tmp_path}/no/dir", "com1")


def test_pty_close_leaves_a_replaced_link_alone(tmp_path):
    link = tmp_path / "com1"
    backend = open_backend(f"pty,link={link}", "com1")
    link.unlink()
    link.symlink_to("/dev/null")                           # someone else's now
    backend.close()
    assert os.readlink(link) == "/dev/null"


@pytest.mark.parametrize("spec", ["pty,", "pty,link=", "pty,link", "pty,mode=raw",
                                  "pty,link=/a,link=/b"])
def test_pty_spec_errors(spec):
    with pytest.raises(ConfigError, match=f"^com1: {re.escape(spec)}: expected pty or "
                                          "pty,link=PATH$"):
        open_backend(spec, "com1")


def test_describe_says_where_each_backend_is(tmp_path):
    backends = [open_backend("stdio", "com1"), open_backend(f"file={tmp_path}/log", "com2"),
                open_backend(f"unix={tmp_path}/sock", "com3"),
                open_backend("tcp=127.0.0.1:0", "com4")]
    try:
        port = backends[3].address[1]
        assert [b.describe() for b in backends] == [
            {"kind": "stdio"}, {"kind": "file", "path": f"{tmp_path}/log"},
            {"kind": "unix", "path": f"{tmp_path}/sock"},
            {"kind": "tcp", "address": ["127.0.0.1", port]}]
    finally:
        for backend in backends:
            backend.close()
