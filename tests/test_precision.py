"""Mixed precision: networks compute in bfloat16 while parameters, gradients and the
output stay float32."""

import collections
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddiff_plugins.networks import MD4Transformer, Transformer, UNet

import ddiff


def _build(kind: str) -> tuple[ddiff.AbstractNetwork, int, int]:
    """A tiny built-in network with every parameter perturbed (no zero-initialised layer
    hides the computation), and its sequence length and vocabulary."""
    key = jax.random.key(0)
    if kind == "unet":
        network = UNet(
            num_states=5, num_outputs=4, seq_len=4 * 4 * 1, key=key, image_shape=(4, 4, 1),
            channels=8, groups=2, num_blocks=1, dropout=0.0,
        )  # fmt: skip
        seq_len = 16
    elif kind == "transformer":
        network = Transformer(num_states=5, num_outputs=4, seq_len=12, key=key, dim=16, depth=1, heads=2)
        seq_len = 12
    else:
        network = MD4Transformer(
            num_states=5, num_outputs=4, seq_len=12, key=key, dim=32, depth=1, heads=2, cond_dim=16
        )
        seq_len = 12
    params, static = eqx.partition(network, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static), seq_len, 4


def _model(network: ddiff.AbstractNetwork, vocab: int, compute_dtype: str | None) -> ddiff.DiffusionModel:
    registry = ddiff.default_registry()
    process = ddiff.build_component(
        "process", {"kind": "masked", "schedule": {"kind": "linear"}}, vocab_size=vocab, registry=registry
    )
    parameterization = ddiff.build_component("parameterization", "mean", registry=registry)
    return ddiff.DiffusionModel(
        network=network, parameterization=parameterization, process=process, compute_dtype=compute_dtype
    )


