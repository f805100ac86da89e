"""``ddiff eval DIR``: evaluate a run's latest checkpoint over the eval split, and the
quality of samples drawn from it."""

import argparse
import json
import sys
from contextlib import nullcontext

import jax

from ddiff._errors import RecipeError
from ddiff.runner.commands.options import (
    MAX_SAMPLES,
    add_judge,
    add_output,
    add_target,
    integer,
    output_path,
    run_directory,
)
from ddiff.runner.files import reserved_path
from ddiff.runner.quality import Judge
from ddiff.runner.quality_sweep import load_judge
from ddiff.runner.recipe import Recipe
from ddiff.runner.trainer.engine import Engine
from ddiff.runner.trainer.rundir import load_run, write_eval

MAX_TIME_DRAWS = 1_000_000
"""The most time draws per sequence ``--time-draws`` takes (each is an evaluation of the
whole split)."""

NAME = "eval"
HELP = "evaluate a run's latest checkpoint"
DESCRIPTION = (
    "Evaluate the EMA parameters of a run's latest checkpoint over the eval split and "
    "write DIR/eval_step<k>.json (a numbered name when it exists: nothing is overwritten "
    "unless --overwrite)."
)
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` command's arguments."""
    add_target(
        parser,
        "workdir",
        "run directory",
        "overrides such as data.root=/data or data.eval_split=test, or "
        "'data={kind: zero_shot, name: wikitext103}' for another data set",
    )
    parser.add_argument(
        "--time-draws", type=integer(1, MAX_TIME_DRAWS), default=None,
        help=f"draws per sequence, at most {MAX_TIME_DRAWS} (default: eval.time_draws)",
    )
    parser.add_argument(
        "--max-examples",
        type=integer(1),
        default=None,
        help="evaluate at most this many sequences (default: eval.max_examples, null: all)",
    )
    add_output(parser, "JSON file, in DIR unless a path (default: eval_step<k>.json)")
    parser.add_argument(
        "--samples",
        type=integer(1, MAX_SAMPLES),
        default=None,
        metavar="N",
        help="also draw N samples with the run's sampler and report their quality under "
        "'samples' (sets eval.samples)",
    )
    add_judge(
        parser,
        "a run trained on the same data (an autoregressive one: recipes/ar_quickstart.yaml) "
        "whose likelihood scores the samples: their generative perplexity (default: none)",
    )


def _judge(args: argparse.Namespace, recipe: Recipe) -> Judge | None:
    """The judge of --judge, loaded; refused without samples to score."""
    if args.judge is None:
        return None
    if not recipe.eval.samples:
        raise RecipeError("--judge needs samples to score: add --samples N", source="command line")
    return load_judge(args.judge, recipe)


def run(args: argparse.Namespace) -> None:
    """Evaluate, write the result beside the run and print it."""
    workdir = run_directory(args.workdir)
    if args.output is not None:
        output_path(workdir / args.output, "--output", args.overwrite)
    overrides = list(args.overrides)
    if args.time_draws is not None:
        overrides.append(f"eval.time_draws={args.time_draws}")
    if args.max_examples is not None:
        overrides.append(f"eval.max_examples={args.max_examples}")
    if args.samples is not None:
        overrides.append(f"eval.samples={args.samples}")
    recipe, state = load_run(workdir, tuple(overrides))
    judge = _judge(args, recipe)
    step = int(state.step)
    default = workdir / f"eval_step{step:08d}.json"
    name = nullcontext() if args.output else reserved_path(default, reserve=jax.process_index() == 0)
    with name as reserved:
        engine = Engine(recipe)
        result = engine.evaluate(state.ema)
        if recipe.eval.samples:
            result["samples"] = engine.sample_quality(state.ema, recipe.eval.samples, judge=judge)
        path = write_eval(workdir, recipe, result, step, name=args.output or reserved.name)
    print(json.dumps(json.loads(path.read_text()), indent=2))
    print(f"wrote {path}", file=sys.stderr)
