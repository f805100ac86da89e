"""Decoding samplers for masked diffusion models with a mean parameterization: the
samplers the field uses beside ancestral sampling.

- ``confidence``: unmask the k most confident positions per step, k from a cosine
  (MaskGIT, Chang et al. 2022) or linear (LLaDA, Nie et al. 2025) schedule;
- ``threshold``: unmask every position whose confidence exceeds a threshold, at least one
  per step (Fast-dLLM's parallel decoding, Wu et al. 2025);
- ``semi_ar``: the sequence in blocks, left to right, any inner sampler within the current
  block (LLaDA's semi-autoregressive decoding);
- ``remdm``: ancestral sampling that also remasks decoded tokens (ReMDM, Wang et al. 2025,
  arXiv 2503.00307), with its cap, rescale and loop schedules;
- ``p2``: path planning (Peng et al. 2025, arXiv 2502.03540): a planner chooses at every
  step which positions stay or become masked, decoded tokens included.

Each docstring says which distribution the sampler draws from: the model's (exact with an
exact denoiser, which the conformance kit checks) or a heuristic one. Every loop is one
``lax.scan`` or ``lax.while_loop``; labels and classifier-free guidance go through
:func:`ddiff.batched_log_mean`; given positions (infilling) are never changed; sample i
draws all its randomness from its own key; the network evaluations are counted (one per
batched call, two under guidance).
"""

import abc
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

Confidence = Literal["max_prob", "margin", "neg_entropy"]
"""How sure the model is of a position, from its mu: the largest probability, the gap
between the two largest, or the negative entropy sum_v mu[v] log mu[v] (nats, <= 0)."""

CountSchedule = Literal["cosine", "linear"]
"""The fraction of the positions to decode that is still masked after a fraction r of the
steps: cos(pi/2 r) (MaskGIT) or 1 - r (LLaDA, P2's kappa(t) = t)."""

_REQUIRES = {
    "parameterization": frozenset({caps.MEAN}),
    "process": frozenset({caps.MASKED}),
}


def confidence(log_mean: ddiff.LogProbs, kind: Confidence) -> jax.Array:
    """The confidence of every position of one sequence, shape (seq,): see
    :data:`Confidence`."""
    probs = jnp.exp(log_mean)
    if kind == "max_prob":
        return jnp.max(probs, axis=-1)
    if kind == "margin":
        top, _ = jax.lax.top_k(probs, 2)
        return top[..., 0] - top[..., 1]
    return jnp.sum(jnp.where(probs > 0, probs * log_mean, 0.0), axis=-1)


def remaining_fraction(kind: CountSchedule, done: jax.Array) -> jax.Array:
    """The fraction of positions still masked after a fraction ``done`` of the steps
    (:data:`CountSchedule`), exactly 0 at the end."""
    if kind == "linear":
        left = 1.0 - done
    else:
        left = jnp.cos(0.5 * math.pi * done)
    return jnp.where(done >= 1.0, 0.0, jnp.clip(left, 0.0, 1.0))


