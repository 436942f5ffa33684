"""What a VM's run leaves out of its process (pyhyve.deferred, pyhyve.log,
pyhyve.record), and that it is all there once import_all has run, before
the process may lose the right to read Python's files."""

import ast
import subprocess
import sys

from build import build_rom
from guestrun import REPO

# Not imported by a VM that runs to its end untouched: logging and typing
# (together about 12 ms of a 40 ms start-up; log.py and record.py say why),
# the importlib package (pci/__init__.py), datetime (about a millisecond;
# devices/rtc.py counts days itself), and what only a request needs (json,
# about a millisecond, and pyhyve.deferred's others).
LEFT_OUT = ("logging", "typing", "dataclasses", "importlib", "datetime", "json", "base64",
            "termios", "tty", "contextvars", "pyhyve.block", "pyhyve.vnc.keysyms",
            "pyhyve.inputevents", "pyhyve.display.imagefile", "pyhyve.migration",
            "pyhyve.migstream")
# Modules whose functions serve requests while the VM runs, perhaps as
# another user by then (process.user).
REQUEST_SERVERS = ("ctl", "sockservice")


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
                base = ".".join(filter(None, ["pyhyve" if node.level else "", node.module]))
                if node.module is None:         # from . import name: NAME is a module
                    found.update(f"{base}.{alias.name}" for alias in node.names)
                else:
                    found.add(base)
    return found


def test_a_vm_runs_without_them_and_import_all_brings_every_late_import(needs_kvm, tmp_path):
    """A VM with a control socket runs to power-off as the pyhyve command runs
    it (without the site module, -S, which imports some of these itself
    under some installations), and none of LEFT_OUT is imported.  Then, after
    import_all, nothing a control request imports is missing: a VM that
    became nobody and a fork server's children import nothing more there.
    The QMP server's module is imported at start-up where a VM has one
    (cli.py), so its imports count only for its own requests."""
    control = set().union(*(late_imports(module) for module in REQUEST_SERVERS))
    qmp = late_imports("qmp")
    assert {"json", "pyhyve.snapshot", "pyhyve.display"} <= control    # the scan finds them
    rom = build_rom("exits", COUNT=1)
    result = subprocess.run([sys.executable, "-S", "-c", f"""
import sys
from pyhyve import cli
status = cli.main(["-l", "bootrom,{rom}", "-o", "control.socket={tmp_path}/ctl.sock",
                   "deferred"])
print(status, sorted(name for name in {LEFT_OUT!r} if name in sys.modules))
from pyhyve import deferred
deferred.import_all()
print(sorted(name for name in {sorted(control)!r} if name not in sys.modules))
import pyhyve.qmp
print(sorted(name for name in {sorted(qmp)!r} if name not in sys.modules))
print("logging" in sys.modules)
"""], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1 []", "[]", "[]", "True"]
