"""Layers the built-in networks share."""

import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

import ddiff

AttentionKind = Literal["auto", "dot_product_attention", "einsum"]
"""How :func:`attention` computes: ``auto`` picks per backend."""


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


# --------------------------------------------------------------------------- shared pieces

GLU_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "glu": jax.nn.sigmoid,
    "geglu": jax.nn.gelu,
    "swiglu": jax.nn.silu,
}
"""Gate activation of each gated feed-forward variant (Shazeer 2020)."""

MLPKind = Literal["glu", "geglu", "swiglu"]


def _scaled_linear(
    in_features: int,
    out_features: int,
    *,
    key: ddiff.Key,
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


def _zero_conv(conv: eqx.nn.Conv2d) -> eqx.nn.Conv2d:
    return eqx.tree_at(lambda c: (c.weight, c.bias), conv, replace_fn=jnp.zeros_like)


def _layer_norm(x: Float[Array, "... dim"], eps: float = 1e-5) -> Float[Array, "... dim"]:
    """Layer norm over the last axis without scale or offset; its statistics in float32,
    its result in the dtype of ``x``."""
    wide = x.astype(jnp.float32)
    mean = jnp.mean(wide, axis=-1, keepdims=True)
    variance = jnp.var(wide, axis=-1, keepdims=True)
    return ((wide - mean) * jax.lax.rsqrt(variance + eps)).astype(x.dtype)


def _group_norm(norm: eqx.nn.GroupNorm, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
    """A GroupNorm with its statistics (and affine map) in float32, its result in the
    dtype of ``x``."""
    return ddiff.cast_floating(norm, jnp.float32)(x.astype(jnp.float32)).astype(x.dtype)


def _dropout(x: Array, rate: float, key: ddiff.Key | None) -> Array:
    """Inverted dropout; the identity without a key (inference) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _split(key: ddiff.Key | None, count: int) -> tuple[ddiff.Key | None, ...]:
    """``count`` keys, or ``count`` Nones without a key (inference: no dropout)."""
    return (None,) * count if key is None else tuple(jax.random.split(key, count))


def _scan_keys(key: ddiff.Key | None, count: int) -> Any:
    """A stack of ``count`` keys to scan over, or None without a key."""
    return None if key is None else jax.random.split(key, count)


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
    x: Float[Array, "seq heads head_dim"], cos: Array, sin: Array
) -> Float[Array, "seq heads head_dim"]:
    """Rotate feature pairs (2i, 2i+1) of position n by the angle of :func:`rotary_tables`,
    in the dtype of ``x``."""
    seq, heads, head_dim = x.shape
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    pairs = x.reshape(seq, heads, head_dim // 2, 2)
    real, imaginary = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imaginary * sin, real * sin + imaginary * cos], axis=-1)
    return rotated.reshape(x.shape)


def rotary(
    x: Float[Array, "seq heads head_dim"], theta: float = 10_000.0
) -> Float[Array, "seq heads head_dim"]:
    """Rotary position embedding (Su et al. 2021): feature pairs (2i, 2i+1) of position n
    are rotated by the angle n / theta^(2i / head_dim)."""
    seq, _, head_dim = x.shape
    return apply_rotary(x, *rotary_tables(seq, head_dim, theta))


def dense(linear: eqx.nn.Linear, x: Float[Array, "seq in"]) -> Float[Array, "seq out"]:
    """A linear layer on every position as one matrix product x W^T (+ b) (not a vmap of
    the layer, whose per-position products the compiler lays out less well)."""
    y = x @ linear.weight.T
    return y if linear.bias is None else y + linear.bias


def attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "keys heads head_dim"],
    v: Float[Array, "keys heads head_dim"],
    *,
    kind: AttentionKind = "auto",
    dropout: float = 0.0,
    key: ddiff.Key | None = None,
    mask: Bool[Array, "seq keys"] | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """softmax(q k^T / sqrt(head_dim)) v per head, with the scores and the softmax in
    float32 whatever the dtype of q, k, v: bidirectional, or with a ``mask`` only over the
    keys it allows for each query (each query must allow at least one: block-causal
    attention, :func:`block_causal_mask`).

    ``dot_product_attention`` goes through ``jax.nn.dot_product_attention`` (a GPU's fused
    kernel where available); ``einsum`` writes the two products out, heads first (on CPU,
    where no fused kernel exists, it runs faster than the former's XLA formulation);
    ``auto`` picks the first on accelerators and the second on CPU. Dropout on the
    attention probabilities (training with ``dropout`` > 0 and a key) needs the
    probabilities themselves, so it always takes the ``einsum`` path.
    """
    head_dim = q.shape[-1]
    dropping = key is not None and dropout > 0.0
    if kind == "auto":
        kind = "einsum" if jax.default_backend() == "cpu" else "dot_product_attention"
    if kind == "dot_product_attention" and not dropping:
        return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[None])
    # Heads first, as the products want them (jnp.einsum would order the second
    # product's operands as v^T p^T, which runs at half the speed on CPU).
    q, k, v = (jnp.swapaxes(a, 0, 1) for a in (q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype), k, v))
    scores = jnp.matmul(q, jnp.swapaxes(k, 1, 2), preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask[None], scores, -jnp.inf)
    probs = _dropout(jax.nn.softmax(scores, axis=-1), dropout, key).astype(v.dtype)
    return jnp.swapaxes(jnp.matmul(probs, v), 0, 1)


def _initialise(parts: Callable[[ddiff.Key], dict[str, Any]], key: ddiff.Key) -> dict[str, Any]:
    """Run a network's initialisation as one compiled program (eagerly, each random
    initialiser would be compiled on its own), compiled without backend optimisation:
    it runs once, and its many random-number kernels are slow to optimise. Inside an
    outer trace (``eqx.filter_eval_shape``, a jitted constructor) it is simply traced."""
    if isinstance(key, jax.core.Tracer):
        return parts(key)
    options = {"xla_backend_optimization_level": 0}
    return eqx.filter_jit(parts, compiler_options=options)(key)


class ConditionEmbedding(eqx.Module):
    """The conditioning vector: sinusoidal features of 1000 t (when time conditioned)
    concatenated with a learned class embedding (when there are classes; index
    ``num_classes`` is the null class), through a two-layer SiLU MLP of width 4 ``dim``."""

    class_embedding: eqx.nn.Embedding | None
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    dim: int = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __init__(self, dim: int, time_conditioned: bool, num_classes: int, *, key: ddiff.Key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.dim = dim
        self.time_conditioned = time_conditioned
        self.num_classes = num_classes
        self.class_embedding = (
            eqx.nn.Embedding(num_classes + 1, dim, key=k1) if num_classes > 0 else None
        )
        inputs = dim * (int(time_conditioned) + int(num_classes > 0)) or dim
        self.mlp_in = _scaled_linear(inputs, 4 * dim, key=k2, use_bias=True)
        self.mlp_out = _scaled_linear(4 * dim, dim, key=k3, use_bias=True)

    def __call__(self, t: ddiff.Time, label: ddiff.Label | None) -> Float[Array, " dim"]:
        features = []
        if self.time_conditioned:
            features.append(timestep_features(t, self.dim))
        if self.class_embedding is not None:
            features.append(self.class_embedding(self.num_classes if label is None else label))
        x = jnp.concatenate(features) if features else jnp.zeros(self.dim)
        return self.mlp_out(jax.nn.silu(self.mlp_in(x.astype(self.mlp_in.weight.dtype))))


class RotaryBlock(eqx.Module):
    """One block of the MD4 transformer: pre-norm multi-head self-attention with rotary
    position embeddings, then a gated feed-forward w2(act(w1 x) * w3 x), each residual
    branch shifted, scaled and gated by the conditioning vector (adaptive layer norm zero:
    the modulation starts at zero, so the block starts as the identity). Dropout acts on
    the attention probabilities and on both branches' outputs."""

    wq: eqx.nn.Linear
    wk: eqx.nn.Linear
    wv: eqx.nn.Linear
    wo: eqx.nn.Linear
    w1: eqx.nn.Linear
    w2: eqx.nn.Linear
    w3: eqx.nn.Linear
    modulation: eqx.nn.Linear
    heads: int = eqx.field(static=True)
    mlp: str = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        cond_dim: int,
        mlp: str,
        dropout: float,
        ffn_scale: float,
        *,
        key: ddiff.Key,
    ):
        keys = jax.random.split(key, 8)
        self.wq, self.wk, self.wv, self.wo = (_scaled_linear(dim, dim, key=k) for k in keys[:4])
        self.w1 = _scaled_linear(dim, hidden, key=keys[4], scale=ffn_scale)
        self.w2 = _scaled_linear(hidden, dim, key=keys[5], scale=ffn_scale)
        self.w3 = _scaled_linear(dim, hidden, key=keys[6], scale=ffn_scale)
        self.modulation = _zero_linear(cond_dim, 6 * dim, key=keys[7])
        self.heads = heads
        self.mlp = mlp
        self.dropout = dropout

    def attention(
        self,
        x: Float[Array, "seq dim"],
        tables: tuple[Array, Array],
        kind: AttentionKind,
        *,
        key: ddiff.Key | None,
        mask: Bool[Array, "seq keys"] | None = None,
        past: "PastKeys | None" = None,
    ) -> tuple[Float[Array, "seq dim"], tuple[Array, Array]]:
        """Attention of ``x`` (to itself, as ``mask`` allows, and to the ``past`` keys
        and values of earlier positions where they are valid); returns the output and the
        rotated keys and the values of ``x``'s own positions."""
        seq, dim = x.shape
        head_dim = dim // self.heads
        k_probs, k_out = _split(key, 2)

        def heads(linear):
            return dense(linear, x).reshape(seq, self.heads, head_dim)

        q, k, v = apply_rotary(heads(self.wq), *tables), apply_rotary(heads(self.wk), *tables), heads(self.wv)
        keys, values = k, v
        if past is not None:
            keys = jnp.concatenate([past.keys.astype(k.dtype), k])
            values = jnp.concatenate([past.values.astype(v.dtype), v])
            own = jnp.ones((seq, seq), bool) if mask is None else mask
            mask = jnp.concatenate([jnp.broadcast_to(past.valid, (seq, past.valid.shape[0])), own], axis=1)
        out = attention(q, keys, values, kind=kind, dropout=self.dropout, key=k_probs, mask=mask)
        return _dropout(dense(self.wo, out.reshape(seq, dim)), self.dropout, k_out), (k, v)

    def feed_forward(
        self, x: Float[Array, "seq dim"], *, key: ddiff.Key | None
    ) -> Float[Array, "seq dim"]:
        gate = GLU_ACTIVATIONS[self.mlp](dense(self.w1, x))
        return _dropout(dense(self.w2, gate * dense(self.w3, x)), self.dropout, key)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        cond: Float[Array, " cond"],
        tables: tuple[Array, Array],
        kind: AttentionKind = "auto",
        *,
        key: ddiff.Key | None,
        mask: Bool[Array, "seq keys"] | None = None,
    ) -> Float[Array, "seq dim"]:
        """One block on ``x``, conditioned on ``cond``, with the rotary ``tables`` of
        :func:`rotary_tables`, the attention ``kind`` of :func:`attention` and its
        ``mask`` (None: bidirectional)."""
        return self.with_keys(x, cond, tables, kind, key=key, mask=mask)[0]

    def with_keys(
        self,
        x: Float[Array, "seq dim"],
        cond: Float[Array, " cond"],
        tables: tuple[Array, Array],
        kind: AttentionKind = "auto",
        *,
        key: ddiff.Key | None,
        mask: Bool[Array, "seq keys"] | None = None,
        past: "PastKeys | None" = None,
    ) -> tuple[Float[Array, "seq dim"], tuple[Array, Array]]:
        """:meth:`__call__`, attending also to the ``past`` keys and values of earlier
        positions; returns the output and this block's keys and values of ``x``."""
        k_attention, k_ffn = _split(key, 2)
        modulation = self.modulation(GLU_ACTIVATIONS[self.mlp](cond))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(modulation, 6)
        h = _modulate(_layer_norm(x), shift1, scale1)
        attended, own = self.attention(h, tables, kind, key=k_attention, mask=mask, past=past)
        x = x + gate1 * attended
        return x + gate2 * self.feed_forward(_modulate(_layer_norm(x), shift2, scale2), key=k_ffn), own


