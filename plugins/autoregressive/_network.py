"""A causal transformer: output n sees inputs < n only."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps
from ddiff import nn
from ddiff_plugins.autoregressive._process import CAUSAL


class CausalBlock(eqx.Module):
    """Pre-norm causal multi-head self-attention and a GELU MLP, each residual; dropout on
    the attention probabilities and on both branches' outputs."""

    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    norm1: eqx.nn.LayerNorm
    norm2: eqx.nn.LayerNorm
    heads: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float, *, key: ddiff.Key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, use_bias=False, key=k1)
        self.out = eqx.nn.Linear(dim, dim, key=k2)
        self.mlp_in = eqx.nn.Linear(dim, mlp_ratio * dim, key=k3)
        self.mlp_out = eqx.nn.Linear(mlp_ratio * dim, dim, key=k4)
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.norm2 = eqx.nn.LayerNorm(dim)
        self.heads = heads
        self.dropout = dropout

    def __call__(
        self, x: Float[Array, "seq dim"], kind: nn.AttentionKind = "auto", *, key: ddiff.Key | None
    ) -> Float[Array, "seq dim"]:
        """One block on ``x``, by the attention ``kind`` of :func:`ddiff.nn.attention`."""
        seq, dim = x.shape
        k_probs, k_out, k_mlp = nn.dropout_keys(key, 3)
        q, k, v = jnp.split(nn.dense(self.qkv, _normalise(self.norm1, x)), 3, axis=-1)
        q, k, v = (a.reshape(seq, self.heads, dim // self.heads) for a in (q, k, v))
        mask = nn.causal_mask(seq)
        attended = nn.attention(q, k, v, kind=kind, dropout_rate=self.dropout, key=k_probs, mask=mask)
        x = x + nn.dropout(nn.dense(self.out, attended.reshape(seq, dim)), self.dropout, k_out)
        hidden = jax.nn.gelu(nn.dense(self.mlp_in, _normalise(self.norm2, x)))
        return x + nn.dropout(nn.dense(self.mlp_out, hidden), self.dropout, k_mlp)


def _normalise(norm: eqx.nn.LayerNorm, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
    """``norm`` (with its learned scale and offset) at every position."""
    return nn.layer_norm(x, norm.eps, weight=norm.weight, bias=norm.bias)


class CausalTransformer(ddiff.AbstractNetwork):
    """A decoder-only transformer: the input is shifted right by one (position 0 reads the
    mask state V as a start token), learned absolute positions are added, and causal
    self-attention lets output n see inputs at positions < n only (capability
    ``causal``), so one call on a sequence gives every next-token distribution. A class
    label (index ``num_classes`` is the null class, for guidance) is added to every
    position. It ignores t.

    Attributes (recipe keys):
        dim: width. depth: number of blocks. heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``dim``. dropout: dropout rate.
        attention: ``auto``, ``dot_product_attention`` or ``einsum`` (:func:`ddiff.nn.attention`).
    """

    token_embedding: eqx.nn.Embedding
    position_embedding: Float[Array, "seq dim"]
    class_embedding: eqx.nn.Embedding | None
    blocks: nn.LayerStack
    final_norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    start_token: int = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    attention: nn.AttentionKind = eqx.field(static=True)

    def __init__(
        self, *, num_states: int, num_outputs: int, seq_len: int, num_classes: int = 0,
        key: ddiff.Key, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 4,
        dropout: float = 0.0, attention: nn.AttentionKind = "auto"
    ):
        if dim % heads != 0:
            raise ddiff.RecipeError(f"dim={dim} must be a multiple of heads={heads}", path="dim")
        ddiff.check_at_least("depth", depth)
        keys = jax.random.split(key, depth + 4)
        self.token_embedding = eqx.nn.Embedding(num_states, dim, key=keys[0])
        self.position_embedding = 0.02 * jax.random.normal(keys[1], (seq_len, dim))
        self.class_embedding = nn.class_embedding(num_classes, dim, key=keys[2])
        self.blocks = nn.stack_layers(
            lambda k: CausalBlock(dim, heads, mlp_ratio, dropout, key=k), keys[4:]
        )
        self.final_norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, num_outputs, key=keys[3])
        self.start_token = num_states - 1
        self.time_conditioned = False
        self.num_classes = num_classes
        self.attention = attention

    def capabilities(self) -> frozenset[str]:
        classes = {caps.CLASS_CONDITIONAL} if self.num_classes > 0 else set()
        return frozenset({caps.TIME_INDEPENDENT, CAUSAL, *classes})

    def __call__(
        self, x_t: ddiff.Tokens, t: ddiff.Time, *, label: ddiff.Label | None = None,
        key: ddiff.Key | None = None
    ) -> ddiff.NetworkOutput:
        shifted = jnp.concatenate([jnp.full((1,), self.start_token, x_t.dtype), x_t[:-1]])
        x = self.token_embedding.weight[shifted] + self.position_embedding[: x_t.shape[0]]
        if self.class_embedding is not None:
            x = x + nn.embed_class(self.class_embedding, label)
        keys = nn.stacked_dropout_keys(key, self.blocks.count)
        x, _ = self.blocks(x, lambda block, h, k: (block(h, self.attention, key=k), None), keys)
        return nn.logits(self.head, _normalise(self.final_norm, x))
