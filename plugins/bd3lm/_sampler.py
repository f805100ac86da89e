"""Block-by-block sampling with a KV cache over finished blocks, variable length."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.bd3lm._objective import BD3LMELBO, _check_blocks


class _BlockLoop(eqx.Module):
    """The block loop's carry beyond the tokens.

    Attributes:
        keys: the caller's per-sample keys (block b draws from ``fold_in(key, b)``).
        prefix: the clean blocks the next block reads, one per sample (a key-value
            cache or the tokens, :meth:`ddiff.DiffusionModel.init_prefix`).
        window: the last clean tokens, at most D - L' of them, per sample.
        stopped: whether a sample has drawn its stop token.
        lengths: each sample's length (``seq_len`` until it stops).
    """

    keys: ddiff.KeyBatch
    prefix: Any
    window: Int[Array, "batch capacity"]
    stopped: Bool[Array, " batch"]
    lengths: Int[Array, " batch"]


def unigram_entropy(tokens: Int[Array, " window"]) -> jax.Array:
    """The entropy in nats of the empirical distribution of the values in ``tokens``:
    -sum_v (c_v / W) log(c_v / W) over the W tokens, computed from a sort (no table of
    the vocabulary)."""
    ordered = jnp.sort(tokens)
    counts = jnp.searchsorted(ordered, ordered, side="right") - jnp.searchsorted(ordered, ordered, side="left")
    return -jnp.mean(jnp.log(counts / tokens.shape[0]))


class BD3LMSampler(ddiff.AbstractLoopSampler):
    """Block diffusion sampling (Arriola et al. 2025, Alg. 2): block by block, each block
    of L' positions drawn by the ``inner`` sampler (any sampler of the masked family:
    ancestral, first-hitting, the confidence decoders...) run with ``seq_len = L'`` and
    the clean blocks so far as its prefix (:attr:`ddiff.Conditioning.prefix`), then
    appended to the prefix: the network's key-value cache (``kv_cache: true``, one
    network call of L' tokens per block) or the tokens themselves, read again by the
    vectorised pass on every call (``kv_cache: false``); the two give the same tokens.

    Generation stops at the end of a block containing ``stop_token`` or after ``seq_len``
    positions (the length asked for, which may exceed the training length D: a block then
    sees a window of the last D - L' positions before it, at positions 0..D-L'-1 as in
    training). Once the window slides, the keys and values of every block in it change
    (they were computed with the blocks that have left it), so the cache is rebuilt from
    the window's tokens for each new block ((D - L') / L' calls of L' tokens, about one
    pass over D tokens): exact, the same tokens as ``kv_cache: false``. Positions after a sample's
    first stop token hold ``ddiff.PAD_TOKEN`` and ``SampleOutput.lengths`` counts the
    tokens up to and including it. Each sample's blocks are drawn from its own key (block
    b from ``fold_in(key, b)``), so a sample does not depend on the batch or on when the
    others stop. One block is one step of the driver's loop (:func:`ddiff.run_sampler`),
    which ends when every sample has stopped.

    Given positions (``fixed_tokens``, ``--prefix``) are kept; a block is conditioned on
    the given positions before and within it, not on later ones (exact for a prefix).
    Classifier-free guidance is refused (the unconditional prediction would need its own
    context).

    As BD3-LM's ``_semi_ar_sampler`` samples: ``bos_token`` forces position 0 to that
    token (a given position, never a stop), and ``entropy_window: W`` stops a sample
    after a block ending past W tokens when the entropy of the unigram distribution of
    its last W tokens (:func:`unigram_entropy`, nats) is below ``entropy_threshold``,
    truncating it to its length minus W (the reference's ``_check_stop_conds`` with
    ``var_length``: W = 256, threshold 4; it pools its batch in that entropy, one sample
    per batch in its scripts). Its inner sampler is ``first_hitting`` with the nucleus
    ``{kind: top_p, crossing: drop}`` in ``transforms`` (docs/bd3lm.md).

    Attributes:
        inner: the sampler run within each block.
        block_size: L', a divisor of D (the objective's).
        stop_token: the end-of-sequence token id, or None to always fill the length.
        kv_cache: keep a cache of the clean blocks (true) or recompute them (false).
        bos_token: the token forced at position 0, or None.
        entropy_window: W, at least a block, or None for no entropy stop.
        entropy_threshold: the entropy (nats) below which a sample stops.
        seq_len: D, the training length (set by ddiff from the data).
    """

    provides = frozenset({caps.VARIABLE_LENGTH})
    requires = {"network": frozenset({caps.BLOCK_CAUSAL})}
    inner: ddiff.AbstractSampler
    block_size: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    stop_token: int | None = eqx.field(static=True, default=None)
    kv_cache: bool = eqx.field(static=True, default=True)
    bos_token: int | None = eqx.field(static=True, default=None)
    entropy_window: int | None = eqx.field(static=True, default=None)
    entropy_threshold: float = eqx.field(static=True, default=4.0)

    def __check_init__(self):
        _check_blocks(self.block_size, self.seq_len)
        if caps.VARIABLE_LENGTH in self.inner.capabilities():
            raise ddiff.RecipeError(
                f"{type(self.inner).__name__} samples whole sequences; give a sampler of one "
                f"block (ancestral, first_hitting, ...)",
                path="inner",
            )
        for name in ("stop_token", "bos_token"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ddiff.RecipeError(f"must be a token id, got {value}", path=name)
        if self.entropy_window is not None and self.entropy_window < self.block_size:
            raise ddiff.RecipeError(
                f"an entropy stop over {self.entropy_window} tokens is shorter than a block of "
                f"{self.block_size}; give at least block_size tokens (BD3-LM: 256)",
                path="entropy_window",
            )
        ddiff.check_at_least("entropy_threshold", self.entropy_threshold, 0.0)

    def pairing_problem(self, components):
        objective = components.get("objective")
        if objective is not None and isinstance(objective[1], BD3LMELBO):
            if objective[1].block_size != self.block_size:
                return (
                    f"it samples blocks of {self.block_size} tokens but objective "
                    f"{objective[0]!r} trains blocks of {objective[1].block_size}; set both "
                    f"block_size to the same value"
                )
        inner = {"sampler": (type(self.inner).__name__, self.inner)}
        for slot in ("process", "parameterization", "network", "schedule"):
            if slot in components:
                inner[slot] = components[slot]
        try:
            caps.check_compatibility(inner, deferred=() if "network" in components else ("network",))
        except ddiff.IncompatibleComponentsError as error:
            return f"its inner sampler: {error.message}"
        return None

    def _capacity(self, seq_len: int) -> int:
        """How many clean positions a block sees at most: D - L' (fewer when sampling
        fewer than D)."""
        return min(self.seq_len, seq_len) - self.block_size

    def _empty(self, model: ddiff.DiffusionModel, batch: int, capacity: int) -> Any:
        """A prefix of no blocks for each of ``batch`` samples."""
        return jax.vmap(
            lambda _: model.init_prefix(capacity, block_size=self.block_size, cached=self.kv_cache)
        )(jnp.arange(batch))

    def _advance(self, prediction, index, carry, block, capacity):
        """The prefix and token window after ``block`` (block ``index``), and the network
        calls it took: the cache extended while the window has room, rebuilt from the
        window's blocks once it slides; a token prefix simply extended."""
        model, labels, size = prediction.model, prediction.conditioning.labels, self.block_size

        def extend(prefix, block):
            return jax.vmap(lambda c, b, label: model.extend_prefix(c, b, label=label))(prefix, block, labels)

        filled = jnp.minimum(index * size, capacity)
        window = jax.vmap(lambda w, b: ddiff.append_to_window(w, filled, b)[0])(
            carry.window, block.astype(carry.window.dtype)
        )
        if not self.kv_cache:
            return extend(carry.prefix, block), window, jnp.int32(0)

        def rebuild(prefix):
            empty = self._empty(model, block.shape[0], capacity)
            if capacity == 0:
                return empty

            def add(position, prefix):
                return extend(prefix, jax.lax.dynamic_slice_in_dim(window, position * size, size, axis=1))

            return jax.lax.fori_loop(0, capacity // size, add, empty)

        slides = filled + size > capacity
        prefix = jax.lax.cond(slides, rebuild, lambda prefix: extend(prefix, block), carry.prefix)
        return prefix, window, jnp.where(slides, capacity // size, 1).astype(jnp.int32)

    def init(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, *, keys: ddiff.KeyBatch
    ) -> Any:
        """Refuses a length that is no multiple of L' and guidance; no block drawn yet."""
        batch, seq_len = tokens.shape
        size = self.block_size
        if seq_len % size:
            raise ddiff.RecipeError(
                f"cannot sample {seq_len} tokens in blocks of {size}; ask for a multiple of {size}",
                path="sampler.block_size",
            )
        if prediction.conditioning.guidance != 0.0:
            raise ddiff.RecipeError(
                "bd3lm sampling does not combine with classifier-free guidance; sample with "
                "guidance 0 (labels alone condition the blocks)",
                path="sampler",
            )
        capacity = self._capacity(seq_len)
        return _BlockLoop(
            keys=keys,
            prefix=self._empty(prediction.model, batch, capacity),
            window=jnp.zeros((batch, capacity), jnp.int32),
            stopped=jnp.zeros((batch,), bool),
            lengths=jnp.full((batch,), seq_len, jnp.int32),
        )

    def done(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        return (index >= tokens.shape[1] // self.block_size) | jnp.all(carry.stopped)

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""], *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        """Block ``index`` drawn by the inner sampler given the prefix, written into the
        tokens; the lengths of the samples whose first stop token it holds; the prefix
        advanced past it unless it is the last."""
        conditioning = prediction.conditioning
        size = self.block_size
        seq_len = tokens.shape[1]
        start = index * size
        given_tokens = given_mask = None
        if conditioning.fixed_tokens is not None and conditioning.fixed_mask is not None:
            given_tokens = jax.lax.dynamic_slice_in_dim(conditioning.fixed_tokens, start, size, axis=1)
            given_mask = jax.lax.dynamic_slice_in_dim(conditioning.fixed_mask, start, size, axis=1)
        if self.bos_token is not None:
            batch = tokens.shape[0]
            caller_mask = jnp.zeros((batch, size), bool) if given_mask is None else given_mask
            caller_tokens = jnp.zeros((batch, size), jnp.int32) if given_tokens is None else given_tokens
            forced = (jnp.arange(size) == 0)[None, :] & (index == 0) & ~caller_mask
            given_tokens = jnp.where(forced, self.bos_token, caller_tokens)
            given_mask = caller_mask | forced
        inner_conditioning = ddiff.Conditioning(
            labels=conditioning.labels, fixed_tokens=given_tokens, fixed_mask=given_mask, prefix=carry.prefix
        )
        output = self.inner.sample(
            prediction.model,
            keys=ddiff.step_keys(carry.keys, index),
            seq_len=size,
            conditioning=inner_conditioning,
        )
        block = output.tokens
        stopped, lengths = carry.stopped, carry.lengths
        if self.stop_token is not None:
            stops = block == self.stop_token
            if given_mask is not None:
                stops = stops & ~given_mask
            found = jnp.any(stops, axis=1)
            lengths = jnp.where(found & ~stopped, start + jnp.argmax(stops, axis=1) + 1, lengths)
            stopped = stopped | found
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, block.astype(tokens.dtype), start, axis=1)
        if self.entropy_window is not None and self.entropy_window < seq_len:
            window = self.entropy_window
            end = start + size
            recent = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(end - window, 0), window, axis=1)
            low = (end > window) & (jax.vmap(unigram_entropy)(recent) < self.entropy_threshold) & ~carry.stopped
            lengths = jnp.where(low, end - window, lengths)
            stopped = stopped | low
        capacity = self._capacity(seq_len)
        prefix, window, calls = jax.lax.cond(
            index + 1 < seq_len // size,
            lambda carry: self._advance(prediction, index, carry, block, capacity),
            lambda carry: (carry.prefix, carry.window, jnp.int32(0)),
            carry,
        )
        carry = _BlockLoop(keys=carry.keys, prefix=prefix, window=window, stopped=stopped, lengths=lengths)
        return tokens, carry, output.num_function_evals + calls

    def finish(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, *,
        keys: ddiff.KeyBatch
    ) -> ddiff.SampleOutput:
        """With a stop token or an entropy stop, ``ddiff.PAD_TOKEN`` after each sample's
        length, and the lengths."""
        if self.stop_token is None and self.entropy_window is None:
            return ddiff.SampleOutput(tokens=tokens, num_function_evals=jnp.int32(0))
        after = jnp.arange(tokens.shape[1])[None, :] >= carry.lengths[:, None]
        return ddiff.SampleOutput(
            tokens=jnp.where(after, ddiff.PAD_TOKEN, tokens),
            num_function_evals=jnp.int32(0),
            lengths=carry.lengths,
        )
