"""The uniform forward process, q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t)/V."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps


class UniformProcess(ddiff.AbstractTransitionProcess, ddiff.AbstractRateProcess):
    """The uniform process: q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t)/V,
    independently per position, with the uniform prior over the V values.

    Transitions from s to t resample with probability 1 - r, r = alpha_t / alpha_s:
    Q_{s->t} = r I + (1 - r) 11^T / V (D3PM's uniform matrices, Austin et al. 2021 eq. 9).
    In continuous time the rates are R_t = beta_t (11^T / V - I) with
    beta_t = -alpha'_t / alpha_t (SEDD's uniform graph, Lou et al. 2024, scaled so that
    alpha_t = exp(-sigma_bar(t))). Everything is O(V) per position.
    """

    schedule: ddiff.AbstractSchedule
    vocab_size: int = eqx.field(static=True)

    def __check_init__(self):
        if caps.SCALAR not in self.schedule.capabilities():
            raise ddiff.RecipeError(
                f"the uniform process needs a scalar schedule, got "
                f"{type(self.schedule).__name__}",
                path="schedule",
            )
        if self.vocab_size < 2:
            raise ddiff.RecipeError(
                f"the uniform process needs at least 2 token values, got {self.vocab_size}"
            )

    @property
    def num_states(self) -> int:
        return self.vocab_size

    def capabilities(self):
        return frozenset({caps.FACTORIZED, caps.TRANSITIONS, caps.RATES, caps.SCALAR_SCHEDULE})

    def _mix(self, x, keep):
        """keep onehot(x) + (1 - keep) / V, per position."""
        return keep * jax.nn.one_hot(x, self.vocab_size) + (1.0 - keep) / self.vocab_size

    def marginal_probs(self, x0: ddiff.Tokens, t: ddiff.Time) -> ddiff.StateProbs:
        return self._mix(x0, self.schedule.alpha(t))

    def sample_marginal(self, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key) -> ddiff.Tokens:
        keep_key, value_key = jax.random.split(key)
        keep = jax.random.uniform(keep_key, x0.shape) < self.schedule.alpha(t)
        fresh = jax.random.randint(value_key, x0.shape, 0, self.vocab_size)
        return jnp.where(keep, x0, fresh)

    def prior_probs(self) -> Float[Array, " states"]:
        return jnp.full((self.vocab_size,), 1.0 / self.vocab_size)

    def sample_prior(self, seq_len: int, *, key: ddiff.Key) -> ddiff.Tokens:
        return jax.random.randint(key, (seq_len,), 0, self.vocab_size)

    def _ratio(self, s, t):
        return self.schedule.alpha(t) / self.schedule.alpha(s)

    def transition_probs(self, x_s: ddiff.Tokens, s: ddiff.Time, t: ddiff.Time) -> ddiff.StateProbs:
        return self._mix(x_s, self._ratio(s, t))

    def transition_likelihood(
        self, x_t: ddiff.Tokens, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        # Q_{s->t} is symmetric: the column of x_t is its row.
        return self._mix(x_t, self._ratio(s, t))

    def propagate(
        self, probs_s: ddiff.StateProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        r = self._ratio(s, t)
        return r * probs_s + (1.0 - r) * jnp.sum(probs_s, axis=-1, keepdims=True) / self.vocab_size

    def _beta(self, t):
        return -self.schedule.alpha_derivative(t) / self.schedule.alpha(t)

    def forward_rates(self, x: ddiff.Tokens, t: ddiff.Time) -> ddiff.StateProbs:
        beta = self._beta(t)
        return beta * (1.0 / self.vocab_size - jax.nn.one_hot(x, self.vocab_size))

    def state_exit_rates(self, t: ddiff.Time) -> Float[Array, " states"]:
        """Every value is resampled at rate beta_t and leaves with (V - 1)/V of it."""
        rate = self._beta(t) * (self.vocab_size - 1) / self.vocab_size
        return jnp.full((self.vocab_size,), rate)

    def incoming_rates(self, x: ddiff.Tokens, t: ddiff.Time) -> ddiff.StateProbs:
        # R_t is symmetric: the rates into x^n equal the rates out of it.
        return self.forward_rates(x, t)

    def log_marginal_from_mean(
        self, log_mean: ddiff.LogProbs, t: ddiff.Time
    ) -> ddiff.StateLogProbs:
        """Closed form, O(V) per position: q_t(y | mu) = alpha_t mu[y] + (1 - alpha_t)/V
        sum_v mu[v], computed as a log-sum of the two terms."""
        a = self.schedule.alpha(t)
        log_fresh = jnp.where(a < 1, jnp.log1p(-jnp.where(a < 1, a, 0.0)), -jnp.inf) - jnp.log(
            self.vocab_size
        )
        log_fresh = log_fresh + ddiff.log_sum_exp(log_mean)
        kept = log_mean + ddiff.safe_log(a)
        # logaddexp(-inf, -inf) has a NaN gradient: guard it.
        empty = (kept == -jnp.inf) & (log_fresh == -jnp.inf)
        mixed = jnp.logaddexp(jnp.where(empty, 0.0, kept), jnp.where(empty, 0.0, log_fresh))
        return jnp.where(empty, -jnp.inf, mixed)

    def log_marginal_likelihood(self, x_t: ddiff.Tokens, t: ddiff.Time) -> ddiff.LogProbs:
        """Closed form: q_t(x_t | v) = alpha_t [v = x_t] + (1 - alpha_t)/V."""
        return ddiff.safe_log(self._mix(x_t, self.schedule.alpha(t)))

    def log_score_from_mean(
        self, log_mean: ddiff.LogProbs, x_t: ddiff.Tokens, t: ddiff.Time
    ) -> ddiff.StateLogProbs:
        """Closed form of sum_v mu[v] q_t(y | v) / q_t(x | v) with q_t(y | v) =
        a [y = v] + b, a = alpha_t, b = (1 - alpha_t)/V: for y != x,
        s[y] = 1 + mu[y] a / b - mu[x] a / (a + b), and s[x] = 1."""
        a = self.schedule.alpha(t)
        b = (1.0 - a) / self.vocab_size
        mean = jnp.exp(log_mean)
        current = jnp.take_along_axis(mean, x_t[:, None], axis=-1)
        score = 1.0 + mean * (a / b) - current * (a / (a + b))
        log_score = jnp.log(jnp.maximum(score, jnp.finfo(score.dtype).tiny))
        return jnp.where(jax.nn.one_hot(x_t, self.vocab_size, dtype=bool), 0.0, log_score)


    def log_mean_from_score(
        self, log_score: ddiff.StateLogProbs, x_t: ddiff.Tokens, t: ddiff.Time
    ) -> ddiff.LogProbs:
        """Closed form (the inverse of :meth:`log_score_from_mean`): with a = alpha_t and
        b = (1 - a)/V, s[y] = a w[y] + b sum(w) for w[v] = mu[v] / q_t(x | v), so
        w = (s - b sum(s)) / a (SEDD's staggered score to t = 0) and
        mu[v] proportional to max(w[v], 0) (a [v = x] + b)."""
        a = self.schedule.alpha(t)
        b = (1.0 - a) / self.vocab_size
        score = jnp.exp(log_score)
        weights = jnp.maximum(score - b * jnp.sum(score, axis=-1, keepdims=True), 0.0) / a
        likelihood = self._mix(x_t, a)
        mean = ddiff.possible_mean(jnp.log(weights * likelihood), likelihood > 0)
        return ddiff.safe_log(mean)

    def unpropagate(
        self, values: ddiff.StateProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        """Closed form: Q_{s->t}^{-1} = (1/r) I - ((1 - r)/r) 11^T/V with r = alpha_t/alpha_s,
        the uniform transition with the times exchanged."""
        return self.propagate(values, t, s)

    def reconstruction_nll(self, x0: ddiff.Tokens) -> ddiff.Scalar:
        """Closed form: Q_0 is doubly stochastic, so d(v | z) = q_0(z | v) and the term is
        D times the entropy of a row, -(a + b) log(a + b) - (V - 1) b log b with
        a = alpha_0, b = (1 - a)/V."""
        a = self.schedule.alpha(jnp.zeros(()))
        b = (1.0 - a) / self.vocab_size
        noise = jnp.where(b > 0, b * jnp.log(jnp.where(b > 0, b, 1.0)), 0.0)
        return -x0.shape[0] * ((a + b) * jnp.log(a + b) + (self.vocab_size - 1) * noise)
