"""A GDB remote-serial-protocol stub (bhyve's -G): debug the guest with gdb.

Each vCPU is a GDB thread.  While gdb has the guest stopped, every vCPU is
parked at an instruction boundary (VcpuThread.pause); register and memory
accesses run on the vCPU's own thread through VcpuThread.call.  Breakpoints
and single-step use KVM_SET_GUEST_DEBUG: software breakpoints (int3 written
into guest memory), hardware breakpoints and watchpoints (DR0-DR3/DR7).

Registers: the stub serves a target description (qXfer:features:read,
target.xml), so a plain `target remote` gets the x86-64 architecture and
these registers, numbered in this order in g/G/p/P packets (REGISTERS):
the general registers, rip, eflags and the six selectors, the x87 stack
and its control registers, xmm0-15 and mxcsr (gdb's own core and SSE
features), fs_base and gs_base, then a pyhyve feature of system registers:
k_gs_base (the KERNEL_GS_BASE MSR), cr0, cr2, cr3, cr4, cr8 and efer.

Views: in real mode the PC gdb sees is the linear address CS.base + IP, so
breakpoints and `x/i $pc` work on real-mode code; memory addresses are
virtual (translated through the guest's page tables with KVM_TRANSLATE;
with paging off that is the identity) unless `monitor phys on` (or QEMU's
Qqemu.PhyMemMode:1) selects physical.  `monitor help` lists the monitor
commands (MONITOR_HELP).
"""

import ctypes
import select
import socket
import threading

from .config import ConfigError
from .kvm import KvmError, abi
from .log import getLogger
from .memory import GuestMemoryError
from .record import record

log = getLogger(__name__)

SIGINT, SIGTRAP = 2, 5
MAX_PACKET = 0x4000
MAX_MEMORY_ACCESS = 0x1000
PAGE = 4096
DR7_GLOBAL_ENABLE = 2
DR7_TYPES = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}    # Z1 exec, Z2 write, Z3/Z4 access
DR7_LENGTHS = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
INT3 = 0xCC
MSR_KERNEL_GS_BASE = 0xC0000102
EINVAL, EPERM = b"E22", b"E01"

# --- the target description -----------------------------------------------------------------
# Bits that gdb names when it prints a flags register (and `monitor info registers` too).
EFLAGS_BITS = {0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF",
               11: "OF", 14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP",
               21: "ID"}
MXCSR_BITS = {0: "IE", 1: "DE", 2: "ZE", 3: "OE", 4: "UE", 5: "PE", 6: "DAZ", 7: "IM",
              8: "DM", 9: "ZM", 10: "OM", 11: "UM", 12: "PM", 15: "FZ"}
CR0_BITS = {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
            29: "NW", 30: "CD", 31: "PG"}
CR4_BITS = {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
            8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
            14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 20: "SMEP", 21: "SMAP",
            22: "PKE", 23: "CET"}
EFER_BITS = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 14: "FFXSR"}
CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFLAGS_VM = 1, 1 << 31, 1 << 5, 1 << 10, 1 << 17

CORE = "org.gnu.gdb.i386.core"          # the names gdb's amd64 support looks for
SSE = "org.gnu.gdb.i386.sse"
SEGMENT_BASES = "org.gnu.gdb.i386.segments"
SYSTEM = "org.pyhyve.x86.system"        # pyhyve's own: gdb shows them as plain registers
FLAGS_TYPES = {"pyhyve_eflags": (4, EFLAGS_BITS, CORE), "pyhyve_mxcsr": (4, MXCSR_BITS, SSE),
               "pyhyve_cr0": (8, CR0_BITS, SYSTEM), "pyhyve_cr4": (8, CR4_BITS, SYSTEM),
               "pyhyve_efer": (8, EFER_BITS, SYSTEM)}


@record
class Register:
    name: str
    bits: int
    type: str
    feature: str
    group: str = ""


GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
REGISTERS = (
    *(Register(name, 64, "data_ptr" if name in ("rbp", "rsp") else "int64", CORE)
      for name in GPRS),
    Register("rip", 64, "code_ptr", CORE),
    Register("eflags", 32, "pyhyve_eflags", CORE),
    *(Register(name, 32, "int32", CORE) for name in SEGMENTS),
    *(Register(f"st{i}", 80, "i387_ext", CORE) for i in range(8)),
    *(Register(name, 32, "int", CORE, "float") for name in X87_CONTROL),
    *(Register(f"xmm{i}", 128, "pyhyve_vec128", SSE) for i in range(16)),
    Register("mxcsr", 32, "pyhyve_mxcsr", SSE, "vector"),
    Register("fs_base", 64, "int64", SEGMENT_BASES),
    Register("gs_base", 64, "int64", SEGMENT_BASES),
    Register("k_gs_base", 64, "int64", SYSTEM, "system"),
    Register("cr0", 64, "pyhyve_cr0", SYSTEM, "system"),
    Register("cr2", 64, "int64", SYSTEM, "system"),
    Register("cr3", 64, "int64", SYSTEM, "system"),
    Register("cr4", 64, "pyhyve_cr4", SYSTEM, "system"),
    Register("cr8", 64, "int64", SYSTEM, "system"),
    Register("efer", 64, "pyhyve_efer", SYSTEM, "system"),
)
NUMBER = {register.name: number for number, register in enumerate(REGISTERS)}
RIP = NUMBER["rip"]
# Not writable from gdb; see GdbStub._write_registers for why.
READ_ONLY = frozenset(NUMBER[name] for name in (*SEGMENTS, "cr0", "cr3", "cr4", "efer"))


def target_xml() -> bytes:
    """The target description (gdb's target description format), one document
    with every feature; register numbers are REGISTERS' indices."""
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
             '<target version="1.0">', '  <architecture>i386:x86-64</architecture>']
    for feature in dict.fromkeys(register.feature for register in REGISTERS):
        lines.append(f'  <feature name="{feature}">')
        for type_id, (size, bits, home) in FLAGS_TYPES.items():
            if home == feature:
                lines.append(f'    <flags id="{type_id}" size="{size}">')
                lines += [f'      <field name="{name}" start="{bit}" end="{bit}"/>'
                          for bit, name in bits.items()]
                lines.append('    </flags>')
        if feature == SSE:
            lanes = (("v4_float", "ieee_single", 4), ("v2_double", "ieee_double", 2),
                     ("v16_int8", "int8", 16), ("v8_int16", "int16", 8),
                     ("v4_int32", "int32", 4), ("v2_int64", "int64", 2))
            lines += [f'    <vector id="pyhyve_{name}" type="{lane}" count="{count}"/>'
                      for name, lane, count in lanes]
            lines.append('    <union id="pyhyve_vec128">')
            lines += [f'      <field name="{name}" type="pyhyve_{name}"/>' for name, _, _ in lanes]
            lines += ['      <field name="uint128" type="uint128"/>', '    </union>']
        for number, register in enumerate(REGISTERS):
            if register.feature == feature:
                group = f' group="{register.group}"' if register.group else ""
                lines.append(f'    <reg name="{register.name}" bitsize="{register.bits}" '
                             f'type="{register.type}" regnum="{number}"{group}/>')
        lines.append('  </feature>')
    lines.append('</target>')
    return ("\n".join(lines) + "\n").encode()


TARGET_XML = target_xml()
MONITOR_HELP = """\
pyhyve monitor commands (gdb: monitor COMMAND):
  help              this list
  info registers    the current vCPU's mode, control registers, EFER and segments
  phys on           gdb's memory addresses are guest-physical
  phys off          gdb's memory addresses are virtual, through the guest's page tables
  phys              which of the two is in use
"""


def _flag_names(value: int, bits: dict[int, str]) -> str:
    return " ".join(name for bit, name in bits.items() if value >> bit & 1)


def cpu_mode(sregs, rflags: int) -> str:
    """The vCPU's operating mode in words."""
    if not sregs.cr0 & CR0_PE:
        return "real mode"
    if sregs.efer & EFER_LMA:
        if sregs.cs.l:
            return "long mode, 64-bit code"
        return f"long mode, compatibility mode ({32 if sregs.cs.db else 16}-bit code)"
    if rflags & EFLAGS_VM:
        return "protected mode, virtual-8086"
    paging = ("paging" + (" (PAE)" if sregs.cr4 & CR4_PAE else "")
              if sregs.cr0 & CR0_PG else "no paging")
    return f"protected mode, {32 if sregs.cs.db else 16}-bit code, {paging}"


