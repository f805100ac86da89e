"""Exact references for any model on a toy, in float64: bounds per x_0 and samplers' laws.

Everything here is computed from a few primitives of the forward process, its marginals
q_t(y | v) (``marginal_probs``), its transition matrices Q_{s->t} (``transition_probs``),
its prior and (for a score sampler's final Tweedie draw only) its Tweedie denoiser, and
from the model's predictions, tabulated on every noisy sequence of the toy (S^D of them).
The forward rates are the time derivative of the transitions, R_t = d/du Q_{t->u} at
u = t (automatic differentiation of the schedule's alpha, never its ``alpha_derivative``).
The concentration ratios of a mean (Lou et al. 2024),

    s[n, y] = sum_v mu[n, v] q_t(y | v) / q_t(x^n | v),

the posterior step averaged over a mean, guidance, the nucleus, every sampler rule of
:class:`ddiff.ReverseChain` and every term of a :class:`ddiff.BoundForm` are written
here again in numpy, so that a reference never runs an objective's or a sampler's code.
"""

import dataclasses
import itertools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._capabilities import MASKED, MEAN, RATES, SCALAR_SCHEDULE, TRANSITIONS
from ddiff._errors import DdiffError
from ddiff._model import DiffusionModel
from ddiff._objective import BoundForm
from ddiff._process import AbstractForwardProcess
from ddiff._sampler import ReverseChain
from ddiff.testing._exact import time_quadrature
from ddiff.testing._toy import ToyDistribution

_CHUNK = 16
"""Times are evaluated 16 at a time, so that one compiled function serves any count."""

CONTINUOUS_STEPS = 256
"""Runge-Kutta steps of the ``continuous`` chain, uniform in l = -log(1 - alpha_t)."""


def _float64(tree):
    """A float64 copy of every floating-point array (through numpy: no compilation)."""
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a, np.float64)) if eqx.is_inexact_array(a) else a, tree
    )


def noisy_states(num_states: int, seq_len: int) -> np.ndarray:
    """Every sequence over S states, in lexicographic order (index sum_n x^n S^(D-1-n))."""
    return np.asarray(list(itertools.product(range(num_states), repeat=seq_len)), np.int64)


def _powers(base: int, seq_len: int) -> np.ndarray:
    return base ** np.arange(seq_len - 1, -1, -1)


