"""A GDB remote-serial-protocol stub (bhyve's -G): debug the guest with gdb.

Each vCPU is a GDB thread.  While gdb has the guest stopped, every vCPU is
parked at an instruction boundary (VcpuThread.pause); register and memory
accesses run on the vCPU's own thread through VcpuThread.call.  Breakpoints
and single-step use KVM_SET_GUEST_DEBUG: software breakpoints (int3 written
into guest memory), hardware breakpoints and watchpoints (DR0-DR3/DR7).

Views: in real mode the PC gdb sees is the linear address CS.base + IP, so
breakpoints and `x/i $pc` work on real-mode code; memory addresses are
virtual (translated through the guest's page tables with KVM_TRANSLATE)
unless `monitor phys on` (or QEMU's Qqemu.PhyMemMode:1) selects physical.
"""

import logging
import select
import socket
import threading

from .config import ConfigError
from .kvm import KvmError, abi
from .memory import GuestMemoryError

log = logging.getLogger(__name__)

SIGINT, SIGTRAP = 2, 5
MAX_PACKET = 0x4000
MAX_MEMORY_ACCESS = 0x1000
PAGE = 4096
# gdb's amd64 'g' layout: 17 eight-byte registers, then eflags and six segments (4 bytes)
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
EFLAGS_INDEX = len(GPRS)
DR7_GLOBAL_ENABLE = 2
DR7_TYPES = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}    # Z1 exec, Z2 write, Z3/Z4 access
DR7_LENGTHS = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
INT3 = 0xCC


def _checksum(payload: bytes) -> bytes:
    return b"%02x" % (sum(payload) & 0xFF)


