"""``ddiff plot DIR``: draw a run's loss and evaluation curves as a PNG."""

import argparse
from pathlib import Path

from ddiff._errors import RecipeError
from ddiff.runner.checkpoint import CHECKPOINT_DIR
from ddiff.runner.commands.options import add_output, output_path, run_directory
from ddiff.runner.plot import is_png, plot_run

NAME = "plot"
HELP = "draw a run's loss and eval curves as a PNG"
DESCRIPTION = HELP
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plot`` command's arguments."""
    parser.add_argument("workdir", help="run directory")
    add_output(parser, "PNG path (default: DIR/curves.png, redrawn)")


def run(args: argparse.Namespace) -> None:
    """Draw the curves and say where. An existing ``--output`` is replaced only with
    ``--overwrite``, and only when it is a PNG image (so never the run's eval.json,
    metrics.jsonl or recipe.yaml)."""
    workdir = run_directory(args.workdir)
    output = None
    if args.output is not None:
        output = output_path(Path(args.output), "--output", overwrite=args.overwrite)
        checkpoints = (workdir / CHECKPOINT_DIR).resolve()
        if checkpoints in output.resolve().parents:
            raise RecipeError(
                f"--output {output} is inside the run's checkpoints; choose another folder",
                source="command line",
            )
        if output.exists() and not is_png(output):
            raise RecipeError(
                f"--output {output} exists and is not a PNG image; ddiff plot replaces only "
                f"a picture, never a data file: choose another name",
                source="command line",
            )
    print(f"wrote {plot_run(workdir, output)}")
