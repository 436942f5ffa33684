"""pyhyve: FreeBSD bhyve's userspace hypervisor, rebuilt in Python on Linux KVM."""

__version__ = "0.1.0"
