"""The ForwardProcess protocol and its capability mixins (transitions, rates)."""

import abc

import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float

from ddiff._capabilities import FACTORIZED, RATES, TRANSITIONS, Capable
from ddiff._categorical import categorical
from ddiff._numerics import log_normalize, log_sum_exp, safe_log
from ddiff._schedule import AbstractSchedule
from ddiff._typing import (
    AbstractCheckedModule,
    Key,
    LogProbs,
    Scalar,
    StateLogProbs,
    StateProbs,
    Time,
    Tokens,
)


def possible_mean(
    log_mean: Float[Array, "seq vocab"], possible: Bool[Array, "seq vocab"]
) -> Float[Array, "seq vocab"]:
    """mu restricted to the clean values that ``possible`` allows, renormalised per
    position (uniform over them where mu gives them no mass)."""
    mean = jnp.where(possible, jnp.exp(log_mean), 0.0)
    total = jnp.sum(mean, axis=-1, keepdims=True)
    fallback = possible / jnp.maximum(jnp.sum(possible, axis=-1, keepdims=True), 1)
    return jnp.where(total > 0, mean / jnp.where(total > 0, total, 1.0), fallback)


class AbstractForwardProcess(AbstractCheckedModule, Capable):
    """A forward (noising) process over sequences of tokens, factorized over positions.

    Clean tokens take values 0..V-1 (``vocab_size``); noisy tokens take values
    0..S-1 (``num_states``), e.g. S = V+1 with the mask at index V for masked processes.
    The process owns its schedule, so a learnable schedule trains with the model.
    """

    provides = frozenset({FACTORIZED})

    vocab_size: AbstractVar[int]
    schedule: AbstractVar[AbstractSchedule]

    @property
    @abc.abstractmethod
    def num_states(self) -> int:
        """Number of values a noisy token can take."""

    @abc.abstractmethod
    def marginal_probs(self, x0: Tokens, t: Time) -> StateProbs:
        """q(x_t | x_0), per position.

        Arguments:
            x0: clean tokens, shape (seq,).
            t: time in [0, 1].

        Returns:
            Probabilities over the states, shape (seq, states).
        """

    @abc.abstractmethod
    def prior_probs(self) -> Float[Array, " states"]:
        """The prior p(x_1) of one position: the bound's prior term, and where samplers
        start (a masked process's samplers start from all-mask instead,
        :func:`ddiff.initial_tokens`)."""

    def sample_marginal(self, x0: Tokens, t: Time, *, key: Key) -> Tokens:
        """Draw x_t ~ q(x_t | x_0)."""
        return categorical(key, jnp.log(self.marginal_probs(x0, t)))

    def sample_prior(self, seq_len: int, *, key: Key) -> Tokens:
        """Draw x_1 ~ p(x_1), independently per position."""
        log_prior = jnp.broadcast_to(jnp.log(self.prior_probs()), (seq_len, self.num_states))
        return categorical(key, log_prior)

    def log_score_from_mean(self, log_mean: LogProbs, x_t: Tokens, t: Time) -> StateLogProbs:
        """The concentration ratios of the factorized posterior whose clean-token marginals
        are mu (Lou et al. 2024, sec. 3; exact when mu is the true denoiser):

            s[n, y] = sum_v mu[n, v] q_t(y | v) / q_t(x_t^n | v).

        The default enumerates q_t over every clean value (O(V S) per position, small
        vocabularies only); processes override it with a closed form.

        Arguments:
            log_mean: log mu, shape (seq, vocab).
            x_t: the noisy tokens.
            t: the time.

        Only clean values v that can produce x_t^n (q_t(x_t^n | v) > 0) enter the sum, with
        mu renormalised over them (:func:`possible_mean`), so s[n, x_t^n] = 1. Where every
        value can produce x_t^n the ratio is exact for the true mu; elsewhere (a clean
        token of the absorbing process) the values left out are those whose reverse rate
        R_t(y -> x_t^n) s[n, y] vanishes anyway.

        Returns:
            log s, shape (seq, states); 0 at y = x_t^n, -inf where the ratio is 0.
        """
        table = self.marginal_probs(jnp.arange(self.vocab_size), t)  # q_t(y | v), (vocab, states)
        current = jnp.take(table, x_t, axis=1).T  # q_t(x_t^n | v), (seq, vocab)
        possible = current > 0
        mean = possible_mean(log_mean, possible)
        score = jnp.where(possible, mean / jnp.where(possible, current, 1.0), 0.0) @ table
        return safe_log(score)

    def log_marginal_from_mean(self, log_mean: LogProbs, t: Time) -> StateLogProbs:
        """The marginal of x_t when x_0 is drawn from mu, in log space:

            log q_t(y | mu)[n] = log sum_v mu[n, v] q_t(y | v),

        D3PM's x0-parameterization pushing the predicted x_0 through the forward process
        (Austin et al. 2021, eq. 4); with mu one-hot at x_0 it is log q(x_t | x_0). The map
        is linear, so mu may be any non-negative weights (they need not sum to one).
        Values mu gives no mass (-inf) and states no value reaches give -inf; nothing is
        padded.

        The default enumerates q_t over every clean value (O(V S) per position, small
        vocabularies only); processes override it with a closed form.

        Arguments:
            log_mean: log mu (or log weights), shape (seq, vocab); -inf entries allowed.
            t: the time.

        Returns:
            log q_t(y | mu), shape (seq, states).
        """
        table = self.marginal_probs(jnp.arange(self.vocab_size), t)  # q_t(y | v), (vocab, states)
        terms = log_mean[:, :, None] + safe_log(table)[None]
        return log_sum_exp(terms, axis=1)[:, 0]

    def log_marginal_likelihood(self, x_t: Tokens, t: Time) -> LogProbs:
        """log q_t(x_t^n | x_0^n = v) for every clean value v, per position: how well each
        value explains the noisy token (the column of q_t that ``marginal_probs`` gives a
        row of). Bayes' rule with it turns a denoiser into posteriors, as in D3PM's
        x0-parameterization.

        The default enumerates q_t over every clean value (O(V S) per position, small
        vocabularies only); processes override it with a closed form.

        Arguments:
            x_t: the noisy tokens.
            t: the time.

        Returns:
            Shape (seq, vocab); -inf for a value that cannot produce x_t^n.
        """
        table = self.marginal_probs(jnp.arange(self.vocab_size), t)  # q_t(y | v), (vocab, states)
        column = jnp.take(table, x_t, axis=1).T  # (seq, vocab)
        return safe_log(column)

    def log_mean_from_score(self, log_score: StateLogProbs, x_t: Tokens, t: Time) -> LogProbs:
        """The clean-value marginals whose concentration ratios are s: the inverse of
        :meth:`log_score_from_mean` (Tweedie's formula for a factorized process, Lou et al.
        2024 Thm. 4.2; SEDD's final denoising step). With w = (Q_t^T)^+ s, where
        Q_t[v, y] = q_t(y | v),

            mu[n, v] proportional to max(w[n, v], 0) q_t(x_t^n | v),

        exact for the exact score; a model's scores may give negative weights, which are
        clipped (uniform over the values that can produce x_t^n where none is left). The
        default solves with the pseudo-inverse of the dense (vocab, states) table (small
        vocabularies only); processes override it with a closed form.

        Arguments:
            log_score: log s, shape (seq, states).
            x_t: the noisy tokens.
            t: the time.

        Returns:
            log mu, shape (seq, vocab).
        """
        table = self.marginal_probs(jnp.arange(self.vocab_size), t)  # (vocab, states)
        weights = jnp.exp(log_score) @ jnp.linalg.pinv(table)  # (seq, vocab)
        current = jnp.take(table, x_t, axis=1).T  # q_t(x_t^n | v)
        mean = possible_mean(jnp.log(jnp.maximum(weights, 0.0) * current), current > 0)
        return safe_log(mean)

    def reconstruction_nll(self, x0: Tokens) -> Scalar:
        """The reconstruction term of a continuous-time bound whose time 0 still carries
        noise (alpha_0 < 1), in nats: sum_n E_{z ~ q_0(. | x_0^n)}[-log d(x_0^n | z)] for
        the data-free decoder d(v | z) = q_0(z | v) / sum_u q_0(z | u), the posterior of
        the noise at t = 0 under uniform data. With the exact reverse process the bound's
        slack at t = 0 is E KL(p(x_0 | z) || d) <= this term. The default builds the dense
        (vocab, states) table (small vocabularies only); processes override it with a
        closed form.
        """
        table = self.marginal_probs(jnp.arange(self.vocab_size), jnp.zeros(()))
        columns = jnp.sum(table, axis=0)
        q = table[x0]  # (seq, states)
        log_decoder = jnp.log(jnp.where(q > 0, q, 1.0)) - jnp.log(jnp.where(q > 0, columns, 1.0))
        return -jnp.sum(jnp.where(q > 0, q * log_decoder, 0.0))

    def prior_kl(self, x0: Tokens) -> Scalar:
        """KL(q(x_1 | x_0) || p(x_1)) summed over positions, in nats (the prior term)."""
        q = self.marginal_probs(x0, jnp.ones(()))
        log_ratio = jnp.log(jnp.where(q > 0, q, 1.0)) - jnp.log(self.prior_probs())
        return jnp.sum(jnp.where(q > 0, q * log_ratio, 0.0))


