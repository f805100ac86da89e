"""``python -m ddiff`` is the ``ddiff`` command."""

import sys

from ddiff.runner.cli import main

sys.exit(main())
