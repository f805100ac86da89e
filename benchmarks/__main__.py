"""``python -m benchmarks ...`` is ``ddiff bench ...`` (:mod:`ddiff.runner.bench`)."""

import sys

from ddiff.runner.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
