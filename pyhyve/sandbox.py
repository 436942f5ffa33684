"""Least privilege once a VM is set up: drop to another user, then a seccomp filter.

bhyve enters Capsicum once its devices are open; Firecracker's jailer drops
privileges and installs per-thread seccomp filters.  pyhyve does the same in
two steps, after everything that needs root (/dev/kvm, taps, disks, listening
sockets) is open and before the vCPUs start:

1. `drop_privileges(user)`: the user's groups, gid and uid, in that order (a
   uid change first would leave no right to change groups).  glibc applies
   setuid/setgid to every thread of the process, so threads already running
   (control socket, I/O thread, consoles) drop too.
2. `install_seccomp()`: an allowlist of the system calls pyhyve's threads make
   while a guest runs, through libseccomp, synchronised onto every thread.
   Anything else fails with EPERM.  EPERM rather than killing the process: a
   call outside the list in a rarely taken path then fails the way a refused
   permission does (an OSError pyhyve reports, in the thread that made it),
   instead of killing the guest with no message and its state lost.

Both are irreversible for the whole process, so `VirtualMachine.run()` never
applies them on its own: the `pyhyve` command does (`confine(config)`), and a
program using pyhyve as a library may call the same functions when it chooses.
"""

import ctypes
import errno
import os
import pwd

from .config import Config, ConfigError

LIBSECCOMP = "libseccomp.so.2"

# libseccomp's ABI (seccomp.h): actions, filter attributes, comparison operators.
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_BASE = 0x00050000
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_TSYNC = 4
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
NR_SCMP_ERROR = -1

CLONE_THREAD = 0x00010000
CLONE_NEW_NAMESPACES = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 |
                        0x10000000 | 0x20000000 | 0x40000000)   # NEWNS .. NEWNET


def scmp_act_errno(code: int) -> int:
    return SCMP_ACT_ERRNO_BASE | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp: argument index, operator, two operands."""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


# What pyhyve's threads call once the guest runs, by what needs it.
ALLOWED_SYSCALLS = {
    # KVM_RUN and every other KVM, tap and terminal request
    "kvm and devices": ("ioctl",),
    # disks (fallocate: discard), consoles, taps, eventfds, sockets already open
    # (Python's os.preadv/os.pwritev call the *2 variants)
    "file i/o": ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv",
                 "pwritev", "preadv2", "pwritev2", "lseek", "fsync", "fdatasync",
                 "fallocate", "close", "fcntl"),
    # snapshots written by pyhyvectl --checkpoint/--suspend (a temporary file,
    # renamed); Python's lazy imports and traceback source lines; the unlink of
    # the control and console sockets at exit
    "files by name": ("openat", "newfstatat", "fstat", "getdents64", "getcwd", "rename",
                      "unlink"),
    # the threads' waits: selectors, Event/Condition, sleeps; clocks where the
    # vDSO falls back to the kernel
    "waiting": ("poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl",
                "epoll_wait", "epoll_pwait", "futex", "nanosleep", "clock_nanosleep",
                "clock_gettime", "gettimeofday", "sched_yield", "eventfd2"),
    # listeners accept later: control socket, tcp/unix consoles, gdb stub
    "sockets already open": ("accept", "accept4", "recvfrom", "sendto", "recvmsg",
                             "sendmsg", "shutdown", "getsockopt", "setsockopt",
                             "getsockname", "getpeername"),
    # Python's allocator, guest memory teardown, thread stacks
    "memory": ("mmap", "munmap", "mprotect", "madvise", "brk", "mremap"),
    # vCPU kicks (pthread_kill), SIGTERM's power button, thread start and exit
    # (restart_syscall: how a futex wait that a signal interrupted goes on)
    "signals and threads": ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
                            "restart_syscall", "tgkill", "getpid", "gettid",
                            "set_robust_list", "rseq", "exit", "exit_group"),
    # the control socket compares a client's uid with its own
    "identity": ("getuid", "geteuid"),
    "randomness": ("getrandom",),
}
# User networking (libslirp) opens the guest's connections as the guest asks:
# these, and socket() for AF_INET and AF_INET6 only.
INET_SOCKET_SYSCALLS = ("connect", "bind", "listen")
AF_INET, AF_INET6 = 2, 10


def drop_privileges(user: str) -> None:
    """Become USER (a name or a numeric uid) for good, with its own groups."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise ConfigError(f"process.user: no such user '{user}'") from None
    try:
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except PermissionError:
        raise ConfigError(f"process.user: cannot become '{user}': "
                          "only root can change user") from None
    if entry.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise ConfigError(f"process.user: '{user}' could regain root")


