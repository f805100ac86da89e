"""A causal transformer: output n sees inputs < n only."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.autoregressive._process import CAUSAL


class CausalBlock(eqx.Module):
    """Pre-norm causal multi-head self-attention and a GELU MLP, each residual."""

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

    def __call__(self, x: Float[Array, "seq dim"], *, key: ddiff.Key | None) -> Float[Array, "seq dim"]:
        seq, dim = x.shape
        head_dim = dim // self.heads
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        q, k, v = jnp.split(jax.vmap(self.qkv)(jax.vmap(self.norm1)(x)), 3, axis=-1)
        q, k, v = (a.reshape(seq, self.heads, head_dim) for a in (q, k, v))
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        weights = _dropout(jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1), self.dropout, keys[0])
        attended = jnp.einsum("hqk,khd->qhd", weights, v).reshape(seq, dim)
        x = x + _dropout(jax.vmap(self.out)(attended), self.dropout, keys[1])
        hidden = jax.nn.gelu(jax.vmap(self.mlp_in)(jax.vmap(self.norm2)(x)))
        return x + _dropout(jax.vmap(self.mlp_out)(hidden), self.dropout, keys[2])


def _dropout(x: Array, rate: float, key: ddiff.Key | None) -> Array:
    """Inverted dropout; the identity without a key (inference) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


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
    """

    token_embedding: eqx.nn.Embedding
    position_embedding: Float[Array, "seq dim"]
    class_embedding: eqx.nn.Embedding | None
    blocks: ddiff.LayerStack
    final_norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    start_token: int = eqx.field(static=True)
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
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        if dim % heads != 0:
            raise ddiff.RecipeError(f"dim={dim} must be a multiple of heads={heads}", path="dim")
        ddiff.check_at_least("depth", depth)
        keys = jax.random.split(key, depth + 4)
        self.token_embedding = eqx.nn.Embedding(num_states, dim, key=keys[0])
        self.position_embedding = 0.02 * jax.random.normal(keys[1], (seq_len, dim))
        self.class_embedding = (
            eqx.nn.Embedding(num_classes + 1, dim, key=keys[2]) if num_classes > 0 else None
        )
        self.blocks = ddiff.stack_layers(
            lambda k: CausalBlock(dim, heads, mlp_ratio, dropout, key=k), keys[4:]
        )
        self.final_norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, num_outputs, key=keys[3])
        self.start_token = num_states - 1
        self.time_conditioned = False
        self.num_classes = num_classes

    def capabilities(self):
        classes = {caps.CLASS_CONDITIONAL} if self.num_classes > 0 else set()
        return frozenset({caps.TIME_INDEPENDENT, CAUSAL, *classes})

    def __call__(self, x_t, t, *, label=None, key=None):
        shifted = jnp.concatenate([jnp.full((1,), self.start_token, x_t.dtype), x_t[:-1]])
        x = jax.vmap(self.token_embedding)(shifted) + self.position_embedding[: x_t.shape[0]]
        if self.class_embedding is not None:
            x = x + self.class_embedding(self.num_classes if label is None else label)
        keys = None if key is None else jax.random.split(key, self.blocks.count)
        x, _ = self.blocks(x, lambda block, h, k: (block(h, key=k), None), keys)
        return jax.vmap(self.head)(jax.vmap(self.final_norm)(x))
