"""The benchmark's measurements of one shape: its train step (time, compile time, XLA's
cost and memory analyses) and every sampler's cost, each program the engine's own
(:class:`~ddiff.runner.trainer.engine.Engine`); what is measured is stated in
:mod:`ddiff.runner.bench`."""

import dataclasses
import os
import statistics
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
from ddiff._layers import COMPUTE_DTYPES, traced_out
from ddiff._model import DiffusionModel
from ddiff._registry import default_registry
from ddiff._sampler import (
    Conditioning,
    batched_log_mean,
    batched_log_score,
    initial_tokens,
    sample_keys,
)
from ddiff.runner.bench.recipes import BenchError, component_recipe, sampler_section, shape_recipe
from ddiff.runner.bench.report import format_result, format_sampler
from ddiff.runner.bench.shapes import FLOPS_FORMULAS, Shape
from ddiff.runner.memory import parameter_bytes
from ddiff.runner.model import build_model, check_precision_runs
from ddiff.runner.recipe import Recipe, apply_overrides
from ddiff.runner.throughput import PEAK_ENV, measure_matmul_peak, peak_flops
from ddiff.runner.trainer.ahead import AheadOfTime, abstract_train_args, scans_layers
from ddiff.runner.trainer.engine import Engine


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


_MEASURED_PEAKS: dict[str, float] = {}
"""The CPU peaks the bench measured in this process, by compute dtype."""


def bench_peak(compute: str) -> tuple[float | None, str]:
    """The peak FLOP/s of products in the compute dtype ``compute`` that the bench divides
    by: :func:`ddiff.runner.throughput.peak_flops`, except on CPU without
    ``DDIFF_PEAK_FLOPS``, where it is measured more carefully (the fastest of ten
    products in ``compute`` at n = 1024 and n = 2048, once per process and dtype)."""
    if jax.default_backend() != "cpu" or os.environ.get(PEAK_ENV):
        return peak_flops(compute)
    if compute not in _MEASURED_PEAKS:
        _MEASURED_PEAKS[compute] = max(
            measure_matmul_peak(COMPUTE_DTYPES[compute], size=size, repeats=10) for size in (1024, 2048)
        )
    return _MEASURED_PEAKS[compute], "measured"


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


def _compile(function: Any, *args: Any) -> Any:
    """The compiled program of ``function`` (a Bound compiled function) for ``args``,
    without the donation warnings of a direct lower."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        program = function.lower(*args).compile()
    return getattr(program, "compiled", program)


def bench_train_step(recipe: Recipe, *, repeats: int) -> tuple[dict[str, Any], Any]:
    """Compile the engine's train step ahead of time from the abstract state (nothing of
    the model allocated: :class:`~ddiff.runner.compile.AheadOfTime`, as ``ddiff compile``
    does), refuse it in one line if XLA's memory analysis exceeds what is available, and
    only then allocate the state and time that same executable on a batch of random
    tokens; returns the measurements and the final state."""
    batch, seq_len = recipe.trainer.batch_size, recipe.data.seq_len
    engine = Engine(recipe)
    check_precision_runs(recipe)
    args = abstract_train_args(recipe, engine.optimizer, engine.mesh)
    check_fits(
        f"the parameters, EMA and Adam moments of {recipe.source}",
        4 * parameter_bytes(args[0].model),
        "4 x the float32 parameters",
    )
    start = time.perf_counter()
    step = AheadOfTime(engine.train_step, args, mesh=engine.mesh, donate=(0,))
    compile_seconds = time.perf_counter() - start
    memory = memory_of(step.compiled)
    if memory:
        check_fits(
            f"the train step of {recipe.source}",
            memory["peak_bytes"],
            "XLA memory analysis, compiled before allocating",
            batch=batch,
            flag="--batch-size",
        )
    state = engine.init_state()
    tokens = np.asarray(
        jax.random.randint(jax.random.key(0), (batch, seq_len), 0, recipe.data.vocab_size)
    )
    labels = None if not recipe.data.num_classes else np.zeros(batch, np.int32)
    tokens, labels = engine.device_batch(
        {"tokens": tokens, **({} if labels is None else {"label": labels})}
    )
    if scans_layers(args, engine.mesh):
        counted = AheadOfTime(engine.train_step, traced_out(args), mesh=engine.mesh, donate=(0,))
        xla_flops = _cost_flops(counted.compiled)
        check_program = "train step, layer stacks traced out (compiled, not run)"
    else:
        xla_flops = _cost_flops(step.compiled)
        check_program = "train step (the one timed)"
    holder = [state]

    def run() -> None:
        new_state, metrics, _ = step(holder[0], tokens, labels)
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
    sample = Engine(recipe).sample_program()
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
    batch_size: int | None = None,
    sample_batch: int | None = None,
    overrides: Sequence[str] = (),
    repeats: int | None = None,
    sample_repeats: int = 1,
    samplers: Sequence[str] | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every measurement of one shape (the module docstring), as a JSON-ready mapping;
    each part's lines of the terminal table go to ``report`` as soon as measured. MFU is
    against the peak of the recipe's compute dtype (:func:`bench_peak`), which the result
    names (``peak_precision``, ``peak_source``)."""
    if sample_batch is not None:
        shape = dataclasses.replace(shape, sample_batch=sample_batch)
    recipe = shape_recipe(shape, batch_size=batch_size, overrides=overrides)
    try:
        train, state = bench_train_step(recipe, repeats=repeats or shape.repeats)
    except Exception as error:
        if _is_resource_exhausted(error):
            raise BenchError(
                f"shape {shape.name!r} ran out of memory at batch {recipe.trainer.batch_size}; "
                f"lower --batch-size"
            ) from None
        raise
    batch, seq_len = recipe.trainer.batch_size, recipe.data.seq_len
    peak, peak_source = bench_peak(recipe.precision.compute)
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
        "peak_precision": recipe.precision.compute,
        "peak_source": peak_source,
        "mfu": None
        if step_flops is None or not peak
        else step_flops / train["step_seconds"] / peak,
    }
    del state
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
