"""The blocks the MD4 transformer and the UNet's middle transformer share: the
conditioning embedding and the rotary adaLN-zero block with a gated feed-forward."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import nn


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
        self.class_embedding = nn.class_embedding(num_classes, dim, key=k1)
        inputs = dim * (int(time_conditioned) + int(num_classes > 0)) or dim
        self.mlp_in = nn.scaled_linear(inputs, 4 * dim, key=k2, use_bias=True)
        self.mlp_out = nn.scaled_linear(4 * dim, dim, key=k3, use_bias=True)

    def __call__(self, t: ddiff.Time, label: ddiff.Label | None) -> Float[Array, " dim"]:
        features = []
        if self.time_conditioned:
            features.append(nn.timestep_features(t, self.dim))
        if self.class_embedding is not None:
            features.append(nn.embed_class(self.class_embedding, label))
        x = jnp.concatenate(features) if features else jnp.zeros(self.dim)
        return self.mlp_out(jax.nn.silu(self.mlp_in(x.astype(self.mlp_in.weight.dtype))))


class RotaryBlock(nn.AbstractTensorParallel):
    """One block of the MD4 transformer: pre-norm multi-head self-attention with rotary
    position embeddings, then a gated feed-forward w2(act(w1 x) * w3 x), each residual
    branch shifted, scaled and gated by the conditioning vector (adaptive layer norm zero:
    the modulation starts at zero, so the block starts as the identity). Dropout acts on
    the attention probabilities and on both branches' outputs. Under tensor parallelism
    (Megatron layout) the heads and the hidden width are split: wq, wk, wv, w1 and w3 are
    column-parallel, wo and w2 row-parallel; the modulation is whole."""

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
    attention_dropout: float = eqx.field(static=True)
    heads_key: str = eqx.field(static=True)

    def __init__(
        self, dim: int, heads: int, hidden: int, cond_dim: int, mlp: str, dropout: float,
        ffn_scale: float, *, key: ddiff.Key, heads_key: str = "heads", attention_dropout: float | None = None
    ):
        keys = jax.random.split(key, 8)
        self.wq, self.wk, self.wv, self.wo = (nn.scaled_linear(dim, dim, key=k) for k in keys[:4])
        self.w1 = nn.scaled_linear(dim, hidden, key=keys[4], scale=ffn_scale)
        self.w2 = nn.scaled_linear(hidden, dim, key=keys[5], scale=ffn_scale)
        self.w3 = nn.scaled_linear(dim, hidden, key=keys[6], scale=ffn_scale)
        self.modulation = nn.zero_linear(cond_dim, 6 * dim, key=keys[7])
        self.heads = heads
        self.mlp = mlp
        self.dropout = dropout
        self.attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.heads_key = heads_key

    def tensor_split(self) -> nn.TensorSplit:
        return nn.TensorSplit(
            column=("wq", "wk", "wv", "w1", "w3"), row=("wo", "w2"), heads=self.heads,
            heads_key=self.heads_key,
        )

    def attention(
        self, x: Float[Array, "seq dim"], tables: tuple[Array, Array], kind: nn.AttentionKind, *,
        key: ddiff.Key | None, mask: nn.AttentionMask | None = None,
        past: nn.PastKeys | None = None
    ) -> tuple[Float[Array, "seq dim"], tuple[Array, Array]]:
        """Attention of ``x`` (to itself, as ``mask`` allows, and to the ``past`` keys
        and values of earlier positions where they are valid); returns the output and the
        rotated keys and the values of ``x``'s own positions."""
        seq, dim = x.shape
        head_dim = dim // self.heads
        k_probs, k_out = nn.dropout_keys(key, 2)

        def heads(linear):
            return nn.dense(linear, x).reshape(seq, self.heads, head_dim)

        q, k, v = (
            nn.apply_rotary(heads(self.wq), *tables),
            nn.apply_rotary(heads(self.wk), *tables),
            heads(self.wv),
        )
        keys, values = k, v
        if past is not None:
            keys, values, mask = past.prepend(k, v, mask)
        out = nn.attention(
            q, keys, values, kind=kind, dropout_rate=self.attention_dropout, key=k_probs, mask=mask
        )
        return nn.dropout(nn.dense(self.wo, out.reshape(seq, dim)), self.dropout, k_out), (k, v)

    def feed_forward(
        self, x: Float[Array, "seq dim"], *, key: ddiff.Key | None
    ) -> Float[Array, "seq dim"]:
        gate = nn.GLU_ACTIVATIONS[self.mlp](nn.dense(self.w1, x))
        return nn.dropout(nn.dense(self.w2, gate * nn.dense(self.w3, x)), self.dropout, key)

    def __call__(
        self, x: Float[Array, "seq dim"], cond: Float[Array, " cond"], tables: tuple[Array, Array],
        kind: nn.AttentionKind = "auto", *, key: ddiff.Key | None,
        mask: nn.AttentionMask | None = None, past: nn.PastKeys | None = None
    ) -> tuple[Float[Array, "seq dim"], tuple[Array, Array]]:
        """One block on ``x``, conditioned on ``cond``, with the rotary ``tables`` of
        :func:`ddiff.nn.rotary_tables`, the attention ``kind`` of :func:`ddiff.nn.attention`
        and its ``mask`` (None: bidirectional), attending also to the ``past`` keys and
        values of earlier positions; returns the output and this block's keys and values
        of ``x``."""
        k_attention, k_ffn = nn.dropout_keys(key, 2)
        modulation = self.modulation(nn.GLU_ACTIVATIONS[self.mlp](cond))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(modulation, 6)
        h = nn.modulate(nn.layer_norm(x), shift1, scale1)
        attended, own = self.attention(h, tables, kind, key=k_attention, mask=mask, past=past)
        x = x + gate1 * attended
        return x + gate2 * self.feed_forward(
            nn.modulate(nn.layer_norm(x), shift2, scale2), key=k_ffn
        ), own


def _glu_hidden(dim: int, multiple_of: int) -> int:
    """Feed-forward width: 2/3 of 4 dim (so a GLU costs what a 4x MLP does), rounded up
    to a multiple of ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * -(-hidden // multiple_of)


def rotary_blocks(
    dim: int, depth: int, heads: int, cond_dim: int, mlp: str, multiple_of: int, dropout: float,
    depth_scaled_init: bool, *, key: ddiff.Key, path: str, scan: bool = True,
    remat: nn.RematPolicy = "none", attention_dropout: float | None = None
) -> nn.LayerStack:
    """``depth`` :class:`RotaryBlock` blocks in a layer stack (rematerialised as ``remat``
    says, :data:`ddiff.nn.REMAT_POLICIES`), the feed-forward weights' variance scaled by
    2 / ``depth`` when ``depth_scaled_init``; dropout ``attention_dropout`` on the
    attention probabilities (None: ``dropout``)."""
    if dim % heads or (dim // heads) % 2:
        raise ddiff.RecipeError(
            f"width {dim} must split into {heads} heads of even size", path=path
        )
    ffn_scale = 2.0 / depth if depth_scaled_init else 1.0
    hidden = _glu_hidden(dim, multiple_of)
    return nn.stack_layers(
        lambda k: RotaryBlock(
            dim, heads, hidden, cond_dim, mlp, dropout, ffn_scale, key=k, heads_key=path,
            attention_dropout=attention_dropout,
        ),
        jax.random.split(key, depth),
        scan=scan,
        remat=remat,
    )


def run_rotary_blocks(
    blocks: nn.LayerStack, x: Float[Array, "seq dim"], cond: Array, key: ddiff.Key | None,
    kind: nn.AttentionKind = "auto", *, tables: tuple[Array, Array] | None = None,
    mask: nn.AttentionMask | None = None
) -> Float[Array, "seq dim"]:
    """The :class:`RotaryBlock` stack on ``x``, with the rotary tables computed once (of
    positions 0..seq-1 unless given) and the attention ``mask`` (None: bidirectional)."""
    seq, dim = x.shape
    if tables is None:
        tables = nn.rotary_tables(seq, dim // blocks.layers.heads)
    x, _ = blocks(
        x,
        lambda block, h, k: (block(h, cond, tables, kind, key=k, mask=mask)[0], None),
        nn.stacked_dropout_keys(key, blocks.count),
    )
    return x


def rotary_flops(blocks: nn.LayerStack, seq_len: int) -> float:
    """Forward FLOPs per position of a :class:`RotaryBlock` stack (2 N + 4 L d T without
    an output head)."""
    layer = blocks.layers
    weights = (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3)
    dim = layer.wq.weight.shape[-1]
    return nn.transformer_flops_per_token(
        nn.parameter_count(*(w.weight for w in weights)), blocks.count, dim, seq_len
    )
