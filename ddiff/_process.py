"""The ForwardProcess protocol and its capability mixins (transitions, rates)."""

import abc

import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float

from ddiff._capabilities import FACTORIZED, RATES, TRANSITIONS, Capable
from ddiff._categorical import categorical
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
        """The prior p(x_1) of one position, which the reverse process starts from."""

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
        return jnp.where(score > 0, jnp.log(jnp.where(score > 0, score, 1.0)), -jnp.inf)

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
        return jnp.where(mean > 0, jnp.log(jnp.where(mean > 0, mean, 1.0)), -jnp.inf)

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

    def posterior_probs(self, x_t: Tokens, probs_0: StateProbs, s: Time, t: Time) -> StateProbs:
        """q(x_s | x_t, x_0) averaged over x_0 ~ probs_0 as D3PM does for its
        x0-parameterization: proportional to q(x_t | x_s) * sum_x0 p(x0) q(x_s | x_0)."""
        unnormalized = self.transition_likelihood(x_t, s, t) * self.propagate(
            probs_0, jnp.zeros(()), s
        )
        return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


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


