"""Exact denoiser, score and reverse rates of a factorized forward process, by enumeration.

For a forward process whose marginals factorize over positions,
q(x_t | x_0) = prod_n q(x_t^n | x_0^n), and a toy data distribution p(x_0) over V^D
sequences:

    p(x_0 | x_t) proportional to p(x_0) prod_n q(x_t^n | x_0^n)        (the denoiser)
    p_t(x_t) = sum_{x_0} p(x_0) prod_n q(x_t^n | x_0^n)                 (the marginal)
    s(x_t)[n, y] = p_t(x_t with x_t^n = y) / p_t(x_t)                   (the score, SEDD)
    R_hat(x -> x with x^n = y) = R_t(y -> x^n) s(x)[n, y], y != x^n     (reverse rates)

The reverse rates are those of the time reversal of the forward CTMC (Campbell et al.
2022, Prop. 1; Lou et al. 2024, eq. 3).
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ddiff._capabilities import MASKED, MEAN, SCALAR_SCHEDULE, SCORE
from ddiff._errors import DdiffError
from ddiff._model import DiffusionModel
from ddiff._network import AbstractBlockCausalNetwork, BlockPrefix
from ddiff._numerics import safe_log
from ddiff._parameterization import AbstractParameterization
from ddiff._process import AbstractForwardProcess, AbstractRateProcess
from ddiff._typing import Key, Label, LogProbs, NetworkOutput, Scalar, StateLogProbs, Time, Tokens
from ddiff.testing._block import exact_block_log_denoiser
from ddiff.testing._process_tables import noisy_states
from ddiff.testing._toy import ToyDistribution


def time_quadrature(t_start: float, t_end: float, panels: int, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of composite Gauss-Legendre quadrature on [t_start, t_end]:
    ``panels`` panels (geometrically spaced when t_start > 0, to resolve the integrand's
    growth near a clipped start) of ``nodes`` nodes each."""
    if t_start > 0:
        edges = np.geomspace(t_start, t_end, panels + 1)
    else:
        edges = np.linspace(t_start, t_end, panels + 1)
    points, weights = np.polynomial.legendre.leggauss(nodes)
    half = 0.5 * np.diff(edges)[:, None]
    times = (edges[:-1, None] + half * (points[None, :] + 1.0)).ravel()
    return times, (half * weights[None, :]).ravel()


MAX_STATES = 65536
"""The largest S^D that :func:`prior_gap` enumerates."""


_IMPOSSIBLE = -1e30
"""Stands for log 0 inside matrix products (where 0 * -inf would be NaN)."""


def _safe_log(probs: jax.Array) -> jax.Array:
    return jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), _IMPOSSIBLE)


def _sequence_features(distribution: ToyDistribution) -> Float[Array, "sequences seq_vocab"]:
    """One-hot encodings of every sequence, flattened over (position, value)."""
    sequences = distribution.sequences()
    return jax.nn.one_hot(sequences, distribution.vocab_size).reshape(sequences.shape[0], -1)


def _log_joint(distribution, process, x_t, t, label):
    """log p(x_0) + log q(x_t | x_0) for every clean sequence x_0, with log 0 written as a
    large negative number so that both products are matrix products."""
    seq_len = distribution.seq_len
    values = jnp.arange(process.vocab_size)
    rows = jax.vmap(lambda v: process.marginal_probs(jnp.full((seq_len,), v), t))(values)
    likelihood = jnp.einsum("vns,ns->nv", rows, jax.nn.one_hot(x_t, process.num_states))
    log_likelihood = _sequence_features(distribution) @ _safe_log(likelihood).reshape(-1)
    log_prior = distribution.sequence_log_probs(label)
    return jnp.where(jnp.isfinite(log_prior), log_prior, _IMPOSSIBLE) + log_likelihood, log_prior


