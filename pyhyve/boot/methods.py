"""Ways a guest starts, as a registry: a bootrom at the reset vector (bhyve's
`-l bootrom`), or a kernel loaded into memory (`-f kexec`: a Linux bzImage,
a PVH ELF kernel or a multiboot kernel).

A boot method owns its part of the machine at four points of the build:
map_memory() once guest memory exists (a bootrom below 4 GiB and its BIOS
area alias), add_devices() once the buses exist (the bootrom's variable
store), install_tables() once the devices are in place and the ACPI
tables built (firmware reads them from fw_cfg; a kernel finds them in the
BIOS area, beside an MP table), and start() once the vCPUs exist (the
BSP's first state).  method_for(config) picks the one the config asks for:
with a bootrom and a kernel both, the firmware boots the kernel through
QEMU's option ROM (firmwarekernel.py).
"""

from ..config import ConfigError
from .acpi import install_in_fwcfg, tables_in_memory
from ..devices.bootvars import BootVars
from ..layout import HIGHMEM_BASE
from .bootrom import load_bootrom, open_bootvars, set_reset_state


class BootMethod:
    """The hooks; a method overrides those it needs."""

    config_key = ""             # the config key that asks for this method

    def __init__(self, config):
        self.config = config

    def map_memory(self, memory) -> None:
        pass

    def add_devices(self, vm) -> None:
        pass

    def install_tables(self, vm, acpi_tables) -> None:
        pass

    def can_replace_tables(self, vm) -> bool:
        """Whether tables installed again (the devices changed) reach the guest."""
        return not vm.has_run

    def start(self, vm) -> None:
        raise NotImplementedError


class FirmwareBoot(BootMethod):
    """A firmware image (SeaBIOS, OVMF) ending at 4 GiB, and its variable file
    below it if given; the BSP starts at the reset vector and the firmware
    finds the ACPI tables in fw_cfg."""

    config_key = "lpc.bootrom"

    def __init__(self, config):
        super().__init__(config)
        # read and checked before KVM is set up
        self.rom = load_bootrom(config.get(self.config_key))
        vars_path = config.get("lpc.bootvars")
        self.vars_file, self.vars = (None, None) if vars_path is None else \
            open_bootvars(vars_path, len(self.rom))
        self.vars_gpa = HIGHMEM_BASE - len(self.rom) - (len(self.vars) if self.vars else 0)

    def map_memory(self, memory) -> None:
        memory.map_bootrom(self.rom)
        if self.vars is not None:
            memory.add_rom("bootvars", self.vars_gpa, self.vars, 0, len(self.vars))

    def add_devices(self, vm) -> None:
        if self.vars is not None:
            vm.add_device(BootVars(vm.context, self.vars_gpa, self.vars_file, self.vars))

    def install_tables(self, vm, acpi_tables) -> None:
        if acpi_tables is not None:
            install_in_fwcfg(vm.fwcfg, acpi_tables)

    def can_replace_tables(self, vm) -> bool:
        return True         # the firmware reads fw_cfg afresh at each boot

    def start(self, vm) -> None:
        set_reset_state(vm.vcpus[0].kvm_vcpu)


class FirmwareKernelBoot(FirmwareBoot):
    """A bootrom and a kernel (`-l bootrom,FILE -f kexec,KERNEL,...`): the
    firmware starts at the reset vector and boots the kernel through QEMU's
    option ROM, which reads it from fw_cfg (firmwarekernel.py), so the kernel
    runs with the BIOS's services, as under QEMU's -kernel."""

    def add_devices(self, vm) -> None:
        from .firmwarekernel import hand_to_firmware
        super().add_devices(vm)
        hand_to_firmware(vm.fwcfg, vm.memory, self.config, vm.e820())


class KernelBoot(BootMethod):
    """A kernel, initramfs and command line put in memory as a boot loader
    would; the ACPI tables and an MP table go into the BIOS area, where the
    kernel looks for them, and the BSP starts at the kernel's entry."""

    config_key = "kexec.kernel"

    def __init__(self, config):
        super().__init__(config)
        if config.get("lpc.bootvars") is not None:
            raise ConfigError("a bootrom variable file (lpc.bootvars) needs a bootrom, "
                              "not a kernel: -l bootrom,CODE,VARS")
        self.rsdp = 0

    def install_tables(self, vm, acpi_tables) -> None:
        if acpi_tables is not None:
            self.rsdp = tables_in_memory(vm.memory, acpi_tables)

    def start(self, vm) -> None:
        from .kexec import load_kernel, set_boot_state
        entry = load_kernel(vm.memory, self.config.get(self.config_key),
                            self.config.get("kexec.initrd"), self.config.get("kexec.cmdline", ""),
                            vm.e820(), self.rsdp)
        set_boot_state(vm.memory, vm.vcpus[0].kvm_vcpu, entry)
        if self.config.get_bool("x86.mptable", True):
            vm.write_mptable()


def method_for(config) -> BootMethod:
    """The boot method the config asks for: a bootrom, a kernel, or both (the
    bootrom boots the kernel)."""
    bootrom, kernel = config.get(FirmwareBoot.config_key), config.get(KernelBoot.config_key)
    if bootrom and kernel:
        return FirmwareKernelBoot(config)
    if bootrom:
        return FirmwareBoot(config)
    if kernel:
        return KernelBoot(config)
    raise ConfigError("give a bootrom (-l bootrom,FILE), a kernel "
                      "(-f kexec,KERNEL[,INITRD[,CMDLINE]]), or both")
