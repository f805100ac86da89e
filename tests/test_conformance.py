"""Every built-in objective and sampler passes the ddiff.testing conformance kit.

Each line below is the whole of what a plugin author writes to run the kit on a
registered component; the setups (``tests/conformance_lines.py``) are shared with the
mutation tests, which run the same checks on deliberately broken copies
(``tests/test_mutants.py``). Sizes and tolerances are those of ddiff.testing.Setup
(objectives: 2^16 draws per mean, 4 standard errors; samplers: 2^13 samples, chi-square
false-alarm rate 1e-3) or a quarter and a half of them (``LIGHT``).

Samplers are checked twice: against the exact law of their own chain with a random
table model whose predictions depend on t (8 steps, so that every step matters), and,
deterministically, their chain under the exact denoiser against the data at the line's
step count. The chains' discretisation errors, computed exactly on the markov toy
(unconditional / per label), fall as 1/steps: ancestral 0.0114/0.0213 at 32 steps,
0.0029/0.0053 at 128; the check allows TV 0.02, so grid samplers take 128 steps (the
uniform-process lines, whose error is about twice as large, 128 or 256).
"""

from conformance_lines import (
    ABSORBING,
    ABSORBING_COSINE,
    ABSORBING_SCALED,
    AUTOREGRESSIVE,
    BD3LM,
    CAMPBELL,
    D3PM_ABSORBING,
    D3PM_UNIFORM,
    DECODING,
    GENMD4,
    MD4,
    MD4_COSINE,
    UNIFORM,
    UNIFORM_LINEAR,
    UNIFORM_SCORE,
)

import ddiff
from ddiff.testing import objective_conformance, sampler_conformance

test_md4_elbo = objective_conformance("md4_elbo", MD4)
test_md4_discrete_elbo = objective_conformance("md4_discrete_elbo", MD4)

test_ancestral = sampler_conformance("ancestral", MD4, steps=128)
test_top_p = sampler_conformance("top_p", MD4, steps=128, top_p=1.0)
test_two_draw = sampler_conformance("two_draw", MD4, steps=128)
test_cached = sampler_conformance("cached", MD4, steps=128)
# On the cosine schedule, where the hitting times in t differ from those of a linear one.
test_first_hitting = sampler_conformance("first_hitting", MD4_COSINE)

# D3PM: the absorbing family (masked process, beta_t = 1/(T - t + 1), MD4's mean) and the
# uniform family (cosine schedule, x0 parameterization; with hybrid_weight to build the
# hybrid loss, which the bound the kit checks does not contain). Replacement infilling is
# exact only when absorbing (a given token of the uniform process reads as possibly
# noise: TV 0.53 from the data at 128 steps), so the uniform sampler is checked against
# the data with labels without infilling.
test_d3pm_vb_absorbing = objective_conformance("d3pm_vb", D3PM_ABSORBING)
test_d3pm_vb_uniform = objective_conformance("d3pm_vb", D3PM_UNIFORM, hybrid_weight=0.01)
test_d3pm_ancestral_absorbing = sampler_conformance("d3pm_ancestral", D3PM_ABSORBING, steps=128)
test_d3pm_ancestral_uniform = sampler_conformance("d3pm_ancestral", D3PM_UNIFORM, steps=128)

# SEDD on its two graphs. The objective is driven through the exact score (the `score`
# parameterization reading the kit's exact log scores, uniform graph), through the exact
# mean read as a score (absorbing graph, which adds the schedule-invariance check), and
# through SEDD's absorbing scaling (the `score` parameterization on the absorbing graph,
# whose output is shifted by log r_t - log V; the oracle outputs the exact log score
# minus that shift, the table models any output). At 128 steps the samplers' chains are
# within TV 0.0030 (absorbing) and 0.0064 (uniform) of the markov toy. Infilling by
# projection is exact on the absorbing graph only (TV 0.52 from the data on the uniform
# graph), so the uniform lines check labels without infilling against the data.
test_score_entropy_absorbing = objective_conformance("score_entropy", ABSORBING)
test_score_entropy_uniform = objective_conformance("score_entropy", UNIFORM_SCORE)
test_score_entropy_scaled = objective_conformance("score_entropy", ABSORBING_SCALED)
test_analytic_absorbing = sampler_conformance("analytic", ABSORBING, steps=128)
test_euler_absorbing = sampler_conformance("euler", ABSORBING_COSINE, steps=128)
test_analytic_scaled = sampler_conformance("analytic", ABSORBING_SCALED, steps=128)
test_euler_scaled = sampler_conformance("euler", ABSORBING_SCALED, steps=128)
test_analytic_uniform = sampler_conformance("analytic", UNIFORM, steps=128)
test_euler_uniform = sampler_conformance("euler", UNIFORM, steps=128)

