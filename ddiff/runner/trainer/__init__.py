"""The trainer: a jitted, donated step on a device mesh, EMA, evaluation, samples,
checkpoints and the run directory.

Modules: :mod:`~ddiff.runner.trainer.state` (the train state),
:mod:`~ddiff.runner.trainer.optimizer` (AdamW, parameter groups, the EMA's decay),
:mod:`~ddiff.runner.trainer.step` (the compiled step),
:mod:`~ddiff.runner.trainer.evaluation` (held-out evaluation),
:mod:`~ddiff.runner.trainer.sampling` (sampling over the mesh and sample files),
:mod:`~ddiff.runner.trainer.compiled` (compiled functions shared between engines),
:mod:`~ddiff.runner.trainer.engine` (the :class:`Engine`: a recipe's compiled programs on
a mesh, with no run directory), :mod:`~ddiff.runner.trainer.rundir` (the run directory,
its lock, its resume rules and :func:`load_run`), :mod:`~ddiff.runner.trainer.writers`
(metrics.jsonl, TensorBoard, Weights & Biases), :mod:`~ddiff.runner.trainer.signals`
(stopping on SIGTERM/SIGINT) and :mod:`~ddiff.runner.trainer.loop` (the
:class:`Trainer`).
"""

from ddiff.runner.trainer.engine import Engine
from ddiff.runner.trainer.loop import NonFiniteError, Trainer
from ddiff.runner.trainer.optimizer import make_optimizer
from ddiff.runner.trainer.rundir import load_run, write_eval
from ddiff.runner.trainer.signals import Stopped
from ddiff.runner.trainer.state import TrainState

__all__ = [
    "Engine",
    "NonFiniteError",
    "Stopped",
    "TrainState",
    "Trainer",
    "load_run",
    "make_optimizer",
    "write_eval",
]
