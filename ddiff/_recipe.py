"""Recipes: safe YAML mapped onto typed components and configs, checked at load time.

A component section names a registered class with ``kind:``; its other keys are the
class's constructor arguments, checked against the constructor's signature and type
hints, with nested components built recursively. Values ddiff derives itself (the
vocabulary size from the data, the network's input and output sizes) are never written
in a recipe. Every error names the file, the dotted key path and what is accepted.
"""

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from beartype import BeartypeConf
from beartype.door import is_bearable

from ddiff._capabilities import check_compatibility
from ddiff._data import AbstractDataSource
from ddiff._errors import DdiffError, RecipeError
from ddiff._mesh import MeshConfig
from ddiff._network import NETWORK_CONTEXT, AbstractNetwork
from ddiff._objective import AbstractObjective
from ddiff._parameterization import AbstractParameterization
from ddiff._process import AbstractForwardProcess
from ddiff._registry import SLOTS, Registry, default_registry, unknown_name_message
from ddiff._sampler import AbstractSampler

_TOWER = BeartypeConf(is_pep484_tower=True)


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML with the YAML 1.2 core schema's numbers and booleans: ``1e-4`` is a
    float, ``no``/``on`` stay strings, duplicate keys are errors."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; errors become one-line :class:`RecipeError`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"invalid YAML at {where}: {problem}", source=source) from None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a plain mapping."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError("no such recipe file; check the path", source=source) from None
    except OSError as error:
        raise RecipeError(f"cannot read the recipe: {error.strerror}", source=source) from None
    raw = parse_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"a recipe is a mapping of sections, got {type(raw).__name__}", source=source
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply ``dotted.path=value`` overrides (values parsed as YAML) to a copy of ``raw``."""
    result = _deep_copy(raw)
    for override in overrides:
        if "=" not in override:
            raise RecipeError(
                f"override {override!r} is not of the form key.path=value", source="command line"
            )
        dotted, text = override.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise RecipeError(f"override {override!r} has an empty key", source="command line")
        value = parse_yaml(text, "command line") if text.strip() else None
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError(
                    f"cannot set {dotted}: {where} is a value, not a section",
                    source="command line",
                    path=dotted,
                )
            node = child
        node[parts[-1]] = value
    del source
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------- configs


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
        _require(
            self.learning_rate is None or self.learning_rate > 0,
            "optimizer.schedule.learning_rate",
            "must be positive",
        )
        _require(
            self.weight_decay is None or self.weight_decay >= 0,
            "optimizer.schedule.weight_decay",
            "must be >= 0",
        )

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
        ema_decay: decay of the exponential moving average of the parameters.
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
        _require(self.learning_rate > 0, "optimizer.learning_rate", "must be positive")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _require(0.0 <= self.ema_decay < 1.0, "optimizer.ema_decay", "must be in [0, 1)")
        _require(
            self.grad_clip is None or self.grad_clip > 0, "optimizer.grad_clip", "must be positive"
        )


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
        sample_every: steps between sample batches (0: only at the end).
        num_samples: sequences per sample batch.
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
    final_eval: bool = True
    on_nonfinite: Literal["halt", "skip"] = "halt"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, f"trainer.{name}", "must be >= 1")
        for name in ("eval_every", "eval_batches", "sample_every", "num_samples"):
            _require(getattr(self, name) >= 0, f"trainer.{name}", "must be >= 0")


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
    """

    batch_size: int = 64
    time_draws: int = 4
    max_examples: int | None = None
    seed: int = 1234
    objectives: tuple[AbstractObjective, ...] = ()

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(self.time_draws >= 1, "eval.time_draws", "must be >= 1")


