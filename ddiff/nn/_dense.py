"""Linear layers: applied to every position at once, initialised, and counted."""

import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ddiff._typing import Key


def dense(linear: eqx.nn.Linear, x: Float[Array, "seq in"]) -> Float[Array, "seq out"]:
    """A linear layer on every position as one matrix product x W^T (+ b) (not a vmap of
    the layer, whose per-position products the compiler lays out less well)."""
    y = x @ linear.weight.T
    return y if linear.bias is None else y + linear.bias


def logits(head: eqx.nn.Linear, x: Float[Array, "seq dim"]) -> Float[Array, "seq out"]:
    """An output head x W^T (+ b) accumulated and returned in float32, whatever the
    compute dtype of ``x`` and the head (mixed precision)."""
    y = jnp.matmul(x, head.weight.T, preferred_element_type=jnp.float32)
    return y if head.bias is None else y + head.bias.astype(jnp.float32)


def scaled_linear(
    in_features: int,
    out_features: int,
    *,
    key: Key,
    scale: float = 1.0,
    use_bias: bool = False,
) -> eqx.nn.Linear:
    """A linear layer with weights from a normal truncated at two standard deviations,
    with variance ``scale / in_features`` (variance scaling on fan-in), and zero bias."""
    layer = eqx.nn.Linear(in_features, out_features, use_bias=use_bias, key=key)
    std = math.sqrt(scale / in_features) / 0.87962566103423978
    weight = std * jax.random.truncated_normal(key, -2.0, 2.0, (out_features, in_features))
    layer = eqx.tree_at(lambda linear: linear.weight, layer, weight)
    if use_bias:
        layer = eqx.tree_at(lambda linear: linear.bias, layer, jnp.zeros(out_features))
    return layer


def zeroed(layer: eqx.nn.Linear | eqx.nn.Conv) -> Any:
    """``layer`` with its weight and (where it has one) its bias set to zero: an adaLN-zero
    modulation, a residual branch or an output head that starts at zero."""

    def parameters(layer: Any) -> list[Array]:
        return [layer.weight] if layer.bias is None else [layer.weight, layer.bias]

    return eqx.tree_at(parameters, layer, replace_fn=jnp.zeros_like)


def zero_linear(in_features: int, out_features: int, *, key: Key) -> eqx.nn.Linear:
    """A linear layer with bias whose weight and bias start at zero (:func:`zeroed`)."""
    return zeroed(eqx.nn.Linear(in_features, out_features, key=key))


GLUKind = Literal["glu", "geglu", "swiglu"]
"""The gated feed-forward variants of :data:`GLU_ACTIVATIONS`."""

GLU_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "glu": jax.nn.sigmoid,
    "geglu": jax.nn.gelu,
    "swiglu": jax.nn.silu,
}
"""Gate activation of each gated feed-forward variant w2(act(w1 x) * w3 x) (Shazeer 2020)."""


def parameter_count(*weights: Array) -> int:
    """Entries of the given weight arrays (stacked layers included)."""
    return sum(math.prod(weight.shape) for weight in weights)


def transformer_flops_per_token(
    matmul_parameters: int, depth: int, dim: int, seq_len: int
) -> float:
    """Forward FLOPs per position of a transformer (the PaLM paper's appendix B):
    2 N + 4 L d T, with N the parameters of the matrix products applied at every position,
    L blocks of width d and T positions (4 L d T counts the two attention products
    q k^T and p v)."""
    return 2.0 * matmul_parameters + 4.0 * depth * dim * seq_len
