import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "guests"))


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened, else the reason it cannot."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@pytest.fixture
def needs_kvm():
    reason = kvm_usable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def linux_guest():
    """pyhyve's Linux guest, built from linux-source into the kit's cache once."""
    from linuxguest import build
    return build()


@pytest.fixture(scope="session")
def vnc_api():
    """vncdotool's API. Its Twisted reactor runs in a thread and cannot be
    started again once stopped, so every module shares it and it stops once,
    when the session ends."""
    api = pytest.importorskip("vncdotool.api")
    yield api
    api.shutdown()


@pytest.fixture
def errors_logged():
    """ERROR records pyhyve logs (a model's own failure, which must not happen):
    the fuzz tests of the NVMe and AHCI controllers fail on any."""
    from fuzzing import collect_errors
    with collect_errors() as messages:
        yield messages