class AbstractTransitionProcess(AbstractForwardProcess):
    """A process with discrete-time transitions q(x_t | x_s), s < t (D3PM)."""

    provides = frozenset({FACTORIZED, TRANSITIONS})

    @abc.abstractmethod
    def transition_probs(self, x_s: Tokens, s: Time, t: Time) -> StateProbs:
        """q(x_t | x_s) for the given x_s, per position (a row of Q_{s->t})."""

    @abc.abstractmethod
    def transition_likelihood(self, x_t: Tokens, s: Time, t: Time) -> StateProbs:
        """q(x_t | x_s = j) for every state j, per position (a column of Q_{s->t})."""

    @abc.abstractmethod
    def propagate(self, probs_s: StateProbs, s: Time, t: Time) -> StateProbs:
        """Push a distribution over x_s through the transition: sum_j p(j) q(x_t | x_s=j)."""

    def unpropagate(self, values: StateProbs, s: Time, t: Time) -> StateProbs:
        """Undo :meth:`propagate`: values Q_{s->t}^{-1} per position (row vectors over the
        states). Applied to the scores at t it gives SEDD's "staggered score"
        p_s(y) / p_t(x) = sum_z Q_{s->t}^{-1}[z, y] s[z] of the analytic (Tweedie
        tau-leaping) step (Lou et al. 2024, Thm. 4.2). The default solves with the dense
        (states, states) matrix (small state spaces only); processes override it with a
        closed form."""
        matrix = self.transition_probs(jnp.arange(self.num_states), s, t)
        return jnp.linalg.solve(matrix.T, values.T).T

    def log_posterior(self, x_t: Tokens, x0: Tokens, s: Time, t: Time) -> StateLogProbs:
        """log q(x_s | x_t, x_0), proportional to q(x_t | x_s) q(x_s | x_0) (D3PM eq. 3),
        per position. The default takes logarithms of ``transition_likelihood`` and
        ``marginal_probs``; a process whose probabilities can underflow float32 computes
        it from logarithms instead.

        Arguments:
            x_t: the noisy tokens at time t.
            x0: the clean tokens.
            s: the earlier time, s < t.
            t: the time of x_t.

        Returns:
            Shape (seq, states), normalised over states.
        """
        joint = self.transition_likelihood(x_t, s, t) * self.marginal_probs(x0, s)
        return log_normalize(safe_log(joint))

    def log_posterior_from_mean(
        self, x_t: Tokens, log_mean: LogProbs, s: Time, t: Time
    ) -> StateLogProbs:
        """log p(x_s | x_t) when x_0 ~ mu is pushed through the true posterior, D3PM's
        x0-parameterization of the reverse step (Austin et al. 2021, sec. 3.3):

            p(x_s = j | x_t) = sum_v mu[v] q(x_s = j | x_t, x_0 = v)
                             = q(x_t | x_s = j) sum_v [mu[v] / q_t(x_t | v)] q_s(j | v).

        With the exact denoiser mu it is the exact reverse step of each position; with mu
        one-hot at x_0 it is q(x_s | x_t, x_0). The default weights the values by
        mu[v] / q_t(x_t | v) (:meth:`log_marginal_likelihood`), pushes the weights to time s
        (:meth:`log_marginal_from_mean`), multiplies by q(x_t | x_s)
        (``transition_likelihood``, read in probability space) and normalises in log
        space; a process whose transition probabilities can underflow float32 (the
        discretized Gaussian) overrides it. A position whose x_t no value mu allows can
        produce gets -inf throughout.

        Arguments:
            x_t: the noisy tokens at time t.
            log_mean: log mu, shape (seq, vocab).
            s: the earlier time, s < t.
            t: the time of x_t.

        Returns:
            log p(x_s | x_t), shape (seq, states), normalised over states.
        """
        likelihood = self.log_marginal_likelihood(x_t, t)
        possible = likelihood > -jnp.inf
        weights = jnp.where(possible, log_mean - jnp.where(possible, likelihood, 0.0), -jnp.inf)
        log_step = safe_log(self.transition_likelihood(x_t, s, t))
        return log_normalize(log_step + self.log_marginal_from_mean(weights, s))


