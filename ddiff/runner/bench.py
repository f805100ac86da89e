"""``ddiff bench [SHAPE ...] [--output FILE]``: train-step throughput, model FLOPs, MFU,
compile time and memory of named shapes, and the cost of every registered sampler.

What is timed is what a run executes: the train step is the :class:`ddiff.runner.Trainer`'s
own jitted step (``shard_map``, gradient reduction, AdamW, EMA and finite checks) built from
a recipe, and sampling is the Trainer's jitted sampling loop. Times are medians over
repeated calls after compilation, each ended by ``block_until_ready``.

- Model FLOPs per token of a train step are 3 x the network's forward FLOPs per position
  (:meth:`ddiff.AbstractNetwork.flops_per_token`, a formula stated per network), checked
  against XLA's cost analysis of the compiled step. XLA counts the body of a loop once,
  so the check compiles (without running) the step of the same model with its layer
  stacks unrolled when the timed one scans them.
- MFU is model FLOPs per second over the peak of :func:`ddiff.runner.throughput.peak_flops`
  (on CPU measured here, the fastest of ten n x n products, n = 1024 and 2048).
- Peak memory is XLA's memory analysis of the compiled step (arguments + outputs -
  aliased + temporaries); a batch that would not fit is refused before it runs.
- Every registered sampler is run on the shape's network (with a process and
  parameterization it accepts, :data:`FAMILIES`) for ``sample_steps`` steps: its cost per
  network evaluation beside one batched forward pass of the same batch, its evaluations
  per sample, and the host callbacks in its compiled loop (0: no host round trip).
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff import _capabilities as caps
from ddiff._constant import trainable
from ddiff._errors import DdiffError, IncompatibleComponentsError, RecipeError
from ddiff._layers import LayerStack
from ddiff._model import DiffusionModel
from ddiff._registry import default_registry
from ddiff._sampler import (
    Conditioning,
    batched_log_mean,
    batched_log_score,
    initial_tokens,
    sample_keys,
)
from ddiff.runner.files import atomic_write_text
from ddiff.runner.mesh import make_mesh
from ddiff.runner.recipe import Recipe, apply_overrides, build_recipe
from ddiff.runner.throughput import PEAK_ENV, measure_matmul_peak, peak_flops
from ddiff.runner.trainer.compiled import compiled
from ddiff.runner.trainer.loop import Trainer
from ddiff.runner.trainer.sampling import make_sample
from ddiff.runner.trainer.state import build_model, check_precision_runs


class BenchError(DdiffError):
    """A benchmark that cannot run as asked (unknown shape, a batch that does not fit)."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """A named benchmark shape: a recipe built in code and what it is timed at.

    Attributes:
        name, description: how it is asked for and shown.
        recipe: the recipe mapping (its ``trainer.batch_size`` is replaced by the batch).
        batch_size: train batch on CPU; ``accelerator_batch_size`` on GPU and TPU.
        sample_batch, sample_steps: the sampling runs' batch and steps (samplers with a
            ``steps`` setting take ``sample_steps``; first-hitting samplers unmask
            length / ``sample_steps`` tokens per call).
        repeats: timed train steps (the median is reported).
    """

    name: str
    description: str
    recipe: dict[str, Any]
    batch_size: int
    accelerator_batch_size: int
    sample_batch: int
    sample_steps: int
    repeats: int = 10


def _md4_recipe(*, network: dict[str, Any], vocab: int, seq_len: int) -> dict[str, Any]:
    """MD4 (continuous-time ELBO, linear schedule, AdamW, EMA) with ``network`` on a
    synthetic source of ``vocab`` symbols and length ``seq_len`` (only its sizes are used:
    the timed batches are random tokens)."""
    return {
        "seed": 0,
        "data": {
            "kind": "markov",
            "num_symbols": vocab,
            "length": seq_len,
            "num_train": 64,
            "num_eval": 16,
        },
        "process": {"kind": "masked", "schedule": {"kind": "linear"}},
        "parameterization": {"kind": "mean"},
        "network": network,
        "objective": {"kind": "md4_elbo"},
        "sampler": {"kind": "ancestral", "grid": "cosine"},
        "optimizer": {
            "learning_rate": 3e-4,
            "warmup_steps": 2000,
            "decay": "cosine",
            "weight_decay": 0.0,
            "b2": 0.999,
            "grad_clip": None,
            "ema_decay": 0.9999,
        },  # fmt: skip
        "trainer": {
            "steps": 1_000_000,
            "log_every": 1000,
            "checkpoint_every": 1000,
            "num_samples": 0,
        },
        "eval": {"batch_size": 1, "time_draws": 1},
        "mesh": {"data": 1, "fsdp": 1},
    }


def _md4_transformer(dim: int, depth: int, heads: int, dropout: float = 0.0) -> dict[str, Any]:
    return {
        "kind": "md4_transformer", "dim": dim, "depth": depth, "heads": heads, "cond_dim": 64,
        "mlp": "glu", "dropout": dropout, "depth_scaled_init": True,
    }  # fmt: skip


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape(
            name="md4-text8-small",
            description="MD4 transformer 4 x 256 (4 heads, GLU, adaLN-zero), L=256, V=27",
            recipe=_md4_recipe(network=_md4_transformer(256, 4, 4), vocab=27, seq_len=256),
            batch_size=16,
            accelerator_batch_size=16,
            sample_batch=8,
            sample_steps=64,
        ),
        Shape(
            name="md4-s",
            description="MD4-S: MD4 transformer 12 x 768 (12 heads), L=1024, V=50257 (GPT-2)",
            recipe=_md4_recipe(network=_md4_transformer(768, 12, 12), vocab=50257, seq_len=1024),
            batch_size=2,
            accelerator_batch_size=32,
            sample_batch=2,
            sample_steps=4,
            repeats=3,
        ),
        Shape(
            name="cifar-unet",
            description="MD4 CIFAR-10 UNet: 128 channels, 32 + 33 residual blocks, 32x32x3, V=256",
            recipe=_md4_recipe(
                network={
                    "kind": "unet",
                    "image_shape": [32, 32, 3],
                    "channels": 128,
                    "num_blocks": 32,
                    "dropout": 0.1,
                },  # fmt: skip
                vocab=256,
                seq_len=3072,
            ),
            batch_size=2,
            accelerator_batch_size=64,
            sample_batch=2,
            sample_steps=4,
            repeats=3,
        ),
        Shape(
            name="tiny",
            description="MD4 transformer 2 x 32 (2 heads), L=16, V=5 (for tests)",
            recipe=_md4_recipe(network=_md4_transformer(32, 2, 2), vocab=5, seq_len=16),
            batch_size=4,
            accelerator_batch_size=4,
            sample_batch=2,
            sample_steps=4,
            repeats=2,
        ),
    )
}
"""The named shapes."""

REQUIRED_SETTINGS: dict[str, dict[str, Any]] = {
    "bd3lm_elbo": {"block_size": 4},
    "bd3lm": {"block_size": 4, "inner": {"kind": "first_hitting"}},
    "semi_ar": {"block_length": 4, "inner": {"kind": "first_hitting"}},
}
"""Settings the bench gives components that have required keys (every shape's length is
a multiple of 4)."""

FAMILIES: dict[str, dict[str, Any]] = {
    "md4": {
        "process": {"kind": "masked", "schedule": {"kind": "linear"}},
        "parameterization": {"kind": "mean"},
        "objective": {"kind": "md4_elbo"},
        "sampler": {"kind": "ancestral"},
    },
    "genmd4": {
        "process": {"kind": "masked", "schedule": {"kind": "learnable_poly"}},
        "parameterization": {"kind": "mean"},
        "objective": {"kind": "genmd4_elbo"},
        "sampler": {"kind": "genmd4_ancestral"},
    },
    "sedd": {
        "process": {"kind": "masked", "schedule": {"kind": "loglinear"}},
        "parameterization": {"kind": "score"},
        "objective": {"kind": "score_entropy"},
        "sampler": {"kind": "analytic"},
    },
    "d3pm": {
        "process": {"kind": "masked", "schedule": {"kind": "jsd"}},
        "parameterization": {"kind": "mean"},
        "objective": {"kind": "d3pm_vb"},
        "sampler": {"kind": "d3pm_ancestral"},
    },
    "campbell": {
        "process": {"kind": "masked", "schedule": {"kind": "linear"}},
        "parameterization": {"kind": "mean"},
        "objective": {"kind": "campbell_elbo"},
        "sampler": {"kind": "tau_leaping"},
    },
    "uniform": {
        "process": {"kind": "uniform", "schedule": {"kind": "geometric"}},
        "parameterization": {"kind": "score"},
        "objective": {"kind": "score_entropy"},
        "sampler": {"kind": "analytic"},
    },
    "bd3lm": {
        "process": {"kind": "masked", "schedule": {"kind": "linear"}},
        "parameterization": {"kind": "mean"},
        "objective": {"kind": "bd3lm_elbo", **REQUIRED_SETTINGS["bd3lm_elbo"]},
        "sampler": {"kind": "bd3lm", **REQUIRED_SETTINGS["bd3lm"]},
    },
    "autoregressive": {
        "process": {"kind": "left_to_right"},
        "parameterization": {"kind": "next_token"},
        "objective": {"kind": "next_token_nll"},
        "sampler": {"kind": "left_to_right"},
        "network": {"kind": "causal_transformer"},
    },
}
"""Process, parameterization, objective and sampler sections that pair with each other;
a sampler or objective is tried in place of its family's, in order (after the shape's own
family), each also with a network that ignores time."""

FLOPS_FORMULAS = {
    "md4_transformer": "6 N + 12 L d T (N: per-position matrix weights of the blocks and head)",
    "transformer": "6 N + 12 L d T (N: per-position matrix weights of the blocks and head)",
    "unet": "3 x (2 x conv weights per pixel + attention 8 C^2 + 4 H W C per pixel) / sub-pixels",
}
"""The train-step FLOPs formula of each built-in network, as written in its docstring."""


# --------------------------------------------------------------------------- recipes


def shape_recipe(
    shape: Shape, *, batch_size: int | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """The shape's recipe at ``batch_size`` (default: the shape's batch for the backend),
    with ``key.path=value`` overrides."""
    raw = dict(shape.recipe)
    default = shape.batch_size if jax.default_backend() == "cpu" else shape.accelerator_batch_size
    raw["trainer"] = {**raw["trainer"], "batch_size": batch_size or default}
    raw = apply_overrides(raw, overrides, "--set")
    return build_recipe(raw, source=f"bench shape {shape.name}")


def _variant(
    raw: dict[str, Any],
    family: dict[str, Any],
    slot: str,
    section: dict[str, Any],
    network: dict[str, Any],
) -> dict[str, Any]:
    """The recipe ``raw`` with a family's components (and its network kind, whose width,
    depth and heads are the shape's), the ``slot`` component ``section`` and ``network``
    settings."""
    base = raw["network"]
    if "network" in family and family["network"]["kind"] != base["kind"]:
        sizes = {key: base[key] for key in ("dim", "depth", "heads") if key in base}
        base = {**family["network"], **sizes}
    components = {key: value for key, value in family.items() if key != "network"}
    return {**raw, **components, slot: section, "network": {**base, **network}}


def component_recipe(raw: dict[str, Any], slot: str, section: dict[str, Any]) -> tuple[str, Recipe]:
    """The first family (the recipe's own, then :data:`FAMILIES`; each with its network,
    then with ``time_conditioned: false``) in which the ``slot`` component ``section``
    (``{"kind": ...}``) builds and pairs with every other component, as ``(family name,
    recipe)``; :class:`BenchError` listing the families tried when none does."""
    own = {key: raw[key] for key in ("process", "parameterization", "objective", "sampler")}
    section = {**REQUIRED_SETTINGS.get(section["kind"], {}), **section}
    tried = []
    for family_name, family in [("recipe", own), *FAMILIES.items()]:
        for network in ({}, {"time_conditioned": False}):
            name = family_name + ("" if not network else ", time-independent network")
            tried.append(name)
            try:
                recipe = build_recipe(_variant(raw, family, slot, section, network), source=name)
                eqx.filter_eval_shape(build_model, recipe, jax.random.key(0))
            except IncompatibleComponentsError:
                continue
            except RecipeError as error:
                if error.path is not None and error.path.split(".")[0] in (
                    "process",
                    "parameterization",
                    "objective",
                    "sampler",
                ):
                    continue
                raise
            return name, recipe
    raise BenchError(
        f"{slot} {section['kind']!r} pairs with none of the families tried ({'; '.join(tried)}); "
        f"add one it accepts to ddiff.runner.bench.FAMILIES"
    )


def sampler_section(name: str, shape: Shape, seq_len: int) -> dict[str, Any]:
    """The sampler ``name`` at the shape's sampling steps: ``steps`` when it has that
    setting, else ``tokens_per_call`` = length / steps when it has that one."""
    fields = {field.name for field in dataclasses.fields(default_registry().get("sampler", name))}
    section: dict[str, Any] = {"kind": name}
    if "steps" in fields:
        section["steps"] = shape.sample_steps
    elif "tokens_per_call" in fields:
        section["tokens_per_call"] = -(-seq_len // shape.sample_steps)
    return section


# --------------------------------------------------------------------------- measurement


def median_time(
    function: Callable[[], Any], repeats: int, warmup: int = 1
) -> tuple[float, list[float]]:
    """Median wall time of ``function()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_peak(compute: str) -> tuple[float | None, str]:
    """The peak FLOP/s the bench divides by: :func:`ddiff.runner.throughput.peak_flops`,
    except on CPU without ``DDIFF_PEAK_FLOPS``, where it is measured more carefully (the
    fastest of ten products at n = 1024 and n = 2048)."""
    if jax.default_backend() != "cpu" or os.environ.get(PEAK_ENV):
        return peak_flops(compute)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[compute]
    return max(
        measure_matmul_peak(dtype, size=size, repeats=10) for size in (1024, 2048)
    ), "measured"