def exact_log_posterior(
    distribution: ToyDistribution,
    process: AbstractForwardProcess,
    x_t: Tokens,
    t: Time,
    label: Label | None = None,
) -> Float[Array, " sequences"]:
    """log p(x_0 | x_t) for every clean sequence (enumeration order of the toy). A state
    that no clean sequence can produce gets the prior p(x_0) instead (it never occurs
    under the process; the fallback only keeps the oracle finite)."""
    joint, log_prior = _log_joint(distribution, process, x_t, t, label)
    possible = jnp.max(joint) > 0.5 * _IMPOSSIBLE
    posterior = jax.nn.log_softmax(joint)
    return jnp.where(possible & (joint > 0.5 * _IMPOSSIBLE), posterior, jnp.where(possible, -jnp.inf, log_prior))


def exact_log_denoiser(
    distribution: ToyDistribution,
    process: AbstractForwardProcess,
    x_t: Tokens,
    t: Time,
    label: Label | None = None,
) -> LogProbs:
    """log p(x_0^n = v | x_t) for every position n and clean value v: the exact mean mu."""
    posterior = jnp.exp(exact_log_posterior(distribution, process, x_t, t, label))
    probs = (posterior @ _sequence_features(distribution)).reshape(distribution.seq_len, -1)
    return safe_log(probs)


def exact_log_marginal(
    distribution: ToyDistribution,
    process: AbstractForwardProcess,
    x_t: Tokens,
    t: Time,
    label: Label | None = None,
) -> Scalar:
    """log p_t(x_t) = log sum_{x_0} p(x_0) q(x_t | x_0) (-inf for an impossible state)."""
    joint, _ = _log_joint(distribution, process, x_t, t, label)
    total = jax.nn.logsumexp(joint)
    return jnp.where(total > 0.5 * _IMPOSSIBLE, total, -jnp.inf)


def exact_log_score(
    distribution: ToyDistribution,
    process: AbstractForwardProcess,
    x_t: Tokens,
    t: Time,
    label: Label | None = None,
) -> StateLogProbs:
    """log s[n, y] = log p_t(x_t with x_t^n = y) - log p_t(x_t), for every position n and
    state y (0 at y = x_t^n; -inf where the changed state is impossible)."""

    def changed(position, state):
        return exact_log_marginal(distribution, process, x_t.at[position].set(state), t, label)

    positions, states = jnp.arange(x_t.shape[0]), jnp.arange(process.num_states)
    grid = jax.vmap(lambda n: jax.vmap(lambda y: changed(n, y))(states))(positions)
    return grid - exact_log_marginal(distribution, process, x_t, t, label)


def exact_reverse_rates(
    distribution: ToyDistribution,
    process: AbstractRateProcess,
    x_t: Tokens,
    t: Time,
    label: Label | None = None,
) -> Float[Array, "seq states"]:
    """Rates of the time-reversed chain: entry [n, y] (y != x_t^n) is the rate of moving
    position n to y, R_t(y -> x_t^n) s[n, y]; entry [n, x_t^n] is minus their sum."""
    if not isinstance(process, AbstractRateProcess):
        raise DdiffError(
            f"exact_reverse_rates needs a process with forward rates (AbstractRateProcess), "
            f"got {type(process).__name__}"
        )
    seq_len = x_t.shape[0]
    states = jnp.arange(process.num_states)
    # from_state[y, n, j] = R_t(y -> j) at position n.
    from_state = jax.vmap(lambda y: process.forward_rates(jnp.full((seq_len,), y), t))(states)
    into_current = jnp.transpose(from_state[:, jnp.arange(seq_len), x_t])  # (seq, states)
    score = jnp.exp(exact_log_score(distribution, process, x_t, t, label))
    current = jax.nn.one_hot(x_t, process.num_states, dtype=bool)
    rates = jnp.where(current, 0.0, into_current * score)
    return rates - current * jnp.sum(rates, axis=-1, keepdims=True)