class AbstractRateProcess(AbstractForwardProcess):
    """A continuous-time Markov chain with per-position forward rates (Campbell et al.)."""

    provides = frozenset({FACTORIZED, RATES})

    @abc.abstractmethod
    def forward_rates(self, x: Tokens, t: Time) -> StateProbs:
        """R_t(x^n -> j) for every state j, per position; the entry at j = x^n is minus
        the total rate of leaving x^n, so each row sums to zero."""

    def incoming_rates(self, x: Tokens, t: Time) -> StateProbs:
        """R_t(y -> x^n) for every state y, per position: the rates into the current state
        (the entry at y = x^n is R_t(x^n -> x^n), minus the exit rate). The default builds
        the rates out of every state (O(S^2) per position); processes override it with a
        closed form."""
        states = jnp.arange(self.num_states)
        from_state = jax.vmap(lambda y: self.forward_rates(jnp.full(x.shape, y), t))(states)
        return jnp.take_along_axis(from_state, x[None, :, None], axis=-1)[..., 0].T

    def exit_rates(self, x: Tokens, t: Time) -> Float[Array, " seq"]:
        """Total rate of leaving the current state, per position."""
        rates = self.forward_rates(x, t)
        return -jnp.take_along_axis(rates, x[:, None], axis=-1)[:, 0]

    def state_exit_rates(self, t: Time) -> Float[Array, " states"]:
        """Total rate of leaving each state, -R_t(y -> y) for every state y (the exit
        rates of every neighbour of a sequence: Campbell et al.'s estimator weighs the
        states a jump could have come from). The default reads the diagonal of the rates
        out of every state (O(S^2)); processes override it with a closed form."""
        states = jnp.arange(self.num_states)
        return -jax.vmap(lambda y: self.forward_rates(y[None], t)[0, y])(states)
