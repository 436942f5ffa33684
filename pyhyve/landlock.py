"""Linux Landlock through ctypes: a thread gives up opening files by name,
except beneath the directories a ruleset names.

Landlock (Linux 5.13 and later, Documentation/userspace-api/landlock.rst) is
the unprivileged cousin of bhyve's Capsicum: descriptors already open keep
working, while open, create, rename and unlink by path are checked against the
rules.  A ruleset lists the rights it *handles*; whatever it handles and no
rule grants is refused (EACCES).  Each kernel release adds rights (the ABI
version), so a ruleset handles only those the running kernel knows.

Confinement is per thread: `restrict_self()` confines the calling thread and
the threads it starts later, not those already running (sandbox.py deals
with that).  It cannot be undone.
"""

import ctypes
import errno
import os
import stat

SYS_LANDLOCK_CREATE_RULESET = 444       # the same number on every architecture
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights, by the ABI version that brought them.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13             # ABI 2: link or rename across directories
TRUNCATE = 1 << 14          # ABI 3
IOCTL_DEV = 1 << 15         # ABI 5: ioctl on device files opened later
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1,
                    4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # all a file may take
# Network rights (ABI 4): TCP bind and connect.
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
# Scopes (ABI 6): abstract unix sockets and signals of processes outside the domain.
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    """struct landlock_ruleset_attr; older kernels take a prefix of it."""
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    """struct landlock_path_beneath_attr (packed: 12 bytes)."""
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"landlock: {os.strerror(code)}")
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is absent or turned off."""
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


class Ruleset:
    """The rules being gathered; `restrict_self()` puts them in force on the
    calling thread, and may be called again from other threads."""

    def __init__(self, abi: int, deny_tcp: bool = False, allow_tcp_connect: bool = False):
        """deny_tcp: refuse TCP bind and, unless allow_tcp_connect, connect."""
        self.abi = abi
        self.handled_fs = FS_RIGHTS_BY_ABI[min(abi, 5)]
        attr = _RulesetAttr(handled_access_fs=self.handled_fs)
        size = ctypes.sizeof(ctypes.c_uint64)
        if abi >= 4 and deny_tcp:
            attr.handled_access_net = NET_BIND_TCP | (0 if allow_tcp_connect
                                                      else NET_CONNECT_TCP)
            size = 2 * ctypes.sizeof(ctypes.c_uint64)
        if abi >= 6:
            attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            size = ctypes.sizeof(_RulesetAttr)
        self.fd = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                           ctypes.c_size_t(size), ctypes.c_uint32(0))

    def allow(self, path: str, rights: int) -> None:
        """Grant `rights` beneath PATH (or on it, a file: only file rights apply).
        OSError if PATH cannot be opened."""
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                rights &= FILE_RIGHTS
            rule = _PathBeneathAttr(allowed_access=rights & self.handled_fs, parent_fd=fd)
            _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(self.fd),
                     ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
        finally:
            os.close(fd)

    def restrict_self(self) -> None:
        """Confine the calling thread (and the threads it starts from now on).
        Landlock requires no_new_privs first, which is per thread too."""
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"no_new_privs: {os.strerror(code)}")
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(self.fd), ctypes.c_uint32(0))

    def close(self) -> None:
        os.close(self.fd)