# Campbell et al.: the CTMC bound on the masked and the uniform process (with the x0
# parameterization), and tau-leaping. The chains' distances to the markov toy
# (unconditional): masked tau-leaping 0.0111 at 32 steps, 0.0029 at 128; uniform 0.0404 at
# 32, 0.0099 at 128, 0.0049 at 256; with one corrector leap of a full step the masked PC
# chain is 0.0038 at 64 steps; on the uniform process 0.1-step correctors give 0.0044 at
# 256 (full-step ones bias the stationary law). As for D3PM and SEDD, the uniform lines
# check labels without infilling against the data (TV 0.55 with it).
test_campbell_elbo = objective_conformance("campbell_elbo", CAMPBELL)
test_campbell_elbo_uniform = objective_conformance("campbell_elbo", UNIFORM_LINEAR)
test_campbell_elbo_single_jump = objective_conformance("campbell_elbo_single_jump", CAMPBELL)
test_tau_leaping = sampler_conformance("tau_leaping", CAMPBELL, steps=128)
test_tau_leaping_uniform = sampler_conformance("tau_leaping", UNIFORM_LINEAR, steps=256)
test_tau_leaping_pc = sampler_conformance(
    "tau_leaping_pc", CAMPBELL, steps=64, corrector_steps=1, corrector_step_size=1.0, corrector_entry_time=1.0
)
test_tau_leaping_pc_uniform = sampler_conformance(
    "tau_leaping_pc", UNIFORM_LINEAR, steps=256, corrector_steps=1, corrector_step_size=0.1,
    corrector_entry_time=1.0,
)  # fmt: skip

# GenMD4: the masked process on a learnable per-value schedule with unequal powers, so that
# an objective or sampler that ignored the per-value schedule would fail (the sampler
# reading one schedule for every value is rejected, tests/test_mutants.py). Its chain is
# within TV 0.0131 of the markov toy at 32 steps and 0.0033 at 128.
test_genmd4_elbo = objective_conformance("genmd4_elbo", GENMD4)
test_genmd4_ancestral = sampler_conformance("genmd4_ancestral", GENMD4, steps=128)


# Block diffusion (BD3-LM) on D = 4 in two blocks of L' = 2, driven by the exact denoiser,
# which also reads block-causally (the exact block conditionals): the bound is tight and
# the block sampler, with first-hitting (exact for a time-independent network) within
# each block, reproduces p. The block bound is not one of the kit's exact references
# (its bound_form is None); tests/test_bd3lm.py checks it by enumeration.
test_bd3lm_elbo = objective_conformance("bd3lm_elbo", BD3LM, block_size=2)
test_bd3lm = sampler_conformance("bd3lm", BD3LM, block_size=2, inner={"kind": "first_hitting"})


# Decoding samplers (docs/sampling.md), each in the setting where it draws the model's
# distribution, on the case that covers labels, given positions and the output law at once
# (2^12 samples, false alarm 1e-3); their heuristic settings are tested for their defining
# properties in test_decoding_samplers.py. Confidence and threshold decoding unmask one
# position per step there (4 linear steps for D = 4; a threshold no probability exceeds);
# block decoding runs first-hitting in blocks of 2; ReMDM with eta = 0 is ancestral; P2
# with random scores and eta = 0 is ancestral in a random order.
test_confidence = sampler_conformance("confidence", DECODING, steps=4, schedule="linear")
test_threshold = sampler_conformance("threshold", DECODING, threshold=1.0)
test_semi_ar = sampler_conformance("semi_ar", DECODING, block_length=2, inner={"kind": "first_hitting"})
test_remdm = sampler_conformance("remdm", DECODING, steps=128, strategy="cap", eta=0.0)
test_p2 = sampler_conformance("p2", DECODING, steps=4, score="random", eta=0.0)

# The autoregressive family: the oracle is the exact denoiser of the left-to-right process,
# whose first masked position is p(x_n | x_<n), so it drives the objective (its D-call path)
# and the sampler; test_autoregressive.py checks the one-call path of a causal transformer. The
# sampler cannot condition on positions given after a free one, so it is checked with
# labels only; test_autoregressive.py checks the likelihood by enumeration.
test_next_token_nll = objective_conformance("next_token_nll", AUTOREGRESSIVE)
test_left_to_right = sampler_conformance("left_to_right", AUTOREGRESSIVE)


def test_every_built_in_objective_and_sampler_is_checked():
    # Components that other installed packages register (the example plugins under
    # examples/, any third-party plugin) are checked by those packages' own tests.
    checked = {
        test.ddiff_conformance
        for test in globals().values()
        if callable(test) and hasattr(test, "ddiff_conformance")
    }
    registry = ddiff.default_registry()
    for slot in ("objective", "sampler"):
        built_in = {e.name for e in registry if e.slot == slot and e.cls.__module__.startswith("ddiff_plugins.")}
        missing = built_in - {name for kind, name in checked if kind == slot}
        assert not missing, f"{slot}s without a conformance line in this module: {sorted(missing)}"
