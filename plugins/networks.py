"""Built-in networks: a bidirectional transformer with adaptive layer norm (DiT-style),
the MD4 paper's transformer (rotary positions, adaLN-zero, GLU feed-forward, depth-scaled
initialisation), and the single-resolution UNet of the paper's image experiments."""

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


class SelfAttention(eqx.Module):
    """Bidirectional multi-head self-attention with optional rotary position embeddings
    (:func:`rotary`)."""

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
        tables: tuple[Array, Array] | None,
        kind: AttentionKind = "auto",
        *,
        key: ddiff.Key | None,
    ) -> Float[Array, "seq dim"]:
        """Attention over ``x``, with rotary positions when given their ``tables``
        (:func:`rotary_tables`), by the ``kind`` of :func:`attention`."""
        seq_len, dim = x.shape
        q, k, v = jnp.split(dense(self.qkv, x), 3, axis=-1)
        q, k, v = (a.reshape(seq_len, self.heads, dim // self.heads) for a in (q, k, v))
        if tables is not None:
            q, k = apply_rotary(q, *tables), apply_rotary(k, *tables)
        attended = attention(q, k, v, kind=kind, dropout=self.dropout.p, key=key)
        return dense(self.out, attended.reshape(seq_len, dim))


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
        tables: tuple[Array, Array] | None,
        kind: AttentionKind = "auto",
        *,
        key: ddiff.Key | None,
    ) -> Float[Array, "seq dim"]:
        """One block; ``tables`` and ``kind`` as in :class:`SelfAttention`."""
        inference = key is None
        k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
            self.modulation(jax.nn.silu(cond)), 6
        )
        h = _modulate(_layer_norm(x, self.norm1.eps), shift1, scale1)
        h = self.attention(h, tables, kind, key=k_attn)
        x = x + gate1 * h
        h = _modulate(_layer_norm(x, self.norm2.eps), shift2, scale2)
        h = dense(self.mlp_out, jax.nn.gelu(dense(self.mlp_in, h)))
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
        scan_layers: apply the blocks with one ``lax.scan`` (faster to compile) instead of
            unrolled (the default, faster to run); same values either way.
        attention: ``auto``, ``dot_product_attention`` or ``einsum`` (:func:`attention`).

    Model FLOPs per position (:meth:`flops_per_token`): 2 N + 4 L d T, N the weights of the
    attention projections, MLPs and output head (not the embeddings nor the per-sequence
    conditioning), L the depth, d the width, T the sequence length.
    """

    token_embedding: eqx.nn.Embedding
    position_embedding: Float[Array, "seq dim"] | None
    time_mlp: eqx.nn.MLP | None
    class_embedding: eqx.nn.Embedding | None
    conditioning_bias: Float[Array, " dim"]
    blocks: ddiff.LayerStack
    final_norm: eqx.nn.LayerNorm
    final_modulation: eqx.nn.Linear
    head: eqx.nn.Linear
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    positions: Literal["rotary", "learned"] = eqx.field(static=True)
    attention: AttentionKind = eqx.field(static=True)

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
        scan_layers: bool = False,
        attention: AttentionKind = "auto",
    ):
        ddiff.check_at_least("depth", depth)
        if dim % heads != 0 or (positions == "rotary" and (dim // heads) % 2):
            raise ddiff.RecipeError(
                f"dim={dim} must be a multiple of heads={heads} with an even head width "
                f"for rotary positions"
            )
        keys = jax.random.split(key, depth + 6)
        self.token_embedding = eqx.nn.Embedding(num_states, dim, key=keys[0])
        self.positions = positions
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
        self.blocks = ddiff.stack_layers(
            lambda k: TransformerBlock(dim, heads, mlp_ratio, dropout, key=k), keys[6:], scan=scan_layers
        )
        self.attention = attention
        self.final_norm = eqx.nn.LayerNorm(dim, use_weight=False, use_bias=False)
        self.final_modulation = _zero_linear(dim, 2 * dim, key=keys[4])
        self.head = eqx.nn.Linear(dim, num_outputs, key=keys[5])

    def flops_per_token(self, seq_len):
        block = self.blocks.layers
        weights = (block.attention.qkv.weight, block.attention.out.weight, block.mlp_in.weight, block.mlp_out.weight)
        dim = self.token_embedding.weight.shape[1]
        return transformer_flops_per_token(_size(*weights, self.head.weight), self.blocks.count, dim, seq_len)

    def __call__(self, x_t, t, *, label=None, key=None):
        x = self.token_embedding.weight[x_t]
        seq_len, dim = x.shape
        tables = None
        if self.position_embedding is None:
            tables = rotary_tables(seq_len, dim // self.blocks.layers.attention.heads)
        else:
            x = x + self.position_embedding[:seq_len]
        cond = self.conditioning_bias
        if self.time_mlp is not None:
            cond = cond + self.time_mlp(timestep_features(t, dim).astype(cond.dtype))
        if self.class_embedding is not None:
            cond = cond + self.class_embedding(self.num_classes if label is None else label)
        x, _ = self.blocks(
            x,
            lambda block, h, k: (block(h, cond, tables, self.attention, key=k), None),
            _scan_keys(key, self.blocks.count),
        )
        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(cond)), 2)
        x = _modulate(_layer_norm(x, self.final_norm.eps), shift, scale)
        return _logits(self.head, x)


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


# --------------------------------------------------------------------------- MD4 transformer


class MD4Transformer(ddiff.AbstractBlockCausalNetwork):
    """The MD4 paper's transformer denoiser (a bidirectional LLaMA-style network):
    token embedding, ``depth`` :class:`RotaryBlock` blocks (rotary position embeddings,
    adaLN-zero conditioning on time and class, gated feed-forward of width 8/3 ``dim``
    rounded up to ``multiple_of``), a final adaLN-zero layer norm and a zero-initialised
    linear head. Depth-scaled initialisation draws the feed-forward weights with
    variance 2 / (depth * fan_in). MD4-S (text8, OpenWebText): dim 768, depth 12, 12 heads.

    Block diffusion (capability ``block_causal`` when ``time_conditioned: false``): the
    vectorised pass reads [x_t, x_0] (both at positions 0..D-1) under
    :func:`block_causal_mask`, and a :class:`KVCache` holds the clean blocks' keys and
    values for sampling block by block (:class:`ddiff.AbstractBlockCausalNetwork`).

    Attributes (recipe keys):
        dim: width. depth: number of blocks. heads: attention heads.
        cond_dim: width of the time and class conditioning vector.
        mlp: gated feed-forward variant (``glu``: sigmoid gate, ``geglu``, ``swiglu``).
        multiple_of: the feed-forward width is rounded up to a multiple of this.
        dropout: rate on the input embedding, attention probabilities and branch outputs.
        depth_scaled_init: scale the feed-forward initialisation by 2 / depth.
        time_conditioned: whether the output depends on t.
        scan_layers: apply the blocks with one ``lax.scan`` (faster to compile) instead of
            unrolled (the default: about 1.2x faster train steps on CPU, measured in
            docs/performance.md); same values either way.
        attention: ``auto``, ``dot_product_attention`` or ``einsum`` (:func:`attention`).

    Model FLOPs per position (:meth:`flops_per_token`): 2 N + 4 L d T, N the weights of the
    blocks' attention and feed-forward products and the output head (not the embedding
    lookup nor the per-sequence conditioning), L the depth, d the width, T the sequence
    length. A train step counts 6 N + 12 L d T.
    """

    embedding: Float[Array, "states dim"]
    condition: ConditionEmbedding
    blocks: ddiff.LayerStack
    final_modulation: eqx.nn.Linear
    head: eqx.nn.Linear
    depth: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    mlp: str = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    attention: AttentionKind = eqx.field(static=True)

    def __init__(
        self,
        *,
        num_states: int,
        num_outputs: int,
        seq_len: int,
        num_classes: int = 0,
        key: ddiff.Key,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        cond_dim: int = 64,
        mlp: MLPKind = "glu",
        multiple_of: int = 32,
        dropout: float = 0.0,
        depth_scaled_init: bool = True,
        time_conditioned: bool = True,
        scan_layers: bool = False,
        attention: AttentionKind = "auto",
    ):
        del seq_len
        ddiff.check_at_least("depth", depth)

        def parts(key: ddiff.Key) -> dict[str, Any]:
            keys = jax.random.split(key, 5)
            head = eqx.nn.Linear(dim, num_outputs, use_bias=False, key=keys[4])
            return {
                "embedding": jax.random.normal(keys[0], (num_states, dim)) / math.sqrt(num_states),
                "condition": ConditionEmbedding(cond_dim, time_conditioned, num_classes, key=keys[1]),
                "blocks": _rotary_blocks(
                    dim, depth, heads, cond_dim, mlp, multiple_of, dropout, depth_scaled_init,
                    key=keys[2], path="heads", scan=scan_layers,
                ),  # fmt: skip
                "final_modulation": _zero_linear(cond_dim, 2 * dim, key=keys[3]),
                "head": eqx.tree_at(lambda linear: linear.weight, head, replace_fn=jnp.zeros_like),
            }

        built = _initialise(parts, key)
        self.embedding, self.condition, self.blocks = (
            built["embedding"], built["condition"], built["blocks"],
        )  # fmt: skip
        self.final_modulation, self.head = built["final_modulation"], built["head"]
        self.depth = depth
        self.dropout = dropout
        self.mlp = mlp
        self.time_conditioned = time_conditioned
        self.num_classes = num_classes
        self.attention = attention

    def flops_per_token(self, seq_len):
        return _rotary_flops(self.blocks, seq_len) + 2.0 * _size(self.head.weight)

    def __call__(self, x_t, t, *, label=None, key=None):
        k_embed, k_blocks = _split(key, 2)
        cond = self.condition(t, label)
        x = _dropout(self.embedding[x_t], self.dropout, k_embed)
        x = _run_blocks(self.blocks, x, cond, k_blocks, self.attention)
        return self._output(x, cond)

    def _output(self, x: Float[Array, "seq dim"], cond: Array) -> Float[Array, "seq out"]:
        shift, scale = jnp.split(self.final_modulation(GLU_ACTIVATIONS[self.mlp](cond)), 2)
        return _logits(self.head, _modulate(_layer_norm(x), shift, scale))

    @property
    def _head_dim(self) -> int:
        return self.embedding.shape[1] // self.blocks.layers.heads

    def block_causal_output(self, x_t, x0, *, block_size, label=None, key=None):
        k_embed, k_blocks = _split(key, 2)
        seq = x_t.shape[0]
        cond = self.condition(jnp.zeros(()), label)
        x = _dropout(self.embedding[jnp.concatenate([x_t, x0])], self.dropout, k_embed)
        tables = tuple(jnp.concatenate([a, a]) for a in rotary_tables(seq, self._head_dim))
        mask = jnp.asarray(block_causal_mask(seq, block_size))
        x = _run_blocks(self.blocks, x, cond, k_blocks, self.attention, tables=tables, mask=mask)
        return self._output(x[:seq], cond)

    def init_cache(self, capacity, *, block_size):
        if block_size < 1 or capacity < 0 or capacity % block_size:
            raise ddiff.DdiffError(
                f"a cache of clean blocks needs a capacity that is a multiple of the block "
                f"size {block_size}, got {capacity}"
            )
        shape = (self.depth, capacity, self.blocks.layers.heads, self._head_dim)
        zeros = jnp.zeros(shape, self.embedding.dtype)
        start = jnp.zeros((), jnp.int32)
        return KVCache(keys=zeros, values=zeros, length=start, position=start, block_size=block_size)

    def _after_cache(self, tokens: ddiff.Tokens, cache: KVCache, label: ddiff.Label | None):
        """The blocks on ``tokens`` at the positions after the cache, attending to the
        cached positions and to themselves: the output and every layer's keys and values."""
        cond = self.condition(jnp.zeros(()), label)
        tables = rotary_tables(tokens.shape[0], self._head_dim, start=cache.position)
        valid = jnp.arange(cache.keys.shape[1]) < cache.length

        def step(block, h, past):
            keys, values = past
            past = PastKeys(keys=keys, values=values, valid=valid)
            return block.with_keys(h, cond, tables, self.attention, key=None, past=past)

        x, (keys, values) = self.blocks(self.embedding[tokens], step, (cache.keys, cache.values))
        return x, cond, keys, values

    def extend_cache(self, cache, block, *, label=None):
        _, _, keys, values = self._after_cache(block, cache, label)

        def append(buffer, new):
            return jax.vmap(lambda b, n: ddiff.append_to_window(b, cache.length, n.astype(b.dtype))[0])(
                buffer, new
            )

        _, length = ddiff.append_to_window(cache.keys[0], cache.length, keys[0])
        return KVCache(
            keys=append(cache.keys, keys),
            values=append(cache.values, values),
            length=length,
            position=cache.position + block.shape[0],
            block_size=cache.block_size,
        )

    def cached_output(self, x_t, cache, *, label=None):
        x, cond, _, _ = self._after_cache(x_t, cache, label)
        return self._output(x, cond)


