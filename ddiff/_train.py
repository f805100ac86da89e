"""The trainer: jitted steps with donated buffers, EMA, evaluation, samples, checkpoints."""

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxtyping import Array, Float, Int, UInt32
from tqdm import tqdm

from ddiff._capabilities import check_compatibility
from ddiff._data import eval_batches, train_batches, validate_batch
from ddiff._errors import RunDirectoryError
from ddiff._model import DiffusionModel
from ddiff._recipe import OptimizerConfig, Recipe, load_recipe, parse_yaml
from ddiff._sampler import Conditioning, SampleOutput

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"

RESUME_MAY_DIFFER = frozenset({"trainer.log_every"})
"""Resolved-recipe keys that may change between a run and its resumption."""


class TrainState(eqx.Module):
    """Everything a step changes: the model, optimizer state, EMA of the model, and the
    step counter. Randomness of step k is ``fold_in(key, k)``."""

    step: Int[Array, ""]
    model: DiffusionModel
    opt_state: Any
    ema: DiffusionModel
    key: UInt32[Array, " 2"]


def build_model(recipe: Recipe, key: jax.Array) -> DiffusionModel:
    """Build the network for the recipe's process and parameterization, and check the
    capabilities that depend on the network (time conditioning, classes)."""
    process = recipe.process
    network = recipe.network.build(
        num_states=process.num_states,
        num_outputs=recipe.parameterization.output_channels(process),
        seq_len=recipe.data.seq_len,
        num_classes=recipe.data.num_classes,
        key=key,
    )
    components = {
        slot: (recipe.names[slot], getattr(recipe, slot))
        for slot in ("process", "parameterization", "objective", "sampler")
    }
    components["network"] = (recipe.names["network"], network)
    check_compatibility(components, source=recipe.source)
    return DiffusionModel(network=network, parameterization=recipe.parameterization, process=process)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay (or constant), after global-norm clipping."""
    if config.decay == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay_steps=max(total_steps, config.warmup_steps + 1),
            end_value=config.learning_rate * config.final_lr_fraction,
        )
    else:
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)),
                optax.constant_schedule(config.learning_rate),
            ],
            [config.warmup_steps],
        )
    adamw = optax.adamw(
        schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
    )
    if config.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)


def _bits_per_token(nats: jax.Array, seq_len: int) -> jax.Array:
    return nats / (seq_len * math.log(2.0))


class Trainer:
    """Runs a recipe in a work directory, resuming from its latest checkpoint."""

    def __init__(self, recipe: Recipe, workdir: str | Path, *, show_progress: bool | None = None):
        self.recipe = recipe
        self.workdir = Path(workdir)
        self.show_progress = show_progress
        self.optimizer = make_optimizer(recipe.optimizer, recipe.trainer.steps)
        self._step_fn = self._make_step()
        self._eval_fn = self._make_eval()
        self._sample_fn = self._make_sample()

    # ------------------------------------------------------------------ state

    def init_state(self) -> TrainState:
        key = jax.random.PRNGKey(self.recipe.seed)
        model_key, train_key = jax.random.split(key)
        model = build_model(self.recipe, model_key)
        params = eqx.filter(model, eqx.is_inexact_array)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            model=model,
            opt_state=self.optimizer.init(params),
            ema=jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, model),
            key=train_key,
        )

    # ------------------------------------------------------------------ compiled functions

    def _make_step(self) -> Callable:
        objective = self.recipe.objective
        optimizer = self.optimizer
        ema_decay = self.recipe.optimizer.ema_decay
        seq_len = self.recipe.data.seq_len
        learning_rate = optimizer_learning_rate(self.recipe.optimizer, self.recipe.trainer.steps)

        def loss(params, static, tokens, labels, key):
            model = eqx.combine(params, static)
            terms = objective.batch_terms(model, tokens, key=key, labels=labels, train=True)
            return terms.loss, terms

        @eqx.filter_jit(donate="all")
        def step(state: TrainState, tokens, labels):
            key = jax.random.fold_in(state.key, state.step)
            params, static = eqx.partition(state.model, eqx.is_inexact_array)
            (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(
                params, static, tokens, labels, key
            )
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
            params = eqx.apply_updates(params, updates)
            ema_params = eqx.filter(state.ema, eqx.is_inexact_array)
            ema_params = jax.tree.map(
                lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params, params
            )
            metrics = {
                "loss": terms.loss,
                "nelbo": terms.nelbo,
                "bits_per_token": _bits_per_token(terms.nelbo, seq_len),
                "grad_norm": optax.global_norm(grads),
                "learning_rate": learning_rate(state.step),
                **{f"terms/{k}": v for k, v in terms.metrics.items()},
            }
            new_state = TrainState(
                step=state.step + 1,
                model=eqx.combine(params, static),
                opt_state=opt_state,
                ema=eqx.combine(ema_params, static),
                key=state.key,
            )
            return new_state, metrics

        return step

    def _make_eval(self) -> Callable:
        objective = self.recipe.objective

        @eqx.filter_jit
        def evaluate(model, tokens, labels, key) -> Float[Array, " batch"]:
            terms = objective.per_example_terms(model, tokens, key=key, labels=labels, train=False)
            return terms.nelbo

        return evaluate

    def _make_sample(self) -> Callable:
        sampler = self.recipe.sampler
        seq_len = self.recipe.data.seq_len

        @eqx.filter_jit
        def sample(model, key, num_samples: int, conditioning: Conditioning) -> SampleOutput:
            return sampler.sample(
                model, key=key, num_samples=num_samples, seq_len=seq_len, conditioning=conditioning
            )

        return sample

    # ------------------------------------------------------------------ evaluation and samples

    def evaluate(
        self, model: DiffusionModel, *, max_batches: int | None = None, max_examples: int | None = None
    ) -> dict[str, float]:
        """Negative ELBO over the eval split in bits per token, with its standard error
        over sequences (each sequence averaged over ``eval.time_draws`` draws)."""
        config = self.recipe.eval
        data = self.recipe.data
        limit = config.max_examples if max_examples is None else max_examples
        base_key = jax.random.PRNGKey(config.seed)
        totals: list[np.ndarray] = []
        for index, (batch, weights) in enumerate(
            eval_batches(data, batch_size=config.batch_size, max_examples=limit)
        ):
            if max_batches is not None and index >= max_batches:
                break
            if index == 0:
                validate_batch(batch, data, "eval split")
            tokens = jnp.asarray(batch["tokens"])
            labels = jnp.asarray(batch["label"]) if "label" in batch else None
            draws = [
                self._eval_fn(model, tokens, labels, jax.random.fold_in(base_key, index * 1009 + d))
                for d in range(config.time_draws)
            ]
            per_example = np.mean(np.stack([np.asarray(d) for d in draws]), axis=0)
            totals.append(per_example[weights > 0])
        values = np.concatenate(totals).astype(np.float64)
        scale = data.seq_len * math.log(2.0)
        count = len(values)
        stderr = float(values.std(ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
        return {
            "bits_per_token": float(values.mean() / scale),
            "bits_per_token_stderr": stderr / scale,
            "num_sequences": count,
            "num_tokens": count * data.seq_len,
            "time_draws": config.time_draws,
        }

    def sample(
        self,
        model: DiffusionModel,
        *,
        key: jax.Array,
        num_samples: int,
        conditioning: Conditioning | None = None,
    ) -> SampleOutput:
        return self._sample_fn(model, key, num_samples, conditioning or Conditioning())

    def write_samples(
        self, output: SampleOutput, name: str, *, conditioning: dict[str, Any] | None = None
    ) -> Path:
        """Write samples as text (one sequence a line), .npy, and a stats .json beside them
        (unigram entropy, network evaluations, and ``conditioning``: label, guidance, ...)."""
        directory = self.workdir / SAMPLES_DIR
        directory.mkdir(parents=True, exist_ok=True)
        tokens = np.asarray(output.tokens)
        text = "\n".join(self.recipe.data.decode(row) for row in tokens) + "\n"
        stats: dict[str, Any] = dict(sample_statistics(tokens, self.recipe.data.vocab_size))
        stats["num_function_evals"] = int(output.num_function_evals)
        stats["num_samples"] = int(tokens.shape[0])
        stats["sampler"] = self.recipe.names["sampler"]
        if conditioning:
            stats["conditioning"] = conditioning
        _atomic_write_text(directory / f"{name}.txt", text)
        _atomic_write_bytes(directory / f"{name}.npy", _npy_bytes(tokens))
        _atomic_write_text(directory / f"{name}.json", json.dumps(stats, indent=2) + "\n")
        return directory / f"{name}.txt"

    # ------------------------------------------------------------------ the run

    def run(self, *, stop_at_step: int | None = None) -> TrainState:
        """Train to ``trainer.steps`` (or ``stop_at_step``), resuming if possible."""
        config = self.recipe.trainer
        data = self.recipe.data
        self.prepare_workdir()
        state = self.init_state()
        iterator = train_batches(data, batch_size=config.batch_size, seed=self.recipe.seed)
        manager = checkpoint_manager(self.workdir, config.keep_checkpoints)
        try:
            latest = manager.latest_step()
            if latest is not None:
                state, iterator_state = restore_checkpoint(manager, latest, state)
                iterator.set_state(iterator_state)
                truncate_metrics(self.workdir / METRICS_FILE, latest)
            start = int(state.step)
            end = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
            _print_header(self.recipe, state, start, end)
            state = self._loop(state, iterator, manager, start, end)
            if latest is None or int(state.step) > latest:
                save_checkpoint(manager, state, iterator)
            manager.wait_until_finished()
        finally:
            manager.close()
        if int(state.step) >= config.steps:
            self._finish(state)
        return state

    def prepare_workdir(self) -> None:
        """Create the work directory, or check that it was made by the same recipe."""
        recipe_path = self.workdir / RECIPE_FILE
        if recipe_path.exists():
            saved = parse_yaml(recipe_path.read_text(), str(recipe_path)) or {}
            differences = recipe_differences(saved, self.recipe.resolved)
            if differences:
                shown = ", ".join(differences[:5])
                raise RunDirectoryError(
                    f"{self.workdir} was made by a different recipe (differs at: {shown}); "
                    f"use another --workdir, or the recipe in {recipe_path}"
                )
            return
        if self.workdir.exists() and (self.workdir / CHECKPOINT_DIR).exists():
            raise RunDirectoryError(
                f"{self.workdir} has checkpoints but no {RECIPE_FILE}; use another --workdir"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(recipe_path, self.recipe.to_yaml())

    def _loop(self, state: TrainState, iterator, manager, start: int, end: int) -> TrainState:
        config = self.recipe.trainer
        data = self.recipe.data
        tokens_per_step = config.batch_size * data.seq_len
        interactive = sys.stderr.isatty() if self.show_progress is None else self.show_progress
        bar = tqdm(
            total=end, initial=start, disable=not interactive, unit="step", dynamic_ncols=True
        )
        last_time, last_step = time.perf_counter(), start
        pending: dict[str, jax.Array] | None = None
        for step in range(start, end):
            batch = next(iterator)
            if step == start:
                validate_batch(batch, data, "train split")
            labels = jnp.asarray(batch["label"]) if "label" in batch else None
            state, metrics = self._step_fn(state, jnp.asarray(batch["tokens"]), labels)
            done = step + 1
            pending = metrics
            if done % config.log_every == 0 or done == end:
                now = time.perf_counter()
                record = {k: float(v) for k, v in jax.device_get(pending).items()}
                record["tokens_per_second"] = tokens_per_step * (done - last_step) / (now - last_time)
                last_time, last_step = now, done
                self._log({"step": done, "split": "train", **record})
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    bpt=f"{record['bits_per_token']:.3f}",
                    tok_s=f"{record['tokens_per_second']:.0f}",
                )
                if not interactive:
                    print(
                        f"step {done}/{end}  loss {record['loss']:.4f}  "
                        f"bits/token {record['bits_per_token']:.4f}  "
                        f"{record['tokens_per_second']:.0f} tokens/s",
                        flush=True,
                    )
            bar.update(1)
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                result = self.evaluate(state.ema, max_batches=config.eval_batches)
                self._log({"step": done, "split": "eval", **result})
            if config.sample_every and done % config.sample_every == 0 and done != config.steps:
                self._samples(state, done)
            if done % config.checkpoint_every == 0 and done != end:
                save_checkpoint(manager, state, iterator)
        bar.close()
        return state

    def _samples(self, state: TrainState, step: int) -> Path | None:
        if self.recipe.trainer.num_samples == 0:
            return None
        key = jax.random.fold_in(jax.random.PRNGKey(self.recipe.seed + 1), step)
        output = self.sample(state.ema, key=key, num_samples=self.recipe.trainer.num_samples)
        return self.write_samples(output, f"step_{step:08d}")

    def _finish(self, state: TrainState) -> None:
        config = self.recipe.trainer
        step = int(state.step)
        self._samples(state, step)
        if config.final_eval:
            result = self.evaluate(state.ema)
            write_eval(self.workdir, self.recipe, result, step)
            self._log({"step": step, "split": "eval", **result})
            print(
                f"eval at step {step}: {result['bits_per_token']:.4f} "
                f"± {result['bits_per_token_stderr']:.4f} bits/token "
                f"over {result['num_tokens']} tokens",
                flush=True,
            )

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.workdir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def optimizer_learning_rate(config: OptimizerConfig, total_steps: int) -> Callable:
    """The learning-rate schedule of :func:`make_optimizer`, for logging."""
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            config.learning_rate,
            config.warmup_steps,
            max(total_steps, config.warmup_steps + 1),
            config.learning_rate * config.final_lr_fraction,
        )
    return lambda step: jnp.where(
        step < config.warmup_steps,
        config.learning_rate * step / max(config.warmup_steps, 1),
        config.learning_rate,
    )


def sample_statistics(tokens: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Unigram entropy of the sampled tokens (bits), and the fraction of distinct sequences."""
    counts = np.bincount(tokens.reshape(-1), minlength=vocab_size + 1).astype(np.float64)
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    unique = len({row.tobytes() for row in tokens})
    return {
        "unigram_entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
        "distinct_fraction": unique / max(len(tokens), 1),
    }