def _x87_tag(raw: bytes) -> int:
    """The full tag (0 valid, 1 zero, 2 special) of a non-empty 80-bit register."""
    value = int.from_bytes(raw[:10], "little")
    exponent, integer_bit = value >> 64 & 0x7FFF, value >> 63 & 1
    if exponent == 0x7FFF:
        return 2
    if exponent == 0:
        return 1 if value & ((1 << 64) - 1) == 0 else 2
    return 0 if integer_bit else 2


# gdb registers that are one KVM field as they are: name -> (CpuState part, field)
FIELDS = {**{name: ("regs", name) for name in GPRS}, "eflags": ("regs", "rflags"),
          "fctrl": ("fpu", "fcw"), "fstat": ("fpu", "fsw"), "fop": ("fpu", "last_opcode"),
          "mxcsr": ("fpu", "mxcsr"), "k_gs_base": ("msrs", "k_gs_base"),
          **{name: ("sregs", name) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")}}
# the x87 instruction and operand pointers, as gdb's amd64 splits them (64-bit FXSAVE)
X87_POINTERS = {"fioff": ("last_ip", 0), "fiseg": ("last_ip", 32),
                "fooff": ("last_dp", 0), "foseg": ("last_dp", 32)}


class CpuState:
    """One vCPU's registers as KVM keeps them, read together on its thread;
    get and put translate to and from gdb's registers (REGISTERS numbers),
    apply hands what put changed back to KVM."""

    def __init__(self, kvm_vcpu):
        self.regs = kvm_vcpu.get_regs()
        self.sregs = kvm_vcpu.get_sregs()
        self.fpu = kvm_vcpu.get_fpu()
        self.msrs = _Msrs(kvm_vcpu.get_msrs([MSR_KERNEL_GS_BASE]).get(MSR_KERNEL_GS_BASE, 0))
        self.changed: set[str] = set()

    @property
    def real_mode(self) -> bool:
        return not self.sregs.cr0 & CR0_PE

    def get(self, number: int) -> int:
        register = REGISTERS[number]
        name, fpu = register.name, self.fpu
        if name in FIELDS:
            part, field = FIELDS[name]
            value = getattr(getattr(self, part), field)
        elif name == "rip":                 # real mode: the linear PC
            rip = self.regs.rip
            value = self.sregs.cs.base + (rip & 0xFFFF) if self.real_mode else rip
        elif name in SEGMENTS:
            value = getattr(self.sregs, name).selector
        elif name in ("fs_base", "gs_base"):
            value = getattr(self.sregs, name[:2]).base
        elif name.startswith("st"):
            value = int.from_bytes(bytes(fpu.fpr[int(name[2:])])[:10], "little")
        elif name.startswith("xmm"):
            value = int.from_bytes(bytes(fpu.xmm[int(name[3:])]), "little")
        elif name in X87_POINTERS:
            field, shift = X87_POINTERS[name]
            value = getattr(fpu, field) >> shift
        elif name == "ftag":
            value = self._full_tag()
        else:
            raise AssertionError(name)
        return value & ((1 << register.bits) - 1)

    def _full_tag(self) -> int:
        """FXSAVE keeps one bit a register (empty or not); gdb wants FSAVE's two."""
        tag, top = 0, self.fpu.fsw >> 11 & 7
        for physical in range(8):
            if self.fpu.ftwx >> physical & 1:
                value = _x87_tag(bytes(self.fpu.fpr[(physical - top) & 7]))
            else:
                value = 3
            tag |= value << (2 * physical)
        return tag

    def put(self, number: int, value: int) -> None:
        """Change one register here (not READ_ONLY ones); apply() hands it to KVM."""
        if number in READ_ONLY:
            raise ValueError(f"{REGISTERS[number].name} is read-only")
        register = REGISTERS[number]
        name, fpu, part = register.name, self.fpu, "fpu"
        value &= (1 << register.bits) - 1
        if name in FIELDS:
            part, field = FIELDS[name]
            setattr(getattr(self, part), field, value)
        elif name == "rip":
            base = self.sregs.cs.base if self.real_mode else 0
            self.regs.rip, part = (value - base) & ((1 << 64) - 1), "regs"
        elif name in ("fs_base", "gs_base"):
            getattr(self.sregs, name[:2]).base, part = value, "sregs"
        elif name.startswith("st"):
            ctypes.memmove(fpu.fpr[int(name[2:])], value.to_bytes(10, "little"), 10)
        elif name.startswith("xmm"):
            ctypes.memmove(fpu.xmm[int(name[3:])], value.to_bytes(16, "little"), 16)
        elif name in X87_POINTERS:
            field, shift = X87_POINTERS[name]
            kept = getattr(fpu, field) & ~(0xFFFFFFFF << shift)
            setattr(fpu, field, kept | value << shift)
        elif name == "ftag":
            fpu.ftwx = sum(1 << physical for physical in range(8)
                           if value >> (2 * physical) & 3 != 3)
        else:
            raise AssertionError(name)
        self.changed.add(part)

    def apply(self, kvm_vcpu) -> None:
        if "regs" in self.changed:
            kvm_vcpu.set_regs(self.regs)
        if "sregs" in self.changed:
            kvm_vcpu.set_sregs(self.sregs)
        if "fpu" in self.changed:
            kvm_vcpu.set_fpu(self.fpu)
        if "msrs" in self.changed and kvm_vcpu.set_msrs(
                {MSR_KERNEL_GS_BASE: self.msrs.k_gs_base}) != 1:
            raise ValueError(f"KVM refused KERNEL_GS_BASE {self.msrs.k_gs_base:#x}"
                             " (not canonical?)")
        self.changed.clear()


class _Msrs:
    """The MSRs gdb sees as registers."""

    def __init__(self, k_gs_base: int):
        self.k_gs_base = k_gs_base


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
            return b"PacketSize=%x;QStartNoAckMode+;qXfer:features:read+" % MAX_PACKET
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
        if packet.startswith(b"qXfer:"):
            return self._xfer(packet)
        if packet.startswith(b"qRcmd,"):
            for line in self._monitor(bytes.fromhex(packet[6:].decode()).decode()).splitlines():
                self._send(b"O" + (line + "\n").encode().hex().encode())
            return b"OK"
        return b""

    @staticmethod
    def _xfer(packet: bytes) -> bytes:
        """qXfer:features:read:ANNEX:OFFSET,LENGTH: 'm' and a piece of the
        document when more follows, 'l' and the last piece (maybe empty)."""
        fields = packet.split(b":", 4)
        if len(fields) != 5 or fields[1:3] != [b"features", b"read"]:
            return b""                              # an object or operation not served
        if fields[3] != b"target.xml":
            return b"E00"
        try:
            offset, length = (int(x, 16) for x in fields[4].split(b","))
        except ValueError:
            return b"E00"
        if length == 0:
            return b"E00"
        if offset > len(TARGET_XML):
            return b"E01"
        length = min(length, MAX_PACKET - 1)
        while True:                                 # escaped, the reply must still fit
            piece = TARGET_XML[offset:offset + length]
            escaped = b"".join(b"}" + bytes((c ^ 0x20,)) if c in b"#$}*" else bytes((c,))
                               for c in piece)
            if len(escaped) < MAX_PACKET:
                break
            length //= 2
        return (b"m" if offset + len(piece) < len(TARGET_XML) else b"l") + escaped

    # --- the monitor (qRcmd) ------------------------------------------------------------------------
    def _monitor(self, command: str) -> str:
        words = command.split()
        if words == ["help"]:
            return MONITOR_HELP
        if words in (["info", "registers"], ["info", "reg"]):
            return self._system_registers()
        if words == ["phys"]:
            return ("gdb's addresses are guest-physical\n" if self.physical else
                    "gdb's addresses are virtual\n")
        if len(words) == 2 and words[0] == "phys" and words[1] in ("on", "off"):
            self.physical = words[1] == "on"
            return ""
        return f"unknown monitor command '{command.strip()}'; 'monitor help' lists them\n"

    def _system_registers(self) -> str:
        state = self._state()
        sregs = state.sregs
        lines = [f"vcpu{self.current}: {cpu_mode(sregs, state.regs.rflags)}"]
        for name, value, bits in (("cr0", sregs.cr0, CR0_BITS), ("cr2", sregs.cr2, None),
                                  ("cr3", sregs.cr3, None), ("cr4", sregs.cr4, CR4_BITS),
                                  ("cr8", sregs.cr8, None), ("efer", sregs.efer, EFER_BITS),
                                  ("apic_base", sregs.apic_base, None),
                                  ("k_gs_base", state.msrs.k_gs_base, None)):
            flags = f"  [ {_flag_names(value, bits)} ]".replace("[  ]", "[ ]") if bits else ""
            lines.append(f"{name:<10} {value:#018x}{flags}")
        for name in (*SEGMENTS, "tr", "ldt"):
            segment = getattr(sregs, name)
            attributes = " ".join(f"{field}={getattr(segment, field)}" for field in
                                  ("type", "s", "dpl", "present", "db", "l", "g"))
            lines.append(f"{name:<4} {segment.selector:#06x}  base={segment.base:#018x} "
                         f"limit={segment.limit:#010x} {attributes}"
                         + (" unusable" if segment.unusable else ""))
        for name in ("gdt", "idt"):
            table = getattr(sregs, name)
            lines.append(f"{name + 'r':<4}         base={table.base:#018x} "
                         f"limit={table.limit:#06x}")
        return "\n".join(lines) + "\n"

    # --- registers ----------------------------------------------------------------------------------
    def _vcpu(self):
        return self.vm.vcpus[self.current]

    def _state(self) -> CpuState:
        return self._vcpu().call(lambda v: CpuState(v.kvm_vcpu))

    @staticmethod
    def _encode(number: int, value: int) -> bytes:
        return value.to_bytes(REGISTERS[number].bits // 8, "little").hex().encode()

    def _read_registers(self) -> bytes:
        state = self._state()
        return b"".join(self._encode(number, state.get(number))
                        for number in range(len(REGISTERS)))

    def _read_register(self, number: int) -> bytes:
        if number >= len(REGISTERS):
            return EINVAL
        return self._encode(number, self._state().get(number))

    def _write_registers(self, data: bytes) -> bytes:
        """G: the registers that data covers, in REGISTERS order; a value that
        did not change is left alone, so the read-only ones may come back."""
        values, offset = {}, 0
        for number, register in enumerate(REGISTERS):
            width = register.bits // 8
            if offset + width > len(data):
                break
            values[number] = int.from_bytes(data[offset:offset + width], "little")
            offset += width
        return self._write_values(values, only_changed=True)

    def _write_register(self, number: int, data: bytes) -> bytes:
        if number >= len(REGISTERS) or len(data) != REGISTERS[number].bits // 8:
            return EINVAL
        return self._write_values({number: int.from_bytes(data, "little")})

    def _write_values(self, values: dict[int, int], only_changed: bool = False) -> bytes:
        """Write registers on the current vCPU.

        Refused with EPERM, before anything is written: the segment selectors,
        cr0, cr3, cr4 and efer.  The stub could only set them with
        KVM_SET_SREGS, which replaces state but does not do what the guest's
        own write would: loading a selector reads and checks a descriptor in
        the GDT or LDT and fills the hidden base, limit and attributes; a MOV
        to CR0, CR3, CR4 or EFER has side effects (EFER.LMA following CR0.PG,
        the PDPTE loads of PAE paging, TLB flushes) and checks that
        KVM_SET_SREGS reproduces only in part, so an inconsistent value could
        be taken and only fail at the next VM entry or in the guest.  gdb also
        writes a mode change one register at a time, through states the CPU
        never passes through.  Let the guest make such a change: write the
        instructions at $pc and step.  Written: the general registers, rip,
        eflags, the x87 and SSE registers, fs_base, gs_base, k_gs_base, cr2
        and cr8 (the TPR); KVM may still refuse a value (E22 or E14)."""
        def write(v):
            state = CpuState(v.kvm_vcpu)
            wanted = {number: value for number, value in values.items()
                      if not only_changed or value != state.get(number)}
            if any(number in READ_ONLY for number in wanted):
                return EPERM
            for number, value in wanted.items():
                state.put(number, value)
            state.apply(v.kvm_vcpu)
            return b"OK"
        return self._vcpu().call(write)

    def _set_pc(self, value: int) -> None:
        self._write_values({RIP: value})

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

