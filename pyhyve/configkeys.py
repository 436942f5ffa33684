"""Every config key pyhyve reads, with its meaning, in one place.

bhyve ignores keys it does not know, so a typo (`memroy.size`) passes
silently and the VM gets the default.  pyhyve still builds the VM, as bhyve
would, but warns once per unknown key and names the nearest known one.
Keys below `pci.BUS.SLOT.FUNC.` other than `device` are the emulation's
options, which PciBus checks against the emulation's own declaration.
`pyhyve -o help` prints this table.
"""

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
    "memory.guest_in_core": "include guest RAM in the process's core dumps (-C); by default "
                            "it is left out (MADV_DONTDUMP)",
    "vcpu.N.cpuset": "host CPUs vCPU N's thread may run on: a list such as 1 or 0,2-3 "
                     "(-p N:HOSTCPU, repeatable, adds one)",
    "uuid": "the VM's UUID for firmware (-U)",
    "acpi_tables": "generate ACPI tables (-A; on by default, false leaves them out)",
    "destroy_on_poweroff": "bhyve's -D; accepted, no effect (a KVM VM is destroyed when "
                           "its process exits, at every power-off)",
    "keyboard.layout": "bhyve's -K (its VNC console's keyboard layout): us_unix only, the "
                       "US layout the VNC server types with",
    "x86.strictio": "stop the VM on an access to an unclaimed port (-e)",
    "x86.strictmsr": "#GP on unknown MSRs (default); false ignores them (-w)",
    "x86.x2apic": "offer x2APIC in CPUID (-x)",
    "x86.mptable": "write an MP table for a directly booted kernel (false: -Y)",
    "x86.vmexit_on_hlt": "bhyve's -H; accepted, no effect (always so: KVM's in-kernel "
                         "LAPIC gives the host CPU up while a vCPU halts)",
    "x86.vmexit_on_pause": "bhyve's -P; accepted, no effect (KVM's pause-loop exiting, "
                           "PLE, already takes a vCPU spinning on PAUSE off its host CPU)",
    "rtc.use_localtime": "RTC in local time (default); false keeps UTC (-u)",
    "lpc.bootrom": "firmware image mapped below 4 GiB (-l bootrom,FILE)",
    "lpc.bootvars": "the bootrom's variable file, mapped below it and written by the "
                    "guest (-l bootrom,FILE,VARS)",
    "lpc.fwcfg": "fw_cfg flavour: qemu (-l fwcfg,qemu)",
    "lpc.debugcon.path": "file the port 0x402 debug console writes to",
    "lpc.debugcon.append": "append to the debugcon file rather than truncate it",
    "console.file_limit": "most bytes a file= console or the debugcon file grows to "
                          "(default 128M); beyond, output is dropped and counted",
    "lpc.isa-debug-exit.iobase": "first port of the isa-debug-exit test device "
                                 "(default 0x501; -l isa-debug-exit,iobase=N)",
    "lpc.isa-debug-exit.iosize": "how many ports it takes (default 2)",
    "lpc.pc-testdev": "QEMU's and bhyve's pc-testdev for kvm-unit-tests (-l pc-testdev)",
    "console.escape": "the stdio console's escape character (default ~; ^X for a control "
                      "key; none turns it off): ~. powers off, ~? lists, ~~ sends ~",
    "lpc.comN.path": "COM port N's backend: stdio, pty[,link=], file=, unix=, tcp= "
                     "(-l comN,...)",
    "kexec.kernel": "bzImage, PVH ELF or multiboot kernel to boot (-f kexec,...)",
    "kexec.initrd": "initramfs for the kernel; a multiboot kernel's modules: "
                    "PATH [ARGS],PATH [ARGS] (,, for a comma)",
    "kexec.cmdline": "kernel command line",
    "kexec.romdir": "directory of QEMU's option ROMs linuxboot_dma.bin and multiboot_dma.bin, "
                    "which boot the kernel when a bootrom is given too (default "
                    "/usr/share/qemu)",
    "fwcfg.file.N": "an fw_cfg file: name,string=TEXT or name,file=PATH (-f)",
    "pci.N.N.N.device": "the PCI emulation in bus.slot.function (-s)",
    "gdb.port": "TCP port of the GDB stub (-G)",
    "gdb.address": "address the GDB stub listens on (default 127.0.0.1)",
    "gdb.wait": "hold the BSP until GDB attaches (-G w...)",
    "poweroff.grace": "seconds after a SIGTERM (the power button) before the VM is "
                      "powered off if the guest has not (default none: bhyve's wait)",
    "pidfile": "file the process's PID is written to once the VM is set up",
    "control.socket": "path of the control socket (default /run/pyhyve/NAME.sock)",
    "qmp.socket": "path of a unix socket that serves QMP, QEMU's monitor protocol",
    "process.seccomp": "confine the process with seccomp (default true)",
    "process.user": "user to drop to once devices are open",
    "process.landlock": "confine the files the process may open with Landlock (default true)",
    "snapshot.dir": "the only directory pyhyvectl --checkpoint/--suspend may write to "
                    "(needed where Landlock is in force)",
    "restore.path": "snapshot to restore (-r)",
    "snapshot.check_memory": "check the CRC-32 of a restored snapshot's guest memory "
                             "(reads it all before the guest runs; default false: "
                             "memory is mapped from the file as the guest touches it)",
    "migration.listen": "HOST:PORT a live migration's destination listens on for its "
                        "source (-R; port 0: any free one, printed)",
    "migration.key": "file of the secret both ends of a live migration share (needed "
                     "on both; the source may then open TCP connections)",
    "migration.downtime": "the longest pause a live migration aims for, in milliseconds "
                          "(default 300)",
    "migration.bandwidth": "the most a live migration sends, in bytes a second (K, M, G "
                           "suffixes; default 0: unlimited)",
    "config.dump": "print the config tree and exit",
    "logging.level": "what pyhyve logs: debug, info, warning (the default) or error "
                     "(-v: info, -vv: debug)",
    "logging.file": "append the log to this file instead of stderr (opened before "
                    "privileges are dropped; one-line errors still go to stderr)",
}
_EXACT_KEYS = frozenset(key for key in KEYS if "N" not in key)
# The numbered keys and a device's options as one pattern, compiled on first
# use: most VMs' keys are all exact, and each compile costs start-up time.
_numbered_keys: re.Pattern | None = None


def _numbered() -> re.Pattern:
    global _numbered_keys
    if _numbered_keys is None:
        patterns = [re.escape(key).replace("N", r"\d+") for key in KEYS if "N" in key]
        _numbered_keys = re.compile("|".join([r"pci\.\d+\.\d+\.\d+\.(?!device$).+",
                                              *patterns]))
    return _numbered_keys


def is_known(key: str) -> bool:
    return key in _EXACT_KEYS or _numbered().fullmatch(key) is not None


def unknown_keys(keys) -> list[tuple[str, str | None]]:
    """(key, nearest known key or None) for each key pyhyve does not read."""
    unknown = sorted(key for key in keys if not is_known(key))
    if not unknown:
        return []
    import difflib          # only for a mistake: its import is start-up time
    concrete = [key.replace("N", "1") for key in KEYS]
    return [(key, next(iter(difflib.get_close_matches(key, concrete, n=1)), None))
            for key in unknown]


def describe() -> str:
    width = max(map(len, KEYS))
    return "\n".join(f"{key:{width}}  {meaning}" for key, meaning in KEYS.items())
