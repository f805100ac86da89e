"""Stacks of identical layers, applied with one ``lax.scan`` (or unrolled) and, under fully
sharded data parallelism, gathered one layer at a time; and the casts of mixed precision."""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ddiff._errors import RecipeError
from ddiff._sharding import MODEL, gather, gather_leaf, sharded_dim

SAVED_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
"""What the backward pass of a sharded layer keeps from its forward pass: the outputs of
matrix products and convolutions. Everything else, the gathered parameters included, is
recomputed (gathering them again), so no layer's full parameters outlive its step."""


def _save_products(primitive: Any, *_: Any, **__: Any) -> bool:
    return primitive.name in SAVED_PRIMITIVES


RematPolicy = Literal["none", "block", "dots", "dots_no_batch"]
"""What a :class:`LayerStack`'s backward pass keeps of each layer's forward pass."""

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": _save_products,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""The ``jax.checkpoint`` policy of each :data:`RematPolicy`: ``none`` no
rematerialisation (every intermediate the backward pass needs is kept); ``block``
nothing saved, each layer recomputed whole from its input; ``dots`` the outputs of matrix
products and convolutions saved (:data:`SAVED_PRIMITIVES`), the rest recomputed;
``dots_no_batch`` the outputs of matrix products without batch dimensions saved (the
projections, not attention's per-head products q k^T and p v)."""


class ShardedLeaf(eqx.Module):
    """A stacked parameter that is still sharded over the ``fsdp`` mesh axis: each layer's
    slice is gathered along ``dim`` right before the layer runs (and stays split over
    ``model`` along ``model_dim``, tensor parallelism, when not None). Made by the trainer
    inside its ``shard_map``; a network never builds one."""

    shard: Array
    dim: int = eqx.field(static=True)
    model_dim: int | None = eqx.field(static=True, default=None)


def _is_sharded_leaf(node: Any) -> bool:
    return isinstance(node, ShardedLeaf)


def _gather_layer(layer: Any) -> Any:
    def one(node: Any) -> Any:
        if not isinstance(node, ShardedLeaf):
            return node
        return gather_leaf(node.shard, node.dim, node.model_dim)

    return jax.tree.map(one, layer, is_leaf=_is_sharded_leaf)


class LayerStack(eqx.Module):
    """``count`` layers of the same structure, stored as one module whose arrays carry a
    leading layer axis, and applied in order: with one ``lax.scan`` (one traced copy of the
    layer, whatever the depth: fast to compile) or, with ``scan=False``, unrolled (one
    traced copy per layer: slower to compile, and faster to run, since the compiler
    fuses across layers and the backward pass needs no stacked per-layer residuals; the
    values are the same either way).

    Under FSDP the trainer hands the stack over still sharded; each layer's parameters are
    all-gathered inside the scan body, and the body is rematerialised keeping only matrix
    products and convolutions (:data:`SAVED_PRIMITIVES`), so the backward pass gathers
    them again: at most one layer's full parameters (and the sharded rest) are alive at a
    time (ZeRO-3). A sharded stack is always scanned, whatever ``scan`` says: unrolled,
    the compiler would be free to gather every layer at once.

    ``remat`` trades compute for memory (:data:`REMAT_POLICIES`): each layer's body is
    wrapped in ``jax.checkpoint`` with the policy named, so the backward pass recomputes
    what the policy does not save; the values are the same. Under FSDP ``none`` means
    ``dots``, the least the layer-by-layer gathering needs.

    Attributes:
        layers: the stacked layer module.
        count: the number of layers.
        scan: apply the layers with ``lax.scan`` (True) or unrolled (False).
        traced_out: unrolled even when sharded (:func:`traced_out`), for XLA's cost
            analysis, which counts a loop's body once whatever its trip count.
        remat: the rematerialisation policy of each layer (:data:`RematPolicy`).
    """

    layers: Any
    count: int = eqx.field(static=True)
    scan: bool = eqx.field(static=True, default=True)
    traced_out: bool = eqx.field(static=True, default=False)
    remat: RematPolicy = eqx.field(static=True, default="none")

    def __check_init__(self):
        check_remat(self.remat)

    def __call__(self, carry: Any, step: Callable[[Any, Any, Any], tuple[Any, Any]], xs: Any = None) -> tuple[Any, Any]:
        """Run ``carry, out = step(layer, carry, x)`` for each layer with the matching slice
        of ``xs``; returns the final carry and the stacked outputs (as ``lax.scan``)."""
        params, static = eqx.partition(self.layers, eqx.is_array)
        sharded = any(_is_sharded_leaf(node) for node in jax.tree.leaves(self.layers, is_leaf=_is_sharded_leaf))

        def body(carry: Any, sliced: Any) -> tuple[Any, Any]:
            layer_params, x = sliced
            layer = _gather_layer(eqx.combine(layer_params, static))
            return step(layer, carry, x)

        remat = "dots" if sharded and self.remat == "none" else self.remat
        scanned = (self.scan or sharded) and not self.traced_out
        if remat != "none":
            # A scan merges nothing across iterations, so CSE need not be blocked there.
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)
        if scanned:
            return jax.lax.scan(body, carry, (params, xs))
        outputs = []
        for index in range(self.count):
            carry, out = body(carry, jax.tree.map(lambda a, i=index: a[i], (params, xs)))
            outputs.append(out)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *outputs)


