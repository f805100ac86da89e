"""Normalisation in float32 and adaptive layer norm (adaLN) conditioning."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ddiff._layers import cast_floating
from ddiff._typing import Time


def layer_norm(
    x: Float[Array, "*batch dim"],
    eps: float = 1e-5,
    *,
    weight: Float[Array, " dim"] | None = None,
    bias: Float[Array, " dim"] | None = None,
) -> Float[Array, "*batch dim"]:
    """(x - mean) / sqrt(var + eps) over the last axis, times ``weight`` and plus ``bias``
    where given (an ``eqx.nn.LayerNorm``'s affine map); the statistics and the affine map
    in float32, the result in the dtype of ``x``."""
    wide = x.astype(jnp.float32)
    mean = jnp.mean(wide, axis=-1, keepdims=True)
    variance = jnp.var(wide, axis=-1, keepdims=True)
    normalised = (wide - mean) * jax.lax.rsqrt(variance + eps)
    if weight is not None:
        normalised = weight.astype(jnp.float32) * normalised
    if bias is not None:
        normalised = normalised + bias.astype(jnp.float32)
    return normalised.astype(x.dtype)


def group_norm(
    norm: eqx.nn.GroupNorm, x: Float[Array, "channels height width"]
) -> Float[Array, "channels height width"]:
    """``norm`` (group normalisation over the channels and positions of each group,
    then its affine map) with its statistics and affine map in float32, its result in the
    dtype of ``x``."""
    return cast_floating(norm, jnp.float32)(x.astype(jnp.float32)).astype(x.dtype)


def modulate(
    x: Float[Array, "seq dim"], shift: Float[Array, " dim"], scale: Float[Array, " dim"]
) -> Float[Array, "seq dim"]:
    """Adaptive layer norm's modulation x (1 + scale) + shift (DiT), with ``shift`` and
    ``scale`` projected from the conditioning vector; from a :func:`zero_linear` projection
    it starts as the identity."""
    return x * (1.0 + scale) + shift


def adaptive_layer_norm(
    x: Float[Array, "seq dim"], modulation: eqx.nn.Linear, cond: Float[Array, " cond"]
) -> Float[Array, "seq dim"]:
    """The adaLN output layer: :func:`modulate` of :func:`layer_norm` (x) by (shift, scale),
    the two halves of ``modulation(cond)``."""
    shift, scale = jnp.split(modulation(cond), 2)
    return modulate(layer_norm(x), shift, scale)


def timestep_features(t: Time, dim: int) -> Float[Array, " dim"]:
    """Sinusoidal features of 1000 t (the usual diffusion time embedding):
    sin(1000 t w_i) then cos(1000 t w_i), w_i = 10000^(-i / (dim / 2))."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
    angles = 1000.0 * t * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])
