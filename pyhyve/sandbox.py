"""Least privilege once a VM is set up: another user, Landlock, seccomp filters.

bhyve enters Capsicum once its devices are open; Firecracker's jailer drops
privileges and installs per-thread seccomp filters.  pyhyve does the same,
after everything that needs root (/dev/kvm, taps, disks, listening sockets)
is open and before the vCPUs start:

1. Landlock rules are gathered while still root (`landlock_rules`): the
   process may then read only Python's own files (lazy imports, traceback
   source lines), write only in `snapshot.dir`, delete only beside the
   files it removes at exit (sockets, pidfile: `remove_at_exit`), and
   read, create, change and remove files beneath the directories a 9P
   share serves (`serve_directory`; reading only for a read-only share).
   Files already open are not affected.
2. `drop_privileges(user)`: the user's groups, gid and uid, in that order (a
   uid change first would leave no right to change groups).  glibc applies
   setuid/setgid to every thread of the process, so threads already running
   (control socket, I/O thread, consoles) drop too.
3. The Landlock rules are put in force.  Landlock confines one thread at a
   time, so the main thread confines itself (the vCPU threads it starts next
   inherit that), and each service thread already running confines itself
   when it next wakes up, before it handles what woke it (`catch_up`).
4. `install_seccomp()`: an allowlist of the system calls pyhyve's threads make
   while a guest runs, through libseccomp, synchronised onto every thread;
   ioctl only for KVM, tap and terminal requests, and, where Landlock is not
   in force, open only for reading and no call that changes files by name
   (rename, unlink, and the *at calls a 9P share makes: FILES_CHANGED); a
   writable share then is refused, as nothing would say where it may write.  Anything else
   fails with EPERM.  EPERM rather than killing the process: a call outside
   the list in a rarely taken path then fails the way a refused permission
   does (an OSError pyhyve reports, in the thread that made it), instead of
   killing the guest with no message and its state lost.
5. Each vCPU thread, the one that runs device emulation for the guest's port
   and MMIO accesses, adds a filter of its own (`narrow_vcpu_thread`): no
   file opened for writing, none of FILES_CHANGED, no socket.

A VM started with `migration.key` may migrate: its process may then open
TCP connections (seccomp: socket() for IPv4 and IPv6, and connect; Landlock
refuses binding TCP ports still, but leaves connecting alone, since where
the VM goes is decided only when pyhyvectl --migrate or QMP's migrate asks,
long after the rules are in force).  The connection is made on a migration
thread; vCPU threads still make no socket.  A migration's destination needs
nothing new: its listening socket is opened before the sandbox, and accept
was allowed already.

What a process that escaped the guest could still do: use every descriptor
it holds (its disks, taps, consoles, /dev/kvm, the listening sockets), read
Python's files, write in `snapshot.dir` and its 9P shares, delete files
beside its sockets and pidfile, start threads, and, with user networking, open IP sockets.  It can
not exec, fork, open other files, create other sockets, ptrace, mount, load
modules or change user.

All are irreversible for the whole process, so `VirtualMachine.run()` never
applies them on its own: the `pyhyve` command does (`confine(config)`), and a
program using pyhyve as a library may call the same functions when it chooses.
"""

import ctypes
import errno
import os
import pwd
import sys
import threading

from . import deferred, landlock
from .config import Config, ConfigError
from .log import getLogger

log = getLogger(__name__)

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
    # disks (fallocate: discard), consoles, taps, eventfds, sockets already open
    # (Python's os.preadv/os.pwritev call the *2 variants)
    "file i/o": ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv",
                 "pwritev", "preadv2", "pwritev2", "lseek", "fsync", "fdatasync",
                 "fallocate", "close", "fcntl"),
    # Python's lazy imports and traceback source lines; a pty
    # console's link, read before it is removed at exit (openat: see FILES_CHANGED)
    "files by name": ("newfstatat", "fstat", "getdents64", "getcwd",
                      "readlink", "readlinkat", "fstatfs"),
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
    # confining further: a vCPU thread's own filter, a service thread's
    # Landlock (prctl: PR_SET_NO_NEW_PRIVS only, below)
    "confining further": ("seccomp", "landlock_restrict_self"),
}
PR_SET_NO_NEW_PRIVS = 38
# Opening files, renaming and unlinking them, only where Landlock is in force
# to say which: snapshots written by pyhyvectl --checkpoint/--suspend (a
# temporary file, renamed); the unlink of the control and console sockets at
# exit; what a 9P share's server does beneath its directory (openat2, whose
# flags a filter cannot read, among them).  Without Landlock, openat is
# allowed with none of OPEN_FOR_CHANGE's flags.
FILES_CHANGED = ("openat", "rename", "unlink", "openat2", "mkdirat", "unlinkat", "renameat",
                 "renameat2", "symlinkat", "linkat", "fchownat", "chmod", "fchmodat", "fchmod",
                 "utimensat", "truncate", "ftruncate")
