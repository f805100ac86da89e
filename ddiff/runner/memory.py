"""What a recipe's training needs in memory, estimated from shapes alone, against what this
machine holds: refused with one line naming the recipe key that dominates, before the
train state (or anything else of the model) is allocated."""

import inspect
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ddiff._errors import RecipeError
from ddiff._model import DiffusionModel
from ddiff._tables import format_bytes
from ddiff._tables import physical_memory_bytes as machine_bytes
from ddiff.runner.recipe import Recipe

COPIES_OF_PARAMETERS = 5
"""Training holds each parameter five times in float32: the weights, their gradient, the
two AdamW moments and the EMA."""

VALUES_PER_TOKEN_AND_LAYER = 2
"""Activations the backward pass cannot do without per token, layer and unit of width:
each block's input and output. Real networks keep several times more; the estimate is a
lower bound, so that what it refuses cannot fit, whatever the network's kernels."""


def mesh_bytes(devices: list[jax.Device]) -> int:
    """Memory of ``devices`` together: each accelerator's ``bytes_limit``, the host's
    physical memory for CPU devices (or where a device does not say)."""
    limits = []
    for device in devices:
        stats = device.memory_stats() if device.platform != "cpu" else None
        limits.append((stats or {}).get("bytes_limit"))
    if any(limit is None for limit in limits):
        return machine_bytes()
    return sum(limits)


@dataclass(frozen=True)
class Estimate:
    """The bytes of one part of a training step's memory, the recipe key that sets it, and
    how it was counted."""

    key: str
    count: float
    what: str


def parameter_bytes(shapes: DiffusionModel) -> int:
    """Bytes of the model's floating-point leaves, from their shapes and dtypes."""
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree_util.tree_leaves(shapes)
        if isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    )


def _hyper_parameter(recipe: Recipe, name: str, fallback: int) -> int | None:
    """The network section's ``name`` (its class's default where the section omits it),
    ``None`` where the network takes no such argument."""
    spec = recipe.network
    if name in spec.kwargs:
        return spec.kwargs[name]
    parameter = inspect.signature(spec.cls).parameters.get(name)
    if parameter is None:
        return None
    return fallback if parameter.default is inspect.Parameter.empty else parameter.default


def training_estimates(recipe: Recipe, shapes: DiffusionModel) -> list[Estimate]:
    """Lower bounds of the parts of one training step's memory (bytes), from the model's
    ``shapes``.

    Parameters: 5 x their bytes (weights, gradients, AdamW moments, EMA). Activations:
    4 bytes x 2 B D d L for batch B (``trainer.batch_size``), length D, width d
    (``network.dim``) and depth L (``network.depth``; networks without those keys count
    1). Logits: 4 bytes x B D S for S output states."""
    width = _hyper_parameter(recipe, "dim", 1)
    depth = _hyper_parameter(recipe, "depth", 1) or 1
    batch = recipe.trainer.batch_size
    length = recipe.data.seq_len
    states = recipe.parameterization.output_channels(recipe.process)
    width_key = f"{recipe.network.path}.dim" if width is not None else recipe.network.path
    width = width or 1
    return [
        Estimate(
            width_key,
            COPIES_OF_PARAMETERS * parameter_bytes(shapes),
            f"{COPIES_OF_PARAMETERS} copies of the parameters (weights, gradients, AdamW moments, EMA)",
        ),
        Estimate(
            "trainer.batch_size",
            4.0 * batch * length * VALUES_PER_TOKEN_AND_LAYER * width * depth,
            f"activations of {batch} x {length} tokens at width {width} and depth {depth}",
        ),
        Estimate(
            "trainer.batch_size",
            4.0 * batch * length * states,
            f"logits of {batch} x {length} tokens x {states} states",
        ),
    ]


def check_training_fits(recipe: Recipe, shapes: DiffusionModel, available: int | None = None) -> None:
    """Refuse a recipe whose training step needs more than the machine's memory
    (``available`` bytes, default :func:`machine_bytes`) at the least, naming the
    dominant part.

    Raises:
        RecipeError: at the key of the largest part of the estimate.
    """
    available = machine_bytes() if available is None else available
    estimates = training_estimates(recipe, shapes)
    total = sum(estimate.count for estimate in estimates)
    if total <= available:
        return
    largest = max(estimates, key=lambda estimate: estimate.count)
    raise RecipeError(
        f"training needs at least {format_bytes(total)}, more than the "
        f"{format_bytes(available)} of memory it would run on; most of it ({format_bytes(largest.count)}) "
        f"is {largest.what}; lower {largest.key}",
        source=recipe.source,
        path=largest.key,
    )