def _enumerated_states(process: AbstractForwardProcess, seq_len: int, caller: str) -> jax.Array:
    """Every noisy sequence (S^D of them, at most :data:`MAX_STATES`), for ``caller``."""
    count = process.num_states**seq_len
    if count > MAX_STATES:
        raise DdiffError(
            f"{caller} enumerates S^D = {count} noisy states, more than {MAX_STATES}; use a "
            f"smaller toy"
        )
    return jnp.asarray(noisy_states(process.num_states, seq_len))


def prior_gap(distribution: ToyDistribution, process: AbstractForwardProcess) -> float:
    """KL(q_1 || p_1) in nats: how far the aggregate marginal at t = 1,
    q_1(z) = sum_x p(x) q(z | x), is from the process prior p_1(z) = prod_n p(z^n). A
    continuous-time bound evaluated with the exact denoiser exceeds H(p) by this much
    (plus a reconstruction slack at t = 0)."""
    states = _enumerated_states(process, distribution.seq_len, "prior_gap")
    return float(_prior_gap(distribution, process, states))


@eqx.filter_jit
def _prior_gap(distribution, process, states):
    log_q1 = jax.vmap(lambda z: exact_log_marginal(distribution, process, z, jnp.ones(())))(states)
    log_p1 = jnp.sum(jnp.log(process.prior_probs())[states], axis=-1)
    q1 = jnp.exp(log_q1)
    return jnp.sum(jnp.where(q1 > 0, q1 * (log_q1 - log_p1), 0.0))


def reverse_kl_rate(
    process: AbstractRateProcess, log_mean: LogProbs, x0: Tokens, x_t: Tokens, t: Time
) -> Scalar:
    """The integrand of the continuous-time negative ELBO at one clean x_0 and noisy x_t
    (Campbell et al. 2022; Lou et al. 2024): the KL rate between the reverse chain given
    x_0 and the model's,

        L_t = sum_n sum_{y != x_t^n} [R_theta(y) - R_0(y) + R_0(y) log(R_0(y) / R_theta(y))],

    with R_0(y) = R_t(y -> x_t^n) q_t(y | x_0^n) / q_t(x_t^n | x_0^n) and R_theta(y) =
    R_t(y -> x_t^n) s[n, y], s read from mu = exp(``log_mean``) by
    ``process.log_score_from_mean``. Computed from the process's rates, marginals and
    scores alone (no objective's formula), with gradients that stay finite where rates or
    probabilities vanish; 0 where x_t cannot arise from x_0.
    """
    other = ~jax.nn.one_hot(x_t, process.num_states, dtype=bool)
    rates = jnp.where(other, process.incoming_rates(x_t, t), 0.0)
    model_rates = rates * jnp.exp(process.log_score_from_mean(log_mean, x_t, t))
    marginal = process.marginal_probs(x0, t)
    current = jnp.take_along_axis(marginal, x_t[:, None], axis=-1)
    possible = current > 0
    true_rates = rates * marginal / jnp.where(possible, current, 1.0)
    positive = true_rates > 0
    log_ratio = jnp.log(jnp.where(positive, true_rates, 1.0)) - jnp.log(
        jnp.where(positive, model_rates, 1.0)
    )
    terms = model_rates - true_rates + jnp.where(positive, true_rates * log_ratio, 0.0)
    return jnp.sum(jnp.where(other & possible, terms, 0.0))


def _weighted_kl_rate(process, log_mean, x0, x_t, t):
    """q_t(x_t | x_0) L_t(x_0, x_t), 0 where x_t cannot arise from x_0."""
    current = jnp.take_along_axis(process.marginal_probs(x0, t), x_t[:, None], axis=-1)[:, 0]
    probability = jnp.prod(current)
    total = reverse_kl_rate(process, log_mean, x0, x_t, t)
    return jnp.where(probability > 0, probability * total, 0.0)


