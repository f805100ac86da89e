"""``ddiff sample DIR``: draw samples from a run's latest checkpoint, in batches, into
the run's ``samples/`` folder."""

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import jax
from tqdm import tqdm

from ddiff._errors import RecipeError
from ddiff.runner.commands.options import (
    MAX_SAMPLES,
    add_batch_size,
    add_seed,
    add_start_from_prior,
    finite,
    integer,
    run_directory,
)
from ddiff.runner.files import check_name_fits, reserved_path
from ddiff.runner.recipe import read_recipe_file
from ddiff.runner.sample_options import SampleOptions, build_conditioning, sample_length
from ddiff.runner.trainer.engine import Engine
from ddiff.runner.trainer.rundir import RECIPE_FILE, load_run
from ddiff.runner.trainer.sampling import SAMPLES_DIR, SampleWriter

SUFFIXES = (".txt", ".npy", ".json", ".png")
"""The files of one set of samples."""

NAME = "sample"
HELP = "draw samples from a run's latest checkpoint"
DESCRIPTION = (
    "Draw samples from the EMA parameters of a run's latest checkpoint, in batches, into "
    "DIR/samples/NAME.txt, .npy and .json (.png for images). Sample i is drawn from the "
    "i-th key of --seed, so the batch size never changes the samples."
)
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sample`` command's arguments."""
    parser.add_argument("workdir", help="run directory")
    parser.add_argument("--num", type=integer(1, MAX_SAMPLES), default=16, help="number of samples")
    parser.add_argument(
        "--max-length",
        type=integer(1),
        default=None,
        help="tokens per sample, beyond the training length if wanted, for a sampler that "
        "stops at an end token (bd3lm); samples may end sooner (default: the data's length)",
    )
    add_batch_size(parser, "samples drawn at once (default: trainer.sample_batch_size)")
    parser.add_argument(
        "--steps", type=integer(1), default=None, help="sampler steps (default: sampler.steps)"
    )
    add_seed(parser, "seed of the samples' keys")
    parser.add_argument(
        "--name",
        default=None,
        help="file name stem under DIR/samples (default: sample_step<k>_seed<s>, numbered "
        "when it exists)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing --name files")
    parser.add_argument(
        "--label",
        type=integer(0),
        default=None,
        help="class label of class-conditional models (default: unconditional)",
    )
    add_start_from_prior(parser)
    parser.add_argument(
        "--guidance",
        type=finite,
        default=0.0,
        help="classifier-free guidance weight w (needs --label): (1+w) cond - w uncond",
    )
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--prefix",
        default=None,
        help='infilling: token ids that start every sample, e.g. "3 4 5" (default: none)',
    )
    given.add_argument(
        "--fixed",
        default=None,
        metavar="FILE.npy",
        help="infilling: integer array of shape (seq,) or (num, seq); entries >= 0 are kept "
        "fixed throughout sampling, -1 marks positions to generate (default: none)",
    )


def _steps_key(workdir: Path) -> str:
    """What --steps sets: ``sampler.steps``, or ``sampler.inner.steps`` for a sampler that
    runs another one (bd3lm's sampler within each block)."""
    path = workdir / RECIPE_FILE
    section = read_recipe_file(path).get("sampler") if path.exists() else None
    nested = isinstance(section, dict) and isinstance(section.get("inner"), dict)
    return "sampler.inner.steps" if nested else "sampler.steps"


def _check_name(args: argparse.Namespace, directory: Path) -> None:
    """Refuse a --name that is not a plain file name, or whose files exist (without
    --overwrite)."""
    if not args.name or Path(args.name).name != args.name:
        raise RecipeError(f"--name {args.name!r} must be a plain file name", source="command line")
    check_name_fits(directory / args.name, "--name", max(SUFFIXES, key=len))
    taken = [directory / f"{args.name}{suffix}" for suffix in SUFFIXES]
    if not args.overwrite and any(path.exists() for path in taken):
        raise RecipeError(
            f"--name {args.name}: samples of that name exist in {directory}; choose another "
            f"name or add --overwrite",
            source="command line",
        )


def run(args: argparse.Namespace) -> None:
    """Draw the samples batch by batch into their files, with a progress bar on a
    terminal, and say where they are."""
    workdir = run_directory(args.workdir)
    directory = workdir / SAMPLES_DIR
    if args.name is not None:
        _check_name(args, directory)
    overrides = () if args.steps is None else (f"{_steps_key(workdir)}={args.steps}",)
    recipe, state = load_run(workdir, overrides)
    options = SampleOptions(
        label=args.label,
        guidance=args.guidance,
        prefix=args.prefix,
        fixed=args.fixed,
        start_from_prior=args.start_from_prior,
        max_length=args.max_length,
    )
    seq_len = sample_length(options, recipe)
    conditioning, info = build_conditioning(options, recipe, args.num, seq_len)
    engine = Engine(recipe)
    step = int(state.step)
    default = directory / f"sample_step{step:08d}_seed{args.seed}"
    first = jax.process_index() == 0
    chosen = nullcontext() if args.name else reserved_path(default, SUFFIXES, reserve=first)
    with chosen as reserved:
        name = args.name or reserved.name
        batch_size = args.batch_size or recipe.trainer.sample_batch_size
        size = engine.sample_batch(args.num, batch_size)
        writer = SampleWriter(workdir, recipe, name, args.num, conditioning=info, seq_len=seq_len)
        bar = tqdm(
            total=args.num, unit="sample", disable=not sys.stderr.isatty() or size >= args.num, dynamic_ncols=True
        )
        shortest, longest = seq_len, 0
        try:
            for tokens, evals, lengths in engine.sample_batches(
                state.ema,
                key=jax.random.PRNGKey(args.seed),
                num_samples=args.num,
                conditioning=conditioning,
                batch_size=batch_size,
                seq_len=seq_len,
            ):
                writer.add(tokens, evals, lengths)
                shortest = min(shortest, int(lengths.min()))
                longest = max(longest, int(lengths.max()))
                bar.update(len(tokens))
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        path = writer.close()
    shown = f", lengths {shortest}..{longest}" if shortest < seq_len else ""
    print(
        f"wrote {args.num} samples in {writer.num_batches} batch(es) of {size} "
        f"({writer.num_function_evals} network evaluations per batch at most{shown}) to {path}"
    )
