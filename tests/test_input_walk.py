"""Every config key pyhyve reads and every option each PCI emulation declares,
given malformed, huge and binary values: pyhyve either runs the guest (a
value it may take: hello16 prints and powers off) or says in one line why
not, with exit status 4 and never a traceback.  The lists are read from
pyhyve itself (configkeys.KEYS, each emulation's `options`), so a key or an
option added later is walked too.

Values arrive as the command line gives them: `-o key=value` for config keys,
`pci.0.5.0.OPTION` under the emulation for device options.  Each run has its
own control socket and working directory, so nothing lands outside tmp_path.
The runs are forked from a `pyhyve --serve` server (each still its own pyhyve
process with its own exit status and stderr), which spares a thousand
interpreter starts; test_forkserver.py shows a served VM is the command's."""

import os
import selectors
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from build import build_rom
from guestrun import start_fork_server
from pyhyve import forkserver
from pyhyve.configkeys import KEYS
from pyhyve.pci import emulations
from pyhyve.vcpu import ExitStatus

pytestmark = pytest.mark.usefixtures("needs_kvm")

VALUES = {
    "empty": "",
    "huge": "9" * 400,
    "long": "x" * 5000,
    "binary": os.fsdecode(b"\xff\xfe\x01\x7f"),     # bytes a command line can carry
    "negative": "-1",
    "punctuation": ",=,:;/../",
}
# Keys the walk leaves out, and why.
SKIPPED = {
    "name": "the positional VM name is walked as one argument below",
    "restore.path": "test_snapshot and test_user_input feed -r bad files",
    "config.dump": "prints the config and exits 0 for any true value",
    "pci.N.N.N.device": "an emulation name: walked per emulation below",
}


def config_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for key in sorted(set(KEYS) - set(SKIPPED)):
        concrete = key.replace("N", "1") if not key.startswith("pci.") else key
        for label, value in VALUES.items():
            cases.append((f"{concrete}={label}", ["-o", f"{concrete}={value}"]))
    for label, value in VALUES.items():
        cases.append((f"vm-name={label}", ["name-is-positional", value]))
    return cases


def device_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for name, cls in sorted(emulations().items()):
        for option in cls.options:
            key = option.name.replace("N", "1")
            for label, value in VALUES.items():
                cases.append((f"{name}.{key}={label}",
                              ["-o", f"pci.0.5.0.device={name}", "-o", f"pci.0.5.0.{key}={value}"]))
        for label, value in VALUES.items():
            cases.append((f"-s 5,{name},{label}", ["-s", f"5,{name},{value}"]))
    return cases


CASE_TIMEOUT = 60               # seconds; hello16 powers off at once


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fork server for the walk's runs; its socket path."""
    path = tmp_path_factory.mktemp("walk-serve") / "serve.sock"
    proc = start_fork_server(path)
    yield str(path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def run_case(server: str, work: Path, rom, index: int, args: list[str]):
    """One `pyhyve ARGS` run, forked by the server: its exit status and stderr."""
    work = work / str(index)
    work.mkdir()
    name = f"walk{index}"
    if args[0] == "name-is-positional":
        args, name = [], args[1]
    command = ["-l", f"bootrom,{rom}", "-o", f"control.socket={work / 'ctl.sock'}",
               "-o", "process.seccomp=false", *args]
    if not name.startswith("-"):
        command.append(name)
    with open(work / "stderr", "wb") as err, open(os.devnull, "wb") as null:
        vm = forkserver.start(server, command, stdin=null.fileno(), stdout=null.fileno(),
                              stderr=err.fileno(), cwd=str(work))
    with selectors.DefaultSelector() as selector:
        selector.register(vm, selectors.EVENT_READ)
        if not selector.select(CASE_TIMEOUT):
            os.kill(vm.pid, signal.SIGKILL)
    status = vm.wait()
    return SimpleNamespace(returncode=status,
                           stderr=(work / "stderr").read_text(errors="backslashreplace"))


def check(label: str, result) -> str | None:
    """What is wrong with one run, or None."""
    lines = result.stderr.splitlines()
    if "Traceback" in result.stderr:
        return f"{label}: traceback\n{result.stderr}"
    if result.returncode == ExitStatus.ERROR:
        errors = [line for line in lines if "WARNING" not in line]
        if len(errors) != 1 or not errors[0].startswith("pyhyve: "):
            return f"{label}: exit 4 without exactly one error line: {result.stderr!r}"
        return None
    if result.returncode != ExitStatus.POWEROFF:
        return f"{label}: exit status {result.returncode}: {result.stderr!r}"
    return None


@pytest.mark.parametrize("cases", [config_cases, device_cases], ids=["keys", "devices"])
def test_every_key_and_option_takes_bad_values_in_one_line(server, tmp_path, cases):
    rom = build_rom("hello16")
    walk = cases()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda item: run_case(server, tmp_path, rom, *item),
                                enumerate(args for _, args in walk)))
    problems = [problem for (label, _), result in zip(walk, results)
                if (problem := check(label, result))]
    assert not problems, "\n".join(problems[:10])
    assert len(walk) > 100              # the walk found the keys and options
