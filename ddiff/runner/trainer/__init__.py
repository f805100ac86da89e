"""The trainer: a jitted, donated step on a device mesh, EMA, evaluation, samples,
checkpoints and the run directory.

Modules: :mod:`~ddiff.runner.trainer.state` (the train state and the model a recipe
builds), :mod:`~ddiff.runner.trainer.optimizer` (AdamW, parameter groups, the EMA's
decay), :mod:`~ddiff.runner.trainer.step` (the compiled step),
:mod:`~ddiff.runner.trainer.evaluation` (held-out evaluation),
:mod:`~ddiff.runner.trainer.sampling` (sampling over the mesh and sample files),
:mod:`~ddiff.runner.trainer.compiled` (compiled functions shared between Trainers),
:mod:`~ddiff.runner.trainer.rundir` (the run directory, its lock and resume rules),
:mod:`~ddiff.runner.trainer.writers` (metrics.jsonl, TensorBoard, Weights & Biases),
:mod:`~ddiff.runner.trainer.signals` (stopping on SIGTERM/SIGINT) and
:mod:`~ddiff.runner.trainer.loop` (the :class:`Trainer`).
"""

from ddiff.runner.trainer.loop import NonFiniteError, Trainer, load_run
from ddiff.runner.trainer.optimizer import make_optimizer
from ddiff.runner.trainer.rundir import write_eval
from ddiff.runner.trainer.signals import Stopped
from ddiff.runner.trainer.state import TrainState, build_model

__all__ = [
    "NonFiniteError",
    "Stopped",
    "TrainState",
    "Trainer",
    "build_model",
    "load_run",
    "make_optimizer",
    "write_eval",
]
