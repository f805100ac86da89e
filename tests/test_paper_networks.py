"""The MD4 paper's transformer and single-resolution UNet."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
from ddiff import capabilities as caps
from ddiff.nn import attention, rotary
from ddiff_plugins.networks import MD4Transformer, UNet


def _count(module) -> int:
    """Parameters of a module, or of its shapes from ``eqx.filter_eval_shape``."""
    return sum(
        int(np.prod(leaf.shape))
        for leaf in jax.tree.leaves(module)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    )


@eqx.filter_jit(compiler_options={"xla_backend_optimization_level": 0})
def _perturb(module, key):
    """Add noise to every parameter, so zero-initialised layers (adaLN-zero modulations,
    output heads) no longer hide how the output depends on the inputs."""
    params, static = eqx.partition(module, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static)


@eqx.filter_jit
def _outputs(network, x, times, labels, key):
    """Outputs at several (time, label) pairs without dropout, and the first with
    dropout: one compilation per network."""
    plain = jax.vmap(lambda t, label: network(x, t, label=label))(times, labels)
    first = None if labels is None else labels[0]
    return plain, network(x, times[0], label=first, key=key)


def test_paper_sizes_without_allocating():
    md4_s = eqx.filter_eval_shape(
        lambda: MD4Transformer(num_states=50258, num_outputs=50257, seq_len=1024, key=jax.random.key(0))
    )
    assert _count(md4_s) == 165_857_344
    assert md4_s.blocks.layers.w1.weight.shape == (12, 2048, 768)
    cifar = eqx.filter_eval_shape(
        lambda: UNet(num_states=257, num_outputs=256, seq_len=3072, key=jax.random.key(0))
    )
    assert _count(cifar) == 28_427_520
    assert cifar.down.layers.conv1.weight.shape[0] == 32 and cifar.up.layers.conv1.weight.shape[:2] == (33, 128)


def test_md4_transformer_starts_at_zero_and_conditions_on_time_and_class():
    key = jax.random.key(0)
    network = MD4Transformer(
        num_states=11, num_outputs=10, seq_len=12, num_classes=3, key=key,
        dim=32, depth=2, heads=4, cond_dim=16, dropout=0.1,
    )  # fmt: skip
    x = jax.random.randint(key, (12,), 0, 11)
    times, labels = jnp.array([0.4, 0.4, 0.4, 0.7]), jnp.array([1, 2, 1, 1])
    plain, _ = _outputs(network, x, times, labels, jax.random.key(1))
    assert jnp.all(plain == 0.0)  # adaLN-zero modulations and a zero head
    plain, dropped = _outputs(_perturb(network, key), x, times, labels, jax.random.key(1))
    assert plain.shape == (4, 12, 10)
    assert jnp.array_equal(plain[0], plain[2])
    assert not jnp.allclose(plain[0], plain[1])  # class
    assert not jnp.allclose(plain[0], plain[3])  # time
    assert not jnp.allclose(plain[0], dropped)
    assert network.capabilities() == {caps.TIME_CONDITIONED, caps.CLASS_CONDITIONAL}


def test_md4_transformer_without_time_ignores_t():
    key = jax.random.key(0)
    network = MD4Transformer(
        num_states=6, num_outputs=5, seq_len=8, key=key, dim=16, depth=1, heads=2, cond_dim=8,
        time_conditioned=False,
    )  # fmt: skip
    plain, _ = _outputs(_perturb(network, key), jnp.arange(8) % 6, jnp.array([0.1, 0.9]), None, None)
    assert jnp.array_equal(plain[0], plain[1])
    assert caps.TIME_INDEPENDENT in network.capabilities()


def test_rotary_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 8))
    sequence = jnp.zeros((10, 1, 8))

    def score(m, n):
        rq = rotary(sequence.at[m].set(q[0]))[m]
        rk = rotary(sequence.at[n].set(k[0]))[n]
        return jnp.sum(rq * rk)

    assert jnp.allclose(score(2, 5), score(6, 9), atol=1e-5)
    assert not jnp.allclose(score(2, 5), score(2, 6), atol=1e-3)


def test_depth_scaled_initialisation():
    def spread(depth_scaled):
        network = MD4Transformer(
            num_states=4, num_outputs=3, seq_len=4, key=jax.random.key(0), dim=64, depth=8,
            heads=4, cond_dim=8, depth_scaled_init=depth_scaled,
        )  # fmt: skip
        return float(jnp.std(network.blocks.layers.w1.weight))

    assert spread(True) == pytest.approx((2.0 / 8 / 64) ** 0.5, rel=0.05)
    assert spread(False) == pytest.approx((1.0 / 64) ** 0.5, rel=0.05)


@pytest.mark.parametrize("middle", ["attention", "transformer"])
def test_unet_maps_every_sub_pixel_to_logits(middle):
    key = jax.random.key(0)
    extra = {"transformer_depth": 1, "transformer_dim": 16, "transformer_heads": 2, "patch_size": 4}
    network = UNet(
        num_states=257, num_outputs=256, seq_len=8 * 8 * 3, num_classes=10, key=key,
        image_shape=(8, 8, 3), channels=8, groups=4, num_blocks=2, dropout=0.1,
        **(extra if middle == "transformer" else {}),
    )  # fmt: skip
    x = jax.random.randint(key, (192,), 0, 257)
    times, labels = jnp.array([0.5, 0.5, 0.2]), jnp.array([3, 4, 3])
    plain, _ = _outputs(network, x, times, labels, jax.random.key(2))
    assert jnp.all(plain == 0.0)  # zero-initialised output convolution
    plain, dropped = _outputs(_perturb(network, key), x, times, labels, jax.random.key(2))
    assert plain.shape == (3, 192, 256) and bool(jnp.all(jnp.isfinite(plain)))
    assert not jnp.allclose(plain[0], plain[1])  # class
    assert not jnp.allclose(plain[0], plain[2])  # time
    assert not jnp.allclose(plain[0], dropped)
    assert network.down.layers.conv1.weight.shape[0] == 2 and network.up.layers.conv1.weight.shape[0] == 3


def test_unet_refuses_an_image_shape_that_is_not_the_data():
    with pytest.raises(ddiff.RecipeError, match=r"8x8x3 = 192 sub-pixels, but the data has sequences of 3072"):
        UNet(num_states=257, num_outputs=256, seq_len=3072, key=jax.random.key(0), image_shape=(8, 8, 3))
    with pytest.raises(ddiff.RecipeError, match="not divisible by groups"):
        UNet(num_states=257, num_outputs=256, seq_len=3072, key=jax.random.key(0), channels=12, groups=8)


def test_unrolled_and_scanned_blocks_and_both_attentions_agree():
    """The same parameters give the same outputs and gradients whether the blocks are
    unrolled or scanned (one LayerStack, two settings: checkpoints move between them),
    and attention gives the same values through jax.nn.dot_product_attention as through
    the written-out products, in float32 and (scores and softmax in float32) in
    bfloat16; float32 rounding only: 1e-5 (bfloat16: 2e-2)."""
    key = jax.random.key(0)
    unrolled = _perturb(
        MD4Transformer(num_states=6, num_outputs=5, seq_len=8, key=key, dim=16, depth=2, heads=2, cond_dim=8),
        key,
    )
    assert not unrolled.blocks.scan
    stack = unrolled.blocks
    scanned = eqx.tree_at(
        lambda n: n.blocks, unrolled, ddiff.nn.LayerStack(layers=stack.layers, count=stack.count, scan=True)
    )
    x = jnp.arange(8) % 6

    @eqx.filter_jit
    def values_and_grads(a, b):
        def loss(net):
            return jnp.sum(jnp.sin(net(x, jnp.float32(0.3))))

        return [eqx.filter_value_and_grad(loss)(n) for n in (a, b)]

    first, second = values_and_grads(unrolled, scanned)
    assert jnp.allclose(first[0], second[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(first[1]), jax.tree.leaves(second[1]), strict=True):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-5)
    q, k, v = jax.random.normal(jax.random.key(1), (3, 12, 2, 8))
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        qd, kd, vd = (a.astype(dtype) for a in (q, k, v))
        fused = attention(qd, kd, vd, kind="dot_product_attention")
        written = attention(qd, kd, vd, kind="einsum")
        assert fused.dtype == written.dtype == dtype
        assert jnp.allclose(fused.astype(jnp.float32), written.astype(jnp.float32), atol=tolerance)


def test_attention_dropout_zero_drops_only_the_branch_outputs():
    """BD3-LM's setting (dropout 0.5 on the branches, 0 on the attention probabilities):
    every entry of the attention branch's output is either 0 or the undropped output /
    (1 - 0.5), exactly, so the probabilities themselves were not dropped; with the
    probabilities dropped too (the default), entries are neither."""
    from ddiff_plugins.networks._blocks import RotaryBlock

    key = jax.random.key(3)
    x = jax.random.normal(jax.random.key(4), (8, 16))
    tables = ddiff.nn.rotary_tables(8, 8)

    def branch(dropout, attention_dropout, train_key):
        block = RotaryBlock(16, 2, 32, 4, "glu", dropout, 1.0, key=key, attention_dropout=attention_dropout)
        return np.asarray(block.attention(x, tables, "einsum", key=train_key)[0])

    clean = branch(0.0, 0.0, None)
    dropped = branch(0.5, 0.0, jax.random.key(5))
    kept = dropped != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(dropped[kept], 2.0 * clean[kept], rtol=1e-6)
    both = branch(0.5, None, jax.random.key(5))
    assert not np.allclose(both[both != 0], 2.0 * clean[both != 0], rtol=1e-3)