def _products(jaxpr, found: collections.Counter) -> collections.Counter:
    """Operand dtypes of every matrix product and convolution in a jaxpr."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found[str(eqn.invars[0].aval.dtype)] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _products(inner, found)
    return found


@pytest.mark.parametrize("kind", ["md4_transformer", "transformer", "unet"])
def test_bfloat16_compute_runs_products_in_bfloat16_and_returns_float32(kind):
    """Traced, not compiled: under bfloat16 compute most matrix products and convolutions
    take bfloat16 operands (only the float32 output head or last convolution, the
    layer-norm-free conditioning inputs and the like may not), and the output is float32."""
    network, seq_len, vocab = _build(kind)
    mixed = _model(network, vocab, "bfloat16")

    def forward(model):
        return model.network_output(jnp.zeros(seq_len, jnp.int32), jnp.float32(0.5))

    assert eqx.filter_eval_shape(forward, mixed).dtype == jnp.float32
    jaxpr, _, _ = eqx.filter_make_jaxpr(forward)(mixed)
    dtypes = _products(jaxpr.jaxpr, collections.Counter())
    assert dtypes["bfloat16"] > 3 * dtypes["float32"], dtypes


def test_unknown_compute_dtype_is_refused():
    network, _, vocab = _build("transformer")
    with pytest.raises(ddiff.RecipeError, match="unknown compute dtype 'int8'"):
        _model(network, vocab, "int8")


# --------------------------------------------------------------------------- the recipe section


@pytest.fixture(scope="module")
def bfloat16_recipe(tiny_overrides):
    """The tiny quickstart recipe with ``precision: {compute: bfloat16}``, trained for 20
    steps (its learning rate decays over them)."""
    return ddiff.runner.load_recipe(
        "recipes/quickstart.yaml", [*tiny_overrides, "precision.compute=bfloat16", "trainer.steps=20"]
    )


def _perturbed(state: ddiff.runner.TrainState) -> ddiff.runner.TrainState:
    """``state`` with every trainable parameter moved by N(0, 0.05^2) noise (the zero
    initialisation of adaLN-zero would otherwise hide the blocks' products)."""
    params, static = ddiff.partition_trainable(state.model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    noisy = [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    model = eqx.combine(jax.tree.unflatten(treedef, noisy), static, is_leaf=lambda n: isinstance(n, ddiff.Constant))
    return dataclasses.replace(state, model=model)


def test_precision_section_builds_bfloat16_models_with_float32_state(bfloat16_recipe, tiny_recipe):
    """``precision.compute: bfloat16`` reaches the model and its EMA through build_model;
    parameters, optimizer state and EMA are float32 and equal to those of the float32
    recipe (the compute dtype changes no initial value)."""
    assert bfloat16_recipe.resolved["precision"] == {"params": "float32", "compute": "bfloat16"}
    assert tiny_recipe.resolved["precision"] == {"params": "float32", "compute": "float32"}
    state = ddiff.runner.Engine(bfloat16_recipe).init_state()
    reference = ddiff.runner.Engine(tiny_recipe).init_state()
    assert state.model.compute_dtype == state.ema.compute_dtype == "bfloat16"
    assert reference.model.compute_dtype is None
    floating = [a.dtype for a in jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))]
    assert set(floating) == {jnp.dtype(jnp.float32)}
    for ours, theirs in zip(jax.tree.leaves(ddiff.trainable(state.model)), jax.tree.leaves(ddiff.trainable(reference.model)), strict=True):
        assert jnp.array_equal(ours, theirs)


def test_bfloat16_step_loss_is_close_and_a_short_bfloat16_run_trains(bfloat16_recipe, tiny_recipe):
    """Through the compiled train step: (1) the first step's loss under bfloat16
    compute is within 1% of the float32 step's on the same perturbed parameters, batch and
    randomness (bfloat16 keeps 8 bits, 0.4% per rounding); (2) 20 bfloat16 steps from
    the initial parameters on a batch of one constant sequence (learnable within them)
    lower its loss, the mean over the same 16 time draws before and after, below 60% of
    where it started (measured: 39%), with float32 gradients, parameters and optimizer
    state."""
    batch = {"tokens": np.full((8, 8), 3, np.int32)}
    first = {}
    for name, recipe in (("float32", tiny_recipe), ("bfloat16", bfloat16_recipe)):
        engine = ddiff.runner.Engine(recipe)
        start = _perturbed(engine.init_state())
        tokens, labels = engine.device_batch(batch)
        state, metrics, _ = engine.train_step(start, tokens, labels)
        first[name] = float(metrics["loss"])
    assert abs(first["bfloat16"] - first["float32"]) <= 0.01 * abs(first["float32"]), first

    @eqx.filter_jit
    def loss(model):
        keys = jax.random.split(jax.random.key(7), 16)
        terms = jax.vmap(lambda k: bfloat16_recipe.objective.batch_terms(model, jnp.asarray(batch["tokens"]), key=k))(keys)
        return jnp.mean(terms.loss)

    state = engine.init_state()
    before = float(loss(state.model))
    for _ in range(20):
        state, metrics, _ = engine.train_step(state, tokens, labels)
    after = float(loss(state.model))
    assert after < 0.6 * before, (before, after)
    floating = [a.dtype for a in jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))]
    assert set(floating) == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ("precision.compute=int8", "precision.compute: 'int8' is not one of: 'float32', 'bfloat16', 'float16'"),
        ("precision.params=bfloat16", "precision.params: params must be float32 (parameters, optimizer state and EMA stay float32; lower precision.compute instead), got 'bfloat16'"),
        ("precision.speed=fast", "precision.speed"),
    ],
)
def test_precision_section_errors_name_the_key(section, fragment, tiny_overrides):
    with pytest.raises(ddiff.RecipeError) as error:
        ddiff.runner.load_recipe("recipes/quickstart.yaml", [*tiny_overrides, section])
    assert fragment in str(error.value)


def test_a_compute_dtype_the_backend_cannot_run_is_one_line(bfloat16_recipe, monkeypatch, capsys):
    """A backend whose probe fails (simulated: the probe's program raises, as XLA does for
    a dtype a device lacks) refuses the recipe with one line naming the key and the fix;
    the real CPU backend runs bfloat16 (its probe passes)."""
    from ddiff.runner import model as model_module

    assert model_module._probe("bfloat16") is None
    monkeypatch.setattr(model_module, "_PROBED", {})
    monkeypatch.setattr(model_module, "_probe", lambda compute: f"UNIMPLEMENTED: {compute} dot")
    with pytest.raises(ddiff.RecipeError) as error:
        ddiff.runner.Engine(bfloat16_recipe).init_state()
    message = str(error.value)
    assert "precision.compute: bfloat16 compute cannot run on this cpu backend (UNIMPLEMENTED: bfloat16 dot)" in message
    assert message.endswith("set precision.compute: float32") and "\n" not in message


