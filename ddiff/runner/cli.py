"""The ``ddiff`` command line.

Every mistake a user can make ends in one ``ddiff: error:`` line and exit status 2: an
argument of the wrong type or range is refused by the parser before anything is loaded
or compiled, and recipe, run-directory and data errors are :class:`ddiff.DdiffError`.
Recipe overrides (``key.path=value``) may stand before or after the options.
"""

import argparse
import difflib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddiff._config import set_typecheck
from ddiff._errors import DdiffError, RecipeError, RunDirectoryError

OVERRIDES_HELP = (
    "recipe overrides key.path=value, before or after the options; section=NAME or "
    "section='{kind: NAME, key: value}' replaces a whole section"
)


class UsageError(DdiffError):
    """A command line the parser refuses (unknown option, wrong type or range)."""


class _Formatter(argparse.HelpFormatter):
    """Help that states every option's default (``(default: 16)``; ``(default: off)``
    for a flag) unless its text already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.nargs == argparse.ZERO_OR_MORE:
            return f"{text} (default: none)"
        if action.option_strings or action.nargs == argparse.OPTIONAL:
            return f"{text} (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line (:class:`UsageError`), not a
    usage block."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _integer(minimum: int, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{upper}, got {value}")
        return value

    return parse


def _finite(text: str) -> float:
    """An argparse type: a finite real number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


