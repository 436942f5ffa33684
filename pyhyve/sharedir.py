"""A host directory shared with a guest: every name the guest gives is resolved
beneath it, one component at a time, and no symbolic link is ever followed.

The 9P server (pyhyve.virtio.ninep) holds an O_PATH descriptor for each
object the guest has walked to, and acts on the object through that
descriptor, never through a path string: a rename, or a directory swapped
for a symbolic link between a walk and an open, cannot send an operation
outside the share.  The rules it keeps, all here:

- A name from the guest is one component: not empty, no '/' or NUL, at most
  NAME_MAX bytes (check_name()); '.' and '..' are the caller's to handle.
- A component is opened relative to its directory's descriptor with openat2
  (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) where the
  kernel has it (Linux 5.6) and seccomp allows it, else openat; always
  with O_NOFOLLOW, so a
  trailing symbolic link is opened as itself (O_PATH) or refused (ELOOP).
  Symbolic links the guest creates are data: readlink reads them, nothing
  resolves them.
- An object already open as O_PATH is reached again through its own
  descriptor: /proc/self/fd/N for an open, a chmod or a truncate (the magic
  link names that inode, whatever its path is now; it refuses (ELOOP) to open
  a symbolic link), and *at(fd, "", AT_EMPTY_PATH) for chown, times and
  link, which act on a symbolic link itself.

Failures are OSError with the errno the guest should see.
"""

import ctypes
import errno
import os
import stat

NAME_MAX = 255
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    """struct open_how (openat2(2))."""
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# openat2 until the kernel says it has none (ENOSYS).  A seccomp filter that
# refuses it (EPERM: pyhyve's allows it only with Landlock, as its flags
# cannot be filtered, and never on a vCPU thread) sends that one call to
# openat, which the filter judges by its flags.
_have_openat2 = True


def check_name(name: bytes) -> None:
    """A single path component, as the guest may give one."""
    if not name or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "not a file name")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name too long")


def open_beneath(dir_fd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """Open NAME (one checked component, not '..') in the directory DIR_FD,
    without following a symbolic link anywhere."""
    global _have_openat2
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _have_openat2:
        how = _OpenHow(flags=flags, mode=mode if flags & os.O_CREAT else 0,
                       resolve=_RESOLVE)
        fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), name,
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code == errno.ENOSYS:
            _have_openat2 = False
        elif code != errno.EPERM:
            raise OSError(code, os.strerror(code))
    return os.open(name, flags, mode, dir_fd=dir_fd)


def proc_path(fd: int) -> str:
    """The magic link that reaches FD's own inode."""
    return f"/proc/self/fd/{fd}"


def reopen(fd: int, flags: int) -> int:
    """A new open of the object O_PATH descriptor FD holds (not a symbolic link:
    ELOOP), with FLAGS."""
    return os.open(proc_path(fd), flags | os.O_CLOEXEC | os.O_NOCTTY)


def chown(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): a symbolic link's own owner too; -1 keeps one."""
    if _libc.fchownat(fd, b"", ctypes.c_uint(uid & 0xFFFFFFFF),
                      ctypes.c_uint(gid & 0xFFFFFFFF), AT_EMPTY_PATH) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def set_times(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat on the object itself; (0, UTIME_NOW) or (0, UTIME_OMIT) as the
    kernel takes them."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(fd, b"", times, AT_EMPTY_PATH) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def link(fd: int, dir_fd: int, name: bytes) -> None:
    """A new name NAME in DIR_FD for the object FD holds.  AT_EMPTY_PATH needs
    CAP_DAC_READ_SEARCH on older kernels (ENOENT without); the magic link then
    does it for anything but a symbolic link."""
    if _libc.linkat(fd, b"", dir_fd, name, AT_EMPTY_PATH) == 0:
        return
    code = ctypes.get_errno()
    if code != errno.ENOENT or stat.S_ISLNK(os.fstat(fd).st_mode):
        raise OSError(code, os.strerror(code))
    os.link(proc_path(fd), name, dst_dir_fd=dir_fd, follow_symlinks=True)


def location(root_fd: int, fd: int) -> list[bytes] | None:
    """FD's path as components below ROOT_FD's, as the kernel names both now;
    None when it is not below (moved out by the host, or deleted).  Only a
    hint: whoever walks it again checks that it finds the same inode."""
    root = os.readlink(os.fsencode(proc_path(root_fd))).rstrip(b"/")
    here = os.readlink(os.fsencode(proc_path(fd)))
    if here == root or here == root + b"/":
        return []
    if not here.startswith(root + b"/"):
        return None
    return here[len(root) + 1:].split(b"/")


def walk(root_fd: int, components: list[bytes]) -> int:
    """An O_PATH descriptor for ROOT_FD's directory COMPONENTS (each checked)."""
    fd = os.dup(root_fd)
    try:
        for name in components:
            check_name(name)
            if name in (b".", b".."):
                raise OSError(errno.ENOENT, "not a plain path")
            next_fd = open_beneath(fd, name, os.O_PATH | os.O_DIRECTORY)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd
