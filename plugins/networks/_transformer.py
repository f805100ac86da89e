"""A bidirectional transformer with adaptive layer norm (DiT-style)."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import nn


class SelfAttention(nn.AbstractTensorParallel):
    """Bidirectional multi-head self-attention with optional rotary position embeddings
    (:func:`ddiff.nn.rotary`), dropout on its probabilities. Under tensor parallelism the
    heads are split: the output projection is row-parallel, and the fused q/k/v projection,
    whose three blocks of rows are not one contiguous split of its weight, is stored whole
    on every model device and computed split by heads (:func:`ddiff.nn.split_over_model`
    on a view of its weight)."""

    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    heads: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, dropout: float, *, key: ddiff.Key):
        k1, k2 = jax.random.split(key)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, use_bias=False, key=k1)
        self.out = eqx.nn.Linear(dim, dim, key=k2)
        self.heads = heads
        self.dropout = dropout

    def tensor_split(self) -> nn.TensorSplit:
        return nn.TensorSplit(row=("out",), heads=self.heads)

    def __call__(
        self, x: Float[Array, "seq dim"], tables: tuple[Array, Array] | None,
        kind: nn.AttentionKind = "auto", *, key: ddiff.Key | None
    ) -> Float[Array, "seq dim"]:
        """Attention over ``x``, with rotary positions when given their ``tables``
        (:func:`ddiff.nn.rotary_tables`), by the ``kind`` of :func:`ddiff.nn.attention`."""
        seq_len, dim = x.shape
        weight = self.qkv.weight.reshape(3, self.heads, dim // self.heads, dim)
        q, k, v = jnp.einsum("sd,thed->tshe", x, nn.split_over_model(weight, 1))
        if tables is not None:
            q, k = nn.apply_rotary(q, *tables), nn.apply_rotary(k, *tables)
        attended = nn.attention(q, k, v, kind=kind, dropout_rate=self.dropout, key=key)
        return nn.dense(self.out, attended.reshape(seq_len, dim))


class TransformerBlock(nn.AbstractTensorParallel):
    """Pre-norm attention and MLP, each gated and modulated by the conditioning vector
    (adaptive layer norm zero: the modulation starts at zero, so each block starts as
    the identity); dropout on the attention probabilities and the MLP's output. Under
    tensor parallelism the MLP's hidden width is split (``mlp_in`` column-parallel,
    ``mlp_out`` row-parallel), the attention as :class:`SelfAttention` says."""

    attention: SelfAttention
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    modulation: eqx.nn.Linear
    dropout: float = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float, *, key: ddiff.Key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.attention = SelfAttention(dim, heads, dropout, key=k1)
        self.mlp_in = eqx.nn.Linear(dim, mlp_ratio * dim, key=k2)
        self.mlp_out = eqx.nn.Linear(mlp_ratio * dim, dim, key=k3)
        self.modulation = nn.zero_linear(dim, 6 * dim, key=k4)
        self.dropout = dropout

    def tensor_split(self) -> nn.TensorSplit:
        return nn.TensorSplit(column=("mlp_in",), row=("mlp_out",))

    def __call__(
        self, x: Float[Array, "seq dim"], cond: Float[Array, " dim"],
        tables: tuple[Array, Array] | None, kind: nn.AttentionKind = "auto", *,
        key: ddiff.Key | None
    ) -> Float[Array, "seq dim"]:
        """One block; ``tables`` and ``kind`` as in :class:`SelfAttention`."""
        k_attn, k_mlp = nn.dropout_keys(key, 2)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
            self.modulation(jax.nn.silu(cond)), 6
        )
        h = nn.modulate(nn.layer_norm(x), shift1, scale1)
        h = self.attention(h, tables, kind, key=k_attn)
        x = x + gate1 * h
        h = nn.modulate(nn.layer_norm(x), shift2, scale2)
        h = nn.dense(self.mlp_out, jax.nn.gelu(nn.dense(self.mlp_in, h)))
        h = nn.dropout(h, self.dropout, k_mlp)
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
        remat: what each block's backward pass recomputes (:data:`ddiff.nn.REMAT_POLICIES`):
            ``none`` (the default), ``block`` (everything), ``dots`` (all but the matrix
            products), ``dots_no_batch`` (all but the projections); same values.
        attention: ``auto``, ``einsum``, ``dot_product_attention``, ``cudnn`` (GPU) or
            ``splash`` (TPU) (:func:`ddiff.nn.attention`).

    Model FLOPs per position (:meth:`flops_per_token`): 2 N + 4 L d T, N the weights of the
    attention projections, MLPs and output head (not the embeddings nor the per-sequence
    conditioning), L the depth, d the width, T the sequence length.
    """

    token_embedding: eqx.nn.Embedding
    position_embedding: Float[Array, "seq dim"] | None
    time_mlp: eqx.nn.MLP | None
    class_embedding: eqx.nn.Embedding | None
    conditioning_bias: Float[Array, " dim"]
    blocks: nn.LayerStack
    final_modulation: eqx.nn.Linear
    head: eqx.nn.Linear
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    positions: Literal["rotary", "learned"] = eqx.field(static=True)
    attention: nn.AttentionKind = eqx.field(static=True)

    def __init__(
        self, *, num_states: int, num_outputs: int, seq_len: int, num_classes: int = 0,
        key: ddiff.Key, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 4,
        dropout: float = 0.0, time_conditioned: bool = True,
        positions: Literal["rotary", "learned"] = "rotary", scan_layers: bool = False,
        attention: nn.AttentionKind = "auto", remat: nn.RematPolicy = "none"
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
        self.class_embedding = nn.class_embedding(num_classes, dim, key=keys[3])
        self.conditioning_bias = jnp.zeros(dim)
        self.blocks = nn.stack_layers(
            lambda k: TransformerBlock(dim, heads, mlp_ratio, dropout, key=k), keys[6:],
            scan=scan_layers, remat=remat,
        )
        self.attention = attention
        self.final_modulation = nn.zero_linear(dim, 2 * dim, key=keys[4])
        self.head = eqx.nn.Linear(dim, num_outputs, key=keys[5])

    def flops_per_token(self, seq_len: int) -> float | None:
        block = self.blocks.layers
        weights = (block.attention.qkv.weight, block.attention.out.weight, block.mlp_in.weight, block.mlp_out.weight)
        dim = self.token_embedding.weight.shape[1]
        count = nn.parameter_count(*weights, self.head.weight)
        return nn.transformer_flops_per_token(count, self.blocks.count, dim, seq_len)

    def __call__(
        self, x_t: ddiff.Tokens, t: ddiff.Time, *, label: ddiff.Label | None = None,
        key: ddiff.Key | None = None
    ) -> ddiff.NetworkOutput:
        x = self.token_embedding.weight[x_t]
        seq_len, dim = x.shape
        tables = None
        if self.position_embedding is None:
            tables = nn.rotary_tables(seq_len, dim // self.blocks.layers.attention.heads)
        else:
            x = x + self.position_embedding[:seq_len]
        cond = self.conditioning_bias
        if self.time_mlp is not None:
            cond = cond + self.time_mlp(nn.timestep_features(t, dim).astype(cond.dtype))
        if self.class_embedding is not None:
            cond = cond + nn.embed_class(self.class_embedding, label)
        x, _ = self.blocks(
            x,
            lambda block, h, k: (block(h, cond, tables, self.attention, key=k), None),
            nn.stacked_dropout_keys(key, self.blocks.count),
        )
        x = nn.adaptive_layer_norm(x, self.final_modulation, jax.nn.silu(cond))
        return nn.logits(self.head, x)
