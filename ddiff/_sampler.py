"""The Sampler protocol and what it is given and returns."""

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ddiff._capabilities import MASKED, Capable
from ddiff._model import DiffusionModel
from ddiff._process import AbstractForwardProcess
from ddiff._typing import AbstractCheckedModule, Key, KeyBatch, LabelBatch, TokenBatch


class Conditioning(eqx.Module):
    """What a sample is conditioned on.

    Attributes:
        labels: class labels, shape (batch,), or None.
        fixed_tokens: tokens to keep, shape (batch, seq), read where ``fixed_mask``.
        fixed_mask: which positions are given (infilling), shape (batch, seq).
        guidance: classifier-free guidance weight w; the guided logits are
            (1 + w) * conditional - w * unconditional. 0 disables guidance.
        prefix: the clean blocks a block-causal network conditions the sequence on
            (:meth:`DiffusionModel.init_prefix`), one per sample (leading batch axis on
            every leaf), or None. :func:`batched_log_mean` and :func:`batched_log_score`
            pass it to the model, so any sampler run on a block of L' positions with a
            prefix samples that block given the blocks before it (block diffusion).
        start_from_prior: draw the starting x_1 of a masked process from its prior
            (the mask with probability 1 - alpha_1, otherwise a uniform token) instead
            of starting from all-mask (:func:`initial_tokens`).
    """

    labels: LabelBatch | None = None
    fixed_tokens: TokenBatch | None = None
    fixed_mask: Bool[Array, "batch seq"] | None = None
    guidance: float = eqx.field(static=True, default=0.0)
    prefix: Any = None
    start_from_prior: bool = eqx.field(static=True, default=False)

    def given(self, batch: int, seq_len: int) -> tuple[Bool[Array, "batch seq"], TokenBatch]:
        """Which positions are given and their tokens, shape (batch, seq) each: none (and
        zeros) when there is no infilling."""
        mask = jnp.zeros((batch, seq_len), bool) if self.fixed_mask is None else self.fixed_mask
        tokens = jnp.zeros((batch, seq_len), jnp.int32) if self.fixed_tokens is None else self.fixed_tokens
        return mask, tokens


PAD_TOKEN = -1
"""What a variable-length sample holds after its end (:attr:`SampleOutput.lengths`)."""


class SampleOutput(eqx.Module):
    """Samples and the number of network evaluations spent (one per batched call).

    Attributes:
        tokens: the samples, shape (batch, seq).
        num_function_evals: batched network calls made.
        lengths: each sample's length for a sampler that stops at an end token
            (capability ``variable_length``): ``tokens[i, lengths[i]:]`` hold
            :data:`PAD_TOKEN`; None when every sample fills its ``seq`` positions.
    """

    tokens: TokenBatch
    num_function_evals: Int[Array, ""]
    lengths: Int[Array, " batch"] | None = None


TimeGrid = Literal["uniform", "cosine"]
"""The time grids of :func:`time_grid`."""


def time_grid(kind: TimeGrid, steps: int) -> Float[Array, " steps_plus_one"]:
    """Times t_0 = 1 > t_1 > ... > t_T = 0 for a reverse process of ``steps`` steps.

    ``uniform``: t_i = 1 - i/T. ``cosine``: t_i = cos(pi/2 * i/T), which spends more
    steps near t = 0 (MD4's cosine sampling grid).
    """
    fraction = jnp.arange(steps + 1, dtype=jnp.float32) / steps
    if kind == "uniform":
        return 1.0 - fraction
    return jnp.cos(0.5 * math.pi * fraction)


