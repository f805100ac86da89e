"""Device meshes and how the train state and batches are laid out on them.

The mesh has three named axes: ``data`` (replicas that average gradients), ``fsdp``
(devices that each hold a shard of every large parameter, of its gradient and of its
optimizer state) and ``model`` (tensor parallelism: devices that split each layer's heads
and hidden width in the Megatron layout, as the layer declares it,
:class:`ddiff.nn.AbstractTensorParallel`). A batch is split over ``data`` and ``fsdp``
together; the devices along ``model`` hold the same rows.
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddiff._constant import is_constant
from ddiff._errors import RecipeError
from ddiff._layers import LayerStack
from ddiff._sharding import BATCH_AXES, DATA, FSDP, MESH_AXES, MODEL, sharded_dim
from ddiff.nn._parallel import AbstractTensorParallel

BATCH_SPEC = P(BATCH_AXES)
MIN_SHARDED_SIZE = 1024
"""Arrays with fewer elements than this stay replicated over ``fsdp`` (sharding them saves
nothing). Tensor parallelism splits what a layer declares, whatever its size."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: ``data`` x ``fsdp`` x ``model`` devices; -1 (for one axis) means all
    remaining devices.

    Attributes:
        data: data-parallel replicas (gradients averaged across them).
        fsdp: devices sharing each parameter, gradient and optimizer state (fully sharded
            data parallel); parameters are gathered for the forward pass and gradients
            reduce-scattered back.
        model: devices splitting each layer's attention heads and feed-forward hidden
            width (tensor parallelism, Megatron layout); they hold the same batch rows.
    """

    data: int = -1
    fsdp: int = 1
    model: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if value != -1 and value < 1:
                raise RecipeError(f"{name} must be a positive size or -1, got {value}", path=name)
        if sum(getattr(self, name) == -1 for name in MESH_AXES) > 1:
            raise RecipeError("at most one of mesh.data, mesh.fsdp and mesh.model may be -1")


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """The named mesh over ``devices`` (default: every device of every process). With
    every size given, the first data x fsdp x model devices are used. The devices along
    ``model`` are consecutive and must belong to one process (they read the same rows)."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    sizes = {name: getattr(config, name) for name in MESH_AXES}
    given = math.prod(size for size in sizes.values() if size != -1)
    sizes = {name: count // given if size == -1 else size for name, size in sizes.items()}
    needed = math.prod(sizes.values())
    if -1 not in dataclasses.astuple(config) and needed <= count:
        devices, count = devices[:needed], needed
    if needed != count:
        shape = " x ".join(str(getattr(config, name)) for name in MESH_AXES)
        raise RecipeError(
            f"the mesh needs data x fsdp x model = {shape} devices but there are {count}; "
            f"use -1 for one axis to take all remaining devices",
            path="mesh",
        )
    array = np.array(devices).reshape(tuple(sizes.values()))
    processes = np.vectorize(lambda device: device.process_index)(array)
    if (processes != processes[..., :1]).any():
        raise RecipeError(
            f"the {sizes[MODEL]} devices along mesh.model must belong to one process (they read "
            f"the same batch rows); use a mesh.model that divides each process's "
            f"{jax.local_device_count()} devices",
            path="mesh.model",
        )
    return Mesh(array, MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
    """The number of slices a batch is split into: data x fsdp (the devices along
    ``model`` share theirs)."""
    return mesh.shape[DATA] * mesh.shape[FSDP]


def leaf_spec(shape: tuple[int, ...], fsdp: int, model_dim: int | None = None) -> P:
    """Shard an array over ``fsdp`` along its largest dimension divisible by the axis size
    (replicate small arrays and arrays with no such dimension), and over ``model`` along
    ``model_dim`` when given. The leading dimension of an array of two or more dimensions
    is never chosen for ``fsdp``: it may be the layer axis of a
    :class:`ddiff.nn.LayerStack`, which is scanned over and gathered layer by layer; nor
    is ``model_dim``."""
    axes: list[str | None] = [None] * len(shape)
    if model_dim is not None:
        axes[model_dim] = MODEL
    if fsdp > 1 and math.prod(shape) >= MIN_SHARDED_SIZE:
        first = 1 if len(shape) >= 2 else 0
        candidates = [
            i for i, size in enumerate(shape) if i >= first and i != model_dim and size % fsdp == 0
        ]
        if candidates:
            axes[max(candidates, key=lambda i: shape[i])] = FSDP
    return P(*axes) if any(axes) else P()


def _is_shaped(leaf: Any) -> bool:
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def _is_split_node(node: Any) -> bool:
    return isinstance(node, (LayerStack, AbstractTensorParallel))


def _check_divides(size: int, model: int, what: str, path: str) -> None:
    if size % model:
        raise RecipeError(
            f"{size} {what} do not split over mesh.model={model}; use a multiple of {model} "
            f"or a mesh.model that divides {size}",
            path=path,
        )


def _declared_dims(node: AbstractTensorParallel, dims: Any, model: int, offset: int) -> Any:
    """``dims`` (the model dimensions of ``node``'s own sub-layers) with those ``node``
    declares: a column-parallel weight and its bias along the output features, a
    row-parallel weight along its input features (``offset``: the layer axes around)."""
    split = node.tensor_split()
    if split.heads:
        _check_divides(split.heads, model, "attention heads", f"network.{split.heads_key}")
    for names, dim, kind in ((split.column, 0, "output"), (split.row, 1, "input")):
        for name in names:
            linear = getattr(node, name)
            parts = [("weight", dim)] + ([("bias", 0)] if dim == 0 and linear.bias is not None else [])
            for part, axis in parts:
                if not _is_shaped(getattr(linear, part)):
                    continue
                size = getattr(linear, part).shape[offset + axis]
                _check_divides(size, model, f"{kind} features of the network's {name}", "network")
                dims = eqx.tree_at(
                    lambda d, name=name, part=part: getattr(getattr(d, name), part),
                    dims,
                    offset + axis,
                    is_leaf=lambda x: x is None,
                )
    return dims


def model_dims(tree: Any, model: int, offset: int = 0) -> Any:
    """The dimension of every array leaf of ``tree`` that tensor parallelism splits over
    ``model`` devices (None elsewhere): what each :class:`ddiff.nn.AbstractTensorParallel`
    module declares, one dimension further for each :class:`ddiff.nn.LayerStack` around it
    (its layer axis). Parameters, gradients, AdamW moments and the EMA share the
    parameters' tree paths, so they are split alike.

    Raises:
        RecipeError: heads (or a split width) that do not divide by ``model``.
    """

    def one(node: Any) -> Any:
        if isinstance(node, LayerStack):
            return eqx.tree_at(lambda s: s.layers, node, model_dims(node.layers, model, offset + 1))
        if isinstance(node, AbstractTensorParallel):
            inner = jax.tree.map(one, node, is_leaf=lambda n: n is not node and _is_split_node(n))
            return _declared_dims(node, inner, model, offset)
        return None

    return jax.tree.map(one, tree, is_leaf=_is_split_node)


def check_tensor_parallel(model: Any, mesh: Mesh) -> None:
    """Refuse a model (of arrays or of their shapes) whose heads, or a width tensor
    parallelism splits, do not divide by the mesh's ``model`` axis.

    Raises:
        RecipeError: naming the network's key and ``mesh.model``.
    """
    if mesh.shape[MODEL] > 1:
        model_dims(eqx.filter(model, _is_shaped), mesh.shape[MODEL])


def tree_specs(tree: Any, mesh: Mesh) -> Any:
    """A PartitionSpec for every array leaf of ``tree`` (None elsewhere): large arrays
    sharded over ``fsdp`` (:func:`leaf_spec`), the dimensions a layer declares split over
    ``model`` (:func:`model_dims`); the arrays of a :class:`ddiff.Constant` are replicated.

    Raises:
        RecipeError: heads (or a split width) that do not divide by the model axis.
    """
    fsdp, model = mesh.shape[FSDP], mesh.shape[MODEL]
    dims = model_dims(tree, model) if model > 1 else jax.tree.map(lambda _: None, tree)

    def one(node: Any, dim: Any) -> Any:
        if is_constant(node):
            return jax.tree.map(lambda _: P(), node)
        return leaf_spec(tuple(node.shape), fsdp, dim)

    return jax.tree.map(one, tree, dims, is_leaf=is_constant)


def _is_spec(node: Any) -> bool:
    return isinstance(node, P)


def manual_axes(mesh: Mesh) -> frozenset[str]:
    """The axes the trainer's ``shard_map`` is manual over: ``data`` and ``fsdp``, and
    ``model`` too where it has one device. Only a real model split is left to the
    compiler: a Pallas kernel (TPU splash attention) cannot be partitioned automatically,
    even over an axis of size one."""
    return frozenset(BATCH_AXES) | (frozenset({MODEL}) if mesh.shape[MODEL] == 1 else frozenset())


def manual_specs(specs: Any) -> Any:
    """``specs`` over the axes the trainer's ``shard_map`` is manual over (``data`` and
    ``fsdp``): ``model`` is left to the compiler, which keeps each array's model split."""
    return jax.tree.map(
        lambda spec: P(*[None if axis == MODEL else axis for axis in spec]), specs, is_leaf=_is_spec
    )


def constrain(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """Inside jit: every array leaf of ``tree`` laid out on ``mesh`` as its spec says (the
    train step's new state keeps its model split)."""
    return jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s)), tree, specs)


