"""The ForwardProcess protocol and its capability mixins (transitions, rates)."""

import abc

import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Float

from ddiff._capabilities import FACTORIZED, RATES, TRANSITIONS, Capable
from ddiff._categorical import categorical
from ddiff._schedule import AbstractSchedule
from ddiff._typing import AbstractCheckedModule, Key, Scalar, StateProbs, Time, Tokens


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

    def exit_rates(self, x: Tokens, t: Time) -> Float[Array, " seq"]:
        """Total rate of leaving the current state, per position."""
        rates = self.forward_rates(x, t)
        return -jnp.take_along_axis(rates, x[:, None], axis=-1)[:, 0]


