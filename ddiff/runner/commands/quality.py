"""``ddiff quality DIR --sampler SPEC ...``: sample quality against network evaluations
and wall time for several samplers (:func:`ddiff.runner.quality_sweep.quality_sweep`)."""

import argparse
from pathlib import Path
from typing import Any

from ddiff._errors import RecipeError
from ddiff.runner.commands.options import (
    MAX_SAMPLES,
    add_judge,
    add_output,
    add_seed,
    add_specs,
    add_start_from_prior,
    add_target,
    integer,
    output_path,
    run_directory,
)
from ddiff.runner.files import check_name_fits, reserved_path
from ddiff.runner.quality_sweep import (
    QUALITY_FILE,
    format_table,
    load_judge,
    plot_quality,
    quality_sweep,
    write_quality,
)
from ddiff.runner.recipe import parse_yaml
from ddiff.runner.trainer.rundir import load_run

NAME = "quality"
HELP = "sample quality against network evaluations and wall time for several samplers"
DESCRIPTION = (
    "Draw --num samples from a run's latest checkpoint with each --sampler (at each of "
    "--steps), and write their quality (exact likelihood under a synthetic source, "
    "unigram entropy, n-gram distances, perplexity under --judge) against network "
    "evaluations and wall time: a JSON table and a plot beside it (numbered names when "
    "they exist)."
)
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``quality`` command's arguments."""
    add_target(parser, "workdir", "run directory", "recipe overrides such as data.eval_split=test")
    add_specs(parser, "sampler")
    parser.add_argument(
        "--steps",
        default=None,
        metavar="LIST",
        help="step counts such as 16,32,64 for every sampler with a 'steps' argument not set "
        "in its SPEC (default: each sampler's own)",
    )
    parser.add_argument(
        "--num", type=integer(2, MAX_SAMPLES), default=256, help="samples per sampler"
    )
    add_seed(parser, "seed of the samples' keys")
    add_judge(parser, "a run on the same data that scores the samples (default: none)")
    add_start_from_prior(parser)
    add_output(
        parser,
        "JSON file (default: DIR/quality.json, numbered when it exists); the plot beside it as .png",
    )


def parse_sampler(text: str) -> dict[str, Any]:
    """A ``--sampler`` argument: a registered name or a YAML mapping with ``kind``."""
    value = parse_yaml(text, "command line")
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict) or "kind" not in value:
        raise RecipeError(
            f"--sampler {text!r} must be a registered sampler name or a mapping such as "
            f"'{{kind: confidence, steps: 32}}'",
            source="command line",
        )
    return value


def parse_steps(text: str | None) -> tuple[int, ...]:
    """``--steps 16,32,64`` as a tuple of positive integers."""
    if text is None:
        return ()
    try:
        steps = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise RecipeError(f"--steps {text!r} is not a list of integers such as 16,32,64", source="command line") from None
    if not steps or min(steps) < 1:
        raise RecipeError(f"--steps needs positive integers, got {text!r}", source="command line")
    return steps


def _report(row: dict[str, Any]) -> None:
    print(f"{row['sampler']}: {row['num_function_evals']} network evaluations, {row['wall_seconds']:.3f} s", flush=True)


def run(args: argparse.Namespace) -> None:
    """Sweep the samplers, write the table and the plot, and print the table."""
    workdir = run_directory(args.workdir)
    specs = [parse_sampler(text) for text in args.sampler]
    steps = parse_steps(args.steps)
    if args.output is not None:
        check_name_fits(Path(args.output), "--output")
        check_name_fits(Path(args.output).with_suffix(".png"), "--output")
        output = output_path(Path(args.output), "--output", args.overwrite)
        _sweep(args, workdir, specs, steps, output)
        return
    with reserved_path(workdir / Path(QUALITY_FILE).stem, (".json", ".png")) as stem:
        _sweep(args, workdir, specs, steps, stem.with_name(f"{stem.name}.json"))


def _sweep(
    args: argparse.Namespace, workdir: Path, specs: list[dict[str, Any]], steps: tuple[int, ...], output: Path
) -> None:
    """Sweep and write the table to ``output`` and its plot beside it."""
    recipe, state = load_run(workdir, tuple(args.overrides))
    judge = load_judge(args.judge, recipe) if args.judge else None
    about = {
        "run": str(args.workdir),
        "step": int(state.step),
        "num_samples": args.num,
        "seed": args.seed,
        "start_from_prior": args.start_from_prior,
    }
    rows = quality_sweep(
        recipe,
        state.ema,
        specs,
        steps,
        num_samples=args.num,
        seed=args.seed,
        judge=judge,
        start_from_prior=args.start_from_prior,
        report=_report,
    )
    write_quality(output, rows, about)
    plot = plot_quality(
        rows, output.with_suffix(".png"), f"{args.workdir} at step {int(state.step)}, {args.num} samples each"
    )
    print(format_table(rows))
    print(f"wrote {output} and {plot}")