def _log(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(values)


# --------------------------------------------------------------------------- jax, once per type


@eqx.filter_jit
def _marginals(process, times):
    values = jnp.arange(process.vocab_size)
    return jax.vmap(lambda t: process.marginal_probs(values, t))(times)


@eqx.filter_jit
def _transitions(process, starts, ends):
    states = jnp.arange(process.num_states)
    return jax.vmap(lambda s, t: process.transition_probs(states, s, t))(starts, ends)


@eqx.filter_jit
def _rates(process, times):
    states = jnp.arange(process.num_states)
    if TRANSITIONS in process.capabilities():

        def one(t):
            _, tangent = jax.jvp(
                lambda u: process.transition_probs(states, t, u), (t,), (jnp.ones_like(t),)
            )
            return tangent

    else:

        def one(t):
            return process.forward_rates(states, t)

    return jax.vmap(one)(times)


@eqx.filter_jit
def _alpha_and_derivative(schedule, times):
    def one(t):
        return jax.jvp(schedule.alpha, (t,), (jnp.ones_like(t),))

    return jax.vmap(one)(times)


@eqx.filter_jit
def _time_of_alpha(schedule, targets):
    """t with alpha(t) = target (alpha decreasing), by 80 bisection steps in float64."""

    def one(target):
        def body(_, bounds):
            low, high = bounds
            middle = 0.5 * (low + high)
            right = schedule.alpha(middle) > target
            return jnp.where(right, middle, low), jnp.where(right, high, middle)

        low, high = jax.lax.fori_loop(0, 80, body, (jnp.zeros_like(target), jnp.ones_like(target)))
        return 0.5 * (low + high)

    return jax.vmap(one)(targets)


@eqx.filter_jit
def _model_predictions(model, states, labels, score, times):
    predict = model.log_score if score else model.log_mean

    def at(t, label):
        return jax.vmap(lambda x: predict(x, t, label=label))(states)

    if labels is None:
        return jax.vmap(lambda t: at(t, None))(times)[:, None]
    return jax.vmap(lambda t: jax.vmap(lambda label: at(t, label))(labels))(times)


@eqx.filter_jit
def _prior(process):
    return process.prior_probs()


@eqx.filter_jit
def _process_tweedie(process, log_scores, states, t):
    return jax.vmap(lambda ls, x: process.log_mean_from_score(ls, x, t))(log_scores, states)


def _over_times(fn, times, *args) -> np.ndarray:
    """fn(*args, times) with times in chunks of 16 (padded), stacked along axis 0."""
    times = np.asarray(times, np.float64)
    count = len(times)
    padded = np.concatenate([times, np.full((-count) % _CHUNK, times[-1])])
    parts = [
        np.asarray(fn(*args, jnp.asarray(chunk, jnp.float64)), np.float64)
        for chunk in padded.reshape(-1, _CHUNK)
    ]
    return np.concatenate(parts, axis=0)[:count]


# --------------------------------------------------------------------------- process tables


@dataclasses.dataclass(frozen=True)
class _Process:
    """A float64 copy of a process and the sizes the references need."""

    process: AbstractForwardProcess
    seq_len: int

    @property
    def vocab_size(self) -> int:
        return self.process.vocab_size

    @property
    def num_states(self) -> int:
        return self.process.num_states

    def marginals(self, times) -> np.ndarray:
        """q_t(y | v): shape (times, V, S)."""
        return _over_times(_marginals, times, self.process)

    def transitions(self, starts, ends) -> np.ndarray:
        """Q_{s->t}(i, j) = q(x_t = j | x_s = i): shape (pairs, S, S)."""
        starts, ends = np.asarray(starts, np.float64), np.asarray(ends, np.float64)
        count = len(starts)
        pad = (-count) % _CHUNK
        starts = np.concatenate([starts, np.full(pad, starts[-1])]).reshape(-1, _CHUNK)
        ends = np.concatenate([ends, np.full(pad, ends[-1])]).reshape(-1, _CHUNK)
        parts = [
            np.asarray(_transitions(self.process, jnp.asarray(a), jnp.asarray(b)), np.float64)
            for a, b in zip(starts, ends, strict=True)
        ]
        return np.concatenate(parts)[:count]

    def rates(self, times) -> np.ndarray:
        """R_t(i -> j) = d/du Q_{t->u}(i, j) at u = t: shape (times, S, S)."""
        if RATES not in self.process.capabilities() and TRANSITIONS not in self.process.capabilities():
            raise DdiffError(
                f"the reference needs forward rates or transitions of process "
                f"{type(self.process).__name__}"
            )
        return _over_times(_rates, times, self.process)

    def prior(self) -> np.ndarray:
        return np.asarray(_prior(self.process), np.float64)


def _as_process(process: AbstractForwardProcess, seq_len: int) -> _Process:
    return _Process(_float64(process), seq_len)


# --------------------------------------------------------------------------- predictions


class _Predictions:
    """Log means (or log scores) of a model at every noisy sequence, per prediction row
    (one row, or one per label plus the null class last). The model is evaluated in
    float64, inside the references' ``jax.enable_x64`` context."""

    def __init__(self, model: DiffusionModel | None, rows: int, exact: tuple | None = None):
        self.model = model
        self.rows = rows
        self.exact = exact  # (distribution, row labels)

    @property
    def provides_mean(self) -> bool:
        if self.model is None:
            return True
        return MEAN in self.model.parameterization.capabilities()

    def _tabulate(self, states, times, score: bool) -> np.ndarray:
        labels = None if self.model.network.num_classes == 0 else jnp.arange(self.rows)
        return _over_times(
            _model_predictions, times, _float64(self.model), jnp.asarray(states), labels, score
        )

    def log_mean(self, tables: _Process, states: np.ndarray, times) -> np.ndarray:
        """Shape (times, rows, N, D, V)."""
        if self.exact is not None:
            return _exact_log_mean(self.exact[0], tables, states, times, self.exact[1])
        return self._tabulate(states, times, score=False)

    def log_score(self, tables: _Process, states: np.ndarray, times) -> np.ndarray:
        """Shape (times, rows, N, D, S): the ratios of the mean when there is one."""
        if self.provides_mean:
            means = self.log_mean(tables, states, times)
            marginals = tables.marginals(times)
            return _log(np.stack(
                [score_from_mean(m, states, q) for m, q in zip(means, marginals, strict=True)]
            ))
        return self._tabulate(states, times, score=True)


def model_predictions(model: DiffusionModel) -> _Predictions:
    """The predictions of ``model`` (float64 copy), rows 0..C-1 and the null class C for a
    class-conditional network, else one row."""
    classes = model.network.num_classes
    return _Predictions(model, classes + 1 if classes > 0 else 1)


def exact_predictions(distribution: ToyDistribution) -> _Predictions:
    """The exact denoiser of ``distribution``: rows 0..C-1 and the marginal last for a
    class-conditional toy, else one row."""
    classes = distribution.num_classes
    rows = list(range(classes)) + [None] if classes > 0 else [None]
    return _Predictions(None, len(rows), exact=(distribution, rows))


def _exact_log_mean(distribution, tables: _Process, states, times, rows) -> np.ndarray:
    """p(x_0^n = v | x_t) by enumeration: shape (times, rows, N, D, V). A state that no
    clean sequence can produce gets the prior p(x_0^n) instead (it has probability 0)."""
    return _exact_posterior(distribution, tables, states, times, rows)[0]


def _exact_posterior(distribution, tables: _Process, states, times, rows):
    """(:func:`_exact_log_mean`, and whether each state has positive probability under
    p_t: shape (times, rows, N))."""
    sequences = np.asarray(distribution.sequences())
    features = np.eye(tables.vocab_size)[sequences]  # (M, D, V)
    log_prior = np.stack([_toy_log_probs(distribution, row) for row in rows])  # (rows, M)
    marginals = tables.marginals(times)
    out, possible = [], []
    for table in marginals:
        log_table = _log(table)
        # log q_t(x | x_0) for every state and clean sequence: (N, M).
        log_likelihood = log_table[sequences[None, :, :], states[:, None, :]].sum(-1)
        joint = log_prior[:, None, :] + log_likelihood[None]
        peak = joint.max(-1, keepdims=True)
        finite = np.isfinite(peak)
        weights = np.exp(joint - np.where(finite, peak, 0.0))
        weights = np.where(finite, weights, 0.0)
        total = weights.sum(-1, keepdims=True)
        fallback = np.exp(log_prior)[:, None, :]
        posterior = np.where(total > 0, weights / np.where(total > 0, total, 1.0), fallback)
        mean = np.einsum("rnm,mdv->rndv", posterior, features)
        out.append(_log(mean))
        possible.append(total[..., 0] > 0)
    return np.stack(out), np.stack(possible)


def _toy_log_probs(distribution: ToyDistribution, label: int | None) -> np.ndarray:
    """log p(x | label) for every sequence in float64 numpy; None gives the marginal."""
    table = np.asarray(distribution.log_probs, np.float64)
    if label is not None and distribution.num_classes > 0:
        return table[label]
    weights = np.asarray(distribution.class_log_probs, np.float64)[:, None] + table
    peak = weights.max(0)
    return peak + np.log(np.exp(weights - peak).sum(0))


def score_from_mean(log_mean: np.ndarray, states: np.ndarray, marginal: np.ndarray) -> np.ndarray:
    """s[.., x, n, y] = sum_v mu'[v] q_t(y | v) / q_t(x^n | v), mu' = mu restricted to the
    values that can produce x^n and renormalised (uniform over them where mu gives them no
    mass): the concentration ratios of a factorized posterior with marginals mu.

    Arguments:
        log_mean: shape (..., N, D, V).
        states: the noisy sequences, shape (N, D).
        marginal: q_t(y | v), shape (V, S).
    """
    current = np.moveaxis(marginal[:, states], 0, -1)  # q_t(x^n | v): (N, D, V)
    mean = _restricted_mean(log_mean, current > 0)
    weights = np.where(current > 0, mean / np.where(current > 0, current, 1.0), 0.0)
    return weights @ marginal


def _restricted_mean(log_mean: np.ndarray, possible: np.ndarray) -> np.ndarray:
    mean = np.where(possible, np.exp(log_mean), 0.0)
    total = mean.sum(-1, keepdims=True)
    fallback = possible / np.maximum(possible.sum(-1, keepdims=True), 1)
    return np.where(total > 0, mean / np.where(total > 0, total, 1.0), fallback)


def guide_mean(conditional: np.ndarray, unconditional: np.ndarray, weight: float) -> np.ndarray:
    """Classifier-free guidance of log means: log_softmax((1 + w) log mu_c - w log mu_u)
    over the values both allow."""
    finite = np.isfinite(conditional) & np.isfinite(unconditional)
    mixed = np.where(
        finite,
        (1.0 + weight) * np.where(finite, conditional, 0.0) - weight * np.where(finite, unconditional, 0.0),
        -np.inf,
    )
    peak = np.max(np.where(finite, mixed, -np.inf), axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    total = np.sum(np.where(finite, np.exp(mixed - peak), 0.0), axis=-1, keepdims=True)
    return np.where(finite, mixed - peak - _log(np.where(total > 0, total, 1.0)), -np.inf)


def guide_score(conditional: np.ndarray, unconditional: np.ndarray, weight: float) -> np.ndarray:
    """Classifier-free guidance of scores: s_c^(1+w) / s_u^w, 0 where either is 0."""
    positive = (conditional > 0) & (unconditional > 0)
    log_c = _log(np.where(positive, conditional, 1.0))
    log_u = _log(np.where(positive, unconditional, 1.0))
    return np.where(positive, np.exp((1.0 + weight) * log_c - weight * log_u), 0.0)


def nucleus(mean: np.ndarray, top_p: float) -> np.ndarray:
    """The most probable values whose mass reaches ``top_p`` (a value is kept when the mass
    of the values more probable than it is below ``top_p``), renormalised."""
    if top_p >= 1.0:
        return mean
    order = np.argsort(-mean, axis=-1, kind="stable")
    ordered = np.take_along_axis(mean, order, axis=-1)
    before = np.cumsum(ordered, axis=-1) - ordered
    keep = np.zeros_like(mean, dtype=bool)
    np.put_along_axis(keep, order, before < top_p, axis=-1)
    kept = np.where(keep, mean, 0.0)
    return kept / kept.sum(-1, keepdims=True)


# --------------------------------------------------------------------------- one-position rules


def _onehot(states: np.ndarray, size: int) -> np.ndarray:
    return np.eye(size)[states]


def _normalise_or_stay(probs: np.ndarray, current: np.ndarray) -> np.ndarray:
    total = probs.sum(-1, keepdims=True)
    return np.where(total > 0, probs / np.where(total > 0, total, 1.0), current)


def posterior_rule(mean, states, marginal_s, transition) -> np.ndarray:
    """p(x_s^n = j | x_t) = sum_v mu'[v] q_s(j | v) Q(j, x^n) / q_t(x^n | v), with
    q_t(x^n | v) = sum_j q_s(j | v) Q(j, x^n) and mu' the mean restricted to the values that
    can produce x^n. ``mean`` (.., N, D, V) holds probabilities."""
    reach = marginal_s @ transition  # (V, S): q_t(k | v) through s
    current = np.moveaxis(reach[:, states], 0, -1)  # (N, D, V)
    possible = current > 0
    restricted = np.where(possible, mean, 0.0)
    total = restricted.sum(-1, keepdims=True)
    fallback = possible / np.maximum(possible.sum(-1, keepdims=True), 1)
    restricted = np.where(total > 0, restricted / np.where(total > 0, total, 1.0), fallback)
    weights = np.where(possible, restricted / np.where(possible, current, 1.0), 0.0)
    column = np.moveaxis(transition[:, states], 0, -1)  # Q(j, x^n): (N, D, S)
    # A state no value can produce (a given token the prior cannot hold) stays: only
    # infilling reaches it, and sets it again.
    return _normalise_or_stay((weights @ marginal_s) * column, _onehot(states, transition.shape[0]))


def euler_rule(score, states, rates_t, step) -> np.ndarray:
    num_states = rates_t.shape[0]
    incoming = np.moveaxis(rates_t[:, states], 0, -1)  # R_t(y -> x^n): (N, D, S)
    current = _onehot(states, num_states)
    moving = (incoming > 0) & (current == 0)
    moves = np.where(moving, step * incoming * score, 0.0)
    stay = np.maximum(1.0 - moves.sum(-1, keepdims=True), 0.0)
    return _normalise_or_stay(moves + stay * current, current)


def tweedie_rule(score, states, transition) -> np.ndarray:
    num_states = transition.shape[0]
    staggered = np.linalg.solve(transition.T, np.moveaxis(score, -1, 0).reshape(num_states, -1))
    staggered = np.moveaxis(staggered.reshape(num_states, *score.shape[:-1]), 0, -1)
    column = np.moveaxis(transition[:, states], 0, -1)
    return _normalise_or_stay(np.maximum(staggered, 0.0) * column, _onehot(states, num_states))


def reverse_rates(score, states, rates_t) -> np.ndarray:
    """R_t(y -> x^n) s[n, y] for y != x^n, 0 at the current state."""
    incoming = np.moveaxis(rates_t[:, states], 0, -1)
    current = _onehot(states, rates_t.shape[0]) > 0
    return np.where(current | (incoming <= 0), 0.0, incoming * score)


def leap_rule(rates, states, duration) -> np.ndarray:
    current = _onehot(states, rates.shape[-1])
    total = rates.sum(-1, keepdims=True)
    intensity = duration * total
    move = intensity * np.exp(-intensity)
    target = np.where(total > 0, rates / np.where(total > 0, total, 1.0), 0.0)
    return move * target + (1.0 - move) * current


def _kernel(position_probs: np.ndarray) -> np.ndarray:
    """K[x, x'] = prod_n k[x, n, x'^n] for per-position probabilities k (N, D, S)."""
    kernel = position_probs[:, 0, :]
    for n in range(1, position_probs.shape[1]):
        kernel = (kernel[:, :, None] * position_probs[:, n, None, :]).reshape(kernel.shape[0], -1)
    return kernel


# --------------------------------------------------------------------------- conditioning


@dataclasses.dataclass(frozen=True)
class Combos:
    """Distinct conditionings of a sampler check: a label row per combination (None for
    unconditional), and the given positions and their values (infilling)."""

    labels: np.ndarray | None  # (C,)
    fixed_mask: np.ndarray  # (C, D) bool
    fixed_tokens: np.ndarray  # (C, D)

    @property
    def count(self) -> int:
        return self.fixed_mask.shape[0]


def _projection(combos: Combos, states: np.ndarray, num_states: int) -> np.ndarray:
    """Index of each state with the given positions of each combination set: (C, N)."""
    powers = _powers(num_states, states.shape[1])
    base = states @ powers
    given = np.where(combos.fixed_mask[:, None, :], combos.fixed_tokens[:, None, :] - states[None], 0)
    return base[None] + given @ powers


def _project(probs: np.ndarray, projection: np.ndarray) -> np.ndarray:
    count, size = probs.shape
    flat = (np.arange(count)[:, None] * size + projection).ravel()
    return np.bincount(flat, probs.ravel(), count * size).reshape(count, size)


# --------------------------------------------------------------------------- chain laws


def chain_law(
    chain: ReverseChain,
    process: AbstractForwardProcess,
    predictions: _Predictions,
    *,
    seq_len: int,
    combos: Combos,
    guidance: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact law of the output of ``chain`` for each conditioning combination.

    Returns:
        law: shape (C, V^D), the probability of each clean sequence (enumeration order of
            the toys); noisy: shape (C,), the probability that a position is left in a
            noisy state (index >= V), which a sampler's output may never hold.
    """
    with jax.enable_x64(True):
        tables = _as_process(process, seq_len)
        states = noisy_states(tables.num_states, seq_len)
        runner = _ChainRunner(chain, tables, predictions, states, combos, guidance)
        final = runner.continuous() if chain.step == "continuous" else runner.grid()
    return _clean_law(final, states, tables.vocab_size)


def _clean_law(probs: np.ndarray, states: np.ndarray, vocab_size: int):
    clean = np.all(states < vocab_size, axis=1)
    index = states[clean] @ _powers(vocab_size, states.shape[1])
    law = np.zeros((probs.shape[0], vocab_size ** states.shape[1]))
    law[:, index] = probs[:, clean]
    return law, probs[:, ~clean].sum(1)


class _ChainRunner:
    """Pushes the distribution over every noisy sequence through a chain's steps."""

    def __init__(self, chain, tables: _Process, predictions: _Predictions, states, combos, guidance):
        self.chain, self.tables, self.predictions = chain, tables, predictions
        self.states, self.combos, self.guidance = states, combos, guidance
        self.num_states = tables.num_states
        self.projection = _projection(combos, states, self.num_states)
        if combos.labels is None or predictions.rows == 1:
            self.groups = {0: np.arange(combos.count)}
        else:
            self.groups = {
                int(row): np.flatnonzero(combos.labels == row) for row in np.unique(combos.labels)
            }

    # ---- predictions, guided per label row

    def _guided(self, raw: np.ndarray, score: bool) -> dict[int, np.ndarray]:
        """raw (times, rows, N, D, C) -> {row: (times, N, D, C)} with guidance applied."""
        out = {}
        for row in self.groups:
            if self.guidance == 0.0 or self.predictions.rows == 1:
                out[row] = raw[:, row]
            elif score:
                out[row] = guide_score(raw[:, row], raw[:, -1], self.guidance)
            else:
                out[row] = np.exp(guide_mean(_log(raw[:, row]), _log(raw[:, -1]), self.guidance))
        return out

    def means(self, times) -> dict[int, np.ndarray]:
        """Guided means (probabilities) after the nucleus: {row: (times, N, D, V)}."""
        raw = np.exp(self.predictions.log_mean(self.tables, self.states, times))
        guided = self._guided(raw, score=False)
        return {row: nucleus(mean, self.chain.top_p) for row, mean in guided.items()}

    def scores(self, times) -> dict[int, np.ndarray]:
        """Guided scores as the chain reads them: {row: (times, N, D, S)}."""
        if self.chain.reads == "score":
            raw = np.exp(self.predictions.log_score(self.tables, self.states, times))
            return self._guided(raw, score=True)
        marginals = self.tables.marginals(times)
        out = {}
        for row, mean in self.means(times).items():
            out[row] = np.stack(
                [score_from_mean(_log(m), self.states, q) for m, q in zip(mean, marginals, strict=True)]
            )
        return out

    # ---- steps

    def _start(self) -> np.ndarray:
        """Where the chain starts, as :func:`ddiff.initial_tokens` does: all-mask for a
        masked process, else the prior at every position."""
        prior = self.tables.prior()
        if MASKED in self.tables.process.capabilities():
            prior = np.zeros_like(prior)
            prior[self.tables.process.vocab_size] = 1.0
        start = np.prod(prior[self.states], axis=1)
        return _project(np.broadcast_to(start, (self.combos.count, len(start))).copy(), self.projection)

    def _apply(self, probs, per_row_position_probs) -> np.ndarray:
        out = np.empty_like(probs)
        for row, members in self.groups.items():
            out[members] = probs[members] @ _kernel(per_row_position_probs[row])
        return _project(out, self.projection)

    def grid(self) -> np.ndarray:
        chain = self.chain
        times = np.asarray(chain.times, np.float64)
        steps = len(times) - 1
        tables = self.tables
        rule = chain.step
        if rule not in ("posterior", "euler", "tweedie", "tau_leap"):
            raise DdiffError(f"unknown reverse chain step {rule!r}")
        marginals = tables.marginals(times)
        transitions = tables.transitions(times[1:], times[:-1]) if steps else None
        needs_rates = rule in ("euler", "tau_leap")
        rates = tables.rates(times) if needs_rates else None
        if rule == "posterior":
            predictions = self.means(times[:-1]) if steps else None
        else:
            predictions = self.scores(times) if steps else None
        probs = self._start()
        for i in range(steps):
            t, s = times[i], times[i + 1]
            per_row = {}
            for row in self.groups:
                if rule == "posterior":
                    per_row[row] = posterior_rule(predictions[row][i], self.states, marginals[i + 1], transitions[i])
                elif rule == "euler":
                    per_row[row] = euler_rule(predictions[row][i], self.states, rates[i], t - s)
                elif rule == "tweedie":
                    per_row[row] = tweedie_rule(predictions[row][i], self.states, transitions[i])
                else:
                    reverse = reverse_rates(predictions[row][i], self.states, rates[i])
                    per_row[row] = leap_rule(reverse, self.states, t - s)
            probs = self._apply(probs, per_row)
            if chain.corrector_steps and 0.0 < s <= chain.corrector_entry:
                for _ in range(chain.corrector_steps):
                    per_row = {}
                    current = _onehot(self.states, self.num_states) > 0
                    forward = np.where(current, 0.0, rates[i + 1][self.states])
                    for row in self.groups:
                        reverse = reverse_rates(predictions[row][i + 1], self.states, rates[i + 1])
                        per_row[row] = leap_rule(forward + reverse, self.states, chain.corrector_size * (t - s))
                    probs = self._apply(probs, per_row)
        return self._final(probs, times[-1])

    def _final(self, probs, time) -> np.ndarray:
        final = self.chain.final
        vocab = self.tables.vocab_size
        pad = self.num_states - vocab
        if final == "tweedie":
            scores = self.scores(np.asarray([time]))
            per_row = {}
            with jax.enable_x64(True):
                for row, score in scores.items():
                    log_score = _log(score[0]).reshape(-1, *score.shape[-2:])
                    log_mean = _process_tweedie(
                        self.tables.process, jnp.asarray(log_score), jnp.asarray(self.states),
                        jnp.asarray(time, jnp.float64),
                    )
                    mean = np.exp(np.asarray(log_mean, np.float64))
                    per_row[row] = np.concatenate([mean, np.zeros((*mean.shape[:-1], pad))], -1)
            return self._apply(probs, per_row)
        means = self.means(np.asarray([time]))
        noisy = self.states >= vocab
        per_row = {}
        for row, mean in means.items():
            padded = np.concatenate([mean[0], np.zeros((*mean.shape[1:-1], pad))], -1)
            if final == "mean":
                per_row[row] = padded
            elif final == "masked_mean":
                per_row[row] = np.where(noisy[..., None], padded, _onehot(self.states, self.num_states))
            elif final == "sequential":
                per_row[row] = padded
            else:
                raise DdiffError(f"unknown reverse chain final draw {final!r}")
        if final != "sequential":
            return self._apply(probs, per_row)
        kernels = {row: self._sequential_kernel(draw) for row, draw in per_row.items()}
        for _ in range(self.states.shape[1]):
            out = np.empty_like(probs)
            for row, members in self.groups.items():
                out[members] = probs[members] @ kernels[row]
            probs = _project(out, self.projection)
        return probs

    def _sequential_kernel(self, draw) -> np.ndarray:
        """One noisy position, chosen uniformly, drawn from ``draw`` (N, D, S); a sequence
        without noisy positions stays."""
        states, size = self.states, self.num_states
        count, seq_len = states.shape
        noisy = states >= self.tables.vocab_size
        masked = noisy.sum(1)
        powers = _powers(size, seq_len)
        base = states @ powers
        kernel = np.zeros((count, count))
        kernel[masked == 0, np.flatnonzero(masked == 0)] = 1.0
        for n in range(seq_len):
            for y in range(size):
                target = base + (y - states[:, n]) * powers[n]
                weight = np.where(noisy[:, n], draw[:, n, y] / np.maximum(masked, 1), 0.0)
                np.add.at(kernel, (np.arange(count), target), weight)
        return kernel

    def _generator_over_l(self, score, rates_t, hazard) -> np.ndarray:
        """The reverse generator at one time divided by the masking hazard h_t (the rate
        per unit of l = -log(1 - alpha)): off the diagonal R_t(y -> x^n) s[n, y] / h_t."""
        states, size = self.states, self.num_states
        count, seq_len = states.shape
        rates = reverse_rates(score, states, rates_t) / hazard
        powers = _powers(size, seq_len)
        base = states @ powers
        generator = np.zeros((count, count))
        for n in range(seq_len):
            for y in range(size):
                target = base + (y - states[:, n]) * powers[n]
                np.add.at(generator, (np.arange(count), target), rates[:, n, y])
        generator[np.arange(count), np.arange(count)] -= rates.sum((1, 2))
        return generator

    def continuous(self) -> np.ndarray:
        process = self.tables.process
        provided = process.capabilities()
        if not (MASKED in provided and SCALAR_SCHEDULE in provided):
            raise DdiffError(
                "the kit computes a 'continuous' reverse chain for a masked process with a "
                f"scalar schedule only, not {type(process).__name__}"
            )
        schedule = process.schedule
        ends = np.asarray(_alpha_and_derivative(schedule, jnp.asarray([1.0, 0.0]))[0], np.float64)
        start = -math.log1p(-ends[0])
        stop = -math.log1p(-ends[1]) if ends[1] < 1.0 else 40.0
        stop = min(stop, 40.0)
        steps = CONTINUOUS_STEPS
        levels = np.linspace(start, stop, 2 * steps + 1)
        targets = -np.expm1(-levels)
        times = np.array(_time_of_alpha(schedule, jnp.asarray(targets)), np.float64)
        times[0], times[-1] = 1.0, max(times[-1], 0.0)
        # Rates and hazard both vanish where alpha' does (the cosine schedule at t = 1, a
        # polynomial one at t = 0); their ratio, the rate per unit of l, does not: read
        # them a hair inside.
        inside = np.clip(times, 1e-7, 1.0 - 1e-7)
        alpha, derivative = (
            np.asarray(a, np.float64) for a in _alpha_and_derivative(schedule, jnp.asarray(inside))
        )
        hazard = -derivative / (1.0 - alpha)
        scores = self.scores(times)
        rates = self.tables.rates(inside)
        probs = self._start()
        half = levels[1] - levels[0]
        for row, members in self.groups.items():
            p = probs[members]

            def generator(j, row=row):
                return self._generator_over_l(scores[row][j], rates[j], hazard[j])

            start_generator = generator(0)
            for k in range(steps):
                middle, end = generator(2 * k + 1), generator(2 * k + 2)
                k1 = p @ start_generator
                k2 = (p + half * k1) @ middle
                k3 = (p + half * k2) @ middle
                k4 = (p + 2 * half * k3) @ end
                p = p + (2 * half / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
                start_generator = end
            probs[members] = p
        probs = _project(np.maximum(probs, 0.0), self.projection)
        return self._final(probs, 0.0)


# --------------------------------------------------------------------------- bounds per x_0


def _likelihood(marginal: np.ndarray, x0s: np.ndarray, states: np.ndarray) -> np.ndarray:
    """q_t(x | x_0) for every x_0 (K, D) and noisy sequence (N, D): shape (K, N)."""
    return np.prod(marginal[x0s[:, None, :], states[None, :, :]], axis=-1)


def _kl_rate(score, states, x0s, marginal, rates_t) -> np.ndarray:
    """L_t(x_0, x) = sum_n sum_{y != x^n} R_t(y -> x^n) [s - a + a log(a / s)],
    a = q_t(y | x_0^n) / q_t(x^n | x_0^n): shape (K, N) (0 where x cannot arise)."""
    incoming = np.moveaxis(rates_t[:, states], 0, -1)  # (N, D, S)
    current = _onehot(states, rates_t.shape[0]) > 0
    active = (~current) & (incoming > 0)
    own = marginal[x0s[:, None, :], states[None, :, :]]  # (K, N, D)
    target = marginal[x0s][:, None, :, :]  # (K, 1, D, S)
    possible = own > 0
    ratio = np.where(possible[..., None], target / np.where(possible, own, 1.0)[..., None], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_term = np.where(ratio > 0, ratio * (_log(np.where(ratio > 0, ratio, 1.0)) - _log(score)[None]), 0.0)
    terms = score[None] - ratio + log_term
    terms = np.where(active[None], incoming[None] * terms, 0.0)
    return np.where(possible.all(-1), terms.sum((-1, -2)), 0.0)


def _posterior_table(marginal_s, transition) -> np.ndarray:
    """q(x_s = j | x_t = k, x_0 = v): shape (V, S_k, S_j)."""
    joint = marginal_s[:, :, None] * transition[None, :, :]  # (V, j, k)
    total = joint.sum(1, keepdims=True)
    posterior = np.where(total > 0, joint / np.where(total > 0, total, 1.0), 0.0)
    return np.transpose(posterior, (0, 2, 1))


def _categorical_kl(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (_log(np.where(q > 0, q, 1.0)) - _log(p)), 0.0)
    return terms.sum(-1)


def _decoder_nll(log_mean, x0s, likelihood) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the variance over x ~ q(. | x_0) of -sum_n log mu(x)[n, x_0^n]:
    shape (K,) each. The variance is that of a one-draw estimate: it can be rare events
    (a position still noisy at t = 0) that a sample misses."""
    picked = np.take_along_axis(log_mean[None], x0s[:, None, :, None], axis=-1)[..., 0]  # (K, N, D)
    values = np.where(likelihood > 0, -np.where(likelihood[..., None] > 0, picked, 0.0).sum(-1), 0.0)
    mean = (likelihood * values).sum(-1)
    return mean, (likelihood * (values - mean[:, None]) ** 2).sum(-1)


def exact_bound_terms(
    form: BoundForm,
    model: DiffusionModel,
    x0s: Sequence[Sequence[int]] | np.ndarray,
    *,
    panels: int = 4,
    nodes: int = 12,
) -> dict[str, np.ndarray]:
    """The exact terms of the bound ``form`` for ``model`` at each clean sequence of
    ``x0s`` (K, D), in nats, float64: ``prior``, ``reconstruction``, ``diffusion`` and
    their sum ``nelbo`` (shape (K,) each). See :class:`ddiff.BoundForm` for the terms.

    Every noisy sequence is enumerated; a continuous-time integral uses Gauss-Legendre
    quadrature with ``nodes`` nodes on each of ``panels`` panels (geometric from
    t_start > 0). The model's prediction is its mean (read as concentration ratios where
    the bound needs scores) when its parameterization provides one, else its scores.

    Also returned, ``diffusion_variance``, ``reconstruction_variance`` and
    ``nelbo_variance``: the variances of the one-draw estimates (one time uniform in
    [t_start, 1] or one step uniform in 1..T, one noisy sequence), by the same
    enumeration. A check's standard error is at least theirs: the estimates can be
    heavy-tailed (large rates at few times), where a sample's spread underestimates them.
    """
    x0s = np.asarray(x0s, np.int64)
    seq_len = x0s.shape[1]
    with jax.enable_x64(True):
        tables = _as_process(model.process, seq_len)
        predictions = model_predictions(model)
        states = noisy_states(tables.num_states, seq_len)
        first = np.asarray([0.0, 1.0])
        start_end = tables.marginals(first)
        prior = tables.prior()
        terminal = start_end[1][x0s]  # (K, D, S)
        prior_term = _categorical_kl(terminal, np.broadcast_to(prior, terminal.shape)).sum(-1)
        if form.steps is None:
            terms = _continuous_terms(form, tables, predictions, states, x0s, panels, nodes)
        else:
            terms = _discrete_terms(form, tables, predictions, states, x0s)
    return {
        "prior": prior_term,
        "nelbo": prior_term + terms["reconstruction"] + terms["diffusion"],
        **terms,
    }


def _data_free_reconstruction(marginal: np.ndarray, x0s: np.ndarray) -> np.ndarray:
    columns = marginal.sum(0)
    own = marginal[x0s]  # (K, D, S)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(own > 0, -own * (_log(np.where(own > 0, own, 1.0)) - _log(columns)), 0.0)
    return terms.sum((-1, -2))


def _continuous_terms(form, tables, predictions, states, x0s, panels, nodes):
    times, weights = time_quadrature(form.t_start, 1.0, panels, nodes)
    marginals = tables.marginals(times)
    rates = tables.rates(times)
    scores = np.exp(predictions.log_score(tables, states, times))[:, 0]
    diffusion, second = np.zeros(len(x0s)), np.zeros(len(x0s))
    for time_index, weight in enumerate(weights):
        likelihood = _likelihood(marginals[time_index], x0s, states)
        rate = _kl_rate(scores[time_index], states, x0s, marginals[time_index], rates[time_index])
        diffusion += weight * (likelihood * rate).sum(-1)
        second += weight * (likelihood * rate**2).sum(-1)
    # The estimate is (1 - t_start) L_t at t uniform in [t_start, 1].
    spread = np.maximum((1.0 - form.t_start) * second - diffusion**2, 0.0)
    start = tables.marginals(np.asarray([form.t_start]))[0]
    if form.decoder == "data_free":
        reconstruction, decoder_spread = _data_free_reconstruction(start, x0s), np.zeros(len(x0s))
    else:
        log_mean = predictions.log_mean(tables, states, np.asarray([form.t_start]))[0, 0]
        reconstruction, decoder_spread = _decoder_nll(log_mean, x0s, _likelihood(start, x0s, states))
    return {
        "diffusion": diffusion,
        "reconstruction": reconstruction,
        "diffusion_variance": spread,
        "reconstruction_variance": decoder_spread,
        "nelbo_variance": spread + decoder_spread,
    }


def _discrete_terms(form, tables, predictions, states, x0s):
    steps = form.steps
    grid = np.arange(steps + 1) / steps
    marginals = tables.marginals(grid)
    transitions = tables.transitions(grid[:-1], grid[1:])
    log_means = predictions.log_mean(tables, states, grid[1:])[:, 0]  # (T, N, D, V)
    first = 2 if form.decoder == "model" else 1
    diffusion, second = np.zeros(len(x0s)), np.zeros(len(x0s))
    for i in range(first, steps + 1):
        marginal_s, marginal_t, transition = marginals[i - 1], marginals[i], transitions[i - 1]
        likelihood = _likelihood(marginal_t, x0s, states)
        truth = _posterior_table(marginal_s, transition)[x0s[:, None, :], states[None, :, :]]  # (K, N, D, S)
        model_step = posterior_rule(np.exp(log_means[i - 1]), states, marginal_s, transition)  # (N, D, S)
        kl = np.where(likelihood > 0, _categorical_kl(truth, model_step[None]).sum(-1), 0.0)
        diffusion += (likelihood * kl).sum(-1)
        second += (likelihood * kl**2).sum(-1)
    # Every term is estimated as T times one step's, the step drawn with probability 1/T.
    if form.decoder == "model":
        mean, spread = _decoder_nll(log_means[0], x0s, _likelihood(marginals[1], x0s, states))
        decoder_second = spread + mean**2
        reconstruction = mean
    else:
        reconstruction = _data_free_reconstruction(marginals[0], x0s)
        mean, decoder_second = np.zeros(len(x0s)), np.zeros(len(x0s))
    return {
        "diffusion": diffusion,
        "reconstruction": reconstruction,
        "diffusion_variance": np.maximum(steps * second - diffusion**2, 0.0),
        "reconstruction_variance": np.maximum(steps * decoder_second - mean**2, 0.0),
        "nelbo_variance": np.maximum(steps * (second + decoder_second) - (diffusion + mean) ** 2, 0.0),
    }


def tweedie_problem(
    process: AbstractForwardProcess,
    distribution: ToyDistribution,
    times: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    *,
    tolerance: float = 1e-5,
) -> str | None:
    """Why the process's Tweedie denoiser (``log_mean_from_score``) is not the inverse of
    the concentration ratios, or None: for the exact posterior means mu of
    ``distribution`` at every noisy sequence and each of ``times``, the denoiser applied
    to the ratios s = :func:`score_from_mean` (mu) must give mu back (within
    ``tolerance``, float64) at every noisy sequence of positive probability. For exact
    scores Tweedie's formula is determined (Lou et al.
    2024, Thm. 4.2); only there does the kit check the denoiser, which a score sampler's
    final draw uses. Several times, because near t = 0 the exact mean is nearly one-hot
    on x_t and hides most mistakes."""
    with jax.enable_x64(True):
        tables = _as_process(process, distribution.seq_len)
        states = noisy_states(tables.num_states, distribution.seq_len)
        times = np.asarray(times, np.float64)
        log_means, possible = _exact_posterior(distribution, tables, states, times, [None])
        marginals = tables.marginals(times)
        for time, log_mean, reached, marginal in zip(times, log_means[:, 0], possible[:, 0], marginals, strict=True):
            score = score_from_mean(log_mean, states, marginal)
            back = np.asarray(
                _process_tweedie(
                    tables.process, jnp.asarray(_log(score)), jnp.asarray(states),
                    jnp.asarray(time, jnp.float64),
                ),
                np.float64,
            )
            error = np.where(reached[:, None, None], np.abs(np.exp(back) - np.exp(log_mean)), 0.0)
            if not error.max() <= tolerance:
                worst = np.unravel_index(np.argmax(error), error.shape)
                return (
                    f"the process's Tweedie denoiser does not invert the concentration ratios "
                    f"of the exact mean at t = {time:g}: at x_t = "
                    f"{tuple(int(v) for v in states[worst[0]])}, position {worst[1]}, value "
                    f"{worst[2]} it gives {np.exp(back[worst]):.5f} for {np.exp(log_mean[worst]):.5f}"
                )
    return None


def exact_target(distribution: ToyDistribution, combos: Combos) -> np.ndarray:
    """p(x | c, x_F = given values) for each conditioning combination: shape (C, V^D)."""
    sequences = np.asarray(distribution.sequences())
    out = []
    for index in range(combos.count):
        label = None if combos.labels is None else int(combos.labels[index])
        probs = distribution.probabilities(label)
        mask = combos.fixed_mask[index]
        agree = np.all((sequences == combos.fixed_tokens[index]) | ~mask, axis=1)
        probs = np.where(agree, probs, 0.0)
        out.append(probs / probs.sum())
    return np.stack(out)