def available_bytes() -> int | None:
    """Memory the default device can still allocate: the accelerator's limit minus what is
    in use, or on CPU the host's available memory (None when unknown)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_of(compiled_program: Any) -> dict[str, int]:
    """XLA's memory analysis of a compiled program: arguments, outputs, aliased,
    temporaries, and the peak (arguments + outputs - aliased + temporaries)."""
    analysis = compiled_program.memory_analysis()
    if analysis is None:
        return {}
    names = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
    )
    out = {name: int(getattr(analysis, name)) for name in names}
    out["peak_bytes"] = (
        out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
        + out["temp_size_in_bytes"]
    )  # fmt: skip
    return out


def _size(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_fits(
    what: str, needed: int, basis: str, *, batch: int | None = None, flag: str = ""
) -> None:
    """Refuse to run ``what`` when it needs (by ``basis``) more memory than is
    available, in one line naming what to change: the batch ``flag`` when ``batch`` is
    given (memory beyond the fixed state grows about linearly in it), else the shape."""
    free = available_bytes()
    if free is None or needed <= free:
        return
    if batch is None:
        fix = "choose a smaller shape or a machine with more memory"
    else:
        fix = f"lower {flag} (about {max(1, int(batch * free / needed))} may fit)"
        what = f"{what} at batch {batch}"
    raise BenchError(
        f"not enough memory for {what}: about {_size(needed)} needed ({basis}), "
        f"{_size(free)} available; {fix}"
    )


def _is_resource_exhausted(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def _cost_flops(compiled_program: Any) -> float | None:
    cost = compiled_program.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _unroll(tree: Any) -> Any:
    """``tree`` with every :class:`ddiff.LayerStack` unrolled (the same values)."""

    def one(node: Any) -> Any:
        if isinstance(node, LayerStack):
            return LayerStack(layers=_unroll(node.layers), count=node.count, scan=False)
        return node

    return jax.tree.map(one, tree, is_leaf=lambda node: isinstance(node, LayerStack))


def _scans(tree: Any) -> bool:
    stacks = [
        n
        for n in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, LayerStack))
        if isinstance(n, LayerStack)
    ]
    return any(stack.scan for stack in stacks)


def _compile(function: Any, *args: Any) -> Any:
    """The compiled program of ``function`` (a Bound compiled function) for ``args``; the
    donation warnings a direct lower gives (the step donates its batch, which no output
    can reuse, and suppresses them when called) are dropped here too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        program = function.lower(*args).compile()
    return getattr(program, "compiled", program)


