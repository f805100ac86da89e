"""ddiff.testing: the conformance kit. Prove an objective or sampler against exact answers.

On toy distributions small enough to enumerate (V^D sequences, e.g. V=3, D=4), the exact
denoiser, score and reverse rates of any forward process whose marginals factorize are
computed by enumeration, and an oracle network built from them drives objectives and
samplers; random table networks (any function of (x_t, t, label)) drive them where the
oracle would hide a mistake, against exact references computed in float64 from the
process's marginals and transitions alone: the value of every term of the bound an
objective declares (:meth:`ddiff.AbstractObjective.bound_form`) per clean sequence, and
the law of the output of the chain a sampler declares
(:meth:`ddiff.AbstractSampler.reverse_chain`). The checks (see ``docs/conformance.md``):

(a) ``check_tight``: a continuous-time objective with the oracle equals H(p) up to the
    exact prior mismatch at t = 1 (and a reconstruction slack at t = 0).
(b) ``check_discrete_bound``: a discrete-time objective with the oracle is an upper bound
    whose gap shrinks as the number of steps grows.
(c) ``check_entropy_bound``: any model's (a wrong oracle's) expected objective is at
    least H(p).
(d) ``check_chain_limit``: a sampler's chain driven by the exact denoiser reproduces p
    (exactly computed, within a total variation), unconditionally, given labels, and with
    given positions; ``check_sampler`` samples a sampler without a declared chain.
(e) ``check_schedule_invariance``: the continuous-time ELBO is the same for two schedules.
(f) ``check_gradient``: an objective's gradient estimate (e.g. REINFORCE for a learnable
    schedule) is unbiased: its mean matches the exact gradient of the bound computed by
    enumeration (``exact_diffusion_nelbo``).
(g) ``check_bound_terms``: with a time-dependent table model, an objective's nelbo and
    each term it reports are unbiased for their exact values, per x_0 and pooled.
(h) ``check_reverse_chain``: with a time-dependent table model, a sampler's samples follow
    the exact law of its chain (chi-square), with labels, infilling and guidance.

One line in a pytest module runs every applicable check on a registered component::

    test_md4_elbo = ddiff.testing.objective_conformance("md4_elbo")
    test_ancestral = ddiff.testing.sampler_conformance("ancestral", steps=256)
"""

from ddiff.testing._block import exact_block_log_denoiser
from ddiff.testing._bounds import exact_bound_terms
from ddiff.testing._chains import Combos, chain_law, exact_target
from ddiff.testing._exact import (
    OracleNetwork,
    exact_diffusion_nelbo,
    exact_log_denoiser,
    exact_log_marginal,
    exact_log_posterior,
    exact_log_score,
    exact_reverse_rates,
    oracle_model,
    oracle_network,
    oracle_output,
    prior_gap,
    reverse_kl_rate,
)
from ddiff.testing._objective_checks import (
    BOUND_TERMS,
    check_bound_terms,
    check_discrete_bound,
    check_entropy_bound,
    check_gradient,
    check_schedule_invariance,
    check_tight,
)
from ddiff.testing._predictions import (
    exact_predictions,
    model_predictions,
    score_from_mean,
    tweedie_problem,
)
from ddiff.testing._process_tables import noisy_states
from ddiff.testing._results import (
    CheckResult,
    ConformanceError,
    chi_square_test,
    normal_false_alarm,
)
from ddiff.testing._sampler_checks import (
    check_chain_limit,
    check_reverse_chain,
    check_sampler,
    conditioning_patterns,
    sampling_conditioning,
)
from ddiff.testing._suite import (
    DEFAULT_NETWORK,
    DEFAULT_PARAMETERIZATION,
    DEFAULT_PROCESS,
    DEFAULT_SAMPLER_CASES,
    DISCRETE_STEPS,
    LAW_CASES,
    SAMPLER_CASES,
    Setup,
    objective_checks,
    objective_conformance,
    run_objective_conformance,
    run_sampler_conformance,
    sampler_checks,
    sampler_conformance,
)
from ddiff.testing._table import TableNetwork, table_model, table_network
from ddiff.testing._toy import (
    MAX_SEQUENCES,
    ToyDistribution,
    class_conditional_toy,
    dense_toy,
    independent_toy,
    markov_toy,
    parity_toy,
    total_correlation,
    toy_distributions,
)

__all__ = [
    "BOUND_TERMS",
    "CheckResult",
    "Combos",
    "ConformanceError",
    "DEFAULT_NETWORK",
    "DEFAULT_PARAMETERIZATION",
    "DEFAULT_PROCESS",
    "DEFAULT_SAMPLER_CASES",
    "DISCRETE_STEPS",
    "LAW_CASES",
    "MAX_SEQUENCES",
    "OracleNetwork",
    "SAMPLER_CASES",
    "Setup",
    "TableNetwork",
    "ToyDistribution",
    "chain_law",
    "check_bound_terms",
    "check_chain_limit",
    "check_discrete_bound",
    "check_entropy_bound",
    "check_gradient",
    "check_reverse_chain",
    "check_sampler",
    "check_schedule_invariance",
    "check_tight",
    "chi_square_test",
    "class_conditional_toy",
    "conditioning_patterns",
    "dense_toy",
    "exact_bound_terms",
    "exact_block_log_denoiser",
    "exact_diffusion_nelbo",
    "exact_log_denoiser",
    "exact_log_marginal",
    "exact_log_posterior",
    "exact_log_score",
    "exact_predictions",
    "exact_reverse_rates",
    "exact_target",
    "independent_toy",
    "markov_toy",
    "model_predictions",
    "noisy_states",
    "normal_false_alarm",
    "objective_checks",
    "objective_conformance",
    "oracle_model",
    "oracle_network",
    "oracle_output",
    "parity_toy",
    "prior_gap",
    "reverse_kl_rate",
    "run_objective_conformance",
    "run_sampler_conformance",
    "sampler_checks",
    "sampler_conformance",
    "sampling_conditioning",
    "score_from_mean",
    "table_model",
    "table_network",
    "total_correlation",
    "toy_distributions",
    "tweedie_problem",
]
