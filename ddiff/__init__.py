"""ddiff: a plugin framework for discrete diffusion models on JAX and Equinox.

The public API. Plugins (built-in or third-party) import from here only.
"""

from ddiff import capabilities
from ddiff._categorical import categorical, categorical_from_probs, gumbel, standard_exponential
from ddiff._config import set_typecheck, typecheck, typecheck_enabled
from ddiff._constant import Constant, partition_trainable, trainable
from ddiff._data import (
    METRICS,
    AbstractDataSource,
    ArraySplit,
    RandomAccess,
    eval_batches,
    metric_report,
    train_batches,
    validate_batch,
)
from ddiff._errors import (
    DataError,
    DdiffError,
    IncompatibleComponentsError,
    RecipeError,
    RegistryError,
    RunDirectoryError,
)
from ddiff._hookspecs import hookimpl, hookspec
from ddiff._images import image_grid, png_bytes
from ddiff._layers import COMPUTE_DTYPES, LayerStack, cast_floating, stack_layers
from ddiff._model import DiffusionModel
from ddiff._network import NETWORK_CONTEXT, AbstractNetwork
from ddiff._objective import AbstractObjective, ObjectiveTerms, bound_terms
from ddiff._parameterization import (
    AbstractMeanParameterization,
    AbstractParameterization,
    AbstractScoreParameterization,
)
from ddiff._plot import plot_run
from ddiff._process import (
    AbstractForwardProcess,
    AbstractRateProcess,
    AbstractTransitionProcess,
    possible_mean,
)
from ddiff._recipe import (
    EvalConfig,
    NetworkSpec,
    OptimizerConfig,
    ParameterGroupConfig,
    Recipe,
    TrainerConfig,
    apply_overrides,
    build_component,
    build_recipe,
    load_recipe,
    read_recipe_file,
)
from ddiff._registry import (
    ENTRY_POINT_GROUP,
    SLOTS,
    Registry,
    build_registry,
    default_registry,
    make_plugin_manager,
)
from ddiff._sampler import (
    AbstractSampler,
    Conditioning,
    SampleOutput,
    TimeGrid,
    apply_fixed,
    batched_log_mean,
    batched_log_score,
    calls_per_prediction,
    initial_tokens,
    time_grid,
)
from ddiff._schedule import AbstractSchedule
from ddiff._train import Trainer, TrainState, build_model, load_run, make_optimizer
from ddiff._typing import (
    AbstractCheckedModule,
    Key,
    Label,
    Labels,
    LogProbs,
    NetworkOutput,
    PositionMask,
    Scalar,
    ScheduleValue,
    StateLogProbs,
    StateProbs,
    Time,
    Times,
    TokenBatch,
    Tokens,
)

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]