@dataclasses.dataclass(frozen=True)
class ReverseChain:
    """The Markov chain a sampler simulates, stated so that :mod:`ddiff.testing` can compute
    the exact law of its output on a toy, for any model (it never runs the sampler's code).

    The chain starts from the process prior at t = 1 (given positions set), takes one
    ``step`` from each time of ``times`` to the next (positions moving independently given
    the whole sequence, from the model's prediction at the step's first time; given
    positions set again after every step), then draws the output with ``final`` at the
    last time. The rules, for one position n of x at time t, moving to time s < t:

    - ``posterior``: x_s^n ~ sum_v mu[n, v] q(x_s^n | x_t^n, x_0^n = v) (MD4 Alg. 2; D3PM's
      x0-parameterized step; GenMD4's per-value step), mu restricted to the values that
      can produce x_t^n, after the nucleus ``top_p``.
    - ``euler``: to y != x^n with probability (t - s) R_t(y -> x^n) s[n, y], staying with
      the rest; where the moves exceed 1 they are renormalised and the stay is 0 (SEDD).
    - ``tweedie``: to y with probability proportional to
      max([s Q_{s->t}^{-1}]_y, 0) Q_{s->t}(y, x^n) (SEDD's analytic step).
    - ``tau_leap``: the reverse rates r_y = R_t(y -> x^n) s[n, y] held for t - s; with
      lambda = (t - s) sum_y r_y the position moves (to y with probability r_y / sum r)
      with probability lambda e^-lambda, else stays (Campbell et al., one jump at most).
      With ``corrector_steps`` > 0, after each step to 0 < s <= ``corrector_entry`` that many
      leaps of length ``corrector_size`` (t - s) under forward plus reverse rates at s.
    - ``continuous``: the reverse CTMC itself with rates R_t(y -> x^n) s[n, y] from t = 1 to
      0 (first-hitting sampling); the kit computes it for a masked process with a scalar
      schedule. ``times`` is then (1, 0).

    ``final`` at the last time t_K: ``mean`` draws every position from mu(x, t_K);
    ``masked_mean`` only the positions in a noisy state (index >= V), the others kept;
    ``tweedie`` draws every position from the process's Tweedie mean of the scores
    (:meth:`~ddiff.AbstractForwardProcess.log_mean_from_score`); ``sequential`` draws the
    noisy positions one at a time, in uniformly random order, each from mu of the sequence
    so far (first-hitting sampling's end at t = 0).

    mu is the model's mean (:func:`batched_log_mean`, guidance included) and s its scores:
    with ``reads`` = ``mean`` the concentration ratios of mu (Lou et al. 2024), with
    ``score`` the model's scores (:func:`batched_log_score`), which for a parameterization
    that provides a mean are the ratios of its mean. R_t are the forward rates, Q_{s->t}
    the transition matrix.

    Attributes:
        step: the rule of every step.
        reads: ``mean`` or ``score``: what the steps read from the model.
        times: 1 = t_0 > t_1 > ... > t_K, the times of the steps and the final draw: a
            grid sampler's :meth:`~ddiff.AbstractGridSampler.times` (an array, e.g.
            :func:`time_grid`'s) or a tuple, kept as Python floats (the float32 values
            exactly).
        final: the rule of the final draw.
        top_p: nucleus of mu for ``posterior`` steps and ``mean`` draws (1 = none).
        corrector_steps, corrector_size, corrector_entry: ``tau_leap`` correctors.
    """

    step: Literal["posterior", "euler", "tweedie", "tau_leap", "continuous"]
    reads: Literal["mean", "score"]
    times: tuple[float, ...] | Float[Array, " times"]
    final: Literal["mean", "masked_mean", "tweedie", "sequential"]
    top_p: float = 1.0
    corrector_steps: int = 0
    corrector_size: float = 0.0
    corrector_entry: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "times", tuple(float(t) for t in np.asarray(self.times).tolist()))


class AbstractSampler(AbstractCheckedModule, Capable):
    """Generates a batch of sequences from a model, optionally conditioned.

    Sample i draws all its randomness from its own key ``keys[i]`` (per step, e.g.
    ``fold_in(keys[i], step)`` with :func:`step_keys`, and draws vmapped over the batch),
    never from a key shared by the batch. The caller derives the keys from the global
    index of each sample (:func:`sample_keys`), so a sample is the same whatever the batch
    it is drawn in and however the batch is split over devices.
    """

    def reverse_chain(self) -> ReverseChain | None:
        """The chain this sampler simulates (:class:`ReverseChain`), so that the
        conformance kit can compare its samples with the chain's exact law under models
        whose predictions depend on t; None (the default) when it simulates no chain the
        kit knows (the kit then compares its samples with the data under the exact
        model only)."""
        return None

    @abc.abstractmethod
    def sample(
        self,
        model: DiffusionModel,
        *,
        keys: KeyBatch,
        seq_len: int,
        conditioning: Conditioning,
    ) -> SampleOutput:
        """Draw one sequence of length ``seq_len`` per key.

        Arguments:
            model: the (EMA) model.
            keys: one PRNG key per sample, leading batch axis (:func:`sample_keys`).
            seq_len: positions per sequence.
            conditioning: labels, fixed positions and guidance (batch axis as ``keys``).

        Returns:
            The tokens, shape (batch, seq), and the network evaluations spent.
        """


