"""Decoding samplers for masked diffusion models with a mean parameterization: the
samplers the field uses beside ancestral sampling.

- ``confidence``: unmask the k most confident positions per step, k from a cosine
  (MaskGIT, Chang et al. 2022) or linear (LLaDA, Nie et al. 2025) schedule;
- ``threshold``: unmask every position whose confidence exceeds a threshold, at least one
  per step (Fast-dLLM's parallel decoding, Wu et al. 2025);
- ``semi_ar``: the sequence in blocks, left to right from the end of the prompt, any
  inner sampler within the current block (LLaDA's semi-autoregressive decoding, with its
  prompt-masking guidance);
- ``remdm``: ancestral sampling that also remasks decoded tokens (ReMDM, Wang et al. 2025,
  arXiv 2503.00307), with its cap, rescale and loop schedules;
- ``p2``: path planning (Peng et al. 2025, arXiv 2502.03540): a planner chooses at every
  step which positions stay or become masked, decoded tokens included;
- the transform ``suppress_tokens``: listed values get probability 0 (LLaDA's
  ``logits_eos_inf``).

Each docstring says which distribution the sampler draws from: the model's (exact with an
exact denoiser, which the conformance kit checks) or a heuristic one. Each is a step rule
run by ddiff's driver (:func:`ddiff.run_sampler`), which owns the loop, the keys (sample i
draws all its randomness from its own key), the given positions (infilling: never
changed) and the count of network evaluations (one per batched call, two under guidance);
labels and classifier-free guidance go through :class:`ddiff.Prediction`. The count
decoders (``confidence``, ``p2``) share :class:`AbstractCountDecoder`.
"""

import ddiff
from ddiff_plugins.decoding._confidence import ConfidenceSampler
from ddiff_plugins.decoding._path_planning import AbstractPathPlanningSampler, PathPlanningSampler
from ddiff_plugins.decoding._remdm import RemaskingSchedule, ReMDMSampler, remdm_logits
from ddiff_plugins.decoding._selection import (
    AbstractCountDecoder,
    Confidence,
    CountSchedule,
    confidence,
    draw_values,
    highest,
    masked_count,
    network_times,
    remaining_fraction,
    threshold_selection,
)
from ddiff_plugins.decoding._semi_ar import BlockAlignment, SemiAutoregressiveSampler, prompt_length
from ddiff_plugins.decoding._suppress import SuppressTokens
from ddiff_plugins.decoding._threshold import ThresholdSampler

__all__ = [
    "COMPONENTS",
    "AbstractCountDecoder",
    "AbstractPathPlanningSampler",
    "BlockAlignment",
    "Confidence",
    "ConfidenceSampler",
    "CountSchedule",
    "PathPlanningSampler",
    "ReMDMSampler",
    "RemaskingSchedule",
    "SemiAutoregressiveSampler",
    "SuppressTokens",
    "ThresholdSampler",
    "confidence",
    "draw_values",
    "highest",
    "network_times",
    "masked_count",
    "prompt_length",
    "remaining_fraction",
    "remdm_logits",
    "threshold_selection",
]


COMPONENTS: dict[str, dict[str, type]] = {
    "sampler": {
        "confidence": ConfidenceSampler,
        "threshold": ThresholdSampler,
        "semi_ar": SemiAutoregressiveSampler,
        "remdm": ReMDMSampler,
        "p2": PathPlanningSampler,
    },
    "transform": {"suppress_tokens": SuppressTokens},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
