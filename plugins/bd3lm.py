"""Block diffusion (BD3-LM; Arriola et al., ICLR 2025): autoregressive over blocks of L'
tokens, masked diffusion within a block given the clean blocks before it.

    log p(x) = sum_b log p(x^b | x^{<b}),   -log p(x^b | x^{<b}) <= L_MD4(x^b; x^{<b}),

each block's bound being the MD4 continuous-time ELBO of a masked diffusion over its L'
positions, read by a network that sees the block's noisy tokens and the earlier blocks'
clean ones (``ddiff.AbstractBlockCausalNetwork``). L' = 1 is an autoregressive model,
L' = D is MD4. See docs/bd3lm.md.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps


def _check_blocks(block_size: int, seq_len: int) -> None:
    ddiff.check_at_least("block_size", block_size)
    if seq_len % block_size:
        raise ddiff.RecipeError(
            f"{block_size} does not divide the data's sequence length {seq_len}; choose a "
            f"divisor of {seq_len}",
            path="block_size",
        )


class BD3LMELBO(ddiff.AbstractObjective):
    """The block diffusion bound (Arriola et al. 2025, eq. 7): with B = D / L' blocks,

        L_BD(x) = sum_b int_0^1 alpha'_t / (1 - alpha_t)
                  E_q[ sum_{n in b: x_t^n = m} log mu_theta(x_t^b, x^{<b})[n, x^n] ] dt
                  + reconstruction + prior,

    MD4's continuous-time ELBO of every block given the clean blocks before it, all blocks
    in one vectorised network pass over [x_t, x] (``md4_transformer``'s
    ``block_causal_mask``). Block b draws its own time t_b = (t + b/B) mod 1 from the
    example's antithetic time t, so the blocks of a sequence cover [0, 1] evenly; x_t
    masks position n of block b when U_n >= alpha(t_b). The reconstruction and prior terms
    factorise over positions, so they are MD4's. Reported in nats per sequence.

    With L' = 1 the time integral is done exactly: a one-token block is either clean (no
    term) or masked, so its term is (alpha_0 - alpha_1) (-log mu[n, x^n]) with every
    position masked: the autoregressive negative log-likelihood of the network read
    causally, without Monte Carlo noise (scaled by 1 - 2 eps of the clipping).

    Clipped ("data-driven") schedules (sec. 4): while training (``train=True``) with
    ``clip = [beta, omega]`` other than [0, 1], t_b is drawn in [beta, omega] instead
    (with the linear schedule, the paper's, the fraction of masked tokens), which lowers the
    variance of the gradient estimate; the loss (and the ``nelbo`` the training log shows)
    is then the average of the bound's integrand over that interval, not a bound. Held-out
    evaluation (``train=False``) always integrates over [0, 1]: the bound. The metric
    ``block_loss_variance`` is the variance across a sequence's blocks of the per-token
    loss of each block (nats^2), the quantity the clip is chosen to make small.

    Attributes:
        block_size: L', a divisor of the data's sequence length D.
        clip: [beta, omega], 0 <= beta < omega <= 1: the training interval of t.
        seq_len: D (set by ddiff from the data).
    """

    provides = frozenset({caps.CONTINUOUS_TIME})
    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
        "network": frozenset({caps.BLOCK_CAUSAL, caps.TIME_INDEPENDENT}),
    }
    block_size: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    clip: tuple[float, float] = eqx.field(static=True, default=(0.0, 1.0))

    def __check_init__(self):
        _check_blocks(self.block_size, self.seq_len)
        low, high = self.clip
        if not 0.0 <= low < high <= 1.0:
            raise ddiff.RecipeError(
                f"clip must be [beta, omega] with 0 <= beta < omega <= 1, got {list(self.clip)}",
                path="clip",
            )

    def bound_form(self) -> ddiff.BoundForm | None:
        """None: the conformance kit's exact per-x_0 references are bounds of a denoiser of
        the whole sequence, while this bound conditions each block on the clean blocks
        before it. Its exact values are checked by enumeration in ddiff's own tests (equal
        to MD4's ELBO with one block, to the autoregressive likelihood with L' = 1)."""
        return None

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        schedule = process.schedule
        mask_id = process.mask_id
        size = self.block_size
        blocks = x0.shape[0] // size
        noise_key, network_key = jax.random.split(key)
        network_key = network_key if train else None
        if size == 1:
            x_t = jnp.full_like(x0, mask_id)
            weight = schedule.alpha(jnp.ones(())) - schedule.alpha(jnp.zeros(()))
        else:
            low, high = self.clip if train else (0.0, 1.0)
            fraction = jnp.mod(t + jnp.arange(blocks) / blocks, 1.0)
            times = low + (high - low) * fraction
            alpha = jax.vmap(schedule.alpha)(times)
            weight = jax.vmap(schedule.alpha_derivative)(times) / (1.0 - alpha)
            keep = jax.random.uniform(noise_key, x0.shape) < jnp.repeat(alpha, size)
            x_t = jnp.where(keep, x0, mask_id)
        log_mean = model.block_causal_log_mean(x_t, x0, block_size=size, label=label, key=network_key)
        picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
        masked = jnp.where(x_t == mask_id, picked, 0.0).reshape(blocks, size).sum(axis=-1)
        per_block = weight * masked
        terms = ddiff.bound_terms(model, x0, jnp.sum(per_block))
        per_token = per_block / size
        variance = jnp.var(per_token, ddof=1) if blocks > 1 else jnp.zeros(())
        return ddiff.ObjectiveTerms(
            loss=terms.loss,
            nelbo=terms.nelbo,
            metrics={**terms.metrics, "block_loss_variance": variance},
        )


class BD3LMSampler(ddiff.AbstractSampler):
    """Block diffusion sampling (Arriola et al. 2025, Alg. 2): block by block, each block
    of L' positions drawn by the ``inner`` sampler (any sampler of the masked family:
    ancestral, first-hitting, the confidence decoders...) run with ``seq_len = L'`` and
    the clean blocks so far as its context (:attr:`ddiff.Conditioning.context`), then
    appended to the context: the network's key-value cache (``kv_cache: true``, one
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
            return model.init_context(capacity, block_size=size, cached=self.kv_cache)

        def extend(context, block):
            return jax.vmap(lambda c, b, label: model.extend_context(c, b, label=label))(context, block, labels)

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
                labels=labels, fixed_tokens=given_tokens, fixed_mask=given_mask, context=context
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


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("objective", "bd3lm_elbo", BD3LMELBO)
    registry.register("sampler", "bd3lm", BD3LMSampler)