OPEN_FOR_CHANGE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
# ioctl requests by their type byte (bits 8-15): KVM's, and 'T' for terminals,
# tun/tap and FIONBIO (which Python's sockets use for non-blocking mode).
IOCTL_TYPE_MASK = 0xFF00
IOCTL_TYPES = {"kvm": 0xAE00, "terminal and tap": 0x5400}
# What a vCPU thread adds on its own (narrow_vcpu_thread).
VCPU_REFUSED = tuple(name for name in FILES_CHANGED if name != "openat") + (
    "socket", "connect", "bind", "listen", "accept", "accept4")
# User networking (libslirp) opens the guest's connections as the guest asks:
# these, and socket() for AF_INET and AF_INET6 only; a VM that may migrate,
# connect (and socket() for those families).
INET_SOCKET_SYSCALLS = ("connect", "bind", "listen")
OUTGOING_TCP_SYSCALLS = ("connect",)
AF_INET, AF_INET6 = 2, 10


def drop_privileges(user: str) -> None:
    """Become USER (a name or a numeric uid) for good, with its own groups.
    What pyhyve imports on first use is imported first (pyhyve.deferred):
    USER may not be able to read Python's files."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise ConfigError(f"process.user: no such user '{user}'") from None
    deferred.import_all()
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
                    files_changed: bool = True, pinning: bool = False,
                    outgoing_tcp: bool = False) -> None:
    """Allow ALLOWED_SYSCALLS on every thread of the process, refuse the rest
    with EPERM.  New threads stay possible (clone with CLONE_THREAD and no new
    namespace); new processes, exec, new sockets (but IPv4 and IPv6 ones with
    inet_sockets), ptrace, mounts, module loading and uid changes do not.
    files_changed=False (no Landlock to say where) opens files read-only only.

    `pinning` (-p) allows sched_setaffinity, with which each vCPU thread pins
    itself as it starts; `outgoing_tcp` (a VM that may migrate), IPv4 and
    IPv6 sockets and connect."""
    lib = lib or load_libseccomp()
    ctx = lib.seccomp_init(scmp_act_errno(errno.EPERM))
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp: cannot create a filter")
    try:
        for names in ALLOWED_SYSCALLS.values():
            for name in names:
                _rule(lib, ctx, SCMP_ACT_ALLOW, name)
        for request_type in IOCTL_TYPES.values():
            _rule(lib, ctx, SCMP_ACT_ALLOW, "ioctl",
                  _ArgCmp(1, SCMP_CMP_MASKED_EQ, IOCTL_TYPE_MASK, request_type))
        if files_changed:
            for name in FILES_CHANGED:
                _rule(lib, ctx, SCMP_ACT_ALLOW, name)
        else:
            _rule(lib, ctx, SCMP_ACT_ALLOW, "openat",
                  _ArgCmp(2, SCMP_CMP_MASKED_EQ, OPEN_FOR_CHANGE, 0))
        # A thread, not a process: glibc's pthread_create passes CLONE_THREAD,
        # fork() does not.  clone3's flags sit in memory the filter cannot read,
        # so it answers ENOSYS, and glibc falls back to clone.
        _rule(lib, ctx, SCMP_ACT_ALLOW, "clone",
              _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_THREAD | CLONE_NEW_NAMESPACES,
                      CLONE_THREAD))
        _rule(lib, ctx, scmp_act_errno(errno.ENOSYS), "clone3")
        _rule(lib, ctx, SCMP_ACT_ALLOW, "prctl", _ArgCmp(0, SCMP_CMP_EQ, PR_SET_NO_NEW_PRIVS, 0))
        if pinning:
            _rule(lib, ctx, SCMP_ACT_ALLOW, "sched_setaffinity")
        if inet_sockets or outgoing_tcp:
            for name in INET_SOCKET_SYSCALLS if inet_sockets else OUTGOING_TCP_SYSCALLS:
                _rule(lib, ctx, SCMP_ACT_ALLOW, name)
            for family in (AF_INET, AF_INET6):
                _rule(lib, ctx, SCMP_ACT_ALLOW, "socket", _ArgCmp(0, SCMP_CMP_EQ, family, 0))
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 1), "no_new_privs")
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1), "thread sync")
        _check(lib.seccomp_load(ctx), "load")
    finally:
        lib.seccomp_release(ctx)
    global _vcpu_filter_lib, _files_read_only
    _vcpu_filter_lib = lib
    _files_read_only = not files_changed


def narrow_vcpu_thread() -> None:
    """Called by each vCPU thread before its first KVM_RUN: where the process
    filter is installed, add one for this thread alone that refuses opening a
    file for writing, rename, unlink and sockets (VCPU_REFUSED).  A vCPU thread
    runs the device code for the guest's port and MMIO accesses and needs
    none of them; the control thread (checkpoints) and the I/O threads keep
    them.  OSError if the filter cannot be loaded."""
    lib = _vcpu_filter_lib
    if lib is None:
        return
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp: cannot create a filter")
    refuse = scmp_act_errno(errno.EPERM)
    try:
        for name in VCPU_REFUSED:
            _rule(lib, ctx, refuse, name)
        for flag in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC):
            _rule(lib, ctx, refuse, "openat", _ArgCmp(2, SCMP_CMP_MASKED_EQ, flag, flag))
        _check(lib.seccomp_load(ctx), "load")
    finally:
        lib.seccomp_release(ctx)


# The process filter's libseccomp once it is installed: vCPU threads then add theirs.
_vcpu_filter_lib: ctypes.CDLL | None = None
# Whether that filter opens files for reading only (no Landlock to say where).
_files_read_only = False


# --- Landlock ------------------------------------------------------------------------
_removed_at_exit: set[str] = set()
_served: dict[str, bool] = {}          # a 9P share's directory -> writable
_ruleset: landlock.Ruleset | None = None
_threads_to_confine: set[int] = set()


def remove_at_exit(path: str) -> None:
    """Whoever makes a file that it deletes when the VM ends (a socket, a
    pidfile) says so here, before confinement, which then keeps the right to
    delete files beside it."""
    _removed_at_exit.add(os.path.abspath(path))


def serve_directory(path: str, writable: bool) -> None:
    """A device that opens, creates and removes files beneath PATH while the
    guest runs (a 9P share) says so here, before confinement, which then
    keeps those rights there (reading only, unless WRITABLE)."""
    path = os.path.abspath(path)
    _served[path] = _served.get(path, False) or writable


SHARE_READ = landlock.READ_FILE | landlock.READ_DIR
SHARE_WRITE = (landlock.WRITE_FILE | landlock.REMOVE_DIR | landlock.REMOVE_FILE |
               landlock.MAKE_DIR | landlock.MAKE_REG | landlock.MAKE_SYM | landlock.REFER |
               landlock.TRUNCATE)


def python_file_paths() -> list[str]:
    """What Python may still read once confined: its import path (lazy imports,
    traceback source lines) and pyhyve's own directory (an editable install
    finds it outside sys.path), and the local time zone (log timestamps)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = {os.path.abspath(entry or ".") for entry in sys.path} | {package_parent}
    paths.add("/etc/localtime")
    return sorted(path for path in paths if os.path.exists(path))


