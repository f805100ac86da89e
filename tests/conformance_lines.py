"""The setups of the conformance lines in ``tests/test_conformance.py``, shared with
``tests/test_mutants.py``: each mutant runs a check of the very line (sizes, seeds,
tolerances) its built-in passes."""

from ddiff.testing import Setup

LIGHT = {"num_examples": 2**14, "num_samples": 2**12}
"""The later families' lines draw 2^14 examples per objective mean and 2^12 samples per
sampler check (a quarter and a half of the kit's defaults) to keep the suite within its
time budget; tolerances scale with the standard error (z = 4) and the chi-square
false-alarm rate stays 1e-3."""

MD4 = Setup()
MD4_COSINE = Setup(process={"kind": "masked", "schedule": "cosine"})
CAMPBELL = Setup(**LIGHT)

D3PM_ABSORBING = Setup(**LIGHT, process={"kind": "masked", "schedule": "jsd"}, parameterization="mean")
D3PM_UNIFORM = Setup(
    **LIGHT,
    process={"kind": "uniform", "schedule": "d3pm_cosine"},
    parameterization="x0",
    sampler_cases=("exact[none/markov]", "exact[labels/classes]"),
)

ABSORBING = Setup(**LIGHT, process={"kind": "masked", "schedule": {"kind": "loglinear"}}, parameterization="mean")
ABSORBING_COSINE = Setup(**LIGHT, process={"kind": "masked", "schedule": {"kind": "cosine"}}, parameterization="mean")
ABSORBING_SCALED = Setup(**LIGHT, process={"kind": "masked", "schedule": {"kind": "loglinear"}}, parameterization="score")
UNIFORM_SCORE = Setup(**LIGHT, process={"kind": "uniform", "schedule": {"kind": "geometric"}}, parameterization="score")
UNIFORM = Setup(
    **LIGHT,
    process={"kind": "uniform", "schedule": {"kind": "geometric"}},
    parameterization="x0",
    sampler_cases=("exact[none/markov]", "exact[labels/classes]"),
)
UNIFORM_LINEAR = Setup(
    **LIGHT,
    process={"kind": "uniform", "schedule": "linear"},
    parameterization="x0",
    sampler_cases=("exact[none/markov]", "exact[labels/classes]"),
)

GENMD4 = Setup(
    **LIGHT,
    process={"kind": "masked", "schedule": {"kind": "learnable_poly", "initial_powers": [0.7, 1.5, 3.0]}},
)

BD3LM = Setup(**LIGHT, sampler_cases=("exact[none/markov]", "exact[labels/classes]"))
"""Block diffusion on D = 4 in blocks of L' = 2: a block is conditioned on the given
positions before and within it, not on later ones (exact for a prefix, not for
infilling), so the sampler is checked with labels alone."""

DECODING = Setup(**LIGHT, sampler_cases=("exact[labels+infill/classes]",))
"""The decoding samplers, each in the setting where it draws the model's distribution."""

AUTOREGRESSIVE = Setup(
    **LIGHT,
    process="left_to_right",
    parameterization="next_token",
    sampler_cases=("exact[labels/classes]",),
)
"""The autoregressive family; its sampler cannot condition on positions given after a
free one, so it is checked with labels only."""