def exact_diffusion_nelbo(
    model: DiffusionModel,
    distribution: ToyDistribution,
    *,
    t_start: float = 0.0,
    t_end: float = 1.0,
    panels: int = 4,
    nodes: int = 12,
) -> Scalar:
    """The diffusion term of the continuous-time negative ELBO, exactly: for a model with a
    mean parameterization on a factorized process with forward rates,

        E_{x_0 ~ p} int_{t_start}^{t_end} E_{x_t ~ q_t(. | x_0)} L_t(x_0, x_t) dt,
        L_t = sum_n sum_{y != x_t^n} [R_theta(y) - R_0(y) + R_0(y) log(R_0(y) / R_theta(y))],

    the KL rate between the reverse chain given x_0 and the model's
    (:func:`reverse_kl_rate`). Every x_0 of the toy and every noisy state
    x_t in S^D are enumerated; t is integrated by Gauss-Legendre quadrature with
    ``nodes`` nodes on each of ``panels`` panels (geometric when t_start > 0, so that
    the t^(w-1) behaviour of polynomial schedules near 0 is resolved; on GenMD4's toy
    bounds from t = 1e-3 the default 4 x 12 nodes agree with 12 x 24 to 1e-10 nats). It is computed
    from the process's rates, scores and marginals alone, independently of any
    objective's formula, and is differentiable: ``jax.grad`` of it gives the exact
    gradient of the bound with respect to any parameter of the model (e.g. a learnable
    schedule), for :func:`ddiff.testing.check_gradient`. Labels are not used (the
    distribution's marginal is taken).
    """
    seq_len = distribution.seq_len
    if not isinstance(model.process, AbstractRateProcess):
        raise DdiffError(
            f"exact_diffusion_nelbo needs a process with forward rates (AbstractRateProcess), "
            f"got {type(model.process).__name__}"
        )
    states = _enumerated_states(model.process, seq_len, "exact_diffusion_nelbo")
    times, time_weights = time_quadrature(t_start, t_end, panels, nodes)
    clean = distribution.sequences()
    data_probs = jnp.exp(distribution.sequence_log_probs())
    return _exact_diffusion_nelbo(
        model, states, clean, data_probs, jnp.asarray(times), jnp.asarray(time_weights)
    )


@eqx.filter_jit
def _exact_diffusion_nelbo(model, states, clean, data_probs, times, time_weights):
    process = model.process

    def at_time(t):
        log_means = jax.vmap(lambda x_t: model.log_mean(x_t, t))(states)

        def per_clean(x0):
            rates = jax.vmap(lambda x_t, lm: _weighted_kl_rate(process, lm, x0, x_t, t))
            return jnp.sum(rates(states, log_means))

        return jnp.sum(data_probs * jax.vmap(per_clean)(clean))

    return jnp.sum(time_weights * jax.vmap(at_time)(times))


