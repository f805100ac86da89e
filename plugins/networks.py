"""Built-in networks: a bidirectional transformer with adaptive layer norm (DiT-style)."""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff


def _modulate(x: Float[Array, "seq dim"], shift: Array, scale: Array) -> Float[Array, "seq dim"]:
    return x * (1.0 + scale) + shift


def _zero_linear(in_features: int, out_features: int, *, key: ddiff.Key) -> eqx.nn.Linear:
    layer = eqx.nn.Linear(in_features, out_features, key=key)
    return eqx.tree_at(lambda linear: (linear.weight, linear.bias), layer, replace_fn=jnp.zeros_like)


def timestep_features(t: ddiff.Time, dim: int) -> Float[Array, " dim"]:
    """Sinusoidal features of 1000 t (the usual diffusion time embedding)."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
    angles = 1000.0 * t * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


def rotary_tables(seq_len: int, head_dim: int) -> tuple[Array, Array]:
    """cos and sin of the rotary position embedding angles p * 10000^(-2i/head_dim)."""
    half = head_dim // 2
    frequencies = 10_000.0 ** (-jnp.arange(half) / half)
    angles = jnp.arange(seq_len)[:, None] * frequencies[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Float[Array, "seq heads dim"], cos: Array, sin: Array) -> Float[Array, "seq heads dim"]:
    """Rotate pairs of channels by position-dependent angles (RoPE, Su et al. 2021), so
    attention scores depend on relative positions."""
    first, second = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class SelfAttention(eqx.Module):
    """Bidirectional multi-head self-attention with optional rotary position embeddings."""

    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    heads: int = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, dropout: float, *, key: ddiff.Key):
        k1, k2 = jax.random.split(key)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, use_bias=False, key=k1)
        self.out = eqx.nn.Linear(dim, dim, key=k2)
        self.dropout = eqx.nn.Dropout(dropout)
        self.heads = heads

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        rotary: tuple[Array, Array] | None,
        *,
        key: ddiff.Key | None,
    ) -> Float[Array, "seq dim"]:
        seq_len, dim = x.shape
        q, k, v = jnp.split(jax.vmap(self.qkv)(x), 3, axis=-1)
        q, k, v = (a.reshape(seq_len, self.heads, dim // self.heads) for a in (q, k, v))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim // self.heads)
        weights = self.dropout(jax.nn.softmax(scores, axis=-1), key=key, inference=key is None)
        attended = jnp.einsum("hqk,khd->qhd", weights, v).reshape(seq_len, dim)
        return jax.vmap(self.out)(attended)


class TransformerBlock(eqx.Module):
    """Pre-norm attention and MLP, each gated and modulated by the conditioning vector
    (adaptive layer norm zero: the modulation starts at zero, so each block starts as
    the identity)."""

    attention: SelfAttention
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    modulation: eqx.nn.Linear
    norm1: eqx.nn.LayerNorm
    norm2: eqx.nn.LayerNorm
    dropout: eqx.nn.Dropout

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float, *, key: ddiff.Key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.attention = SelfAttention(dim, heads, dropout, key=k1)
        self.mlp_in = eqx.nn.Linear(dim, mlp_ratio * dim, key=k2)
        self.mlp_out = eqx.nn.Linear(mlp_ratio * dim, dim, key=k3)
        self.modulation = _zero_linear(dim, 6 * dim, key=k4)
        self.norm1 = eqx.nn.LayerNorm(dim, use_weight=False, use_bias=False)
        self.norm2 = eqx.nn.LayerNorm(dim, use_weight=False, use_bias=False)
        self.dropout = eqx.nn.Dropout(dropout)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        cond: Float[Array, " dim"],
        rotary: tuple[Array, Array] | None,
        *,
        key: ddiff.Key | None,
    ) -> Float[Array, "seq dim"]:
        inference = key is None
        k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
            self.modulation(jax.nn.silu(cond)), 6
        )
        h = _modulate(jax.vmap(self.norm1)(x), shift1, scale1)
        h = self.attention(h, rotary, key=k_attn)
        x = x + gate1 * h
        h = _modulate(jax.vmap(self.norm2)(x), shift2, scale2)
        h = jax.vmap(self.mlp_out)(jax.nn.gelu(jax.vmap(self.mlp_in)(h)))
        h = self.dropout(h, key=k_mlp, inference=inference)
        return x + gate2 * h


class Transformer(ddiff.AbstractNetwork):
    """Bidirectional transformer denoiser with adaptive layer norm conditioning.

    The conditioning vector is the sum of a time embedding (when ``time_conditioned``)
    and a class embedding (when the data has classes; index ``num_classes`` is the null
    class used for classifier-free guidance).

    Attributes (recipe keys):
        dim: width. depth: number of blocks. heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``dim``. dropout: dropout rate.
        time_conditioned: whether the output depends on t.
        positions: ``rotary`` (relative, RoPE in every attention layer) or ``learned``
            (an absolute embedding added to the tokens).
    """

    token_embedding: eqx.nn.Embedding
    position_embedding: Float[Array, "seq dim"] | None
    time_mlp: eqx.nn.MLP | None
    class_embedding: eqx.nn.Embedding | None
    conditioning_bias: Float[Array, " dim"]
    blocks: tuple[TransformerBlock, ...]
    final_norm: eqx.nn.LayerNorm
    final_modulation: eqx.nn.Linear
    head: eqx.nn.Linear
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    positions: Literal["rotary", "learned"] = eqx.field(static=True)
    heads: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        num_states: int,
        num_outputs: int,
        seq_len: int,
        num_classes: int = 0,
        key: ddiff.Key,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        time_conditioned: bool = True,
        positions: Literal["rotary", "learned"] = "rotary",
    ):
        if dim % heads != 0 or (positions == "rotary" and (dim // heads) % 2):
            raise ddiff.RecipeError(
                f"dim={dim} must be a multiple of heads={heads} with an even head width "
                f"for rotary positions",
                path="network",
            )
        keys = jax.random.split(key, depth + 6)
        self.token_embedding = eqx.nn.Embedding(num_states, dim, key=keys[0])
        self.positions = positions
        self.heads = heads
        self.position_embedding = (
            jax.random.normal(keys[1], (seq_len, dim)) if positions == "learned" else None
        )
        self.time_conditioned = time_conditioned
        self.num_classes = num_classes
        self.time_mlp = (
            eqx.nn.MLP(dim, dim, dim, depth=1, activation=jax.nn.silu, key=keys[2])
            if time_conditioned
            else None
        )
        self.class_embedding = (
            eqx.nn.Embedding(num_classes + 1, dim, key=keys[3]) if num_classes > 0 else None
        )
        self.conditioning_bias = jnp.zeros(dim)
        self.blocks = tuple(
            TransformerBlock(dim, heads, mlp_ratio, dropout, key=k) for k in keys[6:]
        )
        self.final_norm = eqx.nn.LayerNorm(dim, use_weight=False, use_bias=False)
        self.final_modulation = _zero_linear(dim, 2 * dim, key=keys[4])
        self.head = eqx.nn.Linear(dim, num_outputs, key=keys[5])

    def __call__(self, x_t, t, *, label=None, key=None):
        x = jax.vmap(self.token_embedding)(x_t)
        rotary = None
        if self.position_embedding is not None:
            x = x + self.position_embedding[: x_t.shape[0]]
        else:
            rotary = rotary_tables(x_t.shape[0], x.shape[-1] // self.heads)
        cond = self.conditioning_bias
        if self.time_mlp is not None:
            cond = cond + self.time_mlp(timestep_features(t, cond.shape[0]))
        if self.class_embedding is not None:
            cond = cond + self.class_embedding(self.num_classes if label is None else label)
        block_keys = [None] * len(self.blocks) if key is None else jax.random.split(key, len(self.blocks))
        for block, block_key in zip(self.blocks, block_keys, strict=True):
            x = block(x, cond, rotary, key=block_key)
        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(cond)), 2)
        x = _modulate(jax.vmap(self.final_norm)(x), shift, scale)
        return jax.vmap(self.head)(x)


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("network", "transformer", Transformer)