def landlock_rules(config: Config) -> landlock.Ruleset | None:
    """The rules for `process.landlock` (default true), gathered now, while
    every path can still be opened; None where Landlock is off or absent."""
    if not config.get_bool("process.landlock", True):
        return None
    abi = landlock.abi_version()
    if abi == 0:
        log.info("Landlock is absent from this kernel: seccomp alone confines files")
        return None
    ruleset = landlock.Ruleset(abi, deny_tcp=not uses_user_networking(config),
                               allow_tcp_connect=may_migrate(config))
    try:
        for path in python_file_paths():
            ruleset.allow(path, landlock.READ_FILE | landlock.READ_DIR)
        snapshot_dir = config.get("snapshot.dir")
        if snapshot_dir:
            try:
                ruleset.allow(snapshot_dir, landlock.READ_FILE | landlock.READ_DIR |
                              landlock.WRITE_FILE | landlock.MAKE_REG |
                              landlock.REMOVE_FILE | landlock.TRUNCATE)
            except OSError as exc:
                raise ConfigError(f"snapshot.dir: {snapshot_dir}: "
                                  f"{exc.strerror or exc}") from None
        for path in _user_networking_files(config):
            ruleset.allow(path, landlock.READ_FILE | landlock.READ_DIR)
        for path, writable in sorted(_served.items()):
            try:
                ruleset.allow(path, SHARE_READ | (SHARE_WRITE if writable else 0))
            except OSError as exc:
                raise ConfigError(f"virtio-9p: {path}: {exc.strerror or exc}") from None
        for path in sorted(_removed_at_exit):
            ruleset.allow(os.path.dirname(path), landlock.REMOVE_FILE)
            if os.path.isfile(path):        # a pidfile, read before removal
                ruleset.allow(path, landlock.READ_FILE)
    except BaseException:
        ruleset.close()
        raise
    return ruleset


