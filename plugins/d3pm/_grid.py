"""Step-count checks: grids of objectives and samplers must divide a tabulated process's grid."""

from collections.abc import Mapping
from typing import Any

from ddiff import capabilities as caps
from ddiff_plugins.d3pm._sampler import D3PMAncestralSampler

# --------------------------------------------------------------------------- step-count checks


def _steps_used(slot: str, component: Any) -> int | None:
    """The number of steps of a grid that ``component`` steps on, if any: a discrete-time
    objective (capability ``discrete_time``, argument ``steps``) or this module's sampler."""
    if slot == "objective" and caps.DISCRETE_TIME in component.capabilities():
        return component.steps
    if slot == "sampler" and isinstance(component, D3PMAncestralSampler):
        return component.steps
    return None


def _grid_problem(grid: int, components: Mapping[str, tuple[str, Any]]) -> str | None:
    """Refuse an objective or sampler whose grid i/steps is not part of the grid i/``grid``
    on which a tabulated process or schedule is defined: its steps must divide ``grid``."""
    for slot in ("objective", "sampler"):
        if slot not in components:
            continue
        name, component = components[slot]
        steps = _steps_used(slot, component)
        if steps is not None and grid % steps:
            return (
                f"it is defined on a grid of {grid} steps, but {slot} {name!r} takes "
                f"steps={steps}, which does not divide {grid}; set {slot}.steps to {grid} "
                f"or a divisor of it"
            )
    return None
