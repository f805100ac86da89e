"""Campbell et al. (NeurIPS 2022, "A Continuous Time Framework for Discrete Denoising
Models", code: tauLDR): the continuous-time ELBO of a CTMC whose reverse rates are built
from a mean, and tau-leaping samplers.

Notation: a factorized process with forward rates R_t(x^n -> y) per position (``rates``
capability), Z_t(x) = sum_n sum_{y != x^n} R_t(x^n -> y) the total rate of leaving x,
mu_theta(x, t) the model's mean and s_theta(x, t)[n, y] the concentration ratios read
from it (``process.log_score_from_mean``). The model's reverse rates (Campbell et al.
Prop. 3 for a factorized denoiser) move one position n of x to y with

    R̂_t(x -> x^{n<-y}) = R_t(y -> x^n) s_theta(x, t)[n, y],    y != x^n.
"""

import ddiff
from ddiff_plugins.campbell._objectives import (
    AbstractCampbellELBO,
    CampbellELBO,
    CampbellSingleJumpELBO,
)
from ddiff_plugins.campbell._rates import reversal_rates, reverse_rates
from ddiff_plugins.campbell._samplers import (
    AbstractTauLeapingSampler,
    PredictorCorrectorSampler,
    TauLeapingSampler,
)

__all__ = [
    "COMPONENTS",
    "AbstractCampbellELBO",
    "AbstractTauLeapingSampler",
    "CampbellELBO",
    "CampbellSingleJumpELBO",
    "PredictorCorrectorSampler",
    "TauLeapingSampler",
    "reversal_rates",
    "reverse_rates",
]


COMPONENTS: dict[str, dict[str, type]] = {
    "objective": {
        "campbell_elbo": CampbellELBO,
        "campbell_elbo_single_jump": CampbellSingleJumpELBO,
    },
    "sampler": {"tau_leaping": TauLeapingSampler, "tau_leaping_pc": PredictorCorrectorSampler},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
