"""The trainer: jitted steps with donated buffers, EMA, evaluation, samples, checkpoints."""

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, UInt32
from tqdm import tqdm

from ddiff._capabilities import check_compatibility
from ddiff._checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_manager,
    finish_saving,
    restore_latest,
    save_checkpoint,
)
from ddiff._constant import is_constant, partition_trainable, trainable
from ddiff._data import eval_batches, metric_report, train_batches, validate_batch
from ddiff._errors import DdiffError, RecipeError, RunDirectoryError
from ddiff._images import image_grid, png_bytes
from ddiff._layers import gather_for_forward
from ddiff._mesh import (
    BATCH_AXES,
    BATCH_SPEC,
    global_batch,
    global_norm,
    make_mesh,
    place,
    reduce_gradients,
    tree_specs,
)
from ddiff._model import DiffusionModel
from ddiff._objective import AbstractObjective
from ddiff._recipe import OptimizerConfig, Recipe, eval_objectives, load_recipe, parse_yaml
from ddiff._sampler import Conditioning, SampleOutput

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
SAMPLES_DIR = "samples"

RESUME_MAY_DIFFER = frozenset({"trainer.log_every", "data.root", "data.path", "data.download"})
"""Resolved-recipe keys that may change between a run and its resumption (logging, and
where the data lie: a run may resume on another machine)."""


class TrainState(eqx.Module):
    """Everything a step changes: the model, optimizer state, EMA of the model, and the
    step counter. Randomness of step k is ``fold_in(key, k)``."""

    step: Int[Array, ""]
    model: DiffusionModel
    opt_state: Any
    ema: DiffusionModel
    key: UInt32[Array, " 2"]
    skipped_steps: Int[Array, ""]


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
    components.update(eval_objectives(recipe.eval, recipe.resolved["eval"]))
    check_compatibility(components, source=recipe.source)
    return DiffusionModel(network=network, parameterization=recipe.parameterization, process=process)


