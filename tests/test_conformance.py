"""Every built-in objective and sampler passes the ddiff.testing conformance kit.

Each line below is the whole of what a plugin author writes to run the kit on a
registered component; the sample sizes and tolerances are those of ddiff.testing.Setup
(objectives: 2^16 draws per mean, 4 standard errors; samplers: 2^13 samples, chi-square
false-alarm rate 1e-3). Grid samplers take 128 steps, enough that their O(1/steps)
error (two positions unmasked in one step) is below the chi-square test's resolution:
measured on 2^16 samples of the markov toy, ancestral sampling is caught at 32 steps
(p = 5e-5), borderline at 64 (p = 0.01) and passes at 128 (p = 0.32).
"""

import ddiff
from ddiff.testing import Setup, objective_conformance, sampler_conformance

GENMD4 = Setup(
    process={"kind": "masked", "schedule": {"kind": "learnable_poly", "initial_powers": [0.7, 1.5, 3.0]}}
)
"""GenMD4's state-dependent process with unequal powers, so that an objective or sampler
that ignored the per-value schedule would fail (the sampler fails with TV 0.37 when its
process has equal powers 1.5 while the oracle's has these)."""

test_md4_elbo = objective_conformance("md4_elbo")
test_md4_discrete_elbo = objective_conformance("md4_discrete_elbo")

test_ancestral = sampler_conformance("ancestral", steps=128)
test_top_p = sampler_conformance("top_p", steps=128, top_p=1.0)
test_mean = sampler_conformance("mean", steps=128)
test_cached = sampler_conformance("cached", steps=128)
test_first_hitting = sampler_conformance("first_hitting")

test_genmd4_elbo = objective_conformance("genmd4_elbo", GENMD4)
test_genmd4_ancestral = sampler_conformance("genmd4_ancestral", GENMD4, steps=128)


def test_every_registered_objective_and_sampler_is_checked():
    checked = {
        test.ddiff_conformance
        for test in globals().values()
        if callable(test) and hasattr(test, "ddiff_conformance")
    }
    registry = ddiff.default_registry()
    for slot in ("objective", "sampler"):
        missing = set(registry.names(slot)) - {name for kind, name in checked if kind == slot}
        assert not missing, f"{slot}s without a conformance line in this module: {sorted(missing)}"