def highest(key: ddiff.Key, scores: jax.Array, count: jax.Array) -> jax.Array:
    """Which ``count`` positions of one sequence have the highest scores (ties broken
    uniformly at random by ``key``), as a boolean mask of shape (seq,)."""
    size = scores.shape[0]
    permutation = jax.random.permutation(key, size)
    order = permutation[jnp.argsort(-scores[permutation], stable=True)]
    rank = jnp.zeros((size,), jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
    return rank < count


def threshold_selection(
    key: ddiff.Key, scores: jax.Array, candidates: jax.Array, threshold: float
) -> jax.Array:
    """The positions a threshold decoder unmasks in one step of one sequence: every
    candidate whose score exceeds ``threshold``, or, where none does, the single candidate
    with the highest score (ties broken at random); none without candidates."""
    above = candidates & (scores > threshold)
    best = highest(key, jnp.where(candidates, scores, -jnp.inf), 1) & candidates
    return jnp.where(jnp.any(above), above, best)


def network_times(
    schedule: ddiff.AbstractSchedule, masked: jax.Array, seq_len: int
) -> jax.Array:
    """The time at which a sample with ``masked`` masked positions of ``seq_len`` is
    typical, one per sample: alpha_t = 1 - masked / seq_len (:func:`ddiff.time_of_alpha`).
    A time-conditioned network is evaluated there; count-based decoders have no grid."""
    return ddiff.time_of_alpha(schedule, 1.0 - masked.astype(jnp.float32) / seq_len)


def _values(key: ddiff.Key, log_mean: ddiff.LogProbs, greedy: bool) -> ddiff.Tokens:
    if greedy:
        return jnp.argmax(log_mean, axis=-1).astype(jnp.int32)
    return ddiff.categorical(key, log_mean)


class ConfidenceSampler(ddiff.AbstractSampler):
    """Confidence-ordered decoding (MaskGIT, Chang et al. 2022; LLaDA's low-confidence
    remasking, Nie et al. 2025): from all-mask, step i = 1..T evaluates mu_theta once and
    unmasks the k_i masked positions of highest confidence (:data:`Confidence`), with the
    number still masked after step i being floor(M g(i/T)) for the M positions to decode
    and g the :data:`CountSchedule` (at least one position per step, all by step T; a step
    with nothing left to unmask makes no network call). A position takes a value drawn
    from mu_theta (exactly, :func:`ddiff.categorical`), or its most probable value under
    ``greedy`` (LLaDA's temperature 0). A time-conditioned network is evaluated at the
    time whose alpha_t is the fraction of unmasked positions (:func:`network_times`).

    Distribution: with one position per step (e.g. T >= M with the linear schedule) and
    drawn values it is exact for an exact denoiser, whatever the order: each step draws
    one position from its conditional given the revealed ones, and the order depends only
    on what is revealed (the conformance kit checks it). Otherwise it is a heuristic that
    is not the model's distribution: several positions decoded from one prediction are
    drawn independently, the confidence order favours what a learnt denoiser is sure of,
    and ``greedy`` takes modes.

    Attributes:
        steps: decoding steps T (network evaluations at most T, doubled under guidance).
        confidence: ``max_prob``, ``margin`` or ``neg_entropy``.
        schedule: ``cosine`` or ``linear``: how many positions stay masked after each step.
        greedy: take each position's most probable value instead of a draw.
    """

    requires = _REQUIRES
    steps: int = eqx.field(static=True, default=64)
    confidence: Confidence = eqx.field(static=True, default="max_prob")
    schedule: CountSchedule = eqx.field(static=True, default="cosine")
    greedy: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        total = jnp.sum(ddiff.still_masked(conditioning, start.tokens, mask_id), axis=-1)

        def step(carry, index):
            x, evals = carry
            masked = ddiff.still_masked(conditioning, x, mask_id)
            count = jnp.sum(masked, axis=-1)
            done = (index + 1).astype(jnp.float32) / self.steps
            left = jnp.floor(total * remaining_fraction(self.schedule, done)).astype(jnp.int32)
            unmask = jnp.where(count > 0, jnp.clip(count - left, 1, count), 0)

            def decode(x):
                times = network_times(process.schedule, jnp.sum(x == mask_id, axis=-1), seq_len)
                log_mean, calls = ddiff.batched_log_mean(model, x, times, conditioning)
                split = jax.vmap(lambda key: jax.random.split(key, 2))(
                    ddiff.step_keys(start.loop_keys, index)
                )
                values = jax.vmap(lambda key, lm: _values(key, lm, self.greedy))(split[:, 0], log_mean)
                scores = jnp.where(masked, jax.vmap(lambda lm: confidence(lm, self.confidence))(log_mean), -jnp.inf)
                chosen = jax.vmap(highest)(split[:, 1], scores, unmask) & masked
                return ddiff.apply_fixed(conditioning, jnp.where(chosen, values, x)), jnp.int32(calls)

            x, used = jax.lax.cond(
                jnp.any(unmask > 0), decode, lambda x: (x, jnp.int32(0)), x
            )
            return (x, evals + used), None

        (x, evals), _ = jax.lax.scan(
            step, (start.tokens, jnp.int32(0)), jnp.arange(self.steps, dtype=jnp.int32)
        )
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)


