"""Ancestral sampling for per-value (state-dependent) masking schedules."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps


def reverse_logits(
    log_mean: Float[Array, "*batch seq vocab"],
    log_mask_s: Float[Array, " vocab"],
    log_mask_t: Float[Array, " vocab"],
) -> Float[Array, "*batch seq states"]:
    """Log-probabilities over V+1 outcomes of a masked position from t to s < t under a
    per-value schedule: value v with mu[v] (alpha_s[v] - alpha_t[v]) / (1 - alpha_t[v]),
    the mask (index V) with sum_v mu[v] (1 - alpha_s[v]) / (1 - alpha_t[v]). The ratios
    come from log(1 - alpha) so they stay accurate where alpha rounds to 1."""
    log_stay = log_mask_s - log_mask_t
    log_unmask = jnp.log(-jnp.expm1(jnp.minimum(log_stay, 0.0)))
    stay = jax.nn.logsumexp(log_mean + log_stay, axis=-1, keepdims=True)
    return jnp.concatenate([log_mean + log_unmask, stay], axis=-1)


class StateDependentAncestralSampler(ddiff.AbstractSampler):
    """Ancestral sampling of a masked process whose schedule may depend on the token value
    (GenMD4; the reference code ships no sampler). On a time grid 1 = t_0 > ... > t_T = 0
    (:func:`ddiff.time_grid`), a masked position becomes v with probability
    mu_theta(x_t, t)[v] (alpha_s[v] - alpha_t[v]) / (1 - alpha_t[v]) and stays masked
    otherwise: the posterior q(x_s | x_t, x_0) averaged over x_0 ~ mu_theta. With a
    scalar schedule it is MD4's Alg. 2. Draws are exact (:func:`ddiff.categorical`), the
    loop is one ``lax.scan``; positions still masked at t = 0 are drawn from
    mu_theta(x_0, 0). Labels and classifier-free guidance go through
    :func:`ddiff.batched_log_mean`; given positions (infilling) are set at the start and
    after every step.

    Attributes:
        steps: number of reverse steps T (network evaluations: T, or T+1 when a
            position is still masked at t = 0; doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
    """

    requires = {"parameterization": frozenset({caps.MEAN}), "process": frozenset({caps.MASKED})}
    steps: int = eqx.field(static=True, default=128)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)

    def reverse_chain(self):
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=ddiff.time_grid(self.grid, self.steps),
            final="masked_mean",
        )

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        schedule = process.schedule
        mask_id = process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        calls = start.calls

        def log_mask(time):
            return jnp.broadcast_to(schedule.log_mask_probability(time), (process.vocab_size,))

        def step(carry, inputs):
            x, evals = carry
            t, s, index = inputs
            log_mean, _ = ddiff.batched_log_mean(model, x, t, conditioning)
            logits = reverse_logits(log_mean, log_mask(s), log_mask(t))
            draws = jax.vmap(ddiff.categorical)(ddiff.step_keys(start.loop_keys, index), logits)
            x = ddiff.apply_fixed(conditioning, jnp.where(x == mask_id, draws, x))
            return (x, evals + calls), None

        times = ddiff.time_grid(self.grid, self.steps)
        (x, evals), _ = jax.lax.scan(
            step, (start.tokens, jnp.int32(0)), (times[:-1], times[1:], jnp.arange(self.steps))
        )

        x, used = ddiff.finish_masked(model, x, start=start, conditioning=conditioning)
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals + used)
