"""MD4 (Shi et al., NeurIPS 2024): masked diffusion with a weighted cross-entropy ELBO.

Notation: V real tokens, mask m = V, alpha_t the probability that a token is still clean.
"""

import ddiff
from ddiff_plugins.md4._objectives import MD4ContinuousELBO, MD4DiscreteELBO, elbo_weight
from ddiff_plugins.md4._samplers import (
    AbstractAncestralSampler,
    AncestralSampler,
    CachedSampler,
    FirstHittingSampler,
    TopPSampler,
    TwoDrawSampler,
)

__all__ = [
    "AbstractAncestralSampler",
    "AncestralSampler",
    "CachedSampler",
    "FirstHittingSampler",
    "MD4ContinuousELBO",
    "MD4DiscreteELBO",
    "TopPSampler",
    "TwoDrawSampler",
    "elbo_weight",
]


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("objective", "md4_elbo", MD4ContinuousELBO)
    registry.register("objective", "md4_discrete_elbo", MD4DiscreteELBO)
    registry.register("sampler", "ancestral", AncestralSampler)
    registry.register("sampler", "top_p", TopPSampler)
    registry.register("sampler", "two_draw", TwoDrawSampler)
    registry.register("sampler", "cached", CachedSampler)
    registry.register("sampler", "first_hitting", FirstHittingSampler)
    registry.register("transform", "top_p", ddiff.TopP)