def sample_keys(key: Key, first_index: int | Int[Array, ""], count: int) -> KeyBatch:
    """The keys of samples ``first_index .. first_index + count - 1`` of a sampling run
    keyed by ``key``: ``fold_in(key, i)`` for global sample index i. A device (or a batch)
    holding samples i..j passes their keys, so every sample is drawn from the same key
    however the samples are batched or split over devices."""
    indices = first_index + jnp.arange(count)
    return jax.vmap(lambda index: jax.random.fold_in(key, index))(indices)


def step_keys(keys: KeyBatch, step: int | Int[Array, ""]) -> KeyBatch:
    """``fold_in(keys[i], step)`` for every sample i: the keys of one step of a sampler's
    loop (or of one of its draws), each sample's from its own key."""
    return jax.vmap(lambda key: jax.random.fold_in(key, step))(keys)


class SamplingStart(eqx.Module):
    """Where a reverse process starts (:func:`start_sampling`).

    Attributes:
        tokens: x_1 drawn from the process prior, one row per key, given positions set.
        loop_keys: per-sample keys for the sampler's steps (:func:`step_keys` with the
            step index).
        final_keys: per-sample keys for a final draw after the loop.
        calls: network calls per prediction (:func:`calls_per_prediction`).
    """

    tokens: TokenBatch
    loop_keys: KeyBatch
    final_keys: KeyBatch
    calls: int = eqx.field(static=True)


def start_sampling(
    model: DiffusionModel, *, keys: KeyBatch, seq_len: int, conditioning: Conditioning
) -> SamplingStart:
    """The opening every reverse-process sampler shares: each sample's key split into a
    start key (x_1, :func:`initial_tokens`: all-mask for a masked process), a loop key and
    a final key, and the network calls one prediction takes under ``conditioning``."""
    split = jax.vmap(lambda key: jax.random.split(key, 3))(keys)
    tokens = initial_tokens(
        model.process, keys=split[:, 0], seq_len=seq_len, conditioning=conditioning
    )
    return SamplingStart(
        tokens=tokens,
        loop_keys=split[:, 1],
        final_keys=split[:, 2],
        calls=calls_per_prediction(conditioning),
    )


