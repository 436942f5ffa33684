"""The options a PCI emulation takes, declared once in its class.

    options = (Option("path", "path", None, "the disk image"),
               Option("ro", "flag", "false", "read-only"))

PciBus.add checks what `-s` or the config gave against the declaration
before the device sees it: an unknown option is an error naming the nearest
known one, a flag must be a boolean word and a number a number.  `-s help`
prints the declarations.  A name may hold N for any number (`port.N.path`).
"""

import re

from ..config import ConfigError, Config
from ..record import record

KINDS = ("text", "path", "flag", "number")


@record
class Option:
    name: str
    kind: str                   # one of KINDS
    default: str | None         # None: no default (absent means "not given")
    help: str


# every emulation takes these (PciBus.add handles them)
COMMON = (Option("rom", "path", None, "an option ROM image for the expansion ROM BAR"),)


def _matches(option: Option, key: str) -> bool:
    if "N" not in option.name.split("."):
        return option.name == key
    pattern = r"\.".join(r"\d+" if part == "N" else re.escape(part)
                         for part in option.name.split("."))
    return re.fullmatch(pattern, key) is not None


def check(emulation: str, declared: tuple[Option, ...], given: dict[str, str]) -> None:
    """ConfigError, naming the emulation and option, for anything that does not fit."""
    every = (*declared, *COMMON)
    for key, value in given.items():
        option = next((o for o in every if _matches(o, key)), None)
        if option is None:
            import difflib      # only for a mistake: its import is start-up time
            known = [o.name for o in every]
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (it takes {', '.join(known)})"
            raise ConfigError(f"{emulation}: unknown option '{key}'{hint}")
        try:
            if option.kind == "flag":
                Config({key: value}).get_bool(key)
            elif option.kind == "number":
                Config({key: value}).get_int(key, 0)
        except ConfigError as exc:
            raise ConfigError(f"{emulation}: {exc}") from None


def describe(declared: tuple[Option, ...]) -> list[str]:
    """Lines for `-s help`: each option, its kind, default and meaning."""
    lines = []
    for option in (*declared, *COMMON):
        default = f", default {option.default}" if option.default is not None else ""
        lines.append(f"{option.name}=<{option.kind}{default}>  {option.help}"
                     if option.kind != "flag" else
                     f"{option.name}[=true|false{default}]  {option.help}")
    return lines
