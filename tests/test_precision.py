"""Mixed precision: networks compute in bfloat16 while parameters, gradients and the
output stay float32."""

import collections

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
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


def test_bfloat16_loss_is_close_to_float32():
    """The MD4 ELBO of a batch of 16 under bfloat16 compute is within 1% of the float32
    value (bfloat16 rounds to 2^-8 = 0.4% relative per operation; the errors of the
    products partly average out, measured at about 0.2%)."""
    network, seq_len, vocab = _build("md4_transformer")
    objective = ddiff.build_component("objective", "md4_elbo")
    x0 = jax.random.randint(jax.random.key(2), (16, seq_len), 0, vocab)
    full, mixed = _model(network, vocab, None), _model(network, vocab, "bfloat16")

    @eqx.filter_jit
    def losses(full, mixed):
        key = jax.random.key(3)
        return tuple(objective.batch_terms(m, x0, key=key).loss for m in (full, mixed))

    exact, approximate = (float(value) for value in losses(full, mixed))
    assert abs(approximate - exact) <= 0.01 * abs(exact), (approximate, exact)


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


def test_a_short_bfloat16_run_trains_with_float32_parameters():
    """40 AdamW steps under bfloat16 compute lower the MD4 ELBO of a fixed batch (the
    mean over the same 8 time draws before and after) by more than 10%, while gradients,
    parameters and optimizer state stay float32."""
    network, seq_len, vocab = _build("md4_transformer")
    model = _model(network, vocab, "bfloat16")
    objective = ddiff.build_component("objective", "md4_elbo")
    x0 = jnp.tile(jnp.arange(seq_len) % vocab, (16, 1))  # one sequence: learnable fast
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, state, key):
        def loss(p):
            return objective.batch_terms(eqx.combine(p, static), x0, key=key).loss

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, grads

    @jax.jit
    def evaluate(params):
        keys = jax.random.split(jax.random.key(7), 8)
        return jnp.mean(jax.vmap(lambda k: objective.batch_terms(eqx.combine(params, static), x0, key=k).loss)(keys))

    before = float(evaluate(params))
    state = optimizer.init(params)
    for index in range(40):
        params, state, grads = step(params, state, jax.random.key(100 + index))
    after = float(evaluate(params))
    floating = [leaf.dtype for leaf in jax.tree.leaves((params, state, grads)) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert set(floating) == {jnp.dtype(jnp.float32)}
    assert after < 0.9 * before, (before, after)


def test_unknown_compute_dtype_is_refused():
    network, _, vocab = _build("transformer")
    with pytest.raises(ddiff.RecipeError, match="unknown compute dtype 'int8'"):
        _model(network, vocab, "int8")
