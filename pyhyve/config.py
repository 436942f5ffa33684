"""bhyve's configuration tree: dotted keys with string values.

The command line, `-o key=value` and `-k FILE` (bhyve_config(5) lines) all
write into one tree, so a config file alone can describe a VM, and
`-o config.dump=1` prints what the VM would be built from.
"""

import os
import re
import stat


class ConfigError(Exception):
    """A configuration value a user gave is unusable; the message says which."""


CPU_SETSIZE = 1024              # glibc's: the host CPU numbers a cpuset can name
_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


MAX_CONFIG_FILE = 1 << 20


def read_user_file(path: str, what: str, limit: int, limit_is: str = "its limit") -> bytes:
    """A file the operator named (a config file, a kernel): a regular file of at
    most `limit` bytes (`limit_is` says what that is), else ConfigError saying
    why (never an endless read of a device such as /dev/zero)."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"{what} {path} is not a regular file")
            if info.st_size > limit:
                raise ConfigError(f"{what} {path} is {info.st_size} bytes, more than "
                                  f"{limit}, {limit_is}")
            data = file.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:                   # it grew while being read
        raise ConfigError(f"{what} {path} is more than {limit} bytes")
    return data


def write_user_file(path: str, chunks, mode: int = 0o600) -> None:
    """Write a file at a path the operator named (a snapshot, a pidfile) so that
    it appears whole or not at all: a fresh file beside it, made with O_EXCL
    and O_NOFOLLOW (a name another user planted is never reused or followed)
    and `mode` (less the umask, so never more), synced, then renamed over PATH.
    OSError if it cannot be, with nothing left behind.  Only os is used: this
    runs after a sandboxed VM dropped privileges (a checkpoint), when modules
    not yet imported may be unreadable."""
    directory, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    try:
        with open(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def parse_size(text: str, what: str = "size") -> int:
    """bhyve's memory sizes: K/M/G/T suffixes; a bare number below 1 MiB means MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"invalid {what} '{text}': expected a number with an "
                          "optional K, M, G or T suffix")
    number, suffix = int(match.group(1)), match.group(2).lower()
    if not suffix and number < (1 << 20):
        suffix = "m"
    return number * _SIZE_SUFFIX[suffix]


def parse_cpuset(key: str, text: str) -> set[int]:
    """bhyve's parse_cpuset: host CPU numbers and ranges, comma-separated (1, 0,2-3)."""
    cpus: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not match:
            raise ConfigError(f"{key}: invalid cpuset '{text}': expected host CPU numbers "
                              "and ranges, such as 1 or 0,2-3")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        if low > high:
            raise ConfigError(f"{key}: invalid host CPU range {low}-{high}")
        if high >= CPU_SETSIZE:
            raise ConfigError(f"{key}: host CPU {high} is outside 0..{CPU_SETSIZE - 1}")
        cpus.update(range(low, high + 1))
    return cpus


def format_cpus(cpus) -> str:
    """CPU numbers as the kernel's Cpus_allowed_list writes them: 0-3,6."""
    ranges, ordered = [], sorted(cpus)
    for cpu in ordered:
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{low}" if low == high else f"{low}-{high}" for low, high in ranges)


class Config:
    """A flat map of dotted keys to string values, printed as a tree."""

    def __init__(self, values: dict[str, str] | None = None):
        self._values: dict[str, str] = dict(values or {})

    def set(self, key: str, value: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key) or ".." in key \
                or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"invalid config key '{key}'")
        self._values[key] = str(value)

    def set_default(self, key: str, value: str) -> None:
        if key not in self._values:
            self.set(key, value)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._values.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def get_bool(self, key: str, default: bool = False) -> bool:
        value = self._values.get(key)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{key}: '{value}' is not a boolean (true or false)")

    def get_int(self, key: str, default: int, minimum: int | None = None,
                maximum: int | None = None) -> int:
        value = self._values.get(key)
        if value is None:
            return default
        try:
            number = int(value, 0)
        except ValueError:
            raise ConfigError(f"{key}: '{value}' is not a number") from None
        if (minimum is not None and number < minimum) or \
                (maximum is not None and number > maximum):
            raise ConfigError(f"{key}: {number} is outside {minimum}..{maximum}")
        return number

    def subtree(self, prefix: str) -> dict[str, str]:
        """Keys below `prefix.`, with the prefix removed."""
        start = prefix + "."
        return {k[len(start):]: v for k, v in self._values.items() if k.startswith(start)}

    def keys(self) -> list[str]:
        return list(self._values)

    def load_file(self, path: str) -> None:
        """Read bhyve_config(5) lines: key=value, '#' comments, blank lines."""
        try:
            lines = read_user_file(path, "config file", MAX_CONFIG_FILE).decode().splitlines()
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise ConfigError(f"{path}:{number}: expected key=value, got '{line}'")
            self.set(key.strip(), value.strip())

    def dump(self) -> str:
        """Every key as bhyve prints its tree for config.dump: full path=value, sorted."""
        return "\n".join(f"{key}={self._values[key]}" for key in sorted(self._values))
