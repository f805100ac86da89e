"""The masked (absorbing) forward process, q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) onehot(m) (MD4 eq. 1)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps


class MaskedProcess(ddiff.AbstractTransitionProcess, ddiff.AbstractRateProcess):
    """The absorbing process: q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) onehot(m)
    independently per position (MD4 eq. 1). With a per-value schedule (GenMD4) the token
    of value v survives with probability alpha_t[v].

    The prior p(x_1) matches q(x_1 | x_0) factor by factor as closely as a data-free
    prior can: the mask with probability 1 - abar_1, otherwise a uniform token, where
    abar_1 is alpha_1 averaged over values; its KL to q is the exact prior term.
    """

    schedule: ddiff.AbstractSchedule
    vocab_size: int = eqx.field(static=True)

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def capabilities(self):
        schedule_caps = self.schedule.capabilities()
        kind = caps.STATE_DEPENDENT if caps.PER_VALUE in schedule_caps else caps.SCALAR_SCHEDULE
        return frozenset({caps.FACTORIZED, caps.MASKED, caps.TRANSITIONS, caps.RATES, kind})

    def survival(self, x: ddiff.Tokens, t: ddiff.Time) -> jax.Array:
        """alpha_t of each position's value (1 for the mask, which never changes)."""
        alpha = self.schedule.alpha(t)
        if alpha.ndim == 0:
            return jnp.where(x == self.mask_id, 1.0, alpha)
        return jnp.where(x == self.mask_id, 1.0, alpha[jnp.minimum(x, self.vocab_size - 1)])

    def marginal_probs(self, x0: ddiff.Tokens, t: ddiff.Time) -> ddiff.StateProbs:
        alpha = self.survival(x0, t)
        clean = jax.nn.one_hot(x0, self.num_states) * alpha[:, None]
        return clean.at[:, self.mask_id].add(1.0 - alpha)

    def sample_marginal(self, x0: ddiff.Tokens, t: ddiff.Time, *, key: ddiff.Key) -> ddiff.Tokens:
        keep = jax.random.uniform(key, x0.shape) < self.survival(x0, t)
        return jnp.where(keep, x0, self.mask_id)

    def prior_probs(self) -> Float[Array, " states"]:
        alpha_1 = jnp.mean(self.schedule.alpha(jnp.ones(())))
        probs = jnp.full((self.num_states,), alpha_1 / self.vocab_size)
        return probs.at[self.mask_id].set(1.0 - alpha_1)

    def transition_probs(self, x_s: ddiff.Tokens, s: ddiff.Time, t: ddiff.Time) -> ddiff.StateProbs:
        ratio = self.survival(x_s, t) / self.survival(x_s, s)
        stay = jax.nn.one_hot(x_s, self.num_states) * ratio[:, None]
        return stay.at[:, self.mask_id].add(1.0 - ratio)

    def _value_ratio(self, s, t):
        values = jnp.arange(self.vocab_size)
        return self.survival(values, t) / self.survival(values, s)

    def transition_likelihood(
        self, x_t: ddiff.Tokens, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        ratio = self._value_ratio(s, t)
        is_mask = (x_t == self.mask_id)[:, None]
        real = jnp.where(
            is_mask, 1.0 - ratio[None, :], jax.nn.one_hot(x_t, self.vocab_size) * ratio[None, :]
        )
        return jnp.concatenate([real, is_mask.astype(real.dtype)], axis=-1)

    def propagate(
        self, probs_s: ddiff.StateProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        ratio = self._value_ratio(s, t)
        real = probs_s[:, : self.vocab_size] * ratio
        masked = probs_s[:, self.mask_id] + jnp.sum(probs_s[:, : self.vocab_size] * (1.0 - ratio), -1)
        return jnp.concatenate([real, masked[:, None]], axis=-1)

    def _value_hazards(self, t):
        """The masking rate -alpha'_t[v] / alpha_t[v] of every clean value v, shape (V,)."""
        alpha = self.schedule.alpha(t)
        hazard = -self.schedule.alpha_derivative(t) / alpha
        return jnp.broadcast_to(hazard, (self.vocab_size,))

    def forward_rates(self, x: ddiff.Tokens, t: ddiff.Time) -> ddiff.StateProbs:
        hazard = self._value_hazards(t)[jnp.minimum(x, self.vocab_size - 1)]
        hazard = jnp.where(x == self.mask_id, 0.0, hazard)
        rates = -hazard[:, None] * jax.nn.one_hot(x, self.num_states)
        return rates.at[:, self.mask_id].add(hazard)

    def state_exit_rates(self, t: ddiff.Time) -> Float[Array, " states"]:
        """A clean value v leaves at its masking rate -alpha'_t[v]/alpha_t[v]; the mask never leaves."""
        return jnp.concatenate([self._value_hazards(t), jnp.zeros((1,))])

    def incoming_rates(self, x: ddiff.Tokens, t: ddiff.Time) -> ddiff.StateProbs:
        """Into the mask: R_t(v -> m) = -alpha'_t[v]/alpha_t[v] from every clean v (the mask
        never leaves, R_t(m -> m) = 0). Into a clean v: only its own diagonal, -hazard[v]."""
        hazard = self._value_hazards(t)
        masked = (x == self.mask_id)[:, None]
        into_mask = jnp.concatenate([hazard, jnp.zeros((1,))])[None, :]
        own = -hazard[jnp.minimum(x, self.vocab_size - 1)][:, None] * jax.nn.one_hot(x, self.num_states)
        return jnp.where(masked, into_mask, own)

    def log_marginal_from_mean(
        self, log_mean: ddiff.LogProbs, t: ddiff.Time
    ) -> ddiff.StateLogProbs:
        """Closed form, O(V) per position: a clean value y keeps its mass with probability
        alpha_t[y], so log q_t(y | mu) = log alpha_t[y] + log mu[y], and the mask collects
        the rest, log sum_v mu[v] (1 - alpha_t[v])."""
        alpha = jnp.broadcast_to(self.schedule.alpha(t), (self.vocab_size,))
        log_gone = jnp.where(alpha < 1, jnp.log1p(-jnp.where(alpha < 1, alpha, 0.0)), -jnp.inf)
        clean = log_mean + ddiff.safe_log(alpha)[None, :]
        masked = ddiff.log_sum_exp(log_mean + log_gone[None, :])
        return jnp.concatenate([clean, masked], axis=-1)

    def log_marginal_likelihood(self, x_t: ddiff.Tokens, t: ddiff.Time) -> ddiff.LogProbs:
        """Closed form: a masked token has likelihood 1 - alpha_t[v] under every value v;
        a clean token u only under v = u, with likelihood alpha_t[u]."""
        alpha = jnp.broadcast_to(self.schedule.alpha(t), (self.vocab_size,))
        log_gone = jnp.where(alpha < 1, jnp.log1p(-jnp.where(alpha < 1, alpha, 0.0)), -jnp.inf)
        same = jax.nn.one_hot(x_t, self.vocab_size, dtype=bool)
        clean = jnp.where(same, ddiff.safe_log(alpha)[None, :], -jnp.inf)
        return jnp.where((x_t == self.mask_id)[:, None], log_gone[None, :], clean)

    def log_score_from_mean(
        self, log_mean: ddiff.LogProbs, x_t: ddiff.Tokens, t: ddiff.Time
    ) -> ddiff.StateLogProbs:
        """Closed form of the absorbing process (Lou et al. 2024, sec. 3): at a masked
        position s[y] = alpha_t[y] / (1 - alpha_t[y]) mu[y] for clean y (= r mu for a
        scalar schedule) and s[m] = 1; at a clean position v only x_0 = v is possible, so
        s[v] = 1, s[m] = (1 - alpha_t[v]) / alpha_t[v] and 0 elsewhere."""
        alpha = jnp.broadcast_to(self.schedule.alpha(t), (self.vocab_size,))
        log_ratio = jnp.log(alpha) - jnp.log1p(-alpha)
        masked_row = jnp.concatenate(
            [log_mean + log_ratio[None, :], jnp.zeros((x_t.shape[0], 1))], axis=-1
        )
        value = jnp.minimum(x_t, self.vocab_size - 1)
        clean_row = jnp.where(jax.nn.one_hot(x_t, self.num_states, dtype=bool), 0.0, -jnp.inf)
        clean_row = clean_row.at[:, self.mask_id].set(-log_ratio[value])
        return jnp.where((x_t == self.mask_id)[:, None], masked_row, clean_row)


    def log_mean_from_score(
        self, log_score: ddiff.StateLogProbs, x_t: ddiff.Tokens, t: ddiff.Time
    ) -> ddiff.LogProbs:
        """Closed form (the inverse of :meth:`log_score_from_mean`): at a masked position
        mu[v] proportional to s[v] (1 - alpha_t[v]) / alpha_t[v], the Tweedie denoiser
        SEDD's absorbing graph uses; a clean position keeps its token."""
        alpha = jnp.broadcast_to(self.schedule.alpha(t), (self.vocab_size,))
        log_ratio = jnp.log(alpha) - jnp.log1p(-alpha)
        masked = jax.nn.log_softmax(log_score[:, : self.vocab_size] - log_ratio[None, :], axis=-1)
        carried = jnp.where(
            jax.nn.one_hot(x_t, self.vocab_size, dtype=bool), 0.0, -jnp.inf
        )
        return jnp.where((x_t == self.mask_id)[:, None], masked, carried)

    def unpropagate(
        self, values: ddiff.StateProbs, s: ddiff.Time, t: ddiff.Time
    ) -> ddiff.StateProbs:
        """Closed form: Q_{s->t}^{-1} is the transition from t back to s, keep a clean v
        with alpha_s[v] / alpha_t[v] and send the rest (a negative weight) to the mask, so
        it is :meth:`propagate` with the times exchanged."""
        return self.propagate(values, t, s)

    def reconstruction_nll(self, x0: ddiff.Tokens) -> ddiff.Scalar:
        """Closed form: z is x_0^n itself (which only x_0^n produces, d = 1) or the mask,
        from which d(v) is proportional to 1 - alpha_0[v]; for a scalar schedule this is
        MD4's D (1 - alpha_0) log V."""
        masking = 1.0 - jnp.broadcast_to(self.schedule.alpha(jnp.zeros(())), (self.vocab_size,))
        own = masking[x0]
        log_decoder = jnp.log(jnp.where(own > 0, own, 1.0)) - jnp.log(jnp.where(own > 0, jnp.sum(masking), 1.0))
        return -jnp.sum(jnp.where(own > 0, own * log_decoder, 0.0))