def parameter_paths(recipe: Recipe) -> list[str]:
    """Paths (``.network.head.weight``) of the model's trainable leaves, in gradient order,
    computed from shapes alone."""
    model = eqx.filter_eval_shape(build_model, recipe, jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves_with_path(model)
    return [
        jax.tree_util.keystr(path)
        for path, leaf in leaves
        if isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to
    ``final_lr_fraction`` of it at ``total_steps`` (or constant)."""
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay_steps=max(total_steps, config.warmup_steps + 1),
            end_value=config.learning_rate * config.final_lr_fraction,
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)),
            optax.constant_schedule(config.learning_rate),
        ],
        [config.warmup_steps],
    )


SCHEDULE_PATH = ".process.schedule"
"""Where a model's schedule parameters lie (``jax.tree_util.keystr`` of their paths)."""


def _adamw(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.adamw(
        learning_rate_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def parameter_groups(params: Any) -> Any:
    """``"schedule"`` for every leaf under the model's ``process.schedule``, ``"network"``
    for the others (the labels of ``optax.multi_transform``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "schedule" if jax.tree_util.keystr(path).startswith(SCHEDULE_PATH) else "network",
        params,
    )


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on :func:`learning_rate_schedule`. With ``config.schedule`` the parameters of
    the process's schedule get their own AdamW (:func:`parameter_groups`), whose unset
    settings are the network's. The trainer clips the gradient to ``grad_clip`` global
    norm before it (the norm of the whole gradient across the mesh, which an optax
    transform on one shard could not compute)."""
    if config.schedule is None:
        return _adamw(config, total_steps)
    group = dataclasses.replace(config, schedule=None, **config.schedule.settings())
    return optax.multi_transform(
        {"network": _adamw(config, total_steps), "schedule": _adamw(group, total_steps)},
        parameter_groups,
    )


def _all_finite_per_leaf(tree: Any) -> jax.Array:
    """Inside shard_map: one flag per leaf, true where the leaf is finite on every device."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)] or [jnp.bool_(True)]
    bad = jax.lax.psum((~jnp.stack(flags)).astype(jnp.int32), BATCH_AXES)
    return bad == 0


def check_divisible(recipe: Recipe, devices: int) -> None:
    """Batch sizes must split evenly over the mesh's devices."""
    for path, value in (
        ("trainer.batch_size", recipe.trainer.batch_size),
        ("eval.batch_size", recipe.eval.batch_size),
    ):
        if value % devices:
            raise RecipeError(
                f"{value} is not divisible by the mesh's {devices} devices; use a multiple of {devices}",
                source=recipe.source,
                path=path,
            )


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
    """EMA decay with warmup, min(decay, (1 + k) / (10 + k)) at step k, so a short run's
    average is not dominated by its initialisation."""
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def _bits_per_token(nats: jax.Array, seq_len: int) -> jax.Array:
    return nats / (seq_len * math.log(2.0))


_COMPILED: dict[str, tuple[Callable, Callable, Callable, dict[str, Callable]]] = {}
"""Jitted step, eval, sample and extra-objective eval functions keyed by everything they
close over (objectives, sampler, optimizer settings, sequence length), shared by every
Trainer of the process (a resumed run, ``ddiff eval`` after ``ddiff run``, tests)."""


class Trainer:
    """Runs a recipe in a work directory, resuming from its latest checkpoint."""

    def __init__(
        self,
        recipe: Recipe,
        workdir: str | Path,
        *,
        show_progress: bool | None = None,
        mesh: Mesh | None = None,
    ):
        self.recipe = recipe
        self.workdir = Path(workdir)
        self.show_progress = show_progress
        self.mesh = make_mesh(recipe.mesh) if mesh is None else mesh
        self.num_devices = self.mesh.size
        check_divisible(recipe, self.num_devices)
        self.optimizer = make_optimizer(recipe.optimizer, recipe.trainer.steps)
        extra = {
            name: objective
            for name, objective in eval_objectives(recipe.eval, recipe.resolved["eval"]).values()
        }
        cache_key = repr(
            (
                recipe.objective,
                extra,
                recipe.sampler,
                recipe.optimizer,
                recipe.trainer.steps,
                recipe.trainer.batch_size,
                recipe.data.seq_len,
                self.mesh,
            )
        )
        if cache_key not in _COMPILED:
            if len(_COMPILED) >= 8:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[cache_key] = (
                self._make_step(),
                self._make_eval(recipe.objective),
                self._make_sample(),
                {name: self._make_eval(objective) for name, objective in extra.items()},
            )
        self._step_fn, self._eval_fn, self._sample_fn, self._extra_eval_fns = _COMPILED[cache_key]

    # ------------------------------------------------------------------ state

    def init_state(self) -> TrainState:
        """A fresh state, laid out on the mesh."""
        key = jax.random.PRNGKey(self.recipe.seed)
        model_key, train_key = jax.random.split(key)
        # The recipe's components hold arrays of their own (learnable schedules, constants);
        # the donated step must own copies, so the recipe stays usable for another Trainer.
        model = jax.tree.map(
            lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, build_model(self.recipe, model_key)
        )
        params = trainable(model)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            model=model,
            opt_state=self.optimizer.init(params),
            ema=jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, model),
            key=train_key,
            skipped_steps=jnp.zeros((), jnp.int32),
        )
        return self.place(state)

    def place(self, state: TrainState) -> TrainState:
        """Lay every array of ``state`` out on the mesh (fsdp-sharded where large)."""
        dynamic, static = eqx.partition(state, eqx.is_array)
        return eqx.combine(place(dynamic, self.mesh, tree_specs(dynamic, self.mesh)), static)

    # ------------------------------------------------------------------ compiled functions

    def _make_step(self) -> Callable:
        objective = self.recipe.objective
        optimizer = self.optimizer
        config = self.recipe.optimizer
        seq_len = self.recipe.data.seq_len
        batch_size = self.recipe.trainer.batch_size
        mesh, count = self.mesh, self.mesh.size
        local_batch = batch_size // count
        learning_rate = learning_rate_schedule(config, self.recipe.trainer.steps)

        def local_step(dynamic, static, specs, tokens, labels):
            state = eqx.combine(dynamic, static)
            key = jax.random.fold_in(state.key, state.step)
            offset = jax.lax.axis_index(BATCH_AXES) * local_batch
            params, model_static = partition_trainable(state.model)

            def loss(params):
                # A Constant is one leaf of model_static (partition_trainable) and None in params.
                model = eqx.combine(model_static, gather_for_forward(params, specs), is_leaf=is_constant)
                terms = objective.per_example_terms(
                    model, tokens, key=key, labels=labels, train=True, offset=offset, total=batch_size
                )
                terms = jax.tree.map(lambda a: jnp.mean(a, axis=0), terms)
                return terms.loss, terms

            (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(params)
            grads = reduce_gradients(grads, specs, count)
            terms = jax.lax.pmean(terms, BATCH_AXES)
            grad_norm = global_norm(grads, specs)
            if config.grad_clip is not None:
                scale = jnp.where(grad_norm < config.grad_clip, 1.0, config.grad_clip / grad_norm)
                clipped = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
            else:
                clipped = grads
            updates, opt_state = optimizer.update(clipped, state.opt_state, params)
            new_params = eqx.apply_updates(params, updates)
            ema_params = trainable(state.ema)
            decay = ema_decay_at(state.step, config.ema_decay)
            new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, new_params)
            finite_grads = _all_finite_per_leaf(grads)
            finite_params = _all_finite_per_leaf(params)
            finite = jnp.all(finite_grads) & jnp.isfinite(terms.loss)

            def guard(new, old):
                return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

            metrics = {
                "loss": terms.loss,
                "nelbo": terms.nelbo,
                "bits_per_token": _bits_per_token(terms.nelbo, seq_len),
                "grad_norm": grad_norm,
                "learning_rate": learning_rate(state.step),
                "skipped_steps": state.skipped_steps + (~finite).astype(jnp.int32),
                **{f"terms/{k}": v for k, v in terms.metrics.items()},
            }
            diagnostics = {
                "nonfinite": ~finite,
                "finite_leaves": finite_grads,
                "finite_params": finite_params,
            }
            new_state = TrainState(
                step=state.step + 1,
                model=eqx.combine(guard(new_params, params), model_static, is_leaf=is_constant),
                opt_state=guard(opt_state, state.opt_state),
                ema=eqx.combine(guard(new_ema, ema_params), model_static, is_leaf=is_constant),
                key=state.key,
                skipped_steps=metrics["skipped_steps"],
            )
            return eqx.filter(new_state, eqx.is_array), metrics, diagnostics

        @eqx.filter_jit(donate="all")
        def step(state: TrainState, tokens, labels):
            dynamic, static = eqx.partition(state, eqx.is_array)
            specs = tree_specs(dynamic, mesh)
            param_specs = tree_specs(trainable(state.model), mesh)
            sharded = jax.shard_map(
                lambda d, x, y: local_step(d, static, param_specs, x, y),
                mesh=mesh,
                in_specs=(specs, BATCH_SPEC, BATCH_SPEC),
                out_specs=(specs, P(), P()),
                check_vma=False,
            )
            new_dynamic, metrics, diagnostics = sharded(dynamic, tokens, labels)
            return eqx.combine(new_dynamic, static), metrics, diagnostics

        return step

    def _make_eval(self, objective: AbstractObjective) -> Callable:
        mesh = self.mesh
        batch_size = self.recipe.eval.batch_size
        local_batch = batch_size // mesh.size

        @eqx.filter_jit
        def evaluate(model, tokens, labels, key) -> Float[Array, " batch"]:
            params, static = eqx.partition(model, eqx.is_array)
            specs = tree_specs(params, mesh)

            def local(params, tokens, labels):
                full = eqx.combine(static, gather_for_forward(params, specs))
                offset = jax.lax.axis_index(BATCH_AXES) * local_batch
                terms = objective.per_example_terms(
                    full, tokens, key=key, labels=labels, train=False, offset=offset, total=batch_size
                )
                return terms.nelbo

            return jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(specs, BATCH_SPEC, BATCH_SPEC),
                out_specs=BATCH_SPEC,
                check_vma=False,
            )(params, tokens, labels)

        return evaluate

    def _make_sample(self) -> Callable:
        sampler = self.recipe.sampler
        seq_len = self.recipe.data.seq_len
        mesh = self.mesh

        @eqx.filter_jit
        def sample(model, key, num_samples: int, conditioning: Conditioning) -> SampleOutput:
            params, static = eqx.partition(model, eqx.is_array)
            specs = tree_specs(params, mesh)
            local_samples = num_samples // mesh.size

            def local(params, conditioning):
                full = eqx.combine(static, gather_for_forward(params, specs))
                device_key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXES))
                output = sampler.sample(
                    full, key=device_key, num_samples=local_samples, seq_len=seq_len,
                    conditioning=conditioning,
                )
                evals = jax.lax.pmax(output.num_function_evals, BATCH_AXES)
                return SampleOutput(tokens=output.tokens, num_function_evals=evals)

            condition_specs = jax.tree.map(lambda _: BATCH_SPEC, conditioning)
            return jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(specs, condition_specs),
                out_specs=SampleOutput(tokens=BATCH_SPEC, num_function_evals=P()),
                check_vma=False,
            )(params, conditioning)

        return sample

    # ------------------------------------------------------------------ evaluation and samples

    def evaluate(
        self, model: DiffusionModel, *, max_batches: int | None = None, max_examples: int | None = None
    ) -> dict[str, float]:
        """Negative ELBO over the eval split in bits per token, with its standard error
        over sequences (each sequence averaged over ``eval.time_draws`` draws), and in the
        data source's ``metric`` (bits per dim, bits per char or perplexity). Each of
        ``eval.objectives`` is evaluated with the same sequences and keys and reported
        with its kind as prefix (``score_entropy_bits_per_token``, ...)."""
        config = self.recipe.eval
        data = self.recipe.data
        limit = config.max_examples if max_examples is None else max_examples
        base_key = jax.random.PRNGKey(config.seed)
        functions = {"": self._eval_fn, **{f"{name}_": fn for name, fn in self._extra_eval_fns.items()}}
        totals: dict[str, list[np.ndarray]] = {prefix: [] for prefix in functions}
        batches = eval_batches(
            data,
            batch_size=config.batch_size,
            max_examples=limit,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for index, (batch, weights) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if index == 0:
                validate_batch(batch, data, "eval split")
            tokens, labels = self._device_batch(batch)
            keys = [jax.random.fold_in(base_key, index * 1009 + d) for d in range(config.time_draws)]
            for prefix, function in functions.items():
                draws = [_to_host(function(model, tokens, labels, key)) for key in keys]
                per_example = np.mean(np.stack(draws), axis=0)
                totals[prefix].append(per_example[weights > 0])
        result: dict[str, float] = {}
        for prefix, parts in totals.items():
            values = np.concatenate(parts).astype(np.float64)
            scale = data.seq_len * math.log(2.0)
            count = len(values)
            stderr = float(values.std(ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
            bits, bits_stderr = float(values.mean() / scale), stderr / scale
            report = {
                "bits_per_token": bits,
                "bits_per_token_stderr": bits_stderr,
                **metric_report(data.metric, bits, bits_stderr),
            }
            result.update({f"{prefix}{key}": value for key, value in report.items()})
        return {
            **result,
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
        """Draw ``num_samples`` sequences, split over the mesh's devices (padded to a
        multiple of their number, then trimmed); tokens come back on the host."""
        conditioning = conditioning or Conditioning()
        padded = -(-num_samples // self.num_devices) * self.num_devices

        def pad(array):
            extra = np.repeat(np.asarray(array)[-1:], padded - num_samples, axis=0)
            return global_batch(np.concatenate([np.asarray(array), extra]), self.mesh)

        arrays, static = eqx.partition(conditioning, eqx.is_array)
        conditioning = eqx.combine(jax.tree.map(pad, arrays), static)
        output = self._sample_fn(model, key, padded, conditioning)
        return SampleOutput(
            tokens=jnp.asarray(_to_host(output.tokens)[:num_samples]),
            num_function_evals=output.num_function_evals,
        )

    def write_samples(
        self, output: SampleOutput, name: str, *, conditioning: dict[str, Any] | None = None
    ) -> Path:
        """Write samples as text (one sequence a line), .npy, and a stats .json beside them
        (unigram entropy, network evaluations, and ``conditioning``: label, guidance, ...);
        samples of image data also as a PNG grid."""
        directory = self.workdir / SAMPLES_DIR
        if jax.process_index() != 0:
            return directory / f"{name}.txt"
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
        if self.recipe.data.image_shape is not None:
            grid = image_grid(tokens, self.recipe.data.image_shape)
            _atomic_write_bytes(directory / f"{name}.png", png_bytes(grid))
        return directory / f"{name}.txt"

    # ------------------------------------------------------------------ the run

    def run(self, *, stop_at_step: int | None = None) -> TrainState:
        """Train to ``trainer.steps`` (or ``stop_at_step``), resuming from the newest intact
        checkpoint. SIGTERM or SIGINT saves a checkpoint and raises :class:`Stopped`."""
        config = self.recipe.trainer
        data = self.recipe.data
        self.prepare_workdir()
        state = self.init_state()
        iterator = train_batches(
            data,
            batch_size=config.batch_size // jax.process_count(),
            seed=self.recipe.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        manager = checkpoint_manager(self.workdir, config.keep_checkpoints)
        try:
            restored = restore_latest(manager, state, warn=_warn)
            latest = None
            if restored is not None:
                state, iterator_state, latest = restored
                iterator.set_state(iterator_state)
                truncate_metrics(self.workdir / METRICS_FILE, latest)
            start = int(state.step)
            end = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
            _print_header(self.recipe, state, self.mesh, start, end)
            with _StopSignals() as signals:
                state = self._loop(state, iterator, manager, start, end, signals)
                if latest is None or int(state.step) > latest:
                    save_checkpoint(manager, state, iterator.get_state())
                finish_saving(manager)
                if signals.received is not None and int(state.step) < end:
                    raise Stopped(signals.received, int(state.step), self.workdir)
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
        if jax.process_index() == 0:
            _atomic_write_text(recipe_path, self.recipe.to_yaml())

    def _loop(
        self, state: TrainState, iterator, manager, start: int, end: int, signals: "_StopSignals"
    ) -> TrainState:
        config = self.recipe.trainer
        data = self.recipe.data
        tokens_per_step = config.batch_size * data.seq_len
        interactive = sys.stderr.isatty() if self.show_progress is None else self.show_progress
        bar = tqdm(
            total=end, initial=start, disable=not interactive, unit="step", dynamic_ncols=True
        )
        last_time, last_step = time.perf_counter(), start
        previous: tuple[int, dict, dict] | None = None
        for step in range(start, end):
            if signals.received is not None:
                break
            batch = next(iterator)
            if step == start:
                validate_batch(batch, data, "train split")
            tokens, labels = self._device_batch(batch)
            state, metrics, diagnostics = self._step_fn(state, tokens, labels)
            done = step + 1
            if previous is not None:
                self._check_finite(*previous)
            previous = (done, metrics, diagnostics)
            if done % config.log_every == 0 or done == end:
                now = time.perf_counter()
                record = {k: float(v) for k, v in jax.device_get(metrics).items()}
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
                        f"{record['tokens_per_second']:.0f} tokens/s"
                        + (f"  skipped {int(record['skipped_steps'])}" if record["skipped_steps"] else ""),
                        flush=True,
                    )
            bar.update(1)
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                result = self.evaluate(state.ema, max_batches=config.eval_batches)
                self._log({"step": done, "split": "eval", **result})
            if config.sample_every and done % config.sample_every == 0 and done != config.steps:
                self._samples(state, done)
            if done % config.checkpoint_every == 0 and done != end:
                save_checkpoint(manager, state, iterator.get_state())
        if previous is not None:
            self._check_finite(*previous)
        bar.close()
        return state

    def _device_batch(self, batch: dict[str, np.ndarray]) -> tuple[jax.Array, jax.Array | None]:
        """This process's rows of a batch, assembled into global arrays on the mesh."""
        tokens = global_batch(np.asarray(batch["tokens"]), self.mesh)
        labels = global_batch(np.asarray(batch["label"]), self.mesh) if "label" in batch else None
        return tokens, labels

    def _check_finite(self, step: int, metrics: dict, diagnostics: dict) -> None:
        """Under ``on_nonfinite: halt``, stop with a report when step ``step`` had a
        non-finite loss or gradient (its update was not applied). Checked one step late,
        so the device is never left idle waiting for the host."""
        if self.recipe.trainer.on_nonfinite != "halt" or not bool(diagnostics["nonfinite"]):
            return
        values = jax.device_get(metrics)
        terms = [
            name.split("/", 1)[-1]
            for name, value in values.items()
            if (name in ("loss", "nelbo") or name.startswith("terms/")) and not np.isfinite(value)
        ]
        paths = parameter_paths(self.recipe)

        def listed(flags: jax.Array) -> str:
            bad = [path for path, ok in zip(paths, np.asarray(flags), strict=True) if not ok]
            return ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")

        bad_params, bad_grads = listed(diagnostics["finite_params"]), listed(diagnostics["finite_leaves"])
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(terms) or 'gradient'}"
            + (f"; non-finite parameters: {bad_params}" if bad_params else "")
            + (f"; non-finite gradients in {bad_grads}" if bad_grads else "")
            + "; the update was not applied and training halted "
            "(set trainer.on_nonfinite=skip to skip such steps)"
        )

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
            metric = self.recipe.data.metric
            in_unit = (
                f" ({metric} {result[metric]:.4f} ± {result[f'{metric}_stderr']:.4f})"
                if metric != "bits_per_token"
                else ""
            )
            print(
                f"eval at step {step}: {result['bits_per_token']:.4f} "
                f"± {result['bits_per_token_stderr']:.4f} bits/token{in_unit} "
                f"over {result['num_tokens']} tokens",
                flush=True,
            )

    def _log(self, record: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        with open(self.workdir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class NonFiniteError(DdiffError):
    """A step produced a non-finite loss or gradient under ``on_nonfinite: halt``."""


class Stopped(DdiffError):
    """Training stopped by SIGTERM or SIGINT after saving a checkpoint."""

    def __init__(self, signum: int, step: int, workdir: Path):
        self.exit_status = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint saved in {workdir}; "
            f"run the same command again to resume"
        )


class _StopSignals:
    """Within the block, the first SIGTERM or SIGINT sets ``received`` (the loop saves and
    stops at the next step boundary); a second one interrupts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _to_host(array: jax.Array) -> np.ndarray:
    """A global array's full value on every process."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def write_eval(
    workdir: Path, recipe: Recipe, result: dict[str, Any], step: int, *, name: str | None = None
) -> Path:
    payload = {"step": step, **result, **recipe.data.reference_stats()}
    path = Path(workdir) / (name or EVAL_FILE)
    if jax.process_index() == 0:
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


def check_same_shape(trained: Recipe, asked: Recipe) -> None:
    """Refuse a recipe whose data has another vocabulary size or length than the data a
    run was trained on (its network could not read them)."""
    shape = trained.data.vocab_size, trained.data.seq_len
    if shape != (asked.data.vocab_size, asked.data.seq_len):
        raise RunDirectoryError(
            f"the run was trained on data with V={shape[0]}, D={shape[1]}; the data asked "
            f"for has V={asked.data.vocab_size}, D={asked.data.seq_len}"
        )


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
    if overrides:
        check_same_shape(load_recipe(recipe_path), recipe)
    trainer = Trainer(recipe, workdir)
    manager = checkpoint_manager(workdir, recipe.trainer.keep_checkpoints)
    try:
        restored = restore_latest(manager, trainer.init_state(), warn=_warn)
    finally:
        manager.close()
    if restored is None:
        raise RunDirectoryError(f"{workdir} has no checkpoint yet; train first with ddiff run")
    return recipe, restored[0]


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


def _print_header(recipe: Recipe, state: TrainState, mesh: Mesh, start: int, end: int) -> None:
    if jax.process_index() != 0:
        return
    params = trainable(state.model)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    names = recipe.names
    batch = recipe.trainer.batch_size
    shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    print(
        f"ddiff: {names['objective']} with {names['process']} process, "
        f"{names['parameterization']} parameterization, {names['network']} network "
        f"({count:,} parameters); data {names['data']} (V={recipe.data.vocab_size}, "
        f"D={recipe.data.seq_len})\n"
        f"ddiff: mesh {shape} over {mesh.size} devices in {jax.process_count()} processes; "
        f"global batch {batch}, {batch // mesh.size} per device; "
        f"steps {start} -> {end} of {recipe.trainer.steps}",
        flush=True,
    )

