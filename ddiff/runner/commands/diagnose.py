"""``ddiff diagnose TARGET --objective SPEC ...``: several objectives evaluated on the same
network, data and keys (:func:`ddiff.runner.diagnose.diagnose`), as a table and JSON."""

import argparse
import json
from pathlib import Path

from ddiff._errors import RecipeError
from ddiff.runner.commands.options import (
    add_batch_size,
    add_output,
    add_seed,
    add_specs,
    add_target,
    integer,
    output_path,
)
from ddiff.runner.diagnose import diagnose, format_diagnosis, parse_objective
from ddiff.runner.files import atomic_write_text, check_name_fits, reserved_path
from ddiff.runner.model import initial_model
from ddiff.runner.recipe import load_recipe
from ddiff.runner.trainer.rundir import load_run

NAME = "diagnose"
HELP = "evaluate several objectives on the same network and data: means and spreads"
DESCRIPTION = HELP
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``diagnose`` command's arguments."""
    add_target(
        parser,
        "target",
        "a run directory (its trained model) or a recipe YAML (its untrained model)",
        "recipe overrides such as data.eval_split=test",
    )
    add_specs(parser, "objective", " (required, no default)")
    parser.add_argument("--batches", type=integer(1), default=8, help="eval batches to use")
    add_batch_size(parser, "sequences per batch (default: eval.batch_size)")
    parser.add_argument(
        "--repeats", type=integer(1), default=1, help="independent draws per batch (2+ gives the estimator std)"
    )
    add_seed(parser, "seed of the draws")
    parser.add_argument(
        "--no-ema", action="store_true", help="a run's trained parameters rather than their EMA"
    )
    add_output(
        parser,
        "JSON file (default: DIR/diagnose.json, or ./diagnose.json for a recipe; "
        "numbered when it exists)",
    )


def run(args: argparse.Namespace) -> None:
    """Diagnose a run's model (or a recipe's untrained one) and write the result."""
    target = Path(args.target)
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"eval.batch_size={args.batch_size}")
    if not target.exists():
        raise RecipeError("no such run directory or recipe file", source=str(target))
    if args.output is not None:
        check_name_fits(Path(args.output), "--output")
        _diagnose(args, target, overrides, output_path(Path(args.output), "--output", args.overwrite))
        return
    with reserved_path((target if target.is_dir() else Path(".")) / "diagnose.json") as output:
        _diagnose(args, target, overrides, output)


def _diagnose(args: argparse.Namespace, target: Path, overrides: list[str], output: Path) -> None:
    """Diagnose and write the result to ``output``."""
    if target.is_dir():
        recipe, state = load_run(target, tuple(overrides))
        model = state.model if args.no_ema else state.ema
        described = f"{target} at step {int(state.step)} ({'trained' if args.no_ema else 'EMA'} parameters)"
    else:
        recipe = load_recipe(target, overrides)
        model = initial_model(recipe)
        described = f"{target}, untrained (the initialisation of seed {recipe.seed})"
    objectives = [parse_objective(text, recipe) for text in args.objective]
    labels = [named.label for named in objectives]
    if len(set(labels)) != len(labels):
        raise RecipeError("the same --objective is given twice", source="command line")
    result = diagnose(
        model, recipe, objectives, max_batches=args.batches, repeats=args.repeats, seed=args.seed
    )
    result = {"model": described, **result}
    atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    print(f"{described}\n{format_diagnosis(result)}\nwrote {output}")
