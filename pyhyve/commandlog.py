"""The `pyhyve` command's log: where records of every logger go, and from
which level.

Lines go to stderr, or to `logging.file`, each stamped with the date and time
to the millisecond, from WARNING up until the config says otherwise
(`logging.level`, -v).  Python's logging module is set up only once something
loads it (pyhyve.log: a run that logs nothing never does), but the log file
is opened at once, before any privilege drop.  A write to the file that fails
(a full disk) says so in one line on stderr, once, not with logging's
traceback for every record.  On stderr, records marked "printed"
(VirtualMachine.fatal) are left out: their line is there already.  close()
takes it all back (main() may run inside another program, a test).
"""

import errno
import os
import sys

from . import log
from .config import Config, ConfigError

FORMAT = "%(asctime)s.%(msecs)03d pyhyve: %(name)s: %(levelname)s: %(message)s"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
LEVELS = {"debug": log.DEBUG, "info": log.INFO, "warning": log.WARNING, "error": log.ERROR}


class CommandLog:
    def __init__(self):
        self.level = log.WARNING
        self.path: str | None = None
        self.stream = None              # the log file, once opened
        self.write_failed = False
        self.root = self.handler = None  # once logging is loaded
        self.saved_level = None
        log.set_threshold(self.level)
        log.on_load(self._install)

    def configure(self, config: Config) -> None:
        """logging.level and logging.file; ConfigError for a bad level or a file
        that cannot be opened."""
        level = config.get("logging.level", "warning")
        if level.lower() not in LEVELS:
            raise ConfigError(f"logging.level: '{level}' is not one of {', '.join(LEVELS)}")
        path = config.get("logging.file")
        if path is not None:
            self.stream, self.path = _open_log_file(path), path
        self.level = LEVELS[level.lower()]
        log.set_threshold(self.level)
        if self.root is not None:
            self._uninstall()
            self._install(log.load())
        elif self.level < log.WARNING:
            log.load()                  # -v: pyhyve reports as it goes

    def _install(self, logging) -> None:
        handler = logging.StreamHandler(self.stream or sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, TIME_FORMAT))
        if self.stream is None:
            handler.addFilter(lambda record: not getattr(record, "printed", False))
        else:
            handler.addFilter(lambda record: not self.write_failed)
            handler.handleError = self._file_write_failed
        self.root, self.handler = logging.getLogger(), handler
        self.saved_level = self.root.level
        self.root.addHandler(handler)
        self.root.setLevel(self.level)

    def _file_write_failed(self, record) -> None:
        self.write_failed = True
        error = sys.exc_info()[1]
        print(f"pyhyve: cannot write log file {self.path}: "
              f"{getattr(error, 'strerror', None) or error}; no more log lines go there",
              file=sys.stderr)

    def _uninstall(self) -> None:
        self.root.removeHandler(self.handler)
        self.handler.close()
        self.root.setLevel(self.saved_level)

    def close(self) -> None:
        log.cancel(self._install)
        log.set_threshold(log.WARNING)
        if self.root is not None:
            self._uninstall()
            self.root = self.handler = None
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError:             # what a failed write left to flush; said already
                pass


def _open_log_file(path: str):
    """PATH opened to append, created 0600 if missing; never through a symbolic
    link (one another user planted would aim a root process's log at any file)."""
    if not path:
        raise ConfigError("logging.file: empty path")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        why = ("it is a symbolic link (give the file's own path)"
               if exc.errno == errno.ELOOP else exc.strerror or str(exc))
        raise ConfigError(f"cannot open log file {path}: {why}") from None
    except ValueError as exc:           # a NUL in the path
        raise ConfigError(f"cannot open log file {path!r}: {exc}") from None
    return open(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
