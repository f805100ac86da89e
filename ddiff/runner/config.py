"""The trainer's recipe sections: ``optimizer``, ``trainer``, ``eval``, ``precision`` and ``logging``
(``mesh`` is :class:`ddiff.runner.MeshConfig`). Each is a frozen dataclass whose fields are the
section's keys; a bad value raises :class:`~ddiff.RecipeError` with the key's path inside
its section, to which the recipe builder adds the section's name.
"""

import dataclasses
import importlib.util
import sys
from typing import Literal

from ddiff._errors import RecipeError, check_at_least
from ddiff._layers import COMPUTE_DTYPES
from ddiff._objective import AbstractObjective

MAX_SEED = 2**32 - 1
"""Seeds (``seed``, ``eval.seed``) are in 0..2^32 - 1, as ``ddiff``'s ``--seed`` options."""


@dataclasses.dataclass(frozen=True)
class ParameterGroupConfig:
    """AdamW settings for one group of parameters (the forward process's schedule); each
    left null takes the network's value. The group follows the same warmup and decay,
    scaled to its own peak learning rate.

    Attributes:
        learning_rate: peak learning rate.
        weight_decay: decoupled weight decay.
        b1, b2, eps: Adam moments.
    """

    learning_rate: float | None = None
    weight_decay: float | None = None
    b1: float | None = None
    b2: float | None = None
    eps: float | None = None

    def __post_init__(self) -> None:
        _require(self.learning_rate is None or self.learning_rate > 0, "learning_rate", "must be positive")
        if self.weight_decay is not None:
            check_at_least("weight_decay", self.weight_decay, 0)

    def settings(self) -> dict[str, float]:
        """The settings given (not null), by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay, global-norm clipping, and an EMA.

    Attributes:
        learning_rate: peak learning rate.
        warmup_steps: linear warmup from 0.
        decay: ``cosine`` (to ``final_lr_fraction`` of the peak at ``trainer.steps``) or
            ``constant``.
        final_lr_fraction: learning rate at the end of the cosine decay, over the peak.
        weight_decay: decoupled weight decay.
        b1, b2, eps: Adam moments.
        grad_clip: global gradient norm clip (null disables).
        ema_decay: decay d of the exponential moving average of the parameters, warmed
            up: step k (counted from 0) uses min(d, (1 + k) / (10 + k)), so the average
            forgets its initialisation within tens of steps and a short run evaluates
            sensibly (0.1 at the first step, 0.5 at step 8, 0.9 at step 80, 0.99 at
            step 890; d itself from k = (10d - 1)/(1 - d) on).
        schedule: own settings for the parameters of the forward process's schedule
            (GenMD4's learnable powers), e.g. ``{weight_decay: 0.0}``; null trains them
            with the settings above.
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 0
    decay: Literal["cosine", "constant"] = "cosine"
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    schedule: ParameterGroupConfig | None = None

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "learning_rate", "must be positive")
        check_at_least("warmup_steps", self.warmup_steps, 0)
        _require(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """How long and how to train.

    Attributes:
        steps: total optimizer steps.
        batch_size: global batch size.
        log_every: steps between metrics.jsonl lines.
        eval_every: steps between held-out evaluations (0: only at the end).
        eval_batches: batches per periodic evaluation.
        checkpoint_every: steps between checkpoints (and always at the end).
        keep_checkpoints: how many checkpoints to keep.
        sample_every: steps between samples (0: only at the end).
        num_samples: sequences sampled each time (0: none).
        sample_batch_size: sequences drawn at once (on all devices together); more
            samples are drawn in several batches, with the same result.
        final_eval: evaluate the whole eval split at the end, writing eval.json.
        on_nonfinite: a step with a non-finite loss or gradient is never applied; ``halt``
            stops with a report naming the step, the loss terms and the parameters,
            ``skip`` goes on and counts the skipped steps in the metrics.
    """

    steps: int = 1000
    batch_size: int = 32
    log_every: int = 50
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0
    num_samples: int = 16
    sample_batch_size: int = 64
    final_eval: bool = True
    on_nonfinite: Literal["halt", "skip"] = "halt"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "sample_batch_size"):
            check_at_least(name, getattr(self, name))
        for name in ("eval_every", "eval_batches", "sample_every", "num_samples"):
            check_at_least(name, getattr(self, name), 0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation of the negative ELBO.

    Attributes:
        batch_size: sequences per evaluation batch.
        time_draws: independent time (and noise) draws per sequence.
        max_examples: evaluate at most this many sequences (null: the whole split).
        seed: seed of the evaluation's randomness (fixed, so numbers are comparable).
        objectives: further objectives (sections with ``kind:``) evaluated on the same
            sequences with the same randomness and reported beside the recipe's own,
            each under its kind (``score_entropy_bits_per_token``, ...): e.g. a network
            trained with the MD4 ELBO evaluated under score entropy.
        samples: draw this many samples with the recipe's sampler at the final
            evaluation and report their quality under ``samples`` in eval.json (exact
            likelihood under a synthetic source, unigram entropy and n-gram distance
            against the data; ``ddiff eval DIR --samples N`` does it for a trained run).
    """

    batch_size: int = 64
    time_draws: int = 4
    max_examples: int | None = None
    seed: int = 1234
    objectives: tuple[AbstractObjective, ...] = ()
    samples: int = 0

    def __post_init__(self) -> None:
        check_at_least("batch_size", self.batch_size)
        check_at_least("time_draws", self.time_draws)
        check_at_least("samples", self.samples, 0)
        if self.max_examples is not None:
            check_at_least("max_examples", self.max_examples)
        _require(0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED}, got {self.seed}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where training metrics go besides ``metrics.jsonl``, which is always written:
    TensorBoard event files and Weights & Biases, each with the same records (train
    lines every ``trainer.log_every`` steps, eval results), on process 0.

    Attributes:
        tensorboard: write TensorBoard event files under ``DIR/tensorboard`` (needs
            tensorboardX: ``pip install 'ddiff[tensorboard]'``). A resumed run discards
            the events after its checkpoint, as it does in metrics.jsonl.
        wandb: log to Weights & Biases (needs wandb: ``pip install 'ddiff[wandb]'``),
            with the resolved recipe as the run's config; the W&B run's id is kept in
            ``DIR/wandb_id``, so a resumed run continues the same W&B run.
        wandb_project: the W&B project.
        wandb_entity: the W&B team or user (null: wandb's default).
        wandb_name: the W&B run's display name (null: the run directory's name).
        wandb_mode: ``online``, ``offline`` (files under ``DIR/wandb``, uploaded later
            with ``wandb sync``) or ``disabled``; null follows the ``WANDB_MODE``
            environment variable, else online.
        plot: draw the loss and eval curves into ``DIR/curves.png`` at the end of
            training (as ``ddiff plot DIR`` does at any time).
    """

    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ddiff"
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    plot: bool = False

    def __post_init__(self) -> None:
        for key, module, extra in (("tensorboard", "tensorboardX", "tensorboard"), ("wandb", "wandb", "wandb")):
            _require(
                not getattr(self, key) or _installed(module),
                key,
                f"needs the {module} package: pip install 'ddiff[{extra}]' (or set logging.{key}=false)",
            )


def _installed(module: str) -> bool:
    """Whether ``module`` is imported or can be (``sys.modules[module] = None`` blocks it,
    as it blocks ``import``)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise RecipeError(f"{key} {message}", path=key)


