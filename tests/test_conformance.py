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

# The later families' lines draw 2^14 examples per objective mean and 2^12 samples per
# sampler check (a quarter and a half of the kit's defaults) to keep the suite within its
# time budget; tolerances scale with the standard error (z = 4) and the chi-square
# false-alarm rate stays 1e-3. The step counts below were chosen with 2^16 samples.
LIGHT = {"num_examples": 2**14, "num_samples": 2**12}

# D3PM: the absorbing family (masked process, beta_t = 1/(T - t + 1), MD4's mean) and the
# uniform family (cosine schedule, x0 parameterization; with hybrid_weight to build the
# hybrid loss, which the kit does not read). Replacement infilling is exact only when
# absorbing (a given token of the uniform process reads as possibly noise), so the
# uniform sampler is checked with labels without infilling.
D3PM_ABSORBING = Setup(**LIGHT, process={"kind": "masked", "schedule": "jsd"}, parameterization="mean")
D3PM_UNIFORM = Setup(
    **LIGHT,
    process={"kind": "uniform", "schedule": "d3pm_cosine"},
    parameterization="x0",
    sampler_cases=("exact[none/markov]", "exact[labels/classes]"),
)
test_d3pm_vb_absorbing = objective_conformance("d3pm_vb", D3PM_ABSORBING)
test_d3pm_vb_uniform = objective_conformance("d3pm_vb", D3PM_UNIFORM, hybrid_weight=0.01)
test_d3pm_ancestral_absorbing = sampler_conformance("d3pm_ancestral", D3PM_ABSORBING, steps=128)
test_d3pm_ancestral_uniform = sampler_conformance("d3pm_ancestral", D3PM_UNIFORM, steps=128)

test_ancestral = sampler_conformance("ancestral", steps=128)
test_top_p = sampler_conformance("top_p", steps=128, top_p=1.0)
test_mean = sampler_conformance("mean", steps=128)
test_cached = sampler_conformance("cached", steps=128)
test_first_hitting = sampler_conformance("first_hitting")

# SEDD on its two graphs. The oracle drives the objective through the exact score (the
# `score` parameterization reading the kit's exact log scores, uniform graph) and through
# the exact mean read as a score (absorbing graph, which adds the schedule-invariance
# check); the samplers read the exact mean as a score (one enumeration per call instead
# of one per changed state). At 128 steps the samplers' exact output distributions
# (computed by propagating all 81 states through every step) are within KL 1.5e-4 of the
# markov toy on both graphs, a chi-square noncentrality of about 2 at 2^13 samples; at 32
# steps (KL 6e-4 absorbing, 2.7e-3 uniform) they are caught with 2^16 samples. Infilling
# by projection is exact on the absorbing graph only: a given token of the uniform graph
# looks noisy to the score (caught at p = 1e-40 with 2^13 samples), so the uniform lines
# check labels without infilling.
ABSORBING = Setup(**LIGHT, process={"kind": "masked", "schedule": {"kind": "loglinear"}}, parameterization="mean")
ABSORBING_COSINE = Setup(**LIGHT, process={"kind": "masked", "schedule": {"kind": "cosine"}}, parameterization="mean")
UNIFORM_SCORE = Setup(**LIGHT, process={"kind": "uniform", "schedule": {"kind": "geometric"}}, parameterization="score")
UNIFORM = Setup(
    **LIGHT,
    process={"kind": "uniform", "schedule": {"kind": "geometric"}},
    parameterization="x0",
    sampler_cases=("exact[none/markov]", "exact[labels/classes]"),
)
test_score_entropy_absorbing = objective_conformance("score_entropy", ABSORBING)
test_score_entropy_uniform = objective_conformance("score_entropy", UNIFORM_SCORE)
test_analytic_absorbing = sampler_conformance("analytic", ABSORBING, steps=128)
test_euler_absorbing = sampler_conformance("euler", ABSORBING_COSINE, steps=128)
test_analytic_uniform = sampler_conformance("analytic", UNIFORM, steps=128)
test_euler_uniform = sampler_conformance("euler", UNIFORM, steps=128)

# Campbell et al.: the CTMC bound on the masked and the uniform process (with the x0
# parameterization), and tau-leaping. Step counts measured on 2^16 unconditional samples of
# the markov toy (docs/campbell.md): masked tau_leaping is caught at 32 steps (p = 5e-8),
# borderline at 64 (p = 0.08 there, p = 7e-4 with this file's seed and 2^13 samples) and
# passes at 128 (p = 0.16); the uniform process is caught at 128 (p = 2e-13) and passes at
# 256 (p = 0.41). With one corrector leap of a full step the masked PC sampler passes at 64
# (p = 0.51); on the uniform process full-step correctors bias the stationary law
# (p = 3e-4 at 256 steps) and 0.1-step ones pass at 256 (p = 0.05). As for D3PM and SEDD,
# the uniform lines check labels without infilling (p = 7e-46 with it, 128 steps).
UNIFORM_LINEAR = Setup(
    **LIGHT,
    process={"kind": "uniform", "schedule": "linear"},
    parameterization="x0",
    sampler_cases=("exact[none/markov]", "exact[labels/classes]"),
)
test_campbell_elbo = objective_conformance("campbell_elbo", Setup(**LIGHT))
test_campbell_elbo_uniform = objective_conformance("campbell_elbo", UNIFORM_LINEAR)
test_campbell_elbo_single_jump = objective_conformance("campbell_elbo_single_jump", Setup(**LIGHT))
test_tau_leaping = sampler_conformance("tau_leaping", Setup(**LIGHT), steps=128)
test_tau_leaping_uniform = sampler_conformance("tau_leaping", UNIFORM_LINEAR, steps=256)
test_tau_leaping_pc = sampler_conformance(
    "tau_leaping_pc", Setup(**LIGHT), steps=64, corrector_steps=1, corrector_step_size=1.0, corrector_entry_time=1.0
)
test_tau_leaping_pc_uniform = sampler_conformance(
    "tau_leaping_pc", UNIFORM_LINEAR, steps=256, corrector_steps=1, corrector_step_size=0.1,
    corrector_entry_time=1.0,
)  # fmt: skip

# GenMD4: the masked process on a learnable per-value schedule with unequal powers, so that
# an objective or sampler that ignored the per-value schedule would fail (the sampler fails
# with TV 0.37 when its process has equal powers 1.5 while the oracle's has these). Measured
# on 2^16 samples of markov (docs/genmd4.md): caught at 32 steps (p = 4e-8), p = 0.12 at
# 64, p = 0.25 at 128.
GENMD4 = Setup(
    **LIGHT,
    process={"kind": "masked", "schedule": {"kind": "learnable_poly", "initial_powers": [0.7, 1.5, 3.0]}}
)
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
