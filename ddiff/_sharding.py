"""The mesh axes and the sharding primitives that layers need inside ``shard_map``.

The trainer's mesh (:mod:`ddiff.runner.mesh`) has three named axes: ``data`` (replicas that
average gradients), ``fsdp`` (devices that each hold a shard of every large parameter) and
``model`` (devices that split each layer's heads and hidden width, tensor parallelism). The
trainer's ``shard_map`` is manual over ``data`` and ``fsdp`` and leaves ``model`` to the
compiler. A :class:`ddiff.nn.LayerStack` gathers its layers' shards over ``fsdp`` with these
helpers.
"""

from typing import Any

import jax
from jax.sharding import PartitionSpec as P

DATA, FSDP, MODEL = "data", "fsdp", "model"
MESH_AXES = (DATA, FSDP, MODEL)
"""The mesh's axes, in the order of its device array."""
BATCH_AXES = (DATA, FSDP)
"""A batch is split over these two axes together (the devices along ``model`` hold the same
rows); they are the axes the trainer's ``shard_map`` is manual over."""


def sharded_dim(spec: P, axis: str = FSDP) -> int | None:
    """The dimension a spec shards over ``axis`` (default ``fsdp``), if any."""
    for i, name in enumerate(spec):
        if name == axis:
            return i
    return None


def gather_leaf(leaf: jax.Array, dim: int, model_dim: int | None = None) -> jax.Array:
    """Inside shard_map: all-gather ``leaf`` over ``fsdp`` along ``dim``. A leaf also split
    over ``model`` (along ``model_dim``; an axis the compiler partitions) is gathered
    inside a ``shard_map`` manual over ``model`` too, so each device gathers only its own
    model slice (left to itself, the compiler would gather the model split first). Its
    transpose under autodiff is a reduce-scatter over ``fsdp`` alone."""

    def one(shard: jax.Array) -> jax.Array:
        return jax.lax.all_gather(shard, FSDP, axis=dim, tiled=True)

    if model_dim is None:
        return one(leaf)
    spec = P(*[MODEL if i == model_dim else None for i in range(leaf.ndim)])
    return jax.shard_map(one, in_specs=spec, out_specs=spec, axis_names=frozenset({MODEL}), check_vma=False)(leaf)


def gather(tree: Any, specs: Any) -> Any:
    """Inside shard_map: all-gather every fsdp-sharded leaf into the full array (whole over
    ``fsdp``, still split over ``model`` where its spec says so). Its transpose under
    autodiff is a reduce-scatter, so gradients come back sharded."""

    def one(leaf: jax.Array, spec: P) -> jax.Array:
        dim = sharded_dim(spec)
        return leaf if dim is None else gather_leaf(leaf, dim, sharded_dim(spec, MODEL))

    return jax.tree.map(one, tree, specs)