def reduce_gradients(grads: Any, specs: Any, count: int) -> Any:
    """Inside shard_map: average per-device gradients of per-device mean losses. Sharded
    leaves already hold the sum over their fsdp group (from the reduce-scatter)."""

    def one(grad: jax.Array, spec: P) -> jax.Array:
        axes = (DATA,) if sharded_dim(spec) is not None else BATCH_AXES
        return jax.lax.psum(grad, axes) / count

    return jax.tree.map(one, grads, specs)


def global_norm(grads: Any, specs: Any) -> jax.Array:
    """Inside shard_map: the L2 norm of the whole (reduced) gradient."""
    total = 0.0
    for grad, spec in zip(jax.tree.leaves(grads), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)), strict=True):
        square = (grad.astype(np.float32) ** 2).sum()
        total = total + (jax.lax.psum(square, FSDP) if sharded_dim(spec) is not None else square)
    return total**0.5


def place(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """Put every array leaf of ``tree`` on the mesh with its spec."""
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assemble this process's rows of a batch into the global batch array, split over the
    data and fsdp axes (and whole on every device along model)."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, shape)


def to_host(array: jax.Array) -> np.ndarray:
    """A global array's full value on every process."""
    if jax.process_count() == 1:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def replicated(tree: Any) -> Any:
    """A ``PartitionSpec()`` (held whole by every device) for every array leaf of ``tree``."""
    return jax.tree.map(lambda _: P(), tree)