class ThresholdSampler(ddiff.AbstractSampler):
    """Threshold (parallel) decoding (Fast-dLLM, Wu et al. 2025, as used with LLaDA):
    every step evaluates mu_theta once and unmasks every masked position whose confidence
    (:data:`Confidence`) exceeds ``threshold``, or, where none does, the single most
    confident one (:func:`threshold_selection`); the loop (a ``lax.while_loop``) ends when
    no position of the batch is masked, after at most M steps for M positions to decode.
    Values are drawn from mu_theta, or taken as its mode under ``greedy`` (Fast-dLLM's
    setting). A time-conditioned network is evaluated at the time whose alpha_t is the
    fraction of unmasked positions.

    Distribution: a heuristic that is not the model's distribution (positions above the
    threshold are decoded together from one prediction, independently), except when the
    threshold is never exceeded (``threshold >= 1`` with ``max_prob``): then one position
    is decoded per step, in an order that depends only on what is revealed, and with drawn
    values the sampler is exact for an exact denoiser (the conformance kit checks it).

    Attributes:
        threshold: the confidence a position must exceed (a probability for ``max_prob``
            and ``margin``, nats <= 0 for ``neg_entropy``).
        confidence: ``max_prob``, ``margin`` or ``neg_entropy``.
        greedy: take each position's most probable value instead of a draw.
    """

    requires = _REQUIRES
    threshold: float = eqx.field(static=True, default=0.9)
    confidence: Confidence = eqx.field(static=True, default="max_prob")
    greedy: bool = eqx.field(static=True, default=False)

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)

        def body(state):
            x, evals, index = state
            masked = ddiff.still_masked(conditioning, x, mask_id)
            times = network_times(process.schedule, jnp.sum(x == mask_id, axis=-1), seq_len)
            log_mean, calls = ddiff.batched_log_mean(model, x, times, conditioning)
            split = jax.vmap(lambda key: jax.random.split(key, 2))(ddiff.step_keys(start.loop_keys, index))
            values = jax.vmap(lambda key, lm: _values(key, lm, self.greedy))(split[:, 0], log_mean)
            scores = jax.vmap(lambda lm: confidence(lm, self.confidence))(log_mean)
            chosen = jax.vmap(threshold_selection, (0, 0, 0, None))(split[:, 1], scores, masked, self.threshold)
            x = ddiff.apply_fixed(conditioning, jnp.where(chosen, values, x))
            return x, evals + calls, index + 1

        x, evals, _ = jax.lax.while_loop(
            lambda state: jnp.any(ddiff.still_masked(conditioning, state[0], mask_id)),
            body,
            (start.tokens, jnp.int32(0), jnp.int32(0)),
        )
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)