def write_eval(workdir: Path, recipe: Recipe, result: dict[str, Any], step: int) -> Path:
    payload = {"step": step, **result, **recipe.data.reference_stats()}
    path = Path(workdir) / EVAL_FILE
    _atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def recipe_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys at which two resolved recipes differ (ignoring RESUME_MAY_DIFFER)."""
    differences = []
    for key in sorted(set(saved) | set(current), key=str):
        path = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            differences += recipe_differences(a, b, f"{path}.")
        elif a != b and path not in RESUME_MAY_DIFFER:
            differences.append(path)
    return differences


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after ``step`` (by a run that died before checkpointing)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        _atomic_write_text(path, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        (Path(workdir) / CHECKPOINT_DIR).absolute(), options=options, item_names=("state", "data")
    )


def _leaves(state: TrainState) -> dict[str, np.ndarray]:
    arrays = jax.tree.leaves(eqx.filter(state, eqx.is_array))
    return {f"leaf_{i:05d}": np.array(jax.device_get(a), copy=True) for i, a in enumerate(arrays)}


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, iterator) -> None:
    """Save the train state's arrays and the data iterator's position (host copies, so the
    next step may donate the device buffers while the save completes)."""
    manager.save(
        int(state.step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_leaves(state)),
            data=ocp.args.JsonSave(iterator.get_state()),
        ),
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager, step: int, template: TrainState
) -> tuple[TrainState, dict]:
    """Restore ``step`` into the structure of ``template``."""
    dynamic, static = eqx.partition(template, eqx.is_array)
    leaves, treedef = jax.tree.flatten(dynamic)
    target = {f"leaf_{i:05d}": np.asarray(jax.device_get(a)) for i, a in enumerate(leaves)}
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise RunDirectoryError(
            f"checkpoint {step} in {manager.directory} cannot be restored ({error}); "
            f"it was written by another recipe or is damaged"
        ) from None
    arrays = [jnp.asarray(restored.state[f"leaf_{i:05d}"]) for i in range(len(leaves))]
    state = eqx.combine(jax.tree.unflatten(treedef, arrays), static)
    return state, restored.data


def load_run(workdir: str | Path, overrides: tuple[str, ...] = ()) -> tuple[Recipe, TrainState]:
    """The recipe of a run directory and its latest checkpointed state."""
    workdir = Path(workdir)
    recipe_path = workdir / RECIPE_FILE
    if not recipe_path.exists():
        raise RunDirectoryError(
            f"{workdir} is not a ddiff run directory (no {RECIPE_FILE}); "
            f"train into it first with: ddiff run RECIPE --workdir {workdir}"
        )
    recipe = load_recipe(recipe_path, overrides)
    trainer = Trainer(recipe, workdir)
    manager = checkpoint_manager(workdir, recipe.trainer.keep_checkpoints)
    try:
        latest = manager.latest_step()
        if latest is None:
            raise RunDirectoryError(f"{workdir} has no checkpoint yet; train first with ddiff run")
        state, _ = restore_checkpoint(manager, latest, trainer.init_state())
    finally:
        manager.close()
    return recipe, state


# ---------------------------------------------------------------------- files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _print_header(recipe: Recipe, state: TrainState, start: int, end: int) -> None:
    params = eqx.filter(state.model, eqx.is_inexact_array)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    names = recipe.names
    print(
        f"ddiff: {names['objective']} with {names['process']} process, "
        f"{names['parameterization']} parameterization, {names['network']} network "
        f"({count:,} parameters); data {names['data']} (V={recipe.data.vocab_size}, "
        f"D={recipe.data.seq_len}); batch {recipe.trainer.batch_size}; "
        f"steps {start} -> {end} of {recipe.trainer.steps}",
        flush=True,
    )

