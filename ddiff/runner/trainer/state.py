"""The train state and the model a recipe builds."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Int, UInt32

from ddiff._capabilities import check_compatibility
from ddiff._constant import trainable
from ddiff._model import DiffusionModel
from ddiff.runner.mesh import place, tree_specs
from ddiff.runner.recipe import Recipe, eval_objectives


class TrainState(eqx.Module):
    """Everything a step changes: the model, optimizer state, EMA of the model, and the
    step counter. Randomness of step k is ``fold_in(key, k)``."""

    step: Int[Array, ""]
    model: DiffusionModel
    opt_state: Any
    ema: DiffusionModel
    key: UInt32[Array, " 2"]
    skipped_steps: Int[Array, ""]


def build_model(recipe: Recipe, key: jax.Array) -> DiffusionModel:
    """Build the network for the recipe's process and parameterization, and check the
    capabilities that depend on the network (time conditioning, classes)."""
    process = recipe.process
    network = recipe.network.build(
        num_states=process.num_states,
        num_outputs=recipe.parameterization.output_channels(process),
        seq_len=recipe.data.seq_len,
        num_classes=recipe.data.num_classes,
        key=key,
    )
    components = {
        slot: (recipe.names[slot], getattr(recipe, slot))
        for slot in ("process", "parameterization", "objective", "sampler")
    }
    components["network"] = (recipe.names["network"], network)
    components.update(eval_objectives(recipe.eval, recipe.resolved["eval"]))
    check_compatibility(components, source=recipe.source)
    return DiffusionModel(network=network, parameterization=recipe.parameterization, process=process)


def parameter_paths(recipe: Recipe) -> list[str]:
    """Paths (``.network.head.weight``) of the model's trainable leaves, in gradient order,
    computed from shapes alone."""
    model = eqx.filter_eval_shape(build_model, recipe, jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves_with_path(model)
    return [
        jax.tree_util.keystr(path)
        for path, leaf in leaves
        if isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]


def _own_copy(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, tree)


def initial_state(recipe: Recipe, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A fresh state for ``recipe``, laid out on ``mesh``."""
    key = jax.random.PRNGKey(recipe.seed)
    model_key, train_key = jax.random.split(key)
    # The recipe's components hold arrays of their own (learnable schedules, constants);
    # the donated step must own copies, so the recipe stays usable for another Trainer.
    model = _own_copy(build_model(recipe, model_key))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        model=model,
        opt_state=optimizer.init(trainable(model)),
        ema=_own_copy(model),
        key=train_key,
        skipped_steps=jnp.zeros((), jnp.int32),
    )
    return place_state(state, mesh)


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
    """Lay every array of ``state`` out on ``mesh`` (fsdp-sharded where large)."""
    dynamic, static = eqx.partition(state, eqx.is_array)
    return eqx.combine(place(dynamic, mesh, tree_specs(dynamic, mesh)), static)
