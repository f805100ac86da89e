"""``python -m ddiff`` is the ``ddiff`` command."""

import sys

from ddiff._cli import main

sys.exit(main())
