"""MD4 (Shi et al., NeurIPS 2024): masked diffusion with a weighted cross-entropy ELBO.

Notation: V real tokens, mask m = V, alpha_t the probability that a token is still clean.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

EPS = 1e-4
"""The paper's clipping: alpha_t = (1 - 2 eps) a(t) + eps keeps alpha in [eps, 1 - eps]."""


class LinearSchedule(ddiff.AbstractSchedule):
    """alpha_t = (1 - 2 eps)(1 - t) + eps (MD4 Table 1, linear)."""

    provides = frozenset({caps.SCALAR})
    eps: float = EPS

    def alpha(self, t):
        return (1.0 - 2.0 * self.eps) * (1.0 - t) + self.eps

    def alpha_derivative(self, t):
        return -(1.0 - 2.0 * self.eps) * jnp.ones_like(t)


class CosineSchedule(ddiff.AbstractSchedule):
    """alpha_t = (1 - 2 eps)(1 - cos(pi/2 (1 - t))) + eps (MD4 Table 1, cosine)."""

    provides = frozenset({caps.SCALAR})
    eps: float = EPS

    def alpha(self, t):
        return (1.0 - 2.0 * self.eps) * (1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))) + self.eps

    def alpha_derivative(self, t):
        return -(1.0 - 2.0 * self.eps) * 0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))


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

    def marginal_probs(self, x0, t):
        alpha = self.survival(x0, t)
        clean = jax.nn.one_hot(x0, self.num_states) * alpha[:, None]
        return clean.at[:, self.mask_id].add(1.0 - alpha)

    def sample_marginal(self, x0, t, *, key):
        keep = jax.random.uniform(key, x0.shape) < self.survival(x0, t)
        return jnp.where(keep, x0, self.mask_id)

    def prior_probs(self):
        alpha_1 = jnp.mean(self.schedule.alpha(jnp.ones(())))
        probs = jnp.full((self.num_states,), alpha_1 / self.vocab_size)
        return probs.at[self.mask_id].set(1.0 - alpha_1)

    def transition_probs(self, x_s, s, t):
        ratio = self.survival(x_s, t) / self.survival(x_s, s)
        stay = jax.nn.one_hot(x_s, self.num_states) * ratio[:, None]
        return stay.at[:, self.mask_id].add(1.0 - ratio)

    def _value_ratio(self, s, t):
        values = jnp.arange(self.vocab_size)
        return self.survival(values, t) / self.survival(values, s)

    def transition_likelihood(self, x_t, s, t):
        ratio = self._value_ratio(s, t)
        is_mask = (x_t == self.mask_id)[:, None]
        real = jnp.where(
            is_mask, 1.0 - ratio[None, :], jax.nn.one_hot(x_t, self.vocab_size) * ratio[None, :]
        )
        return jnp.concatenate([real, is_mask.astype(real.dtype)], axis=-1)

    def propagate(self, probs_s, s, t):
        ratio = self._value_ratio(s, t)
        real = probs_s[:, : self.vocab_size] * ratio
        masked = probs_s[:, self.mask_id] + jnp.sum(probs_s[:, : self.vocab_size] * (1.0 - ratio), -1)
        return jnp.concatenate([real, masked[:, None]], axis=-1)

    def forward_rates(self, x, t):
        values = jnp.minimum(x, self.vocab_size - 1)
        alpha = self.schedule.alpha(t)
        derivative = self.schedule.alpha_derivative(t)
        hazard = -derivative / alpha if alpha.ndim == 0 else (-derivative / alpha)[values]
        hazard = jnp.where(x == self.mask_id, 0.0, hazard)
        rates = -hazard[:, None] * jax.nn.one_hot(x, self.num_states)
        return rates.at[:, self.mask_id].add(hazard)


class MeanParameterization(ddiff.AbstractMeanParameterization):
    """mu_theta = softmax of the network's V logits at masked positions; an unmasked
    position carries its token over (one-hot), and no mass is put on the mask
    (MDLM's "SUBS", MD4 sec. 3)."""

    def output_channels(self, process):
        return process.vocab_size

    def log_mean(self, output, x_t, t, process):
        masked = (x_t == process.vocab_size)[:, None]
        carried = jnp.where(
            jax.nn.one_hot(x_t, process.vocab_size, dtype=bool), 0.0, -jnp.inf
        )
        return jnp.where(masked, jax.nn.log_softmax(output, axis=-1), carried)


def _masked_log_likelihood(log_mean: jax.Array, x0: ddiff.Tokens, masked: jax.Array) -> jax.Array:
    picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(masked, picked, 0.0))