def check_remat(remat: str) -> None:
    """Refuse a ``remat`` that is not a :data:`RematPolicy`, naming those that are.

    Raises:
        RecipeError: an unknown policy (path ``remat``).
    """
    if remat not in REMAT_POLICIES:
        raise RecipeError(
            f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}", path="remat"
        )


def stack_layers(
    make: Callable[[jax.Array], eqx.Module], keys: jax.Array, *, scan: bool = True,
    remat: RematPolicy = "none",
) -> LayerStack:
    """One layer ``make(key)`` per key of ``keys`` (e.g. ``jax.random.split(key, depth)``),
    stacked into a :class:`LayerStack` (applied with ``lax.scan`` or, with ``scan=False``,
    unrolled, each layer rematerialised as ``remat`` says); the values equal those of
    calling ``make`` on each key in turn."""
    check_remat(remat)
    return LayerStack(layers=eqx.filter_vmap(make)(keys), count=len(keys), scan=scan, remat=remat)


def _is_layer_stack(node: Any) -> bool:
    return isinstance(node, LayerStack)


def traced_out(tree: Any) -> Any:
    """``tree`` (a model, a train state) with every :class:`LayerStack` unrolled, sharded
    or not (the same values): the program XLA's cost analysis counts fully (it counts a
    ``lax.scan`` body once), at the memory cost of an unrolled stack."""

    def one(node: Any) -> Any:
        if not _is_layer_stack(node):
            return node
        return dataclasses.replace(node, layers=traced_out(node.layers), traced_out=True)

    return jax.tree.map(one, tree, is_leaf=_is_layer_stack)


def gather_for_forward(params: Any, specs: Any) -> Any:
    """Inside ``shard_map``: all-gather every fsdp-sharded leaf outside a
    :class:`LayerStack`; inside one, wrap it as a :class:`ShardedLeaf` so the stack gathers
    it layer by layer (a leaf sharded along the layer axis itself is gathered now).
    ``specs`` are the leaves' global specs: a leaf split over ``model`` stays split."""

    def defer(leaf: Any, spec: Any) -> Any:
        dim, model_dim = sharded_dim(spec), sharded_dim(spec, MODEL)
        if dim is None:
            return leaf
        if dim == 0:
            return gather_leaf(leaf, 0, model_dim)
        return ShardedLeaf(shard=leaf, dim=dim - 1, model_dim=None if model_dim is None else model_dim - 1)

    def one(node: Any, spec: Any) -> Any:
        if _is_layer_stack(node):
            layers = jax.tree.map(defer, node.layers, spec.layers)
            return dataclasses.replace(node, layers=layers)
        return gather(node, spec)

    return jax.tree.map(one, params, specs, is_leaf=_is_layer_stack)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
"""The names a compute dtype may take (mixed precision)."""


def cast_floating(tree: Any, dtype: Any) -> Any:
    """``tree`` with every floating-point array leaf cast to ``dtype`` (other leaves as they
    are). Differentiable: the gradient with respect to a float32 leaf comes back float32,
    so parameters (and optimizer state and EMA) stay float32 while a network computes in
    ``dtype`` (:attr:`ddiff.DiffusionModel.compute_dtype`)."""

    def one(leaf: Any) -> Any:
        if eqx.is_inexact_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(one, tree)
