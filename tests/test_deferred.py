"""What a VM's start-up leaves out (pyhyve.deferred, pyhyve.log, pyhyve.record),
and that what it leaves out is all there before the process may lose the
right to read Python's files."""

import ast
import subprocess
import sys

from guestrun import REPO

from pyhyve import deferred

# Modules whose functions serve requests while the VM runs, perhaps as
# another user by then (process.user): each import inside them must be one
# that import_all makes.
REQUEST_SERVERS = ("ctl", "qmp", "sockservice")


def run_child(code: str) -> list[str]:
    """CODE's printed lines under this interpreter without the site module (-S),
    which imports some of these modules itself under some installations."""
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_importing_pyhyve_leaves_out_what_start_up_does_not_need():
    """logging and typing, together about 12 ms of a 40 ms start-up (log.py
    and record.py say why); the importlib package (pci/__init__.py); datetime,
    about a millisecond (devices/rtc.py counts days itself); and what only a
    request needs (deferred.MODULES, about 1.5 ms)."""
    costly = ("logging", "typing", "dataclasses", "importlib", "datetime", *deferred.MODULES)
    lines = run_child(f"""
import sys
before = set(sys.modules)
import pyhyve.cli, pyhyve.vm
print(sorted(name for name in {costly!r} if name in set(sys.modules) - before))
""")
    assert lines == ["[]"]


def late_imports(module: str) -> set[str]:
    """The modules that pyhyve/MODULE.py imports inside its functions, by full name."""
    tree = ast.parse((REPO / "pyhyve" / f"{module}.py").read_text())
    found = set()
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                package = "pyhyve" if node.level else ""
                base = ".".join(filter(None, [package, node.module]))
                if node.module is None:         # from . import name: NAME is a module
                    found.update(f"{base}.{alias.name}" for alias in node.names)
                else:
                    found.add(base)
    return found


def test_import_all_makes_every_late_import_of_the_request_servers():
    """After import_all, nothing a control or QMP request imports is missing:
    a VM that became nobody (tests/test_sandbox.py runs some as nobody) and a
    fork server's children import nothing more there.  The QMP server's own
    module is imported at start-up where a VM has one (cli.py), so its
    imports count only for its own requests."""
    control = late_imports("ctl") | late_imports("sockservice")
    qmp = late_imports("qmp")
    assert {"json", "pyhyve.snapshot", "pyhyve.display"} <= control    # the scan finds them
    lines = run_child(f"""
import sys
import pyhyve.cli, pyhyve.vm
from pyhyve import deferred
deferred.import_all()
print(sorted(name for name in {sorted(control)!r} if name not in sys.modules))
import pyhyve.qmp
print(sorted(name for name in {sorted(qmp)!r} if name not in sys.modules))
print("logging" in sys.modules)
""")
    assert lines == ["[]", "[]", "True"]
