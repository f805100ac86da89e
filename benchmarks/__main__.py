"""``python -m benchmarks ...`` is ``ddiff bench ...`` (:mod:`ddiff.runner.bench`)."""

import sys

from ddiff.runner.bench import main

if __name__ == "__main__":
    sys.exit(main())