class SemiAutoregressiveSampler(ddiff.AbstractSampler):
    """Semi-autoregressive block decoding (LLaDA, Nie et al. 2025; MDLM's and BD3-LM's
    block-wise generation): the sequence is cut into blocks of ``block_length`` positions,
    decoded left to right, each by the ``inner`` sampler with the earlier blocks given and
    the later ones held masked (both as given positions, :class:`ddiff.Conditioning`;
    given positions of the caller stay given everywhere). Any masked sampler can be the
    inner one; its steps are per block, so the network evaluations add up over the
    ``ceil(D / block_length)`` blocks. Block b draws from keys ``fold_in(keys[i], b)``.

    Distribution: with an exact inner sampler, an exact denoiser and a scalar schedule
    (a masked position then says nothing about its value) it is exact: each block is
    drawn from its conditional given the earlier ones, the chain rule (the conformance
    kit checks it). A learnt time-conditioned network sees the later blocks masked while
    the inner sampler's time runs to 0 within each block, a state its training never
    showed, so in practice it is a different sampler from the inner one: the one LLaDA's
    models are trained for.

    Attributes:
        inner: the sampler within each block (a section with its own ``kind``).
        block_length: positions per block.
    """

    requires = {"process": frozenset({caps.MASKED})}
    inner: ddiff.AbstractSampler
    block_length: int = eqx.field(static=True, default=16)

    def __check_init__(self):
        ddiff.check_at_least("block_length", self.block_length)

    def pairing_problem(self, components):
        inner = {
            slot: value
            for slot, value in components.items()
            if slot in ("process", "parameterization", "network", "schedule")
        }
        inner["sampler"] = ("inner", self.inner)
        try:
            caps.check_compatibility(inner, deferred=("network",))
        except ddiff.IncompatibleComponentsError as error:
            return f"its inner sampler does not fit: {error.message}"
        return None

    def sample(self, model, *, keys, seq_len, conditioning):
        mask_id = model.process.mask_id
        positions = jnp.arange(seq_len)
        batch = keys.shape[0]
        given, given_tokens = conditioning.given(batch, seq_len)
        x = ddiff.initial_tokens(model.process, keys=keys, seq_len=seq_len, conditioning=conditioning)

        def block(carry, index):
            x, evals = carry
            begin = index * self.block_length
            before = (positions < begin)[None, :]
            after = (positions >= begin + self.block_length)[None, :]
            held = jnp.where(given, given_tokens, mask_id)
            inner_conditioning = ddiff.Conditioning(
                labels=conditioning.labels,
                fixed_tokens=jnp.where(before, x, held),
                fixed_mask=given | before | after,
                guidance=conditioning.guidance,
                start_from_prior=conditioning.start_from_prior,
            )
            output = self.inner.sample(
                model,
                keys=ddiff.step_keys(keys, index),
                seq_len=seq_len,
                conditioning=inner_conditioning,
            )
            return (output.tokens, evals + output.num_function_evals), None

        blocks = -(-seq_len // self.block_length)
        (x, evals), _ = jax.lax.scan(block, (x, jnp.int32(0)), jnp.arange(blocks, dtype=jnp.int32))
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)


RemaskingSchedule = Literal["cap", "rescale", "loop"]
"""ReMDM's remasking schedules (Wang et al. 2025, sec. 4.1 and their code)."""


def remdm_logits(
    log_mean: ddiff.LogProbs, x: ddiff.Tokens, mask_id: int, alpha_s, alpha_t, sigma
) -> jax.Array:
    """Log-probabilities over the V+1 outcomes of every position of one sequence for one
    ReMDM step from t to s < t (Wang et al. 2025, eq. 6 with x_0 replaced by mu_theta):

        decoded z_t = v:  (1 - sigma) onehot(v) + sigma onehot(m),
        masked z_t = m:   (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t) mu
                          + (1 - alpha_s - sigma alpha_t) / (1 - alpha_t) onehot(m),

    valid for 0 <= sigma <= min(1, (1 - alpha_s) / alpha_t); it keeps the marginal
    q(z_s given x_0) of every position, and sigma = 0 is MD4's ancestral step (Alg. 2),
    written so that it agrees with it bit for bit."""
    log_unmask = jnp.log(jnp.maximum(alpha_s - (1.0 - sigma) * alpha_t, 0.0)) - jnp.log1p(-alpha_t)
    log_stay = jnp.log1p(-(alpha_s + sigma * alpha_t)) - jnp.log1p(-alpha_t)
    masked_row = jnp.concatenate(
        [log_unmask + log_mean, jnp.broadcast_to(log_stay, (x.shape[0], 1))], axis=-1
    )
    keep = jax.nn.one_hot(x, mask_id + 1, dtype=bool)
    decoded_row = jnp.where(keep, jnp.log1p(-sigma), -jnp.inf)
    decoded_row = decoded_row.at[:, mask_id].set(jnp.log(sigma))
    return jnp.where((x == mask_id)[:, None], masked_row, decoded_row)


