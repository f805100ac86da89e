"""Multi-head attention with a choice of backend, and the masks of causal and
block-causal attention."""

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ddiff._typing import Key
from ddiff.nn._random import dropout

AttentionKind = Literal["auto", "dot_product_attention", "einsum"]
"""How :func:`attention` computes: ``auto`` picks per backend."""


def attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "keys heads head_dim"],
    v: Float[Array, "keys heads head_dim"],
    *,
    kind: AttentionKind = "auto",
    dropout_rate: float = 0.0,
    key: Key | None = None,
    mask: Bool[Array, "seq keys"] | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """softmax(q k^T / sqrt(head_dim)) v per head, with the scores and the softmax in
    float32 whatever the dtype of q, k, v: bidirectional, or with a ``mask`` only over the
    keys it allows for each query (each query must allow at least one: causal attention,
    :func:`causal_mask`; block-causal attention, :func:`block_causal_mask`).

    ``dot_product_attention`` goes through ``jax.nn.dot_product_attention`` (a GPU's fused
    kernel where available); ``einsum`` writes the two products out, heads first (on CPU,
    where no fused kernel exists, it runs faster than the former's XLA formulation);
    ``auto`` picks the first on accelerators and the second on CPU. Dropout on the
    attention probabilities (training with ``dropout_rate`` > 0 and a key, :func:`dropout`)
    needs the probabilities themselves, so it always takes the ``einsum`` path.
    """
    head_dim = q.shape[-1]
    dropping = key is not None and dropout_rate > 0.0
    if kind == "auto":
        kind = "einsum" if jax.default_backend() == "cpu" else "dot_product_attention"
    if kind == "dot_product_attention" and not dropping:
        return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[None])
    # Heads first, as the products want them (jnp.einsum would order the second
    # product's operands as v^T p^T, which runs at half the speed on CPU).
    q, k, v = (
        jnp.swapaxes(a, 0, 1) for a in (q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype), k, v)
    )
    scores = jnp.matmul(q, jnp.swapaxes(k, 1, 2), preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask[None], scores, -jnp.inf)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, key).astype(v.dtype)
    return jnp.swapaxes(jnp.matmul(probs, v), 0, 1)


def causal_mask(seq_len: int) -> Bool[Array, "seq seq"]:
    """The mask of causal attention, true where query n may attend to key m: m <= n."""
    return jnp.tril(jnp.ones((seq_len, seq_len), bool))


def block_causal_mask(seq_len: int, block_size: int) -> np.ndarray:
    """The attention mask of the vectorised block-diffusion pass (Arriola et al. 2025,
    sec. 3.2) over the concatenation [x_t, x_0] of 2 ``seq_len`` positions, true where
    query (row) may attend to key (column), with b(n) = (n mod seq_len) // ``block_size``:

    - block diagonal: noisy n to noisy m when b(n) = b(m) (a noisy block sees itself);
    - offset block causal: noisy n to clean m when b(m) < b(n) (and the clean blocks before);
    - block causal: clean n to clean m when b(m) <= b(n) (the clean sequence, block by block).

    A clean position never attends to a noisy one, so the keys and values of clean block b
    are those that a cache built block by block holds (:class:`KVCache`)."""
    block = np.arange(seq_len) // block_size
    query, key = block[:, None], block[None, :]
    noisy = np.concatenate([query == key, key < query], axis=1)
    clean = np.concatenate([np.zeros((seq_len, seq_len), bool), key <= query], axis=1)
    return np.concatenate([noisy, clean], axis=0)
