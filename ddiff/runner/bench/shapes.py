"""The benchmark's catalogue, as data: the named shapes (a recipe and the batches and
steps it is timed at), the families of components a sampler or objective is tried in,
the settings the bench gives components that have required keys, and each built-in
network's FLOPs formula."""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Shape:
    """A named benchmark shape: a recipe and what it is timed at.

    Attributes:
        name, description: how it is asked for and shown.
        recipe: the recipe mapping (its ``trainer.batch_size`` is replaced by the batch).
        batch_size: train batch on CPU; ``accelerator_batch_size`` on GPU and TPU.
        sample_batch, sample_steps: the sampling runs' batch and steps (samplers with a
            ``steps`` setting take ``sample_steps``; first-hitting samplers unmask
            length / ``sample_steps`` tokens per call).
        repeats: timed train steps (the median is reported).
    """

    name: str
    description: str
    recipe: dict[str, Any]
    batch_size: int
    accelerator_batch_size: int
    sample_batch: int
    sample_steps: int
    repeats: int = 10


MD4_RECIPE: dict[str, Any] = {
    "seed": 0,
    "process": {"kind": "masked", "schedule": {"kind": "linear"}},
    "parameterization": {"kind": "mean"},
    "objective": {"kind": "md4_elbo"},
    "sampler": {"kind": "ancestral", "grid": "cosine"},
    "optimizer": {
        "learning_rate": 3e-4, "warmup_steps": 2000, "decay": "cosine", "weight_decay": 0.0,
        "b2": 0.999, "grad_clip": None, "ema_decay": 0.9999,
    },
    "trainer": {"steps": 1_000_000, "log_every": 1000, "checkpoint_every": 1000, "num_samples": 0},
    "eval": {"batch_size": 1, "time_draws": 1},
    "mesh": {"data": 1, "fsdp": 1},
}  # fmt: skip
"""The sections every shape shares: MD4 (continuous-time ELBO, linear schedule, AdamW,
EMA); a shape adds its network and a ``random_tokens`` source of its vocabulary and length
(only the sizes are used: the timed batches are random tokens, and the source builds no
table, so GPT-2's 50,257 symbols cost nothing to load)."""

MD4_TRANSFORMER: dict[str, Any] = {
    "kind": "md4_transformer", "cond_dim": 64, "mlp": "glu", "dropout": 0.0, "depth_scaled_init": True,
}  # fmt: skip
"""The MD4 transformer's settings besides its width, depth and heads."""


def _md4_recipe(num_symbols: int, length: int, network: dict[str, Any]) -> dict[str, Any]:
    """:data:`MD4_RECIPE` with ``network`` and a ``random_tokens`` source of ``num_symbols``
    symbols and ``length`` positions (64 train and 16 eval sequences)."""
    data = {"kind": "random_tokens", "num_symbols": num_symbols, "length": length, "num_train": 64, "num_eval": 16}
    return {**MD4_RECIPE, "data": data, "network": network}


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape(
            name="md4-text8-small",
            description="MD4 transformer 4 x 256 (4 heads, GLU, adaLN-zero), L=256, V=27",
            recipe=_md4_recipe(27, 256, {**MD4_TRANSFORMER, "dim": 256, "depth": 4, "heads": 4}),
            batch_size=16, accelerator_batch_size=16, sample_batch=8, sample_steps=64,
        ),
        Shape(
            name="md4-s",
            description="MD4-S: MD4 transformer 12 x 768 (12 heads), L=1024, V=50257 (GPT-2)",
            recipe=_md4_recipe(50257, 1024, {**MD4_TRANSFORMER, "dim": 768, "depth": 12, "heads": 12}),
            batch_size=2, accelerator_batch_size=32, sample_batch=2, sample_steps=4, repeats=3,
        ),
        Shape(
            name="cifar-unet",
            description="MD4 CIFAR-10 UNet: 128 channels, 32 + 33 residual blocks, 32x32x3, V=256",
            recipe=_md4_recipe(
                256, 3072,
                {"kind": "unet", "image_shape": [32, 32, 3], "channels": 128, "num_blocks": 32, "dropout": 0.1},
            ),
            batch_size=2, accelerator_batch_size=64, sample_batch=2, sample_steps=4, repeats=3,
        ),
        Shape(
            name="tiny",
            description="MD4 transformer 2 x 32 (2 heads), L=16, V=5 (for tests)",
            recipe=_md4_recipe(5, 16, {**MD4_TRANSFORMER, "dim": 32, "depth": 2, "heads": 2}),
            batch_size=4, accelerator_batch_size=4, sample_batch=2, sample_steps=4, repeats=2,
        ),
    )
}  # fmt: skip
"""The named shapes."""

REQUIRED_SETTINGS: dict[str, dict[str, Any]] = {
    "bd3lm_elbo": {"block_size": 4},
    "bd3lm": {"block_size": 4, "inner": {"kind": "first_hitting"}},
    "semi_ar": {"block_length": 4, "inner": {"kind": "first_hitting"}},
}
"""Settings the bench gives components that have required keys (every shape's length is
a multiple of 4)."""

def _section(kind: str) -> dict[str, Any]:
    """The section of component ``kind``, with the bench's settings of its required keys."""
    return {"kind": kind, **REQUIRED_SETTINGS.get(kind, {})}


FAMILIES: dict[str, dict[str, Any]] = {
    **{
        name: {
            "process": {"kind": process, "schedule": {"kind": schedule}},
            "parameterization": {"kind": parameterization},
            "objective": _section(objective),
            "sampler": _section(sampler),
        }
        for name, process, schedule, parameterization, objective, sampler in (
            ("md4", "masked", "linear", "mean", "md4_elbo", "ancestral"),
            ("genmd4", "masked", "learnable_poly", "mean", "genmd4_elbo", "genmd4_ancestral"),
            ("sedd", "masked", "loglinear", "score", "score_entropy", "analytic"),
            ("d3pm", "masked", "jsd", "mean", "d3pm_vb", "d3pm_ancestral"),
            ("campbell", "masked", "linear", "mean", "campbell_elbo", "tau_leaping"),
            ("uniform", "uniform", "geometric", "score", "score_entropy", "analytic"),
            ("bd3lm", "masked", "linear", "mean", "bd3lm_elbo", "bd3lm"),
        )
    },
    "autoregressive": {
        "process": {"kind": "left_to_right"},
        "parameterization": {"kind": "next_token"},
        "objective": {"kind": "next_token_nll"},
        "sampler": {"kind": "left_to_right"},
        "network": {"kind": "causal_transformer"},
    },
}
"""Process, parameterization, objective and sampler sections that pair with each other;
a sampler or objective is tried in place of its family's, in order (after the shape's own
family), each also with a network that ignores time."""

FLOPS_FORMULAS = {
    "md4_transformer": "6 N + 12 L d T (N: per-position matrix weights of the blocks and head)",
    "transformer": "6 N + 12 L d T (N: per-position matrix weights of the blocks and head)",
    "unet": "3 x (2 x conv weights per pixel + attention 8 C^2 + 4 H W C per pixel) / sub-pixels",
}
"""The train-step FLOPs formula of each built-in network, as written in its docstring."""
