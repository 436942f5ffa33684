"""How hard the fuzz tests try.

In the normal suite each fuzz test runs the number of examples it names.
PYHYVE_FUZZ_SCALE=N multiplies every count (hypothesis examples and the
whole-VM fuzzer's accesses) for a long run, e.g.
    PYHYVE_FUZZ_SCALE=100 python -m pytest -k fuzz --hypothesis-show-statistics
"""

import contextlib
import logging
import os

from hypothesis import settings


def _scale() -> int:
    text = os.environ.get("PYHYVE_FUZZ_SCALE", "1")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"PYHYVE_FUZZ_SCALE={text!r}: expected a whole number >= 1")
    return int(text)


SCALE = _scale()


def fuzz_settings(examples: int, **options) -> settings:
    """hypothesis settings for `examples` examples (times SCALE), no deadline: the
    shared test machines are too noisy for per-example timing."""
    options.setdefault("deadline", None)
    return settings(max_examples=examples * SCALE, **options)


@contextlib.contextmanager
def collect_errors():
    """The ERROR records pyhyve logs inside (log.exception: a model's own
    failure, which guest input must never cause), as a list of messages."""
    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())
    handler = Collect()
    logger = logging.getLogger("pyhyve")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