# --------------------------------------------------------------------------- float32 beyond the network


class _Lookup(ddiff.AbstractBlockCausalNetwork):
    """A network that reads its output from a table (no arithmetic): under bfloat16
    compute its only bfloat16 operations are the casts and the lookup. Read block by
    block it ignores the clean prefix, so block-diffusion components run on it too."""

    table: jax.Array
    time_conditioned: bool = eqx.field(static=True, default=False)
    num_classes: int = eqx.field(static=True, default=0)

    def __call__(self, x_t, t, *, label=None, key=None):
        return self.table[x_t]

    def block_causal_output(self, x_t, x0, *, block_size, label=None, key=None):
        return self.table[x_t]

    def init_cache(self, capacity, *, block_size):
        return ddiff.BlockPrefix.empty(capacity, block_size)

    def extend_cache(self, cache, block, *, label=None):
        return cache.extend(block)

    def cached_output(self, x_t, cache, *, label=None):
        return self.table[x_t]


_MOVES = frozenset(
    {"convert_element_type", "gather", "dynamic_slice", "slice", "reshape", "broadcast_in_dim", "squeeze",
     "expand_dims", "concatenate", "transpose", "copy", "copy_p", "pjit", "jit", "closed_call", "select_n",
     "custom_jvp_call", "custom_vjp_call", "scan", "while", "cond", "remat", "checkpoint"}
)  # fmt: skip
"""Primitives that move or cast values without computing on them (and containers)."""


def _bfloat16_arithmetic(jaxpr, found: list) -> list:
    """Names of the primitives of a jaxpr (and its sub-jaxprs) that compute bfloat16
    values."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name not in _MOVES and any(
            getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.outvars
        ):
            found.append(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _bfloat16_arithmetic(inner, found)
    return found


def _registered(slot):
    return [pytest.param(name, id=name) for name in ddiff.default_registry().names(slot)]


def _bfloat16_model(slot: str, name: str, section: dict):
    """The tiny bench shape's recipe with the registered ``slot`` component ``name`` (in a
    family it pairs with) and a bfloat16 lookup model of its process and parameterization."""
    from ddiff.runner import bench

    raw = bench.SHAPES["tiny"].recipe
    _, recipe = bench.component_recipe(raw, slot, section)
    process, parameterization = recipe.process, recipe.parameterization
    outputs = parameterization.output_channels(process)
    table = jax.random.normal(jax.random.key(0), (process.num_states, outputs)).astype(jnp.bfloat16).astype(jnp.float32)
    model = ddiff.DiffusionModel(
        network=_Lookup(table=table), parameterization=parameterization, process=process, compute_dtype="bfloat16"
    )
    return recipe, model


@pytest.mark.parametrize("name", _registered("objective"))
def test_objectives_compute_in_float32_under_bfloat16_compute(name):
    """Traced, not compiled: with a bfloat16 network whose only bfloat16 operations are
    casts and a lookup, no operation of the objective (log-probabilities, every bound's
    terms, schedules) computes in bfloat16, and its terms are float32."""
    recipe, model = _bfloat16_model("objective", name, {"kind": name})
    x0 = jnp.zeros((2, 16), jnp.int32)

    def terms(model):
        return recipe.objective.batch_terms(model, x0, key=jax.random.key(0))

    jaxpr = eqx.filter_make_jaxpr(terms)(model)[0]
    assert _bfloat16_arithmetic(jaxpr.jaxpr, []) == []
    assert {a.dtype for a in jax.tree.leaves(eqx.filter_eval_shape(terms, model))} <= {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", _registered("sampler"))
def test_samplers_draw_in_float32_under_bfloat16_compute(name):
    """Traced, not compiled: as above for every registered sampler's loop (its
    categorical draws, schedules and predictions)."""
    from ddiff.runner import bench

    recipe, model = _bfloat16_model("sampler", name, bench.sampler_section(name, bench.SHAPES["tiny"], 16))

    def sample(model):
        keys = ddiff.sample_keys(jax.random.key(0), 0, 2)
        return recipe.sampler.sample(model, keys=keys, seq_len=16, conditioning=ddiff.Conditioning()).tokens

    jaxpr = eqx.filter_make_jaxpr(sample)(model)[0]
    assert _bfloat16_arithmetic(jaxpr.jaxpr, []) == []
