"""The masked (absorbing) process, the scalar masking schedules and the mean
parameterization: the foundation every masked family (MD4, GenMD4, SEDD absorbing,
Campbell et al., block diffusion, the decoding samplers) builds on by recipe name.

Notation: V real tokens, mask m = V, alpha_t the probability that a token is still clean.
"""

import ddiff
from ddiff_plugins.masked._parameterization import MeanParameterization
from ddiff_plugins.masked._process import MaskedProcess
from ddiff_plugins.masked._schedules import (
    EPS,
    AbstractClippedSchedule,
    CosineSchedule,
    LinearSchedule,
    PolySchedule,
)

__all__ = [
    "COMPONENTS",
    "AbstractClippedSchedule",
    "CosineSchedule",
    "EPS",
    "LinearSchedule",
    "MaskedProcess",
    "MeanParameterization",
    "PolySchedule",
]


COMPONENTS: dict[str, dict[str, type]] = {
    "schedule": {"linear": LinearSchedule, "cosine": CosineSchedule, "poly": PolySchedule},
    "process": {"masked": MaskedProcess},
    "parameterization": {"mean": MeanParameterization},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
