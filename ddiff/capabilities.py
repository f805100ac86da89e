"""Capability names (public): what components provide and require. See ``docs/architecture.md``."""

from ddiff._capabilities import (
    CLASS_CONDITIONAL,
    FACTORIZED,
    MASKED,
    MEAN,
    PER_VALUE,
    RATES,
    SCALAR,
    SCALAR_SCHEDULE,
    SCORE,
    STATE_DEPENDENT,
    TIME_CONDITIONED,
    TIME_INDEPENDENT,
    TRANSITIONS,
    Capable,
    check_compatibility,
)

__all__ = [
    "CLASS_CONDITIONAL",
    "FACTORIZED",
    "MASKED",
    "MEAN",
    "PER_VALUE",
    "RATES",
    "SCALAR",
    "SCALAR_SCHEDULE",
    "SCORE",
    "STATE_DEPENDENT",
    "TIME_CONDITIONED",
    "TIME_INDEPENDENT",
    "TRANSITIONS",
    "Capable",
    "check_compatibility",
]
