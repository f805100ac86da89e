"""Capabilities: what a component provides, what another requires, checked at load time.

Every component class declares ``provides`` (capability names it offers) and may
declare ``requires``, a mapping from a recipe slot (``process``, ``parameterization``,
``network``, ``schedule``) to the capability names it needs from the component in that
slot. A component may refine what it provides per instance by overriding
``capabilities()`` (a masked process built on a per-value schedule provides
``state_dependent`` rather than ``scalar_schedule``, a network built without time
conditioning provides ``time_independent``). What capabilities cannot express (numbers
that must agree, such as the step counts of a discrete-time grid) a component checks in
``pairing_problem``.
"""

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

from ddiff._errors import IncompatibleComponentsError

# Capability names used by the built-in protocols. Plugins may introduce their own.
MEAN = "mean"
"""A parameterization that gives p(x_0 | x_t) over the real tokens, per position."""
SCORE = "score"
"""A parameterization that gives concentration ratios p_t(y)/p_t(x) for one-token changes."""
MASKED = "masked"
"""An absorbing (masked) forward process with a mask state and survival schedule alpha."""
SCALAR_SCHEDULE = "scalar_schedule"
"""A forward process whose schedule is the same for every token value."""
STATE_DEPENDENT = "state_dependent"
"""A forward process whose schedule depends on the token value (GenMD4)."""
FACTORIZED = "factorized"
"""Marginals q(x_t | x_0) that factorize over positions."""
TRANSITIONS = "transitions"
"""Discrete-time transitions q(x_t | x_s) and their likelihoods."""
RATES = "rates"
"""Continuous-time forward rates R_t(x -> y) of a CTMC."""
SCALAR = "scalar"
"""A schedule with one alpha_t for every token value."""
PER_VALUE = "per_value"
"""A schedule with one alpha_t[v] per token value v (GenMD4)."""
TIME_CONDITIONED = "time_conditioned"
"""A network whose output depends on t."""
TIME_INDEPENDENT = "time_independent"
"""A network whose output does not depend on t (caching and first-hitting samplers)."""
CLASS_CONDITIONAL = "class_conditional"
"""A network that takes a class label (and the null class, for guidance)."""
BLOCK_CAUSAL = "block_causal"
"""A network that reads noisy blocks conditioned on clean earlier blocks: the vectorised
block-causal pass and a cache of clean blocks (:class:`ddiff.AbstractBlockCausalNetwork`;
block diffusion). Provided only by a network that ignores t."""
VARIABLE_LENGTH = "variable_length"
"""A sampler that generates up to any length and may stop early at an end token, reporting
each sample's length (``ddiff sample --max-length``)."""
CONTINUOUS_TIME = "continuous_time"
"""An objective that estimates a continuous-time bound (an integral over t in [0, 1])."""
DISCRETE_TIME = "discrete_time"
"""An objective that estimates a bound of a ``steps``-step discrete-time model; its class
takes the number of steps as the constructor argument ``steps``."""


class Capable:
    """Mixin carried by every component protocol."""

    provides: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[Mapping[str, frozenset[str]]] = {}

    def capabilities(self) -> frozenset[str]:
        """What this instance provides (default: the class's ``provides``)."""
        return frozenset(type(self).provides)

    def pairing_problem(self, components: Mapping[str, tuple[str, Any]]) -> str | None:
        """Why this component cannot work with the others of a recipe, in one sentence,
        or None (the default). For constraints that capabilities cannot express, such as
        a number of steps that must match: a process whose transition tables exist on a
        fixed time grid refuses an objective that steps on another grid.

        Arguments:
            components: slot -> (registered name, component) of the recipe, this one
                included.
        """
        return None


def check_compatibility(
    components: Mapping[str, tuple[str, Any]],
    *,
    source: str | None = None,
    deferred: Collection[str] = (),
) -> None:
    """Refuse a set of components in which one requires what another does not provide,
    or in which one reports a :meth:`Capable.pairing_problem` with the others.

    Arguments:
        components: slot -> (registered name, component instance). Only components
            that are present are checked; a requirement on an absent slot is an error,
            unless the slot is in ``deferred`` (built later and checked then, e.g. the
            network, which needs the data's sizes).
        source: the recipe file, for the message.
        deferred: absent slots whose requirements are checked later.
    """
    for slot, (name, component) in components.items():
        for needed_slot, needed in getattr(component, "requires", {}).items():
            if needed_slot not in components and needed_slot in deferred:
                continue
            if needed_slot not in components:
                raise IncompatibleComponentsError(
                    f"{slot} {name!r} needs a {needed_slot} with {sorted(needed)}, "
                    f"but the recipe has no {needed_slot}",
                    source=source,
                    path=slot,
                )
            other_name, other = components[needed_slot]
            have = other.capabilities()
            missing = sorted(set(needed) - set(have))
            if missing:
                raise IncompatibleComponentsError(
                    f"{slot} {name!r} cannot be used with {needed_slot} {other_name!r}: "
                    f"it needs capability {', '.join(missing)} which {other_name!r} does "
                    f"not provide (it provides: {', '.join(sorted(have)) or 'nothing'}); "
                    f"choose another {slot} or {needed_slot}",
                    source=source,
                    path=slot,
                )
    for slot, (name, component) in components.items():
        problem = component.pairing_problem(components) if isinstance(component, Capable) else None
        if problem is not None:
            raise IncompatibleComponentsError(
                f"{slot} {name!r} cannot be used with this recipe: {problem}",
                source=source,
                path=slot,
            )