ComputeDtype = Literal["float32", "bfloat16", "float16"]
"""The dtypes a network may compute in (:data:`ddiff.COMPUTE_DTYPES`)."""


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """Mixed precision: the dtype every network computes in, e.g.
    ``precision: {params: float32, compute: bfloat16}``.

    Matrix products and activations run in ``compute``; parameters, gradients, optimizer
    state and the EMA stay float32, and so do the network's output, log-probabilities,
    every bound's terms, schedules and the samplers' draws
    (:attr:`ddiff.DiffusionModel.compute_dtype`). A compute dtype the backend cannot run
    is refused when the model is built.

    Attributes:
        params: dtype of the parameters (and optimizer state and EMA): ``float32``.
        compute: dtype of the networks' products and activations: ``float32``,
            ``bfloat16`` or ``float16``.
    """

    params: str = "float32"
    compute: ComputeDtype = "float32"

    def __post_init__(self) -> None:
        _require(
            self.params == "float32",
            "params",
            f"must be float32 (parameters, optimizer state and EMA stay float32; lower "
            f"precision.compute instead), got {self.params!r}",
        )
        _require(self.compute in COMPUTE_DTYPES, "compute", f"must be one of {', '.join(COMPUTE_DTYPES)}")

    @property
    def compute_dtype(self) -> str | None:
        """The :attr:`ddiff.DiffusionModel.compute_dtype`: None when computing in float32
        (the parameters' dtype), else the name."""
        return None if self.compute == "float32" else self.compute
