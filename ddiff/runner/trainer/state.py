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
from ddiff._errors import RecipeError
from ddiff._layers import COMPUTE_DTYPES
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


_PROBED: dict[tuple[str, str], str | None] = {}


def _probe(compute: str) -> str | None:
    """Why the default backend cannot run a network's operations in ``compute`` (a matrix
    product, a convolution and a softmax, compiled and run once per process), or None."""
    dtype = COMPUTE_DTYPES[compute]

    def program(a, image, kernel):
        product = jax.nn.softmax(a @ a.T, axis=-1)
        convolved = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME")
        return jnp.sum(product.astype(jnp.float32)) + jnp.sum(convolved.astype(jnp.float32))

    try:
        value = jax.jit(program)(
            jnp.ones((8, 8), dtype), jnp.ones((1, 2, 4, 4), dtype), jnp.ones((2, 2, 3, 3), dtype)
        )
        jax.block_until_ready(value)
    except Exception as error:  # noqa: BLE001 - any failure to run means the dtype cannot run
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def check_precision_runs(recipe: Recipe) -> None:
    """Refuse a ``precision.compute`` the default backend cannot run, with one line saying
    what to change (probed once per process and backend)."""
    compute = recipe.precision.compute
    if compute == "float32":
        return
    backend = jax.default_backend()
    if (backend, compute) not in _PROBED:
        _PROBED[backend, compute] = _probe(compute)
    problem = _PROBED[backend, compute]
    if problem is not None:
        raise RecipeError(
            f"{compute} compute cannot run on this {backend} backend ({problem}); "
            f"set precision.compute: float32",
            source=recipe.source,
            path="precision.compute",
        )


def build_model(recipe: Recipe, key: jax.Array) -> DiffusionModel:
    """Build the network for the recipe's process and parameterization, computing in the
    recipe's ``precision.compute`` (parameters float32), and check the capabilities that
    depend on the network (time conditioning, classes)."""
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
    return DiffusionModel(
        network=network,
        parameterization=recipe.parameterization,
        process=process,
        compute_dtype=recipe.precision.compute_dtype,
    )


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
    check_precision_runs(recipe)
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
