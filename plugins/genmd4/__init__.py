"""GenMD4 (Shi et al., NeurIPS 2024, "state-dependent masking schedules"): masked diffusion with a learnable
state-dependent masking schedule, its ELBO with a leave-one-out REINFORCE gradient for
the schedule, and an ancestral sampler for per-value schedules.

Notation: V real tokens, mask m = V; a token of value v is still clean at time t with
probability alpha_t[v]. The forward process is the ``masked`` process of the MD4 plugin
built on a per-value schedule (it then provides ``state_dependent``).
"""

import ddiff
from ddiff_plugins.genmd4._objective import (
    GenMD4ELBO,
    elbo_weight,
    genmd4_integrand,
    reconstruction,
)
from ddiff_plugins.genmd4._sampler import StateDependentAncestralSampler, reverse_logits
from ddiff_plugins.genmd4._schedule import EPS, T1, LearnablePolySchedule

__all__ = [
    "COMPONENTS",
    "EPS",
    "GenMD4ELBO",
    "LearnablePolySchedule",
    "StateDependentAncestralSampler",
    "T1",
    "elbo_weight",
    "genmd4_integrand",
    "reconstruction",
    "reverse_logits",
]


COMPONENTS: dict[str, dict[str, type]] = {
    "schedule": {"learnable_poly": LearnablePolySchedule},
    "objective": {"genmd4_elbo": GenMD4ELBO},
    "sampler": {"genmd4_ancestral": StateDependentAncestralSampler},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
