"""The train state: the model, optimizer state, EMA and step counter, laid out on a mesh."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Int, UInt32

from ddiff._constant import trainable
from ddiff._model import DiffusionModel
from ddiff.runner.mesh import place, tree_specs
from ddiff.runner.model import build_model, check_precision_runs, initial_keys
from ddiff.runner.recipe import Recipe


class TrainState(eqx.Module):
    """Everything a step changes: the model, optimizer state, EMA of the model, and the
    step counter. Randomness of step k is ``fold_in(key, k)``."""

    step: Int[Array, ""]
    model: DiffusionModel
    opt_state: Any
    ema: DiffusionModel
    key: UInt32[Array, " 2"]
    skipped_steps: Int[Array, ""]


def _own_copy(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, tree)


def initial_state(recipe: Recipe, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A fresh state for ``recipe``, laid out on ``mesh``."""
    check_precision_runs(recipe)
    return place_state(fresh_state(recipe, optimizer), mesh)


def fresh_state(recipe: Recipe, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state for ``recipe`` on the default device (``eqx.filter_eval_shape`` of
    it: the state's shapes, nothing allocated)."""
    model_key, train_key = initial_keys(recipe.seed)
    # The recipe's components hold arrays of their own (learnable schedules, constants);
    # the donated step must own copies, so the recipe stays usable for another Trainer.
    model = _own_copy(build_model(recipe, model_key))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        model=model,
        opt_state=optimizer.init(trainable(model)),
        ema=_own_copy(model),
        key=train_key,
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def is_array_or_abstract(leaf: Any) -> bool:
    """An array, or the shape and dtype of one (``jax.ShapeDtypeStruct``: a state built
    abstractly, as ``ddiff compile`` lowers it)."""
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def state_specs(state: TrainState, mesh: Mesh) -> Any:
    """The ``PartitionSpec`` of every array of ``state`` on ``mesh`` (None elsewhere), for
    a state of arrays or of ``jax.ShapeDtypeStruct`` leaves alike: how
    :func:`place_state` lays it out (large arrays sharded over ``fsdp``, the weights the
    network declares split over ``model`` in the Megatron layout, the same for their
    AdamW moments and EMA).

    Raises:
        RecipeError: heads (or a split width) that do not divide by ``mesh.model``.
    """
    return tree_specs(eqx.filter(state, is_array_or_abstract), mesh)


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
    """Lay every array of ``state`` out on ``mesh`` (fsdp-sharded where large, split over
    ``model`` where the network declares it)."""
    dynamic, static = eqx.partition(state, eqx.is_array)
    return eqx.combine(place(dynamic, mesh, state_specs(dynamic, mesh)), static)