# --------------------------------------------------------------------------- UNet


class ResidualBlock(eqx.Module):
    """Residual block of the single-resolution UNet, on (channels, height, width):
    GroupNorm, SiLU, 3x3 conv, plus a (zero-initialised) projection of the conditioning
    vector, GroupNorm, SiLU, dropout, zero-initialised 3x3 conv; a 1x1 conv maps the
    input when the channel count changes."""

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    cond_projection: eqx.nn.Linear
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None
    dropout: float = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        groups: int,
        dropout: float,
        *,
        key: ddiff.Key,
    ):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = eqx.nn.GroupNorm(groups, in_channels)
        self.conv1 = eqx.nn.Conv2d(in_channels, out_channels, 3, padding=1, key=k1)
        projection = eqx.nn.Linear(cond_dim, out_channels, use_bias=False, key=k2)
        self.cond_projection = eqx.tree_at(
            lambda p: p.weight, projection, replace_fn=jnp.zeros_like
        )
        self.norm2 = eqx.nn.GroupNorm(groups, out_channels)
        self.conv2 = _zero_conv(eqx.nn.Conv2d(out_channels, out_channels, 3, padding=1, key=k3))
        self.skip = (
            eqx.nn.Conv2d(in_channels, out_channels, 1, key=k4)
            if in_channels != out_channels
            else None
        )
        self.dropout = dropout

    def __call__(
        self, x: Float[Array, "c h w"], cond: Float[Array, " cond"], *, key: ddiff.Key | None
    ) -> Float[Array, "c2 h w"]:
        h = self.conv1(jax.nn.silu(_group_norm(self.norm1, x)))
        h = h + self.cond_projection(cond)[:, None, None]
        h = _dropout(jax.nn.silu(_group_norm(self.norm2, h)), self.dropout, key)
        h = self.conv2(h)
        return (x if self.skip is None else self.skip(x)) + h


