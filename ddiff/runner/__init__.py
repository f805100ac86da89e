"""ddiff.runner: the running layer. Recipe files, the model a recipe builds, the engine
and the trainer, checkpoints, meshes, the command line, diagnostics, sample quality,
benchmarks and plots.

Nothing in the authoring layer (:mod:`ddiff`, :mod:`ddiff.testing`, plugins) imports
this package; it builds on that layer. Modules: :mod:`~ddiff.runner.recipe` (YAML recipe
files, overrides, :class:`Recipe`), :mod:`~ddiff.runner.config` (the ``optimizer``,
``trainer``, ``eval``, ``precision`` and ``logging`` sections), :mod:`~ddiff.runner.mesh`
(the ``mesh`` section, meshes and placement), :mod:`~ddiff.runner.model` (the model a
recipe builds: :func:`build_model`), :mod:`~ddiff.runner.pipeline` (batching data
sources), :mod:`~ddiff.runner.trainer` (the :class:`Engine`, the :class:`Trainer` and
the run directory), :mod:`~ddiff.runner.checkpoint`, :mod:`~ddiff.runner.distributed`,
:mod:`~ddiff.runner.sample_options` (what ``ddiff sample`` conditions on),
:mod:`~ddiff.runner.quality` and :mod:`~ddiff.runner.quality_sweep` (sample quality, and
against cost), :mod:`~ddiff.runner.diagnose`, :mod:`~ddiff.runner.bench` (the benchmark),
:mod:`~ddiff.runner.plot`, :mod:`~ddiff.runner.images`, :mod:`~ddiff.runner.files`
(atomic writes), :mod:`~ddiff.runner.cli` (the ``ddiff`` command: parsing, dispatch and
the one-line error) and :mod:`~ddiff.runner.commands` (one module per command).
"""

from ddiff._errors import RunDirectoryError
from ddiff.runner.cli import main
from ddiff.runner.config import (
    EvalConfig,
    LoggingConfig,
    OptimizerConfig,
    ParameterGroupConfig,
    PrecisionConfig,
    TrainerConfig,
)
from ddiff.runner.diagnose import diagnose
from ddiff.runner.distributed import initialize
from ddiff.runner.images import image_grid, png_bytes
from ddiff.runner.mesh import MeshConfig, make_mesh
from ddiff.runner.model import build_model
from ddiff.runner.pipeline import eval_batches, metric_report, train_batches, validate_batch
from ddiff.runner.plot import plot_run
from ddiff.runner.recipe import Recipe, apply_overrides, build_recipe, load_recipe, read_recipe_file
from ddiff.runner.trainer import (
    Engine,
    NonFiniteError,
    Stopped,
    Trainer,
    TrainState,
    load_run,
    make_optimizer,
    write_eval,
)

__all__ = [
    "Engine",
    "EvalConfig",
    "LoggingConfig",
    "MeshConfig",
    "NonFiniteError",
    "OptimizerConfig",
    "ParameterGroupConfig",
    "PrecisionConfig",
    "Recipe",
    "RunDirectoryError",
    "Stopped",
    "TrainState",
    "Trainer",
    "TrainerConfig",
    "apply_overrides",
    "build_model",
    "build_recipe",
    "diagnose",
    "eval_batches",
    "image_grid",
    "initialize",
    "load_recipe",
    "load_run",
    "main",
    "make_mesh",
    "make_optimizer",
    "metric_report",
    "plot_run",
    "png_bytes",
    "read_recipe_file",
    "train_batches",
    "validate_batch",
    "write_eval",
]
