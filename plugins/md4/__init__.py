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
    "COMPONENTS",
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


COMPONENTS: dict[str, dict[str, type]] = {
    "objective": {"md4_elbo": MD4ContinuousELBO, "md4_discrete_elbo": MD4DiscreteELBO},
    "sampler": {
        "ancestral": AncestralSampler,
        "top_p": TopPSampler,
        "two_draw": TwoDrawSampler,
        "cached": CachedSampler,
        "first_hitting": FirstHittingSampler,
    },
    "transform": {"top_p": ddiff.TopP},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
