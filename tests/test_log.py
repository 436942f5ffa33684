"""pyhyve.log: loggers that load Python's logging module only for a record
that could be shown.  What happens before logging is loaded runs in a child
interpreter (pytest has loaded logging in this one); what happens once it is
loaded, here."""

import logging
import subprocess
import sys

import pytest

from guestrun import REPO
from pyhyve import log
from pyhyve.record import record


def run_child(code: str, *options: str) -> list[str]:
    result = subprocess.run([sys.executable, *options, "-c", code], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_records_below_the_threshold_are_dropped_without_loading_logging():
    lines = run_child("""
import sys
from pyhyve import log
logger = log.getLogger("pyhyve.test")
logger.debug("dropped %d", 1)
logger.info("dropped")
print("logging" in sys.modules, logger.isEnabledFor(log.INFO), logger.isEnabledFor(log.WARNING))
log.set_threshold(log.ERROR)
logger.warning("dropped too")
print("logging" in sys.modules, logger.isEnabledFor(log.WARNING))
""")
    assert lines == ["False False True", "False False"]


def test_the_first_record_shown_loads_logging_and_runs_on_load_once():
    lines = run_child("""
import sys
from pyhyve import log
loads = []
def configure(logging):
    loads.append(logging.__name__)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(funcName)s %(message)s"))
    logging.getLogger().addHandler(handler)
log.on_load(configure)
logger = log.getLogger("pyhyve.test")
def caller():
    logger.warning("shown %s", "once")
    logger.warning("and again")
caller()
import logging
print("after", loads, logger.warning == logging.getLogger("pyhyve.test").warning)
other = log.getLogger("pyhyve.other")
def failing():
    try:
        1 / 0
    except ZeroDivisionError:
        other.exception("it failed")
failing()
log.on_load(lambda logging: print("late callback runs at once"))
""")
    assert lines[:3] == ["pyhyve.test WARNING caller shown once",
                         "pyhyve.test WARNING caller and again",
                         "after ['logging'] True"]
    assert lines[3] == "pyhyve.other ERROR failing it failed"
    assert lines[4] == "Traceback (most recent call last):"
    assert lines[-2:] == ["ZeroDivisionError: division by zero", "late callback runs at once"]


def test_a_record_from_another_thread_waits_for_the_callbacks():
    """While one thread's record runs the on_load callbacks (which install the
    handler), another thread's record waits for them rather than reaching
    logging before its handler is there."""
    lines = run_child("""
import sys, threading, time
from pyhyve import log
started, release = threading.Event(), threading.Event()
def configure(logging):
    started.set()
    release.wait(10)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("handled %(message)s"))
    logging.getLogger().addHandler(handler)
log.on_load(configure)
first = threading.Thread(target=lambda: log.getLogger("a").warning("first"))
first.start()
started.wait(10)
second = threading.Thread(target=lambda: log.getLogger("b").warning("second"))
second.start()
time.sleep(0.2)
release.set()
first.join()
second.join()
""")
    assert sorted(lines) == ["handled first", "handled second"]


def test_a_lower_threshold_loads_logging_for_info():
    lines = run_child("""
import sys
from pyhyve import log
log.set_threshold(log.INFO)
log.on_load(lambda logging: logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                                                format="%(levelname)s %(funcName)s %(message)s"))
log.getLogger("pyhyve.test").log(log.INFO, "reported %d", 7)
print("logging" in sys.modules)
""")
    assert lines == ["INFO <module> reported 7", "True"]


def test_with_logging_loaded_its_own_levels_decide(caplog):
    """Here pytest has loaded logging: a stand-in hands every record on, and
    the level set through logging (caplog) is what counts."""
    logger = log.getLogger("pyhyve.test-loaded")
    with caplog.at_level(logging.DEBUG, logger="pyhyve.test-loaded"):
        logger.debug("below warning, %s", "kept")
        assert logger.isEnabledFor(logging.DEBUG)
    assert [(r.levelname, r.getMessage(), r.funcName) for r in caplog.records] == [
        ("DEBUG", "below warning, kept", "test_with_logging_loaded_its_own_levels_decide")]
    assert logger.handlers is logging.getLogger("pyhyve.test-loaded").handlers


def test_a_cancelled_callback_never_runs():
    lines = run_child("""
from pyhyve import log
def noisy(logging):
    print("ran")
log.on_load(noisy)
log.cancel(noisy)
log.load()
print("loaded")
""")
    assert lines == ["loaded"]


@record
class Topology:
    """A record for the test."""
    sockets: int
    cores: int = 1
    threads: int = 2

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores * self.threads


def test_record_is_a_named_tuple_with_defaults_methods_and_docstring():
    topology = Topology(2, cores=3)
    assert topology == (2, 3, 2) and isinstance(topology, tuple)
    assert topology.cpus == 12
    assert Topology._fields == ("sockets", "cores", "threads")
    assert topology._replace(threads=1) == Topology(2, 3, 1)
    assert repr(topology) == "Topology(sockets=2, cores=3, threads=2)"
    assert Topology.__doc__ == "A record for the test."
    assert Topology.__module__ == __name__
    with pytest.raises(AttributeError):
        topology.sockets = 4
    assert not hasattr(topology, "__dict__")


def test_record_refuses_a_field_without_default_after_one_with():
    with pytest.raises(TypeError, match="^Bad.second: a field without a default follows "
                                        "one with a default$"):
        @record
        class Bad:
            first: int = 0
            second: int