class GdbStub:
    """Listens on a TCP port and serves one gdb at a time."""

    def __init__(self, vm, address: str, port: int, wait: bool):
        self.vm = vm
        self.wait = wait
        try:
            self.listener = socket.create_server((address, port), reuse_port=False)
        except OSError as exc:
            raise ConfigError(f"gdb: cannot listen on {address}:{port}: {exc.strerror}") from None
        self.port = self.listener.getsockname()[1]
        self.connection: socket.socket | None = None
        self.no_ack = False
        self.physical = False
        self.current = 0                    # vCPU index for g/m/s
        self.sw_breakpoints: dict[int, tuple[int, int]] = {}   # linear -> (gpa, saved byte)
        self.hw_breakpoints: dict[tuple[int, int, int], int] = {}  # (kind, addr, len) -> slot
        self.stop_event = threading.Event()
        self.stop_vcpu = 0
        self.stop_signal = SIGTRAP
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="gdb", daemon=True)

    def start(self) -> None:
        """Before the vCPUs start: with wait (-G w), they begin parked."""
        if self.wait:
            for vcpu in self.vm.vcpus:
                vcpu.request_pause()
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        self.stop_event.set()
        for sock in (self.connection, self.listener):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2.0)

    # --- called on a vCPU thread from the vm_loop -----------------------------------------
    def debug_exit(self, vcpu) -> None:
        """A breakpoint or single-step: stop the whole guest and tell gdb."""
        self.stop_vcpu = vcpu.id
        self.stop_signal = SIGTRAP
        for other in self.vm.vcpus:
            other.request_pause()
        self.stop_event.set()

    # --- the connection ----------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._closing:
            try:
                connection, peer = self.listener.accept()
            except OSError:
                return
            log.info("gdb connected from %s:%d", *peer[:2])
            self.connection = connection
            self.no_ack = False
            self._halt(SIGINT if not self.wait else SIGTRAP)
            try:
                self._session()
            except (OSError, ConnectionError):
                pass
            finally:
                self._detach()
                connection.close()
                self.connection = None

    def _session(self) -> None:
        buffer = b""
        while not self._closing:
            packet, buffer = self._read_packet(buffer)
            if packet is None:
                return
            reply = self._handle(packet)
            if reply is not None:
                self._send(reply)
            if packet[:1] == b"D":
                return

    def _read_packet(self, buffer: bytes) -> tuple[bytes | None, bytes]:
        while True:
            start = buffer.find(b"$")
            end = buffer.find(b"#", start)
            if start >= 0 and end >= 0 and len(buffer) >= end + 3:
                payload = buffer[start + 1:end]
                good = buffer[end + 1:end + 3].lower() == _checksum(payload)
                buffer = buffer[end + 3:]
                if not self.no_ack:
                    self.connection.sendall(b"+" if good else b"-")
                if good:
                    return payload, buffer
                continue
            if len(buffer) > 2 * MAX_PACKET:
                buffer = b""
            chunk = self.connection.recv(4096)
            if not chunk:
                return None, b""
            buffer += chunk.replace(b"\x03", b"")     # a stray Ctrl-C while stopped

    def _send(self, payload: bytes) -> None:
        self.connection.sendall(b"$" + payload + b"#" + _checksum(payload))

    # --- stopping and resuming -------------------------------------------------------------------
    def _halt(self, signal_number: int) -> None:
        self.stop_signal = signal_number
        for vcpu in self.vm.vcpus:
            vcpu.pause()

    def _stop_reply(self) -> bytes:
        if self.vm.exit_status is not None:
            return b"W%02x" % int(self.vm.exit_status)
        return b"T%02xthread:%x;" % (self.stop_signal, self.stop_vcpu + 1)

    def _resume(self, step: bool) -> bytes:
        """Run (or step the current vCPU) until a debug exit, Ctrl-C or the VM ends."""
        self.stop_event.clear()
        self._apply_debug(step_vcpu=self.current if step else None)
        if step:
            self.vm.vcpus[self.current].resume()
        else:
            self.vm.resume()
        while not self.stop_event.wait(0.05):
            if self.vm.stopping:
                return self._stop_reply()
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                data = self.connection.recv(1, socket.MSG_PEEK)
                if not data:
                    raise ConnectionError("gdb went away")
                if data == b"\x03":
                    self.connection.recv(1)
                    self.stop_vcpu = self.current
                    self._halt(SIGINT)
                    return self._stop_reply()
        for vcpu in self.vm.vcpus:
            vcpu.pause()
        self.current = self.stop_vcpu
        return self._stop_reply()

    def _apply_debug(self, step_vcpu: int | None) -> None:
        control = 0
        if self.sw_breakpoints:
            control |= abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_SW_BP
        debugregs = [0] * 8
        if self.hw_breakpoints:
            control |= abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP
            dr7 = 0
            for (kind, address, length), slot in self.hw_breakpoints.items():
                debugregs[slot] = address
                dr7 |= DR7_GLOBAL_ENABLE << (2 * slot)
                dr7 |= (DR7_TYPES[kind] | DR7_LENGTHS.get(length, 0) << 2) << (16 + 4 * slot)
            debugregs[7] = dr7
        for vcpu in self.vm.vcpus:
            vcpu_control = control
            if vcpu.id == step_vcpu:
                vcpu_control |= abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP
            vcpu.call(lambda v, c=vcpu_control: v.kvm_vcpu.set_guest_debug(c, debugregs))

    def _detach(self) -> None:
        """Leave the guest as it was: no breakpoints, no debug traps, running."""
        for linear in list(self.sw_breakpoints):
            self._remove_sw_breakpoint(linear)
        self.hw_breakpoints.clear()
        if not self.vm.stopping:
            try:
                self._apply_debug(step_vcpu=None)
            except KvmError:
                pass
            self.vm.resume()

    # --- packets ------------------------------------------------------------------------------------
    def _handle(self, packet: bytes) -> bytes | None:
        kind, body = packet[:1], packet[1:]
        try:
            if kind == b"?":
                return self._stop_reply()
            if kind == b"g":
                return self._read_registers()
            if kind == b"G":
                return self._write_registers(bytes.fromhex(body.decode()))
            if kind == b"p":
                return self._read_register(int(body, 16))
            if kind == b"P":
                number, value = body.split(b"=")
                return self._write_register(int(number, 16), bytes.fromhex(value.decode()))
            if kind == b"m":
                address, length = (int(x, 16) for x in body.split(b","))
                return self._read_memory(address, min(length, MAX_MEMORY_ACCESS)).hex().encode()
            if kind == b"M":
                where, data = body.split(b":")
                address, length = (int(x, 16) for x in where.split(b","))
                self._write_memory(address, bytes.fromhex(data.decode())[:length])
                return b"OK"
            if kind in (b"c", b"s"):
                if body:
                    self._set_pc(int(body, 16))
                return self._resume(step=kind == b"s")
            if kind == b"H":
                thread = int(body[1:], 16) if body[1:] not in (b"", b"-1") else 0
                if thread > len(self.vm.vcpus):
                    return b"E22"
                if thread > 0:
                    self.current = thread - 1
                return b"OK"
            if kind == b"T":
                return b"OK" if 0 < int(body, 16) <= len(self.vm.vcpus) else b"E22"
            if kind in (b"Z", b"z"):
                return self._breakpoint(kind == b"Z", body)
            if kind == b"D":
                return b"OK"
            if kind == b"k":
                from .vcpu import ExitStatus
                self.vm.stop(ExitStatus.POWEROFF)
                return None
            if kind in (b"q", b"Q"):
                return self._query(packet)
        except (ValueError, IndexError):
            return b"E22"
        except (GuestMemoryError, KvmError):
            return b"E14"
        return b""

    def _query(self, packet: bytes) -> bytes:
        if packet.startswith(b"qSupported"):
            return b"PacketSize=%x;QStartNoAckMode+" % MAX_PACKET
        if packet == b"QStartNoAckMode":
            self._send(b"OK")
            self.no_ack = True
            return None
        if packet == b"qAttached":
            return b"1"
        if packet == b"qC":
            return b"QC%x" % (self.current + 1)
        if packet == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (v.id + 1) for v in self.vm.vcpus)
        if packet == b"qsThreadInfo":
            return b"l"
        if packet.startswith(b"qThreadExtraInfo,"):
            return f"vcpu{int(packet.split(b',')[1], 16) - 1}".encode().hex().encode()
        if packet.startswith(b"Qqemu.PhyMemMode:"):
            self.physical = packet.endswith(b"1")
            return b"OK"
        if packet.startswith(b"qRcmd,"):
            command = bytes.fromhex(packet[6:].decode()).decode().strip()
            if command in ("phys on", "phys off"):
                self.physical = command == "phys on"
                return b"OK"
            return ("unknown monitor command; try 'phys on' or 'phys off'\n".encode().hex()
                    .encode())
        return b""

    # --- registers ----------------------------------------------------------------------------------
    def _vcpu(self):
        return self.vm.vcpus[self.current]

    def _state(self):
        return self._vcpu().call(lambda v: (v.kvm_vcpu.get_regs(), v.kvm_vcpu.get_sregs()))

    @staticmethod
    def _real_mode(sregs) -> bool:
        return not sregs.cr0 & 1

    def _register_values(self) -> list[tuple[int, int]]:
        """(value, width) in gdb's amd64 order; real mode shows the linear PC."""
        regs, sregs = self._state()
        values = [(getattr(regs, name), 8) for name in GPRS]
        if self._real_mode(sregs):
            values[-1] = (sregs.cs.base + (regs.rip & 0xFFFF), 8)
        values.append((regs.rflags, 4))
        values += [(getattr(sregs, name).selector, 4) for name in SEGMENTS]
        return values

    def _read_registers(self) -> bytes:
        return b"".join(value.to_bytes(width, "little").hex().encode()
                        for value, width in self._register_values())

    def _read_register(self, number: int) -> bytes:
        values = self._register_values()
        if number >= len(values):
            return b""
        value, width = values[number]
        return value.to_bytes(width, "little").hex().encode()

    def _write_registers(self, data: bytes) -> bytes:
        offset = 0
        for number in range(len(GPRS) + 1):
            width = 8 if number < len(GPRS) else 4
            if offset + width > len(data):
                break
            self._write_register(number, data[offset:offset + width])
            offset += width
        return b"OK"

    def _write_register(self, number: int, data: bytes) -> bytes:
        value = int.from_bytes(data, "little")
        if number == GPRS.index("rip"):
            self._set_pc(value)
        elif number < len(GPRS) or number == EFLAGS_INDEX:
            name = GPRS[number] if number < len(GPRS) else "rflags"

            def write(v):
                regs = v.kvm_vcpu.get_regs()
                setattr(regs, name, value)
                v.kvm_vcpu.set_regs(regs)
            self._vcpu().call(write)
        else:
            return b"E22"
        return b"OK"

    def _set_pc(self, value: int) -> None:
        def write(v):
            regs, sregs = v.kvm_vcpu.get_regs(), v.kvm_vcpu.get_sregs()
            regs.rip = value - sregs.cs.base if self._real_mode(sregs) else value
            v.kvm_vcpu.set_regs(regs)
        self._vcpu().call(write)

    # --- memory ----------------------------------------------------------------------------------------
    def _physical(self, address: int) -> int:
        if self.physical:
            return address
        result = self._vcpu().call(lambda v: v.kvm_vcpu.translate(address))
        if not result.valid:
            raise GuestMemoryError(f"virtual address {address:#x} is not mapped")
        return result.physical_address

    def _pieces(self, address: int, length: int):
        """(physical address, length) pieces that do not cross a page."""
        while length > 0:
            piece = min(length, PAGE - (address % PAGE))
            yield self._physical(address), piece
            address += piece
            length -= piece

    def _read_memory(self, address: int, length: int) -> bytes:
        data = b"".join(self.vm.memory.read(gpa, piece) for gpa, piece in
                        self._pieces(address, length))
        for linear, (gpa, saved) in self.sw_breakpoints.items():   # hide our int3s
            if address <= linear < address + len(data):
                data = data[:linear - address] + bytes((saved,)) + data[linear - address + 1:]
        return data

    def _write_memory(self, address: int, data: bytes) -> None:
        done = 0
        for gpa, piece in self._pieces(address, len(data)):
            self.vm.memory.write(gpa, data[done:done + piece])
            done += piece

    # --- breakpoints -----------------------------------------------------------------------------------
    def _breakpoint(self, insert: bool, body: bytes) -> bytes:
        kind, address, length = (int(x, 16) for x in body.split(b";")[0].split(b","))
        if kind == 0:
            if insert:
                self._insert_sw_breakpoint(address)
            else:
                self._remove_sw_breakpoint(address)
            return b"OK"
        if kind not in DR7_TYPES or (kind != 1 and length not in DR7_LENGTHS):
            return b""
        key = (kind, address, length)
        if insert:
            free = sorted(set(range(4)) - set(self.hw_breakpoints.values()))
            if not free:
                return b"E28"
            self.hw_breakpoints[key] = free[0]
        else:
            self.hw_breakpoints.pop(key, None)
        return b"OK"

    def _insert_sw_breakpoint(self, linear: int) -> None:
        if linear in self.sw_breakpoints:
            return
        gpa = self._physical(linear)
        saved = self.vm.memory.read_u8(gpa)
        self.vm.memory.write(gpa, bytes((INT3,)))
        self.sw_breakpoints[linear] = (gpa, saved)

    def _remove_sw_breakpoint(self, linear: int) -> None:
        entry = self.sw_breakpoints.pop(linear, None)
        if entry is not None:
            gpa, saved = entry
            self.vm.memory.write(gpa, bytes((saved,)))


def parse_gdb_option(text: str) -> tuple[bool, str, int]:
    """bhyve's -G [w][address:]port -> (wait, address, port)."""
    wait = text.startswith("w")
    rest = text[1:] if wait else text
    address, _, port = rest.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"invalid -G '{text}': expected [w][address:]port")
    return wait, address or "127.0.0.1", int(port)

