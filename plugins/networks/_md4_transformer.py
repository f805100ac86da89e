"""The MD4 paper's transformer: rotary positions, adaLN-zero, GLU feed-forward, depth-scaled initialisation."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import nn
from ddiff_plugins.networks._blocks import (
    ConditionEmbedding,
    rotary_blocks,
    rotary_flops,
    run_rotary_blocks,
)


class MD4Transformer(ddiff.AbstractBlockCausalNetwork):
    """The MD4 paper's transformer denoiser (a bidirectional LLaMA-style network):
    token embedding, ``depth`` :class:`RotaryBlock` blocks (rotary position embeddings,
    adaLN-zero conditioning on time and class, gated feed-forward of width 8/3 ``dim``
    rounded up to ``multiple_of``), a final adaLN-zero layer norm and a zero-initialised
    linear head. Depth-scaled initialisation draws the feed-forward weights with
    variance 2 / (depth * fan_in). MD4-S (text8, OpenWebText): dim 768, depth 12, 12 heads.

    Block diffusion (capability ``block_causal`` when ``time_conditioned: false``): the
    vectorised pass reads [x_t, x_0] (both at positions 0..D-1) under
    :func:`ddiff.nn.block_causal_mask`, and a :class:`ddiff.nn.KVCache` holds the clean blocks' keys and
    values for sampling block by block (:class:`ddiff.AbstractBlockCausalNetwork`).

    Attributes (recipe keys):
        dim: width. depth: number of blocks. heads: attention heads.
        cond_dim: width of the time and class conditioning vector.
        mlp: gated feed-forward variant (``glu``: sigmoid gate, ``geglu``, ``swiglu``).
        multiple_of: the feed-forward width is rounded up to a multiple of this.
        dropout: rate on the input embedding, attention probabilities and branch outputs.
        attention_dropout: rate on the attention probabilities alone (null: ``dropout``);
            0 as BD3-LM's code trains (dropout on the branches only), which lets the fused
            kernels (``splash``, ``cudnn``) run: dropping probabilities needs them written out.
        depth_scaled_init: scale the feed-forward initialisation by 2 / depth.
        time_conditioned: whether the output depends on t.
        scan_layers: apply the blocks with one ``lax.scan`` (faster to compile) instead of
            unrolled (the default: about 1.2x faster train steps on CPU, measured in
            docs/performance.md); same values either way.
        remat: what each block's backward pass recomputes (:data:`ddiff.nn.REMAT_POLICIES`):
            ``none`` (the default), ``block`` (everything), ``dots`` (all but the matrix
            products), ``dots_no_batch`` (all but the projections); same values.
        attention: ``auto``, ``einsum``, ``dot_product_attention``, ``cudnn`` (GPU) or
            ``splash`` (TPU; skips the masked tiles of the block-diffusion mask)
            (:func:`ddiff.nn.attention`).

    Model FLOPs per position (:meth:`flops_per_token`): 2 N + 4 L d T, N the weights of the
    blocks' attention and feed-forward products and the output head (not the embedding
    lookup nor the per-sequence conditioning), L the depth, d the width, T the sequence
    length. A train step counts 6 N + 12 L d T.
    """

    embedding: Float[Array, "states dim"]
    condition: ConditionEmbedding
    blocks: nn.LayerStack
    final_modulation: eqx.nn.Linear
    head: eqx.nn.Linear
    depth: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    mlp: str = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    attention: nn.AttentionKind = eqx.field(static=True)

    def __init__(
        self, *, num_states: int, num_outputs: int, seq_len: int, num_classes: int = 0,
        key: ddiff.Key, dim: int = 768, depth: int = 12, heads: int = 12, cond_dim: int = 64,
        mlp: nn.GLUKind = "glu", multiple_of: int = 32, dropout: float = 0.0,
        depth_scaled_init: bool = True, time_conditioned: bool = True, scan_layers: bool = False,
        attention: nn.AttentionKind = "auto", remat: nn.RematPolicy = "none",
        attention_dropout: float | None = None
    ):
        del seq_len
        ddiff.check_at_least("depth", depth)

        def parts(key: ddiff.Key) -> dict[str, Any]:
            keys = jax.random.split(key, 5)
            head = eqx.nn.Linear(dim, num_outputs, use_bias=False, key=keys[4])
            return {
                "embedding": nn.token_table(num_states, dim, key=keys[0]),
                "condition": ConditionEmbedding(cond_dim, time_conditioned, num_classes, key=keys[1]),
                "blocks": rotary_blocks(
                    dim, depth, heads, cond_dim, mlp, multiple_of, dropout, depth_scaled_init,
                    key=keys[2], path="heads", scan=scan_layers, remat=remat,
                    attention_dropout=attention_dropout,
                ),  # fmt: skip
                "final_modulation": nn.zero_linear(cond_dim, 2 * dim, key=keys[3]),
                "head": nn.zeroed(head),
            }

        built = nn.compiled_init(parts, key)
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

    def flops_per_token(self, seq_len: int) -> float | None:
        return rotary_flops(self.blocks, seq_len) + 2.0 * nn.parameter_count(self.head.weight)

    def __call__(
        self, x_t: ddiff.Tokens, t: ddiff.Time, *, label: ddiff.Label | None = None,
        key: ddiff.Key | None = None
    ) -> ddiff.NetworkOutput:
        k_embed, k_blocks = nn.dropout_keys(key, 2)
        cond = self.condition(t, label)
        x = nn.dropout(self.embedding[x_t], self.dropout, k_embed)
        x = run_rotary_blocks(self.blocks, x, cond, k_blocks, self.attention)
        return self._output(x, cond)

    def _output(self, x: Float[Array, "seq dim"], cond: Array) -> Float[Array, "seq out"]:
        activated = nn.GLU_ACTIVATIONS[self.mlp](cond)
        return nn.logits(self.head, nn.adaptive_layer_norm(x, self.final_modulation, activated))

    @property
    def _head_dim(self) -> int:
        return self.embedding.shape[1] // self.blocks.layers.heads

    def block_causal_output(
        self, x_t: ddiff.Tokens, x0: ddiff.Tokens, *, block_size: int,
        label: ddiff.Label | None = None, key: ddiff.Key | None = None
    ) -> ddiff.NetworkOutput:
        k_embed, k_blocks = nn.dropout_keys(key, 2)
        seq = x_t.shape[0]
        cond = self.condition(jnp.zeros(()), label)
        x = nn.dropout(self.embedding[jnp.concatenate([x_t, x0])], self.dropout, k_embed)
        tables = tuple(jnp.concatenate([a, a]) for a in nn.rotary_tables(seq, self._head_dim))
        mask = nn.block_causal_mask(seq, block_size)
        x = run_rotary_blocks(self.blocks, x, cond, k_blocks, self.attention, tables=tables, mask=mask)
        return self._output(x[:seq], cond)

    def init_cache(self, capacity: int, *, block_size: int) -> Any:
        heads = self.blocks.layers.heads
        return nn.KVCache.empty(
            self.depth, capacity, heads, self._head_dim, block_size=block_size, dtype=self.embedding.dtype
        )

    def _after_cache(self, tokens: ddiff.Tokens, cache: nn.KVCache, label: ddiff.Label | None):
        """The blocks on ``tokens`` at the positions after the cache, attending to the
        cached positions and to themselves: the output and every layer's keys and values."""
        cond = self.condition(jnp.zeros(()), label)
        tables = nn.rotary_tables(tokens.shape[0], self._head_dim, start=cache.position)
        valid = cache.valid

        def step(block, h, past):
            keys, values = past
            past = nn.PastKeys(keys=keys, values=values, valid=valid)
            return block(h, cond, tables, self.attention, key=None, past=past)

        x, (keys, values) = self.blocks(self.embedding[tokens], step, (cache.keys, cache.values))
        return x, cond, keys, values

    def extend_cache(
        self, cache: Any, block: ddiff.Tokens, *, label: ddiff.Label | None = None
    ) -> Any:
        _, _, keys, values = self._after_cache(block, cache, label)
        return cache.extend(keys, values)

    def cached_output(
        self, x_t: ddiff.Tokens, cache: Any, *, label: ddiff.Label | None = None
    ) -> ddiff.NetworkOutput:
        x, cond, _, _ = self._after_cache(x_t, cache, label)
        return self._output(x, cond)
