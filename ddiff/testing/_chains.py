"""Chain laws: the exact law of the output of a sampler's declared chain, in float64.

A :class:`ddiff.ReverseChain` is simulated exactly by pushing the distribution over every
noisy sequence of the toy through its steps: each step is a product over positions of a
one-position rule (every sampler rule of :class:`ddiff.ReverseChain`, written here again
in numpy), the given positions of each conditioning set again after it; a ``continuous``
chain is integrated by fourth-order Runge-Kutta in l = -log(1 - alpha_t). The predictions
come from :mod:`ddiff.testing._predictions`, the process's primitives from
:mod:`ddiff.testing._process_tables`; a reference never runs a sampler's code.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._capabilities import MASKED, SCALAR_SCHEDULE
from ddiff._errors import DdiffError
from ddiff._process import AbstractForwardProcess
from ddiff._sampler import ReverseChain
from ddiff.testing._predictions import (
    _Predictions,
    guide_mean,
    guide_score,
    nucleus,
    ratios_over_times,
    restrict,
)
from ddiff.testing._process_tables import (
    _as_process,
    _log,
    _onehot,
    _powers,
    _Process,
    noisy_states,
)
from ddiff.testing._toy import ToyDistribution

CONTINUOUS_STEPS = 256
"""Runge-Kutta steps of the ``continuous`` chain, uniform in l = -log(1 - alpha_t)."""


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


# --------------------------------------------------------------------------- one-position rules


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
    weights = np.where(possible, restrict(mean, possible) / np.where(possible, current, 1.0), 0.0)
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
        return {
            row: ratios_over_times(_log(mean), self.states, marginals)
            for row, mean in self.means(times).items()
        }

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

    def _push(self, probs, kernels) -> np.ndarray:
        """One step: each label row's combinations through its kernel (N, N), the given
        positions set again."""
        out = np.empty_like(probs)
        for row, members in self.groups.items():
            out[members] = probs[members] @ kernels[row]
        return _project(out, self.projection)

    def _apply(self, probs, per_row_position_probs) -> np.ndarray:
        """One step whose kernel is a product over positions (:func:`_kernel`)."""
        return self._push(probs, {row: _kernel(p) for row, p in per_row_position_probs.items()})

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
            for row, score in scores.items():
                log_score = _log(score[0]).reshape(-1, *score.shape[-2:])
                mean = np.exp(self.tables.tweedie(log_score, self.states, time))
                per_row[row] = np.concatenate([mean, np.zeros((*mean.shape[:-1], pad))], -1)
            return self._apply(probs, per_row)
        means = self.means(np.asarray([time]))
        noisy = self.states >= vocab
        per_row = {}
        for row, mean in means.items():
            padded = np.concatenate([mean[0], np.zeros((*mean.shape[1:-1], pad))], -1)
            if final in ("mean", "sequential"):
                per_row[row] = padded
            elif final == "masked_mean":
                per_row[row] = np.where(noisy[..., None], padded, _onehot(self.states, self.num_states))
            else:
                raise DdiffError(f"unknown reverse chain final draw {final!r}")
        if final != "sequential":
            return self._apply(probs, per_row)
        kernels = {row: self._sequential_kernel(draw) for row, draw in per_row.items()}
        for _ in range(self.states.shape[1]):
            probs = self._push(probs, kernels)
        return probs

    def _sequential_kernel(self, draw) -> np.ndarray:
        """One noisy position, chosen uniformly, drawn from ``draw`` (N, D, S); a sequence
        without noisy positions stays."""
        noisy = self.states >= self.tables.vocab_size
        masked = noisy.sum(1)
        weights = np.where(noisy[..., None], draw / np.maximum(masked, 1)[:, None, None], 0.0)
        kernel = self._one_position_moves(weights)
        kernel[masked == 0, np.flatnonzero(masked == 0)] = 1.0
        return kernel

    def _generator_over_l(self, score, rates_t, hazard) -> np.ndarray:
        """The reverse generator at one time divided by the masking hazard h_t (the rate
        per unit of l = -log(1 - alpha)): off the diagonal R_t(y -> x^n) s[n, y] / h_t."""
        rates = reverse_rates(score, self.states, rates_t) / hazard
        generator = self._one_position_moves(rates)
        count = len(self.states)
        generator[np.arange(count), np.arange(count)] -= rates.sum((1, 2))
        return generator

    def _one_position_moves(self, weights) -> np.ndarray:
        """M[x, x'] = the sum of ``weights`` (N, D, S) [x, n, y] over the (n, y) that set
        position n of x to y and give x' (y = x^n gives x itself)."""
        states = self.states
        count, seq_len = states.shape
        powers = _powers(self.num_states, seq_len)
        base = states @ powers
        moves = np.zeros((count, count))
        for n in range(seq_len):
            for y in range(self.num_states):
                np.add.at(moves, (np.arange(count), base + (y - states[:, n]) * powers[n]), weights[:, n, y])
        return moves

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
