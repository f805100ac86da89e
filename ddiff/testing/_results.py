"""What a conformance check returns, and the statistics the checks share.

Every check returns a :class:`CheckResult` with the numbers it compared, the sample size
and the tolerance; :meth:`CheckResult.raise_if_failed` turns a failure into a
:class:`ConformanceError` (an ``AssertionError``, so pytest reports it as a failure).

Monte Carlo tolerances are z standard errors of the estimated mean (z = 4 by default:
a two-sided false-alarm probability of 6.3e-5 per comparison, for errors that are close
to normal at these sample sizes). Standard errors treat examples as independent; the
antithetic times objectives use only lower the true error, so the tests are conservative.
Sampled sequences are compared with exact probabilities by Pearson's chi-square test.
"""

import dataclasses
import math
from collections.abc import Mapping

import numpy as np


class ConformanceError(AssertionError):
    """A component that fails a conformance check; the message holds the numbers."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        check: the check's name (``tight``, ``discrete_bound``, ``entropy_bound``,
            ``schedule_invariance``, ``sampler_exact``).
        subject: what was checked (e.g. ``objective 'md4_elbo' on toy 'markov'``).
        passed: whether it passed.
        summary: one line with the comparison made, the sample size and the tolerance.
        numbers: the quantities computed, by name.
    """

    check: str
    subject: str
    passed: bool
    summary: str
    numbers: Mapping[str, float]

    def __str__(self) -> str:
        status = "passed" if self.passed else "FAILED"
        return f"{self.check} {status} for {self.subject}: {self.summary}"

    def raise_if_failed(self) -> "CheckResult":
        if not self.passed:
            raise ConformanceError(str(self))
        return self


def normal_false_alarm(z: float) -> float:
    """Two-sided false-alarm probability of a |Z| > z test for a standard normal Z."""
    return math.erfc(z / math.sqrt(2.0))


def chi_square_test(
    observed: np.ndarray, probabilities: np.ndarray, *, constraints: int = 1, min_expected: float = 5.0
) -> dict[str, float]:
    """Pearson's chi-square goodness-of-fit test of counts against probabilities.

    Cells whose expected count is below ``min_expected`` are pooled into one cell (so
    the chi-square approximation holds); ``constraints`` is the number of linear
    constraints the expected counts satisfy (1 for a fixed total; one per class when
    totals are fixed per class). Counts in cells of probability 0 are reported as
    ``impossible``: an exact sampler never produces them.

    Returns:
        chi2, dof, p_value, tv (total variation between the empirical and expected
        frequencies), impossible (count in zero-probability cells), num (total count).
    """
    from scipy import stats

    observed = np.asarray(observed, np.float64).ravel()
    probabilities = np.asarray(probabilities, np.float64).ravel()
    total = observed.sum()
    expected = total * probabilities
    impossible = float(observed[probabilities == 0].sum())
    possible = probabilities > 0
    regular = possible & (expected >= min_expected)
    pooled = possible & ~regular
    cells_observed = list(observed[regular])
    cells_expected = list(expected[regular])
    if pooled.any():
        cells_observed.append(observed[pooled].sum())
        cells_expected.append(expected[pooled].sum())
    cells_observed, cells_expected = np.asarray(cells_observed), np.asarray(cells_expected)
    chi2 = float(np.sum((cells_observed - cells_expected) ** 2 / cells_expected))
    dof = max(len(cells_expected) - constraints, 1)
    return {
        "chi2": chi2,
        "dof": float(dof),
        "p_value": float(stats.chi2.sf(chi2, dof)),
        "tv": float(0.5 * np.abs(observed / total - probabilities).sum()),
        "impossible": impossible,
        "num": float(total),
    }


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def _describe(component: object) -> str:
    return type(component).__name__


def _show(sequence) -> str:
    return "(" + ", ".join(str(int(v)) for v in sequence) + ")"
