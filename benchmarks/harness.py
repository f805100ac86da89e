"""Train-step and sampling-step timings of a recipe, with model FLOPs, MFU and memory.

What is timed is what a run executes: the train step is the :class:`ddiff.runner.Trainer`'s own
jitted step (shard_map, EMA, finite checks and all) built from a recipe, and sampling is
the Trainer's jitted sampling loop. Times are medians over repeated calls after
compilation, each ended by ``block_until_ready``.

Model FLOPs of the MD4 transformer per token (the PaLM appendix-B convention):

    train: 6 N + 12 L d T        forward only: 2 N + 4 L d T

with N the parameters of the matrix products applied at every position (the blocks'
attention and feed-forward weights and the output head; not the embedding lookup nor
the per-sequence conditioning), L the depth, d the width and T the sequence length
(the 12 L d T counts the two attention products QK^T and PV, forward and backward).
The count is checked against XLA's cost analysis of the compiled step.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import ddiff
import ddiff.runner


@dataclasses.dataclass(frozen=True)
class Shape:
    """A named benchmark shape: a recipe built in code and what it is timed at."""

    name: str
    description: str
    recipe: dict[str, Any]
    batch_size: int
    sample_batch: int
    sample_steps: int


def md4_text_recipe(
    *,
    dim: int,
    depth: int,
    heads: int,
    seq_len: int,
    vocab: int,
    batch_size: int,
    sample_steps: int,
    network: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """MD4 (continuous-time ELBO, linear schedule, AdamW) with the paper's transformer on a
    synthetic source of ``vocab`` symbols and length ``seq_len`` (text8-like: V=27)."""
    return {
        "seed": 0,
        "data": {
            "kind": "markov", "num_symbols": vocab, "length": seq_len, "concentration": 0.1,
            "num_train": 64, "num_eval": 16,
        },  # fmt: skip
        "process": {"kind": "masked", "schedule": {"kind": "linear"}},
        "parameterization": {"kind": "mean"},
        "network": {
            "kind": "md4_transformer", "dim": dim, "depth": depth, "heads": heads,
            "cond_dim": 64, "mlp": "glu", "dropout": 0.0, "depth_scaled_init": True,
            **(network or {}),
        },  # fmt: skip
        "objective": {"kind": "md4_elbo"},
        "sampler": {"kind": "ancestral", "steps": sample_steps, "grid": "cosine"},
        "optimizer": {
            "learning_rate": 3e-4, "warmup_steps": 2000, "decay": "cosine", "weight_decay": 0.0,
            "b2": 0.999, "grad_clip": None, "ema_decay": 0.9999,
        },  # fmt: skip
        "trainer": {
            "steps": 1_000_000, "batch_size": batch_size, "log_every": 1000, "eval_every": 0,
            "checkpoint_every": 1000, "num_samples": 0,
        },  # fmt: skip
        "eval": {"batch_size": batch_size, "time_draws": 1},
        "mesh": {"data": 1, "fsdp": 1},
    }


SHAPES = {
    "md4-text8-small": Shape(
        name="md4-text8-small",
        description="MD4 transformer 4 x 256 (4 heads), L=256, V=27, batch 16",
        recipe=md4_text_recipe(dim=256, depth=4, heads=4, seq_len=256, vocab=27, batch_size=16, sample_steps=256),
        batch_size=16,
        sample_batch=8,
        sample_steps=256,
    ),
    "tiny": Shape(
        name="tiny",
        description="MD4 transformer 2 x 32 (2 heads), L=16, V=5, batch 4 (for tests)",
        recipe=md4_text_recipe(dim=32, depth=2, heads=2, seq_len=16, vocab=5, batch_size=4, sample_steps=4),
        batch_size=4,
        sample_batch=2,
        sample_steps=4,
    ),
}


def build_recipe(shape: Shape, network: dict[str, Any] | None = None) -> ddiff.runner.Recipe:
    raw = {**shape.recipe, "network": {**shape.recipe["network"], **(network or {})}}
    return ddiff.runner.build_recipe(raw, source=f"<bench {shape.name}>")


# ---------------------------------------------------------------------- measurement


def median_time(function: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``function()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 10, dtype: Any = jnp.float32) -> float:
    """The device's practical peak: FLOP/s (2 n^3 per product) of the fastest of
    ``repeats`` n x n matrix products in ``dtype``, best over ``sizes`` (a peak is a
    maximum, so the fastest run counts, not the median: on a shared machine the median
    also measures the neighbours)."""
    best = 0.0
    for size in sizes:
        a = jax.random.normal(jax.random.key(0), (size, size), dtype)
        b = jax.random.normal(jax.random.key(1), (size, size), dtype)
        dot = jax.jit(jnp.dot)
        _, times = median_time(lambda dot=dot, a=a, b=b: dot(a, b).block_until_ready(), repeats, warmup=2)
        best = max(best, 2.0 * size**3 / min(times))
    return best


def transformer_flops(network: Any, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token of an MD4 transformer (module docstring)."""
    layers = network.blocks.layers
    per_token = [layers.wq, layers.wk, layers.wv, layers.wo, layers.w1, layers.w2, layers.w3]
    n = sum(int(np.prod(linear.weight.shape)) for linear in per_token)
    n += int(np.prod(network.head.weight.shape))
    depth, dim = network.blocks.count, layers.wq.weight.shape[-1]
    return {
        "matmul_params": n,
        "train_flops_per_token": 6.0 * n + 12.0 * depth * dim * seq_len,
        "forward_flops_per_token": 2.0 * n + 4.0 * depth * dim * seq_len,
    }


