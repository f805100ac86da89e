"""MD4 (Shi et al., NeurIPS 2024): masked diffusion with a weighted cross-entropy ELBO.

Notation: V real tokens, mask m = V, alpha_t the probability that a token is still clean.
"""

import ddiff
from ddiff_plugins.md4._objectives import MD4ContinuousELBO, MD4DiscreteELBO, elbo_weight
from ddiff_plugins.md4._samplers import (
    AbstractGridSampler,
    AncestralSampler,
    CachedSampler,
    FirstHittingSampler,
    MeanSampler,
    TopPSampler,
    nucleus,
)

__all__ = [
    "AbstractGridSampler",
    "AncestralSampler",
    "CachedSampler",
    "FirstHittingSampler",
    "MD4ContinuousELBO",
    "MD4DiscreteELBO",
    "MeanSampler",
    "TopPSampler",
    "elbo_weight",
    "nucleus",
]


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("objective", "md4_elbo", MD4ContinuousELBO)
    registry.register("objective", "md4_discrete_elbo", MD4DiscreteELBO)
    registry.register("sampler", "ancestral", AncestralSampler)
    registry.register("sampler", "top_p", TopPSampler)
    registry.register("sampler", "mean", MeanSampler)
    registry.register("sampler", "cached", CachedSampler)
    registry.register("sampler", "first_hitting", FirstHittingSampler)
