"""``ddiff plot DIR``: draw a run's loss and evaluation curves as a PNG."""

import argparse
from pathlib import Path

from ddiff.runner.commands.options import add_command, output_path, run_directory
from ddiff.runner.plot import plot_run


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``plot`` command's parser."""
    parser = add_command(commands, "plot", "draw a run's loss and eval curves as a PNG")
    parser.add_argument("workdir", help="run directory")
    parser.add_argument("--output", default=None, help="PNG path (default: DIR/curves.png, redrawn)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> None:
    """Draw the curves and say where."""
    workdir = run_directory(args.workdir)
    output = None
    if args.output is not None:
        output = output_path(Path(args.output), "--output", overwrite=True)
    print(f"wrote {plot_run(workdir, output)}")