class ReMDMSampler(ddiff.AbstractSampler):
    """ReMDM remasking (Wang et al. 2025, arXiv 2503.00307): ancestral sampling on a time
    grid in which a decoded token is remasked with probability sigma_t at every step and
    a masked position unmasks correspondingly more often (:func:`remdm_logits`), so that
    errors made early can be revised. sigma_t <= sigma_max = min(1, (1 - alpha_s) /
    alpha_t), and the schedules are those of the paper's code:

    - ``cap``: sigma_t = min(eta, sigma_max) (their eta 0.008);
    - ``rescale``: sigma_t = eta sigma_max, eta in [0, 1] (their eta 0.015);
    - ``loop``: three phases on the grid time tau: from tau = 1 to ``t_on`` plain
      ancestral steps with alpha rising linearly from alpha_1 to ``alpha_on``; from
      ``t_on`` to ``t_off`` alpha held at ``alpha_on`` while tokens are remasked with
      sigma = min(eta, sigma_max) and unmasked at the rate that keeps alpha there; then
      ancestral steps with alpha rising linearly to alpha_0 at tau = 0 (their eta 0.02,
      t_on 0.55, t_off 0.05, alpha_on 0.9). The network is evaluated at the time where
      the schedule reaches the loop's alpha (:func:`ddiff.time_of_alpha`).

    The reverse process starts from all-mask; positions still masked after the last step
    are drawn from mu_theta(x, 0) (the grid samplers' final step). With eta = 0 under
    ``cap`` or ``rescale`` it is ``ancestral``, bit for bit with the same keys.

    Distribution: a heuristic that is not the model's distribution. A remasking step keeps
    each position's marginal, but with sigma > 0 several positions unmask per step from
    one prediction however many steps are taken, so even an exact denoiser is sampled
    with the factorization error that ancestral sampling only has at few steps; the paper
    trades it (and diversity) for quality at many steps. Exact for eta = 0 as T grows,
    and for any eta when positions are independent.

    Attributes:
        steps: grid steps T (network evaluations: T, or T+1 when a position is still
            masked at the end; doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
        strategy: ``cap``, ``rescale`` or ``loop``.
        eta: the remasking strength.
        t_on, t_off, alpha_on: the loop's phase boundaries and its held alpha.
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
    }
    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")
    strategy: RemaskingSchedule = eqx.field(static=True, default="loop")
    eta: float = eqx.field(static=True, default=0.02)
    t_on: float = eqx.field(static=True, default=0.55)
    t_off: float = eqx.field(static=True, default=0.05)
    alpha_on: float = eqx.field(static=True, default=0.9)

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)
        ddiff.check_at_least("eta", self.eta, 0.0)
        if self.strategy == "rescale" and self.eta > 1.0:
            raise ddiff.RecipeError(f"eta must be in [0, 1] under rescale, got {self.eta}", path="eta")
        if not 0.0 <= self.t_off < self.t_on <= 1.0:
            raise ddiff.RecipeError(
                f"the loop needs 0 <= t_off < t_on <= 1, got t_off={self.t_off}, t_on={self.t_on}",
                path="t_on",
            )
        if not 0.0 < self.alpha_on < 1.0:
            raise ddiff.RecipeError(f"alpha_on must be in (0, 1), got {self.alpha_on}", path="alpha_on")

    def _loop_alpha(self, schedule: ddiff.AbstractSchedule, tau: jax.Array) -> jax.Array:
        """The loop's survival probability at grid time tau."""
        alpha_0, alpha_1 = schedule.alpha(jnp.zeros(())), schedule.alpha(jnp.ones(()))
        rising = alpha_1 + (self.alpha_on - alpha_1) * (1.0 - tau) / max(1.0 - self.t_on, 1e-12)
        ending = self.alpha_on + (alpha_0 - self.alpha_on) * (self.t_off - tau) / max(self.t_off, 1e-12)
        return jnp.where(tau > self.t_on, rising, jnp.where(tau <= self.t_off, ending, self.alpha_on))

    def _step_parameters(self, schedule, t, s):
        """(network time, alpha_s, alpha_t, sigma) of the step from t to s."""
        if self.strategy == "loop":
            alpha_t, alpha_s = self._loop_alpha(schedule, t), self._loop_alpha(schedule, s)
            time = ddiff.time_of_alpha(schedule, alpha_t)
        else:
            alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
            time = t
        sigma_max = jnp.minimum(1.0, (1.0 - alpha_s) / alpha_t)
        if self.strategy == "rescale":
            sigma = self.eta * sigma_max
        else:
            sigma = jnp.minimum(self.eta, sigma_max)
        if self.strategy == "loop":
            sigma = jnp.where((t <= self.t_on) & (t > self.t_off), sigma, 0.0)
        return time, alpha_s, alpha_t, sigma

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        schedule = process.schedule
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        calls = start.calls

        def step(carry, inputs):
            x, evals = carry
            t, s, index = inputs
            time, alpha_s, alpha_t, sigma = self._step_parameters(schedule, t, s)
            log_mean, _ = ddiff.batched_log_mean(model, x, time, conditioning)
            logits = jax.vmap(lambda lm, xi: remdm_logits(lm, xi, mask_id, alpha_s, alpha_t, sigma))(log_mean, x)
            draws = jax.vmap(ddiff.categorical)(ddiff.step_keys(start.loop_keys, index), logits)
            free = ddiff.still_masked(conditioning, jnp.full_like(x, mask_id), mask_id)
            x = ddiff.apply_fixed(conditioning, jnp.where(free, draws, x))
            return (x, evals + calls), None

        times = ddiff.time_grid(self.grid, self.steps)
        (x, evals), _ = jax.lax.scan(
            step, (start.tokens, jnp.int32(0)), (times[:-1], times[1:], jnp.arange(self.steps))
        )

        x, used = ddiff.finish_masked(model, x, start=start, conditioning=conditioning)
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals + used)


