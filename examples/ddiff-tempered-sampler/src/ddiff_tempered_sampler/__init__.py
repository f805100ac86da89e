"""Sampling a masked diffusion model from a tempered denoiser, as a ddiff plugin: the
log-probability transform ``tempered`` (mu -> mu^(1/T), renormalised) and the sampler
``tempered_ancestral``, the built-in ancestral step drawing from it.
"""

# --8<-- [start:imports]
import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff_plugins import md4

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


# --8<-- [start:transform]
class Tempered(ddiff.AbstractLogProbTransform):
    """The tempered denoiser mu^(1/T), renormalised per row (:func:`temper`): T = 1 leaves
    mu as it is, T < 1 trades diversity for likelihood under the model, T = 0 is greedy.

    Attributes:
        temperature: T >= 0.
    """

    temperature: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if not self.temperature >= 0:
            raise ddiff.RecipeError(
                f"temperature must be >= 0, got {self.temperature}", path="temperature"
            )

    def __call__(self, log_probs: ddiff.LogProbRows) -> ddiff.LogProbRows:
        return temper(log_probs, self.temperature)

    def as_top_p(self) -> float | None:
        """At T = 1 the transform changes nothing, which a reverse chain states."""
        return 1.0 if self.temperature == 1.0 else None


# --8<-- [end:transform]


# --8<-- [start:sampler]
class TemperedAncestralSampler(md4.AbstractAncestralSampler):
    """Ancestral sampling (MD4 Alg. 2) revealing values drawn from the tempered denoiser:
    ``{kind: ancestral, transforms: [{kind: tempered, temperature: T}]}`` under one name.
    Which positions are revealed when is unchanged. Draws are exact, so T is the only
    thing that sharpens the samples (a float32 Gumbel draw would sharpen them too, Zheng
    et al. 2024).

    Attributes:
        steps: K, network evaluations (doubled under guidance; one more when a position
            is still masked at t = 0).
        grid: ``uniform`` or ``cosine`` time grid.
        temperature: T >= 0.
    """

    temperature: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        Tempered(temperature=self.temperature)

    @property
    def transforms(self):
        return (Tempered(temperature=self.temperature),)


# --8<-- [end:sampler]


# --8<-- [start:hook]
@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("transform", "tempered", Tempered)
    registry.register("sampler", "tempered_ancestral", TemperedAncestralSampler)


# --8<-- [end:hook]
