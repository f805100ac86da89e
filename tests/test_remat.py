"""The remat knob of layer stacks and the built-in networks: every policy gives the same
loss and gradient as none, and each is really in the program (its checkpoint equation
and policy in the gradient's jaxpr; less temporary memory when nothing is saved)."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
from ddiff import nn
from ddiff_plugins.networks._blocks import rotary_blocks, run_rotary_blocks

SEQ, DIM, DEPTH, BATCH = 64, 32, 3, 2


@pytest.fixture(scope="module")
def stack() -> nn.LayerStack:
    """A scanned stack of MD4 transformer blocks with non-zero adaLN modulation (zero
    modulation would gate every branch off and leave most gradients at zero)."""
    blocks = rotary_blocks(DIM, DEPTH, 2, 8, "glu", 32, 0.0, True, key=jax.random.key(0), path="heads")
    weight = blocks.layers.modulation.weight
    return eqx.tree_at(
        lambda b: b.layers.modulation.weight, blocks, 0.3 * jax.random.normal(jax.random.key(1), weight.shape)
    )


def _loss(blocks: nn.LayerStack, x: jax.Array, cond: jax.Array) -> jax.Array:
    out = jax.vmap(lambda h, c: run_rotary_blocks(blocks, h, c, None))(x, cond)
    return jnp.sum(jnp.sin(out))


def _inputs() -> tuple[jax.Array, jax.Array]:
    return (
        jax.random.normal(jax.random.key(2), (BATCH, SEQ, DIM)),
        jax.random.normal(jax.random.key(3), (BATCH, 8)),
    )


def _with(blocks: nn.LayerStack, remat: str) -> nn.LayerStack:
    return dataclasses.replace(blocks, remat=remat)


def _checkpoints(jaxpr) -> list[dict]:
    """The parameters of every checkpoint (remat) equation in ``jaxpr`` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat2", "remat"):
            found.append(eqn.params)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_checkpoints(inner))
    return found


def test_every_policy_keeps_loss_and_gradient_and_block_saves_memory(stack):
    """Loss and gradients of every policy equal those of none to 1e-5 relative to each
    leaf's largest entry (float32; recomputation lets XLA fuse differently, measured
    differences about 1e-6), and recomputing everything (block) needs less temporary
    memory than keeping every intermediate (none)."""
    x, cond = _inputs()
    results, temp = {}, {}
    for remat in nn.REMAT_POLICIES:
        step = jax.jit(lambda b, x, c: eqx.filter_value_and_grad(_loss)(b, x, c))
        compiled = step.lower(_with(stack, remat), x, cond).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
        results[remat] = compiled(_with(stack, remat), x, cond)
    loss_none, grad_none = results["none"]
    for remat, (loss, grad) in results.items():
        np.testing.assert_allclose(loss, loss_none, rtol=1e-5, err_msg=remat)
        for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_none), strict=True):
            scale = float(jnp.max(jnp.abs(want)))
            assert scale > 0.0
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=remat)
    assert temp["block"] < temp["none"], temp


@pytest.mark.parametrize("scan", [True, False])
def test_each_policy_is_a_checkpoint_of_its_jax_policy_in_the_gradient(stack, scan):
    """none leaves no checkpoint equation; every other name puts one per traced layer body
    (one when scanned, DEPTH when unrolled) with jax.checkpoint_policies' policy, CSE
    blocked only where the layers are unrolled."""
    x, cond = _inputs()
    for remat, policy in nn.REMAT_POLICIES.items():
        blocks = dataclasses.replace(stack, remat=remat, scan=scan)
        jaxpr = jax.make_jaxpr(lambda b: eqx.filter_grad(_loss)(b, x, cond))(blocks)
        found = _checkpoints(jaxpr.jaxpr)
        if policy is None:
            assert found == []
            continue
        assert len(found) == (1 if scan else DEPTH), remat
        assert all(p["policy"] is policy and p["prevent_cse"] is not scan for p in found), remat
    assert nn.REMAT_POLICIES["block"] is jax.checkpoint_policies.nothing_saveable
    assert nn.REMAT_POLICIES["dots_no_batch"] is jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def test_remat_is_a_network_recipe_key_checked_in_one_line():
    """network.remat reaches the network's layer stack; an unknown name is a RecipeError
    naming the key and the names there are, from the recipe and from stack_layers."""
    sizes = {"num_states": 5, "num_outputs": 4, "seq_len": 8, "key": jax.random.key(0)}
    section = {"kind": "md4_transformer", "dim": 16, "depth": 1, "heads": 2, "cond_dim": 8}
    spec = ddiff.build_component("network", {**section, "remat": "block"})
    assert spec.build(**sizes).blocks.remat == "block"
    with pytest.raises(ddiff.RecipeError, match=r"network\.remat: 'dots_all' is not one of: 'none', 'block'"):
        ddiff.build_component("network", {**section, "remat": "dots_all"})
    with pytest.raises(ddiff.RecipeError, match="remat must be one of none, block, dots, dots_no_batch"):
        nn.stack_layers(lambda k: eqx.nn.Linear(2, 2, key=k), jax.random.split(jax.random.key(0), 2), remat="all")