def bench_train_step(recipe: Recipe, *, repeats: int) -> tuple[dict[str, Any], Trainer, Any]:
    """Compile and time the Trainer's jitted train step on a batch of random tokens;
    returns the measurements, the Trainer and the final state."""
    batch, seq_len = recipe.trainer.batch_size, recipe.data.seq_len
    trainer = Trainer(recipe, "/nonexistent-bench-workdir", show_progress=False)
    check_precision_runs(recipe)
    shapes = jax.tree.leaves(eqx.filter_eval_shape(build_model, recipe, jax.random.key(0)))
    floating = [a for a in shapes if jnp.issubdtype(a.dtype, jnp.inexact)]
    model_bytes = sum(a.size * a.dtype.itemsize for a in floating)
    check_fits(
        f"the parameters, EMA and Adam moments of {recipe.source}",
        4 * model_bytes,
        "4 x the float32 parameters",
    )
    state = trainer.init_state()
    tokens = np.asarray(
        jax.random.randint(jax.random.key(0), (batch, seq_len), 0, recipe.data.vocab_size)
    )
    labels = None if not recipe.data.num_classes else np.zeros(batch, np.int32)
    tokens, labels = trainer._device_batch(
        {"tokens": tokens, **({} if labels is None else {"label": labels})}
    )
    start = time.perf_counter()
    program = _compile(trainer._step_fn, state, tokens, labels)
    compile_seconds = time.perf_counter() - start
    memory = memory_of(program)
    if memory:
        needed = (
            memory["output_size_in_bytes"]
            - memory["alias_size_in_bytes"]
            + memory["temp_size_in_bytes"]
        )
        check_fits(
            f"the train step of {recipe.source}",
            needed,
            "XLA memory analysis",
            batch=batch,
            flag="--batch-size",
        )
    if _scans(state.model):
        unrolled = dataclasses.replace(
            state,
            model=_unroll(state.model),
            ema=_unroll(state.ema),
            opt_state=_unroll(state.opt_state),
        )
        xla_flops = _cost_flops(_compile(trainer._step_fn, unrolled, tokens, labels))
        check_program = "train step, layer stacks unrolled (compiled, not run)"
    else:
        xla_flops = _cost_flops(program)
        check_program = "train step (the one timed)"
    holder = [state]

    def run() -> None:
        new_state, metrics, _ = trainer._step_fn(holder[0], tokens, labels)
        jax.block_until_ready((new_state, metrics))
        holder[0] = new_state

    seconds, times = median_time(run, repeats, warmup=2)
    return (
        {
            "step_seconds": seconds,
            "step_times": times,
            "compile_seconds": compile_seconds,
            "tokens_per_second": batch * seq_len / seconds,
            "xla_flops_per_step": xla_flops,
            "xla_check_program": check_program,
            "memory": memory,
        },
        trainer,
        holder[0],
    )


