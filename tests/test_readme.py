"""The README's set-up commands and .ci/run must not drift apart."""

import re

from guestrun import REPO


def _shell_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    blocks = _shell_blocks((REPO / "README.md").read_text())
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"# BEGIN TEST COMMAND\n(.*?)\n# END TEST COMMAND", ci, re.S).group(1)
    assert command.strip() in blocks
    assert "pytest" in command


def test_quick_start_runs_pyhyve_on_seabios():
    first = _shell_blocks((REPO / "README.md").read_text())[0]
    assert "apt-get install" in first and "seabios" in first
    assert "pyhyve -m 128M -l bootrom,/usr/share/seabios/bios.bin -l com1,stdio" in first