def reconstruction_bound(process: MaskedProcess, seq_len: int) -> jax.Array:
    """The reconstruction term at t = 0 with a uniform decoder for still-masked positions:
    D (1 - alpha_0) log V (MD4's recon loss)."""
    alpha_0 = jnp.mean(process.schedule.alpha(jnp.zeros(())))
    return seq_len * (1.0 - alpha_0) * jnp.log(process.vocab_size)


class MD4ContinuousELBO(ddiff.AbstractObjective):
    """The continuous-time negative ELBO (MD4 eq. 5):

        L = int_0^1 alpha'_t / (1 - alpha_t) E_q[ sum_{n: x_t^n = m} log mu_theta(x_t, t)[n, x_0^n] ] dt
            + reconstruction + prior,

    estimated with one antithetic time per example. Reported in nats per sequence.
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
    }

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        noise_key, network_key = jax.random.split(key)
        x_t = process.sample_marginal(x0, t, key=noise_key)
        log_mean = model.log_mean(x_t, t, label=label, key=network_key if train else None)
        masked = x_t == process.mask_id
        diffusion = process.schedule.elbo_weight(t) * _masked_log_likelihood(log_mean, x0, masked)
        reconstruction = reconstruction_bound(process, x0.shape[0])
        prior = process.prior_kl(x0)
        nelbo = diffusion + reconstruction + prior
        return ddiff.ObjectiveTerms(
            loss=nelbo,
            nelbo=nelbo,
            metrics={"diffusion": diffusion, "reconstruction": reconstruction, "prior": prior},
        )


class AncestralSampler(ddiff.AbstractSampler):
    """Ancestral sampling (MD4 Alg. 2): from t to s a masked position becomes a draw from
    Cat((alpha_s - alpha_t)/(1 - alpha_t) mu + (1 - alpha_s)/(1 - alpha_t) onehot(m)).
    Starts from the process prior; positions still masked at t = 0 are drawn from mu.
    Given positions (infilling) are fixed throughout.

    Attributes:
        steps: number of reverse steps T.
        grid: ``uniform`` or ``cosine`` time grid.
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
    }
    steps: int = 128
    grid: Literal["uniform", "cosine"] = "uniform"

    def __check_init__(self):
        if self.steps < 1:
            raise ddiff.RecipeError(f"steps must be >= 1, got {self.steps}", path="sampler.steps")

    def sample(self, model, *, key, num_samples, seq_len, conditioning):
        process = model.process
        mask_id = process.mask_id
        prior_key, loop_key, final_key = jax.random.split(key, 3)
        prior_keys = jax.random.split(prior_key, num_samples)
        x = jax.vmap(lambda k: process.sample_prior(seq_len, key=k))(prior_keys)
        x = ddiff.apply_fixed(conditioning, x)
        times = ddiff.time_grid(self.grid, self.steps)

        def step(x, inputs):
            t, s, step_key = inputs
            log_mean, calls = ddiff.batched_log_mean(model, x, t, conditioning)
            alpha_t = process.schedule.alpha(t)
            alpha_s = process.schedule.alpha(s)
            log_unmask = jnp.log(alpha_s - alpha_t) - jnp.log1p(-alpha_t)
            log_stay = jnp.log1p(-alpha_s) - jnp.log1p(-alpha_t)
            logits = jnp.concatenate(
                [log_unmask + log_mean, jnp.broadcast_to(log_stay, (*x.shape, 1))], axis=-1
            )
            drawn = ddiff.categorical(step_key, logits)
            x = ddiff.apply_fixed(conditioning, jnp.where(x == mask_id, drawn, x))
            return x, jnp.int32(calls)

        step_keys = jax.random.split(loop_key, self.steps)
        x, calls = jax.lax.scan(step, x, (times[:-1], times[1:], step_keys))

        def decode(x):
            log_mean, _ = ddiff.batched_log_mean(model, x, jnp.zeros(()), conditioning)
            drawn = ddiff.categorical(final_key, log_mean)
            return ddiff.apply_fixed(conditioning, jnp.where(x == mask_id, drawn, x))

        remaining = jnp.any(x == mask_id)
        x = jax.lax.cond(remaining, decode, lambda x: x, x)
        evals = jnp.sum(calls) + remaining.astype(jnp.int32) * calls[0]
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("schedule", "linear", LinearSchedule)
    registry.register("schedule", "cosine", CosineSchedule)
    registry.register("process", "masked", MaskedProcess)
    registry.register("parameterization", "mean", MeanParameterization)
    registry.register("objective", "md4_elbo", MD4ContinuousELBO)
    registry.register("sampler", "ancestral", AncestralSampler)
