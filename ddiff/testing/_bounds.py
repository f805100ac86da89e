"""Bounds per x_0: the exact terms of an objective's declared bound for any model.

For a :class:`ddiff.BoundForm` and a model, the prior, reconstruction and diffusion terms
at each clean sequence x_0, in float64, with every noisy sequence of the toy enumerated:
in continuous time the KL rate between the reverse chain given x_0 and the model's,
integrated over t by Gauss-Legendre quadrature; in discrete time the sum over the grid of
the KL between the true posterior step and the model's (the ``posterior`` rule of
:mod:`ddiff.testing._chains`). A reference never runs an objective's code.
"""

from collections.abc import Sequence

import jax
import numpy as np

from ddiff._model import DiffusionModel
from ddiff._objective import BoundForm
from ddiff.testing._chains import posterior_rule
from ddiff.testing._exact import time_quadrature
from ddiff.testing._predictions import model_predictions
from ddiff.testing._process_tables import _as_process, _log, _onehot, noisy_states


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
