"""Every config key pyhyve reads, with its meaning, in one place.

bhyve ignores keys it does not know, so a typo (`memroy.size`) passes
silently and the VM gets the default.  pyhyve still builds the VM, as bhyve
would, but warns once per unknown key and names the nearest known one.
Keys below `pci.BUS.SLOT.FUNC.` other than `device` are the emulation's
options, which PciBus checks against the emulation's own declaration.
`pyhyve -o help` prints this table.
"""

import difflib
import re

# key -> meaning; N stands for a number, NAME for any word
KEYS = {
    "name": "the VM's name (the last command-line argument)",
    "cpus": "number of vCPUs (-c)",
    "sockets": "CPU topology: sockets (-c sockets=)",
    "cores": "CPU topology: cores per socket (-c cores=)",
    "threads": "CPU topology: threads per core (-c threads=)",
    "cpu.features": "CPUID features to hide, e.g. -xsave,-avx (see pyhyve/cpuid.py)",
    "memory.size": "guest RAM, with K/M/G/T suffix (-m)",
    "memory.wired": "lock guest RAM into host memory (-S)",
    "uuid": "the VM's UUID for firmware (-U)",
    "acpi_tables": "generate ACPI tables (-A; on by default)",
    "destroy_on_poweroff": "bhyve's -D; accepted, no effect (pyhyve's VM always ends "
                           "with its process)",
    "x86.strictio": "stop the VM on an access to an unclaimed port (-e)",
    "x86.strictmsr": "#GP on unknown MSRs (default); false ignores them (-w)",
    "x86.x2apic": "offer x2APIC in CPUID (-x)",
    "x86.mptable": "write an MP table for a directly booted kernel (false: -Y)",
    "x86.vmexit_on_hlt": "bhyve's -H; accepted, no effect (KVM's in-kernel LAPIC "
                         "handles HLT)",
    "x86.vmexit_on_pause": "bhyve's -P; accepted, no effect (KVM handles PAUSE)",
    "rtc.use_localtime": "RTC in local time (default); false keeps UTC (-u)",
    "lpc.bootrom": "firmware image mapped below 4 GiB (-l bootrom,FILE)",
    "lpc.fwcfg": "fw_cfg flavour: qemu (-l fwcfg,qemu)",
    "lpc.debugcon.path": "file the port 0x402 debug console writes to",
    "lpc.debugcon.append": "append to the debugcon file rather than truncate it",
    "console.file_limit": "most bytes a file= console or the debugcon file grows to "
                          "(default 128M); beyond, output is dropped and counted",
    "lpc.comN.path": "COM port N's backend: stdio, file=, unix=, tcp= (-l comN,...)",
    "kexec.kernel": "Linux bzImage or PVH ELF kernel to boot (-f kexec,...)",
    "kexec.initrd": "initramfs for the kernel",
    "kexec.cmdline": "kernel command line",
    "fwcfg.file.N": "an fw_cfg file: name,string=TEXT or name,file=PATH (-f)",
    "pci.N.N.N.device": "the PCI emulation in bus.slot.function (-s)",
    "gdb.port": "TCP port of the GDB stub (-G)",
    "gdb.address": "address the GDB stub listens on (default 127.0.0.1)",
    "gdb.wait": "hold the BSP until GDB attaches (-G w...)",
    "pidfile": "file the process's PID is written to once the VM is set up",
    "control.socket": "path of the control socket (default /run/pyhyve/NAME.sock)",
    "qmp.socket": "path of a unix socket that serves QMP, QEMU's monitor protocol",
    "process.seccomp": "confine the process with seccomp (default true)",
    "process.user": "user to drop to once devices are open",
    "restore.path": "snapshot to restore (-r)",
    "config.dump": "print the config tree and exit",
}
_DEVICE_OPTION = re.compile(r"pci\.\d+\.\d+\.\d+\.(?!device$).+")


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace("N", r"\d+"))


_PATTERNS = [_pattern(key) for key in KEYS]


def is_known(key: str) -> bool:
    return bool(_DEVICE_OPTION.fullmatch(key)) or any(p.fullmatch(key) for p in _PATTERNS)


def unknown_keys(keys) -> list[tuple[str, str | None]]:
    """(key, nearest known key or None) for each key pyhyve does not read."""
    concrete = [key.replace("N", "1") for key in KEYS]
    return [(key, next(iter(difflib.get_close_matches(key, concrete, n=1)), None))
            for key in sorted(keys) if not is_known(key)]


def describe() -> str:
    width = max(map(len, KEYS))
    return "\n".join(f"{key:{width}}  {meaning}" for key, meaning in KEYS.items())