def _user_networking_files(config: Config) -> list[str]:
    """What libslirp reads while the guest runs: the host's resolver
    configuration (its DNS proxy) and the directories served by TFTP."""
    if not uses_user_networking(config):
        return []
    tftp = [value for key, value in config.subtree("pci").items() if key.endswith(".tftp")]
    return [path for path in ["/etc/resolv.conf", *tftp] if os.path.exists(path)]


def _enforce_landlock(ruleset: landlock.Ruleset) -> None:
    """Confine this thread; the threads already running confine themselves at
    their next wake-up (catch_up).  The ruleset stays open for them."""
    global _ruleset
    main = threading.get_ident()
    _ruleset = ruleset          # before the set: a thread found there reads it
    _threads_to_confine.update(thread.ident for thread in threading.enumerate()
                               if thread.ident is not None and thread.ident != main)
    ruleset.restrict_self()


def catch_up() -> None:
    """Called by each long-lived service thread (I/O, consoles, control
    socket, user networking) each time it wakes, before it handles anything:
    a thread that was running when the process was confined confines itself
    now.  One set lookup otherwise."""
    if not _threads_to_confine:
        return
    ident = threading.get_ident()
    if ident in _threads_to_confine:
        _threads_to_confine.discard(ident)
        try:
            _ruleset.restrict_self()
        except OSError as exc:       # fail closed: this service ends, unconfined work never runs
            log.error("%s cannot confine itself (%s) and stops",
                      threading.current_thread().name, exc)
            raise SystemExit from None


def confined_by_landlock() -> bool:
    return _ruleset is not None


def snapshot_refusal(path: str, config: Config) -> str | None:
    """Why a snapshot may not be written at PATH (absolute), or None: only
    beneath `snapshot.dir` where that is set, only there at all where Landlock
    is in force, and nowhere where seccomp alone confines files (both would
    refuse, less clearly)."""
    if _files_read_only:
        return ("this VM's seccomp filter lets it write no file, as Landlock is not in "
                "force to say where: start it with -o process.landlock=true (Linux 5.13 "
                "or later) and -o snapshot.dir=DIR, or with -o process.seccomp=false")
    directory = config.get("snapshot.dir")
    if not directory:
        if _ruleset is None:
            return None
        return ("this VM is confined by Landlock and may write snapshots only in "
                "snapshot.dir, which is not set: start it with -o snapshot.dir=DIR")
    beneath = os.path.realpath(directory)
    parent = os.path.realpath(os.path.dirname(path))
    if os.path.commonpath([beneath, parent]) != beneath:
        return f"{path} is outside snapshot.dir ({directory}), the only place snapshots go"
    return None


def confine(config: Config) -> None:
    """What `-o process.user=NAME`, `-o process.landlock=BOOL` and
    `-o process.seccomp=BOOL` ask for, in the order the module docstring gives
    (setuid is among the calls the filter refuses; the rules must be gathered
    with root's right to open every path)."""
    user = config.get("process.user")
    lib = load_libseccomp() if config.get_bool("process.seccomp", True) else None
    try:
        ruleset = landlock_rules(config)
    except OSError as exc:
        raise ConfigError(f"process.landlock: {exc.strerror or exc}") from None
    if ruleset is None and lib is not None and any(_served.values()):
        raise ConfigError("virtio-9p: a writable share needs Landlock to say where the "
                          "seccomp filter may let files change: use ro, or run with "
                          "process.landlock=true on a kernel with Landlock, or "
                          "process.seccomp=false")
    if user is not None:
        if not user:
            raise ConfigError("process.user: empty user name")
        drop_privileges(user)
    if ruleset is not None:
        try:
            _enforce_landlock(ruleset)
        except OSError as exc:
            raise ConfigError(f"process.landlock: {exc.strerror or exc}") from None
    if lib is not None:
        try:
            install_seccomp(uses_user_networking(config), lib,
                            files_changed=ruleset is not None,
                            pinning=pins_vcpus(config), outgoing_tcp=may_migrate(config))
        except OSError as exc:
            raise ConfigError(f"process.seccomp: {exc.strerror or exc}") from None


def uses_user_networking(config: Config) -> bool:
    """Whether a virtio-net device has the slirp backend (pci.0.SLOT.FUNC.backend)."""
    return any(key.endswith(".backend") and value == "slirp"
               for key, value in config.subtree("pci").items())


def may_migrate(config: Config) -> bool:
    """Whether the VM may migrate to another host (it has migration.key)."""
    return bool(config.get("migration.key"))


def pins_vcpus(config: Config) -> bool:
    """Whether a vCPU thread is to pin itself to host CPUs (vcpu.N.cpuset, -p)."""
    return any(key.endswith(".cpuset") for key in config.subtree("vcpu"))
