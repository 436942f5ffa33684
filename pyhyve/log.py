"""pyhyve's loggers: the standard library's, imported once there is
something to log.

Importing logging costs 7 to 8 ms (it brings re, traceback, tokenize and
string), a sixth of the pyhyve command's start-up, while a VM that runs
cleanly at the default level logs nothing at all.  So pyhyve's modules take
their loggers from `getLogger` here: a stand-in that imports logging, and
becomes the real logger of the same name, at its first record that could be
shown, or at its first record at all where logging is loaded already (a
program that set logging up, pytest).

While logging is not loaded nobody can have configured it, so logging's own
default decides: records below `threshold` (WARNING, or what the pyhyve
command was told: `set_threshold`) would go nowhere and are dropped without
loading it.  What must happen when it loads (the pyhyve command's handler) is
given to `on_load`.

Threads: any thread may be the one that loads logging (the import system
does it once); the on_load callbacks run once, and a record another thread
hands on meanwhile waits for them.  A process about to become a user that
may not read Python's files must load logging first (`load()`;
sandbox.drop_privileges does).
"""

import sys
import threading

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

_threshold = WARNING
_callbacks: list = []           # on_load's, until logging loads
_loading = threading.RLock()    # held while the callbacks run: a record waits for them


def set_threshold(level: int) -> None:
    """Records below LEVEL are dropped while logging is not loaded."""
    global _threshold
    _threshold = level


def on_load(callback) -> None:
    """CALLBACK(logging) once logging is loaded: now if it is already."""
    with _loading:
        _callbacks.append(callback)
        if "logging" not in sys.modules:
            return
    load()                          # it loaded other than through a stand-in


def cancel(callback) -> None:
    """Forget a callback on_load holds that has not run yet."""
    with _loading:
        if callback in _callbacks:
            _callbacks.remove(callback)


def load():
    """Python's logging module, imported if need be, once the callbacks
    waiting for it have run (in another thread too: this waits for them)."""
    import logging
    with _loading:
        while _callbacks:
            _callbacks.pop(0)(logging)
    return logging


def getLogger(name: str) -> "Logger":
    """The stand-in for logging.getLogger(NAME)."""
    return Logger(name)


class Logger:
    """logging.Logger's API for a logger not yet made.  Its first record that
    logging would handle makes the real logger and puts the real logger's
    methods on this object, so later calls go straight to them."""

    _METHODS = ("debug", "info", "warning", "error", "exception", "critical", "log",
                "isEnabledFor")

    def __init__(self, name: str):
        self.name = name

    def _real(self):
        real = load().getLogger(self.name)
        for method in self._METHODS:
            setattr(self, method, getattr(real, method))
        return real

    def _handle(self, level: int, method: str, args, kwargs) -> None:
        """The real logger's METHOD(*ARGS, **KWARGS), unless logging is not
        loaded and LEVEL is below the threshold."""
        if level < _threshold and "logging" not in sys.modules:
            return
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 2    # the caller's line
        getattr(self._real(), method)(*args, **kwargs)

    def debug(self, msg, *args, **kwargs) -> None:
        self._handle(DEBUG, "debug", (msg, *args), kwargs)

    def info(self, msg, *args, **kwargs) -> None:
        self._handle(INFO, "info", (msg, *args), kwargs)

    def warning(self, msg, *args, **kwargs) -> None:
        self._handle(WARNING, "warning", (msg, *args), kwargs)

    def error(self, msg, *args, **kwargs) -> None:
        self._handle(ERROR, "error", (msg, *args), kwargs)

    def exception(self, msg, *args, **kwargs) -> None:
        self._handle(ERROR, "exception", (msg, *args), kwargs)

    def critical(self, msg, *args, **kwargs) -> None:
        self._handle(CRITICAL, "critical", (msg, *args), kwargs)

    def log(self, level: int, msg, *args, **kwargs) -> None:
        self._handle(level, "log", (level, msg, *args), kwargs)

    def isEnabledFor(self, level: int) -> bool:
        if "logging" not in sys.modules:
            return level >= _threshold
        return self._real().isEnabledFor(level)

    def __getattr__(self, attribute: str):
        """The rest of logging.Logger's API (handlers, setLevel ...) is the real one's."""
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self._real(), attribute)

    def __repr__(self) -> str:
        return f"<pyhyve.log.Logger {self.name}>"
