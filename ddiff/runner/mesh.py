"""Device meshes and how the train state and batches are laid out on them.

The mesh has two named axes: ``data`` (replicas that average gradients) and ``fsdp``
(devices that each hold a shard of every large parameter, of its gradient and of its
optimizer state). A batch is split over both axes together.
"""

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddiff._constant import is_constant
from ddiff._errors import RecipeError
from ddiff._sharding import BATCH_AXES, DATA, FSDP, sharded_dim

BATCH_SPEC = P(BATCH_AXES)
MIN_SHARDED_SIZE = 1024
"""Arrays with fewer elements than this stay replicated (sharding them saves nothing)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: ``data`` x ``fsdp`` devices; -1 means all remaining devices.

    Attributes:
        data: data-parallel replicas (gradients averaged across them).
        fsdp: devices sharing each parameter, gradient and optimizer state (fully sharded
            data parallel); parameters are gathered for the forward pass and gradients
            reduce-scattered back.
    """

    data: int = -1
    fsdp: int = 1

    def __post_init__(self) -> None:
        for name in ("data", "fsdp"):
            value = getattr(self, name)
            if value != -1 and value < 1:
                raise RecipeError(f"{name} must be a positive size or -1, got {value}", path=name)
        if self.data == -1 and self.fsdp == -1:
            raise RecipeError("at most one of mesh.data and mesh.fsdp may be -1")


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """The named mesh over ``devices`` (default: every device of every process). With
    both sizes given, the first data x fsdp devices are used."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    data, fsdp = config.data, config.fsdp
    if data == -1:
        data = count // fsdp
    if fsdp == -1:
        fsdp = count // data
    if config.data != -1 and config.fsdp != -1 and data * fsdp <= count:
        devices, count = devices[: data * fsdp], data * fsdp
    if data * fsdp != count:
        raise RecipeError(
            f"the mesh needs data x fsdp = {config.data} x {config.fsdp} devices but there "
            f"are {count}; use -1 for one axis to take all remaining devices",
            path="mesh",
        )
    return Mesh(np.array(devices).reshape(data, fsdp), (DATA, FSDP))


def leaf_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard an array over ``fsdp`` along its largest dimension divisible by the axis size
    (replicate small arrays and arrays with no such dimension). The leading dimension of
    an array of two or more dimensions is never chosen: it may be the layer axis of a
    :class:`ddiff.nn.LayerStack`, which is scanned over and gathered layer by layer."""
    if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
        return P()
    first = 1 if len(shape) >= 2 else 0
    candidates = [i for i, size in enumerate(shape) if i >= first and size % fsdp == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda i: shape[i])
    return P(*[FSDP if i == dim else None for i in range(len(shape))])


def tree_specs(tree: Any, mesh: Mesh) -> Any:
    """A PartitionSpec for every array leaf of ``tree`` (None elsewhere); the arrays of a
    :class:`ddiff.Constant` are replicated."""
    fsdp = mesh.shape[FSDP]

    def one(node: Any) -> Any:
        if is_constant(node):
            return jax.tree.map(lambda _: P(), node)
        return leaf_spec(tuple(node.shape), fsdp)

    return jax.tree.map(one, tree, is_leaf=is_constant)


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
    data and fsdp axes."""
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