_SEED = _integer(0, 2**32 - 1)
_MAX_SAMPLES = 2**31 - 1
"""Sample indices fold into 32-bit keys (:func:`ddiff.sample_keys`)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddiff")
    except PackageNotFoundError:
        from ddiff import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ddiff",
        description="Discrete diffusion models: train, evaluate, sample.",
        epilog="Run 'ddiff COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ddiff {_version()}")
    parser.add_argument(
        "--no-typecheck",
        action="store_true",
        help="turn off the trace-time shape and dtype checks of protocol calls",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description or help)

    run = command(
        "run",
        "train a recipe into a run directory (run again to resume)",
        "Train a recipe into a run directory; the same command resumes from its latest "
        "checkpoint. Steps, cadences, eval, sampler and logging settings and the data's "
        "location may change on resume; other changes are refused. A run that never "
        "reached a checkpoint restarts with the new recipe.",
    )
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    run.add_argument("--workdir", help="run directory (default: runs/<recipe file name>)")
    run.add_argument(
        "--fresh",
        action="store_true",
        help="move an earlier run in the directory aside to DIR.old-N and start anew",
    )
    run.add_argument(
        "--stop-at-step",
        type=_integer(0),
        default=None,
        help="stop with a checkpoint at this step (default: trainer.steps)",
    )
    run.add_argument(
        "--coordinator-address",
        help="host:port of process 0 of a multi-process run (default: single process)",
    )
    run.add_argument(
        "--num-processes", type=_integer(1), help="number of processes (default: single process)"
    )
    run.add_argument(
        "--process-id", type=_integer(0), help="this process's index (default: single process)"
    )
    run.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run detected from the cluster (TPU pod, SLURM, MPI)",
    )

    evaluate = command(
        "eval",
        "evaluate a run's latest checkpoint",
        "Evaluate the EMA parameters of a run's latest checkpoint over the eval split and "
        "write DIR/eval_step<k>.json (a numbered name when it exists: nothing is "
        "overwritten unless --overwrite).",
    )
    evaluate.add_argument("workdir", help="run directory")
    evaluate.add_argument(
        "overrides",
        nargs="*",
        help="overrides such as data.root=/data or data.eval_split=test, or "
        "'data={kind: zero_shot, name: wikitext103}' for another data set",
    )
    evaluate.add_argument(
        "--time-draws", type=_integer(1), default=None, help="draws per sequence (default: eval.time_draws)"
    )
    evaluate.add_argument(
        "--max-examples",
        type=_integer(1),
        default=None,
        help="evaluate at most this many sequences (default: eval.max_examples, null: all)",
    )
    evaluate.add_argument(
        "--output", default=None, help="JSON file, in DIR unless a path (default: eval_step<k>.json)"
    )
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_sample_quality_options(evaluate)

    plot = command("plot", "draw a run's loss and eval curves as a PNG")
    plot.add_argument("workdir", help="run directory")
    plot.add_argument("--output", default=None, help="PNG path (default: DIR/curves.png, redrawn)")

    sample = command(
        "sample",
        "draw samples from a run's latest checkpoint",
        "Draw samples from the EMA parameters of a run's latest checkpoint, in batches, "
        "into DIR/samples/NAME.txt, .npy and .json (.png for images). Sample i is drawn "
        "from the i-th key of --seed, so the batch size never changes the samples.",
    )
    sample.add_argument("workdir", help="run directory")
    sample.add_argument("--num", type=_integer(1, _MAX_SAMPLES), default=16, help="number of samples")
    sample.add_argument(
        "--max-length",
        type=_integer(1),
        default=None,
        help="tokens per sample, beyond the training length if wanted, for a sampler that "
        "stops at an end token (bd3lm); samples may end sooner (default: the data's length)",
    )
    sample.add_argument(
        "--batch-size",
        type=_integer(1),
        default=None,
        help="samples drawn at once (default: trainer.sample_batch_size)",
    )
    sample.add_argument(
        "--steps", type=_integer(1), default=None, help="sampler steps (default: sampler.steps)"
    )
    sample.add_argument("--seed", type=_SEED, default=0, help="seed of the samples' keys")
    sample.add_argument(
        "--name",
        default=None,
        help="file name stem under DIR/samples (default: sample_step<k>_seed<s>, numbered "
        "when it exists)",
    )
    sample.add_argument("--overwrite", action="store_true", help="replace existing --name files")
    sample.add_argument(
        "--label",
        type=_integer(0),
        default=None,
        help="class label of class-conditional models (default: unconditional)",
    )
    sample.add_argument(
        "--start-from-prior",
        action="store_true",
        help="start a masked process from its prior draw instead of all-mask",
    )
    sample.add_argument(
        "--guidance",
        type=_finite,
        default=0.0,
        help="classifier-free guidance weight w (needs --label): (1+w) cond - w uncond",
    )
    given = sample.add_mutually_exclusive_group()
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

    diagnose = command(
        "diagnose", "evaluate several objectives on the same network and data: means and spreads"
    )
    diagnose.add_argument(
        "target", help="a run directory (its trained model) or a recipe YAML (its untrained model)"
    )
    diagnose.add_argument("overrides", nargs="*", help="recipe overrides such as data.eval_split=test")
    diagnose.add_argument(
        "--objective",
        action="append",
        required=True,
        metavar="SPEC",
        help="a registered objective, NAME or '{kind: NAME, key: value}'; give it once per "
        "objective (required, no default)",
    )
    diagnose.add_argument("--batches", type=_integer(1), default=8, help="eval batches to use")
    diagnose.add_argument(
        "--batch-size",
        type=_integer(1),
        default=None,
        help="sequences per batch (default: eval.batch_size)",
    )
    diagnose.add_argument(
        "--repeats", type=_integer(1), default=1, help="independent draws per batch (2+ gives the estimator std)"
    )
    diagnose.add_argument("--seed", type=_SEED, default=0, help="seed of the draws")
    diagnose.add_argument(
        "--no-ema", action="store_true", help="a run's trained parameters rather than their EMA"
    )
    diagnose.add_argument(
        "--output",
        default=None,
        help="JSON file (default: DIR/diagnose.json, or ./diagnose.json for a recipe; "
        "numbered when it exists)",
    )
    diagnose.add_argument("--overwrite", action="store_true", help="replace an existing --output")

    plugins = command(
        "plugins",
        "list registered components, or describe one",
        "Without arguments, list every registered component by slot with its plugin, and "
        "the plugins that failed to import. With SLOT, list that slot. With SLOT NAME, "
        "print the component's documentation, its recipe keys with types and defaults, "
        "and the capabilities it provides and requires.",
    )
    plugins.add_argument("slot", nargs="?", default=None, help="a slot: data, process, schedule, ...")
    plugins.add_argument("name", nargs="?", default=None, help="a registered name in the slot")

    from ddiff.runner.bench import add_arguments as add_bench_arguments

    add_bench_arguments(
        command("bench", "time named shapes: tokens/s, model FLOPs, MFU, compile time, memory, samplers")
    )

    _add_quality_command(command)

    recipe = command("recipe", "inspect recipes")
    recipe_commands = recipe.add_subparsers(dest="recipe_command", required=True, metavar="COMMAND")
    show = recipe_commands.add_parser(
        "show", help="print the fully resolved recipe", description="print the fully resolved recipe"
    )
    show.add_argument("recipe", help="recipe YAML file")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    return parser


# --------------------------------------------------------------------------- paths


def _output_path(path: Path, option: str, overwrite: bool) -> Path:
    """Refuse an output path whose folder is missing, or an existing file unless
    ``overwrite``."""
    if not path.parent.is_dir():
        raise RecipeError(
            f"{option} {path}: folder {path.parent} does not exist; create it first",
            source="command line",
        )
    if path.is_dir():
        raise RecipeError(f"{option} {path} is a directory; give a file name", source="command line")
    if path.exists() and not overwrite:
        raise RecipeError(
            f"{option} {path} exists; choose another name or add --overwrite", source="command line"
        )
    return path


def _run_directory(workdir: str) -> Path:
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"{path} is a file, not a run directory")
    return path


# --------------------------------------------------------------------------- commands


def _run(args: argparse.Namespace) -> None:
    from ddiff.runner.distributed import initialize
    from ddiff.runner.recipe import load_recipe
    from ddiff.runner.trainer import Trainer

    initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        auto=args.distributed,
    )
    recipe = load_recipe(args.recipe, args.overrides)
    workdir = Path(args.workdir) if args.workdir else Path("runs") / Path(args.recipe).stem
    Trainer(recipe, workdir).run(stop_at_step=args.stop_at_step, fresh=args.fresh)


def _eval(args: argparse.Namespace) -> None:
    from ddiff.runner.files import unused_path
    from ddiff.runner.trainer import Trainer, load_run, write_eval

    workdir = _run_directory(args.workdir)
    if args.output is not None:
        _output_path(workdir / args.output, "--output", args.overwrite)
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
    output = args.output or unused_path(workdir / f"eval_step{step:08d}.json").name
    trainer = Trainer(recipe, workdir)
    result = trainer.evaluate(state.ema)
    if recipe.eval.samples:
        result["samples"] = trainer.sample_quality(state.ema, recipe.eval.samples, judge=judge)
    path = write_eval(workdir, recipe, result, step, name=output)
    print(json.dumps(json.loads(path.read_text()), indent=2))
    print(f"wrote {path}", file=sys.stderr)


def _add_sample_quality_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples",
        type=_integer(1, _MAX_SAMPLES),
        default=None,
        metavar="N",
        help="also draw N samples with the run's sampler and report their quality under "
        "'samples' (sets eval.samples)",
    )
    parser.add_argument(
        "--judge",
        default=None,
        metavar="JUDGE_RUN",
        help="a run trained on the same data (an autoregressive one: recipes/ar_quickstart.yaml) "
        "whose likelihood scores the samples: their generative perplexity (default: none)",
    )


def _judge(args: argparse.Namespace, recipe):
    """The judge of --judge, loaded; refused without samples to score."""
    if args.judge is None:
        return None
    from ddiff.runner.quality import load_judge

    if not recipe.eval.samples:
        raise RecipeError("--judge needs samples to score: add --samples N", source="command line")
    return load_judge(args.judge, recipe)


def _add_quality_command(command) -> None:
    quality = command(
        "quality",
        "sample quality against network evaluations and wall time for several samplers",
        "Draw --num samples from a run's latest checkpoint with each --sampler (at each of "
        "--steps), and write their quality (exact likelihood under a synthetic source, unigram "
        "entropy, n-gram distances, perplexity under --judge) against network evaluations and "
        "wall time: a JSON table and a plot beside it (numbered names when they exist).",
    )
    quality.add_argument("workdir", help="run directory")
    quality.add_argument("overrides", nargs="*", help="recipe overrides such as data.eval_split=test")
    quality.add_argument(
        "--sampler",
        action="append",
        required=True,
        metavar="SPEC",
        help="a registered sampler, NAME or '{kind: NAME, key: value}'; give it once per sampler",
    )
    quality.add_argument(
        "--steps",
        default=None,
        metavar="LIST",
        help="step counts such as 16,32,64 for every sampler with a 'steps' argument not set "
        "in its SPEC (default: each sampler's own)",
    )
    quality.add_argument(
        "--num", type=_integer(2, _MAX_SAMPLES), default=256, help="samples per sampler"
    )
    quality.add_argument("--seed", type=_SEED, default=0, help="seed of the samples' keys")
    quality.add_argument(
        "--judge",
        default=None,
        metavar="JUDGE_RUN",
        help="a run on the same data that scores the samples (default: none)",
    )
    quality.add_argument(
        "--start-from-prior",
        action="store_true",
        help="start a masked process from its prior draw instead of all-mask",
    )
    quality.add_argument(
        "--output",
        default=None,
        help="JSON file (default: DIR/quality.json, numbered when it exists); the plot beside it as .png",
    )
    quality.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _quality(args: argparse.Namespace) -> None:
    from ddiff.runner import quality
    from ddiff.runner.files import unused_path
    from ddiff.runner.trainer import load_run

    workdir = _run_directory(args.workdir)
    specs = [quality.parse_sampler(text) for text in args.sampler]
    steps = quality.parse_steps(args.steps)
    if args.output is not None:
        output = _output_path(Path(args.output), "--output", args.overwrite)
    else:
        stem = unused_path(workdir / Path(quality.QUALITY_FILE).stem, (".json", ".png"))
        output = stem.with_name(f"{stem.name}.json")
    recipe, state = load_run(workdir, tuple(args.overrides))
    judge = quality.load_judge(args.judge, recipe) if args.judge else None
    about = {
        "run": str(args.workdir),
        "step": int(state.step),
        "num_samples": args.num,
        "seed": args.seed,
        "start_from_prior": args.start_from_prior,
    }

    def report(row) -> None:
        print(f"{row['sampler']}: {row['num_function_evals']} network evaluations, {row['wall_seconds']:.3f} s", flush=True)

    rows = quality.quality_sweep(
        recipe,
        state.ema,
        workdir,
        specs,
        steps,
        num_samples=args.num,
        seed=args.seed,
        judge=judge,
        start_from_prior=args.start_from_prior,
        report=report,
    )
    quality.write_quality(output, rows, about)
    plot = quality.plot_quality(
        rows, output.with_suffix(".png"), f"{args.workdir} at step {int(state.step)}, {args.num} samples each"
    )
    print(quality.format_table(rows))
    print(f"wrote {output} and {plot}")


def _plot(args: argparse.Namespace) -> None:
    from ddiff.runner.plot import plot_run

    workdir = _run_directory(args.workdir)
    output = None
    if args.output is not None:
        output = _output_path(Path(args.output), "--output", overwrite=True)
    print(f"wrote {plot_run(workdir, output)}")


def _given_tokens(args: argparse.Namespace, num: int, seq_len: int, vocab_size: int):
    """The (tokens, mask) of --prefix or --fixed, each of shape (1, seq_len) (the same for
    every sample) or (num, seq_len), or None."""
    import numpy as np

    def refuse(message: str) -> RecipeError:
        return RecipeError(message, source="command line")

    if args.prefix is not None:
        try:
            prefix = [int(token) for token in args.prefix.replace(",", " ").split()]
        except ValueError:
            raise refuse(f"--prefix {args.prefix!r} is not a list of token ids") from None
        if not prefix or len(prefix) > seq_len:
            raise refuse(f"--prefix needs 1 to {seq_len} token ids, got {len(prefix)}")
        given = np.full((1, seq_len), -1, np.int64)
        given[0, : len(prefix)] = prefix
    elif args.fixed is not None:
        try:
            given = np.load(args.fixed, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise refuse(f"--fixed {args.fixed}: cannot read a .npy array ({error})") from None
        if not np.issubdtype(given.dtype, np.integer):
            raise refuse(f"--fixed {args.fixed}: needs integer token ids, got {given.dtype}")
        if given.shape not in ((seq_len,), (num, seq_len)):
            raise refuse(
                f"--fixed {args.fixed}: shape {given.shape}, expected ({seq_len},) or "
                f"({num}, {seq_len}) (--num {num}, sequence length {seq_len})"
            )
        given = given.reshape(-1, seq_len)
    else:
        return None
    if given.min() < -1 or given.max() >= vocab_size:
        raise refuse(
            f"given token ids must be in 0..{vocab_size - 1} (or -1 for a free position), "
            f"got {int(given.min())}..{int(given.max())}"
        )
    return np.maximum(given, 0).astype(np.int32), given >= 0


def _conditioning(args: argparse.Namespace, recipe, num: int, seq_len: int | None = None):
    """Conditioning from --label, --guidance, --prefix and --fixed (samples of ``seq_len``
    positions, by default the data's), and its description."""
    import jax.numpy as jnp

    from ddiff._sampler import Conditioning

    data = recipe.data
    info: dict[str, object] = {}
    labels = None
    if args.label is not None:
        if data.num_classes == 0:
            raise RecipeError(
                f"--label needs a class-conditional model, but data {recipe.names['data']!r} "
                f"has no classes",
                source="command line",
            )
        if not 0 <= args.label < data.num_classes:
            raise RecipeError(
                f"--label must be in 0..{data.num_classes - 1}, got {args.label}",
                source="command line",
            )
        labels = jnp.full((1,), args.label, jnp.int32)
        info["label"] = args.label
    if args.guidance != 0.0:
        if labels is None:
            raise RecipeError(
                "--guidance needs --label (classifier-free guidance mixes the labelled and "
                "the null-class predictions)",
                source="command line",
            )
        info["guidance"] = args.guidance
    given = _given_tokens(args, num, seq_len or data.seq_len, data.vocab_size)
    fixed_tokens = fixed_mask = None
    if given is not None:
        fixed_tokens, fixed_mask = jnp.asarray(given[0]), jnp.asarray(given[1])
        per_sample = int(given[1].sum()) * (num if len(given[1]) == 1 else 1)
        info["num_fixed_positions"] = per_sample
    if args.start_from_prior:
        info["start_from_prior"] = True
    conditioning = Conditioning(
        labels=labels,
        fixed_tokens=fixed_tokens,
        fixed_mask=fixed_mask,
        guidance=args.guidance,
        start_from_prior=args.start_from_prior,
    )
    return conditioning, info


def _sample(args: argparse.Namespace) -> None:
    import jax
    from tqdm import tqdm

    from ddiff.runner.files import unused_path
    from ddiff.runner.trainer import Trainer, load_run
    from ddiff.runner.trainer.sampling import SAMPLES_DIR, SampleWriter

    workdir = _run_directory(args.workdir)
    directory = workdir / SAMPLES_DIR
    suffixes = (".txt", ".npy", ".json", ".png")
    if args.name is not None:
        if not args.name or Path(args.name).name != args.name:
            raise RecipeError(f"--name {args.name!r} must be a plain file name", source="command line")
        taken = [directory / f"{args.name}{suffix}" for suffix in suffixes]
        if not args.overwrite and any(path.exists() for path in taken):
            raise RecipeError(
                f"--name {args.name}: samples of that name exist in {directory}; choose another "
                f"name or add --overwrite",
                source="command line",
            )
    overrides = () if args.steps is None else (f"{_steps_key(workdir)}={args.steps}",)
    recipe, state = load_run(workdir, overrides)
    seq_len = _sample_length(args, recipe)
    conditioning, info = _conditioning(args, recipe, args.num, seq_len)
    trainer = Trainer(recipe, workdir)
    step = int(state.step)
    name = args.name or unused_path(directory / f"sample_step{step:08d}_seed{args.seed}", suffixes).name
    batch_size = args.batch_size or recipe.trainer.sample_batch_size
    size = trainer.sample_batch(args.num, batch_size)
    writer = SampleWriter(workdir, recipe, name, args.num, conditioning=info, seq_len=seq_len)
    bar = tqdm(
        total=args.num, unit="sample", disable=not sys.stderr.isatty() or size >= args.num, dynamic_ncols=True
    )
    shortest, longest = seq_len, 0
    try:
        for tokens, evals, lengths in trainer.sample_batches(
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


def _steps_key(workdir: Path) -> str:
    """What --steps sets: ``sampler.steps``, or ``sampler.inner.steps`` for a sampler that
    runs another one (bd3lm's sampler within each block)."""
    from ddiff.runner.recipe import read_recipe_file
    from ddiff.runner.trainer.rundir import RECIPE_FILE

    path = workdir / RECIPE_FILE
    section = read_recipe_file(path).get("sampler") if path.exists() else None
    nested = isinstance(section, dict) and isinstance(section.get("inner"), dict)
    return "sampler.inner.steps" if nested else "sampler.steps"


def _sample_length(args: argparse.Namespace, recipe) -> int:
    """The positions to sample: the data's, or --max-length for a variable-length sampler."""
    from ddiff._capabilities import VARIABLE_LENGTH

    if args.max_length is None:
        return recipe.data.seq_len
    if VARIABLE_LENGTH not in recipe.sampler.capabilities():
        raise RecipeError(
            f"--max-length needs a sampler that stops at an end token (capability "
            f"{VARIABLE_LENGTH}, e.g. bd3lm); sampler {recipe.names['sampler']!r} draws "
            f"{recipe.data.seq_len} tokens",
            source="command line",
        )
    return args.max_length


def _diagnose(args: argparse.Namespace) -> None:
    import jax

    from ddiff.runner.diagnose import diagnose, format_diagnosis, parse_objective
    from ddiff.runner.files import atomic_write_text, unused_path
    from ddiff.runner.recipe import load_recipe
    from ddiff.runner.trainer import build_model, load_run

    target = Path(args.target)
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"eval.batch_size={args.batch_size}")
    if not target.exists():
        raise RecipeError("no such run directory or recipe file", source=str(target))
    if args.output is not None:
        output = _output_path(Path(args.output), "--output", args.overwrite)
    else:
        output = unused_path((target if target.is_dir() else Path(".")) / "diagnose.json")
    if target.is_dir():
        recipe, state = load_run(target, tuple(overrides))
        model = state.model if args.no_ema else state.ema
        described = f"{target} at step {int(state.step)} ({'trained' if args.no_ema else 'EMA'} parameters)"
    else:
        recipe = load_recipe(target, overrides)
        model = build_model(recipe, jax.random.split(jax.random.PRNGKey(recipe.seed))[0])
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


# --------------------------------------------------------------------------- plugins


def _type_name(hint: Any) -> str:
    """How ``ddiff plugins SLOT NAME`` shows a recipe key's type."""
    import types
    import typing

    from ddiff._registry import SLOTS

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        shown = " | ".join(_type_name(o) for o in options)
        return f"{shown} | null" if len(options) < len(typing.get_args(hint)) else shown
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        for slot, base in SLOTS.items():
            if issubclass(hint, base):
                return f"{slot} section"
        return hint.__name__
    if origin is tuple:
        arguments = typing.get_args(hint)
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return f"list of {_type_name(arguments[0])}"
    return str(hint).replace("typing.", "")


def recipe_keys(cls: type) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The recipe keys of a component class as (name, type, default) with ``required``
    for a key without default, and the constructor arguments ddiff sets itself."""
    import inspect

    from ddiff._builder import constructor_hints
    from ddiff._network import SUPPLIED_NETWORK_ARGUMENTS

    derived = {*SUPPLIED_NETWORK_ARGUMENTS, "vocab_size", "seq_len", "num_classes"}
    hints = constructor_hints(cls)
    keys, set_by_ddiff = [], []
    for name, parameter in inspect.signature(cls).parameters.items():
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            continue
        if name in derived:
            set_by_ddiff.append(name)
            continue
        default = "required" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        keys.append((name, _type_name(hints.get(name, Any)), default))
    return keys, set_by_ddiff


def _describe_component(registry, slot: str, name: str) -> None:
    import inspect

    entry = registry.entry(slot, name)
    cls = entry.cls
    print(f"{slot} {name}: {cls.__module__}.{cls.__qualname__}  [plugin: {entry.plugin}]\n")
    print(inspect.cleandoc(cls.__doc__ or "(no documentation)"))
    keys, derived = recipe_keys(cls)
    print("\nrecipe keys:" if keys else "\nrecipe keys: none")
    width = max((len(key) for key, _, _ in keys), default=0)
    for key, type_name, default in keys:
        print(f"  {key:<{width}}  {type_name} = {default}")
    if derived:
        print(f"set by ddiff: {', '.join(derived)}")
    from ddiff._capabilities import Capable

    provides = ", ".join(sorted(cls.provides)) or "nothing"
    if cls.capabilities is not Capable.capabilities:
        provides = f"worked out from its settings by {cls.__qualname__}.capabilities()"
    print(f"provides: {provides}")
    requires = "; ".join(f"{other}: {', '.join(sorted(needed))}" for other, needed in cls.requires.items())
    print(f"requires: {requires or 'nothing'}")
    print(f"recipe: {slot}: {{kind: {name}{''.join(f', {k}: ...' for k, _, d in keys if d == 'required')}}}")


def _plugins(args: argparse.Namespace) -> None:
    from ddiff._registry import SLOTS, default_registry

    registry = default_registry()
    if args.slot is not None and args.slot not in SLOTS:
        close = difflib.get_close_matches(args.slot, SLOTS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown slot {args.slot!r}{hint} (slots: {', '.join(SLOTS)})", source="command line")
    if args.name is not None:
        _describe_component(registry, args.slot, args.name)
        return
    entries = list(registry)
    for slot in SLOTS if args.slot is None else (args.slot,):
        print(f"{slot}:")
        for entry in (e for e in entries if e.slot == slot):
            cls = entry.cls
            print(f"  {entry.name:<22} {cls.__module__}.{cls.__qualname__}  [plugin: {entry.plugin}]")
    if registry.broken and args.slot is None:
        print("broken plugins (their components are unavailable):")
        for plugin in registry.broken:
            print(f"  {plugin.name:<22} entry point {plugin.entry_point}: {plugin.error}")


def _recipe_show(args: argparse.Namespace) -> None:
    from ddiff.runner.recipe import load_recipe

    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")


def _bench(args: argparse.Namespace) -> None:
    from ddiff.runner.bench import run_command

    run_command(args)


_TAKES_OVERRIDES = ("run", "eval", "diagnose", "recipe")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; arguments the parser leaves over that are overrides
    (``key.path=value``) join the command's overrides wherever they stood."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if args.command not in _TAKES_OVERRIDES:
        unknown = list(extra)
    if unknown:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        options = [
            option
            for action in _command_parser(parser, args)._actions
            for option in action.option_strings
        ]
        close = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1)
        if close:
            message += f"; did you mean {close[0]}?"
        prog = f"ddiff {args.command}"
        raise UsageError(f"{prog}: {message} (see {prog} --help)")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[args.command]
    return parser


def _warn_broken_plugins() -> None:
    from ddiff._registry import default_registry

    for plugin in default_registry().broken:
        print(f"ddiff: warning: {plugin}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ddiff`` command: parse ``argv`` (default: the command line), run the command,
    and return the exit status (2 with one line on stderr for a user's mistake)."""
    handlers = {
        "run": _run,
        "eval": _eval,
        "sample": _sample,
        "plugins": _plugins,
        "plot": _plot,
        "diagnose": _diagnose,
        "bench": _bench,
        "recipe": _recipe_show,
        "quality": _quality,
    }
    try:
        try:
            args = _parse(_parser(), argv)
        except SystemExit as exit:  # --help, --version
            return exit.code if isinstance(exit.code, int) else 0
        if args.no_typecheck:
            set_typecheck(False)
        if args.command not in ("plot", "plugins"):
            _warn_broken_plugins()
        handlers[args.command](args)
    except DdiffError as error:
        status = getattr(error, "exit_status", 2)
        prefix = "ddiff: " if status != 2 else "ddiff: error: "
        message = str(error).replace("\r", "\\r").replace("\n", "\\n")
        print(f"{prefix}{message}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print("ddiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
