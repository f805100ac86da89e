"""The mesh axes and the sharding primitives that layers need inside ``shard_map``.

The trainer's mesh (:mod:`ddiff.runner.mesh`) has two named axes: ``data`` (replicas that
average gradients) and ``fsdp`` (devices that each hold a shard of every large parameter).
A :class:`ddiff.nn.LayerStack` gathers its layers' shards over ``fsdp`` with these helpers.
"""

from typing import Any

import jax
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
"""A batch is split over both axes together."""


def sharded_dim(spec: P) -> int | None:
    """The dimension a spec shards over ``fsdp``, if any."""
    for i, axis in enumerate(spec):
        if axis == FSDP:
            return i
    return None


def gather(tree: Any, specs: Any) -> Any:
    """Inside shard_map: all-gather every fsdp-sharded leaf into the full array. Its
    transpose under autodiff is a reduce-scatter, so gradients come back sharded."""

    def one(leaf: jax.Array, spec: P) -> jax.Array:
        dim = sharded_dim(spec)
        return leaf if dim is None else jax.lax.all_gather(leaf, FSDP, axis=dim, tiled=True)

    return jax.tree.map(one, tree, specs)
