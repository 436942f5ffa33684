"""What is installed beside the code: bash completion and the example systemd
unit, driven by bash and by pyhyve itself so that they cannot drift from the
options they name."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pyhyve.ctl import socket_directory

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def commands_on_path(tmp_path) -> dict:
    """An environment whose PATH finds `pyhyve` and `pyhyvectl` as installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, module in (("pyhyve", "pyhyve"), ("pyhyvectl", "pyhyve.ctlclient")):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\nexec {sys.executable} -m {module} \"$@\"\n")
        script.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(REPO))


def complete(env: dict, command: str, line: str) -> list[str]:
    """What bash's completion function for COMMAND offers at the end of LINE."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    script = (f"source {REPO / 'completions' / command}\n"
              f"COMP_WORDS=({' '.join(shlex.quote(word) for word in words)})\n"
              f"COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}\n"
              f"_{command}\n"
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_pyhyve_completes_emulations_keys_and_options(commands_on_path):
    assert complete(commands_on_path, "pyhyve", "pyhyve -s 3,virtio-b") == ["3,virtio-blk"]
    assert "memory.size=" in complete(commands_on_path, "pyhyve", "pyhyve -o mem")
    assert "process.landlock=" in complete(commands_on_path, "pyhyve", "pyhyve -o process.")
    assert complete(commands_on_path, "pyhyve", "pyhyve --ver") == ["--version"]


def test_completion_offers_every_option_of_the_usage():
    """Each option letter `pyhyve -h` shows is offered after a '-'."""
    usage = subprocess.run([sys.executable, "-m", "pyhyve", "-h"], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
    letters = {word[1] for line in usage.splitlines() for word in line.split()
               if len(word) >= 2 and word[0] == "-" and word[1].isalpha()
               and (len(word) == 2 or not word[2].isalpha())}
    offered = (REPO / "completions" / "pyhyve").read_text()
    assert letters and {letter for letter in letters if f"-{letter} " not in offered
                        and f"-{letter}\n" not in offered} == set()


def test_pyhyvectl_completes_options_and_running_vm_names(commands_on_path):
    assert "--powerdown" in complete(commands_on_path, "pyhyvectl", "pyhyvectl --pow")
    assert "--checkpoint=" in complete(commands_on_path, "pyhyvectl", "pyhyvectl --check")
    directory = Path(socket_directory())
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"completion-test-{os.getpid()}"
    (directory / f"{name}.sock").touch()
    try:
        offered = complete(commands_on_path, "pyhyvectl", "pyhyvectl --vm=completion-test-")
    finally:
        (directory / f"{name}.sock").unlink()
    assert name in offered          # bash completes the part after '='


def test_example_systemd_unit_starts_a_vm_pyhyve_accepts(tmp_path, commands_on_path):
    """The unit's ExecStart, with its instance name and config file filled in,
    is a command line pyhyve accepts (config.dump parses it and stops)."""
    unit = (REPO / "contrib" / "pyhyve@.service").read_text()
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines()
                      if line.startswith("ExecStart="))
    config = tmp_path / "vm0.conf"
    config.write_text("memory.size=128M\ncpus=1\n")
    argv = shlex.split(exec_start.replace("/etc/pyhyve/%i.conf", str(config))
                       .replace("%i", "vm0"))
    assert Path(argv[0]).name == "pyhyve"
    result = subprocess.run(["pyhyve", *argv[1:-1], "-o", "config.dump=true", argv[-1]],
                            env=commands_on_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    dumped = set(result.stdout.splitlines())
    assert {"name=vm0", "poweroff.grace=60", "pidfile=/run/pyhyve/vm0.pid", "memory.size=128M",
            "cpus=1"} <= dumped


MANUALS = {"pyhyve.8": "pyhyve", "pyhyvectl.8": "pyhyve.ctlclient", "pyhyve_config.5": None}


def help_text(module: str) -> str:
    return subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO))).stdout


def rendered(page: str) -> str:
    """The page as man shows it, with man's own warnings turned into failures."""
    result = subprocess.run(["man", "--warnings", "-l", str(REPO / "man" / page)],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0"))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return re.sub(".\b", "", result.stdout)        # bold and underline by overstrike


@pytest.mark.parametrize("page", sorted(MANUALS))
def test_manual_page_renders_without_warnings(page):
    assert "SEE ALSO" in rendered(page)


def test_pyhyve_manual_names_every_option_of_the_usage():
    usage = help_text("pyhyve")
    letters = {word[1] for line in usage.splitlines() for word in line.split()
               if len(word) >= 2 and word[0] == "-" and word[1].isalpha()
               and (len(word) == 2 or not word[2].isalpha())}
    page = (REPO / "man" / "pyhyve.8").read_text()
    assert letters and sorted(letter for letter in letters if f"\\-{letter}" not in page) == []


def test_pyhyvectl_manual_names_every_long_option_of_the_usage():
    usage = help_text("pyhyve.ctlclient")
    options = set(re.findall(r"--([a-z][a-z-]*[a-z])", usage)) - {"get-REG", "set-REG"}
    page = (REPO / "man" / "pyhyvectl.8").read_text().replace("\\-", "-")
    assert options and sorted(option for option in options
                              if f"--{option}" not in page
                              and not option.startswith(("get-", "set-"))) == []


def config_manual() -> str:
    """pyhyve_config(5) as the code declares it: every config key and every
    emulation's options, with the words they carry in `-o help` and `-s help`."""
    from pyhyve import configkeys
    from pyhyve.pci import emulations

    def roff(text: str) -> str:
        return text.replace("\\", "\\e").replace("-", "\\-")
    lines = (REPO / "man" / "pyhyve_config.5.head").read_text().splitlines()
    for key, meaning in configkeys.KEYS.items():
        lines += [".TP", f".B {roff(key)}", roff(meaning)]
    lines += (REPO / "man" / "pyhyve_config.5.devices").read_text().splitlines()
    for name, emulation in sorted(emulations().items()):
        lines.append(f".SS {name}")
        if emulation.__doc__:
            lines.append(roff(emulation.__doc__.strip().splitlines()[0]))
        for option in emulation.options:
            lines += [".TP", f".B {roff(option.name)}", roff(option.help)]
    lines += [".SH SEE ALSO", ".BR pyhyve (8),", ".BR pyhyvectl (8),", ".BR bhyve_config (5)"]
    return "\n".join(lines) + "\n"


def test_config_manual_is_every_key_and_device_option():
    """Regenerate with `python tests/test_packaging.py` after changing a key."""
    assert (REPO / "man" / "pyhyve_config.5").read_text() == config_manual()


def test_installed_files_exist():
    """pyproject's data-files (man pages, completions, the unit) name real files."""
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    data_files = project["tool"]["setuptools"]["data-files"]
    listed = [path for paths in data_files.values() for path in paths]
    assert {f"man/{page}" for page in MANUALS} <= set(listed)
    assert [path for path in listed if not (REPO / path).is_file()] == []


if __name__ == "__main__":
    (REPO / "man" / "pyhyve_config.5").write_text(config_manual())
