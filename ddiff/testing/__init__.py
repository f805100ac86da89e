"""ddiff.testing: the conformance kit. Prove an objective or sampler against exact answers.

On toy distributions small enough to enumerate (V^D sequences, e.g. V=3, D=4), the exact
denoiser, score and reverse rates of any forward process whose marginals factorize are
computed by enumeration, and an oracle network built from them drives objectives and
samplers. The checks (see ``docs/conformance.md``):

(a) ``check_tight``: a continuous-time objective with the oracle equals H(p) up to the
    exact prior mismatch at t = 1 (and a reconstruction slack at t = 0).
(b) ``check_discrete_bound``: a discrete-time objective with the oracle is an upper bound
    whose gap shrinks as the number of steps grows.
(c) ``check_entropy_bound``: any model's (an untrained one's) expected objective is at
    least H(p).
(d) ``check_sampler``: a sampler driven by the oracle reproduces p (chi-square test at a
    stated false-alarm rate), unconditionally, given labels, and with given positions.
(e) ``check_schedule_invariance``: the continuous-time ELBO is the same for every schedule.
(f) ``check_gradient``: an objective's gradient estimate (e.g. REINFORCE for a learnable
    schedule) is unbiased: its mean matches the exact gradient of the bound computed by
    enumeration (``exact_diffusion_nelbo``).

One line in a pytest module runs every applicable check on a registered component::

    test_md4_elbo = ddiff.testing.objective_conformance("md4_elbo")
    test_ancestral = ddiff.testing.sampler_conformance("ancestral", steps=256)
"""

from ddiff.testing._block import exact_block_log_denoiser
from ddiff.testing._checks import (
    CheckResult,
    ConformanceError,
    check_discrete_bound,
    check_entropy_bound,
    check_gradient,
    check_sampler,
    check_schedule_invariance,
    check_tight,
    chi_square_test,
    normal_false_alarm,
    sampling_conditioning,
)
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
from ddiff.testing._suite import (
    DEFAULT_NETWORK,
    DEFAULT_PARAMETERIZATION,
    DEFAULT_PROCESS,
    DEFAULT_SAMPLER_CASES,
    DISCRETE_STEPS,
    SAMPLER_CASES,
    Setup,
    objective_checks,
    objective_conformance,
    run_objective_conformance,
    run_sampler_conformance,
    sampler_checks,
    sampler_conformance,
)
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
    "CheckResult",
    "ConformanceError",
    "DEFAULT_NETWORK",
    "DEFAULT_PARAMETERIZATION",
    "DEFAULT_PROCESS",
    "DEFAULT_SAMPLER_CASES",
    "DISCRETE_STEPS",
    "MAX_SEQUENCES",
    "OracleNetwork",
    "SAMPLER_CASES",
    "Setup",
    "ToyDistribution",
    "check_discrete_bound",
    "check_entropy_bound",
    "check_gradient",
    "check_sampler",
    "check_schedule_invariance",
    "check_tight",
    "chi_square_test",
    "class_conditional_toy",
    "dense_toy",
    "exact_block_log_denoiser",
    "exact_diffusion_nelbo",
    "exact_log_denoiser",
    "exact_log_marginal",
    "exact_log_posterior",
    "exact_log_score",
    "exact_reverse_rates",
    "independent_toy",
    "markov_toy",
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
    "total_correlation",
    "toy_distributions",
]
