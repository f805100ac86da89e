"""Ancestral sampling of a masked diffusion model from a tempered denoiser, as a ddiff
plugin: the values a step reveals are drawn from mu^(1/T), renormalised, instead of mu.
"""

# --8<-- [start:imports]
import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

# --8<-- [end:imports]


# --8<-- [start:temper]
def temper(log_mean: ddiff.LogProbs, temperature: float) -> ddiff.LogProbs:
    """log of mu^(1/T) / sum_v mu[v]^(1/T) per position; T = 0 is the limit, all the mass
    on the most probable value (ties to the lowest index). Positions whose row is one-hot
    (a carried-over token) stay one-hot."""
    if temperature == 0:
        best = jnp.argmax(log_mean, axis=-1)
        return jnp.where(jax.nn.one_hot(best, log_mean.shape[-1], dtype=bool), 0.0, -jnp.inf)
    return jax.nn.log_softmax(log_mean / temperature, axis=-1)


# --8<-- [end:temper]


# --8<-- [start:step]
def reveal_logits(
    log_mean: ddiff.LogProbs, alpha_s: ddiff.Scalar, alpha_t: ddiff.Scalar
) -> jax.Array:
    """Log-probabilities of the V + 1 outcomes of a masked position stepping from t to
    s < t (MD4 Alg. 2): value v with (alpha_s - alpha_t) / (1 - alpha_t) mu[v], still
    masked (index V) with (1 - alpha_s) / (1 - alpha_t)."""
    log_reveal = jnp.log(jnp.maximum(alpha_s - alpha_t, 0.0)) - jnp.log1p(-alpha_t)
    log_stay = jnp.log1p(-alpha_s) - jnp.log1p(-alpha_t)
    stay = jnp.broadcast_to(log_stay, (*log_mean.shape[:-1], 1))
    return jnp.concatenate([log_reveal + log_mean, stay], axis=-1)


# --8<-- [end:step]


# --8<-- [start:class]
class TemperedAncestralSampler(ddiff.AbstractSampler):
    """Ancestral sampling (MD4 Alg. 2) on a time grid 1 = t_0 > ... > t_K = 0, revealing
    values drawn from the tempered denoiser mu^(1/T) (:func:`temper`): T = 1 is ancestral
    sampling, T < 1 trades diversity for likelihood under the model, T = 0 is greedy.
    Which positions are revealed when is unchanged: a masked position is revealed
    between t and s with probability (alpha_s - alpha_t) / (1 - alpha_t). Draws are exact
    (:func:`ddiff.categorical`), so T is the only thing that sharpens the samples (a float32
    Gumbel draw would sharpen them too, Zheng et al. 2024). Positions still masked at t = 0
    are drawn from the tempered mu(x, 0). Given positions (infilling) are set in x_1 and,
    never being masked, never change.

    Attributes:
        steps: K, network evaluations (doubled under guidance; one more when a position
            is still masked at t = 0).
        temperature: T >= 0.
        grid: ``uniform`` or ``cosine`` time grid (:func:`ddiff.time_grid`).
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({caps.MASKED, caps.SCALAR_SCHEDULE}),
    }
    steps: int = eqx.field(static=True, default=128)
    temperature: float = eqx.field(static=True, default=1.0)
    grid: ddiff.TimeGrid = eqx.field(static=True, default="uniform")

    def __check_init__(self):
        ddiff.check_at_least("steps", self.steps)
        if not self.temperature >= 0:
            raise ddiff.RecipeError(
                f"temperature must be >= 0, got {self.temperature}", path="temperature"
            )

    # --8<-- [end:class]

    # --8<-- [start:sample]
    def sample(self, model, *, keys, seq_len, conditioning):
        schedule, mask_id = model.process.schedule, model.process.mask_id
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)

        def tempered_mean(x, t):
            log_mean, _ = ddiff.batched_log_mean(model, x, t, conditioning)
            return temper(log_mean, self.temperature)

        def step(x, inputs):
            t, s, index = inputs
            logits = reveal_logits(tempered_mean(x, t), schedule.alpha(s), schedule.alpha(t))
            drawn = jax.vmap(ddiff.categorical)(ddiff.step_keys(start.loop_keys, index), logits)
            return jnp.where(x == mask_id, drawn, x), None

        times = ddiff.time_grid(self.grid, self.steps)
        x, _ = jax.lax.scan(step, start.tokens, (times[:-1], times[1:], jnp.arange(self.steps)))

        def decode(x):
            drawn = jax.vmap(ddiff.categorical)(start.final_keys, tempered_mean(x, jnp.zeros(())))
            return jnp.where(x == mask_id, drawn, x)

        still_masked = jnp.any(x == mask_id)
        x = jax.lax.cond(still_masked, decode, lambda x: x, x)
        evals = (self.steps + still_masked.astype(jnp.int32)) * start.calls
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)

    # --8<-- [end:sample]


# --8<-- [start:hook]
@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("sampler", "tempered_ancestral", TemperedAncestralSampler)


# --8<-- [end:hook]
