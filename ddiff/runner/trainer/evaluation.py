"""Held-out evaluation: the negative ELBO of the eval split under the recipe's objective
and each of ``eval.objectives``, on the same sequences with the same keys."""

import math
from collections.abc import Callable, Mapping

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float

from ddiff._layers import gather_for_forward
from ddiff._model import DiffusionModel
from ddiff._objective import AbstractObjective
from ddiff._sharding import BATCH_AXES
from ddiff.runner.mesh import (
    BATCH_SPEC,
    batch_shards,
    manual_axes,
    manual_specs,
    replicated,
    to_host,
    tree_specs,
)
from ddiff.runner.pipeline import eval_batches, metric_report, validate_batch
from ddiff.runner.recipe import Recipe


def make_eval(objective: AbstractObjective, *, batch_size: int, mesh: Mesh) -> Callable:
    """``(arrays, model, tokens, labels, key) -> nelbo`` per example of a global eval batch,
    for the static parts of ``objective`` (its arrays come in ``arrays``), split over the
    mesh's data x fsdp devices (tensor-parallel over ``model``, as the train step)."""
    local_batch = batch_size // batch_shards(mesh)

    @eqx.filter_jit
    def evaluate(arrays, model, tokens, labels, key) -> Float[Array, " batch"]:
        (objective_arrays,) = arrays
        params, static = eqx.partition(model, eqx.is_array)
        specs = tree_specs(params, mesh)

        def local(objective_arrays, params, tokens, labels):
            local_objective = eqx.combine(objective_arrays, objective)
            full = eqx.combine(static, gather_for_forward(params, specs))
            offset = jax.lax.axis_index(BATCH_AXES) * local_batch
            terms = local_objective.per_example_terms(
                full, tokens, key=key, labels=labels, train=False, offset=offset, total=batch_size
            )
            return terms.nelbo

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(replicated(objective_arrays), manual_specs(specs), BATCH_SPEC, BATCH_SPEC),
            out_specs=BATCH_SPEC,
            axis_names=manual_axes(mesh),
            check_vma=False,
        )(objective_arrays, params, tokens, labels)

    return evaluate


def evaluate_split(
    recipe: Recipe,
    model: DiffusionModel,
    functions: Mapping[str, Callable],
    device_batch: Callable,
    *,
    max_batches: int | None = None,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Negative ELBO over the eval split in bits per token, with its standard error over
    sequences (each sequence averaged over ``eval.time_draws`` draws), and in the data
    source's ``metric``, for every compiled eval function of ``functions`` by the prefix
    of its report (``""`` for the recipe's objective, ``"score_entropy_"`` ...).
    ``device_batch`` lays a host batch out on the mesh."""
    config = recipe.eval
    data = recipe.data
    limit = config.max_examples if max_examples is None else max_examples
    base_key = jax.random.PRNGKey(config.seed)
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
        tokens, labels = device_batch(batch)
        keys = [jax.random.fold_in(base_key, index * 1009 + d) for d in range(config.time_draws)]
        for prefix, function in functions.items():
            draws = [to_host(function(model, tokens, labels, key)) for key in keys]
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
