"""The ``ddiff`` command line."""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ddiff._config import set_typecheck
from ddiff._errors import DdiffError, RecipeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddiff", description="Discrete diffusion models: train, evaluate, sample."
    )
    parser.add_argument(
        "--no-typecheck",
        action="store_true",
        help="turn off the trace-time shape and dtype checks of protocol calls",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train a recipe into a run directory (resumes)")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", help="overrides such as trainer.steps=100")
    run.add_argument("--workdir", help="run directory (default: runs/<recipe name>)")
    run.add_argument(
        "--stop-at-step", type=int, default=None, help="stop (with a checkpoint) at this step"
    )
    run.add_argument("--coordinator-address", help="host:port of process 0 (multi-process runs)")
    run.add_argument("--num-processes", type=int, help="number of processes")
    run.add_argument("--process-id", type=int, help="this process's index")
    run.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run detected from the cluster (TPU pod, SLURM, MPI)",
    )

    evaluate = commands.add_parser("eval", help="evaluate a run's latest checkpoint")
    evaluate.add_argument("workdir")
    evaluate.add_argument(
        "overrides",
        nargs="*",
        help="recipe overrides such as data.root=/data or data.eval_split=test, or "
        "'data={kind: zero_shot, name: wikitext103}' for another data set",
    )
    evaluate.add_argument("--time-draws", type=int, default=None)
    evaluate.add_argument("--max-examples", type=int, default=None)
    evaluate.add_argument("--output", default=None, help="file name in DIR (default eval.json)")

    plot = commands.add_parser("plot", help="draw a run's loss and eval curves as a PNG")
    plot.add_argument("workdir")
    plot.add_argument("--output", default=None, help="PNG path (default DIR/curves.png)")

    sample = commands.add_parser("sample", help="draw samples from a run's latest checkpoint")
    sample.add_argument("workdir")
    sample.add_argument("--num", type=int, default=16, help="number of samples")
    sample.add_argument("--steps", type=int, default=None, help="sampler steps")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per sample, beyond the training length if wanted, for a sampler that "
        "stops at an end token (bd3lm); samples may end sooner",
    )
    sample.add_argument("--name", default=None, help="file name stem under DIR/samples")
    sample.add_argument(
        "--label", type=int, default=None, help="class label (class-conditional models)"
    )
    sample.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        help="classifier-free guidance weight w (needs --label): (1+w) cond - w uncond",
    )
    given = sample.add_mutually_exclusive_group()
    given.add_argument(
        "--prefix", default=None, help='infilling: token ids that start every sample, e.g. "3 4 5"'
    )
    given.add_argument(
        "--fixed",
        default=None,
        metavar="FILE.npy",
        help="infilling: integer array of shape (seq,) or (num, seq); entries >= 0 are kept "
        "fixed throughout sampling, -1 marks positions to generate",
    )

    diagnose = commands.add_parser(
        "diagnose",
        help="evaluate several objectives on the same network and data: means and spreads",
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
        help="a registered objective, NAME or '{kind: NAME, key: value}'; give it once per objective",
    )
    diagnose.add_argument("--batches", type=int, default=8, help="eval batches to use (default 8)")
    diagnose.add_argument(
        "--batch-size", type=int, default=None, help="sequences per batch (default eval.batch_size)"
    )
    diagnose.add_argument(
        "--repeats", type=int, default=1, help="independent draws per batch (2+ gives the estimator std)"
    )
    diagnose.add_argument("--seed", type=int, default=0)
    diagnose.add_argument(
        "--no-ema", action="store_true", help="a run's trained parameters rather than their EMA"
    )
    diagnose.add_argument(
        "--output", default=None, help="JSON file (default DIR/diagnose.json, or diagnose.json here)"
    )

    commands.add_parser("plugins", help="list registered components by slot and plugin")

    recipe = commands.add_parser("recipe", help="inspect recipes")
    recipe_commands = recipe.add_subparsers(dest="recipe_command", required=True)
    show = recipe_commands.add_parser("show", help="print the fully resolved recipe")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    return parser


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
    Trainer(recipe, workdir).run(stop_at_step=args.stop_at_step)


def _eval(args: argparse.Namespace) -> None:
    from ddiff.runner.trainer import Trainer, load_run, write_eval

    overrides = list(args.overrides)
    if args.time_draws is not None:
        overrides.append(f"eval.time_draws={args.time_draws}")
    if args.max_examples is not None:
        overrides.append(f"eval.max_examples={args.max_examples}")
    recipe, state = load_run(args.workdir, tuple(overrides))
    trainer = Trainer(recipe, args.workdir)
    result = trainer.evaluate(state.ema)
    path = write_eval(Path(args.workdir), recipe, result, int(state.step), name=args.output)
    print(json.dumps(json.loads(path.read_text()), indent=2))