def load_libseccomp() -> ctypes.CDLL:
    """libseccomp, typed; load it before dropping privileges (the search path
    may include directories the new user cannot read)."""
    try:
        lib = ctypes.CDLL(LIBSECCOMP, use_errno=True)
    except OSError:
        raise ConfigError(f"process.seccomp: cannot load {LIBSECCOMP}: install Debian "
                          "package libseccomp2, or run with -o process.seccomp=false") from None
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp))
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_attr_set.restype = ctypes.c_int
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_load.restype = ctypes.c_int
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.restype = None
    return lib


def _check(result: int, what: str) -> None:
    """libseccomp returns a negative errno on failure."""
    if result < 0:
        raise OSError(-result, f"seccomp: {what}: {os.strerror(-result)}")


def _rule(lib, ctx, action: int, name: str, *conditions: _ArgCmp) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number == NR_SCMP_ERROR:
        raise OSError(errno.EINVAL, f"seccomp: unknown system call {name}")
    array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
    _check(lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array),
           f"rule for {name}")


def install_seccomp(inet_sockets: bool = False, lib: ctypes.CDLL | None = None,
                    pinning: bool = False) -> None:
    """Allow ALLOWED_SYSCALLS on every thread of the process, refuse the rest
    with EPERM.  New threads stay possible (clone with CLONE_THREAD and no new
    namespace); new processes, exec, new sockets (but IPv4 and IPv6 ones with
    inet_sockets), ptrace, mounts, module loading and uid changes do not.
    `pinning` (-p) allows sched_setaffinity, with which each vCPU thread pins
    itself as it starts."""
    lib = lib or load_libseccomp()
    ctx = lib.seccomp_init(scmp_act_errno(errno.EPERM))
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp: cannot create a filter")
    try:
        for names in ALLOWED_SYSCALLS.values():
            for name in names:
                _rule(lib, ctx, SCMP_ACT_ALLOW, name)
        # A thread, not a process: glibc's pthread_create passes CLONE_THREAD,
        # fork() does not.  clone3's flags sit in memory the filter cannot read,
        # so it answers ENOSYS, and glibc falls back to clone.
        _rule(lib, ctx, SCMP_ACT_ALLOW, "clone",
              _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_THREAD | CLONE_NEW_NAMESPACES,
                      CLONE_THREAD))
        _rule(lib, ctx, scmp_act_errno(errno.ENOSYS), "clone3")
        if pinning:
            _rule(lib, ctx, SCMP_ACT_ALLOW, "sched_setaffinity")
        if inet_sockets:
            for name in INET_SOCKET_SYSCALLS:
                _rule(lib, ctx, SCMP_ACT_ALLOW, name)
            for family in (AF_INET, AF_INET6):
                _rule(lib, ctx, SCMP_ACT_ALLOW, "socket", _ArgCmp(0, SCMP_CMP_EQ, family, 0))
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 1), "no_new_privs")
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1), "thread sync")
        _check(lib.seccomp_load(ctx), "load")
    finally:
        lib.seccomp_release(ctx)


def confine(config: Config) -> None:
    """What `-o process.user=NAME` and `-o process.seccomp=true|false` ask for:
    the user first (setuid is among the calls the filter refuses)."""
    user = config.get("process.user")
    lib = load_libseccomp() if config.get_bool("process.seccomp", True) else None
    if user is not None:
        if not user:
            raise ConfigError("process.user: empty user name")
        drop_privileges(user)
    if lib is not None:
        try:
            install_seccomp(uses_user_networking(config), lib, pins_vcpus(config))
        except OSError as exc:
            raise ConfigError(f"process.seccomp: {exc.strerror or exc}") from None


def uses_user_networking(config: Config) -> bool:
    """Whether a virtio-net device has the slirp backend (pci.0.SLOT.FUNC.backend)."""
    return any(key.endswith(".backend") and value == "slirp"
               for key, value in config.subtree("pci").items())


def pins_vcpus(config: Config) -> bool:
    """Whether a vCPU thread is to pin itself to host CPUs (vcpu.N.cpuset, -p)."""
    return any(key.endswith(".cpuset") for key in config.subtree("vcpu"))
