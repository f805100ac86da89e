"""Programs compiled ahead of time from abstract inputs: every argument a
``jax.ShapeDtypeStruct`` laid out as a run lays out its arrays, so that what a program
needs in memory is known before anything it runs on is allocated (``ddiff compile``,
``ddiff bench``, and a run's memory check on accelerators)."""

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddiff._layers import LayerStack
from ddiff.runner.mesh import BATCH_SPEC
from ddiff.runner.recipe import Recipe
from ddiff.runner.trainer.compiled import Bound
from ddiff.runner.trainer.state import TrainState, fresh_state, is_array_or_abstract, state_specs


def _abstract(leaf: Any, mesh: Mesh, spec: P) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))


def _replicated(tree: Any, mesh: Mesh) -> Any:
    """Every array (or abstract array) of ``tree`` as an abstract array held whole by
    every device of ``mesh``."""
    return jax.tree.map(lambda leaf: _abstract(leaf, mesh, P()), tree)


def abstract_batch(rows: int, columns: int | None, mesh: Mesh) -> jax.ShapeDtypeStruct:
    """An abstract int32 batch of ``rows`` (x ``columns``), split over the batch axes."""
    shape = (rows,) if columns is None else (rows, columns)
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, BATCH_SPEC))


def abstract_train_state(recipe: Recipe, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The recipe's fresh train state as ``jax.ShapeDtypeStruct`` leaves laid out on
    ``mesh`` as :func:`~ddiff.runner.trainer.state.place_state` lays out the real one
    (nothing computed or allocated)."""
    state = eqx.filter_eval_shape(fresh_state, recipe, optimizer)
    specs = state_specs(state, mesh)
    arrays, static = eqx.partition(state, is_array_or_abstract)
    placed = jax.tree.map(lambda leaf, spec: _abstract(leaf, mesh, spec), arrays, specs)
    return eqx.combine(placed, static)


def abstract_train_args(
    recipe: Recipe, optimizer: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct | None]:
    """The train step's arguments as a run lays them out, abstractly: the fresh state
    (:func:`abstract_train_state`), a ``trainer.batch_size`` batch of tokens and, where
    the data have classes, of labels."""
    batch = recipe.trainer.batch_size
    labels = abstract_batch(batch, None, mesh) if recipe.data.num_classes else None
    return abstract_train_state(recipe, optimizer, mesh), abstract_batch(batch, recipe.data.seq_len, mesh), labels


def scans_layers(tree: Any, mesh: Mesh) -> bool:
    """Whether a layer stack of ``tree`` runs as a loop on ``mesh``: it scans, or it may
    be sharded over ``fsdp`` (a sharded stack always scans). XLA's cost analysis counts
    such a loop's body once: count the program with its stacks traced out."""
    stacks = [
        node
        for node in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, LayerStack))
        if isinstance(node, LayerStack)
    ]
    return any(stack.scan or mesh.shape.get("fsdp", 1) > 1 for stack in stacks)


def peak_bytes(memory: Any) -> int:
    """Memory one device needs while a compiled program runs, from its
    ``memory_analysis()``: arguments, outputs not written into donated arguments, and
    temporaries."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)  # fmt: skip


class AheadOfTime:
    """``bound`` (a compiled function with its components' arrays bound) compiled for
    ``mesh`` from ``args`` (arrays, abstract arrays and static leaves), and callable on
    concrete arguments of the same shapes, layouts and static parts (where the mesh's
    devices are this process's): a program whose memory was known before anything it
    runs on was allocated.

    The function runs inside one ``jax.jit`` of the array leaves only (the static leaves
    closed over), so abstract leaves are traced where the function's own
    ``eqx.filter_jit`` would have taken them for static; ``donate`` names the arguments
    whose buffers a run donates.

    Attributes:
        compiled: the compiled executable (``memory_analysis()``, ``cost_analysis()``,
            ``as_text()``).
    """

    def __init__(self, bound: Bound, args: tuple[Any, ...], *, mesh: Mesh, donate: tuple[int, ...] = ()):
        self.arrays = bound.arrays
        dynamic, self.static = eqx.partition((bound.arrays, *args), is_array_or_abstract)
        dynamic = (_replicated(dynamic[0], mesh), *dynamic[1:])
        outputs: list[Any] = []

        def run(*dynamic: Any) -> Any:
            result, static = eqx.partition(bound.function(*eqx.combine(dynamic, self.static)), eqx.is_array)
            outputs[:] = [static]
            return result

        with warnings.catch_warnings():
            # The train step donates its batch too, which no output can reuse.
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            lowered = jax.jit(run, donate_argnums=tuple(1 + index for index in donate)).lower(*dynamic)
        self.compiled = _compile(lowered, mesh)
        self.output_static = outputs[0]

    def __call__(self, *args: Any) -> Any:
        dynamic, _ = eqx.partition((self.arrays, *args), eqx.is_array)
        return eqx.combine(self.compiled(*dynamic), self.output_static)


def lower_and_compile(bound: Bound, args: tuple[Any, ...], *, mesh: Mesh, donate: tuple[int, ...] = ()) -> Any:
    """The compiled executable of :class:`AheadOfTime` ``bound`` on ``args``."""
    return AheadOfTime(bound, args, mesh=mesh, donate=donate).compiled


def _compile(lowered: Any, mesh: Mesh) -> Any:
    """Compile ``lowered`` for ``mesh``."""
    if all(device in _local_devices() for device in mesh.devices.flat):
        return lowered.compile()
    # A topology's devices have no client: its executables cannot be read back from
    # JAX's persistent compilation cache, so they are neither looked up nor stored.
    # JAX decides once per process whether it uses its cache: reset that decision on the
    # way in and out.
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def _local_devices() -> set[jax.Device]:
    return set(jax.local_devices())