def host_callbacks(jaxpr: Any) -> tuple[int, list[str]]:
    """Host callbacks (``pure_callback``, ``io_callback``, ``debug_callback``, ...) in a
    jaxpr and its sub-jaxprs, and the loop primitives it runs (``scan``, ``while``)."""
    callbacks, loops = 0, []

    def walk(inner: Any) -> None:
        nonlocal callbacks
        for eqn in inner.eqns:
            name = eqn.primitive.name
            if "callback" in name:
                callbacks += 1
            if name in ("scan", "while"):
                loops.append(name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr)
    return callbacks, loops


def bench_sampler(name: str, shape: Shape, raw: dict[str, Any], *, repeats: int) -> dict[str, Any]:
    """Run the sampler ``name`` at the shape's sampling batch and steps: its time per
    network evaluation, one batched forward pass of the same batch, evaluations per
    sample, and the host callbacks of its compiled loop."""
    seq_len = raw["data"]["length"]
    family, recipe = component_recipe(raw, "sampler", sampler_section(name, shape, seq_len))
    model = build_model(recipe, jax.random.key(0))
    mesh = make_mesh(recipe.mesh)
    sample = compiled(make_sample, (recipe.sampler,), seq_len=seq_len, mesh=mesh)
    conditioning = Conditioning()
    key = jax.random.key(1)
    first = jnp.asarray(0, jnp.int32)
    count = shape.sample_batch
    jaxpr = eqx.filter_make_jaxpr(sample.function)(
        sample.arrays, model, key, first, count, conditioning
    )[0]
    callbacks, loops = host_callbacks(jaxpr.jaxpr)
    start = time.perf_counter()
    program = _compile(sample, model, key, first, count, conditioning)
    compile_seconds = time.perf_counter() - start
    memory = memory_of(program)
    if memory:
        check_fits(
            f"sampler {name!r}",
            memory["temp_size_in_bytes"],
            "XLA memory analysis",
            batch=count,
            flag="--sample-batch",
        )
    evaluations = [0]

    def run() -> None:
        output = sample(model, key, first, count, conditioning)
        jax.block_until_ready(output)
        evaluations[0] = int(output.num_function_evals)

    seconds, _ = median_time(run, repeats, warmup=1)
    scores = caps.MEAN not in model.parameterization.capabilities()
    predict = batched_log_score if scores else batched_log_mean
    x = initial_tokens(
        model.process, keys=sample_keys(key, 0, count), seq_len=seq_len, conditioning=conditioning
    )

    @eqx.filter_jit
    def forward(model: DiffusionModel, x: jax.Array) -> jax.Array:
        return predict(model, x, jnp.float32(0.5), conditioning)[0]

    forward_seconds, _ = median_time(
        lambda: forward(model, x).block_until_ready(), max(5, repeats), warmup=1
    )
    per_evaluation = seconds / max(evaluations[0], 1)
    return {
        "family": family,
        "settings": {k: v for k, v in recipe.resolved["sampler"].items() if k != "kind"},
        "batch": count,
        "evaluations_per_sample": evaluations[0],
        "sample_seconds": seconds,
        "seconds_per_evaluation": per_evaluation,
        "forward_seconds": forward_seconds,
        "evaluation_over_forward": per_evaluation / forward_seconds,
        "host_callbacks": callbacks,
        "loops": sorted(set(loops)),
        "compile_seconds": compile_seconds,
        "peak_bytes": memory.get("peak_bytes"),
    }


