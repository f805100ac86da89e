"""The uniform forward process (SEDD's uniform graph, D3PM's uniform transitions, Campbell
et al.'s uniform CTMC) and the plain x0 parameterization for processes without a mask.

Notation: V token values, alpha_t the probability that a token has not been resampled.
"""

import ddiff
from ddiff_plugins.uniform._parameterization import X0Parameterization
from ddiff_plugins.uniform._process import UniformProcess

__all__ = ["COMPONENTS", "UniformProcess", "X0Parameterization"]


COMPONENTS: dict[str, dict[str, type]] = {
    "process": {"uniform": UniformProcess},
    "parameterization": {"x0": X0Parameterization},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
