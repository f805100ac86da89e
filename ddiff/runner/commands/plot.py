"""``ddiff plot DIR``: draw a run's loss and evaluation curves as a PNG."""

import argparse
from pathlib import Path

from ddiff.runner.commands.options import output_path, run_directory
from ddiff.runner.plot import plot_run

NAME = "plot"
HELP = "draw a run's loss and eval curves as a PNG"
DESCRIPTION = HELP
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plot`` command's arguments."""
    parser.add_argument("workdir", help="run directory")
    parser.add_argument("--output", default=None, help="PNG path (default: DIR/curves.png, redrawn)")


def run(args: argparse.Namespace) -> None:
    """Draw the curves and say where."""
    workdir = run_directory(args.workdir)
    output = None
    if args.output is not None:
        output = output_path(Path(args.output), "--output", overwrite=True)
    print(f"wrote {plot_run(workdir, output)}")