def bench_shape(
    shape: Shape,
    *,
    peak: float | None,
    batch_size: int | None = None,
    sample_batch: int | None = None,
    overrides: Sequence[str] = (),
    repeats: int | None = None,
    sample_repeats: int = 1,
    samplers: Sequence[str] | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every measurement of one shape (the module docstring), as a JSON-ready mapping;
    each part's lines of the terminal table go to ``report`` as soon as measured."""
    if sample_batch is not None:
        shape = dataclasses.replace(shape, sample_batch=sample_batch)
    recipe = shape_recipe(shape, batch_size=batch_size, overrides=overrides)
    try:
        train, trainer, state = bench_train_step(recipe, repeats=repeats or shape.repeats)
    except Exception as error:
        if _is_resource_exhausted(error):
            raise BenchError(
                f"shape {shape.name!r} ran out of memory at batch {recipe.trainer.batch_size}; "
                f"lower --batch-size"
            ) from None
        raise
    batch, seq_len = recipe.trainer.batch_size, recipe.data.seq_len
    forward = state.model.network.flops_per_token(seq_len)
    flops_per_token = None if forward is None else 3.0 * forward
    step_flops = None if flops_per_token is None else flops_per_token * batch * seq_len
    kind = recipe.names["network"]
    result: dict[str, Any] = {
        "shape": shape.name,
        "description": shape.description,
        "network": recipe.resolved["network"],
        "precision": recipe.precision.compute,
        "batch_size": batch,
        "seq_len": seq_len,
        "vocab_size": recipe.data.vocab_size,
        "parameters": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainable(state.model))),
        "flops_per_token": flops_per_token,
        "forward_flops_per_token": forward,
        "flops_formula": FLOPS_FORMULAS.get(kind, "3 x network.flops_per_token(T)"),
        "model_flops_per_step": step_flops,
        **train,
        "xla_over_model_flops": (
            train["xla_flops_per_step"] / step_flops
            if train["xla_flops_per_step"] and step_flops
            else None
        ),
        "peak_flops": peak,
        "mfu": None
        if step_flops is None or not peak
        else step_flops / train["step_seconds"] / peak,
    }
    del state, trainer
    report(format_result(result))
    names = default_registry().names("sampler") if samplers is None else list(samplers)
    sampling: dict[str, Any] = {}
    raw = {**shape.recipe, "trainer": {**shape.recipe["trainer"], "batch_size": batch}}
    raw = apply_overrides(raw, overrides, "--set")
    for name in names:
        try:
            sampling[name] = bench_sampler(name, shape, raw, repeats=sample_repeats)
        except BenchError as error:
            sampling[name] = {"skipped": str(error)}
        except Exception as error:
            if not _is_resource_exhausted(error):
                raise
            sampling[name] = {
                "skipped": f"out of memory at sample batch {shape.sample_batch}; lower --sample-batch"
            }
        report(format_sampler(name, sampling[name]))
    result["sampling"] = sampling
    return result


