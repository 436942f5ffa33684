"""Config keys and device options are declared once, with their meaning, and
what a user mistypes is named with its nearest known spelling."""

import re

import pytest

from guestrun import REPO, run_pyhyve, run_rom
from pyhyve import configkeys
from pyhyve.cli import FLAG_KEYS, VALUE_KEYS
from pyhyve.config import ConfigError
from pyhyve.pci import emulations
from pyhyve.pci.options import check


def _literal_keys_read() -> set[str]:
    """Every literal key a `config.get*()` call in pyhyve reads, and each boot
    method's `config_key`."""
    keys = set()
    for path in (REPO / "pyhyve").rglob("*.py"):
        text = path.read_text()
        keys |= set(re.findall(r"config\.(?:get|get_bool|get_int|subtree)\(\s*\"([^\"{]+)\"",
                               text))
        keys |= set(re.findall(r"^\s+config_key = \"([^\"]+)\"", text, re.M))
    return keys


def test_every_key_pyhyve_reads_or_the_command_line_sets_is_documented():
    device_options = {option.name for cls in emulations().values() for option in cls.options}
    read = _literal_keys_read() - device_options    # a device's own Config(options)
    assert {"memory.size", "cpus", "kexec.kernel", "process.user"} <= read  # the scan works
    read -= {"pci", "pci.0", "fwcfg.file", "vcpu"}  # subtrees, whose keys are listed
    written = {key for key, _ in FLAG_KEYS.values()} | set(VALUE_KEYS.values())
    undocumented = sorted(key for key in read | written if not configkeys.is_known(key))
    assert not undocumented


def test_unknown_keys_are_named_with_the_nearest_known_one():
    keys = ["memroy.size", "memory.size", "pci.0.3.0.path", "pci.0.3.0.device", "lpc.com2.path",
            "fwcfg.file.3", "zzz"]
    assert configkeys.unknown_keys(keys) == [("memroy.size", "memory.size"), ("zzz", None)]


def test_a_mistyped_key_warns_and_the_vm_still_runs(tmp_path):
    """bhyve ignores unknown keys; pyhyve does too, after saying so once."""
    result = run_rom(tmp_path, "halt", "-o", "memroy.size=64M")
    assert result.status == 2, result.stderr            # the guest ran to its halt
    assert "unknown config key 'memroy.size' (did you mean 'memory.size'?); ignored" in \
        result.stderr


def test_o_help_lists_every_key():
    result = run_pyhyve(["-o", "help"], timeout=60)
    assert result.returncode == 0
    for key, meaning in configkeys.KEYS.items():
        assert re.search(rf"^{re.escape(key)} +{re.escape(meaning)}$", result.stdout, re.M)


def test_s_help_lists_every_option_of_every_emulation():
    """Each emulation's line has its whole summary (virtio-net's second line,
    what every backend takes, was cut off), and under it one line for each
    option it declares and for those every emulation takes."""
    from pyhyve.pci.options import COMMON
    result = run_pyhyve(["-s", "help"], timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    blocks = re.split(r"^(?=\S)", result.stdout, flags=re.M)[1:]
    listed = {block.split()[0]: block for block in blocks}
    assert set(listed) == set(emulations())
    for name, cls in emulations().items():
        summary = " ".join(cls.__doc__.strip().split("\n\n")[0].split())
        first, *option_lines = listed[name].splitlines()
        assert first == f"{name:16} {summary}"
        named = [line.split()[0] for line in option_lines]
        for option in (*cls.options, *COMMON):
            spelling = f"{option.name}[=" if option.kind == "flag" else f"{option.name}=<"
            assert sum(n.startswith(spelling) for n in named) == 1, (name, option.name)
            assert any(line.endswith(f"  {option.help}") for line in option_lines)
    net = listed["virtio-net"]
    assert "each with [,mac=xx:xx:xx:xx:xx:xx][,mtu=N]" in net.splitlines()[0]
    assert re.search(r"^ +mac=<text>  MAC address", net, re.M)
    assert re.search(r"^ +mtu=<number, default 1500>  MTU", net, re.M)


@pytest.mark.parametrize("given, message", [
    ({"nocach": "true"}, "virtio-blk: unknown option 'nocach' (did you mean 'nocache'?)"),
    ({"ro": "maybe"}, "virtio-blk: ro: 'maybe' is not a boolean"),
    ({"zzz": "1"}, "virtio-blk: unknown option 'zzz' (it takes path, ro, nocache"),
])
def test_device_options_are_checked_against_the_declaration(given, message):
    blk = emulations()["virtio-blk"]
    with pytest.raises(ConfigError) as raised:
        check("virtio-blk", blk.options, {"path": "/x", **given})
    assert str(raised.value).startswith(message)


def test_numbered_options_match_numbers_only():
    console = emulations()["virtio-console"]
    check("virtio-console", console.options, {"port.0.name": "a", "port.12.path": "stdio"})
    with pytest.raises(ConfigError, match="unknown option 'port.x.path'"):
        check("virtio-console", console.options, {"port.x.path": "stdio"})
    with pytest.raises(ConfigError, match="virtio-rnd: unknown option 'a' \\(it takes rom\\)"):
        check("virtio-rnd", emulations()["virtio-rnd"].options, {"a": "1"})


def test_help_into_a_closed_pipe_ends_quietly():
    """`pyhyve -s help | true`: the reader is gone before pyhyve writes, and
    pyhyve says nothing about it (no BrokenPipeError traceback)."""
    import subprocess
    import sys
    result = subprocess.run(f"{sys.executable} -m pyhyve -s help | true", shell=True,
                            capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.stderr == ""