def _require(condition: bool, path: str, message: str) -> None:
    if not condition:
        raise RecipeError(message, path=path)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A validated network section, built later when its sizes and key are known."""

    name: str
    cls: type
    kwargs: Mapping[str, Any]

    def build(self, **context: Any) -> AbstractNetwork:
        """Construct the network with ddiff's context arguments (sizes, key)."""
        accepted = inspect.signature(self.cls).parameters
        supplied = {k: v for k, v in context.items() if k in accepted}
        return self.cls(**{**self.kwargs, **supplied})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A loaded, validated recipe: built components, configs and the resolved mapping."""

    data: AbstractDataSource
    process: AbstractForwardProcess
    parameterization: AbstractParameterization
    network: NetworkSpec
    objective: AbstractObjective
    sampler: AbstractSampler
    optimizer: OptimizerConfig
    trainer: TrainerConfig
    eval: EvalConfig
    mesh: MeshConfig
    seed: int
    resolved: dict[str, Any]
    names: dict[str, str]
    source: str

    def to_yaml(self) -> str:
        """The fully resolved recipe (every default filled in) as YAML."""
        return dump_yaml(self.resolved)


def dump_yaml(mapping: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(mapping), sort_keys=False, default_flow_style=False)


_COMPONENT_SECTIONS = ("data", "process", "parameterization", "network", "objective", "sampler")
_CONFIG_SECTIONS = {
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "mesh": MeshConfig,
}
_SECTIONS = ("seed", *_COMPONENT_SECTIONS, *_CONFIG_SECTIONS)
_NESTED_CONFIGS = (ParameterGroupConfig,)
"""Config dataclasses that a config section may hold as a nested mapping."""


class _Builder:
    def __init__(self, registry: Registry, source: str):
        self.registry = registry
        self.source = source

    def error(self, path: str, message: str) -> RecipeError:
        return RecipeError(message, source=self.source, path=path)

    def component(
        self, slot: str, raw: Any, path: str, context: Mapping[str, Any], *, build: bool = True
    ) -> tuple[Any, dict[str, Any], str]:
        if raw is None:
            raise self.error(path, f"missing section; give a mapping with kind: <{slot} name>")
        if isinstance(raw, str):
            raw = {"kind": raw}
        if not isinstance(raw, dict):
            raise self.error(path, f"expected a mapping with kind: ..., got {_describe(raw)}")
        if "kind" not in raw:
            names = ", ".join(self.registry.names(slot))
            raise self.error(path, f"missing 'kind' (registered {slot} kinds: {names})")
        name = raw["kind"]
        if not isinstance(name, str):
            raise self.error(f"{path}.kind", f"kind must be a name, got {_describe(name)}")
        try:
            cls = self.registry.get(slot, name)
        except DdiffError:
            raise self.error(
                f"{path}.kind", unknown_name_message(slot, name, self.registry.names(slot))
            ) from None
        arguments = {k: v for k, v in raw.items() if k != "kind"}
        kwargs, resolved = self.arguments(cls, arguments, path, context, f"{slot} {name!r}")
        resolved = {"kind": name, **resolved}
        if not build:
            return NetworkSpec(name, cls, kwargs), resolved, name
        return self.construct(cls, kwargs, path), resolved, name

    def construct(self, cls: type, kwargs: dict[str, Any], path: str) -> Any:
        try:
            return cls(**kwargs)
        except RecipeError as error:
            raise self.error(error.path or path, error.message) from None
        except DdiffError as error:
            raise self.error(path, str(error)) from None
        except (TypeError, ValueError) as error:
            raise self.error(path, f"invalid arguments: {error}") from None

    def arguments(
        self, cls: type, raw: Mapping[str, Any], path: str, context: Mapping[str, Any], what: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        parameters = {
            name: p
            for name, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        hints = _hints(cls)
        settable = [n for n in parameters if n not in context and n not in NETWORK_CONTEXT]
        for key in raw:
            if key in parameters and key not in settable:
                raise self.error(
                    f"{path}.{key}", f"{key} is set by ddiff from the data and model; remove it"
                )
            if key not in parameters:
                accepted = ", ".join(settable)
                raise self.error(
                    f"{path}.{key}", f"unknown key for {what} (accepted: {accepted or 'none'})"
                )
        kwargs: dict[str, Any] = {}
        resolved: dict[str, Any] = {}
        for name in settable:
            parameter = parameters[name]
            hint = hints.get(name, Any)
            if name in raw:
                value, shown = self.value(hint, raw[name], f"{path}.{name}", context)
                kwargs[name] = value
                resolved[name] = shown
            elif parameter.default is inspect.Parameter.empty:
                raise self.error(f"{path}.{name}", f"required key missing for {what}")
            else:
                resolved[name] = _plain(parameter.default)
        for name in parameters:
            if name in context and name not in raw:
                kwargs[name] = context[name]
        return kwargs, resolved

    def value(self, hint: Any, value: Any, path: str, context: Mapping[str, Any]) -> tuple[Any, Any]:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            options = typing.get_args(hint)
            if value is None and type(None) in options:
                return None, None
            real = [o for o in options if o is not type(None)]
            if len(real) == 1:
                return self.value(real[0], value, path, context)
        if isinstance(hint, type):
            for slot, base in SLOTS.items():
                if issubclass(hint, base):
                    component, resolved, _ = self.component(slot, value, path, context)
                    if not isinstance(component, hint):
                        raise self.error(path, f"{type(component).__name__} is not a {hint.__name__}")
                    return component, resolved
        if hint in _NESTED_CONFIGS:
            if not isinstance(value, dict):
                raise self.error(path, f"expected a mapping, got {_describe(value)}")
            kwargs, resolved = self.arguments(hint, value, path, context, path)
            return self.construct(hint, kwargs, path), resolved
        if value is None:
            raise self.error(path, f"expected {_hint_name(hint)}, got null")
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if origin is tuple and isinstance(value, list):
            element = _component_elements(hint)
            if element is not None:
                built = [
                    self.value(element, item, f"{path}[{index}]", context)
                    for index, item in enumerate(value)
                ]
                return tuple(b for b, _ in built), [shown for _, shown in built]
            value = tuple(value)
        if origin is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise self.error(
                    path, f"{value!r} is not one of: {', '.join(repr(a) for a in allowed)}"
                )
            return value, value
        if hint is not Any and not is_bearable(value, hint, conf=_TOWER):
            extra = ""
            if isinstance(value, bool) and hint is str:
                extra = " (quote the value to make it a string)"
            if isinstance(value, str) and hint in (float, int):
                extra = " (write a number without quotes)"
            raise self.error(path, f"expected {_hint_name(hint)}, got {_describe(value)}{extra}")
        return value, _plain(value)


def _component_elements(hint: Any) -> type | None:
    """The component protocol X of a ``tuple[X, ...]`` hint, else None."""
    arguments = typing.get_args(hint)
    if len(arguments) == 2 and arguments[1] is Ellipsis and isinstance(arguments[0], type):
        if any(issubclass(arguments[0], base) for base in SLOTS.values()):
            return arguments[0]
    return None


def _hints(cls: type) -> dict[str, Any]:
    target = cls.__init__ if "__init__" in vars(cls) or not dataclasses.is_dataclass(cls) else cls
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - hints are an aid; unresolvable ones are unchecked
        return {}


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return repr(value)


def build_recipe(
    raw: Mapping[str, Any], *, source: str = "<recipe>", registry: Registry | None = None
) -> Recipe:
    """Validate a recipe mapping and build its components; refuse incompatible pairings."""
    registry = registry or default_registry()
    builder = _Builder(registry, source)
    for key in raw:
        if key not in _SECTIONS:
            raise builder.error(str(key), f"unknown section (accepted: {', '.join(_SECTIONS)})")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise builder.error("seed", f"expected an integer, got {_describe(seed)}")
    resolved: dict[str, Any] = {"seed": seed}
    names: dict[str, str] = {}
    built: dict[str, Any] = {}
    context: dict[str, Any] = {}
    for slot in _COMPONENT_SECTIONS:
        component, shown, name = builder.component(
            slot, raw.get(slot), slot, context, build=slot != "network"
        )
        built[slot], resolved[slot], names[slot] = component, shown, name
        if slot == "data":
            context = {
                "vocab_size": component.vocab_size,
                "seq_len": component.seq_len,
                "num_classes": component.num_classes,
            }
    for section, cls in _CONFIG_SECTIONS.items():
        section_raw = raw.get(section) or {}
        if not isinstance(section_raw, dict):
            raise builder.error(section, f"expected a mapping, got {_describe(section_raw)}")
        kwargs, shown = builder.arguments(cls, section_raw, section, {}, section)
        built[section] = builder.construct(cls, kwargs, section)
        resolved[section] = shown
    components = {
        slot: (names[slot], built[slot])
        for slot in ("process", "parameterization", "objective", "sampler")
    }
    schedule_name = resolved["process"].get("schedule", {}).get("kind", "schedule")
    components["schedule"] = (schedule_name, built["process"].schedule)
    check_compatibility(components, source=source, deferred=("network",))
    extra = eval_objectives(built["eval"], resolved["eval"])
    kinds = [name for name, _ in extra.values()]
    for path, (name, _) in extra.items():
        if kinds.count(name) > 1:
            raise builder.error(path, f"objective {name!r} is listed twice; keep one")
    check_compatibility({**components, **extra}, source=source, deferred=("network",))
    return Recipe(
        seed=seed,
        resolved=resolved,
        names=names,
        source=source,
        **{key: built[key] for key in (*_COMPONENT_SECTIONS, *_CONFIG_SECTIONS)},
    )


def eval_objectives(config: EvalConfig, resolved: Mapping[str, Any]) -> dict[str, tuple[str, AbstractObjective]]:
    """The extra evaluation objectives by recipe path (``eval.objectives[i]``), each with
    its registered name, as :func:`ddiff.capabilities.check_compatibility` takes them."""
    names = [section["kind"] for section in resolved.get("objectives", [])]
    return {
        f"eval.objectives[{index}]": (name, objective)
        for index, (name, objective) in enumerate(zip(names, config.objectives, strict=True))
    }


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), *, registry: Registry | None = None
) -> Recipe:
    """Read, override and build a recipe file."""
    raw = apply_overrides(read_recipe_file(path), overrides, str(path))
    return build_recipe(raw, source=str(path), registry=registry)


def build_component(
    slot: str,
    spec: str | Mapping[str, Any],
    *,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    num_classes: int | None = None,
    context: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
    source: str = "<build_component>",
) -> Any:
    """Build one registered component from a recipe-style section, exactly as a recipe
    would: ``{"kind": name, **arguments}`` or just the name.

    The values ddiff derives from the data (``vocab_size``, ``seq_len``, ``num_classes``)
    come from the keywords or ``context``. A ``network`` section gives a
    :class:`NetworkSpec`, built later with its sizes and key.
    """
    derived = {"vocab_size": vocab_size, "seq_len": seq_len, "num_classes": num_classes}
    merged = {**{k: v for k, v in derived.items() if v is not None}, **dict(context or {})}
    builder = _Builder(registry or default_registry(), source)
    component, _, _ = builder.component(slot, spec, slot, merged, build=slot != "network")
    return component
