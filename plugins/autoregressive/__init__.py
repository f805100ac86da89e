"""The autoregressive family: a causal transformer trained with the exact next-token
likelihood and sampled left to right, as a judge of other models' samples (generative
perplexity) and as the baseline of the papers' comparisons.

It fits ddiff's protocols as the masked model of a process whose masking order is fixed:
the ``left_to_right`` process masks the last positions first, so at time t_n = 1 - n/D
exactly the first n positions are visible. Its denoiser at the first masked position n is
p(x_n | x_<n), the next-token distribution, so a model of it is an autoregressive model:
``next_token`` reads a network's output as mu at the masked positions, the
``next_token_nll`` objective is the exact negative log-likelihood -sum_n log p(x_n | x_<n)
(the process's D-step bound, with no gap), and the ``left_to_right`` sampler is its
ancestral sampler. A ``causal_transformer`` (output n sees inputs < n only) gives all D
conditionals from one call on the clean sequence. Capabilities keep the family apart:
the process is not ``masked`` (its masks are not independent per position), so no masked
diffusion objective or sampler accepts it, and this family's objective, parameterization
and sampler need a ``left_to_right`` process.
"""

import ddiff
from ddiff_plugins.autoregressive._network import CausalBlock, CausalTransformer
from ddiff_plugins.autoregressive._objective import NextTokenNLL, prefix_state
from ddiff_plugins.autoregressive._parameterization import NextTokenParameterization
from ddiff_plugins.autoregressive._process import (
    CAUSAL,
    EXACT_LIKELIHOOD,
    LEFT_TO_RIGHT,
    LeftToRightProcess,
    VisibleFraction,
    visible_count,
)
from ddiff_plugins.autoregressive._sampler import LeftToRightSampler

__all__ = [
    "COMPONENTS",
    "CAUSAL",
    "CausalBlock",
    "CausalTransformer",
    "EXACT_LIKELIHOOD",
    "LEFT_TO_RIGHT",
    "LeftToRightProcess",
    "LeftToRightSampler",
    "NextTokenNLL",
    "NextTokenParameterization",
    "VisibleFraction",
    "prefix_state",
    "visible_count",
]


COMPONENTS: dict[str, dict[str, type]] = {
    "process": {"left_to_right": LeftToRightProcess},
    "parameterization": {"next_token": NextTokenParameterization},
    "network": {"causal_transformer": CausalTransformer},
    "objective": {"next_token_nll": NextTokenNLL},
    "sampler": {"left_to_right": LeftToRightSampler},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