class AbstractPathPlanningSampler(ddiff.AbstractSampler):
    """Path planning (P2, Peng et al. 2025, arXiv 2502.03540, their Alg. 1): from
    all-mask, step i = 1..T evaluates mu_theta once, draws a proposal for every masked
    position from it, and asks the planner (:meth:`planner_scores`) to score every
    position to decode, masked or decoded; the floor(M g(i/T)) lowest-scoring positions
    (M to decode, g the :data:`CountSchedule`, P2's 1 - kappa) are masked (decoded tokens
    among them are remasked), the other masked positions take their proposals. A
    time-conditioned network is evaluated at the time whose alpha_t is the fraction of
    unmasked positions (:func:`network_times`). Network evaluations: T (doubled under
    guidance), plus what the planner spends.

    The planner is the hook: a subclass implements :meth:`planner_scores` (a second
    network's view, a trained planner, ...).
    """

    requires = _REQUIRES
    steps: eqx.AbstractVar[int]
    schedule: eqx.AbstractVar[CountSchedule]

    @abc.abstractmethod
    def planner_scores(
        self,
        model: ddiff.DiffusionModel,
        x: ddiff.TokenBatch,
        proposal: ddiff.TokenBatch,
        log_mean: jax.Array,
        recorded: jax.Array,
        masked: jax.Array,
        conditioning: ddiff.Conditioning,
        *,
        keys: ddiff.KeyBatch,
    ) -> tuple[jax.Array, jax.Array]:
        """How much each position should hold its token, shape (batch, seq): the lowest
        scores are masked next. Only positions to decode are compared.

        Arguments:
            model: the model.
            x: the current tokens (mask at masked positions).
            proposal: x with a draw from mu_theta at every masked position.
            log_mean: log mu_theta(x), shape (batch, seq, vocab).
            recorded: log mu of each decoded token when it was decoded (0 elsewhere).
            masked: which positions to decode are masked.
            conditioning: the sampling's conditioning.
            keys: one key per sample for the planner's own randomness.

        Returns:
            The scores, and the network evaluations the planner made (an int32 scalar).
        """

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        to_decode = ddiff.still_masked(conditioning, start.tokens, mask_id)
        total = jnp.sum(to_decode, axis=-1)

        def step(carry, index):
            x, recorded, evals = carry
            masked = ddiff.still_masked(conditioning, x, mask_id)
            times = network_times(process.schedule, jnp.sum(x == mask_id, axis=-1), seq_len)
            log_mean, calls = ddiff.batched_log_mean(model, x, times, conditioning)
            split = jax.vmap(lambda key: jax.random.split(key, 3))(ddiff.step_keys(start.loop_keys, index))
            drawn = jax.vmap(ddiff.categorical)(split[:, 0], log_mean)
            proposal = jnp.where(masked, drawn, x)
            scores, used = self.planner_scores(
                model, x, proposal, log_mean, recorded, masked, conditioning, keys=split[:, 1]
            )
            done = (index + 1).astype(jnp.float32) / self.steps
            left = jnp.floor(total * remaining_fraction(self.schedule, done)).astype(jnp.int32)
            lowest = jax.vmap(highest)(split[:, 2], jnp.where(to_decode, -scores, -jnp.inf), left)
            remask = lowest & to_decode
            revealed = masked & ~remask
            picked = jnp.take_along_axis(log_mean, proposal[..., None], axis=-1)[..., 0]
            x = ddiff.apply_fixed(conditioning, jnp.where(remask, mask_id, jnp.where(revealed, proposal, x)))
            recorded = jnp.where(revealed, picked, jnp.where(remask, 0.0, recorded))
            return (x, recorded, evals + calls + used), None

        initial = (start.tokens, jnp.zeros(start.tokens.shape, jnp.float32), jnp.int32(0))
        (x, _, evals), _ = jax.lax.scan(step, initial, jnp.arange(self.steps, dtype=jnp.int32))
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)