def _glu_hidden(dim: int, multiple_of: int) -> int:
    """Feed-forward width: 2/3 of 4 dim (so a GLU costs what a 4x MLP does), rounded up
    to a multiple of ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * -(-hidden // multiple_of)


def _rotary_blocks(
    dim: int,
    depth: int,
    heads: int,
    cond_dim: int,
    mlp: str,
    multiple_of: int,
    dropout: float,
    depth_scaled_init: bool,
    *,
    key: ddiff.Key,
    path: str,
    scan: bool = True,
) -> ddiff.LayerStack:
    if dim % heads or (dim // heads) % 2:
        raise ddiff.RecipeError(
            f"width {dim} must split into {heads} heads of even size", path=path
        )
    ffn_scale = 2.0 / depth if depth_scaled_init else 1.0
    hidden = _glu_hidden(dim, multiple_of)
    return ddiff.stack_layers(
        lambda k: RotaryBlock(dim, heads, hidden, cond_dim, mlp, dropout, ffn_scale, key=k),
        jax.random.split(key, depth),
        scan=scan,
    )


class PastKeys(eqx.Module):
    """Keys (rotated) and values of earlier positions that one attention layer's queries
    may also attend to, where ``valid`` (a cache of clean blocks, :class:`KVCache`).

    Attributes:
        keys, values: shape (positions, heads, head_dim).
        valid: which positions hold entries, shape (positions,).
    """

    keys: Float[Array, "positions heads head_dim"]
    values: Float[Array, "positions heads head_dim"]
    valid: Bool[Array, " positions"]


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


class KVCache(eqx.Module):
    """The clean blocks an :class:`MD4Transformer` has read, for block-by-block sampling:
    every layer's (rotated) keys and values of the last ``length`` clean positions (a
    sliding window of ``capacity``), and the absolute position of the next block. When the
    window is full the oldest block's entries are dropped as they are, not recomputed
    without it, which differs from a :class:`ddiff.BlockPrefix` of the same tokens beyond
    one layer; the bd3lm sampler rebuilds the cache from the window instead.

    Attributes:
        keys, values: shape (depth, capacity, heads, head_dim), in the compute dtype.
        length: positions held.
        position: absolute position of the next block (its rotary angles).
        block_size: the block length L'.
    """

    keys: Float[Array, "depth capacity heads head_dim"]
    values: Float[Array, "depth capacity heads head_dim"]
    length: Int[Array, ""]
    position: Int[Array, ""]
    block_size: int = eqx.field(static=True)


def _run_blocks(
    blocks: ddiff.LayerStack,
    x: Float[Array, "seq dim"],
    cond: Array,
    key: ddiff.Key | None,
    kind: AttentionKind = "auto",
    *,
    tables: tuple[Array, Array] | None = None,
    mask: Bool[Array, "seq seq"] | None = None,
) -> Float[Array, "seq dim"]:
    """The :class:`RotaryBlock` stack on ``x``, with the rotary tables computed once (of
    positions 0..seq-1 unless given) and the attention ``mask`` (None: bidirectional)."""
    seq, dim = x.shape
    if tables is None:
        tables = rotary_tables(seq, dim // blocks.layers.heads)
    x, _ = blocks(
        x,
        lambda block, h, k: (block(h, cond, tables, kind, key=k, mask=mask), None),
        _scan_keys(key, blocks.count),
    )
    return x


def _rotary_flops(blocks: ddiff.LayerStack, seq_len: int) -> float:
    """Forward FLOPs per position of a :class:`RotaryBlock` stack (2 N + 4 L d T without
    an output head)."""
    layer = blocks.layers
    weights = (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3)
    dim = layer.wq.weight.shape[-1]
    return transformer_flops_per_token(_size(*(w.weight for w in weights)), blocks.count, dim, seq_len)


def _logits(head: eqx.nn.Linear, x: Float[Array, "seq dim"]) -> Float[Array, "seq out"]:
    """The output head with float32 accumulation and result, whatever the compute dtype."""
    y = jnp.matmul(x, head.weight.T, preferred_element_type=jnp.float32)
    return y if head.bias is None else y + head.bias.astype(jnp.float32)


def _size(*weights: Any) -> int:
    """Entries of the given weight arrays (stacked layers included)."""
    return sum(math.prod(weight.shape) for weight in weights)


def transformer_flops_per_token(matmul_parameters: int, depth: int, dim: int, seq_len: int) -> float:
    """Forward FLOPs per position of a transformer (the PaLM paper's appendix B):
    2 N + 4 L d T, with N the parameters of the matrix products applied at every position,
    L blocks of width d and T positions (4 L d T counts the two attention products
    q k^T and p v)."""
    return 2.0 * matmul_parameters + 4.0 * depth * dim * seq_len