def _memory(compiled: Any) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    out = {name: int(getattr(analysis, name)) for name in fields}
    out["peak_bytes"] = (
        out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
        + out["temp_size_in_bytes"]
    )  # fmt: skip
    return out


def _cost_flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return None if not cost else float(cost.get("flops", 0.0))


def with_compute_dtype(trainer: ddiff.runner.Trainer, state: ddiff.runner.TrainState, compute_dtype: str | None) -> ddiff.runner.TrainState:
    """The train state with its model and EMA computing in ``compute_dtype`` (parameters
    stay float32; :class:`ddiff.DiffusionModel`), and its optimizer state made for that
    model (the optimizer state mirrors the model's structure)."""
    if compute_dtype is None:
        return state
    model = dataclasses.replace(state.model, compute_dtype=compute_dtype)
    ema = dataclasses.replace(state.ema, compute_dtype=compute_dtype)
    opt_state = trainer.optimizer.init(ddiff.trainable(model))
    return trainer.place(dataclasses.replace(state, model=model, ema=ema, opt_state=opt_state))


def bench_train_step(recipe: ddiff.runner.Recipe, *, repeats: int = 10, compute_dtype: str | None = None) -> dict[str, Any]:
    """Compile and time the Trainer's jitted train step on a random batch."""
    trainer = ddiff.runner.Trainer(recipe, "/nonexistent-bench-workdir", show_progress=False)
    state = with_compute_dtype(trainer, trainer.init_state(), compute_dtype)
    batch = recipe.trainer.batch_size
    seq_len = recipe.data.seq_len
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, recipe.data.vocab_size)
    tokens, labels = trainer._device_batch({"tokens": np.asarray(tokens)})
    start = time.perf_counter()
    compiled = trainer._step_fn.lower(state, tokens, labels).compile()
    compile_seconds = time.perf_counter() - start
    step = trainer._step_fn
    holder = [state]

    def run() -> None:
        new_state, metrics, _ = step(holder[0], tokens, labels)
        jax.block_until_ready((new_state, metrics))
        holder[0] = new_state

    seconds, times = median_time(run, repeats, warmup=2)
    inner = getattr(compiled, "compiled", compiled)
    return {
        "step_seconds": seconds,
        "step_times": times,
        "compile_seconds": compile_seconds,
        "tokens_per_second": batch * seq_len / seconds,
        "xla_flops_per_step": _cost_flops(inner),
        "memory": _memory(inner),
        "state": holder[0],
        "trainer": trainer,
    }