class OracleNetwork(AbstractBlockCausalNetwork):
    """A "network" whose output is exact: log p(x_0^n = v | x_t) (``output="log_mean"``,
    shape (seq, V)) or the exact log score (``output="log_score"``, shape (seq, S)),
    computed by enumerating a toy distribution. Paired with a parameterization that reads
    its input as log-probabilities (the mean parameterization) or log scores, it drives
    any objective or sampler with the true reverse process.

    Build it with :func:`oracle_network`, which fills in the defaults.

    Attributes:
        distribution: the data distribution p(x_0) (per class when class-conditional).
        process: the forward process whose posterior is computed.
        output: ``log_mean`` or ``log_score``.
        time_conditioned: False only when the exact output does not depend on t (true of
            the masked process with a scalar schedule: p(x_0 | x_t) depends on which
            positions are masked, not on alpha_t; with a per-value schedule it does, through
            the ratios of 1 - alpha_t[v]), which admits caching samplers.
        num_classes: the distribution's classes (label ``num_classes`` is the marginal).
        reader: for ``log_score``, the score parameterization that will read the output,
            when it adds an offset to it (SEDD's absorbing scaling adds log r_t - log V):
            the output is then the exact log score minus that offset,
            ``reader.log_score(0, x_t, t, process)``, so that the model's score is exact.
            None: the output is the exact log score.

    When time independent it is also a block-causal network (block diffusion): its
    vectorised pass gives the exact block conditionals (:func:`exact_block_log_denoiser`)
    and its cache of clean blocks is their tokens (a :class:`ddiff.BlockPrefix`).
    """

    distribution: ToyDistribution
    process: AbstractForwardProcess
    output: Literal["log_mean", "log_score"] = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    reader: AbstractParameterization | None = None

    def __check_init__(self):
        if self.distribution.vocab_size != self.process.vocab_size:
            raise DdiffError(
                f"oracle: the toy has V={self.distribution.vocab_size} but the process "
                f"V={self.process.vocab_size}"
            )

    def __call__(
        self, x_t: Tokens, t: Time, *, label: Label | None = None, key: Key | None = None
    ) -> NetworkOutput:
        del key
        if self.output == "log_mean":
            return exact_log_denoiser(self.distribution, self.process, x_t, t, label)
        log_score = exact_log_score(self.distribution, self.process, x_t, t, label)
        if self.reader is None:
            return log_score
        offset = self.reader.log_score(jnp.zeros_like(log_score), x_t, t, self.process)
        return log_score - jnp.where(jnp.isfinite(offset), offset, 0.0)

    def block_causal_output(self, x_t, x0, *, block_size, label=None, key=None):
        del key
        if self.output != "log_mean":
            raise DdiffError("oracle: the block-causal pass gives the exact mean only (output='log_mean')")
        # Time independent: the posterior is the same at every interior time.
        return exact_block_log_denoiser(self.distribution, self.process, x_t, x0, block_size, jnp.full((), 0.5), label)

    def init_cache(self, capacity, *, block_size):
        return BlockPrefix.empty(capacity, block_size)

    def extend_cache(self, cache, block, *, label=None):
        return cache.extend(block)

    def cached_output(self, x_t, cache, *, label=None):
        return self.prefix_output(x_t, cache, label=label)


def oracle_network(
    distribution: ToyDistribution,
    process: AbstractForwardProcess,
    *,
    output: Literal["log_mean", "log_score"] = "log_mean",
    time_conditioned: bool | None = None,
    reader: AbstractParameterization | None = None,
) -> OracleNetwork:
    """An :class:`OracleNetwork`; by default time conditioned unless the process is masked
    with a scalar schedule."""
    if time_conditioned is None:
        provided = process.capabilities()
        time_conditioned = not (MASKED in provided and SCALAR_SCHEDULE in provided)
    return OracleNetwork(
        distribution=distribution,
        process=process,
        output=output,
        time_conditioned=time_conditioned,
        num_classes=distribution.num_classes,
        reader=reader if output == "log_score" else None,
    )


def oracle_model(
    distribution: ToyDistribution,
    process: AbstractForwardProcess,
    parameterization: AbstractParameterization,
    *,
    time_conditioned: bool | None = None,
) -> DiffusionModel:
    """A :class:`ddiff.DiffusionModel` driven by the exact posterior of ``distribution``:
    the oracle's output is log p(x_0 | x_t) for a mean parameterization and the exact log
    score for a score parameterization."""
    network = oracle_network(
        distribution,
        process,
        output=oracle_output(parameterization),
        time_conditioned=time_conditioned,
        reader=parameterization,
    )
    return DiffusionModel(network=network, parameterization=parameterization, process=process)


def oracle_output(parameterization: AbstractParameterization) -> Literal["log_mean", "log_score"]:
    """What an oracle network must output for ``parameterization``: the exact log mean
    when it provides a mean (it must read its input as log-probabilities), else the exact
    log score (it must read its input as log scores)."""
    provided = parameterization.capabilities()
    if MEAN in provided:
        return "log_mean"
    if SCORE in provided:
        return "log_score"
    raise DdiffError(
        f"oracle: parameterization {type(parameterization).__name__} provides neither "
        f"'{MEAN}' nor '{SCORE}'; build the oracle network with oracle_network()"
    )