# --------------------------------------------------------------------------- output


def format_result(result: dict[str, Any]) -> str:
    """The train-step lines of the terminal table."""
    memory = result["memory"].get("peak_bytes", 0) / 2**20
    mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    peak = "n/a" if not result["peak_flops"] else f"{result['peak_flops'] / 1e9:.0f} GFLOP/s"
    ratio = (
        "n/a" if result["xla_over_model_flops"] is None else f"{result['xla_over_model_flops']:.3f}"
    )
    flops = (
        "n/a" if result["flops_per_token"] is None else f"{result['flops_per_token'] / 1e6:.2f}M"
    )
    return "\n".join(
        [
            f"{result['shape']}: {result['description']}; batch {result['batch_size']}, {result['precision']}",
            f"  parameters {result['parameters']:,}; model FLOPs/token {flops} = {result['flops_formula']}",
            f"  XLA cost analysis / model FLOPs {ratio} ({result['xla_check_program']})",
            f"  train step {result['step_seconds'] * 1e3:9.1f} ms  {result['tokens_per_second']:9.0f} tokens/s  "
            f"MFU {mfu} of {peak}  compile {result['compile_seconds']:.1f} s  peak memory {memory:.0f} MiB",
        ]
    )


def format_sampler(name: str, sampler: dict[str, Any]) -> str:
    """One sampler's line of the terminal table."""
    if "skipped" in sampler:
        return f"  sampler {name:<16} skipped: {sampler['skipped']}"
    return (
        f"  sampler {name:<16} {sampler['seconds_per_evaluation'] * 1e3:8.1f} ms/evaluation "
        f"({sampler['evaluation_over_forward']:.2f} x one forward pass of {sampler['forward_seconds'] * 1e3:.1f} ms), "
        f"{sampler['evaluations_per_sample']} evaluations/sample, host callbacks {sampler['host_callbacks']}, "
        f"{sampler['family']}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ddiff bench`` command's arguments."""
    parser.add_argument(
        "shapes",
        nargs="*",
        metavar="SHAPE",
        help=f"named shapes (default md4-text8-small): {', '.join(SHAPES)}",
    )
    parser.add_argument("--output", help="also write every measurement to this JSON file")
    parser.add_argument("--batch-size", type=int, help="train batch (default: the shape's)")
    parser.add_argument("--sample-batch", type=int, help="sampling batch (default: the shape's)")
    parser.add_argument(
        "--precision", choices=["float32", "bfloat16", "float16"], help="precision.compute"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed train steps, median reported (default: the shape's)"
    )
    parser.add_argument("--sample-repeats", type=int, default=1, help="timed runs of each sampler")
    parser.add_argument(
        "--samplers",
        nargs="*",
        metavar="NAME",
        help="samplers to run (default: every registered one; none: --samplers)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override, e.g. network.scan_layers=true",
    )


def run_command(args: argparse.Namespace) -> None:
    """Run ``ddiff bench``: each shape's lines on the terminal, everything in ``--output``."""
    names = args.shapes or ["md4-text8-small"]
    for name in names:
        if name not in SHAPES:
            raise BenchError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--sample-batch", args.sample_batch),
        ("--repeats", args.repeats),
    ):
        if value is not None and value < 1:
            raise BenchError(f"{flag} must be >= 1, got {value}")
    overrides = list(args.set) + ([f"precision.compute={args.precision}"] if args.precision else [])
    registered = default_registry().names("sampler")
    unknown = [name for name in args.samplers or [] if name not in registered]
    if unknown:
        raise BenchError(f"unknown sampler {unknown[0]!r}; registered: {', '.join(registered)}")
    first = shape_recipe(SHAPES[names[0]], batch_size=args.batch_size, overrides=overrides)
    check_precision_runs(first)
    compute = first.precision.compute
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    peak, source = bench_peak(compute)
    device = jax.devices()[0]
    shown = "unknown" if peak is None else f"{peak / 1e9:.1f} GFLOP/s"
    print(
        f"{device.platform} ({device.device_kind}) {compute} peak {shown} ({source}); load average {load}",
        flush=True,
    )
    results = []
    for name in names:
        result = bench_shape(
            SHAPES[name], peak=peak, batch_size=args.batch_size, sample_batch=args.sample_batch,
            overrides=overrides, repeats=args.repeats, sample_repeats=args.sample_repeats,
            samplers=args.samplers, report=lambda line: print(line, flush=True),
        )  # fmt: skip
        results.append(result)
    if args.output:
        payload = {
            "backend": device.platform,
            "device_kind": device.device_kind,
            "device_count": jax.device_count(),
            "jax_version": jax.__version__,
            "load_average": load,
            "precision": compute,
            "peak_flops": peak,
            "peak_source": source,
            "results": results,
        }
        atomic_write_text(
            Path(args.output), json.dumps(payload, indent=2, default=_json_default) + "\n"
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks``: the same as ``ddiff bench``."""
    from ddiff.runner.cli import main as ddiff_main

    return ddiff_main(["bench", *(sys.argv[1:] if argv is None else argv)])
