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

test_md4_elbo = objective_conformance("md4_elbo")
test_md4_discrete_elbo = objective_conformance("md4_discrete_elbo")

# D3PM: the absorbing family (masked process, beta_t = 1/(T - t + 1), MD4's mean) and the
# uniform family (cosine schedule, x0 parameterization). Samplers on a process without a
# mask are checked with labels only: replacement infilling is exact only when absorbing.
D3PM_ABSORBING = Setup(process={"kind": "masked", "schedule": "jsd"}, parameterization="mean")
D3PM_UNIFORM = Setup(process={"kind": "uniform", "schedule": "d3pm_cosine"}, parameterization="x0")
test_d3pm_vb_absorbing = objective_conformance("d3pm_vb", D3PM_ABSORBING)
test_d3pm_vb_uniform = objective_conformance("d3pm_vb", D3PM_UNIFORM, hybrid_weight=0.01)
test_d3pm_ancestral_absorbing = sampler_conformance("d3pm_ancestral", D3PM_ABSORBING, steps=128)
test_d3pm_ancestral_uniform = sampler_conformance("d3pm_ancestral", D3PM_UNIFORM, steps=128)

test_ancestral = sampler_conformance("ancestral", steps=128)
test_top_p = sampler_conformance("top_p", steps=128, top_p=1.0)
test_mean = sampler_conformance("mean", steps=128)
test_cached = sampler_conformance("cached", steps=128)
test_first_hitting = sampler_conformance("first_hitting")


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
