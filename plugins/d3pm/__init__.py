"""D3PM (Austin et al., NeurIPS 2021): discrete-time diffusion with structured transition
matrices, the variational bound L_vb, the hybrid loss L_lambda and ancestral sampling.

Every family is a forward process that owns a schedule alpha with
alpha(i/T) = prod_{j <= i} (1 - beta_j), so beta_i = 1 - alpha(i/T) / alpha((i-1)/T):

- absorbing: the ``masked`` process of the md4 plugin (D3PM App. A.2.2, closed form);
- uniform: the ``uniform`` process of the common plugin (App. A.2.1, closed form);
- discretized Gaussian: :class:`DiscretizedGaussianProcess` here (App. A.2.3), whose
  one-step and cumulative matrices are tabulated for a fixed number of steps.

Time i/T of a T-step model is t = i/T in [0, 1]; x_0 is clean (alpha(0) = 1 for every
schedule here). Everything is computed in log space: no probability is padded by an
epsilon before its logarithm, and a zero probability contributes exactly 0 to a KL term.
"""

import ddiff
from ddiff_plugins.d3pm._bound import D3PMBound, categorical_kl
from ddiff_plugins.d3pm._gaussian import DiscretizedGaussianProcess, gaussian_transition_matrix
from ddiff_plugins.d3pm._mutual_information import MutualInformationSchedule
from ddiff_plugins.d3pm._parameterization import DiscretizedLogisticParameterization
from ddiff_plugins.d3pm._sampler import D3PMAncestralSampler
from ddiff_plugins.d3pm._schedules import (
    GRID_TOLERANCE,
    D3PMCosineSchedule,
    D3PMLinearSchedule,
    JSDSchedule,
    log_matmul,
)

__all__ = [
    "COMPONENTS",
    "D3PMAncestralSampler",
    "D3PMBound",
    "D3PMCosineSchedule",
    "D3PMLinearSchedule",
    "DiscretizedGaussianProcess",
    "DiscretizedLogisticParameterization",
    "GRID_TOLERANCE",
    "JSDSchedule",
    "MutualInformationSchedule",
    "categorical_kl",
    "gaussian_transition_matrix",
    "log_matmul",
]


COMPONENTS: dict[str, dict[str, type]] = {
    "schedule": {
        "jsd": JSDSchedule,
        "d3pm_cosine": D3PMCosineSchedule,
        "d3pm_linear": D3PMLinearSchedule,
        "mutual_information": MutualInformationSchedule,
    },
    "process": {"discretized_gaussian": DiscretizedGaussianProcess},
    "parameterization": {"discretized_logistic": DiscretizedLogisticParameterization},
    "objective": {"d3pm_vb": D3PMBound},
    "sampler": {"d3pm_ancestral": D3PMAncestralSampler},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
