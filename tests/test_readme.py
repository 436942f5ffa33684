"""The README's set-up commands and .ci/run must not drift apart."""

import re

from guestrun import REPO
from pyhyve.guestkit import source


def _shell_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    blocks = _shell_blocks((REPO / "README.md").read_text())
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"# BEGIN TEST COMMAND\n(.*?)\n# END TEST COMMAND", ci, re.S).group(1)
    assert command.strip() in blocks
    assert "pytest" in command


def _installed(command: str) -> set[str]:
    return set(re.search(r"apt-get install -y ([^&]*)", command).group(1).split())


def test_quick_start_installs_what_the_guest_kit_needs_and_runs_it():
    """The first command boots Linux through pyhyve-guest; it and the test
    command install every package the source kernel's recipe asks for."""
    blocks = _shell_blocks((REPO / "README.md").read_text())
    first = blocks[0]
    assert first.endswith("/opt/pyhyve/bin/pip install . && /opt/pyhyve/bin/pyhyve-guest run")
    needed = set(source.PACKAGES.split())
    assert needed <= _installed(first)
    ci = (REPO / ".ci" / "run").read_text()
    assert needed <= _installed(ci)