class PathPlanningSampler(AbstractPathPlanningSampler):
    """P2 with self-planning (Peng et al. 2025, sec. 4): the denoiser scores the positions
    (see :class:`AbstractPathPlanningSampler` for the loop). With ``score: log_prob`` a
    masked position scores the log-probability mu_theta gives its proposal, and a decoded
    one ``eta`` times the log-probability its token had when it was decoded: a mean
    parameterization carries a visible token over with probability 1, so it cannot rescore
    it in context (P2's code rescores with a BERT-style denoiser; ReMDM's confidence
    schedule records the same number). Scores are <= 0, so eta = 0 never remasks and a
    larger eta (P2's stochasticity strength) remasks more. With ``score: random`` every
    position scores log U, U uniform, decoded ones eta log U (P2's random planner; with
    eta = 0 it is ancestral sampling in a random order, P2's own special case).

    Distribution: a heuristic that is not the model's distribution (positions are chosen
    by the probability of what was drawn there, and decoded tokens are revised), except
    for ``score: random`` with ``eta: 0`` and one position per step (T >= M with the
    linear schedule): that is exact for an exact denoiser (the conformance kit checks it).

    Attributes:
        steps: planning steps T.
        schedule: ``linear`` (P2's kappa(t) = t) or ``cosine``.
        eta: the stochasticity strength (>= 0).
        score: ``log_prob`` (self-planning) or ``random``.
    """

    steps: int = eqx.field(static=True, default=64)
    schedule: CountSchedule = eqx.field(static=True, default="linear")
    eta: float = eqx.field(static=True, default=1.0)
    score: Literal["log_prob", "random"] = eqx.field(static=True, default="log_prob")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)
        ddiff.check_at_least("eta", self.eta, 0.0)

    def planner_scores(self, model, x, proposal, log_mean, recorded, masked, conditioning, *, keys):
        if self.score == "random":
            log_uniform = -jax.vmap(lambda key: ddiff.standard_exponential(key, (x.shape[1],)))(keys)
            return jnp.where(masked, log_uniform, self.eta * log_uniform), jnp.int32(0)
        picked = jnp.take_along_axis(log_mean, proposal[..., None], axis=-1)[..., 0]
        return jnp.where(masked, picked, self.eta * recorded), jnp.int32(0)


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("sampler", "confidence", ConfidenceSampler)
    registry.register("sampler", "threshold", ThresholdSampler)
    registry.register("sampler", "semi_ar", SemiAutoregressiveSampler)
    registry.register("sampler", "remdm", ReMDMSampler)
    registry.register("sampler", "p2", PathPlanningSampler)
