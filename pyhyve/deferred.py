"""What pyhyve imports where a feature is first used, not at start-up.

Every VM's process imports pyhyve.cli and pyhyve.vm and builds a VM, and each
module costs every VM's start (bench/startup.py, bench/density.py; about 2 ms
for these together).  What only a control request or a snapshot needs waits
for it: JSON (the control socket's lines, a snapshot's manifest), input
events, the PNG of a screendump and, for QMP's migrate, migration.  Logging
waits the same way (pyhyve.log).

Two kinds of process import it all ahead (`import_all`): one about to become
another user (sandbox.drop_privileges: that user may not be able to read
Python's files, as with an interpreter under /root), and the fork server
(pyhyve --serve), so that no child pays for it.  A module that imports one
inside a function names it in MODULES.  tests/test_deferred.py checks that a
VM's run leaves these out and that import_all covers every import inside the
request servers (ctl, qmp, sockservice); tests/test_sandbox.py sends
requests to a VM that became nobody.
"""

from . import log

MODULES = ("json", "pyhyve.snapshot", "pyhyve.inputevents", "pyhyve.display",
           "pyhyve.display.imagefile", "pyhyve.migration", "pyhyve.migstream")


def import_all() -> None:
    """Import every module of MODULES, and logging."""
    for name in MODULES:
        __import__(name)
    log.load()
