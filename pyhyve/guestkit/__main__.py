"""`python -m pyhyve.guestkit` is `pyhyve-guest`."""

import sys

from . import main

sys.exit(main())
