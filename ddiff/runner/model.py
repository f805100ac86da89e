"""The model a recipe builds: its network for the recipe's process and parameterization,
assembled here and nowhere else, and the checks that need the built network or the
backend (capabilities of the network, the compute dtype)."""

import equinox as eqx
import jax
import jax.numpy as jnp

from ddiff._capabilities import check_compatibility
from ddiff._errors import RecipeError
from ddiff._layers import COMPUTE_DTYPES
from ddiff._model import DiffusionModel
from ddiff.runner.recipe import Recipe

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
    components.update(recipe.eval_objectives)
    check_compatibility(components, source=recipe.source)
    return DiffusionModel(
        network=network,
        parameterization=recipe.parameterization,
        process=process,
        compute_dtype=recipe.precision.compute_dtype,
    )


def initial_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The keys of a fresh run of ``seed``: the model's initialisation, and the training
    draws (step k uses ``fold_in(key, k)``)."""
    model_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    return model_key, train_key


def initial_model(recipe: Recipe) -> DiffusionModel:
    """The model a fresh run of the recipe starts from (its seed's model key)."""
    return build_model(recipe, initial_keys(recipe.seed)[0])


def model_shapes(recipe: Recipe) -> DiffusionModel:
    """The recipe's model with a ``jax.ShapeDtypeStruct`` for every array, worked out
    without computing (or allocating) any of them."""
    return eqx.filter_eval_shape(initial_model, recipe)


def parameter_paths(recipe: Recipe) -> list[str]:
    """Paths (``.network.head.weight``) of the model's trainable leaves, in gradient order,
    computed from shapes alone."""
    leaves = jax.tree_util.tree_leaves_with_path(model_shapes(recipe))
    return [
        jax.tree_util.keystr(path)
        for path, leaf in leaves
        if isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
