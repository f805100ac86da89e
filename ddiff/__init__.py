"""ddiff: a plugin framework for discrete diffusion models on JAX and Equinox.

The authoring layer: what a plugin (built-in or third-party) imports, and the only part
of ddiff it may import. The protocols of the components and their typing aliases,
capabilities, the registry and its pluggy hook, the recipe builder, errors, shared
numerics and categorical draws, and the model that objectives and samplers receive.
The layers networks are built from are :mod:`ddiff.nn`; the conformance kit is
:mod:`ddiff.testing`; the running layer (recipe files, the trainer, the command line)
is :mod:`ddiff.runner`, which nothing here imports.
"""

from ddiff import _startup, capabilities, nn  # _startup first: signals and libtpu (see there)
from ddiff._builder import NetworkSpec, SectionBuilder, build_component, constructor_hints
from ddiff._categorical import categorical, categorical_from_probs, gumbel, standard_exponential
from ddiff._config import set_typecheck, typecheck, typecheck_enabled
from ddiff._constant import Constant, partition_trainable, trainable
from ddiff._data import METRICS, AbstractDataSource, ArraySplit, RandomAccess, cached_load
from ddiff._errors import (
    DataError,
    DdiffError,
    IncompatibleComponentsError,
    RecipeError,
    RegistryError,
    check_at_least,
)
from ddiff._hookspecs import hookimpl, hookspec
from ddiff._layers import COMPUTE_DTYPES, cast_floating
from ddiff._model import DiffusionModel
from ddiff._network import (
    SUPPLIED_NETWORK_ARGUMENTS,
    AbstractBlockCausalNetwork,
    AbstractNetwork,
    BlockPrefix,
    append_to_window,
)
from ddiff._numerics import log_normalize, log_sum_exp, safe_log
from ddiff._objective import (
    AbstractDiscreteTimeObjective,
    AbstractObjective,
    BoundForm,
    ObjectiveTerms,
    bound_terms,
)
from ddiff._parameterization import (
    AbstractMeanParameterization,
    AbstractParameterization,
    AbstractScoreParameterization,
)
from ddiff._process import (
    AbstractForwardProcess,
    AbstractRateProcess,
    AbstractTransitionProcess,
    possible_mean,
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
    PAD_TOKEN,
    AbstractSampler,
    Conditioning,
    ReverseChain,
    SampleOutput,
    SamplingStart,
    TimeGrid,
    apply_fixed,
    batched_log_mean,
    batched_log_score,
    calls_per_prediction,
    initial_tokens,
    sample_keys,
    start_sampling,
    step_keys,
    still_masked,
    time_grid,
)
from ddiff._sampling import (
    AbstractGridSampler,
    AbstractLoopSampler,
    AbstractStepSampler,
    Prediction,
    run_sampler,
)
from ddiff._sampling_transforms import AbstractLogProbTransform, Chain, TopP, chain
from ddiff._schedule import AbstractSchedule, time_of_alpha
from ddiff._tables import check_table_fits
from ddiff._typing import (
    AbstractCheckedModule,
    Calls,
    Key,
    KeyBatch,
    Label,
    LabelBatch,
    LogProbRows,
    LogProbs,
    NetworkOutput,
    PositionMask,
    Scalar,
    ScheduleValue,
    StateLogProbs,
    StateProbs,
    Time,
    TimeBatch,
    TokenBatch,
    Tokens,
)
from ddiff._weighting import AbstractWeighting, weighted_terms

__version__ = "0.1.0"

__all__ = [
    # protocols
    "AbstractBlockCausalNetwork",
    "AbstractCheckedModule",
    "AbstractDataSource",
    "AbstractDiscreteTimeObjective",
    "AbstractForwardProcess",
    "AbstractGridSampler",
    "AbstractLogProbTransform",
    "AbstractLoopSampler",
    "AbstractMeanParameterization",
    "AbstractNetwork",
    "AbstractObjective",
    "AbstractParameterization",
    "AbstractRateProcess",
    "AbstractSampler",
    "AbstractSchedule",
    "AbstractScoreParameterization",
    "AbstractStepSampler",
    "AbstractTransitionProcess",
    "AbstractWeighting",
    # what components receive, return, hold and declare
    "ArraySplit",
    "BoundForm",
    "BlockPrefix",
    "Chain",
    "Conditioning",
    "Constant",
    "DiffusionModel",
    "ObjectiveTerms",
    "Prediction",
    "RandomAccess",
    "ReverseChain",
    "SampleOutput",
    "SamplingStart",
    "TopP",
    "partition_trainable",
    "trainable",
    # typing aliases
    "Calls",
    "Key",
    "KeyBatch",
    "Label",
    "LabelBatch",
    "LogProbRows",
    "LogProbs",
    "NetworkOutput",
    "PositionMask",
    "Scalar",
    "ScheduleValue",
    "StateLogProbs",
    "StateProbs",
    "Time",
    "TimeGrid",
    "TimeBatch",
    "TokenBatch",
    "Tokens",
    # capabilities, registry and hooks
    "ENTRY_POINT_GROUP",
    "SLOTS",
    "Registry",
    "build_registry",
    "capabilities",
    "default_registry",
    "hookimpl",
    "hookspec",
    "make_plugin_manager",
    # the layers of networks
    "nn",
    # the recipe builder
    "SUPPLIED_NETWORK_ARGUMENTS",
    "NetworkSpec",
    "SectionBuilder",
    "build_component",
    "constructor_hints",
    # errors and checks
    "DataError",
    "DdiffError",
    "IncompatibleComponentsError",
    "RecipeError",
    "RegistryError",
    "check_at_least",
    "check_table_fits",
    # shared numerics and sampling helpers
    "COMPUTE_DTYPES",
    "METRICS",
    "PAD_TOKEN",
    "append_to_window",
    "apply_fixed",
    "batched_log_mean",
    "batched_log_score",
    "bound_terms",
    "cached_load",
    "calls_per_prediction",
    "cast_floating",
    "categorical",
    "categorical_from_probs",
    "chain",
    "gumbel",
    "initial_tokens",
    "log_normalize",
    "log_sum_exp",
    "possible_mean",
    "run_sampler",
    "safe_log",
    "sample_keys",
    "standard_exponential",
    "start_sampling",
    "step_keys",
    "still_masked",
    "time_grid",
    "time_of_alpha",
    "weighted_terms",
    # trace-time type checks
    "set_typecheck",
    "typecheck",
    "typecheck_enabled",
]
