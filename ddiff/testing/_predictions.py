"""Predictions on every noisy sequence of a toy: a model's, or the exact denoiser's.

A reference evaluates a model's log mean (or log scores, for a parameterization without a
mean) at every noisy sequence of the toy (S^D of them), per label row, in float64; the
exact denoiser's means p(x_0^n = v | x_t) come from enumerating the toy. Where a step
reads scores, a mean is read as its concentration ratios (Lou et al. 2024),

    s[n, y] = sum_v mu[n, v] q_t(y | v) / q_t(x^n | v).

Guidance and the nucleus are written here again in numpy, so that a reference never runs
a sampler's code.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._capabilities import MEAN
from ddiff._model import DiffusionModel
from ddiff._process import AbstractForwardProcess
from ddiff.testing._process_tables import (
    _as_process,
    _float64,
    _in_chunks,
    _log,
    _Process,
    noisy_states,
)
from ddiff.testing._toy import ToyDistribution


@eqx.filter_jit
def _model_predictions(model, states, labels, score, times):
    predict = model.log_score if score else model.log_mean

    def at(t, label):
        return jax.vmap(lambda x: predict(x, t, label=label))(states)

    if labels is None:
        return jax.vmap(lambda t: at(t, None))(times)[:, None]
    return jax.vmap(lambda t: jax.vmap(lambda label: at(t, label))(labels))(times)


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
        return _in_chunks(
            _model_predictions, (_float64(self.model), jnp.asarray(states), labels, score), times
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
            return _log(ratios_over_times(means, states, tables.marginals(times)))
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
    mean = restrict(np.exp(log_mean), current > 0)
    weights = np.where(current > 0, mean / np.where(current > 0, current, 1.0), 0.0)
    return weights @ marginal


def ratios_over_times(log_means: np.ndarray, states: np.ndarray, marginals: np.ndarray) -> np.ndarray:
    """:func:`score_from_mean` at each time: log means (times, ..., N, D, V) and marginals
    (times, V, S) give ratios (times, ..., N, D, S)."""
    return np.stack([score_from_mean(m, states, q) for m, q in zip(log_means, marginals, strict=True)])


def restrict(mean: np.ndarray, possible: np.ndarray) -> np.ndarray:
    """The probabilities ``mean`` restricted to the ``possible`` values and renormalised,
    uniform over them where ``mean`` gives them no mass."""
    mean = np.where(possible, mean, 0.0)
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
            back = tables.tweedie(_log(score), states, time)
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