def _plot(args: argparse.Namespace) -> None:
    from ddiff.runner.plot import plot_run

    print(f"wrote {plot_run(args.workdir, args.output)}")


def _given_tokens(args: argparse.Namespace, num: int, seq_len: int, vocab_size: int):
    """The (tokens, mask) of --prefix or --fixed, each of shape (num, seq_len), or None."""
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
        given = np.full((seq_len,), -1, np.int64)
        given[: len(prefix)] = prefix
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
    else:
        return None
    if given.min() < -1 or given.max() >= vocab_size:
        raise refuse(
            f"given token ids must be in 0..{vocab_size - 1} (or -1 for a free position), "
            f"got {int(given.min())}..{int(given.max())}"
        )
    given = np.broadcast_to(given, (num, seq_len))
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
        labels = jnp.full((num,), args.label, jnp.int32)
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
        info["num_fixed_positions"] = int(given[1].sum())
    conditioning = Conditioning(
        labels=labels, fixed_tokens=fixed_tokens, fixed_mask=fixed_mask, guidance=args.guidance
    )
    return conditioning, info


def _sample(args: argparse.Namespace) -> None:
    import jax

    from ddiff.runner.trainer import Trainer, load_run

    if args.num < 1:
        raise RecipeError("--num must be at least 1", source="command line")
    overrides = () if args.steps is None else (f"{_steps_key(Path(args.workdir))}={args.steps}",)
    recipe, state = load_run(args.workdir, overrides)
    seq_len = _sample_length(args, recipe)
    conditioning, info = _conditioning(args, recipe, args.num, seq_len)
    trainer = Trainer(recipe, args.workdir)
    output = trainer.sample(
        state.ema,
        key=jax.random.PRNGKey(args.seed),
        num_samples=args.num,
        conditioning=conditioning,
        seq_len=seq_len,
    )
    name = args.name or f"sample_step{int(state.step):08d}_seed{args.seed}"
    path = trainer.write_samples(output, name, conditioning=info)
    lengths = [int(length) for length in output.lengths]
    shown = f", lengths {min(lengths)}..{max(lengths)}" if min(lengths) < seq_len else ""
    print(
        f"wrote {args.num} samples ({int(output.num_function_evals)} network evaluations"
        f"{shown}) to {path}"
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
    if args.max_length < 1:
        raise RecipeError(f"--max-length must be positive, got {args.max_length}", source="command line")
    return args.max_length


def _diagnose(args: argparse.Namespace) -> None:
    import jax

    from ddiff.runner.diagnose import diagnose, format_diagnosis, parse_objective
    from ddiff.runner.files import atomic_write_text
    from ddiff.runner.recipe import load_recipe
    from ddiff.runner.trainer import build_model, load_run

    target = Path(args.target)
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"eval.batch_size={args.batch_size}")
    if not target.exists():
        raise RecipeError("no such run directory or recipe file", source=str(target))
    if target.is_dir():
        recipe, state = load_run(target, tuple(overrides))
        model = state.model if args.no_ema else state.ema
        output = Path(args.output) if args.output else target / "diagnose.json"
        described = f"{target} at step {int(state.step)} ({'trained' if args.no_ema else 'EMA'} parameters)"
    else:
        recipe = load_recipe(target, overrides)
        model = build_model(recipe, jax.random.split(jax.random.PRNGKey(recipe.seed))[0])
        output = Path(args.output) if args.output else Path("diagnose.json")
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


def _plugins(args: argparse.Namespace) -> None:
    from ddiff._registry import SLOTS, default_registry

    registry = default_registry()
    entries = list(registry)
    for slot in SLOTS:
        print(f"{slot}:")
        for entry in (e for e in entries if e.slot == slot):
            cls = entry.cls
            print(f"  {entry.name:<22} {cls.__module__}.{cls.__qualname__}  [plugin: {entry.plugin}]")


def _recipe_show(args: argparse.Namespace) -> None:
    from ddiff.runner.recipe import load_recipe

    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ddiff`` command: parse ``argv`` (default: the command line), run the command,
    and return the exit status (2 with one line on stderr for a user's mistake)."""
    args = _parser().parse_args(argv)
    if args.no_typecheck:
        set_typecheck(False)
    handlers = {
        "run": _run,
        "eval": _eval,
        "sample": _sample,
        "plugins": _plugins,
        "plot": _plot,
        "diagnose": _diagnose,
    }
    try:
        if args.command == "recipe":
            _recipe_show(args)
        else:
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
