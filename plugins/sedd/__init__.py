"""SEDD (Lou et al., ICML 2024): score entropy discrete diffusion.

The network estimates concentration ratios s[n, y] ~ p_t(x with x^n = y) / p_t(x) of a
factorized CTMC with forward rates R_t; the time reversal moves position n from x^n to y
at rate R_t(y -> x^n) s[n, y] (their eq. 3). SEDD's absorbing graph is the ``masked``
process and its uniform graph the ``uniform`` process, with the ``loglinear`` and
``geometric`` schedules (alpha_t = exp(-sigma_bar(t))).

Notation: V token values, S states (V + 1 with the mask at index V), q_t(y | v) the
marginal of one position, r_t = alpha_t / (1 - alpha_t).
"""

import ddiff
from ddiff_plugins.sedd._objective import ScoreEntropy, score_entropy
from ddiff_plugins.sedd._parameterization import ScoreParameterization
from ddiff_plugins.sedd._samplers import AbstractScoreSampler, AnalyticSampler, EulerSampler
from ddiff_plugins.sedd._schedules import (
    AbstractNoiseSchedule,
    GeometricSchedule,
    LogLinearSchedule,
    noise_rate,
    total_noise,
)

__all__ = [
    "COMPONENTS",
    "AbstractNoiseSchedule",
    "AbstractScoreSampler",
    "AnalyticSampler",
    "EulerSampler",
    "GeometricSchedule",
    "LogLinearSchedule",
    "ScoreEntropy",
    "ScoreParameterization",
    "noise_rate",
    "score_entropy",
    "total_noise",
]


COMPONENTS: dict[str, dict[str, type]] = {
    "schedule": {"geometric": GeometricSchedule, "loglinear": LogLinearSchedule},
    "parameterization": {"score": ScoreParameterization},
    "objective": {"score_entropy": ScoreEntropy},
    "sampler": {"euler": EulerSampler, "analytic": AnalyticSampler},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