def bench_sampling(trainer: ddiff.runner.Trainer, model: ddiff.DiffusionModel, *, num_samples: int, repeats: int = 3) -> dict[str, Any]:
    """Time the Trainer's jitted sampling loop, and one batched forward pass of the same
    batch for comparison; the loop's cost per network evaluation is its time over the
    evaluations it reports."""
    conditioning = ddiff.Conditioning()
    key = jax.random.key(1)
    sample = trainer._sample_fn
    start = time.perf_counter()
    sample.lower(model, key, num_samples, conditioning).compile()
    compile_seconds = time.perf_counter() - start
    evals = [0]

    def run() -> None:
        output = sample(model, key, num_samples, conditioning)
        jax.block_until_ready(output)
        evals[0] = int(output.num_function_evals)

    seconds, _ = median_time(run, repeats, warmup=1)
    seq_len = trainer.recipe.data.seq_len
    x = jnp.full((num_samples, seq_len), model.process.mask_id, jnp.int32)

    @eqx.filter_jit
    def forward(model, x):
        return ddiff.batched_log_mean(model, x, jnp.float32(0.5), conditioning)[0]

    forward_seconds, _ = median_time(lambda: forward(model, x).block_until_ready(), max(5, repeats), warmup=1)
    return {
        "sample_seconds": seconds,
        "function_evals": evals[0],
        "seconds_per_eval": seconds / max(evals[0], 1),
        "forward_seconds": forward_seconds,
        "compile_seconds": compile_seconds,
    }


def bench_shape(
    shape: Shape,
    *,
    peak: float,
    network: dict[str, Any] | None = None,
    repeats: int = 10,
    sample_repeats: int = 3,
    sampling: bool = True,
    compute_dtype: str | None = None,
) -> dict[str, Any]:
    recipe = build_recipe(shape, network)
    train = bench_train_step(recipe, repeats=repeats, compute_dtype=compute_dtype)
    state, trainer = train.pop("state"), train.pop("trainer")
    flops = transformer_flops(state.model.network, recipe.data.seq_len)
    step_flops = flops["train_flops_per_token"] * recipe.trainer.batch_size * recipe.data.seq_len
    result: dict[str, Any] = {
        "shape": shape.name,
        "description": shape.description,
        "compute_dtype": compute_dtype or "float32",
        "network": {k: v for k, v in recipe.resolved["network"].items()},
        "parameters": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(ddiff.trainable(state.model))),
        **flops,
        "model_flops_per_step": step_flops,
        **train,
        "mfu": step_flops / train["step_seconds"] / peak,
    }
    if train["xla_flops_per_step"]:
        result["xla_over_model_flops"] = train["xla_flops_per_step"] / step_flops
    if sampling:
        result["sampling"] = bench_sampling(trainer, state.ema, num_samples=shape.sample_batch, repeats=sample_repeats)
    return result


def format_result(result: dict[str, Any], peak: float) -> str:
    memory = result["memory"].get("peak_bytes", 0) / 2**20
    lines = [
        f"{result['shape']}: {result['description']}",
        f"  parameters {result['parameters']:,} (per-token matmul {result['matmul_params']:,})",
        f"  train step {result['step_seconds'] * 1e3:8.1f} ms   {result['tokens_per_second']:8.0f} tokens/s   "
        f"MFU {100 * result['mfu']:5.1f}% of {peak / 1e9:.0f} GFLOP/s   compile {result['compile_seconds']:.1f} s   "
        f"peak memory {memory:.0f} MiB",
        f"  model FLOPs/token {result['train_flops_per_token'] / 1e6:.2f}M; XLA cost analysis / model = "
        + (f"{result['xla_over_model_flops']:.3f}" if "xla_over_model_flops" in result else "n/a"),
    ]
    if "sampling" in result:
        s = result["sampling"]
        lines.append(
            f"  sampling {s['seconds_per_eval'] * 1e3:8.1f} ms per evaluation ({s['function_evals']} evaluations, "
            f"{s['sample_seconds']:.2f} s); one forward pass {s['forward_seconds'] * 1e3:.1f} ms"
        )
    return "\n".join(lines)
