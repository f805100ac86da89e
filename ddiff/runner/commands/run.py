"""``ddiff run RECIPE``: train a recipe into a run directory, or resume it there."""

import argparse
from pathlib import Path

from ddiff.runner.commands.options import add_target, integer
from ddiff.runner.distributed import initialize
from ddiff.runner.recipe import load_recipe
from ddiff.runner.trainer.loop import Trainer

NAME = "run"
HELP = "train a recipe into a run directory (run again to resume)"
DESCRIPTION = (
    "Train a recipe into a run directory; the same command resumes from its latest "
    "checkpoint. Steps, cadences, eval, sampler and logging settings and the data's "
    "location may change on resume; other changes are refused. A run that never reached a "
    "checkpoint restarts with the new recipe."
)
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` command's arguments."""
    add_target(parser, "recipe", "recipe YAML file")
    parser.add_argument("--workdir", help="run directory (default: runs/<recipe file name>)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="move an earlier run in the directory aside to DIR.old-N and start anew",
    )
    parser.add_argument(
        "--stop-at-step",
        type=integer(0),
        default=None,
        help="stop with a checkpoint at this step (default: trainer.steps)",
    )
    parser.add_argument(
        "--coordinator-address",
        help="host:port of process 0 of a multi-process run (default: single process)",
    )
    parser.add_argument(
        "--num-processes", type=integer(1), help="number of processes (default: single process)"
    )
    parser.add_argument(
        "--process-id", type=integer(0), help="this process's index (default: single process)"
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run detected from the cluster (TPU pod, SLURM, MPI)",
    )


def run(args: argparse.Namespace) -> None:
    """Join the processes of a multi-process run (when asked), then train."""
    initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        auto=args.distributed,
    )
    recipe = load_recipe(args.recipe, args.overrides)
    workdir = Path(args.workdir) if args.workdir else Path("runs") / Path(args.recipe).stem
    Trainer(recipe, workdir).run(stop_at_step=args.stop_at_step, fresh=args.fresh)
