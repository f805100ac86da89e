"""The fused attention kernels behind ddiff.nn.attention: the splash kernel (run here in
Pallas's interpreter) agrees with the written-out products under the bidirectional, causal
and block-diffusion masks and skips the tiles they mask out; it compiles for TPU
topologies; kinds a backend or a call cannot take fall back with one warning."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddiff import nn
from ddiff.nn import _attention

SEQ, HEADS, HEAD_DIM = 256, 2, 128
MASKS = {
    "bidirectional": None,
    "causal": nn.causal_mask(SEQ),
    "block_diffusion": nn.block_causal_mask(SEQ // 2, 32),
}


def _qkv(seq: int = SEQ, dtype=jnp.float32, batch: tuple[int, ...] = ()) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(k, (*batch, seq, HEADS, HEAD_DIM), dtype) for k in keys)


@pytest.mark.parametrize("name", list(MASKS))
def test_splash_kernel_agrees_with_dense_attention_and_its_gradient(name):
    """Outputs, and the gradients of a fixed projection of them with respect to q, k and v,
    agree with the einsum path to 2e-5 (float32 with float32 accumulation in both; the
    measured differences are about 1e-6), in tiles of 128 so that the masks leave whole
    tiles out (block-diffusion: 8 of 16)."""
    q, k, v = _qkv()
    mask = MASKS[name]
    weights = jax.random.normal(jax.random.key(1), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(weights * fn(q, k, v))

    def kernel(q, k, v):
        return nn.splash_attention(q, k, v, mask=mask, block=128, interpret=True)

    def dense(q, k, v):
        return nn.attention(q, k, v, kind="einsum", mask=mask)

    np.testing.assert_allclose(kernel(q, k, v), dense(q, k, v), atol=2e-5, rtol=0)
    got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.max(jnp.abs(w))), rtol=0)


def test_splash_kernel_visits_only_the_tiles_a_static_mask_does_not_mask_out():
    """The block-diffusion mask over [x_t ; x_0] (L = 256, blocks of 64, tiles of 128): the
    kernel's tile map lists exactly the 8 of 16 tiles with some allowed pair (full ones as
    full, the rest as partial), counted here from the mask itself; a causal mask is the
    kernel's own computed mask, with no mask array stored."""
    mask = nn.block_causal_mask(256, 64)
    tiles = mask.reshape(4, 128, 4, 128).transpose(0, 2, 1, 3).reshape(4, 4, -1)
    full, partial = int(tiles.all(-1).sum()), int((tiles.any(-1) & ~tiles.all(-1)).sum())
    info = _attention._splash_kernel(mask, (512, 512), HEADS, 128, True).fwd_mask_info
    visited = np.asarray(info.block_mask)  # (heads stored: identical heads share one, ...)
    assert (full, partial) == (2, 6)
    assert (int((visited == 2).sum()), int((visited == 1).sum())) == (len(visited) * full, len(visited) * partial)
    causal = _attention._splash_kernel(nn.causal_mask(512), (512, 512), HEADS, 128, True)
    assert causal.fwd_mask_info.partial_mask_blocks is None


def test_splash_block_is_the_largest_multiple_of_128_dividing_the_sequence_up_to_512():
    assert [nn.splash_block(n) for n in (128, 256, 384, 512, 640, 768, 2048)] == [128, 256, 384, 512, 128, 384, 512]


@pytest.fixture
def warnings_once(monkeypatch, caplog):
    """A fresh record of the warnings already given, and the log they go to."""
    monkeypatch.setattr(_attention, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="ddiff")
    return caplog


def test_kinds_that_cannot_run_take_the_dense_path_with_one_warning(warnings_once):
    """On CPU, cudnn and splash give the einsum path's values exactly, a splash call the
    kernel cannot take (a sequence not a multiple of 128, a mask computed inside the
    program) as well, each with one warning line however often it is traced; auto and
    dropout say nothing."""
    q, k, v = _qkv(seq=128)
    dense = jax.jit(lambda q, k, v, m: nn.attention(q, k, v, kind="einsum", mask=m))
    causal = nn.causal_mask(128)
    cases = {
        "cudnn": lambda q, k, v: nn.attention(q, k, v, kind="cudnn", mask=causal),
        "splash": lambda q, k, v: nn.attention(q, k, v, kind="splash", mask=causal),
        "traced": lambda q, k, v: nn.attention(q, k, v, kind="splash", mask=jnp.tri(128, dtype=bool)),
    }
    for case in cases.values():
        for _ in range(2):
            np.testing.assert_array_equal(jax.jit(case)(q, k, v), dense(q, k, v, causal))
    short = [a[:100] for a in (q, k, v)]
    nn.attention(*short, kind="splash")
    nn.attention(*short, kind="auto")
    nn.attention(q, k, v, kind="splash", dropout_rate=0.5, key=jax.random.key(0))
    assert [r.getMessage() for r in warnings_once.records] == [
        "attention 'cudnn' cannot take this call (a GPU kernel, on cpu): it takes the dense path",
        "attention 'splash' is a TPU kernel: programs for cpu take the dense path",
        "attention 'splash' cannot take this call (a mask computed inside the program): it takes the dense path",
        "attention 'splash' cannot take this call (sequences of 100 and 100, not multiples of 128): it takes "
        "the dense path",
    ]


# JAX's persistent compilation cache (shared by the suite) stores a topology's executable
# but cannot read it back without a client; it says so and compiles again.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
@pytest.mark.parametrize(("topology", "kind"), [("v5e:2x2", "auto"), ("v5p:2x2x1", "splash")])
def test_splash_attention_compiles_for_tpu_topologies(topology, kind):
    """attention with kind auto or splash, traced on this CPU host, lowers for a TPU
    topology's devices with the Mosaic kernel in the program: the block-diffusion pass of
    a bfloat16 batch sharded over the devices (as the trainer's shard_map shards it),
    forward and backward."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    batch = jax.sharding.PartitionSpec("data")
    mask = nn.block_causal_mask(256, 64)

    def loss(q, k, v):
        def local(q, k, v):
            return jax.vmap(lambda q, k, v: nn.attention(q, k, v, kind=kind, mask=mask))(q, k, v)

        out = jax.shard_map(local, mesh=mesh, in_specs=batch, out_specs=batch, check_vma=False)(q, k, v)
        return jnp.sum(out.astype(jnp.float32))

    shape = jax.ShapeDtypeStruct(
        (2 * len(devices), 512, HEADS, HEAD_DIM), jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, batch)
    )
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    assert "tpu_custom_call" in compiled.as_text()
