"""Rotary position embeddings (Su et al. 2021)."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rotary_tables(
    seq_len: int, head_dim: int, theta: float = 10_000.0, start: int | Int[Array, ""] = 0
) -> tuple[Float[Array, "seq 1 half"], Float[Array, "seq 1 half"]]:
    """cos and sin of the rotary angles n / theta^(2i / head_dim), position n (from
    ``start``) and pair i, shaped to broadcast over heads. Computed once per forward pass
    and shared by every layer (:func:`apply_rotary`)."""
    frequencies = 1.0 / theta ** (jnp.arange(0, head_dim, 2) / head_dim)
    positions = start + jnp.arange(seq_len)
    angles = positions[:, None, None] * frequencies[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: Float[Array, "seq heads head_dim"],
    cos: Float[Array, "seq 1 half"],
    sin: Float[Array, "seq 1 half"],
) -> Float[Array, "seq heads head_dim"]:
    """Rotate feature pairs (2i, 2i+1) of position n by the angle of :func:`rotary_tables`:
    (a, b) -> (a cos - b sin, a sin + b cos), in the dtype of ``x``."""
    seq, heads, head_dim = x.shape
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    pairs = x.reshape(seq, heads, head_dim // 2, 2)
    real, imaginary = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imaginary * sin, real * sin + imaginary * cos], axis=-1)
    return rotated.reshape(x.shape)


def rotary(
    x: Float[Array, "seq heads head_dim"], theta: float = 10_000.0
) -> Float[Array, "seq heads head_dim"]:
    """Rotary position embedding: feature pairs (2i, 2i+1) of position n are rotated by
    the angle n / theta^(2i / head_dim), so the score of a rotated query and key depends on
    their positions through m - n only."""
    seq, _, head_dim = x.shape
    return apply_rotary(x, *rotary_tables(seq, head_dim, theta))