def apply_fixed(conditioning: Conditioning, tokens: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Overwrite the given positions of ``tokens`` with the fixed tokens (infilling)."""
    if conditioning.fixed_mask is None or conditioning.fixed_tokens is None:
        return tokens
    return jnp.where(conditioning.fixed_mask, conditioning.fixed_tokens, tokens)


def calls_per_prediction(conditioning: Conditioning) -> int:
    """Network calls that one :func:`batched_log_mean` makes: 2 with classifier-free
    guidance (conditional and unconditional), else 1."""
    return 2 if conditioning.guidance != 0.0 and conditioning.labels is not None else 1


def _guided_prediction(
    model: DiffusionModel,
    predict: Callable[..., jax.Array],
    x_t: Int[Array, "batch seq"],
    t: Float[Array, ""] | Float[Array, " batch"],
    conditioning: Conditioning,
    guide: Callable[[jax.Array, jax.Array, float, jax.Array], jax.Array],
) -> tuple[jax.Array, int]:
    """``predict(x, t, label=...)`` vmapped over a batch; under classifier-free guidance also
    with the null class, the two combined by ``guide(conditional, unconditional, w,
    finite)``, ``finite`` where both predictions are finite. Returns the prediction and the
    network calls it took."""
    labels, prefix = conditioning.labels, conditioning.prefix

    def one(x, time, label, prefix):
        return predict(x, time, label=label, prefix=prefix)

    times = jnp.broadcast_to(t, x_t.shape[:1])
    conditional = jax.vmap(one)(x_t, times, labels, prefix)
    if calls_per_prediction(conditioning) == 1:
        return conditional, 1
    null = jnp.full_like(labels, model.network.num_classes)
    unconditional = jax.vmap(one)(x_t, times, null, prefix)
    finite = jnp.isfinite(conditional) & jnp.isfinite(unconditional)
    return guide(conditional, unconditional, conditioning.guidance, finite), 2


def initial_tokens(
    process: AbstractForwardProcess,
    *,
    keys: KeyBatch,
    seq_len: int,
    conditioning: Conditioning,
) -> Int[Array, "batch seq"]:
    """Where every reverse process starts, with the given positions (infilling) set.

    A masked process (capability ``masked``, mask state V) starts from all-mask, as the
    reference implementations do. Its prior p(x_1), which the bound's prior term uses,
    keeps a uniformly random token at each position with probability alpha_1, and an
    absorbing sampler never revises such a token: on 1024 positions that is at least one
    random token in 1 - (1 - alpha_1)^1024 of the samples (10% for MD4's eps = 1e-4,
    64% for SEDD's log-linear alpha_1 = 1e-3). ``conditioning.start_from_prior`` keeps
    the prior draw (one per key); every other process always draws from its prior.
    """
    if MASKED in process.capabilities() and not conditioning.start_from_prior:
        x = jnp.full((keys.shape[0], seq_len), process.vocab_size, jnp.int32)
    else:
        x = jax.vmap(lambda k: process.sample_prior(seq_len, key=k))(keys)
    return apply_fixed(conditioning, x)


def still_masked(
    conditioning: Conditioning, tokens: Int[Array, "batch seq"], mask_id: int
) -> Bool[Array, "batch seq"]:
    """The positions a sampler still has to decode: those holding the mask that are not
    given. A given position may hold the mask itself (semi-autoregressive decoding keeps
    the blocks after the current one masked that way), and a sampler leaves it alone."""
    masked = tokens == mask_id
    if conditioning.fixed_mask is None:
        return masked
    return masked & ~conditioning.fixed_mask


def batched_log_mean(
    model: DiffusionModel,
    x_t: Int[Array, "batch seq"],
    t: Float[Array, ""] | Float[Array, " batch"],
    conditioning: Conditioning,
) -> tuple[Float[Array, "batch seq vocab"], int]:
    """log p_theta(x_0 | x_t) for a batch, with classifier-free guidance when
    ``conditioning.guidance`` is non-zero, and the number of network calls it took.

    ``t`` is one time for the whole batch or one per example (first-hitting sampling).
    Guided: log mu_w = log_softmax((1 + w) log mu_c - w log mu_u) over the values both
    predictions allow (a carried-over one-hot position stays one-hot).
    """
    def guide(conditional, unconditional, w, finite):
        mixed = jnp.where(finite, (1.0 + w) * conditional - w * jnp.where(finite, unconditional, 0.0), -jnp.inf)
        return jax.nn.log_softmax(mixed, axis=-1)

    return _guided_prediction(model, model.log_mean, x_t, t, conditioning, guide)


def batched_log_score(
    model: DiffusionModel,
    x_t: Int[Array, "batch seq"],
    t: Float[Array, ""] | Float[Array, " batch"],
    conditioning: Conditioning,
) -> tuple[Float[Array, "batch seq states"], int]:
    """log s_theta(x_t, t) (concentration ratios) for a batch, with classifier-free
    guidance when ``conditioning.guidance`` is non-zero, and the number of network calls it
    took. ``t`` is one time for the whole batch or one per example.

    Guided: log s_w = (1 + w) log s_c - w log s_u, the scores of the tilted marginal
    p_c^(1+w) / p_u^w (ratios are not normalised, so no softmax); -inf where either
    prediction is -inf. The current state's entry stays log 1 = 0.
    """
    def guide(conditional, unconditional, w, finite):
        mixed = (1.0 + w) * jnp.where(finite, conditional, 0.0) - w * jnp.where(finite, unconditional, 0.0)
        return jnp.where(finite, mixed, -jnp.inf)

    return _guided_prediction(model, model.log_score, x_t, t, conditioning, guide)
