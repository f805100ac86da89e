"""Block-by-block sampling with a KV cache over finished blocks, variable length."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.bd3lm._objective import BD3LMELBO, _check_blocks


class BD3LMSampler(ddiff.AbstractSampler):
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
    others stop.

    Given positions (``fixed_tokens``, ``--prefix``) are kept; a block is conditioned on
    the given positions before and within it, not on later ones (exact for a prefix).
    Classifier-free guidance is refused (the unconditional prediction would need its own
    context).

    Attributes:
        inner: the sampler run within each block.
        block_size: L', a divisor of D (the objective's).
        stop_token: the end-of-sequence token id, or None to always fill the length.
        kv_cache: keep a cache of the clean blocks (true) or recompute them (false).
        seq_len: D, the training length (set by ddiff from the data).
    """

    provides = frozenset({caps.VARIABLE_LENGTH})
    requires = {"network": frozenset({caps.BLOCK_CAUSAL})}
    inner: ddiff.AbstractSampler
    block_size: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    stop_token: int | None = eqx.field(static=True, default=None)
    kv_cache: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        _check_blocks(self.block_size, self.seq_len)
        if caps.VARIABLE_LENGTH in self.inner.capabilities():
            raise ddiff.RecipeError(
                f"{type(self.inner).__name__} samples whole sequences; give a sampler of one "
                f"block (ancestral, first_hitting, ...)",
                path="inner",
            )
        if self.stop_token is not None and self.stop_token < 0:
            raise ddiff.RecipeError(f"must be a token id, got {self.stop_token}", path="stop_token")

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

    def sample(self, model, *, keys, seq_len, conditioning):
        size = self.block_size
        if seq_len % size:
            raise ddiff.RecipeError(
                f"cannot sample {seq_len} tokens in blocks of {size}; ask for a multiple of {size}",
                path="sampler.block_size",
            )
        if conditioning.guidance != 0.0:
            raise ddiff.RecipeError(
                "bd3lm sampling does not combine with classifier-free guidance; sample with "
                "guidance 0 (labels alone condition the blocks)",
                path="sampler",
            )
        num_blocks = seq_len // size
        capacity = min(self.seq_len, seq_len) - size
        batch = keys.shape[0]
        labels = conditioning.labels
        fixed = conditioning.fixed_tokens is not None and conditioning.fixed_mask is not None

        def empty(_):
            return model.init_prefix(capacity, block_size=size, cached=self.kv_cache)

        def extend(context, block):
            return jax.vmap(lambda c, b, label: model.extend_prefix(c, b, label=label))(context, block, labels)

        def rebuild(window):
            """A cache of the window's blocks, extended block by block from empty."""
            if capacity == 0:
                return jax.vmap(empty)(keys)

            def add(index, context):
                return extend(context, jax.lax.dynamic_slice_in_dim(window, index * size, size, axis=1))

            return jax.lax.fori_loop(0, capacity // size, add, jax.vmap(empty)(keys))

        def advance(index, context, window, block):
            """The context and token window after ``block`` (block ``index``), and the
            network calls it took: the cache extended while the window has room, rebuilt
            once the window slides; a token prefix simply extended."""
            filled = jnp.minimum(index * size, capacity)
            window = jax.vmap(lambda w, b: ddiff.append_to_window(w, filled, b)[0])(
                window, block.astype(window.dtype)
            )
            if not self.kv_cache:
                return extend(context, block), window, jnp.int32(0)
            slides = filled + size > capacity
            context = jax.lax.cond(slides, lambda c: rebuild(window), lambda c: extend(c, block), context)
            return context, window, jnp.where(slides, capacity // size, 1).astype(jnp.int32)

        def body(state):
            index, tokens, context, window, done, lengths, evals = state
            start = index * size
            given_tokens = given_mask = None
            if fixed:
                given_tokens = jax.lax.dynamic_slice_in_dim(conditioning.fixed_tokens, start, size, axis=1)
                given_mask = jax.lax.dynamic_slice_in_dim(conditioning.fixed_mask, start, size, axis=1)
            inner_conditioning = ddiff.Conditioning(
                labels=labels, fixed_tokens=given_tokens, fixed_mask=given_mask, prefix=context
            )
            output = self.inner.sample(
                model, keys=ddiff.step_keys(keys, index), seq_len=size, conditioning=inner_conditioning
            )
            block = output.tokens
            kept = block
            ends = jnp.zeros((batch,), bool)
            if self.stop_token is not None:
                stops = block == self.stop_token
                if fixed:
                    stops = stops & ~given_mask
                first = jnp.argmax(stops, axis=1)
                found = jnp.any(stops, axis=1)
                ends = found & ~done
                after = found[:, None] & (jnp.arange(size)[None, :] > first[:, None])
                kept = jnp.where(after, ddiff.PAD_TOKEN, block)
                lengths = jnp.where(ends, start + first + 1, lengths)
            kept = jnp.where(done[:, None], ddiff.PAD_TOKEN, kept)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, kept.astype(tokens.dtype), start, axis=1)
            context, window, calls = jax.lax.cond(
                index + 1 < num_blocks,
                lambda c, w: advance(index, c, w, block),
                lambda c, w: (c, w, jnp.int32(0)),
                context,
                window,
            )
            used = output.num_function_evals + calls
            return index + 1, tokens, context, window, done | ends, lengths, evals + used

        state = (
            jnp.int32(0),
            jnp.full((batch, seq_len), ddiff.PAD_TOKEN, jnp.int32),
            jax.vmap(empty)(keys),
            jnp.zeros((batch, capacity), jnp.int32),
            jnp.zeros((batch,), bool),
            jnp.full((batch,), seq_len, jnp.int32),
            jnp.int32(0),
        )
        _, tokens, _, _, _, lengths, evals = jax.lax.while_loop(
            lambda state: (state[0] < num_blocks) & ~jnp.all(state[4]), body, state
        )
        return ddiff.SampleOutput(
            tokens=tokens, num_function_evals=evals, lengths=None if self.stop_token is None else lengths
        )