class SelfAttention2d(eqx.Module):
    """Residual single-head self-attention over all positions of a (channels, height,
    width) map, after a GroupNorm."""

    norm: eqx.nn.GroupNorm
    attention: eqx.nn.MultiheadAttention

    def __init__(self, channels: int, groups: int, *, key: ddiff.Key):
        self.norm = eqx.nn.GroupNorm(groups, channels)
        self.attention = eqx.nn.MultiheadAttention(
            1, channels, use_query_bias=True, use_key_bias=True, use_value_bias=True,
            use_output_bias=True, key=key,
        )  # fmt: skip

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        channels, height, width = x.shape
        z = _group_norm(self.norm, x).reshape(channels, height * width).T
        z = self.attention(z, z, z)
        return x + z.T.reshape(channels, height, width)


def sincos_2d(grid: int, dim: int) -> Float[Array, "patches dim"]:
    """Fixed 2-D sine-cosine position features of a grid x grid raster (as in DiT)."""
    quarter = dim // 4
    frequencies = 1.0 / 10_000.0 ** (jnp.arange(quarter) / quarter)
    rows, columns = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
    y = rows.reshape(-1)[:, None] * frequencies
    x = columns.reshape(-1)[:, None] * frequencies
    return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], axis=-1)


class PatchTransformer(eqx.Module):
    """The middle of a UViT (DiT-style): non-overlapping p x p patches embedded linearly
    plus learnable positions (initialised to 2-D sine-cosine features), the MD4
    transformer's :class:`RotaryBlock` blocks, and an adaLN-zero final layer whose
    zero-initialised linear map gives back p x p x channels patches."""

    patch_in: eqx.nn.Conv2d
    position: Float[Array, "patches dim"]
    blocks: ddiff.LayerStack
    final_modulation: eqx.nn.Linear
    patch_out: eqx.nn.Linear
    patch: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        grid: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        dropout: float,
        *,
        key: ddiff.Key,
    ):
        if dim % 4:
            raise ddiff.RecipeError(
                f"must be a multiple of 4, got {dim}", path="transformer_dim"
            )
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.patch_in = eqx.nn.Conv2d(channels, dim, patch, stride=patch, key=k1)
        self.position = sincos_2d(grid, dim)
        self.blocks = _rotary_blocks(
            dim, depth, heads, channels, "swiglu", 32, dropout, True, key=k2,
            path="transformer_heads",
        )  # fmt: skip
        self.final_modulation = _zero_linear(channels, 2 * dim, key=k3)
        self.patch_out = _zero_linear(dim, patch * patch * channels, key=k4)
        self.patch = patch
        self.depth = depth

    def __call__(
        self, x: Float[Array, "c h w"], cond: Float[Array, " cond"], *, key: ddiff.Key | None
    ) -> Float[Array, "c h w"]:
        channels, height, width = x.shape
        p = self.patch
        tokens = self.patch_in(x)
        dim = tokens.shape[0]
        tokens = tokens.reshape(dim, -1).T + self.position
        tokens = _run_blocks(self.blocks, tokens, cond, key)
        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(cond)), 2)
        patches = dense(self.patch_out, _modulate(_layer_norm(tokens), shift, scale))
        patches = patches.reshape(height // p, width // p, p, p, channels)
        return patches.transpose(4, 0, 2, 1, 3).reshape(channels, height, width)


class UNet(ddiff.AbstractNetwork):
    """The single-resolution UNet of the MD4 (and VDM) image experiments, for images of
    ``image_shape`` flattened in (height, width, channel) order.

    Each sub-pixel token is embedded in ``channels`` dimensions and a pixel's embeddings
    are concatenated; a 3x3 conv maps them to ``channels``; ``num_blocks``
    :class:`ResidualBlock` blocks follow, each output kept; the middle is a residual
    block, single-head self-attention and a residual block (or, with
    ``transformer_depth`` > 0, a :class:`PatchTransformer`: the paper's UViT for ImageNet
    64x64); then ``num_blocks + 1`` residual blocks each take the concatenation with the
    matching kept map; GroupNorm, SiLU and a zero-initialised 3x3 conv give the output
    channels of every sub-pixel. Time and class condition every residual block.
    CIFAR-10: 128 channels, 32 blocks, dropout 0.1.

    Attributes (recipe keys):
        image_shape: (height, width, channels) of the images; their product is D.
        channels: feature channels (and the per-sub-pixel embedding width).
        num_blocks: residual blocks on the way down (one more on the way up).
        dropout: dropout rate in the residual blocks (and the middle transformer).
        groups: GroupNorm groups.
        transformer_depth: blocks of the middle patch transformer (0: self-attention).
        transformer_dim, transformer_heads, patch_size: its width, heads and patch side.
        time_conditioned: whether the output depends on t.

    Model FLOPs per sub-pixel (:meth:`flops_per_token`): over the H x W pixels, 2 x the
    weights of every convolution applied at every pixel (the embedding's 3x3 conv, the
    residual blocks' convs and 1x1 skips, the output conv), plus the middle attention's
    projections 2 x 4 C^2 and products 4 (H W) C per pixel (or the patch transformer's
    2 N + 4 L d P per patch of the P patches, with its patch convs); divided by the
    C_img sub-pixels of a pixel. The per-image conditioning is not counted.
    """

    embedding: Float[Array, "states channels"]
    condition: ConditionEmbedding
    conv_in: eqx.nn.Conv2d
    down: ddiff.LayerStack
    middle_in: ResidualBlock | None
    middle_attention: SelfAttention2d | None
    middle_out: ResidualBlock | None
    middle_transformer: PatchTransformer | None
    up: ddiff.LayerStack
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
    image_shape: tuple[int, int, int] = eqx.field(static=True)
    num_blocks: int = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        num_states: int,
        num_outputs: int,
        seq_len: int,
        num_classes: int = 0,
        key: ddiff.Key,
        image_shape: tuple[int, int, int] = (32, 32, 3),
        channels: int = 128,
        num_blocks: int = 32,
        dropout: float = 0.1,
        groups: int = 32,
        transformer_depth: int = 0,
        transformer_dim: int = 768,
        transformer_heads: int = 12,
        patch_size: int = 2,
        time_conditioned: bool = True,
    ):
        height, width, colours = image_shape
        if height * width * colours != seq_len:
            raise ddiff.RecipeError(
                f"{height}x{width}x{colours} = {height * width * colours} sub-pixels, but the "
                f"data has sequences of {seq_len}",
                path="image_shape",
            )
        if channels % groups:
            raise ddiff.RecipeError(
                f"channels={channels} is not divisible by groups={groups}", path="groups"
            )
        if transformer_depth and (height != width or height % patch_size):
            raise ddiff.RecipeError(
                f"the middle transformer needs square images whose side is a multiple of "
                f"patch_size={patch_size}",
                path="patch_size",
            )

        def parts(key: ddiff.Key) -> dict[str, Any]:
            keys = jax.random.split(key, 7)

            def block(in_channels: int) -> Callable[[ddiff.Key], ResidualBlock]:
                return lambda k: ResidualBlock(in_channels, channels, channels, groups, dropout, key=k)

            middle: dict[str, Any] = dict.fromkeys(
                ("middle_in", "middle_attention", "middle_out", "middle_transformer")
            )
            if transformer_depth:
                middle["middle_transformer"] = PatchTransformer(
                    channels, height // patch_size, patch_size, transformer_dim,
                    transformer_depth, transformer_heads, dropout, key=keys[4],
                )  # fmt: skip
            else:
                k_in, k_attention, k_out = jax.random.split(keys[4], 3)
                middle["middle_in"] = block(channels)(k_in)
                middle["middle_attention"] = SelfAttention2d(channels, groups, key=k_attention)
                middle["middle_out"] = block(channels)(k_out)
            conv_out = eqx.nn.Conv2d(channels, colours * num_outputs, 3, padding=1, key=keys[6])
            return {
                "embedding": jax.random.normal(keys[0], (num_states, channels))
                / math.sqrt(num_states),
                "condition": ConditionEmbedding(channels, time_conditioned, num_classes, key=keys[1]),
                "conv_in": eqx.nn.Conv2d(colours * channels, channels, 3, padding=1, key=keys[2]),
                "down": ddiff.stack_layers(block(channels), jax.random.split(keys[3], num_blocks)),
                **middle,
                "up": ddiff.stack_layers(block(2 * channels), jax.random.split(keys[5], num_blocks + 1)),
                "norm_out": eqx.nn.GroupNorm(groups, channels),
                "conv_out": _zero_conv(conv_out),
            }

        built = _initialise(parts, key)
        self.embedding, self.condition, self.conv_in = (
            built["embedding"], built["condition"], built["conv_in"],
        )  # fmt: skip
        self.down, self.up = built["down"], built["up"]
        self.middle_in, self.middle_attention, self.middle_out, self.middle_transformer = (
            built["middle_in"], built["middle_attention"], built["middle_out"],
            built["middle_transformer"],
        )  # fmt: skip
        self.norm_out, self.conv_out = built["norm_out"], built["conv_out"]
        self.image_shape = (height, width, colours)
        self.num_blocks = num_blocks
        self.time_conditioned = time_conditioned
        self.num_classes = num_classes

    def flops_per_token(self, seq_len):
        height, width, _ = self.image_shape
        pixels = height * width
        blocks = [self.down.layers, self.up.layers, self.middle_in, self.middle_out]
        convs = [self.conv_in.weight, self.conv_out.weight]
        for block in blocks:
            if block is not None:
                convs += [block.conv1.weight, block.conv2.weight]
                convs += [] if block.skip is None else [block.skip.weight]
        flops = 2.0 * pixels * _size(*convs)
        if self.middle_attention is not None:
            attention = self.middle_attention.attention
            projections = (attention.query_proj, attention.key_proj, attention.value_proj, attention.output_proj)
            channels = self.conv_in.weight.shape[0]
            flops += 2.0 * pixels * _size(*(p.weight for p in projections)) + 4.0 * pixels**2 * channels
        if self.middle_transformer is not None:
            middle = self.middle_transformer
            patches = pixels // middle.patch**2
            per_patch = _rotary_flops(middle.blocks, patches) + 2.0 * _size(middle.patch_in.weight, middle.patch_out.weight)
            flops += patches * per_patch
        return flops / seq_len

    def __call__(self, x_t, t, *, label=None, key=None):
        height, width, colours = self.image_shape
        k_down, k_middle, k_up = _split(key, 3)
        cond = self.condition(t, label)
        x = self.embedding[x_t.reshape(height, width, colours)]
        h = self.conv_in(x.reshape(height, width, -1).transpose(2, 0, 1))

        def down(block, h, k):
            h = block(h, cond, key=k)
            return h, h

        first = h
        h, kept = self.down(h, down, _scan_keys(k_down, self.num_blocks))
        if self.middle_transformer is not None:
            h = self.middle_transformer(h, cond, key=k_middle)
        else:
            k_in, k_out = _split(k_middle, 2)
            h = self.middle_in(h, cond, key=k_in)
            h = self.middle_out(self.middle_attention(h), cond, key=k_out)
        skips = jnp.concatenate([first[None], kept])[::-1]

        def up(block, h, sliced):
            skip, k = sliced
            return block(jnp.concatenate([h, skip]), cond, key=k), None

        h, _ = self.up(h, up, (skips, _scan_keys(k_up, self.num_blocks + 1)))
        # The logits in float32 whatever the compute dtype (mixed precision).
        conv_out = ddiff.cast_floating(self.conv_out, jnp.float32)
        out = conv_out(jax.nn.silu(_group_norm(self.norm_out, h)).astype(jnp.float32))
        out = out.reshape(colours, -1, height, width).transpose(2, 3, 0, 1)
        return out.reshape(height * width * colours, -1)


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("network", "transformer", Transformer)
    registry.register("network", "md4_transformer", MD4Transformer)
    registry.register("network", "unet", UNet)
